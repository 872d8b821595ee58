"""Records the store hands out: frozen, framework-free views of the registry.

The store (the only module that imports SQLAlchemy) maps its rows to these; the
API and CLI serialise them. Field names are the contract's (DESIGN.md §6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.core.admission import CertificateKind
from gateway.core.lifecycle import DeviceStatus
from gateway.core.listing import DEFAULT_SORT, SORT_FIELDS, Cursor
from gateway.core.presence import Connection


@dataclass(frozen=True, slots=True)
class CertificateSummary:
    serial: str
    fingerprint_sha256: str
    not_after: datetime


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    name: str
    status: DeviceStatus
    connection: Connection
    blocked: bool
    blocked_at: datetime | None
    created_at: datetime
    updated_at: datetime
    checked_in_at: datetime | None
    last_connected_at: datetime | None
    last_disconnected_at: datetime | None
    disconnect_reason: str | None
    last_seen_at: datetime | None
    last_data_at: datetime | None
    client_ip: str | None
    epoch: int
    manufacturer: str | None = None
    model: str | None = None
    application: str | None = None
    application_version: str | None = None
    os: str | None = None
    os_version: str | None = None
    firmware_version: str | None = None
    certificate: CertificateSummary | None = None
    # operator-managed (rules in gateway.core.device_fields)
    description: str | None = None
    tags: tuple[str, ...] = ()
    location_ids: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    profile_id: str | None = None  # its device profile (gateway.core.profiles)


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    fingerprint_sha256: str
    kind: str
    subject: str
    not_before: datetime
    not_after: datetime
    created_at: datetime
    revoked_at: datetime | None
    renews: str | None = None  # serial of the certificate this one replaces (renewal)
    first_used_at: datetime | None = None
    source: str = "issued"  # issued (by our CA) | attached (from an external CA)


@dataclass(frozen=True, slots=True)
class NewDevice:
    """A device to register with others at once: its detail fields already checked."""

    device_id: str
    name: str
    details: Mapping[str, object]  # parsed detail fields (gateway.core.device_fields)
    token_hash: str  # of its one-time registration token
    token_expires_at: datetime


@dataclass(frozen=True, slots=True)
class NewCertificate:
    """What the CA produced (or an operator attached) for a subject, ready to be recorded."""

    serial: str
    fingerprint_sha256: str
    kind: CertificateKind
    subject: str
    not_before: datetime
    not_after: datetime
    pem: str
    source: str = "issued"


@dataclass(frozen=True, slots=True)
class ExpiringCertificate:
    device_id: str
    serial: str
    not_after: datetime


@dataclass(frozen=True, slots=True)
class ApiTokenRecord:
    id: int
    name: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """Filters, order and page of a device listing (values parsed by the API/CLI layer).

    Every filter narrows: repeated tags or location ids must all be present.
    """

    search: str | None = None  # in name or id, any case
    blocked: str = "all"  # all | hide | only
    status: DeviceStatus | None = None
    connection: Connection | None = None
    tags: tuple[str, ...] = ()
    location_ids: tuple[str, ...] = ()
    application: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    cert_expires_before: datetime | None = None  # newest valid certificate ends by then
    last_seen_before: datetime | None = None  # seen, last, before then (never seen: not listed)
    sort: tuple[str, ...] = DEFAULT_SORT  # field names, "-" prefix for descending (core.listing)
    limit: int = 100
    offset: int = 0
    after: Cursor | None = None  # the previous page's end (keyset paging)
    group: GroupScope | None = None  # only the devices of one group (?group=)


@dataclass(frozen=True, slots=True)
class GroupScope:
    """The devices of one group (gateway.core.groups), as a device query narrows to them."""

    group_id: str
    saved: DeviceQuery | None = None  # dynamic: its saved filters, ANDed; static (None): its members


@dataclass(frozen=True, slots=True)
class DevicePage:
    devices: list[DeviceRecord]
    total: int  # every device the filters match
    next: Cursor | None  # where the next page starts; None when this page is the last


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """Counts over the devices a query's filters match (its order and page are ignored)."""

    total: int
    status: dict[str, int]
    connection: dict[str, int]
    blocked: int
    application: list[tuple[str | None, int]]  # most common first
    model: list[tuple[str | None, int]]
    firmware_version: list[tuple[str | None, int]]
    certificates_expiring: dict[str, int]  # "7d", "30d": newest valid certificate ends within


SORTABLE_FIELDS = frozenset(SORT_FIELDS)


@dataclass(frozen=True, slots=True)
class ReadingRecord:
    id: int
    device_id: str
    component: str | None
    sensor: str
    value: float | int | bool | str
    value_type: str  # number | boolean | string
    unit: str | None
    ts: datetime
    received_at: datetime


@dataclass(frozen=True, slots=True)
class HealthRecord:
    id: int | None  # None for the latest-health view
    device_id: str
    ts: datetime
    received_at: datetime
    uptime_s: float
    free_heap_bytes: int
    rssi_dbm: float
    connection_type: str
    readings_sent: int
    readings_dropped: int
    battery_pct: float | None
    extra: dict[str, object]


@dataclass(frozen=True, slots=True)
class SensorRecord:
    device_id: str
    component: str | None
    name: str
    value_type: str
    unit: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ComponentRecord:
    device_id: str
    id: str
    profile: str | None
    created_at: datetime
    updated_at: datetime
    sensors: tuple[SensorRecord, ...]


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Filters and page of a time-series query, newest first."""

    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    before: tuple[datetime, int] | None = None  # the (ts, id) of the last row of the previous page


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One operator action as recorded (`id` and `at` are set by the store)."""

    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, object] | None = None
    after: dict[str, object] | None = None
    detail: dict[str, object] | None = None
    id: int | None = None
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditQuery:
    actor: str | None = None
    action: str | None = None  # exact, or a prefix ending in "." (``device.``)
    target_type: str | None = None
    target_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100
    offset: int = 0
