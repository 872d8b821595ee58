"""The MQTT provisioning listener: a device without a certificate trades a token and a CSR for one.

Receives TCP connections on ``provisioning.mqtt_host:mqtt_port`` (started only when
``provisioning.mqtt_enabled``). Each connection is one attempt, counted against its
source address at accept (`RateLimiter`, ``mqtt_attempts_per_minute``); it is then
upgraded with server-authenticated TLS (`Pki.provisioning_context`, no client
certificate) within ``mqtt.tls_handshake_timeout_s``, and the client has
``mqtt.connect_timeout_s`` after the handshake to send CONNECT, SUBSCRIBE and its
request; a packet over ``mqtt.max_packet_bytes`` ends the connection. What a client
may send, and the answers, are `gateway.core.provisioning.Dialogue`'s; a client over
its limit gets CONNACK 3 before it sends a token.

Hands on the request to `DeviceService.provision`, the answer to the client (then
the connection is closed), counters on the listener, one log event per outcome
(``provisioning.accepted``, ``provisioning.refused``, ``provisioning.dropped``,
``provisioning.tls_failed``; never the token or the CSR), and a
``gateway/events/connect_failed`` event (``listener: "provisioning"``) per refusal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.config import MqttSettings, ProvisioningSettings
from gateway.core import wire
from gateway.core.clock import iso
from gateway.core.provisioning import (
    PROVISIONED,
    RATE_LIMITED,
    Dialogue,
    End,
    ProvisionRequest,
    Redeem,
    Reply,
    accepted_answer,
    rejected_answer,
)
from gateway.core.ratelimit import Rate, RateLimiter
from gateway.devices import Provisioned
from gateway.errors import GatewayError, ProtocolViolation
from gateway.events import Events
from gateway.listener import tls_reason
from gateway.logs import get_logger

log = get_logger("gateway.provisioning")

CLOSE_TIMEOUT_S = 1.0  # for the peer's TLS close_notify after the answer
INTERNAL_ERROR = "internal_error"


class Provisioner(Protocol):
    async def provision(self, token: str, csr: str | bytes) -> Provisioned: ...


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> tuple[int, int, bytes] | None:
    """One MQTT packet as (type, flags, body); None on a clean EOF between packets."""
    first = await reader.read(1)
    if not first:
        return None
    encoded = b""
    while (decoded := wire.decode_remaining_length(encoded)) is None:
        encoded += await reader.readexactly(1)
    wire.check_size(decoded[0], max_bytes)
    body = await reader.readexactly(decoded[0])
    return first[0] >> 4, first[0] & 0x0F, body


class ProvisioningListener:
    """The provisioning port: `start`, `port`, `stop`; counters for tests and operators."""

    def __init__(
        self,
        devices: Provisioner,
        events: Events,
        context: ssl.SSLContext,
        settings: ProvisioningSettings,
        mqtt: MqttSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._devices = devices
        self._events = events
        self._context = context
        self._settings = settings
        self._mqtt = mqtt
        self._clock = clock
        self._limiter = RateLimiter(Rate(settings.mqtt_attempts_per_minute, per_s=60.0))
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._redeeming: set[asyncio.Task[Any]] = set()  # past the request: let them answer
        self.attempts = 0  # connections accepted, each one attempt
        self.provisioned = 0
        self.refused: collections.Counter[str] = collections.Counter()  # by code; each one an event
        self.dropped: collections.Counter[str] = collections.Counter()  # left, lost or timed out
        self.tls_failures = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self._settings.mqtt_host, self._settings.mqtt_port, reuse_address=True
        )
        log.info("provisioning.listening", host=self._settings.mqtt_host, port=self.port)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("provisioning listener not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting and cut every conversation, except that a request being redeemed gets
        `grace_s` to deliver its answer (its token may already be spent)."""
        if self._server is None:
            return
        self._server.close()
        for task in self._connections - self._redeeming:
            task.cancel()
        pending = set(self._connections)
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        host = str(peer[0])
        raw = writer.transport  # start_tls replaces writer.transport; this one is the TCP socket
        self.attempts += 1
        verdict = self._limiter.allow(host, self._clock())
        try:
            try:
                await writer.start_tls(
                    self._context, ssl_handshake_timeout=self._mqtt.tls_handshake_timeout_s
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                self.tls_failures += 1
                log.info("provisioning.tls_failed", peer=host, reason=tls_reason(exc))
                return
            dialogue = Dialogue(over_limit=not verdict.allowed)
            await self._converse(reader, writer, dialogue, host, verdict.retry_after_s)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            if task is not None:
                self._connections.discard(task)
                self._redeeming.discard(task)
            with contextlib.suppress(Exception):
                if not raw.is_closing():
                    raw.abort()

    async def _converse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dialogue: Dialogue,
        host: str,
        retry_after_s: float,
    ) -> None:
        """Run the dialogue to its end, answer, close: one request per connection."""
        try:
            async with asyncio.timeout(self._mqtt.connect_timeout_s):
                while True:
                    frame = await read_frame(reader, self._mqtt.max_packet_bytes)
                    if frame is None:
                        self._dropped("connection_lost", host, dialogue)
                        return
                    outcome = dialogue.receive(*frame)
                    if not isinstance(outcome, Reply):
                        break
                    writer.write(outcome.data)
                    await writer.drain()
        except TimeoutError:
            self._dropped("timeout", host, dialogue)
            return
        except ProtocolViolation as exc:  # framing; the dialogue judges everything else
            outcome = End("protocol_violation", exc.message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            self._dropped("connection_lost", host, dialogue)
            return
        if isinstance(outcome, Redeem):
            writer.write(outcome.data)  # the PUBACK: the request arrived; the answer follows
            outcome = await self._redeem(outcome.request, host)
        writer.write(outcome.data)  # the answer first; the close waits for the bookkeeping
        if outcome.failure:
            await self._refused(outcome, host, dialogue, retry_after_s)
        elif outcome.reason != PROVISIONED:
            self._dropped(outcome.reason, host, dialogue)
        await _close(writer)

    async def _redeem(self, request: ProvisionRequest, host: str) -> End:
        task = asyncio.current_task()
        if task is not None:
            self._redeeming.add(task)
        try:
            result = await self._devices.provision(request.token, request.csr)
        except GatewayError as exc:  # ProvisioningRefused, InvalidValue, StoreUnavailable...
            return End(exc.code, exc.message, rejected_answer(exc.code, exc.message))
        except Exception:
            log.exception("provisioning.failed", peer=host)
            message = "the gateway could not provision; try again"
            return End(INTERNAL_ERROR, message, rejected_answer(INTERNAL_ERROR, message))
        self.provisioned += 1
        log.info("provisioning.accepted", peer=host, device_id=result.device_id, serial=result.serial)
        answer = accepted_answer(
            result.device_id,
            result.certificate_pem,
            result.ca_chain_pem,
            result.serial,
            iso(result.not_after) or "",
        )
        return End(PROVISIONED, f"provisioned {result.device_id}", answer)

    async def _refused(self, outcome: End, host: str, dialogue: Dialogue, retry_after_s: float) -> None:
        self.refused[outcome.reason] += 1
        extra: dict[str, Any] = {}
        if outcome.reason == RATE_LIMITED:
            extra["retry_after_s"] = round(retry_after_s, 3)
        log.info(
            "provisioning.refused",
            reason=outcome.reason,
            message=outcome.message,
            peer=host,
            client_id=dialogue.client_id,
            **extra,
        )
        await self._events.emit(
            "connect_failed",
            reason=outcome.reason,
            message=outcome.message,
            fingerprint=None,
            client_id=dialogue.client_id,
            client_ip=host,
            listener="provisioning",
            **extra,
        )

    def _dropped(self, reason: str, host: str, dialogue: Dialogue) -> None:
        self.dropped[reason] += 1
        log.info("provisioning.dropped", reason=reason, peer=host, client_id=dialogue.client_id)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Flush, send TLS close_notify, and wait a bounded time for the peer's."""
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await writer.drain()
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
