"""Records the store hands out: frozen, framework-free views of the registry.

The store (the only module that imports SQLAlchemy) maps its rows to these; the
API and CLI serialise them. Field names are the contract's (DESIGN.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.core.lifecycle import DeviceStatus
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
    """Filters, order and page of a device listing (validated by the API/CLI layer)."""

    search: str | None = None
    blocked: str = "all"  # all | hide | only
    status: DeviceStatus | None = None
    connection: Connection | None = None
    sort: tuple[str, ...] = ("created_at",)  # field names, "-" prefix for descending
    limit: int = 100
    offset: int = 0


SORTABLE_FIELDS = frozenset(
    {
        "id",
        "name",
        "status",
        "connection",
        "blocked",
        "created_at",
        "updated_at",
        "last_connected_at",
        "last_disconnected_at",
        "last_seen_at",
        "last_data_at",
    }
)
