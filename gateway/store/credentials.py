"""Credentials in the registry: certificates and one-time registration tokens.

Receives certificates the CA issued (or an operator attached) and token hashes;
hands back identities for admission, the serials a change revoked (for the CRL and
the kick), and expiry listings. Each public method is one transaction. The rules of
the certificate lifecycle that need the database live here, each stated once:

- enrolment with a token revokes every earlier certificate of the device (a reset
  that did not revoke at once takes effect when the new certificate is enrolled);
- a renewal is recorded beside the certificate it renews; both stay valid until the
  new one is first used, which revokes every older certificate of the device;
- a newer renewal request replaces an earlier renewal that was never used;
- renewals of one device are at least ``min_interval`` apart (enrolment does not count);
- ``devices.cert_not_after`` is the latest end among the device's unrevoked certificates,
  set in the transaction of every insert (`_insert`) and revocation (`_revoke`).

Conditional updates (``WHERE used_at IS NULL``, ``WHERE first_used_at IS NULL``) make
single use and first use hold under concurrency and across instances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.core.admission import CertificateIdentity, CertificateKind, DeviceState
from gateway.core.ids import DeviceId, Fingerprint
from gateway.core.lifecycle import DeviceStatus
from gateway.core.records import CertificateRecord, ExpiringCertificate, NewCertificate
from gateway.errors import Conflict, NotFound, ProvisioningRefused
from gateway.store.models import Certificate, Device, RegistrationToken

devices = cast(Table, Device.__table__)
certificates = cast(Table, Certificate.__table__)
registration_tokens = cast(Table, RegistrationToken.__table__)

_DEVICE = CertificateKind.DEVICE.value


@dataclass(frozen=True, slots=True)
class Enrolled:
    device_id: str
    certificate: NewCertificate
    superseded: list[str]  # serials revoked by this enrolment


class CredentialStore:
    """Certificates and registration tokens, on the registry's engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # --- registration tokens and enrolment -----------------------------------------

    async def add_registration_token(
        self, device_id: str, token_hash: str, now: datetime, expires_at: datetime
    ) -> None:
        """A new one-time token for `device_id`; its earlier unused tokens stop working."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(registration_tokens)
                .where(registration_tokens.c.device_id == device_id, registration_tokens.c.used_at.is_(None))
                .values(expires_at=now)
            )
            await insert_registration_tokens(conn, [(device_id, token_hash, expires_at)], now)

    async def provision(
        self, token_hash: str, now: datetime, issue: Callable[[str], NewCertificate]
    ) -> Enrolled:
        """Redeem a token and record the certificate `issue` makes for its device, atomically.

        The token is consumed only if the certificate is recorded; a token is redeemed
        at most once even under concurrent requests. Earlier certificates are revoked.
        """
        async with self.engine.begin() as conn:
            token = (
                await conn.execute(
                    select(registration_tokens).where(registration_tokens.c.token_hash == token_hash)
                )
            ).one_or_none()
            if token is None:
                raise ProvisioningRefused("registration token is not valid", code="token_invalid")
            if token.used_at is not None:
                raise ProvisioningRefused("registration token was already used", code="token_used")
            if token.expires_at <= now:
                raise ProvisioningRefused("registration token has expired", code="token_expired")
            claimed = await conn.execute(
                update(registration_tokens)
                .where(
                    registration_tokens.c.token_hash == token_hash, registration_tokens.c.used_at.is_(None)
                )
                .values(used_at=now)
            )
            if claimed.rowcount != 1:
                raise ProvisioningRefused("registration token was already used", code="token_used")
            status = (
                await conn.execute(select(devices.c.status).where(devices.c.id == token.device_id))
            ).scalar_one_or_none()
            if status is None:
                raise ProvisioningRefused("registration token is not valid", code="token_invalid")
            if status == DeviceStatus.REVOKED.value:
                raise ProvisioningRefused(f"device {token.device_id} is revoked", code="device_revoked")
            superseded = await _revoke(conn, _unrevoked_of(token.device_id), now)
            cert = issue(token.device_id)
            await _insert(conn, cert, now)
            return Enrolled(token.device_id, cert, superseded)

    # --- certificates -----------------------------------------------------------------

    async def add_certificate(self, cert: NewCertificate, now: datetime) -> None:
        async with self.engine.begin() as conn:
            await insert_certificate(conn, cert, now)

    async def renew(
        self,
        device_id: str,
        current_serial: str,
        now: datetime,
        issue: Callable[[], NewCertificate],
        *,
        min_interval: timedelta,
    ) -> tuple[NewCertificate, list[str]]:
        """Record a renewal of `current_serial`; returns it and the unused renewals it replaced."""
        async with self.engine.begin() as conn:
            newest = (
                await conn.execute(
                    select(func.max(certificates.c.created_at)).where(
                        certificates.c.kind == _DEVICE,
                        certificates.c.subject == device_id,
                        certificates.c.renews.is_not(None),
                    )
                )
            ).scalar_one_or_none()
            if newest is not None and now - newest < min_interval:
                raise ProvisioningRefused(
                    f"the last renewal was {int((now - newest).total_seconds())} s ago; "
                    f"renew at most every {int(min_interval.total_seconds())} s",
                    code="rate_limited",
                )
            replaced = await _revoke(
                conn,
                and_(
                    _unrevoked_of(device_id),
                    certificates.c.renews.is_not(None),
                    certificates.c.first_used_at.is_(None),
                ),
                now,
            )
            cert = issue()
            await _insert(conn, cert, now, renews=current_serial)
            return cert, replaced

    async def first_use(self, serial: str, now: datetime) -> list[str]:
        """Note the first admitted session of a device certificate; revoke the ones it superseded."""
        async with self.engine.begin() as conn:
            claimed = await conn.execute(
                update(certificates)
                .where(certificates.c.serial == serial, certificates.c.first_used_at.is_(None))
                .values(first_used_at=now)
                .returning(certificates.c.kind, certificates.c.subject, certificates.c.created_at)
            )
            row = claimed.one_or_none()
            if row is None or row.kind != _DEVICE:
                return []
            older = and_(
                _unrevoked_of(row.subject),
                certificates.c.serial != serial,
                certificates.c.created_at <= row.created_at,
            )
            return await _revoke(conn, older, now)

    async def find_identity(
        self, fingerprint: Fingerprint
    ) -> tuple[CertificateIdentity | None, DeviceState | None]:
        """The certificate with this fingerprint and, for a device certificate, its device."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        certificates,
                        devices.c.id.label("device_id"),
                        devices.c.status.label("device_status"),
                        devices.c.blocked.label("device_blocked"),
                    )
                    .select_from(
                        certificates.outerjoin(
                            devices,
                            and_(certificates.c.kind == _DEVICE, devices.c.id == certificates.c.subject),
                        )
                    )
                    .where(certificates.c.fingerprint_sha256 == fingerprint.value)
                )
            ).one_or_none()
        if row is None:
            return None, None
        identity = CertificateIdentity(
            fingerprint=fingerprint,
            serial=row.serial,
            kind=CertificateKind(row.kind),
            subject=row.subject,
            not_before=row.not_before,
            not_after=row.not_after,
            revoked_at=row.revoked_at,
            first_used_at=row.first_used_at,
        )
        device = None
        if row.device_id is not None:
            device = DeviceState(
                DeviceId(row.device_id), DeviceStatus(row.device_status), bool(row.device_blocked)
            )
        return identity, device

    async def revoke_certificates(self, kind: CertificateKind, subject: str, now: datetime) -> list[str]:
        """Mark every unrevoked certificate of a subject revoked; returns their serials."""
        async with self.engine.begin() as conn:
            match = and_(
                certificates.c.kind == kind.value,
                certificates.c.subject == subject,
                certificates.c.revoked_at.is_(None),
            )
            return await _revoke(conn, match, now)

    async def revoked_certificates(self, *, source: str = "issued") -> list[tuple[str, datetime]]:
        """(serial, revoked at) of every revoked certificate our CA issued, expired ones included.

        Expired entries stay listed so that relying parties that ignore validity
        still refuse them; it costs a few bytes per entry.
        """
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(certificates.c.serial, certificates.c.revoked_at)
                .where(certificates.c.revoked_at.is_not(None), certificates.c.source == source)
                .order_by(certificates.c.revoked_at)
            )
            return [(row.serial, row.revoked_at) for row in rows]

    async def certificates_of(self, kind: CertificateKind, subject: str) -> list[CertificateRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(certificates)
                .where(certificates.c.kind == kind.value, certificates.c.subject == subject)
                .order_by(certificates.c.created_at)
            )
            return [_record(r) for r in rows]

    async def certificate(self, serial: str) -> CertificateRecord:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(certificates).where(certificates.c.serial == serial))
            ).one_or_none()
        if row is None:
            raise NotFound(f"certificate {serial} not found", code="certificate_not_found")
        return _record(row)

    async def expiring(self, until: datetime, *, limit: int = 10_000) -> list[ExpiringCertificate]:
        """Devices whose newest valid certificate ends before `until`, soonest first."""
        newest = latest_valid_not_after().subquery()
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(certificates.c.subject, certificates.c.serial, certificates.c.not_after)
                .join(
                    newest,
                    and_(
                        certificates.c.subject == newest.c.subject,
                        certificates.c.not_after == newest.c.not_after,
                    ),
                )
                .where(
                    certificates.c.kind == _DEVICE,
                    certificates.c.revoked_at.is_(None),
                    newest.c.not_after <= until,
                )
                .order_by(certificates.c.not_after, certificates.c.subject)
                .limit(limit)
            )
            return [ExpiringCertificate(r.subject, r.serial, r.not_after) for r in rows]


