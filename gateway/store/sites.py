"""Sites in the registry, and the devices that name them in their location ids.

Receives ids and `SiteSpec` values the service already checked (`gateway.core.sites`); hands
back `SiteRecord` values with the number of devices placed there (``device_locations``, read
through its ``location_id`` index). Deleting a site in use is refused unless forced; forced,
the site leaves those devices' location ids (and their ``updated_at`` moves) in the same
transaction that deletes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.core import device_fields
from gateway.core.sites import SiteRecord, SiteSpec
from gateway.errors import Conflict, NotFound
from gateway.store.models import Device, DeviceLocation, Site

sites = cast(Table, Site.__table__)
device_locations = cast(Table, DeviceLocation.__table__)
devices = cast(Table, Device.__table__)


def not_found(site_id: str) -> NotFound:
    return NotFound(f"site {site_id} not found", code="site_not_found")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class SiteStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, site_id: str, spec: SiteSpec, now: datetime) -> SiteRecord:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(sites).values(id=site_id, created_at=now, **_values(spec, now)))
                return await self._get(conn, site_id)
        except IntegrityError as exc:
            raise Conflict(f"site {site_id} already exists", code="site_exists") from exc

    async def get(self, site_id: str) -> SiteRecord:
        async with self.engine.connect() as conn:
            return await self._get(conn, site_id)

    async def _get(self, conn: AsyncConnection, site_id: str) -> SiteRecord:
        row = (await conn.execute(select(sites).where(sites.c.id == site_id))).one_or_none()
        if row is None:
            raise not_found(site_id)
        return (await self._records(conn, [row]))[0]

    async def page(self, limit: int, offset: int, search: str | None = None) -> tuple[list[SiteRecord], int]:
        """Sites by name (any case), then id, optionally with `search` in name or id; and how many."""
        where: list[Any] = []
        if search:
            pattern = f"%{_escape_like(search.lower())}%"
            where.append(
                or_(sites.c.name_lower.like(pattern, escape="\\"), sites.c.id.ilike(pattern, escape="\\"))
            )
        async with self.engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(sites).where(*where))).scalar_one()
            rows = (
                await conn.execute(
                    select(sites)
                    .where(*where)
                    .order_by(sites.c.name_lower, sites.c.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            return await self._records(conn, rows), int(total)

    async def replace(self, site_id: str, spec: SiteSpec, now: datetime) -> SiteRecord:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(sites).where(sites.c.id == site_id).values(**_values(spec, now))
            )
            if result.rowcount == 0:
                raise not_found(site_id)
            return await self._get(conn, site_id)

    async def delete(self, site_id: str, now: datetime, *, force: bool) -> list[str]:
        """Delete a site; the devices it was taken out of (only with `force`: else `Conflict`)."""
        async with self.engine.begin() as conn:
            await self._get(conn, site_id)
            placed = list(
                (
                    await conn.execute(
                        select(device_locations.c.device_id)
                        .where(device_locations.c.location_id == site_id)
                        .order_by(device_locations.c.device_id)
                    )
                ).scalars()
            )
            if placed and not force:
                raise Conflict(
                    f"site {site_id} is a location of {len(placed)} device(s); "
                    "pass force=true to delete it and take it out of their location ids",
                    code="site_in_use",
                )
            if placed:
                here = select(device_locations.c.device_id).where(device_locations.c.location_id == site_id)
                await conn.execute(update(devices).where(devices.c.id.in_(here)).values(updated_at=now))
                await conn.execute(delete(device_locations).where(device_locations.c.location_id == site_id))
            await conn.execute(delete(sites).where(sites.c.id == site_id))
            return placed

    async def missing(self, site_ids: Sequence[str]) -> list[str]:
        """Those of `site_ids` that name no site, sorted."""
        wanted = sorted(set(site_ids))
        if not wanted:
            return []
        async with self.engine.connect() as conn:
            found = set((await conn.execute(select(sites.c.id).where(sites.c.id.in_(wanted)))).scalars())
        return [site_id for site_id in wanted if site_id not in found]

    async def _records(self, conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[SiteRecord]:
        ids = [row.id for row in rows]
        counts: dict[str, int] = {}
        if ids:
            counted = await conn.execute(
                select(device_locations.c.location_id, func.count())
                .where(device_locations.c.location_id.in_(ids))
                .group_by(device_locations.c.location_id)
            )
            counts = {site_id: int(n) for site_id, n in counted}
        return [_record(row, counts.get(row.id, 0)) for row in rows]


def _values(spec: SiteSpec, now: datetime) -> dict[str, Any]:
    return {
        "name": spec.name,
        "name_lower": spec.name.lower(),
        "description": spec.description,
        "address": spec.address,
        "latitude": spec.latitude,
        "longitude": spec.longitude,
        "timezone": spec.timezone,
        "metadata_json": device_fields.dump_json(spec.metadata) if spec.metadata else None,
        "updated_at": now,
    }


def _record(row: Row[Any], device_count: int) -> SiteRecord:
    spec = SiteSpec(
        name=row.name,
        description=row.description,
        address=row.address,
        latitude=row.latitude,
        longitude=row.longitude,
        timezone=row.timezone,
        metadata=json.loads(row.metadata_json) if row.metadata_json else {},
    )
    return SiteRecord(row.id, spec, row.created_at, row.updated_at, device_count)
