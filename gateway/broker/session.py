"""What the rest of the gateway sees of a session: the verified peer, the admitted
session, and the questions the broker asks (`SessionHooks`). No amqtt here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from gateway.broker.traffic import TrafficCounter
from gateway.core import topics
from gateway.core.admission import CertificateIdentity, ConnectClaims, Decision
from gateway.core.presence import OfflineReason


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
    traffic: TrafficCounter = field(default_factory=TrafficCounter)  # the connection's, from the engine
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