def latest_valid_not_after() -> Any:
    """(subject, not_after) of each device's latest-ending unrevoked certificate."""
    return (
        select(certificates.c.subject, func.max(certificates.c.not_after).label("not_after"))
        .where(certificates.c.kind == _DEVICE, certificates.c.revoked_at.is_(None))
        .group_by(certificates.c.subject)
    )


def _unrevoked_of(device_id: str) -> Any:
    return and_(
        certificates.c.kind == _DEVICE,
        certificates.c.subject == device_id,
        certificates.c.revoked_at.is_(None),
    )


async def _revoke(conn: AsyncConnection, match: Any, now: datetime) -> list[str]:
    found = (
        await conn.execute(
            select(certificates.c.serial, certificates.c.kind, certificates.c.subject).where(match)
        )
    ).all()
    serials = [row.serial for row in found]
    if serials:
        await conn.execute(
            update(certificates).where(certificates.c.serial.in_(serials)).values(revoked_at=now)
        )
        await _refresh_validity(conn, {row.subject for row in found if row.kind == _DEVICE})
    return serials


async def insert_registration_tokens(
    conn: AsyncConnection, new: Sequence[tuple[str, str, datetime]], now: datetime
) -> None:
    """One-time tokens, each (device id, token hash, expires at), in the caller's transaction."""
    await conn.execute(
        insert(registration_tokens),
        [
            {"token_hash": token_hash, "device_id": device_id, "created_at": now, "expires_at": expires_at}
            for device_id, token_hash, expires_at in new
        ],
    )


