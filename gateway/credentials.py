"""The certificate lifecycle while devices run: CRL, renewal over MQTT, first use, expiry.

Receives, from the gatekeeper, each admitted device session and each
``devices/{id}/certificate/renew`` request; from the composition root, a daily tick.
Hands on certificates (answered on ``devices/{id}/certificate/accepted|rejected``),
revocations of superseded certificates (a re-signed CRL and a fresh TLS context, so
the next handshake with them fails), retained renewal hints on
``devices/{id}/certificate/expiring`` and ``gateway/events/certificate_expiring``.

A renewal never strands a device: the old certificate stays valid until the new one
is first used (`CredentialStore.first_use` then revokes it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timedelta

import ca
from gateway.audit import Audit, acting_as
from gateway.broker import LiveSession
from gateway.config import CaSettings
from gateway.core import topics
from gateway.core.admission import CertificateKind
from gateway.core.clock import iso, utcnow
from gateway.errors import ProvisioningRefused
from gateway.events import Events
from gateway.logs import get_logger
from gateway.pki import Pki, TlsContexts
from gateway.store.credentials import CredentialStore

log = get_logger("gateway.credentials")

MAX_EXPIRING_EVENTS = 1000  # per daily run; the rest is only counted in the log
_RENEWAL_SHAPE = 'a renewal request is JSON {"csr": "<PEM certificate request>"}'


def remaining_share(not_before: datetime, not_after: datetime, now: datetime) -> float:
    """The share of a certificate's validity still ahead of `now` (0 when expired)."""
    total = (not_after - not_before).total_seconds()
    if total <= 0:
        return 0.0
    return max(0.0, min(1.0, (not_after - now).total_seconds() / total))


