"""The gatekeeper: the gateway's answers to the MQTT engine's questions.

Receives, from the broker adapter, each CONNECT (peer certificate and claims), each
session start and end, and each PUBLISH that passed or failed the ACL; hands on an
admission decision (`gateway.core.admission.decide` over the registry's records),
presence changes, refusal logs, ``gateway/events/connect_failed`` events (rate-limited
per certificate or address and reason; the next event says how many were left out), each refusal
to the connect-failure tally (`gateway.failures`), each device session's start and end
to the connection history (`gateway.history`), the devices' data to ingest (whose
future releases the PUBLISH's acknowledgement), and certificate renewals and first
uses to the certificate lifecycle.
"""

from __future__ import annotations

import asyncio
import time

from gateway.broker import LiveSession, Peer
from gateway.core import topics
from gateway.core.admission import (
    Admitted,
    CertificateKind,
    ConnectClaims,
    Decision,
    Refusal,
    Refused,
    decide,
)
from gateway.core.clock import utcnow
from gateway.core.failures import Attempt
from gateway.core.ids import Fingerprint
from gateway.core.presence import OfflineReason
from gateway.core.ratelimit import Rate, RateLimiter
from gateway.credentials import CertificateLifecycle
from gateway.events import Events
from gateway.failures import ConnectFailures
from gateway.history import ConnectionHistory
from gateway.ingest import Ingest
from gateway.logs import get_logger
from gateway.presence import PresenceService
from gateway.store import Store

log = get_logger("gateway.sessions")

# connect_failed events per (certificate or address, reason): a burst, then one per 12 s.
CONNECT_FAILED_EVENTS = Rate(5, per_s=60.0)
MAX_SUPPRESSED_KEYS = 10_000


class Gatekeeper:
    """Implements `gateway.broker.SessionHooks`."""

    def __init__(
        self,
        store: Store,
        presence: PresenceService,
        events: Events,
        ingest: Ingest,
        certificates: CertificateLifecycle,
        history: ConnectionHistory,
        failures: ConnectFailures,
    ) -> None:
        self._store = store
        self._presence = presence
        self._events = events
        self._ingest = ingest
        self._certificates = certificates
        self._history = history
        self._failures = failures
        self.denied_publishes = 0
        self.accepted_publishes = 0
        self._event_limit = RateLimiter(CONNECT_FAILED_EVENTS)
        self._suppressed: dict[str, int] = {}
        self.suppressed_events = 0

    async def admit(self, peer: Peer, claims: ConnectClaims) -> Decision:
        fingerprint = Fingerprint.of_der(peer.certificate_der) if peer.certificate_der else None
        certificate = None
        if fingerprint is None:
            decision: Decision = Refused(Refusal.NO_CERTIFICATE)
        else:
            certificate, device = await self._store.credentials.find_identity(fingerprint)
            decision = decide(claims, certificate, device, now=utcnow(), connection_tag=peer.connection_tag)
        if isinstance(decision, Admitted):
            log.info(
                "session.admitted",
                client_id=decision.session_key,
                peer=peer.host,
                conn=peer.connection_tag,
                serial=decision.certificate.serial,
            )
            return decision
        log.info(
            "session.refused",
            reason=decision.reason.value,
            connack=decision.connack,
            peer=peer.host,
            conn=peer.connection_tag,
            client_id=claims.client_id,
            fingerprint=fingerprint.value if fingerprint else None,
        )
        self._failures.refused(
            Attempt(
                reason=decision.reason,
                at=utcnow(),
                client_ip=peer.host,
                client_id=claims.client_id,
                fingerprint=fingerprint.value if fingerprint else None,
                device_id=(
                    certificate.subject
                    if certificate is not None and certificate.kind is CertificateKind.DEVICE
                    else None
                ),
                certificate_der=peer.certificate_der,
            )
        )
        key = f"{fingerprint.value if fingerprint else peer.host}|{decision.reason.value}"
        if not self._event_limit.allow(key, time.monotonic()).allowed:
            # A client retrying in a loop: counted (and tallied above), not one event per try.
            self.suppressed_events += 1
            if key in self._suppressed or len(self._suppressed) < MAX_SUPPRESSED_KEYS:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return decision
        await self._events.emit(
            "connect_failed",
            reason=decision.reason.value,
            message=decision.message,
            fingerprint=fingerprint.value if fingerprint else None,
            client_id=claims.client_id,
            client_ip=peer.host,
            suppressed=self._suppressed.pop(key, 0),  # like refusals not published since the last
        )
        return decision

    async def session_started(self, session: LiveSession) -> None:
        await self._presence.online(session)
        self._history.started(session, utcnow())
        await self._certificates.session_started(session)

    async def session_ended(self, session: LiveSession, reason: OfflineReason) -> None:
        log.info(
            "session.ended", client_id=session.key, reason=reason.value, conn=session.peer.connection_tag
        )
        if session.device_id is not None and session.last_packet_at:
            self._ingest.session_ended(session.device_id, session.last_packet_at)
        await self._presence.offline(session, reason)
        self._history.ended(session, reason, utcnow())

    async def message_accepted(
        self, session: LiveSession, topic: str, payload: bytes, qos: int
    ) -> asyncio.Future[None] | None:
        self.accepted_publishes += 1
        device_id = session.device_id
        if device_id is None:  # operators publish nothing (the ACL said so already)
            return None
        if topic == topics.certificate_topic(device_id, "renew"):
            await self._certificates.renew(session, payload)
            return None
        return await self._ingest.submit(device_id, topic, payload, qos)

    async def message_denied(self, session: LiveSession, topic: str) -> None:
        self.denied_publishes += 1
        log.warning("publish.denied", client_id=session.key, topic=topic)
        if session.device_id is not None:
            await self._events.device_error(
                session.device_id,
                code="acl_denied",
                topic=topic,
                message="devices may publish only under devices/{own id}/ (not errors or commands)",
            )
