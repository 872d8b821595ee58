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
from gateway.core.ratelimit import Verdict as RateVerdict
from gateway.devices import Provisioned
from gateway.errors import GatewayError, ProtocolViolation
from gateway.events import Events
from gateway.logs import get_logger
from gateway.tls_server import TlsServer

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


class ProvisioningListener(TlsServer):
    """The provisioning port: `start`, `port`, `stop`; counters for tests and operators."""

    name = "provisioning"
    tls_failed_event = "provisioning.tls_failed"

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
        super().__init__(
            settings.mqtt_host, settings.mqtt_port, handshake_timeout_s=mqtt.tls_handshake_timeout_s
        )
        self._devices = devices
        self._events = events
        self._context = context
        self._settings = settings
        self._mqtt = mqtt
        self._clock = clock
        self._limiter = RateLimiter(Rate(settings.mqtt_attempts_per_minute, per_s=60.0))
        self._redeeming: set[asyncio.Task[Any]] = set()  # past the request: let them answer
        self.attempts = 0  # connections accepted, each one attempt
        self.provisioned = 0
        self.refused: collections.Counter[str] = collections.Counter()  # by code; each one an event
        self.dropped: collections.Counter[str] = collections.Counter()  # left, lost or timed out

    def context(self) -> ssl.SSLContext:
        return self._context

    def accepted(self, host: str) -> RateVerdict:
        """Each connection is one attempt, counted before TLS so that failed handshakes count too."""
        self.attempts += 1
        return self._limiter.allow(host, self._clock())

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting and cut every conversation, except that a request being redeemed gets
        `grace_s` to deliver its answer (its token may already be spent)."""
        if not self.started:
            return
        await self.stop_accepting()
        self.cut(self._connections - self._redeeming)
        await self.wait_connections_closed(grace_s)

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: tuple[str, int],
        admission: Any,
    ) -> None:
        verdict: RateVerdict = admission
        task = asyncio.current_task()
        try:
            dialogue = Dialogue(over_limit=not verdict.allowed)
            await self._converse(reader, writer, dialogue, peer[0], verdict.retry_after_s)
        finally:
            if task is not None:
                self._redeeming.discard(task)

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
