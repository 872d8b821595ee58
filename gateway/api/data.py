"""Routes over device data: readings, health, components and sensors (read scope).

Time series come newest first; a page ends with ``next_cursor`` when more rows are
older than its last one (pass it back as ``cursor``), stable while new data arrives.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from gateway.api.auth import READ, context
from gateway.api.schemas import Offset
from gateway.core.clock import as_utc, iso, parse_duration, utcnow
from gateway.core.records import ComponentRecord, HealthRecord, ReadingRecord, SensorRecord, TimeWindow
from gateway.errors import InvalidValue

Limit = Annotated[int, Query(ge=1, le=1000)]
Since = Annotated[datetime | None, Query(description="ISO 8601; measurement time at or after")]
Until = Annotated[datetime | None, Query(description="ISO 8601; measurement time before")]
Cursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")]


class Page(BaseModel):
    data: list[dict[str, Any]]
    next_cursor: str | None


class One(BaseModel):
    data: dict[str, Any] | None


class Many(BaseModel):
    data: list[dict[str, Any]]


def _decode_cursor(cursor: str | None) -> tuple[datetime, int] | None:
    """The (time, row id) a page ended at; `InvalidValue` for anything but a cursor we made."""
    if not cursor:
        return None
    try:
        ts, row_id = base64.urlsafe_b64decode(cursor.encode("ascii") + b"==").decode("ascii").split("|")
        moment, row = as_utc(datetime.fromisoformat(ts)), int(row_id)
    except (ValueError, UnicodeError, InvalidValue) as exc:
        raise _bad_cursor() from exc
    if moment is None or not 0 <= row < 2**63:  # a row id the database can hold
        raise _bad_cursor()
    return moment, row


def _bad_cursor() -> InvalidValue:
    return InvalidValue("invalid cursor; pass next_cursor from the previous page", code="invalid_cursor")


def _encode_cursor(ts: datetime, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{ts.isoformat()}|{row_id}".encode("ascii")).decode("ascii").rstrip("=")


def _window(since: datetime | None, until: datetime | None, limit: int, cursor: str | None) -> TimeWindow:
    return TimeWindow(as_utc(since), as_utc(until), limit, _decode_cursor(cursor))


def _next(rows: list[ReadingRecord] | list[HealthRecord], limit: int) -> str | None:
    if len(rows) < limit:
        return None
    last = rows[-1]
    return _encode_cursor(last.ts, last.id or 0)


def reading_json(r: ReadingRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "sensor": r.sensor,
        "component": r.component,
        "value": r.value,
        "value_type": r.value_type,
        "unit": r.unit,
        "ts": iso(r.ts),
        "received_at": iso(r.received_at),
    }


def health_json(h: HealthRecord) -> dict[str, Any]:
    return {
        "ts": iso(h.ts),
        "received_at": iso(h.received_at),
        "uptime_s": h.uptime_s,
        "free_heap_bytes": h.free_heap_bytes,
        "rssi_dbm": h.rssi_dbm,
        "connection_type": h.connection_type,
        "readings_sent": h.readings_sent,
        "readings_dropped": h.readings_dropped,
        "battery_pct": h.battery_pct,
        "extra": h.extra,
    }


def sensor_json(s: SensorRecord) -> dict[str, Any]:
    return {
        "device_id": s.device_id,
        "component": s.component,
        "name": s.name,
        "value_type": s.value_type,
        "unit": s.unit,
        "created_at": iso(s.created_at),
        "updated_at": iso(s.updated_at),
    }


def component_json(c: ComponentRecord) -> dict[str, Any]:
    return {
        "id": c.id,
        "profile": c.profile,
        "created_at": iso(c.created_at),
        "updated_at": iso(c.updated_at),
        "sensors": [sensor_json(s) for s in c.sensors],
    }


def build_router() -> APIRouter:
    r = APIRouter(dependencies=[READ], tags=["data"])

    @r.get("/devices/{device_id}/readings", response_model=Page)
    async def readings(
        device_id: str,
        request: Request,
        sensor: Annotated[str | None, Query(max_length=128)] = None,
        component: Annotated[str | None, Query(max_length=128)] = None,
        since: Since = None,
        until: Until = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Page:
        """Readings of a device, newest first, filtered by sensor, component and time."""
        ctx = context(request)
        await ctx.devices.get(device_id)
        rows = await ctx.data.readings(
            device_id, _window(since, until, limit, cursor), sensor=sensor, component=component
        )
        return Page(data=[reading_json(row) for row in rows], next_cursor=_next(rows, limit))

    @r.get("/devices/{device_id}/health", response_model=Page)
    async def health(
        device_id: str,
        request: Request,
        since: Since = None,
        until: Until = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Page:
        """Health reports of a device, newest first."""
        ctx = context(request)
        await ctx.devices.get(device_id)
        rows = await ctx.data.health_history(device_id, _window(since, until, limit, cursor))
        return Page(data=[health_json(row) for row in rows], next_cursor=_next(rows, limit))

    @r.get("/devices/{device_id}/health/latest", response_model=One)
    async def latest(device_id: str, request: Request) -> One:
        """The newest health report (``data`` is null until the device sent one)."""
        ctx = context(request)
        await ctx.devices.get(device_id)
        found = await ctx.data.latest_health(device_id)
        return One(data=None if found is None else health_json(found))

    @r.get("/devices/{device_id}/health/summary", response_model=One)
    async def summary(
        device_id: str,
        request: Request,
        window: Annotated[str, Query(description="e.g. 15m, 1h, 7d")] = "1h",
    ) -> One:
        """min, max and mean of each numeric health field over the last `window`."""
        ctx = context(request)
        await ctx.devices.get(device_id)
        since = utcnow() - parse_duration(window)
        stats = await ctx.data.health_summary(device_id, since)
        return One(data={"window": window, "since": iso(since), **stats})

    @r.get("/devices/{device_id}/components", response_model=Many)
    async def components(device_id: str, request: Request) -> Many:
        """Components the device announced, with their sensors."""
        ctx = context(request)
        await ctx.devices.get(device_id)
        return Many(data=[component_json(c) for c in await ctx.data.components_of(device_id)])

    @r.get("/sensors", response_model=Many)
    async def sensors(
        request: Request,
        device: Annotated[str | None, Query(max_length=64)] = None,
        value_type: Literal["number", "boolean", "string"] | None = None,
        component: Annotated[str | None, Query(max_length=128)] = None,
        limit: Limit = 1000,
        offset: Offset = 0,
    ) -> Many:
        """Sensors (typed data channels) across devices, filtered."""
        found = await context(request).data.sensors(
            device_id=device, value_type=value_type, component=component, limit=limit, offset=offset
        )
        return Many(data=[sensor_json(s) for s in found])

    return r
