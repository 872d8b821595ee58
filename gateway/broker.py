"""amqtt 0.12.1 behind one module: the MQTT engine, with the gaps the gateway must close.

Receives connections whose TLS handshake our listener has completed (an asyncio
reader/writer pair); hands on, through `SessionHooks`, an admission request per
CONNECT, a start and an end per admitted session, and every PUBLISH that passed the
ACL. Only this module imports amqtt. Each fix below names its gap in AMQTT-NOTES.md
and has a regression test in tests/integration/test_broker_gaps.py:

 1. our own TLS listener (`gateway.listener`) feeds the ``external`` listener;
 2. keep-alive is enforced: no packet for 1.5 x keep-alive closes the session;
 3. admission runs right after CONNECT is parsed, before any session bookkeeping:
    a refused CONNECT creates, deletes and keeps nothing;
 4. take-over closes the old connection first; its end never marks the device offline;
 5. retained messages go only to the session's own subscriptions, through the ACL;
 6. a bad PUBLISH runs the normal disconnect flow (no zombie sessions);
 8. no plugin hooks: the hooks are awaited in order, their exceptions logged;
 9. an exception during admission refuses with CONNACK 3 instead of hanging;
10. `kick` closes a live session through the normal disconnect flow;
11. every packet is framed with a size limit and checked by `gateway.core.wire`
    before amqtt parses it; violations close the connection;
12. delivery QoS is min(publish QoS, granted QoS).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from amqtt.adapters import BufferReader, StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import Session

from gateway.config import MqttSettings
from gateway.core import topics, wire
from gateway.core.admission import (
    Admitted,
    CertificateIdentity,
    ConnectClaims,
    Decision,
    Refusal,
    Refused,
)
from gateway.core.presence import OfflineReason
from gateway.errors import ProtocolViolation
from gateway.logs import get_logger

log = get_logger("gateway.broker")

_ACTIONS = {
    AmqttAction.PUBLISH: topics.Action.PUBLISH,
    AmqttAction.SUBSCRIBE: topics.Action.SUBSCRIBE,
    AmqttAction.RECEIVE: topics.Action.RECEIVE,
}
# amqtt's per-session queue of inbound messages; unused for PUBLISH (the reader hands
# them to the broker inline) but bounded in case anything else feeds it.
DELIVERY_QUEUE_SIZE = 100
MAX_QOS2_IN_FLIGHT = 100
# First bytes of the acknowledgements the gateway sends for inbound publishes.
_PUBACK, _PUBREC, _PUBCOMP = 0x40, 0x50, 0x70
WRITER_CLOSE_TIMEOUT_S = 1.0
# Messages queued for a disconnected persistent session, and how long it is kept.
OFFLINE_QUEUE_SIZE = 1000
PERSISTENT_SESSION_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection, as the TLS layer verified it."""

    host: str
    port: int
    certificate_der: bytes | None
    connection_tag: str  # unique per connection, for logs and anonymous operator ids


@dataclass(eq=False)
class LiveSession:
    """An admitted session. Created on CONNECT, ended exactly once."""

    key: str
    principal: topics.Principal
    certificate: CertificateIdentity
    peer: Peer
    check_in: bool
    epoch: int | None = None  # set by the presence service when the session goes online
    close_reason: OfflineReason | None = None
    last_packet_at: float = 0.0  # time.time() of the last packet read (flushed to last_seen_at)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _publish_acl: dict[str, bool] = field(default_factory=dict)

    @property
    def device_id(self) -> str | None:
        if isinstance(self.principal, topics.DevicePrincipal):
            return self.principal.device_id.value
        return None

    def may_publish(self, topic: str) -> bool:
        """The ACL's answer for this session, remembered: devices publish to a handful of topics."""
        allowed = self._publish_acl.get(topic)
        if allowed is None:
            if len(self._publish_acl) >= 64:
                self._publish_acl.clear()
            allowed = self._publish_acl[topic] = topics.check(self.principal, topics.Action.PUBLISH, topic)
        return allowed