def parse_renewal(payload: bytes) -> str:
    """The CSR PEM of a renewal request ``{"csr": "-----BEGIN CERTIFICATE REQUEST..."}``."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise ProvisioningRefused(
            'renewal request must be JSON {"csr": "<PEM>"}', code="bad_request"
        ) from exc
    if not isinstance(body, dict) or set(body) != {"csr"} or not isinstance(body["csr"], str):
        raise ProvisioningRefused('renewal request must be exactly {"csr": "<PEM>"}', code="bad_request")
    csr: str = body["csr"]
    return csr


class Revocations:
    """The CRL follows the registry: re-signed and swapped into the listener on every change."""

    def __init__(
        self, credentials: CredentialStore, pki: Pki, tls: TlsContexts, next_update: timedelta
    ) -> None:
        self._credentials = credentials
        self._pki = pki
        self._tls = tls
        self._next_update = next_update

    async def refresh(self) -> bytes:
        revoked = await self._credentials.revoked_certificates()
        pem = self._pki.write_crl(revoked, utcnow(), self._next_update)
        self._tls.reload()
        log.info("pki.crl_updated", entries=len(revoked))
        return pem


class CertificateLifecycle:
    def __init__(
        self,
        credentials: CredentialStore,
        pki: Pki,
        revocations: Revocations,
        events: Events,
        audit: Audit,
        settings: CaSettings,
    ) -> None:
        self._audit = audit
        self._credentials = credentials
        self._pki = pki
        self._revocations = revocations
        self._events = events
        self._settings = settings
        self.renewed = 0
        self.renewals_refused = 0

    # --- per session --------------------------------------------------------------

    async def session_started(self, session: LiveSession) -> None:
        """First use of a certificate revokes what it superseded; then hint renewal if due."""
        device_id = session.device_id
        if device_id is None:
            return
        certificate = session.certificate
        if certificate.first_used_at is None:
            superseded = await self._credentials.first_use(certificate.serial, utcnow())
            if superseded:
                await self._revocations.refresh()
                log.info(
                    "certificate.superseded", device_id=device_id, serials=superseded, by=certificate.serial
                )
                await self._events.emit(
                    "device",
                    action="certificates_superseded",
                    device_id=device_id,
                    certificate_serials=superseded,
                    by=certificate.serial,
                )
        await self.hint(session)

    async def hint(self, session: LiveSession) -> None:
        """Retained ``certificate/expiring`` while the session's certificate is in its last share."""
        device_id = session.device_id
        if device_id is None:
            return
        cert = session.certificate
        now = utcnow()
        topic = topics.certificate_topic(device_id, "expiring")
        if remaining_share(cert.not_before, cert.not_after, now) >= self._settings.renew_when_remaining:
            self._events.forget(topic)
            return
        body = {
            "device_id": device_id,
            "certificate_serial": cert.serial,
            "not_after": iso(cert.not_after),
            "remaining_s": max(0, int((cert.not_after - now).total_seconds())),
        }
        await self._events.publish(topic, body, retain=True)

    # --- renewal over MQTT --------------------------------------------------------

    async def renew(self, session: LiveSession, payload: bytes) -> None:
        """Answer one renewal request on the device's ``certificate/accepted|rejected``."""
        device_id = session.device_id
        if device_id is None:
            return
        try:
            vetted = ca.vet_csr(parse_renewal(payload))
        except ca.CSRRejected as exc:
            await self._refuse(device_id, ProvisioningRefused(f"CSR rejected: {exc}", code=f"csr_{exc.code}"))
            return
        except ProvisioningRefused as exc:
            await self._refuse(device_id, exc)
            return
        now = utcnow()
        try:
            cert, replaced = await self._credentials.renew(
                device_id,
                session.certificate.serial,
                now,
                lambda: self._pki.issue(
                    vetted.public_key,
                    subject=device_id,
                    kind=CertificateKind.DEVICE,
                    now=now,
                    validity=self._settings.device_validity,
                ),
                min_interval=timedelta(seconds=self._settings.renew_min_interval_s),
            )
        except ProvisioningRefused as exc:
            await self._refuse(device_id, exc)
            return
        if replaced:
            await self._revocations.refresh()
        self.renewed += 1
        log.info(
            "certificate.renewed", device_id=device_id, serial=cert.serial, renews=session.certificate.serial
        )
        await self._events.publish(
            topics.certificate_topic(device_id, "accepted"),
            {
                "device_id": device_id,
                "certificate": cert.pem,
                "ca_chain": self._pki.ca_pem.decode("ascii"),
                "certificate_serial": cert.serial,
                "not_after": iso(cert.not_after),
            },
        )
        with acting_as(f"device:{device_id}"):
            await self._audit.record(
                "certificate.renewed",
                "device",
                device_id,
                certificate_serial=cert.serial,
                renews=session.certificate.serial,
                replaced_unused=replaced,
            )
        await self._events.emit(
            "device", action="certificate_renewed", device_id=device_id, certificate_serial=cert.serial
        )

    async def _refuse(self, device_id: str, exc: ProvisioningRefused) -> None:
        self.renewals_refused += 1
        log.info("certificate.renewal_refused", device_id=device_id, code=exc.code, reason=exc.message)
        await self._events.publish(
            topics.certificate_topic(device_id, "rejected"), {"code": exc.code, "message": exc.message}
        )

    # --- daily --------------------------------------------------------------------

    async def announce_expiring(self, live: Iterable[LiveSession] = ()) -> int:
        """``certificate_expiring`` per device certificate ending within the warning horizon."""
        now = utcnow()
        horizon = timedelta(days=self._settings.expiry_warning_days)
        found = await self._credentials.expiring(now + horizon, limit=MAX_EXPIRING_EVENTS + 1)
        for cert in found[:MAX_EXPIRING_EVENTS]:
            await self._events.emit(
                "certificate_expiring",
                device_id=cert.device_id,
                certificate_serial=cert.serial,
                not_after=iso(cert.not_after),
                expired=cert.not_after <= now,
            )
        for session in live:
            await self.hint(session)
        if found:
            log.info(
                "certificate.expiring",
                count=len(found),
                truncated=len(found) > MAX_EXPIRING_EVENTS,
                within_days=self._settings.expiry_warning_days,
            )
        return len(found)
