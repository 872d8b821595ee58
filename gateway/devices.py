"""Operator actions on devices: register, provision, reset, rename, status, block, revoke,
delete, attach an external certificate.

Receives validated requests from the API; hands on registry changes (store), new
certificates (PKI), a re-signed CRL and fresh TLS context after every revocation
(`Revocations`), kicks of live sessions, and ``gateway/events/device`` events.
Access is withdrawn in the database first, then the live session is cut, so a
reconnect racing the kick is refused too. A change of the detail fields is checked against
the records they point to (`_checked_details`): added location ids must name sites, and a
device's profile must exist and its settings conform to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, cast

import ca
from gateway.audit import Audit, acting_as, current_actor, snapshot
from gateway.audit import entry as audit_entry
from gateway.core import device_fields, lifecycle, sites, tokens
from gateway.core.admission import CertificateKind
from gateway.core.clock import iso, utcnow
from gateway.core.ids import DeviceId
from gateway.core.lifecycle import DeviceStatus, LifecycleEvent
from gateway.core.presence import Connection, OfflineReason
from gateway.core.records import (
    CertificateRecord,
    DevicePage,
    DeviceQuery,
    DeviceRecord,
    DeviceSummary,
    NewDevice,
)
from gateway.credentials import Revocations
from gateway.errors import Conflict, FieldRejected, InvalidValue, NotFound, ProvisioningRefused
from gateway.events import Events
from gateway.logs import get_logger
from gateway.pki import Pki
from gateway.store import Store

log = get_logger("gateway.devices")

MAX_NAME_LENGTH = 200
# The parts of a device record an operator changes; the audit trail keeps them before and after.
AUDITED_FIELDS = (
    "id",
    "name",
    "status",
    "blocked",
    "blocked_at",
    "checked_in_at",
    "certificate",
    *device_fields.DETAIL_FIELDS,
)


# A device to register with others: (name, id or None for a generated one, checked details).
NewRegistration = tuple[str, str | None, Mapping[str, object]]


class SessionControl(Protocol):
    async def kick(self, key: str, reason: OfflineReason, *, wait_s: float = 2.0) -> bool: ...


@dataclass(frozen=True, slots=True)
class Registration:
    device: DeviceRecord
    token: str  # shown once, never stored
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Provisioned:
    device_id: str
    certificate_pem: str
    ca_chain_pem: str
    serial: str
    not_after: datetime


def _event_fields(detail: dict[str, object]) -> dict[str, object]:
    """Detail as event fields: times as ISO 8601."""
    return {key: iso(value) if isinstance(value, datetime) else value for key, value in detail.items()}


def _new_record(device_id: str, name: str, now: datetime) -> DeviceRecord:
    """What a device is the moment it is registered: pending, offline, no details."""
    return DeviceRecord(
        id=device_id,
        name=name,
        status=DeviceStatus.PENDING,
        connection=Connection.OFFLINE,
        blocked=False,
        blocked_at=None,
        created_at=now,
        updated_at=now,
        checked_in_at=None,
        last_connected_at=None,
        last_disconnected_at=None,
        disconnect_reason=None,
        last_seen_at=None,
        last_data_at=None,
        client_ip=None,
        epoch=0,
    )


def _unprintable(ch: str) -> bool:
    return ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF


def clean_name(name: str) -> str:
    name = name.strip() if isinstance(name, str) else ""
    # Lone surrogates (JSON "\ud800") are not text: the database cannot store them.
    if not name or len(name) > MAX_NAME_LENGTH or any(_unprintable(ch) for ch in name):
        raise InvalidValue(
            f"device name must be 1-{MAX_NAME_LENGTH} printable characters", code="invalid_name"
        )
    return name


class DeviceService:
    def __init__(
        self,
        store: Store,
        pki: Pki,
        revocations: Revocations,
        sessions: SessionControl,
        events: Events,
        audit: Audit,
        *,
        token_ttl: timedelta,
        device_validity: timedelta,
    ) -> None:
        self._store = store
        self._credentials = store.credentials
        self._pki = pki
        self._revocations = revocations
        self._sessions = sessions
        self._events = events
        self._audit = audit
        self._token_ttl = token_ttl
        self._device_validity = device_validity

    # --- registration and provisioning ---------------------------------------------

    async def register(self, name: str, device_id: str | None = None) -> Registration:
        [registration] = await self.register_many([(name, device_id, {})])
        return registration

    async def check_new_details(
        self, device_id: str | None, name: str, details: Mapping[str, object]
    ) -> dict[str, object]:
        """The parsed detail fields of a device yet to register, checked as a change of a new
        device would be (sites, profile); FieldRejected names the first problem."""
        return await self._checked_details(_new_record(device_id or "", clean_name(name), utcnow()), details)

    async def register_many(self, rows: Sequence[NewRegistration]) -> list[Registration]:
        """Register (name, id or None, checked detail fields) rows in one transaction, each with
        its token, audit entry and ``registered`` event as `register` gives one; Conflict (none
        registered) when an id exists by then."""
        now = utcnow()
        made: list[tuple[str, datetime]] = []
        new: list[NewDevice] = []
        for name, device_id, details in rows:
            did = DeviceId(device_id) if device_id is not None else DeviceId.generate()
            token, expires_at = tokens.new_token(tokens.REGISTRATION_PREFIX), now + self._token_ttl
            made.append((token, expires_at))
            new.append(NewDevice(did.value, clean_name(name), details, tokens.hash_token(token), expires_at))
        devices = await self._store.create_devices(new, now)
        registrations = [
            Registration(device, token, expires_at)
            for device, (token, expires_at) in zip(devices, made, strict=True)
        ]
        await self._changed_many(
            "registered",
            [(r.device.id, None, r.device, {"token_expires_at": r.expires_at}) for r in registrations],
        )
        return registrations

    async def _new_token(self, device: DeviceRecord, now: datetime) -> Registration:
        token = tokens.new_token(tokens.REGISTRATION_PREFIX)
        expires_at = now + self._token_ttl
        await self._credentials.add_registration_token(device.id, tokens.hash_token(token), now, expires_at)
        return Registration(device, token, expires_at)

    async def provision(self, token: str, csr: str | bytes) -> Provisioned:
        """Redeem a one-time token with a CSR; the certificate names the token's device."""
        if not isinstance(token, str) or not token.startswith(tokens.REGISTRATION_PREFIX):
            raise ProvisioningRefused("registration token is not valid", code="token_invalid")
        try:
            vetted = ca.vet_csr(csr)
        except ca.CSRRejected as exc:
            raise ProvisioningRefused(f"CSR rejected: {exc}", code=f"csr_{exc.code}") from exc
        now = utcnow()
        enrolled = await self._credentials.provision(
            tokens.hash_token(token),
            now,
            lambda device_id: self._pki.issue(
                vetted.public_key,
                subject=device_id,
                kind=CertificateKind.DEVICE,
                now=now,
                validity=self._device_validity,
            ),
        )
        device_id, cert = enrolled.device_id, enrolled.certificate
        if enrolled.superseded:  # a credential reset that did not revoke at once does so now
            await self._kick(device_id, OfflineReason.REVOKED)
            await self._revocations.refresh()
        with acting_as(f"device:{device_id}"):  # the token's holder acted, not an operator
            await self._changed(
                "provisioned",
                device_id,
                certificate_serial=cert.serial,
                superseded_serials=enrolled.superseded,
                key_type=vetted.key_description,
            )
        return Provisioned(device_id, cert.pem, self._pki.ca_pem.decode("ascii"), cert.serial, cert.not_after)

    async def reset_credentials(self, device_id: str, *, revoke_existing: bool) -> Registration:
        """A fresh one-time registration token for an existing device.

        With `revoke_existing` every certificate is revoked and the session cut at once;
        otherwise they stay valid until the device enrols with the new token.
        """
        device = await self._store.get_device(device_id)
        if device.status is DeviceStatus.REVOKED:
            raise Conflict(f"device {device_id} is revoked; register a new device", code="device_revoked")
        serials: list[str] = []
        if revoke_existing:
            serials = await self._withdraw(device_id, OfflineReason.REVOKED)
        registration = await self._new_token(device, utcnow())
        await self._changed(
            "credentials_reset",
            device_id,
            revoke_existing=revoke_existing,
            certificate_serials=serials,
            token_expires_at=registration.expires_at,
        )
        return registration

    async def certificates(self, device_id: str) -> list[CertificateRecord]:
        await self._store.get_device(device_id)
        return await self._credentials.certificates_of(CertificateKind.DEVICE, device_id)

    async def attach_certificate(
        self, device_id: str, pem: bytes, *, now: datetime | None = None
    ) -> CertificateRecord:
        """Bind a certificate from an external trust anchor to a device (by its fingerprint)."""
        now = now or utcnow()
        device = await self._store.get_device(device_id)
        if device.status is DeviceStatus.REVOKED:
            raise Conflict(f"device {device_id} is revoked", code="device_revoked")
        cert = self._pki.external_certificate(pem, subject=device_id, now=now)
        await self._credentials.add_certificate(cert, now)
        await self._changed(
            "certificate_attached",
            device_id,
            certificate_serial=cert.serial,
            fingerprint=cert.fingerprint_sha256,
        )
        return await self._credentials.certificate(cert.serial)

    async def adopt(self, name: str, device_id: str | None, pem: bytes) -> DeviceRecord:
        """Register a device bound to a certificate of an external CA that was refused as unknown.

        The approval of a connect failure (`gateway.failures`): the device is created with
        that certificate in one transaction and checks in at its first connection. A
        certificate of the gateway's own CA is refused: the CA issues only to registered
        devices, so an unknown one means a registry restored from an older backup (or a
        leaked CA key), and such a device is registered and enrolled with a token instead.
        """
        now = utcnow()
        did = DeviceId(device_id) if device_id is not None else DeviceId.generate()
        clean = clean_name(name)
        if self._pki.issued_by_own_ca(pem):
            raise Conflict(
                "the certificate was issued by the gateway's own CA but is unknown to the registry "
                "(restored database?); register the device and enroll it with a token instead",
                code="own_ca_certificate",
            )
        cert = self._pki.external_certificate(pem, subject=did.value, now=now)
        device = await self._store.create_device(did, clean, now, certificate=cert)
        await self._changed(
            "approved",
            device.id,
            None,
            device,
            certificate_serial=cert.serial,
            fingerprint=cert.fingerprint_sha256,
        )
        return device

    # --- queries ------------------------------------------------------------------

    async def get(self, device_id: str) -> DeviceRecord:
        return await self._store.get_device(device_id)

    async def existing(self, device_ids: Sequence[str]) -> set[str]:
        """Which of these ids are registered."""
        return await self._store.existing_ids(device_ids)

    async def find(self, query: DeviceQuery) -> DevicePage:
        return await self._store.list_devices(query)

    async def summary(self, query: DeviceQuery) -> DeviceSummary:
        return await self._store.device_summary(query, utcnow())

    # --- changes ------------------------------------------------------------------

    async def patch(
        self,
        device_id: str,
        *,
        name: str | None = None,
        status: DeviceStatus | None = None,
        details: Mapping[str, object] | None = None,
    ) -> DeviceRecord:
        """PATCH: every value is checked before anything changes; then rename, details, status."""
        parsed = device_fields.parse_details(details or {})
        if name is not None:
            clean_name(name)
        if status is not None:
            lifecycle.event_for_requested(status)
        device = await self._store.get_device(device_id)
        await self._checked_details(device, parsed)
        if name is not None:
            device = await self.rename(device_id, name)
        if parsed:
            device = await self.update_details(device_id, parsed)
        if status is not None:
            device = await self.request_status(device_id, status)
        return device

    async def update_details(self, device_id: str, details: Mapping[str, object]) -> DeviceRecord:
        """Description, tags, location ids, metadata, settings, profile: each present one replaced.

        Recorded (and ``updated_at`` moved) only when something actually changed.
        """
        parsed = device_fields.parse_details(details)
        before = await self._store.get_device(device_id)
        changed = await self._checked_details(before, parsed)
        if not changed:
            return before
        device = await self._store.update_device(device_id, utcnow(), **changed)
        await self._changed("updated", device_id, before, device, fields=sorted(changed))
        return device

    async def _checked_details(self, before: DeviceRecord, parsed: Mapping[str, object]) -> dict[str, object]:
        """The parsed detail fields that differ from `before`, checked against other records.

        Every location id the change adds must name a site (`gateway.core.sites`). When the
        device has a profile after the change, and the change assigns it or touches the
        settings, the profile must exist and the settings conform to it; its fixed fields
        keep their value unless the change assigns the profile (`gateway.core.profiles`).
        """
        changed = {name: value for name, value in parsed.items() if getattr(before, name) != value}
        locations = cast(tuple[str, ...], changed.get("location_ids", before.location_ids))
        added = sites.added_locations(before.location_ids, locations)
        missing = await self._store.sites.missing(added) if added else []
        if missing:
            raise FieldRejected(
                f"no such site(s): {', '.join(missing)} (create them under /sites first)",
                path="location_ids",
                code="unknown_site",
            )
        profile_id = cast(str | None, changed.get("profile_id", before.profile_id))
        if profile_id is None or not {"profile_id", "settings"} & set(changed):
            return changed
        try:
            profile = await self._store.profiles.get(profile_id)
        except NotFound as exc:
            raise FieldRejected(
                f"no such device profile: {profile_id}", path="profile_id", code="unknown_profile"
            ) from exc
        settings = cast(dict[str, object], changed.get("settings", before.settings))
        profile.spec.check_settings(settings, None if "profile_id" in changed else before.settings)
        return changed

    async def rename(self, device_id: str, name: str) -> DeviceRecord:
        before = await self._store.get_device(device_id)
        device = await self._store.update_device(device_id, utcnow(), name=clean_name(name))
        await self._changed("renamed", device_id, before, device, name=device.name)
        return device

    async def request_status(self, device_id: str, requested: DeviceStatus) -> DeviceRecord:
        """PATCH status: active | inactive | maintenance, through the lifecycle table."""
        event = lifecycle.event_for_requested(requested)
        return await self._transition(device_id, event)

    async def _transition(self, device_id: str, event: LifecycleEvent) -> DeviceRecord:
        current = await self._store.get_device(device_id)
        new = lifecycle.next_status(current.status, event, checked_in=current.checked_in_at is not None)
        device = current
        if new is not current.status:
            device = await self._store.change_status(device_id, current.status, new, utcnow())
            await self._changed(
                "status_changed", device_id, current, device, status=new.value, previous=current.status.value
            )
        if new not in lifecycle.CONNECTABLE:
            reason = OfflineReason.REVOKED if new is DeviceStatus.REVOKED else OfflineReason.DEACTIVATED
            await self._kick(device_id, reason)
        return device

    async def block(self, device_id: str) -> DeviceRecord:
        before = await self._store.get_device(device_id)
        device = await self._store.update_device(device_id, utcnow(), blocked=True, blocked_at=utcnow())
        await self._kick(device_id, OfflineReason.BLOCKED)
        await self._changed("blocked", device_id, before, device)
        return device

    async def unblock(self, device_id: str) -> DeviceRecord:
        before = await self._store.get_device(device_id)
        device = await self._store.update_device(device_id, utcnow(), blocked=False, blocked_at=None)
        await self._changed("unblocked", device_id, before, device)
        return device

    async def revoke(self, device_id: str) -> DeviceRecord:
        """Final: status revoked, every certificate on the CRL, new TLS context, session cut."""
        current = await self._store.get_device(device_id)
        device = current
        if current.status is not DeviceStatus.REVOKED:
            new = lifecycle.next_status(current.status, LifecycleEvent.REVOKE, checked_in=False)
            device = await self._store.change_status(device_id, current.status, new, utcnow())
        serials = await self._withdraw(device_id, OfflineReason.REVOKED)
        await self._changed("revoked", device_id, current, device, certificate_serials=serials)
        return device

    async def delete(self, device_id: str) -> None:
        """Revoke (certificates stay on the CRL), cut the session, then remove the record."""
        before = await self._store.get_device(device_id)
        # From here on every reconnect is refused; OFFLINE (deleted) is recorded and published.
        serials = await self._withdraw(device_id, OfflineReason.DELETED)
        await self._store.delete_device(device_id)
        self._events.forget_status(device_id)
        await self._changed("deleted", device_id, before, None, certificate_serials=serials)

    async def _changed(
        self,
        action: str,
        device_id: str,
        before: DeviceRecord | None = None,
        after: DeviceRecord | None = None,
        **detail: object,
    ) -> None:
        """Every registry change, in one place: logged, audited (who, before, after), published."""
        await self._changed_many(action, [(device_id, before, after, detail)])

    async def _changed_many(
        self,
        action: str,
        changes: Sequence[tuple[str, DeviceRecord | None, DeviceRecord | None, Mapping[str, object]]],
    ) -> None:
        """`_changed` for several devices at once: their audit entries in one transaction."""
        for device_id, _, _, detail in changes:
            log.info(f"device.{action}", device_id=device_id, **detail)
        await self._audit.record_many(
            [
                audit_entry(
                    f"device.{action}",
                    "device",
                    device_id,
                    before=snapshot(before, AUDITED_FIELDS),
                    after=snapshot(after, AUDITED_FIELDS),
                    **detail,
                )
                for device_id, before, after, detail in changes
            ]
        )
        for device_id, _, _, detail in changes:
            await self._events.emit(
                "device",
                action=action,
                device_id=device_id,
                actor=current_actor(),
                **_event_fields(dict(detail)),
            )

    async def _withdraw(self, device_id: str, reason: OfflineReason) -> list[str]:
        """Revoke every certificate of the device, cut its session, then re-sign the CRL.

        The registry refuses the certificates from the first step on (a racing reconnect
        gets CONNACK 5), so the kick does not wait for the CRL and the new TLS context,
        which then make every later handshake fail.
        """
        now = utcnow()
        serials = await self._credentials.revoke_certificates(CertificateKind.DEVICE, device_id, now)
        await self._kick(device_id, reason)
        if serials:
            await self._revocations.refresh()
        return serials

    async def _kick(self, device_id: str, reason: OfflineReason) -> None:
        started = utcnow()
        if await self._sessions.kick(device_id, reason):
            elapsed_ms = (utcnow() - started).total_seconds() * 1000
            log.info(
                "session.kicked", device_id=device_id, reason=reason.value, elapsed_ms=round(elapsed_ms, 1)
            )


__all__ = ["DeviceService", "Provisioned", "Registration", "SessionControl", "clean_name"]
