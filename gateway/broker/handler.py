"""One admitted connection: the reader loop (keep-alive, protocol checks, inline PUBLISH
handling) and acknowledgements released by commits.

Receives packets framed by the connection's `FrameReader` (`gateway.broker.frames`)
and a publish sink (the engine); hands each checked PUBLISH to the sink and writes
PUBACK/PUBREC/PUBCOMP in arrival order once the future the sink returned resolves
(gaps 2, 6, 7, 10, 11 of AMQTT-NOTES.md).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from amqtt.adapters import BufferReader, StreamReaderAdapter, StreamWriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler

from gateway.broker.frames import FrameReader, IdleTimeout
from gateway.broker.session import LiveSession
from gateway.core import wire
from gateway.core.presence import OfflineReason
from gateway.errors import ProtocolViolation
from gateway.logs import get_logger

log = get_logger("gateway.broker")

MAX_QOS2_IN_FLIGHT = 100
# First bytes of the acknowledgements the gateway sends for inbound publishes.
_PUBACK, _PUBREC, _PUBCOMP = 0x40, 0x50, 0x70
_ACK = struct.Struct("!BBH")  # first byte, remaining length 2, packet id
WRITER_CLOSE_TIMEOUT_S = 1.0


class ConnectRefused(AMQTTError):
    """A CONNECT was answered with a refusal; amqtt's caller logs and forgets it."""


class WriterAdapter(StreamWriterAdapter):
    """amqtt's stream writer, with a bounded close.

    asyncio waits up to 30 s for the peer's TLS close_notify; a kicked or dead peer
    must not hold the disconnect flow (and its OFFLINE status) that long.
    """

    is_closed: bool

    def __init__(self, writer: asyncio.StreamWriter, connection_tag: str) -> None:
        super().__init__(writer)
        self._stream_writer = writer
        self.connection_tag = connection_tag
        # Read once: after the peer resets, asyncio no longer knows the address and
        # amqtt's CONNECT handling crashed on the missing value.
        peer = writer.get_extra_info("peername")
        self._peer: tuple[str, int] | None = (str(peer[0]), int(peer[1])) if peer and len(peer) >= 2 else None
        ssl_object = writer.get_extra_info("ssl_object")
        self.peer_certificate: bytes | None = (
            None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        )

    def get_peer_info(self) -> tuple[str, int] | None:
        return self._peer

    async def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        self._stream_writer.close()
        try:
            await asyncio.wait_for(self._stream_writer.wait_closed(), WRITER_CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError, ssl.SSLError):
            self._stream_writer.transport.abort()


class ReaderAdapter(StreamReaderAdapter):
    """amqtt's stream reader, carrying the connection's `FrameReader` from CONNECT to the end.

    Every packet of the connection, CONNECT included, is read through ``frames``: the
    bytes that arrived with CONNECT stay buffered there for the session's reader loop.
    """

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int) -> None:
        super().__init__(reader)
        self.frames = FrameReader(reader, max_bytes)