class SessionHooks(Protocol):
    """What the broker asks of the rest of the gateway. Each call is awaited, in order."""

    async def admit(self, peer: Peer, claims: ConnectClaims) -> Decision: ...

    async def session_started(self, session: LiveSession) -> None: ...

    async def session_ended(self, session: LiveSession, reason: OfflineReason) -> None: ...

    async def message_accepted(
        self, session: LiveSession, topic: str, payload: bytes, qos: int
    ) -> asyncio.Future[None] | None:
        """Take a PUBLISH the ACL allowed; return a future resolved once it is stored
        (its acknowledgement waits for it), or None to acknowledge at once."""

    async def message_denied(self, session: LiveSession, topic: str) -> None: ...


class _Refused(AMQTTError):
    """A CONNECT was answered with a refusal; amqtt's caller logs and forgets it."""


class _WriterAdapter(StreamWriterAdapter):
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


async def _read_frame(reader: StreamReaderAdapter, max_bytes: int) -> tuple[int, int, bytes] | None:
    """One MQTT packet as (type, flags, body); None on a clean EOF between packets."""
    try:
        first = (await reader.read(1))[0]
    except (asyncio.IncompleteReadError, IndexError):
        return None
    length, multiplier = 0, 1
    for _ in range(4):
        byte = (await reader.read(1))[0]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        multiplier *= 128
    else:
        raise wire.violation("remaining length longer than 4 bytes")
    if length > max_bytes:
        raise wire.violation(f"packet of {length} bytes exceeds the {max_bytes}-byte limit")
    body = await reader.read(length) if length else b""
    return first >> 4, first & 0x0F, body


def _encode_frame(packet_type: int, flags: int, body: bytes) -> bytes:
    header = bytearray([(packet_type << 4) | flags])
    length = len(body)
    while True:
        byte, length = length % 128, length // 128
        header.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(header) + body


class _Handler(BrokerProtocolHandler):
    """amqtt's broker handler with our reader loop (gaps 2, 6, 7, 11)."""

    _disconnect_waiter: asyncio.Future[DisconnectPacket | None] | None
    live: LiveSession | None = None
    max_packet_bytes: int = 1024 * 1024
    keepalive_factor: float = 1.5
    on_publish: Callable[[_Handler, wire.PublishFields], Awaitable[asyncio.Future[None] | None]] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: collections.deque[tuple[int, int, asyncio.Future[None] | None]] = collections.deque()

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
        keep_alive = self.session.keep_alive
        timeout = keep_alive * self.keepalive_factor if keep_alive > 0 else None
        reason: OfflineReason | None = None
        self._reader_ready.set()
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(_read_frame(self.reader, self.max_packet_bytes), timeout)
                except TimeoutError:
                    reason = OfflineReason.KEEPALIVE_TIMEOUT
                    break
                if frame is None:
                    break
                packet_type, flags, body = frame
                if self.live is not None:
                    self.live.last_packet_at = time.time()
                if packet_type == wire.PUBLISH:
                    await self._inbound_publish(wire.parse_publish(flags, body))
                    continue
                wire.check_packet(packet_type, flags, body)
                if packet_type == wire.PUBREL:
                    self._release(int.from_bytes(body[:2], "big"))
                    continue
                fixed = MQTTFixedHeader(packet_type, flags, len(body))
                packet = await packet_class(fixed).from_stream(BufferReader(body), fixed_header=fixed)
                if packet_type == wire.DISCONNECT:
                    await self.handle_disconnect(packet)
                    break
                await self._dispatch(packet_type, packet)
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
        finally:
            if reason is not None and self.live is not None and self.live.close_reason is None:
                self.live.close_reason = reason
            await self.handle_connection_closed()
            self._reader_stopped.set()
        await self.stop()

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
        if stored is not None and not stored.done():
            stored.add_done_callback(self._flush_acks)
        self._flush_acks()

    def _flush_acks(self, _: object = None) -> None:
        while self._acks:
            first_byte, packet_id, stored = self._acks[0]
            if stored is not None:
                if not stored.done():
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
            if self.writer is not None:
                self.writer.write(bytes((first_byte, 2)) + packet_id.to_bytes(2, "big"))

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


