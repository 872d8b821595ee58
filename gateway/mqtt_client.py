"""A small, exact asyncio MQTT 3.1.1 client (standard library only).

Used by the CLI (``gateway tail``), by the device simulator (hundreds of clients in one
process) and by the integration tests as a raw, precise client. It therefore stays lean
(two tasks per connection, no threads, no task per message) and exposes raw protocol
results: the CONNACK code, the SUBACK codes and the moment a PUBACK arrives.

Contract
--------
* One `MqttClient` is one network connection: `connect` may be called once; to reconnect,
  make a new client. Session state the broker keeps is reported by `connect`'s return value
  (the CONNACK session-present flag).
* `connect` opens TCP (then TLS when ``ssl`` is given), sends CONNECT and waits for CONNACK.
  - CONNACK code != 0 -> `ConnectRefused` (``return_code`` carries the code).
  - The peer closes, resets or fails TLS before CONNACK -> `ConnectionClosed`, with the
    underlying error (``ssl.SSLError``, ``ConnectionResetError``...) chained as
    ``__cause__``. Under TLS 1.3 a broker refuses a missing or bad client certificate only
    after the handshake, so this is the one way such a refusal shows; TLS 1.2 handshake
    failures are wrapped the same way so callers need a single ``except``.
  - The TCP connect itself failing (refused port, unreachable host, DNS) raises the
    ``OSError`` unchanged: nothing MQTT-level happened yet.
  - Not finished within ``timeout`` -> ``TimeoutError`` (``asyncio.TimeoutError``).
* While connected, a reader task dispatches incoming packets and a keep-alive task sends
  PINGREQ whenever nothing was sent for ``keepalive`` seconds (0 disables it). If a PINGREQ
  stays unanswered for another ``keepalive`` seconds (while the reader is not held back by
  a full inbound queue) the connection is treated as dead. Both tasks are cancelled and
  awaited by `close` / `disconnect`; ``async with MqttClient(...)`` closes on exit.
* When the connection ends for any reason every waiter fails with `ConnectionClosed`:
  CONNACK/SUBACK/UNSUBACK/PUBACK/PUBCOMP futures, callers blocked on ``max_inflight`` and
  `next_message`. Messages already received stay readable; after that `next_message`
  raises, and `messages` stops quietly if the client closed the connection itself, or
  raises `ConnectionClosed` if the peer or the network did. Exceptions set on futures that
  nobody awaits are marked retrieved, so no "never retrieved" warning is logged.
* Incoming QoS 1 messages are PUBACKed once queued, QoS 2 ones get PUBREC on arrival and
  PUBCOMP on PUBREL (delivered once; a re-sent PUBLISH with the same id before PUBREL is
  acknowledged but not delivered again). The inbound queue holds 10,000 messages; when it is
  full the reader stops reading, which pushes back on the broker.
* Outgoing QoS 1/2 publishes are bounded by ``max_inflight`` unacknowledged at once. A
  publish that times out or is cancelled gives its slot back; its late acknowledgement is
  ignored (a late PUBREC still gets its PUBREL, so the broker's flow completes).
* Validation is minimal on purpose: topics must be non-empty and at most 65,535 UTF-8 bytes;
  wildcards or NUL are not refused, because tests use this client to check that the broker
  refuses them. `send_raw` writes arbitrary bytes unchecked. Incoming packets are checked
  strictly (fixed-header flags, lengths, packet ids): a malformed packet from the peer
  closes the connection with `ConnectionClosed` caused by `MqttProtocolError`.

The pure codec (``encode_*``, `decode_packet`, ``parse_*``) has no I/O and can be used
alone, for example to craft malformed packets or to write a fake broker in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl as ssl_module
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

__all__ = [
    "DISCONNECT",
    "PINGREQ",
    "ConnectRefused",
    "ConnectionClosed",
    "Message",
    "MqttClient",
    "MqttError",
    "MqttProtocolError",
    "Packet",
    "PacketType",
    "decode_packet",
    "decode_remaining_length",
    "encode_connect",
    "encode_puback",
    "encode_pubcomp",
    "encode_publish",
    "encode_pubrec",
    "encode_pubrel",
    "encode_remaining_length",
    "encode_subscribe",
    "encode_unsubscribe",
    "parse_connack",
    "parse_packet_id",
    "parse_publish",
    "parse_suback",
]

_logger = logging.getLogger(__name__)

MAX_REMAINING_LENGTH: Final = 268_435_455  # 4 bytes of 7 bits (MQTT 3.1.1, 2.2.3)
MAX_PACKET_ID: Final = 65_535
INBOX_SIZE: Final = 10_000
_READ_SIZE: Final = 65_536
_CLOSE_TIMEOUT: Final = 5.0  # bound on a graceful close (flush + TLS close_notify)

_CONNACK_REASONS: Final = {
    1: "unacceptable protocol version",
    2: "identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


# --------------------------------------------------------------------------- errors


class MqttError(Exception):
    """Base of this module's errors."""


