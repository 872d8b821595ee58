"""Request and response bodies of the HTTPS API (DESIGN.md §6), and record -> JSON mapping."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.core.clock import iso
from gateway.core.records import DeviceRecord


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
    )


class DeviceEnvelope(BaseModel):
    data: DeviceOut


class DeviceList(BaseModel):
    data: list[DeviceOut]
    total: int
    limit: int
    offset: int


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
    name: str | None = Field(default=None, min_length=1, max_length=200)
    status: Literal["active", "inactive", "maintenance"] | None = None


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