class _Broker(Broker):
    """amqtt's Broker with the connection flow the gateway needs (gaps 3-6, 8, 9, 12)."""

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(
            {
                "listeners": {"default": {"type": "external", "bind": "external"}},
                "plugins": {},  # no plugin hooks at all (gap 8): the gateway's hooks are awaited
                "session_expiry_interval": PERSISTENT_SESSION_EXPIRY_S,
            },
        )
        self.hooks: SessionHooks | None = None
        self.settings = settings
        self.refused = 0
        self.dropped_offline = 0

    @property
    def _hooks(self) -> SessionHooks:
        if self.hooks is None:
            raise RuntimeError("MQTT engine used before start()")
        return self.hooks

    # --- CONNECT: admission before any bookkeeping (gaps 3, 9) -------------------------

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        tag = writer.connection_tag
        try:
            frame = await asyncio.wait_for(
                _read_frame(reader, self.settings.max_packet_bytes), self.settings.connect_timeout_s
            )
            if frame is None:
                raise NoDataError("connection closed before CONNECT")
            packet_type, flags, body = frame
            if packet_type != wire.CONNECT:
                raise wire.violation(
                    f"first packet is {wire.NAMES.get(packet_type, packet_type)}, not CONNECT"
                )
            fields = wire.parse_connect(flags, body)
        except TimeoutError as exc:
            log.info("session.connect_timeout", peer=remote_address, conn=tag)
            await writer.close()
            raise _Refused("no CONNECT in time") from exc
        except ProtocolViolation as exc:
            log.info("session.bad_connect", peer=remote_address, conn=tag, reason=exc.message)
            await writer.close()
            raise _Refused(exc.message) from exc
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as exc:
            await writer.close()
            raise NoDataError("connection lost before CONNECT") from exc

        # amqtt answers protocol-level problems itself (CONNACK 1 for MQTT 5, ...).
        handler, incoming = await _Handler.init_from_connect(
            BufferReader(_encode_frame(wire.CONNECT, flags, body)), writer, self.plugins_manager
        )
        peer = Peer(remote_address, remote_port, writer.peer_certificate, tag)
        claims = ConnectClaims(fields.client_id, fields.clean_session, fields.will_topic)
        try:
            decision = await self._hooks.admit(peer, claims)
        except Exception:
            log.exception("session.admission_failed", peer=remote_address, conn=tag)
            decision = Refused(Refusal.INTERNAL_ERROR)
        if isinstance(decision, Refused):
            self.refused += 1
            with contextlib.suppress(OSError, ssl.SSLError):
                await ConnackPacket.build(0, decision.connack).to_stream(writer)
            await writer.close()
            raise _Refused(decision.reason.value)

        live = self._live_session(decision, peer)
        handler.live = live
        handler.on_publish = self._on_publish
        handler.max_packet_bytes = self.settings.max_packet_bytes
        handler.keepalive_factor = self.settings.keepalive_factor
        if self.settings.max_keepalive_s and (
            incoming.keep_alive == 0 or incoming.keep_alive > self.settings.max_keepalive_s
        ):
            incoming.keep_alive = self.settings.max_keepalive_s
        await self._take_over(decision.session_key)
        return handler, self._attach_session(
            incoming, decision.session_key, live, remote_address, remote_port
        )

    @staticmethod
    def _live_session(decision: Admitted, peer: Peer) -> LiveSession:
        return LiveSession(
            decision.session_key, decision.principal, decision.certificate, peer, decision.check_in
        )

    def _attach_session(
        self, incoming: Session, key: str, live: LiveSession, address: str, port: int
    ) -> Session:
        """amqtt's clean-session / resume bookkeeping, now only for admitted sessions."""
        existing = self._sessions.get(key, (None, None))[0]
        if incoming.clean_session or existing is None:
            if existing is not None:
                self._drop_session(key, existing)
            session = incoming
            session.client_id = key
            session.parent = 0
            session.delivered_message_queue = asyncio.Queue(maxsize=DELIVERY_QUEUE_SIZE)
        else:
            session = existing
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "ssl_object",
                "username",
                "password",
            ):
                setattr(session, name, getattr(incoming, name))
            session.remote_address, session.remote_port = address, port
            session.parent = 1
        session.attributes["gateway.live"] = live
        return session

    def _drop_session(self, key: str, session: Session) -> None:
        self._sessions.pop(key, None)
        for topic_filter in list(self._subscriptions):
            self._del_subscription(topic_filter, session)
            if not self._subscriptions[topic_filter]:
                del self._subscriptions[topic_filter]
        session.clear_queues()

    async def _take_over(self, key: str) -> None:
        """Close a connected session with the same key before the new one starts (gap 4)."""
        session, handler = self._sessions.get(key, (None, None))
        if session is None or not session.transitions.is_connected() or not isinstance(handler, _Handler):
            return
        old = handler.live
        await handler.close_with(OfflineReason.TAKEN_OVER)
        if old is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.ended.wait(), timeout=5)

    # --- the admitted session (gaps 5, 8) ---------------------------------------------

    async def _handle_client_session(
        self, reader: Any, writer: Any, client_session: Session, handler: Any, server: Any, listener_name: str
    ) -> None:
        live: LiveSession = handler.live
        client_session.transitions.connect()
        handler.attach(client_session, reader, writer)
        self._sessions[live.key] = (client_session, handler)
        try:
            await handler.mqtt_connack_authorize(True)
            await self._hooks.session_started(live)
        except Exception:
            log.exception("session.start_failed", client_id=live.key)
            await handler.close_with(OfflineReason.CONNECTION_LOST)
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        for topic_filter, subscribers in list(self._subscriptions.items()):
            for subscriber, qos in subscribers:
                if subscriber.client_id == live.key:
                    await self._publish_retained_messages_for_subscription(
                        (topic_filter, qos), client_session
                    )
        await self._client_message_loop(client_session, handler)

    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        result = disconnect_waiter.result()
        live: LiveSession = handler.live
        clean = isinstance(result, DisconnectPacket)
        reason = live.close_reason or (
            OfflineReason.CLIENT_DISCONNECT if clean else OfflineReason.CONNECTION_LOST
        )
        if not clean and client_session.will_flag and client_session.will_topic:
            await self._broadcast_message(
                client_session,
                client_session.will_topic,
                client_session.will_message,
                client_session.will_qos,
            )
            if client_session.will_retain:
                await self.retain_message(
                    client_session,
                    client_session.will_topic,
                    client_session.will_message,
                    client_session.will_qos,
                )
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        try:
            await self._hooks.session_ended(live, reason)
        except Exception:
            log.exception("session.end_failed", client_id=live.key, reason=reason.value)
        finally:
            live.ended.set()

    async def _on_publish(self, handler: _Handler, fields: wire.PublishFields) -> asyncio.Future[None] | None:
        """ACL, then the gateway (ingest), then fan-out and retain. Returns the stored-future."""
        live, session = handler.live, handler.session
        if live is None or session is None:
            raise AMQTTError("publish on a handler without a session")
        if not live.may_publish(fields.topic):
            await self._hooks.message_denied(live, fields.topic)
            return None
        stored = await self._hooks.message_accepted(live, fields.topic, fields.payload, fields.qos)
        if self._subscriptions:
            await self._broadcast_message(session, fields.topic, fields.payload, force_qos=fields.qos)
        if fields.retain:
            await self.retain_message(session, fields.topic, fields.payload, fields.qos)
        return stored

    async def _topic_filtering(self, session: Session, topic: str, action: AmqttAction) -> bool:
        """The one ACL: `gateway.core.topics`, for the principal the certificate proved."""
        live = session.attributes.get("gateway.live")
        if not isinstance(live, LiveSession):
            return False
        return topics.check(live.principal, _ACTIONS[action], topic)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Retained messages for one of the session's own filters, each through the ACL (gap 5)."""
        handler = self._get_handler(session)
        if handler is None:
            return
        topic_filter, granted = subscription
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, AmqttAction.RECEIVE):
                continue
            qos = min(granted, retained.qos if retained.qos is not None else granted)
            await handler.mqtt_publish(retained.topic, retained.data, qos, retain=True)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        """amqtt's fan-out with delivery QoS = min(publish, granted) (gap 12) and the ACL on receive."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        published_qos = broadcast.get("qos")
        for topic_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, topic_filter):
                continue
            for target, granted in list(subscriptions):
                qos = granted if published_qos is None else min(published_qos, granted)
                if not await self._topic_filtering(target, topic, AmqttAction.RECEIVE):
                    continue
                if target.transitions.state != "connected":
                    if not target.clean_session and qos > 0:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler is not None:
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target: Session) -> None:
        """Queue for an offline persistent session, bounded: the oldest message wins, the rest is counted."""
        if target.retained_messages.qsize() >= OFFLINE_QUEUE_SIZE:
            self.dropped_offline += 1
            return
        await super()._retain_broadcast_message(broadcast, qos, target)


class MqttEngine:
    """The gateway's face of the MQTT engine: serve connections, kick, publish."""

    def __init__(self, settings: MqttSettings) -> None:
        self._broker = _Broker(settings)
        self._tags = itertools.count(1)

    async def start(self, hooks: SessionHooks) -> None:
        """Start with `hooks` (built after the engine, since they publish through it)."""
        self._broker.hooks = hooks
        await self._broker.start()

    async def stop(self) -> None:
        await self._broker.shutdown()

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one TLS connection until it ends. Never raises (errors are logged)."""
        adapter = _WriterAdapter(writer, f"c{next(self._tags)}")
        try:
            await self._broker.external_connected(StreamReaderAdapter(reader), adapter, "default")
        except Exception:
            log.exception("session.crashed", conn=adapter.connection_tag)
        finally:
            await adapter.close()

    async def kick(self, key: str, reason: OfflineReason, *, wait_s: float = 2.0) -> bool:
        """Close the live session `key` (a device id); True when there was one."""
        session, handler = self._broker.sessions.get(key, (None, None))
        if session is None or not session.transitions.is_connected() or not isinstance(handler, _Handler):
            return False
        live = handler.live
        await handler.close_with(reason)
        if live is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.ended.wait(), wait_s)
        return True

    async def kick_all(
        self,
        reason: OfflineReason,
        *,
        which: Callable[[LiveSession], bool] = lambda _: True,
        wait_s: float = 5.0,
    ) -> int:
        """Close every live session `which` selects, concurrently; the number closed."""
        keys = [live.key for live in self.live_sessions() if which(live)]
        results = await asyncio.gather(*(self.kick(key, reason, wait_s=wait_s) for key in keys))
        return sum(results)

    async def drain(self, timeout_s: float) -> bool:
        """Wait (bounded) until every queued publication was handed to its subscribers.

        Used at shutdown between closing the devices and closing the operators, so that
        operators receive the devices' final OFFLINE statuses. True when drained.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        broker = self._broker
        while not broker._broadcast_queue.empty() or any(not t.done() for t in broker._tasks_queue):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Publish as the gateway itself (status, events); retained if asked."""
        if retain:
            await self._broker.retain_message(None, topic, payload, qos)
        await self._broker.internal_message_broadcast(topic, payload, qos)

    def clear_retained(self, topic: str) -> None:
        self._broker.retained_messages.pop(topic, None)

    def retained(self, topic: str) -> bytes | None:
        message: RetainedApplicationMessage | None = self._broker.retained_messages.get(topic)
        return None if message is None else bytes(message.data)

    @property
    def session_count(self) -> int:
        """Sessions amqtt holds (connected or persisted)."""
        return len(self._broker.sessions)

    @property
    def connected_count(self) -> int:
        return sum(1 for session, _ in self._broker.sessions.values() if session.transitions.is_connected())

    @property
    def refused_count(self) -> int:
        return self._broker.refused

    def subscriptions_of(self, key: str) -> list[str]:
        return sorted(
            topic_filter
            for topic_filter, subscribers in self._broker.subscriptions.items()
            if any(session.client_id == key for session, _ in subscribers)
        )

    def live_sessions(self) -> list[LiveSession]:
        """The gateway's view of every connected session."""
        found = []
        for session, handler in self._broker.sessions.values():
            live = getattr(handler, "live", None)
            if isinstance(live, LiveSession) and session.transitions.is_connected():
                found.append(live)
        return found

    def is_connected(self, key: str) -> bool:
        session = self._broker.sessions.get(key, (None, None))[0]
        return bool(session is not None and session.transitions.is_connected())


__all__ = ["LiveSession", "MqttEngine", "Peer", "SessionHooks"]