class ConnectRefused(MqttError):
    """The broker answered CONNECT with a non-zero CONNACK return code."""

    def __init__(self, return_code: int) -> None:
        reason = _CONNACK_REASONS.get(return_code, "unknown reason")
        super().__init__(f"connection refused: CONNACK return code {return_code} ({reason})")
        self.return_code = return_code


class ConnectionClosed(MqttError):
    """The connection ended (peer closed, EOF, TLS or socket error, or closed locally)."""


class MqttProtocolError(MqttError):
    """Bytes received from the peer break the MQTT 3.1.1 rules."""


# --------------------------------------------------------------------------- codec


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


# Fixed-header flags every packet type but PUBLISH must carry (MQTT 3.1.1, 2.2.2).
_REQUIRED_FLAGS: Final = {t: (0b0010 if t in (6, 8, 10) else 0) for t in range(1, 15) if t != 3}

PINGREQ: Final = b"\xc0\x00"
DISCONNECT: Final = b"\xe0\x00"


@dataclass(frozen=True, slots=True)
class Message:
    """An application message: received from the broker, or a will to register."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Packet:
    """One decoded control packet: type, the fixed header's low nibble and the rest."""

    type: int
    flags: int
    body: bytes


def encode_remaining_length(length: int) -> bytes:
    """Encode the fixed header's Remaining Length (1-4 bytes, 7 bits each, LSB first)."""
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length out of range: {length}")
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        if length:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def decode_remaining_length(buf: bytes | bytearray, offset: int = 0) -> tuple[int, int] | None:
    """Decode a Remaining Length at ``offset``: ``(value, bytes used)``, or None if incomplete.

    Raises MqttProtocolError when a fifth length byte would be needed.
    """
    value = 0
    for index in range(4):
        if offset + index >= len(buf):
            return None
        byte = buf[offset + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    raise MqttProtocolError("remaining length longer than 4 bytes")


def decode_packet(buf: bytes | bytearray, offset: int = 0) -> tuple[Packet, int] | None:
    """Decode one packet at ``offset``: ``(packet, offset after it)``, or None if incomplete.

    Checks the fixed header (type and its mandatory flags); the body is parsed by the
    ``parse_*`` functions.
    """
    if offset >= len(buf):
        return None
    first = buf[offset]
    packet_type, flags = first >> 4, first & 0x0F
    if packet_type in {0, 15}:
        raise MqttProtocolError(f"reserved packet type {packet_type}")
    if packet_type != PacketType.PUBLISH and flags != _REQUIRED_FLAGS[packet_type]:
        raise MqttProtocolError(f"invalid flags {flags:#06b} for packet type {packet_type}")
    decoded = decode_remaining_length(buf, offset + 1)
    if decoded is None:
        return None
    length, used = decoded
    start = offset + 1 + used
    end = start + length
    if end > len(buf):
        return None
    return Packet(packet_type, flags, bytes(buf[start:end])), end


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_remaining_length(len(body)) + body


def _encode_binary(data: bytes, what: str) -> bytes:
    if len(data) > 65_535:
        raise ValueError(f"{what} longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def _encode_string(text: str, what: str) -> bytes:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not encodable as UTF-8") from exc
    return _encode_binary(data, what)


def _encode_topic(topic: str, what: str = "topic") -> bytes:
    # Minimal on purpose (see module docstring): wildcards and NUL pass, so tests can
    # check that the broker refuses them.
    if not topic:
        raise ValueError(f"{what} must not be empty")
    return _encode_string(topic, what)


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")


def _check_packet_id(packet_id: int) -> None:
    if not 1 <= packet_id <= MAX_PACKET_ID:
        raise ValueError(f"packet identifier out of range: {packet_id}")


def encode_connect(
    *,
    client_id: str,
    keepalive: int,
    clean_session: bool,
    will: Message | None = None,
    username: str | None = None,
    password: bytes | None = None,
) -> bytes:
    """CONNECT for protocol level 4 (MQTT 3.1.1)."""
    if not 0 <= keepalive <= 65_535:
        raise ValueError(f"keepalive out of range: {keepalive}")
    if password is not None and username is None:
        # MQTT 3.1.1, 3.1.2.9: the password flag requires the user name flag.
        raise ValueError("a password requires a user name")
    flags = 0x02 if clean_session else 0
    payload = _encode_string(client_id, "client id")
    if will is not None:
        _check_qos(will.qos)
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _encode_topic(will.topic, "will topic") + _encode_binary(will.payload, "will payload")
    if username is not None:
        flags |= 0x80
        payload += _encode_string(username, "user name")
    if password is not None:
        flags |= 0x40
        payload += _encode_binary(password, "password")
    header = _encode_string("MQTT", "protocol name") + bytes((4, flags)) + keepalive.to_bytes(2, "big")
    return _packet(PacketType.CONNECT << 4, header + payload)


def encode_publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    retain: bool = False,
    packet_id: int | None = None,
    dup: bool = False,
) -> bytes:
    """PUBLISH; ``packet_id`` is required for QoS 1 and 2 and forbidden for QoS 0."""
    _check_qos(qos)
    body = _encode_topic(topic)
    if qos:
        if packet_id is None:
            raise ValueError("QoS 1 and 2 need a packet identifier")
        _check_packet_id(packet_id)
        body += packet_id.to_bytes(2, "big")
    elif packet_id is not None or dup:
        raise ValueError("QoS 0 carries neither a packet identifier nor DUP")
    first = (PacketType.PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return _packet(first, body + payload)


def encode_subscribe(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    """SUBSCRIBE with (topic filter, requested QoS) pairs."""
    _check_packet_id(packet_id)
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    body = packet_id.to_bytes(2, "big")
    for topic_filter, qos in filters:
        _check_qos(qos)
        body += _encode_topic(topic_filter, "topic filter") + bytes((qos,))
    return _packet((PacketType.SUBSCRIBE << 4) | 0b0010, body)


def encode_unsubscribe(packet_id: int, filters: Sequence[str]) -> bytes:
    """UNSUBSCRIBE for the given topic filters."""
    _check_packet_id(packet_id)
    if not filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    body = packet_id.to_bytes(2, "big")
    for topic_filter in filters:
        body += _encode_topic(topic_filter, "topic filter")
    return _packet((PacketType.UNSUBSCRIBE << 4) | 0b0010, body)


def _encode_ack(first_byte: int, packet_id: int) -> bytes:
    _check_packet_id(packet_id)
    return bytes((first_byte, 2)) + packet_id.to_bytes(2, "big")


def encode_puback(packet_id: int) -> bytes:
    return _encode_ack(PacketType.PUBACK << 4, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    return _encode_ack(PacketType.PUBREC << 4, packet_id)


def encode_pubrel(packet_id: int) -> bytes:
    return _encode_ack((PacketType.PUBREL << 4) | 0b0010, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    return _encode_ack(PacketType.PUBCOMP << 4, packet_id)


def parse_connack(body: bytes) -> tuple[bool, int]:
    """CONNACK body -> (session present, return code)."""
    if len(body) != 2 or body[0] & 0xFE:
        raise MqttProtocolError(f"malformed CONNACK body {body.hex()}")
    return bool(body[0] & 0x01), body[1]


def parse_packet_id(body: bytes) -> int:
    """Body of PUBACK / PUBREC / PUBREL / PUBCOMP / UNSUBACK -> packet identifier."""
    if len(body) != 2:
        raise MqttProtocolError(f"acknowledgement body must be 2 bytes, got {len(body)}")
    return _packet_id_at(body, 0)


def _packet_id_at(body: bytes, offset: int) -> int:
    packet_id = int.from_bytes(body[offset : offset + 2], "big")
    if packet_id == 0:
        raise MqttProtocolError("packet identifier 0")
    return packet_id


def parse_suback(body: bytes) -> tuple[int, list[int]]:
    """SUBACK body -> (packet identifier, return codes)."""
    if len(body) < 3:
        raise MqttProtocolError("SUBACK without return codes")
    codes = list(body[2:])
    if any(code not in (0, 1, 2, 0x80) for code in codes):
        raise MqttProtocolError(f"invalid SUBACK return code in {codes}")
    return _packet_id_at(body, 0), codes


def parse_publish(flags: int, body: bytes) -> tuple[Message, int | None]:
    """PUBLISH (fixed-header flags and body) -> (message, packet identifier or None)."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MqttProtocolError("PUBLISH with QoS 3")
    if len(body) < 2:
        raise MqttProtocolError("PUBLISH too short for its topic length")
    topic_end = 2 + int.from_bytes(body[:2], "big")
    payload_start = topic_end + (2 if qos else 0)
    if payload_start > len(body):
        raise MqttProtocolError("PUBLISH shorter than its topic and packet identifier")
    try:
        topic = body[2:topic_end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MqttProtocolError("PUBLISH topic is not valid UTF-8") from exc
    # Wildcards in a received topic are not refused: as a test client we report what the
    # broker sent rather than hide it behind an error.
    packet_id = _packet_id_at(body, topic_end) if qos else None
    return Message(topic, body[payload_start:], qos, bool(flags & 0x01)), packet_id


# --------------------------------------------------------------------------- client


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"  # transport up, CONNECT sent, no CONNACK yet
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(slots=True)
class _Pending:
    """A request waiting for its acknowledgement, keyed by packet identifier."""

    expect: PacketType
    future: asyncio.Future[Any]


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    # Futures failed at connection loss may have no awaiter left (a pipelined publish whose
    # caller dropped the future); reading the exception keeps asyncio from logging
    # "Future exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _normalize_filters(filters: Sequence[tuple[str, int] | str]) -> list[tuple[str, int]]:
    return [(item, 0) if isinstance(item, str) else (item[0], item[1]) for item in filters]


class MqttClient:
    """One MQTT 3.1.1 connection; see the module docstring for the contract."""

    def __init__(
        self,
        *,
        client_id: str = "",
        keepalive: int = 60,
        clean_session: bool = True,
        will: Message | None = None,
        username: str | None = None,
        password: bytes | None = None,
        max_inflight: int = 100,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, not {max_inflight}")
        # Encode now so that bad arguments fail at construction, not half-way through connect.
        self._connect_packet = encode_connect(
            client_id=client_id,
            keepalive=keepalive,
            clean_session=clean_session,
            will=will,
            username=username,
            password=password,
        )
        self.client_id = client_id
        self._keepalive = keepalive
        self._state = _State.NEW
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._connack: asyncio.Future[tuple[bool, int]] | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._awaiting_pubrel: set[int] = set()
        # Since Python 3.10 these bind to a loop on first use, so a client can be built
        # outside of one (in a sync fixture, say).
        self._inflight = asyncio.Semaphore(max_inflight)
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=INBOX_SIZE)
        self._closed_event = asyncio.Event()
        self._close_error: ConnectionClosed | None = None
        self._closed_by_us = False
        self._last_sent = 0.0
        self._ping_sent_at: float | None = None
        self._reader_stalled = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        """True once the connection has ended (closed locally, by the peer, or failed)."""
        return self._state is _State.CLOSED

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - one deadline for TCP, TLS and CONNACK
    ) -> int:
        """Open the connection and complete CONNECT/CONNACK; return session present (0/1)."""
        if self._state is not _State.NEW:
            raise MqttError("connect() can be called once per client; make a new client")
        self._state = _State.OPEN
        try:
            async with asyncio.timeout(timeout):
                await self._open(host, port, ssl, server_hostname)
                session_present, return_code = await self._handshake()
        except BaseException:
            # Timeout, refusal, cancellation: leave nothing running behind us.
            await self.close()
            raise
        if return_code != 0:
            await self.close()
            raise ConnectRefused(return_code)
        if self._keepalive > 0 and self._state is _State.CONNECTED:
            self._keepalive_task = asyncio.create_task(
                self._keepalive_loop(), name=f"mqtt-keepalive-{self.client_id}"
            )
        return int(session_present)

    async def _open(
        self, host: str, port: int, context: ssl_module.SSLContext | None, server_hostname: str | None
    ) -> None:
        # TCP first, TLS second: a refused TCP connect stays an OSError, while anything the
        # peer does after accepting (TLS alert, reset, EOF) becomes ConnectionClosed.
        reader, self._writer = await asyncio.open_connection(host, port)
        if context is not None:
            try:
                await self._writer.start_tls(context, server_hostname=server_hostname or host)
            except OSError as exc:  # ssl.SSLError is an OSError too
                raise ConnectionClosed(f"TLS handshake with {host}:{port} failed: {exc}") from exc
        self._reader_task = asyncio.create_task(self._read_loop(reader), name=f"mqtt-reader-{self.client_id}")

    async def _handshake(self) -> tuple[bool, int]:
        connack: asyncio.Future[tuple[bool, int]] = asyncio.get_running_loop().create_future()
        connack.add_done_callback(_mark_retrieved)
        self._connack = connack
        await self._send(self._connect_packet)
        return await connack

    async def disconnect(self) -> None:
        """Send DISCONNECT (the broker then drops the will) and close the connection."""
        if self._state in (_State.OPEN, _State.CONNECTED) and self._writer is not None:
            self._writer.write(DISCONNECT)
            # A graceful close flushes DISCONNECT before the FIN; mark the end first so the
            # reader does not report the broker's close as a loss.
            self._shutdown(ConnectionClosed("disconnected by client"), by_us=True, abort=False)
        await self._finish()

    async def close(self) -> None:
        """Drop the connection without DISCONNECT (like a lost connection); idempotent."""
        self._shutdown(ConnectionClosed("closed by client"), by_us=True, abort=True)
        await self._finish()

    async def wait_closed(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Return once the connection has ended; TimeoutError after ``timeout`` seconds."""
        if self._state is _State.NEW:
            raise MqttError("not connected")
        async with asyncio.timeout(timeout):
            await self._closed_event.wait()

    def _shutdown(self, error: ConnectionClosed, *, by_us: bool = False, abort: bool = True) -> None:
        """End the connection once: close the transport and fail every waiter with ``error``."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._closed_by_us = by_us
        self._close_error = error
        if self._writer is not None:
            if abort:
                self._writer.transport.abort()
            else:
                self._writer.close()
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(self._closed_exc())
        for entry in list(self._pending.values()):
            if not entry.future.done():
                entry.future.set_exception(self._closed_exc())
        self._pending.clear()
        self._wake_consumers()
        self._closed_event.set()
        current = asyncio.current_task()
        for task in (self._reader_task, self._keepalive_task):
            if task is not None and task is not current:
                task.cancel()

    def _closed_exc(self) -> ConnectionClosed:
        # A fresh exception per waiter: one shared instance would collect every waiter's
        # traceback.
        original = self._close_error
        if original is None:
            return ConnectionClosed("not connected")
        exc = ConnectionClosed(*original.args)
        exc.__cause__ = original.__cause__
        return exc

    async def _finish(self) -> None:
        """Await the owned tasks and the transport after `_shutdown`."""
        self._shutdown(ConnectionClosed("closed by client"), by_us=True)
        current = asyncio.current_task()
        tasks = [t for t in (self._reader_task, self._keepalive_task) if t is not None and t is not current]
        for task in tasks:
            task.cancel()  # no-op for finished tasks; _shutdown may have run before one started
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                # The error that ended the connection was already reported to the waiters.
                with contextlib.suppress(OSError):
                    await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()

    # ------------------------------------------------------------------ sending

    def _write(self, data: bytes) -> None:
        if self._state is _State.NEW or self._writer is None:
            raise MqttError("not connected")
        if self._state is _State.CLOSED:
            raise self._closed_exc()
        self._writer.write(data)
        self._last_sent = asyncio.get_running_loop().time()

    async def _drain(self) -> None:
        if self._writer is None:
            raise MqttError("not connected")
        try:
            await self._writer.drain()
        except OSError as exc:
            self._shutdown(ConnectionClosed(f"connection lost: {exc}"), abort=True)
            raise self._closed_exc() from exc
        if self._state is _State.CLOSED:
            raise self._closed_exc()

    async def _send(self, data: bytes) -> None:
        self._write(data)
        await self._drain()

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` unchecked (tests use it to send malformed packets)."""
        await self._send(data)

    def _allocate_id(self) -> int:
        if len(self._pending) >= MAX_PACKET_ID:
            raise MqttError("no free packet identifier")
        while True:
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self._pending:
                return self._next_id

    def _register(
        self, expect: PacketType, on_done: Callable[[], None] | None = None
    ) -> tuple[int, _Pending]:
        packet_id = self._allocate_id()
        entry = _Pending(expect, asyncio.get_running_loop().create_future())
        self._pending[packet_id] = entry

        def done(_: asyncio.Future[Any]) -> None:
            # Identity check: the id may already belong to a newer request.
            if self._pending.get(packet_id) is entry:
                del self._pending[packet_id]
            if on_done is not None:
                on_done()

        entry.future.add_done_callback(_mark_retrieved)
        entry.future.add_done_callback(done)
        return packet_id, entry

    async def _request(self, expect: PacketType, build: Callable[[int], bytes]) -> Any:
        """Send the packet ``build(packet_id)`` and return what its acknowledgement carries."""
        self._check_connected()
        packet_id, entry = self._register(expect)
        try:
            await self._send(build(packet_id))
            return await entry.future
        finally:
            if not entry.future.done():
                entry.future.cancel()

    def _check_connected(self) -> None:
        if self._state is _State.CLOSED:
            raise self._closed_exc()
        if self._state is not _State.CONNECTED:
            raise MqttError("not connected")

    async def subscribe(
        self,
        *filters: tuple[str, int] | str,
        timeout: float = 10.0,  # noqa: ASYNC109 - part of the public API
    ) -> list[int]:
        """Subscribe (a bare string means QoS 0); return the SUBACK return codes."""
        pairs = _normalize_filters(filters)
        encode_subscribe(1, pairs)  # validate before anything is sent
        async with asyncio.timeout(timeout):
            codes: list[int] = await self._request(
                PacketType.SUBACK, lambda packet_id: encode_subscribe(packet_id, pairs)
            )
        return codes

    async def unsubscribe(self, *filters: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Unsubscribe and wait for the UNSUBACK."""
        encode_unsubscribe(1, filters)
        async with asyncio.timeout(timeout):
            await self._request(PacketType.UNSUBACK, lambda packet_id: encode_unsubscribe(packet_id, filters))

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float = 10.0,  # noqa: ASYNC109 - part of the public API
    ) -> None:
        """Publish; QoS 0 returns once written, QoS 1 on PUBACK, QoS 2 on PUBCOMP."""
        async with asyncio.timeout(timeout):
            done = await self.publish_nowait_ack(topic, payload, qos=qos, retain=retain)
            await done

    async def publish_nowait_ack(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
    ) -> asyncio.Future[None]:
        """Send now; return a future that resolves on PUBACK (QoS 1) or PUBCOMP (QoS 2).

        At most ``max_inflight`` QoS 1/2 publishes are unacknowledged at once: this waits for
        a slot. For QoS 0 the returned future is already done. Cancelling the future gives
        the slot back and ignores a late acknowledgement.
        """
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        encode_publish(topic, b"", qos=qos, retain=retain, packet_id=1 if qos else None)  # validate
        self._check_connected()
        if qos == 0:
            await self._send(encode_publish(topic, data, retain=retain))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        inflight = self._inflight
        await inflight.acquire()
        if self._state is not _State.CONNECTED:
            inflight.release()
            raise self._closed_exc()
        expect = PacketType.PUBACK if qos == 1 else PacketType.PUBREC
        try:
            packet_id, entry = self._register(expect, on_done=inflight.release)
        except MqttError:  # no free packet identifier
            inflight.release()
            raise
        try:
            await self._send(encode_publish(topic, data, qos=qos, retain=retain, packet_id=packet_id))
        except BaseException:
            if not entry.future.done():
                entry.future.cancel()
            raise
        return entry.future

    # ------------------------------------------------------------------ receiving

    async def next_message(self, timeout: float) -> Message:  # noqa: ASYNC109
        """The next received message; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            return await self._get_message()

    async def messages(self) -> AsyncIterator[Message]:
        """Iterate over received messages until the connection ends (see module docstring)."""
        while True:
            try:
                message = await self._get_message()
            except ConnectionClosed:
                if self._closed_by_us:
                    return
                raise
            yield message

    async def _get_message(self) -> Message:
        inbox = self._inbox
        if self._state is _State.NEW:
            raise MqttError("not connected")
        while True:
            if self._state is _State.CLOSED:
                return self._drain_inbox(inbox)
            item = await inbox.get()
            if item is not None:
                return item
            # None is the wake-up left by _shutdown; the CLOSED branch handles it.

    def _drain_inbox(self, inbox: asyncio.Queue[Message | None]) -> Message:
        """After the end: hand out what is left, then fail; never blocks."""
        while not inbox.empty():
            item = inbox.get_nowait()
            if item is not None:
                return item
        # Leave a wake-up for any other consumer still blocked in get().
        inbox.put_nowait(None)
        raise self._closed_exc()

    def _wake_consumers(self) -> None:
        # Consumers block only on an empty queue, so when it is full nobody needs waking.
        if not self._inbox.full():
            self._inbox.put_nowait(None)

    async def _deliver(self, message: Message) -> None:
        inbox = self._inbox
        if not inbox.full():
            inbox.put_nowait(message)
            return
        # Back-pressure: stop reading until the application catches up. The keep-alive
        # check knows we are not reading, so an unread PINGRESP is not taken for a dead peer.
        self._reader_stalled = True
        try:
            await inbox.put(message)
        finally:
            self._reader_stalled = False

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        """Read and dispatch packets until EOF, an error, or cancellation by close()."""
        buf = bytearray()
        try:
            while True:
                try:
                    chunk = await reader.read(_READ_SIZE)
                except OSError as exc:  # includes ssl.SSLError (e.g. certificate refused)
                    self._lost(ConnectionClosed(f"connection lost: {exc}"), exc)
                    return
                if not chunk:
                    self._lost(ConnectionClosed("connection closed by peer"), None)
                    return
                buf += chunk
                offset = 0
                while (decoded := decode_packet(buf, offset)) is not None:
                    packet, offset = decoded
                    await self._dispatch(packet)
                del buf[:offset]
        except MqttProtocolError as exc:
            self._lost(ConnectionClosed(f"protocol violation by peer: {exc}"), exc)
        except Exception as exc:
            # A bug must not leave waiters hanging: fail them with the bug as the cause.
            _logger.exception("MQTT reader failed")
            self._lost(ConnectionClosed(f"reader failed: {exc!r}"), exc)

    def _lost(self, error: ConnectionClosed, cause: BaseException | None) -> None:
        error.__cause__ = cause
        self._shutdown(error, abort=True)

    async def _dispatch(self, packet: Packet) -> None:
        if self._state is _State.OPEN:
            self._on_connack(packet)
            return
        handler = self._handlers.get(packet.type)
        if handler is None:
            raise MqttProtocolError(f"unexpected packet type {packet.type} from the server")
        await handler(self, packet)

    def _on_connack(self, packet: Packet) -> None:
        if packet.type != PacketType.CONNACK:
            raise MqttProtocolError(f"expected CONNACK, got packet type {packet.type}")
        connack = self._connack
        if connack is None:
            raise MqttProtocolError("CONNACK before CONNECT was sent")
        session_present, return_code = parse_connack(packet.body)
        if return_code == 0:
            # Switch here, not in connect(): packets may follow CONNACK in the same read
            # (a resumed session's queued messages) before connect() gets to run.
            self._state = _State.CONNECTED
        if not connack.done():
            connack.set_result((session_present, return_code))

    async def _on_publish(self, packet: Packet) -> None:
        message, packet_id = parse_publish(packet.flags, packet.body)
        if packet_id is None:
            await self._deliver(message)
        elif message.qos == 1:
            # PUBACK only once queued: with a full queue the broker's in-flight window
            # fills up and it slows down, instead of us dropping acknowledged messages.
            await self._deliver(message)
            self._write(encode_puback(packet_id))
        else:
            if packet_id not in self._awaiting_pubrel:
                await self._deliver(message)
                self._awaiting_pubrel.add(packet_id)
            self._write(encode_pubrec(packet_id))
        # No drain here: acknowledgements are 4 bytes, bounded by the broker's in-flight
        # window, and a reader blocked on writing could not read what unblocks the peer.

    async def _on_pubrel(self, packet: Packet) -> None:
        packet_id = parse_packet_id(packet.body)
        self._awaiting_pubrel.discard(packet_id)
        # Answer even an unknown id (MQTT 3.1.1, 4.3.3): the broker retries PUBREL until
        # it gets its PUBCOMP.
        self._write(encode_pubcomp(packet_id))

    async def _on_pubrec(self, packet: Packet) -> None:
        packet_id = parse_packet_id(packet.body)
        # PUBREL even when the publisher gave up waiting: it completes the broker's flow.
        self._write(encode_pubrel(packet_id))
        entry = self._pending.get(packet_id)
        if entry is not None and entry.expect is PacketType.PUBREC:
            entry.expect = PacketType.PUBCOMP

    async def _on_ack(self, packet: Packet) -> None:
        packet_id = parse_packet_id(packet.body)
        self._resolve(packet_id, PacketType(packet.type), None)

    async def _on_suback(self, packet: Packet) -> None:
        packet_id, codes = parse_suback(packet.body)
        self._resolve(packet_id, PacketType.SUBACK, codes)

    async def _on_pingresp(self, packet: Packet) -> None:
        if packet.body:
            raise MqttProtocolError("PINGRESP with a body")
        self._ping_sent_at = None

    def _resolve(self, packet_id: int, kind: PacketType, value: object) -> None:
        entry = self._pending.get(packet_id)
        # An acknowledgement nobody waits for (the caller timed out or cancelled) is
        # dropped: the request was already given up on.
        if entry is None or entry.expect is not kind:
            return
        del self._pending[packet_id]
        if not entry.future.done():
            entry.future.set_result(value)

    _handlers: Final[dict[int, Callable[[MqttClient, Packet], Any]]] = {
        PacketType.PUBLISH: _on_publish,
        PacketType.PUBACK: _on_ack,
        PacketType.PUBREC: _on_pubrec,
        PacketType.PUBREL: _on_pubrel,
        PacketType.PUBCOMP: _on_ack,
        PacketType.SUBACK: _on_suback,
        PacketType.UNSUBACK: _on_ack,
        PacketType.PINGRESP: _on_pingresp,
    }

    # ------------------------------------------------------------------ keep-alive

    async def _keepalive_loop(self) -> None:
        """Send PINGREQ when idle for ``keepalive`` s; end the connection if unanswered."""
        loop = asyncio.get_running_loop()
        interval = float(self._keepalive)
        while True:
            now = loop.time()
            idle = now - self._last_sent
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            if self._ping_unanswered(now, interval):
                self._shutdown(ConnectionClosed(f"no PINGRESP within {self._keepalive} s"), abort=True)
                return
            try:
                self._write(PINGREQ)
            except MqttError:
                return  # the connection ended meanwhile; its waiters were already failed
            if self._ping_sent_at is None:
                self._ping_sent_at = now
            await asyncio.sleep(interval)

    def _ping_unanswered(self, now: float, interval: float) -> bool:
        # While the reader is held by back-pressure it cannot see a PINGRESP, so silence
        # then says nothing about the peer.
        return (
            self._ping_sent_at is not None
            and now - self._ping_sent_at >= interval
            and not self._reader_stalled
        )
