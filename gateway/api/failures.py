"""``/api/v1/connect-failures``: refused CONNECTs grouped by certificate (or address) and reason
(devices:read), and the approval of an unknown certificate as a new device (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.api.auth import ADMIN, READ, context
from gateway.api.schemas import DeviceEnvelope, Offset, RequestBody, device_out, when
from gateway.core.admission import Refusal
from gateway.core.clock import iso
from gateway.core.failures import FailureQuery, FailureRecord
from gateway.core.ids import Fingerprint
from gateway.errors import NotFound
from gateway.failures import ConnectFailures


class CertificateInfoOut(BaseModel):
    subject: str
    issuer: str
    serial: str
    not_before: str
    not_after: str


class FailureOut(BaseModel):
    fingerprint: str | None = Field(description="SHA-256 of the client certificate; null without one")
    reason: str
    count: int
    first_seen_at: str
    last_seen_at: str
    last_client_id: str
    last_client_ip: str
    device_id: str | None = Field(description="the device the certificate belongs to, when known")
    approvable: bool = Field(
        description="an unknown certificate that POST .../approve can turn into a device"
    )
    certificate: CertificateInfoOut | None = Field(description="of an unknown certificate, as presented")
    approved_device_id: str | None
    approved_at: str | None


class FailurePage(BaseModel):
    data: list[FailureOut]
    total: int
    limit: int
    offset: int


class ApproveIn(RequestBody):
    name: str = Field(min_length=1, max_length=200)
    device_id: str | None = Field(default=None, description="the new device's id; generated if absent")


def failure_out(record: FailureRecord) -> FailureOut:
    info = record.certificate
    return FailureOut(
        fingerprint=record.fingerprint,
        reason=record.reason,
        count=record.count,
        first_seen_at=when(record.first_seen_at),
        last_seen_at=when(record.last_seen_at),
        last_client_id=record.last_client_id,
        last_client_ip=record.last_client_ip,
        device_id=record.device_id,
        approvable=record.approvable,
        certificate=None
        if info is None
        else CertificateInfoOut(
            subject=info.subject,
            issuer=info.issuer,
            serial=info.serial,
            not_before=when(info.not_before),
            not_after=when(info.not_after),
        ),
        approved_device_id=record.approved_device_id,
        approved_at=iso(record.approved_at),
    )


def failures_of(request: Request) -> ConnectFailures:
    failures = context(request).failures
    if failures is None:  # a context built for other routes only
        raise NotFound("connect failures are not available here", code="not_available")
    return failures


def build_router() -> APIRouter:
    r = APIRouter(tags=["connect failures"])

    @r.get("/connect-failures", response_model=FailurePage, dependencies=[READ])
    async def connect_failures(
        request: Request,
        reason: Refusal | None = None,
        fingerprint: Annotated[str | None, Query(min_length=64, max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> FailurePage:
        """Refused CONNECTs, one row per certificate fingerprint (or client address) and reason,
        with a count, first and last seen; most recently seen first."""
        wanted = Fingerprint(fingerprint.lower()).value if fingerprint else None
        query = FailureQuery(reason, wanted, limit, offset)
        records, total = await failures_of(request).find(query)
        return FailurePage(data=[failure_out(r) for r in records], total=total, limit=limit, offset=offset)

    @r.post(
        "/connect-failures/{fingerprint}/approve",
        status_code=201,
        response_model=DeviceEnvelope,
        dependencies=[ADMIN],
    )
    async def approve(fingerprint: str, body: ApproveIn, request: Request) -> DeviceEnvelope:
        """Create a device bound to an unknown certificate of a configured external CA
        (``ca.external_anchors``); it is ``pending`` until it connects with that certificate."""
        device = await failures_of(request).approve(fingerprint, name=body.name, device_id=body.device_id)
        return DeviceEnvelope(data=device_out(device))

    return r
