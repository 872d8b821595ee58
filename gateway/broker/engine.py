"""amqtt's Broker with the gateway's connection flow, and `MqttEngine`, its face.

Receives TLS connections from the listener; admits each CONNECT through the hooks
before amqtt keeps any state (gaps 3, 9), takes over old sessions (4), filters
retained messages and deliveries through the ACL (5, 12), awaits the hooks in order
(8), and lets the gateway kick, publish and count sessions (10).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import ssl
from collections.abc import Callable
from typing import Any

from amqtt.adapters import BufferReader
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import AMQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from gateway.broker.handler import ConnectRefused, Handler, ReaderAdapter, WriterAdapter
from gateway.broker.session import LiveSession, Peer, SessionHooks
from gateway.broker.traffic import TrafficCounter, counting_streams
from gateway.config import MqttSettings
from gateway.core import topics, wire
from gateway.core.admission import Admitted, ConnectClaims, Refusal, Refused
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
# Fan-out bounds (amqtt's queue and its task per delivery are unbounded): messages waiting
# to be fanned out, and deliveries in flight to one subscriber (a slow operator, a stalled
# socket). Past them a message is dropped and counted; ingest and acknowledgements never wait.
BROADCAST_QUEUE_SIZE = 10_000
MAX_PENDING_DELIVERIES = 1_000
_PENDING = "gateway.pending_deliveries"
# Messages queued for a disconnected persistent session, and how long it is kept.
OFFLINE_QUEUE_SIZE = 1000
PERSISTENT_SESSION_EXPIRY_S = 7 * 24 * 3600


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
        self.dropped_broadcasts = 0  # not fanned out: the queue before fan-out was full
        self.dropped_deliveries = 0  # not delivered to one subscriber: it had too many in flight
        self.traffic: dict[str, TrafficCounter] = {}  # connection tag -> its counters, while it lasts

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
            # Through the connection's FrameReader: what arrived with CONNECT stays buffered.
            frame = await asyncio.wait_for(reader.frames.next(), self.settings.connect_timeout_s)
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
            raise ConnectRefused("no CONNECT in time") from exc
        except ProtocolViolation as exc:
            log.info("session.bad_connect", peer=remote_address, conn=tag, reason=exc.message)
            await writer.close()
            raise ConnectRefused(exc.message) from exc
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as exc:
            await writer.close()
            raise NoDataError("connection lost before CONNECT") from exc

        # amqtt answers protocol-level problems itself (CONNACK 1 for MQTT 5, ...).
        handler, incoming = await Handler.init_from_connect(
            BufferReader(wire.encode_frame(wire.CONNECT, flags, body)), writer, self.plugins_manager
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
            raise ConnectRefused(decision.reason.value)

        live = self._live_session(decision, peer)
        handler.live = live
        handler.on_publish = self._on_publish
        handler.keepalive_factor = self.settings.keepalive_factor
        if self.settings.max_keepalive_s and (
            incoming.keep_alive == 0 or incoming.keep_alive > self.settings.max_keepalive_s
        ):
            incoming.keep_alive = self.settings.max_keepalive_s
        await self._take_over(decision.session_key)
        return handler, self._attach_session(
            incoming, decision.session_key, live, remote_address, remote_port
        )

    def _live_session(self, decision: Admitted, peer: Peer) -> LiveSession:
        live = LiveSession(
            decision.session_key, decision.principal, decision.certificate, peer, decision.check_in
        )
        live.traffic = self.traffic.get(peer.connection_tag, live.traffic)
        return live

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
        if session is None or not session.transitions.is_connected() or not isinstance(handler, Handler):
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

    async def _on_publish(self, handler: Handler, fields: wire.PublishFields) -> asyncio.Future[None] | None:
        """ACL, then the gateway (ingest), then fan-out and retain. Returns the stored-future."""
        live, session = handler.live, handler.session
        if live is None or session is None:
            raise AMQTTError("publish on a handler without a session")
        live.traffic.messages_in += 1
        if not live.may_publish(fields.topic):
            await self._hooks.message_denied(live, fields.topic)
            return None
        stored = await self._hooks.message_accepted(live, fields.topic, fields.payload, fields.qos)
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
                if handler is None:
                    continue
                pending: int = target.attributes.get(_PENDING, 0)
                if pending >= MAX_PENDING_DELIVERIES:  # a slow subscriber loses messages, no one else does
                    self.dropped_deliveries += 1
                    continue
                target.attributes[_PENDING] = pending + 1
                publish = handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                delivery = asyncio.ensure_future(publish)
                delivery.add_done_callback(functools.partial(_delivered, target))
                running_tasks.append(delivery)

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """amqtt's fan-out queue, bounded: past BROADCAST_QUEUE_SIZE a message is counted, not kept.
        With no subscription at all (persistent sessions' included) there is nothing to fan out:
        a gateway with no operator listening sweeps 100,000 statuses without queueing any."""
        if not self._subscriptions:
            return
        if self._broadcast_queue.qsize() >= BROADCAST_QUEUE_SIZE:
            self.dropped_broadcasts += 1
            if self.dropped_broadcasts % 1000 == 1:
                log.warning("broker.broadcast_dropped", dropped=self.dropped_broadcasts, topic=topic)
            return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target: Session) -> None:
        """Queue for an offline persistent session, bounded: the oldest message wins, the rest is counted."""
        if target.retained_messages.qsize() >= OFFLINE_QUEUE_SIZE:
            self.dropped_offline += 1
            return
        await super()._retain_broadcast_message(broadcast, qos, target)


def _delivered(target: Session, _: object) -> None:
    target.attributes[_PENDING] = max(0, target.attributes.get(_PENDING, 1) - 1)


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
        counter = TrafficCounter()
        reader, writer = counting_streams(reader, writer, counter)
        adapter = WriterAdapter(writer, f"c{next(self._tags)}")
        self._broker.traffic[adapter.connection_tag] = counter
        try:
            await self._broker.external_connected(
                ReaderAdapter(reader, self._broker.settings.max_packet_bytes), adapter, "default"
            )
        except Exception:
            log.exception("session.crashed", conn=adapter.connection_tag)
        finally:
            self._broker.traffic.pop(adapter.connection_tag, None)
            await adapter.close()

    async def kick(self, key: str, reason: OfflineReason, *, wait_s: float = 2.0) -> bool:
        """Close the live session `key` (a device id); True when there was one."""
        session, handler = self._broker.sessions.get(key, (None, None))
        if session is None or not session.transitions.is_connected() or not isinstance(handler, Handler):
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