async def insert_certificate(conn: AsyncConnection, cert: NewCertificate, now: datetime) -> None:
    """Record `cert` in the caller's transaction; Conflict when it is registered already."""
    try:
        await _insert(conn, cert, now)
    except IntegrityError as exc:
        raise Conflict("this certificate is already registered", code="certificate_exists") from exc


async def _insert(conn: AsyncConnection, cert: NewCertificate, now: datetime, **extra: Any) -> None:
    await conn.execute(insert(certificates).values(created_at=now, **_cert_values(cert), **extra))
    if cert.kind is CertificateKind.DEVICE:
        await _refresh_validity(conn, {cert.subject})


def latest_end(device_id: Any) -> Any:
    """The latest end among the device's unrevoked certificates (NULL: none), as a scalar."""
    return (
        select(func.max(certificates.c.not_after))
        .where(
            certificates.c.kind == _DEVICE,
            certificates.c.subject == device_id,
            certificates.c.revoked_at.is_(None),
        )
        .scalar_subquery()
    )


async def _refresh_validity(conn: AsyncConnection, device_ids: set[str]) -> None:
    """``devices.cert_not_after`` of these devices, from their certificates as they now stand
    (in the transaction that changed them: every certificate insert and revocation ends here).

    The rows are locked first, in a statement of their own: a transaction changing the same
    device's certificates meanwhile is waited for, and the UPDATE that follows reads what it
    committed (on PostgreSQL an UPDATE's subquery reads the snapshot its statement began with;
    SQLite has one writer at a time and renders no lock).
    """
    if device_ids:
        ids = sorted(device_ids)
        await conn.execute(select(devices.c.id).where(devices.c.id.in_(ids)).with_for_update(key_share=True))
        await conn.execute(
            update(devices).where(devices.c.id.in_(ids)).values(cert_not_after=latest_end(devices.c.id))
        )


def _cert_values(cert: NewCertificate) -> dict[str, Any]:
    return {
        "serial": cert.serial,
        "fingerprint_sha256": cert.fingerprint_sha256,
        "kind": cert.kind.value,
        "subject": cert.subject,
        "not_before": cert.not_before,
        "not_after": cert.not_after,
        "pem": cert.pem,
        "source": cert.source,
        "revoked_at": None,
    }


def _record(r: Any) -> CertificateRecord:
    return CertificateRecord(
        r.serial,
        r.fingerprint_sha256,
        r.kind,
        r.subject,
        r.not_before,
        r.not_after,
        r.created_at,
        r.revoked_at,
        renews=r.renews,
        first_used_at=r.first_used_at,
        source=r.source,
    )
