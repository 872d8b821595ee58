"""Request and response bodies of the HTTPS API (DESIGN.md §6), and record -> JSON mapping."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from gateway.core import device_fields, listing
from gateway.core.clock import iso
from gateway.core.records import DevicePage, DeviceQuery, DeviceRecord, DeviceSummary
from gateway.errors import InvalidValue

MAX_OFFSET = 1_000_000_000  # beyond any fleet or trail; unbounded, a huge one overflowed SQLite (500)
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="skip this many rows")]


class RequestBody(BaseModel):
    """A request body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class CertificateOut(BaseModel):
    serial: str
    fingerprint_sha256: str
    not_after: str


class DeviceOut(BaseModel):
    id: str
    name: str
    status: Literal["pending", "active", "inactive", "maintenance", "revoked"]
    connection: Literal["online", "offline"]
    blocked: bool
    blocked_at: str | None
    created_at: str
    updated_at: str
    last_connected_at: str | None
    last_disconnected_at: str | None
    disconnect_reason: str | None
    last_seen_at: str | None
    last_data_at: str | None
    manufacturer: str | None
    model: str | None
    application: str | None
    application_version: str | None
    os: str | None
    os_version: str | None
    firmware_version: str | None
    certificate: CertificateOut | None
    description: str | None
    tags: list[str]
    location_ids: list[str]
    metadata: dict[str, Any]
    settings: dict[str, Any]
    profile_id: str | None = Field(description="its device profile (/device-profiles), if any")


def device_out(device: DeviceRecord) -> DeviceOut:
    cert = device.certificate
    return DeviceOut(
        id=device.id,
        name=device.name,
        status=device.status.value,
        connection=device.connection.value,
        blocked=device.blocked,
        blocked_at=iso(device.blocked_at),
        created_at=iso(device.created_at) or "",
        updated_at=iso(device.updated_at) or "",
        last_connected_at=iso(device.last_connected_at),
        last_disconnected_at=iso(device.last_disconnected_at),
        disconnect_reason=device.disconnect_reason,
        last_seen_at=iso(device.last_seen_at),
        last_data_at=iso(device.last_data_at),
        manufacturer=device.manufacturer,
        model=device.model,
        application=device.application,
        application_version=device.application_version,
        os=device.os,
        os_version=device.os_version,
        firmware_version=device.firmware_version,
        certificate=None
        if cert is None
        else CertificateOut(
            serial=cert.serial,
            fingerprint_sha256=cert.fingerprint_sha256,
            not_after=iso(cert.not_after) or "",
        ),
        description=device.description,
        tags=list(device.tags),
        location_ids=list(device.location_ids),
        metadata=device.metadata,
        settings=device.settings,
        profile_id=device.profile_id,
    )


class DeviceEnvelope(BaseModel):
    data: DeviceOut


class DeviceList(BaseModel):
    data: list[DeviceOut]
    total: int
    limit: int
    offset: int
    next: str | None = Field(description="cursor of the next page (pass it as `cursor`); null on the last")


def page_query(
    filters: DeviceQuery, sort: str | None, limit: int, offset: int, cursor: str | None
) -> DeviceQuery:
    """A device query's order and page from the listing's parameters (by offset, or by cursor)."""
    keys = listing.parse_sort(sort)
    if cursor and offset:
        raise InvalidValue("pass either cursor or offset, not both", code="invalid_cursor")
    return dataclasses.replace(
        filters,
        sort=keys,
        limit=limit,
        offset=offset,
        after=listing.Cursor.decode(cursor, keys) if cursor else None,
    )


def device_list(page: DevicePage, limit: int, offset: int) -> DeviceList:
    return DeviceList(
        data=[device_out(d) for d in page.devices],
        total=page.total,
        limit=limit,
        offset=offset,
        next=page.next.encode() if page.next else None,
    )


class Counted(BaseModel):
    value: str | None
    count: int


class SummaryOut(BaseModel):
    total: int
    status: dict[str, int]
    connection: dict[str, int]
    blocked: dict[str, int] = Field(description='{"blocked": n, "unblocked": n}')
    application: list[Counted] = Field(description="most common first (at most 100 values)")
    model: list[Counted]
    firmware_version: list[Counted]
    certificates_expiring: dict[str, int] = Field(
        description='devices whose newest valid certificate ends within {"7d", "30d"} (expired included)'
    )


class SummaryEnvelope(BaseModel):
    data: SummaryOut


def summary_out(summary: DeviceSummary) -> SummaryOut:
    def counted(groups: list[tuple[str | None, int]]) -> list[Counted]:
        return [Counted(value=value, count=count) for value, count in groups]

    return SummaryOut(
        total=summary.total,
        status=summary.status,
        connection=summary.connection,
        blocked={"blocked": summary.blocked, "unblocked": summary.total - summary.blocked},
        application=counted(summary.application),
        model=counted(summary.model),
        firmware_version=counted(summary.firmware_version),
        certificates_expiring=summary.certificates_expiring,
    )


class RegisterIn(RequestBody):
    name: str = Field(min_length=1, max_length=200)
    id: str | None = Field(
        default=None, description="your own id, e.g. a hardware serial; generated if absent"
    )


class Registered(BaseModel):
    data: DeviceOut
    registration_token: str = Field(description="one-time enrolment token; shown once, stored only as a hash")
    token_expires_at: str


class PatchIn(RequestBody):
    """Fields present are changed (null clears a detail field); absent ones are kept."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    status: Literal["active", "inactive", "maintenance"] | None = None
    description: str | None = Field(default=None, description="up to 1,000 characters; null clears")
    tags: list[str] | None = Field(default=None, description="replaces the set; [] or null clears")
    metadata: dict[str, Any] | None = Field(default=None, description="free-form JSON object, replaced")
    settings: dict[str, Any] | None = Field(
        default=None,
        description="per-integration settings (JSON object), replaced; checked against the device's profile",
    )
    location_ids: list[str] | None = Field(
        default=None, description="site ids (/sites), replaced; each one added must exist; [] or null clears"
    )
    profile_id: str | None = Field(
        default=None, description="a device profile's id (/device-profiles); null removes the profile"
    )

    def details(self) -> dict[str, object]:
        """The detail fields the request names (for `gateway.core.device_fields.parse_details`)."""
        return {
            name: getattr(self, name) for name in device_fields.DETAIL_FIELDS if name in self.model_fields_set
        }


class ProvisionIn(RequestBody):
    token: str = Field(min_length=1, max_length=200)
    csr: str = Field(min_length=1, max_length=16384, description="PEM certificate signing request")


class ProvisionOut(BaseModel):
    device_id: str
    certificate: str
    ca_chain: str
    certificate_serial: str
    not_after: str


class Success(BaseModel):
    success: bool


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: Literal["ok", "unavailable"]
    mqtt_sessions: int
    version: str


def when(moment: datetime) -> str:
    return iso(moment) or ""