class Handler(BrokerProtocolHandler):
    """amqtt's broker handler with our reader loop (gaps 2, 6, 7, 11)."""

    _disconnect_waiter: asyncio.Future[DisconnectPacket | None] | None
    live: LiveSession | None = None
    keepalive_factor: float = 1.5
    on_publish: Callable[[Handler, wire.PublishFields], Awaitable[asyncio.Future[None] | None]] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: collections.deque[tuple[int, int, asyncio.Future[None] | None]] = collections.deque()
        self._topics: dict[bytes, str] = {}  # topic names of this connection already checked

    async def close_with(self, reason: OfflineReason) -> None:
        """End the session through the normal disconnect flow (gap 10).

        Works at any point after admission: a close requested before the handler
        started (an operator blocks the device while its ONLINE status is being
        written) is carried out as soon as it starts.
        """
        if self.live is not None and self.live.close_reason is None:
            self.live.close_reason = reason
        await self.handle_connection_closed()

    def _waiter(self) -> asyncio.Future[DisconnectPacket | None]:
        if self._disconnect_waiter is None:
            self._disconnect_waiter = asyncio.get_running_loop().create_future()
        return self._disconnect_waiter

    async def start(self) -> None:
        # amqtt creates the disconnect waiter only after the reader task has started,
        # so an immediate EOF was lost and the session stayed connected forever.
        self._waiter()
        await ProtocolHandler.start(self)
        if self.live is not None and self.live.close_reason is not None:
            await self.handle_connection_closed()

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        waiter = self._waiter()
        if not waiter.done():
            waiter.set_result(disconnect)

    async def wait_disconnect(self) -> DisconnectPacket | None:
        return await self._waiter()

    async def _reader_loop(self) -> None:
        if self.session is None or self.reader is None or self._reader_ready is None:
            raise AMQTTError("handler started without a session")
        if not isinstance(self.reader, ReaderAdapter):
            raise AMQTTError("handler started without a framed reader")
        frames = self.reader.frames
        keep_alive = self.session.keep_alive
        frames.set_idle_limit(keep_alive * self.keepalive_factor if keep_alive > 0 else None)
        reason: OfflineReason | None = None
        self._reader_ready.set()
        try:
            reason = await self._read_packets(frames)
        except ProtocolViolation as exc:
            reason = OfflineReason.PROTOCOL_ERROR
            log.warning("session.protocol_violation", client_id=self.session.client_id, reason=exc.message)
        except (MQTTError, AMQTTError) as exc:
            reason = OfflineReason.PROTOCOL_ERROR
            log.warning("session.protocol_violation", client_id=self.session.client_id, reason=str(exc))
        except (asyncio.IncompleteReadError, NoDataError, ConnectionError, ssl.SSLError, OSError):
            reason = OfflineReason.CONNECTION_LOST
        except asyncio.CancelledError:
            pass  # stop() cancels the reader; the disconnect flow below still runs
        except Exception:
            # A bug in the gateway, not the device's doing: end this one session through the
            # normal disconnect flow (OFFLINE recorded), never leave it half alive or silent.
            reason = OfflineReason.CONNECTION_LOST
            log.exception("session.crashed", client_id=self.session.client_id)
        finally:
            frames.close()
            if reason is not None and self.live is not None and self.live.close_reason is None:
                self.live.close_reason = reason
            await self.handle_connection_closed()
            self._reader_stopped.set()
        await self.stop()

    async def _read_packets(self, frames: FrameReader) -> OfflineReason | None:
        """Read and handle packets until the session ends; the reason when the gateway ends it."""
        while True:
            try:
                frame = await frames.next()
            except IdleTimeout:
                return OfflineReason.KEEPALIVE_TIMEOUT
            if frame is None:
                return None
            packet_type, flags, body = frame
            if self.live is not None:
                self.live.last_packet_at = time.time()
            if packet_type == wire.PUBLISH:
                await self._inbound_publish(wire.parse_publish(flags, body, self._topics))
                continue
            wire.check_packet(packet_type, flags, body)
            if packet_type == wire.PUBREL:
                self._release(int.from_bytes(body[:2], "big"))
                continue
            fixed = MQTTFixedHeader(packet_type, flags, len(body))
            packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
            if packet_type == wire.DISCONNECT:
                await self.handle_disconnect(packet)
                return None
            await self._dispatch(packet_type, packet)

    # --- inbound PUBLISH: acknowledged only once stored (gap 7) ------------------------
    #
    # amqtt sent PUBACK as soon as a message sat in memory, from a task per packet.
    # Here the reader hands each PUBLISH to the broker inline (a full ingest queue stops
    # the reader, so the socket is no longer read), and the acknowledgement (PUBACK, or
    # PUBREC for QoS 2) waits for the future the broker returns: resolved when the
    # batch holding the message is committed. Acknowledgements leave in the order the
    # PUBLISHes arrived (MQTT-4.6.0-2), whatever order their batches commit in.

    async def _inbound_publish(self, fields: wire.PublishFields) -> None:
        if self.on_publish is None or self.session is None:
            raise AMQTTError("handler has no publish sink")
        pending = self._qos2_pending()
        if fields.qos == 2 and fields.packet_id in pending:
            self._queue_ack(_PUBREC, fields.packet_id, pending[fields.packet_id])  # a resend
            return
        stored = await self.on_publish(self, fields)
        if fields.packet_id is None:
            return
        if fields.qos == 2:
            if len(pending) >= MAX_QOS2_IN_FLIGHT:
                raise wire.violation("too many QoS 2 messages awaiting PUBREL")
            pending[fields.packet_id] = stored
            self._queue_ack(_PUBREC, fields.packet_id, stored)
        else:
            self._queue_ack(_PUBACK, fields.packet_id, stored)

    def _qos2_pending(self) -> dict[int, asyncio.Future[None] | None]:
        """QoS 2 packet ids received and not yet released; kept on the (possibly persistent) session."""
        if self.session is None:
            return {}
        pending: dict[int, asyncio.Future[None] | None]
        pending = self.session.attributes.setdefault("gateway.qos2", {})
        return pending

    def _release(self, packet_id: int) -> None:
        """PUBREL: the client is done with this id; PUBCOMP in any case (MQTT-4.3.3)."""
        self._qos2_pending().pop(packet_id, None)
        self._queue_ack(_PUBCOMP, packet_id, None)

    def _queue_ack(self, first_byte: int, packet_id: int, stored: asyncio.Future[None] | None) -> None:
        self._acks.append((first_byte, packet_id, stored))
        if len(self._acks) == 1:
            self._flush_acks()
        # Otherwise an earlier acknowledgement is waiting for its commit, and the flush
        # its commit triggers takes this one along.

    def _flush_acks(self, _: object = None) -> None:
        """Write every acknowledgement at the head of the queue whose message is stored.

        They leave in one write: one TLS record and one send() for a committed batch
        instead of one per PUBACK. Only the first one still waiting gets a done-callback
        (one per connection and commit, not one per message): whatever follows it leaves
        after it anyway.
        """
        out = bytearray()
        try:
            while self._acks:
                first_byte, packet_id, stored = self._acks[0]
                if stored is not None:
                    if not stored.done():
                        stored.add_done_callback(self._flush_acks)
                        return
                    if stored.cancelled() or stored.exception() is not None:
                        # Not stored: never acknowledge. Closing makes the device resend it.
                        self._acks.clear()
                        if self.live is not None and self.live.close_reason is None:
                            self.live.close_reason = OfflineReason.STORE_UNAVAILABLE
                        waiter = self._waiter()
                        if not waiter.done():
                            waiter.set_result(None)
                        return
                self._acks.popleft()
                out += _ACK.pack(first_byte, 2, packet_id)
        finally:
            if out and self.writer is not None:
                self.writer.write(bytes(out))

    async def _dispatch(self, packet_type: int, packet: Any) -> None:
        handlers: dict[int, Callable[[Any], Awaitable[None]]] = {
            wire.PUBACK: self.handle_puback,
            wire.PUBREC: self.handle_pubrec,
            wire.PUBCOMP: self.handle_pubcomp,
            wire.SUBSCRIBE: self.handle_subscribe,
            wire.UNSUBSCRIBE: self.handle_unsubscribe,
            wire.PINGREQ: self.handle_pingreq,
        }
        await handlers[packet_type](packet)
