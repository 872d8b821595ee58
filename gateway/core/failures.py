"""Connect failures as values: one refused CONNECT, and their bounded aggregation.

Receives every refusal the gatekeeper makes (`Attempt`); hands on, at each flush, one
`FailureTally` per key: the certificate's fingerprint (or ``ip:<address>`` when the
client showed none) with the refusal reason, carrying the count, first and last seen,
and the latest client id and address. The store merges tallies into one row per key
(`FailureRecord`), so a flood of refusals costs one row and one write per interval.

Memory is bounded: at most `max_keys` keys wait between two flushes; attempts for a
further key are only counted (``dropped``). Only an unknown certificate's own bytes are
kept, for approval, up to `MAX_CERTIFICATE_BYTES`; a certificate is public, and nothing
secret ever reaches here. Which refusals an operator may approve is `APPROVABLE`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from datetime import datetime

import ca
from gateway.core.admission import Refusal

MAX_CLIENT_ID = 128  # characters of the client id kept (MQTT allows 65,535 bytes)
MAX_CERTIFICATE_BYTES = 8192  # DER; a larger certificate is not kept (and cannot be approved)
# Refusals an operator can turn into a device: a certificate a trusted CA issued that
# no device holds yet. Everything else (blocked, revoked, ...) is a decision already made.
APPROVABLE = frozenset({Refusal.UNKNOWN_CERTIFICATE})


def failure_key(fingerprint: str | None, client_ip: str) -> str:
    """What refusals are grouped by (with the reason): the certificate, else the address."""
    return fingerprint if fingerprint else f"ip:{client_ip}"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One refused CONNECT, as the gatekeeper saw it."""

    reason: Refusal
    at: datetime
    client_ip: str
    client_id: str
    fingerprint: str | None = None
    device_id: str | None = None  # the device the certificate belongs to, when it is known
    certificate_der: bytes | None = None  # the peer certificate; kept only when approvable

    @property
    def key(self) -> str:
        return failure_key(self.fingerprint, self.client_ip)


@dataclass(frozen=True, slots=True)
class FailureTally:
    """The refusals of one key since the last flush."""

    key: str
    reason: str
    fingerprint: str | None
    count: int
    first_seen_at: datetime
    last_seen_at: datetime
    last_client_id: str
    last_client_ip: str
    device_id: str | None
    certificate_pem: str | None


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What an operator reads of an unknown certificate before approving it."""

    subject: str
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """One aggregated row: every refusal of one key, as stored."""

    key: str
    reason: str
    fingerprint: str | None
    count: int
    first_seen_at: datetime
    last_seen_at: datetime
    last_client_id: str
    last_client_ip: str
    device_id: str | None
    certificate_pem: str | None
    approved_device_id: str | None = None
    approved_at: datetime | None = None

    @property
    def approvable(self) -> bool:
        return (
            self.reason in APPROVABLE and self.certificate_pem is not None and self.approved_device_id is None
        )

    @property
    def certificate(self) -> CertificateInfo | None:
        return certificate_info(self.certificate_pem) if self.certificate_pem else None


@dataclass(frozen=True, slots=True)
class FailureQuery:
    reason: str | None = None
    fingerprint: str | None = None
    limit: int = 100
    offset: int = 0


def certificate_info(pem: str) -> CertificateInfo | None:
    """Subject, issuer, serial and validity of a kept certificate; None if it does not parse."""
    try:
        cert = ca.load_certificate(pem.encode("ascii"))
    except (ca.CAError, UnicodeEncodeError):
        return None
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=ca.serial_hex(cert.serial_number),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


class FailureAggregator:
    """Refusals grouped by (key, reason) between two flushes; at most `max_keys` keys held."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._pending: dict[tuple[str, str], FailureTally] = {}
        self._certificates: dict[tuple[str, str], bytes] = {}  # DER, converted to PEM at drain
        self.dropped = 0  # attempts not recorded because `max_keys` keys were waiting

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, attempt: Attempt) -> bool:
        """Count one refusal; False when it was dropped (too many keys waiting)."""
        slot = (attempt.key, attempt.reason.value)
        single = FailureTally(
            key=attempt.key,
            reason=attempt.reason.value,
            fingerprint=attempt.fingerprint,
            count=1,
            first_seen_at=attempt.at,
            last_seen_at=attempt.at,
            last_client_id=attempt.client_id[:MAX_CLIENT_ID],
            last_client_ip=attempt.client_ip,
            device_id=attempt.device_id,
            certificate_pem=None,
        )
        if not self._merge(slot, single):
            return False
        der = attempt.certificate_der
        if attempt.reason in APPROVABLE and der and len(der) <= MAX_CERTIFICATE_BYTES:
            self._certificates.setdefault(slot, der)
        return True

    def restore(self, tallies: list[FailureTally]) -> None:
        """Put back what a failed flush drained, so that the next flush writes it (still bounded)."""
        for tally in tallies:
            self._merge((tally.key, tally.reason), tally)

    def _merge(self, slot: tuple[str, str], tally: FailureTally) -> bool:
        held = self._pending.get(slot)
        if held is None:
            if len(self._pending) >= self.max_keys:
                self.dropped += tally.count
                return False
            self._pending[slot] = tally
            return True
        newer = tally if tally.last_seen_at >= held.last_seen_at else held
        self._pending[slot] = replace(
            newer,
            count=held.count + tally.count,
            first_seen_at=min(held.first_seen_at, tally.first_seen_at),
            certificate_pem=held.certificate_pem or tally.certificate_pem,
        )
        return True

    def drain(self) -> list[FailureTally]:
        """Everything counted since the last drain, one tally per key; the aggregator is empty after."""
        pending, self._pending = self._pending, {}
        certificates, self._certificates = self._certificates, {}
        return [
            replace(tally, certificate_pem=ssl.DER_cert_to_PEM_cert(certificates[slot]))
            if slot in certificates
            else tally
            for slot, tally in pending.items()
        ]
