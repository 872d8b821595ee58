"""Device profiles in the registry, the devices that have one, and what those devices announced.

Receives ids and `ProfileSpec` values the service already checked (`gateway.core.profiles`);
hands back `ProfileRecord` values with the number of devices that have the profile
(``devices.profile_id``, indexed), the settings of those devices (to check a new schema
against), and pages of them with their announced components (``components`` and
``sensors``, as ingest wrote them) for the conformance check. Deleting a profile in use is
refused unless forced; forced, those devices lose their profile in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.core import device_fields
from gateway.core.profiles import ProfileRecord, ProfileSpec, parse_components
from gateway.core.records import ComponentRecord, SensorRecord
from gateway.core.settings_schema import SettingsSchema
from gateway.errors import Conflict, NotFound
from gateway.store.models import ComponentRow, Device, DeviceProfile, SensorRow

profiles = cast(Table, DeviceProfile.__table__)
devices = cast(Table, Device.__table__)
components = cast(Table, ComponentRow.__table__)
sensors = cast(Table, SensorRow.__table__)


def not_found(profile_id: str) -> NotFound:
    return NotFound(f"device profile {profile_id} not found", code="profile_not_found")


class ProfileStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, profile_id: str, spec: ProfileSpec, now: datetime) -> ProfileRecord:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(profiles).values(id=profile_id, created_at=now, **_values(spec, now))
                )
                return await self._get(conn, profile_id)
        except IntegrityError as exc:
            raise Conflict(f"device profile {profile_id} already exists", code="profile_exists") from exc

    async def get(self, profile_id: str) -> ProfileRecord:
        async with self.engine.connect() as conn:
            return await self._get(conn, profile_id)

    async def _get(self, conn: AsyncConnection, profile_id: str) -> ProfileRecord:
        row = (await conn.execute(select(profiles).where(profiles.c.id == profile_id))).one_or_none()
        if row is None:
            raise not_found(profile_id)
        return (await self._records(conn, [row]))[0]

    async def page(self, limit: int, offset: int) -> tuple[list[ProfileRecord], int]:
        """Profiles by name (any case), then id, with their device counts; and how many there are."""
        async with self.engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(profiles))).scalar_one()
            rows = (
                await conn.execute(
                    select(profiles)
                    .order_by(profiles.c.name_lower, profiles.c.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
            return await self._records(conn, rows), int(total)

    async def replace(self, profile_id: str, spec: ProfileSpec, now: datetime) -> ProfileRecord:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(profiles).where(profiles.c.id == profile_id).values(**_values(spec, now))
            )
            if result.rowcount == 0:
                raise not_found(profile_id)
            return await self._get(conn, profile_id)

    async def delete(self, profile_id: str, now: datetime, *, force: bool) -> list[str]:
        """Delete a profile; the devices that lost it (only with `force`: else `Conflict`)."""
        async with self.engine.begin() as conn:
            await self._get(conn, profile_id)
            having = list(
                (
                    await conn.execute(
                        select(devices.c.id).where(devices.c.profile_id == profile_id).order_by(devices.c.id)
                    )
                ).scalars()
            )
            if having and not force:
                raise Conflict(
                    f"{len(having)} device(s) have profile {profile_id}; "
                    "pass force=true to delete it and clear their profile_id",
                    code="profile_in_use",
                )
            if having:
                await conn.execute(
                    update(devices)
                    .where(devices.c.profile_id == profile_id)
                    .values(profile_id=None, updated_at=now)
                )
            await conn.execute(delete(profiles).where(profiles.c.id == profile_id))
            return having

    async def settings_of_devices(self, profile_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(device id, settings) of every device that has the profile, by id."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(devices.c.id, devices.c.settings_json)
                .where(devices.c.profile_id == profile_id)
                .order_by(devices.c.id)
            )
            return [(row.id, json.loads(row.settings_json) if row.settings_json else {}) for row in rows]

    async def announced(
        self, profile_id: str, limit: int, offset: int
    ) -> tuple[list[tuple[str, list[ComponentRecord]]], int]:
        """A page of the devices that have the profile (by id), each with the components it
        announced; and how many devices have it."""
        async with self.engine.connect() as conn:
            total = (
                await conn.execute(
                    select(func.count()).select_from(devices).where(devices.c.profile_id == profile_id)
                )
            ).scalar_one()
            ids = list(
                (
                    await conn.execute(
                        select(devices.c.id)
                        .where(devices.c.profile_id == profile_id)
                        .order_by(devices.c.id)
                        .limit(limit)
                        .offset(offset)
                    )
                ).scalars()
            )
            if not ids:
                return [], int(total)
            found_sensors: dict[tuple[str, str], list[SensorRecord]] = {}
            for r in await conn.execute(select(sensors).where(sensors.c.device_id.in_(ids))):
                record = SensorRecord(
                    r.device_id, r.component or None, r.name, r.value_type, r.unit, r.created_at, r.updated_at
                )
                found_sensors.setdefault((r.device_id, r.component), []).append(record)
            by_device: dict[str, list[ComponentRecord]] = {device_id: [] for device_id in ids}
            rows = await conn.execute(
                select(components).where(components.c.device_id.in_(ids)).order_by(components.c.id)
            )
            for c in rows:
                by_device[c.device_id].append(
                    ComponentRecord(
                        c.device_id,
                        c.id,
                        c.profile,
                        c.created_at,
                        c.updated_at,
                        tuple(found_sensors.get((c.device_id, c.id), ())),
                    )
                )
            return [(device_id, by_device[device_id]) for device_id in ids], int(total)

    async def _records(self, conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[ProfileRecord]:
        ids = [row.id for row in rows]
        counts: dict[str, int] = {}
        if ids:
            counted = await conn.execute(
                select(devices.c.profile_id, func.count())
                .where(devices.c.profile_id.in_(ids))
                .group_by(devices.c.profile_id)
            )
            counts = {profile_id: int(n) for profile_id, n in counted}
        return [_record(row, counts.get(row.id, 0)) for row in rows]


def _values(spec: ProfileSpec, now: datetime) -> dict[str, Any]:
    schema = spec.settings_schema
    return {
        "name": spec.name,
        "name_lower": spec.name.lower(),
        "description": spec.description,
        "components_json": json.dumps(spec.components_json(), ensure_ascii=False, separators=(",", ":")),
        "settings_schema_json": None if schema is None else device_fields.dump_json(schema.as_json()),
        "writable_json": json.dumps(list(spec.writable)),
        "updated_at": now,
    }


def _record(row: Row[Any], device_count: int) -> ProfileRecord:
    schema = (
        None
        if row.settings_schema_json is None
        else SettingsSchema.parse(json.loads(row.settings_schema_json))
    )
    spec = ProfileSpec(
        name=row.name,
        description=row.description,
        components=parse_components(json.loads(row.components_json)),
        settings_schema=schema,
        writable=tuple(json.loads(row.writable_json)),
    )
    return ProfileRecord(row.id, spec, row.created_at, row.updated_at, device_count)
