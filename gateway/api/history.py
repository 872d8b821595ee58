"""``GET /api/v1/devices/{id}/connections``: a device's sessions, newest first (devices:read)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.api.auth import READ, context
from gateway.api.schemas import Offset, when
from gateway.core.clock import iso
from gateway.core.history import SessionRecord
from gateway.errors import NotFound
from gateway.history import ConnectionHistory


class SessionOut(BaseModel):
    epoch: int = Field(description="the session's presence epoch (one per session of the device)")
    connected_at: str
    disconnected_at: str | None = Field(description="null while the session lasts")
    reason: str | None = Field(description="why it ended: an offline reason, or taken_over")
    duration_s: float | None
    client_ip: str
    client_port: int
    certificate_serial: str
    bytes_in: int = Field(description="bytes of MQTT packets received (inside TLS)")
    bytes_out: int
    messages_in: int = Field(description="PUBLISH packets received")
    messages_out: int = Field(description="PUBLISH packets sent to the device")


class SessionPage(BaseModel):
    data: list[SessionOut]
    total: int
    limit: int
    offset: int


def session_out(record: SessionRecord) -> SessionOut:
    traffic = record.traffic
    return SessionOut(
        epoch=record.epoch,
        connected_at=when(record.connected_at),
        disconnected_at=iso(record.disconnected_at),
        reason=record.reason,
        duration_s=record.duration_s,
        client_ip=record.client_ip,
        client_port=record.client_port,
        certificate_serial=record.certificate_serial,
        bytes_in=traffic.bytes_in,
        bytes_out=traffic.bytes_out,
        messages_in=traffic.messages_in,
        messages_out=traffic.messages_out,
    )


def history_of(request: Request) -> ConnectionHistory:
    history = context(request).history
    if history is None:  # a context built for other routes only
        raise NotFound("connection history is not available here", code="not_available")
    return history


def build_router() -> APIRouter:
    r = APIRouter(tags=["devices"])

    @r.get("/devices/{device_id}/connections", response_model=SessionPage, dependencies=[READ])
    async def connections(
        device_id: str,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Offset = 0,
    ) -> SessionPage:
        """The device's sessions, newest first: when, from where, with which certificate, how it
        ended, and the bytes and messages each way (the running session with live counters)."""
        await context(request).devices.get(device_id)  # 404 for an unknown device
        records, total = await history_of(request).sessions(device_id, limit=limit, offset=offset)
        return SessionPage(data=[session_out(r) for r in records], total=total, limit=limit, offset=offset)

    return r
