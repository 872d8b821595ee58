"""Device groups in the registry: the group rows, a static group's members, and member counts.

Receives ids and `GroupSpec` values the service already checked (`gateway.core.groups`);
hands back `GroupRecord` values with their member count: a static group's member rows, a
dynamic group's matches now (through the device listing's own conditions, `listing.count`).
Members reference devices with ``ON DELETE CASCADE``: a deleted device leaves every group,
a deleted group takes its member rows along. Members are added only if the devices exist,
checked in the same transaction as the insert.
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
from gateway.core.groups import GroupFilter, GroupKind, GroupRecord, GroupSpec
from gateway.errors import Conflict, FieldRejected, NotFound
from gateway.store import listing
from gateway.store.models import Device, DeviceGroup, DeviceGroupMember

groups = cast(Table, DeviceGroup.__table__)
members = cast(Table, DeviceGroupMember.__table__)
devices = cast(Table, Device.__table__)


def not_found(group_id: str) -> NotFound:
    return NotFound(f"device group {group_id} not found", code="group_not_found")


class GroupStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sqlite = engine.dialect.name == "sqlite"

    async def create(
        self, group_id: str, spec: GroupSpec, now: datetime, device_ids: Sequence[str] = ()
    ) -> GroupRecord:
        """A new group (and a static one's first members); `Conflict` when the id is taken."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(groups).values(id=group_id, created_at=now, **_values(spec, now)))
                await self._add(conn, group_id, device_ids, now)
                return await self._get(conn, group_id)
        except IntegrityError as exc:
            raise Conflict(f"device group {group_id} already exists", code="group_exists") from exc

    async def get(self, group_id: str) -> GroupRecord:
        async with self.engine.connect() as conn:
            return await self._get(conn, group_id)

    async def _get(self, conn: AsyncConnection, group_id: str) -> GroupRecord:
        row = (await conn.execute(select(groups).where(groups.c.id == group_id))).one_or_none()
        if row is None:
            raise not_found(group_id)
        return (await self._records(conn, [row]))[0]

    async def page(self, limit: int, offset: int) -> tuple[list[GroupRecord], int]:
        """Groups by name (any case), then id, with their member counts; and how many there are."""
        async with self.engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(groups))).scalar_one()
            rows = (
                await conn.execute(
                    select(groups).order_by(groups.c.name_lower, groups.c.id).limit(limit).offset(offset)
                )
            ).all()
            return await self._records(conn, rows), int(total)

    async def replace(self, group_id: str, spec: GroupSpec, now: datetime) -> GroupRecord:
        """New name, description and filter (the kind is the service's to keep)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(groups).where(groups.c.id == group_id).values(**_values(spec, now))
            )
            if result.rowcount == 0:
                raise not_found(group_id)
            return await self._get(conn, group_id)

    async def delete(self, group_id: str) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(groups).where(groups.c.id == group_id))
            if result.rowcount == 0:
                raise not_found(group_id)

    async def add_members(self, group_id: str, device_ids: Sequence[str], now: datetime) -> list[str]:
        """Add devices to a static group; the ids that were not members already, sorted."""
        async with self.engine.begin() as conn:
            await self._get(conn, group_id)
            added = await self._add(conn, group_id, device_ids, now)
            await conn.execute(update(groups).where(groups.c.id == group_id).values(updated_at=now))
            return added

    async def remove_member(self, group_id: str, device_id: str, now: datetime) -> None:
        async with self.engine.begin() as conn:
            await self._get(conn, group_id)
            result = await conn.execute(
                delete(members).where(members.c.group_id == group_id, members.c.device_id == device_id)
            )
            if result.rowcount == 0:
                raise NotFound(f"device {device_id} is not a member of {group_id}", code="member_not_found")
            await conn.execute(update(groups).where(groups.c.id == group_id).values(updated_at=now))

    async def _add(
        self, conn: AsyncConnection, group_id: str, device_ids: Sequence[str], now: datetime
    ) -> list[str]:
        wanted = sorted(set(device_ids))
        if not wanted:
            return []
        found = set((await conn.execute(select(devices.c.id).where(devices.c.id.in_(wanted)))).scalars())
        missing = [device_id for device_id in wanted if device_id not in found]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise FieldRejected(f"no such device(s): {shown}", path="device_ids", code="unknown_device")
        present = set(
            (
                await conn.execute(
                    select(members.c.device_id).where(
                        members.c.group_id == group_id, members.c.device_id.in_(wanted)
                    )
                )
            ).scalars()
        )
        added = [device_id for device_id in wanted if device_id not in present]
        if added:
            await conn.execute(
                insert(members), [{"group_id": group_id, "device_id": d, "added_at": now} for d in added]
            )
        return added

    async def _records(self, conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[GroupRecord]:
        """Rows as records with member counts: static ones in one query, dynamic ones each their own."""
        static = [row.id for row in rows if row.kind == GroupKind.STATIC.value]
        counts: dict[str, int] = {}
        if static:
            counted = await conn.execute(
                select(members.c.group_id, func.count())
                .where(members.c.group_id.in_(static))
                .group_by(members.c.group_id)
            )
            counts = {group_id: int(n) for group_id, n in counted}
        records = []
        for row in rows:
            spec = _spec(row)
            if spec.filter is not None:
                count = await listing.count(conn, spec.filter.query(), sqlite=self._sqlite)
            else:
                count = counts.get(row.id, 0)
            records.append(GroupRecord(row.id, spec, row.created_at, row.updated_at, count))
        return records


def _values(spec: GroupSpec, now: datetime) -> dict[str, Any]:
    return {
        "name": spec.name,
        "name_lower": spec.name.lower(),
        "description": spec.description,
        "kind": spec.kind.value,
        "filter_json": None if spec.filter is None else device_fields.dump_json(spec.filter.as_json()),
        "updated_at": now,
    }


def _spec(row: Row[Any]) -> GroupSpec:
    saved = None if row.filter_json is None else GroupFilter.parse(json.loads(row.filter_json))
    return GroupSpec(row.name, row.description, GroupKind(row.kind), saved)
