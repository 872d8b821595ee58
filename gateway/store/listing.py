"""SQL for the device listing and summary: filters, order, keyset pages, counts.

Receives a `DeviceQuery` whose values the API or CLI already parsed, and the sort rules of
`gateway.core.listing`; hands the `Store` the clauses it executes and the `Cursor` of a
page's last row. Every filter is an indexed column or an indexed association table
(``device_tags``, ``device_locations``), except ``search`` (a substring of name or id,
which no B-tree index serves).

Order: the sort keys, then ``id``; empty values last in both directions (``NULLS LAST``,
which SQLite >= 3.30 and PostgreSQL both understand), so that the keyset condition of a
cursor means the same on both databases.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Column, Row, Table, and_, case, false, func, literal, or_, select, true
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.core.lifecycle import DeviceStatus
from gateway.core.listing import SORT_FIELDS, Cursor, CursorValue, descending, field_of
from gateway.core.presence import Connection
from gateway.core.records import DeviceQuery, DeviceSummary
from gateway.store.credentials import latest_valid_not_after
from gateway.store.models import Device, DeviceLocation, DeviceTag

devices = cast(Table, Device.__table__)
device_tags = cast(Table, DeviceTag.__table__)
device_locations = cast(Table, DeviceLocation.__table__)

SUMMARY_GROUPS_MAX = 100  # values listed per free-form field (application, model, firmware)
EXPIRY_WINDOWS = {"7d": timedelta(days=7), "30d": timedelta(days=30)}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def sort_column(field: str) -> Column[Any]:
    """The column a sort field orders by (``name`` by its lower-case copy)."""
    return devices.c["name_lower" if field == "name" else field]


def conditions(query: DeviceQuery) -> Any:
    """The WHERE clause of the query's filters (its order and page aside)."""
    c = devices.c
    where: list[Any] = []
    if query.search:
        pattern = f"%{_escape_like(query.search.lower())}%"
        where.append(
            or_(c.name_lower.like(pattern, escape="\\"), func.lower(c.id).like(pattern, escape="\\"))
        )
    if query.blocked == "hide":
        where.append(c.blocked.is_(False))
    elif query.blocked == "only":
        where.append(c.blocked.is_(True))
    if query.status is not None:
        where.append(c.status == query.status.value)
    if query.connection is not None:
        where.append(c.connection == query.connection.value)
    for tag in query.tags:
        where.append(c.id.in_(select(device_tags.c.device_id).where(device_tags.c.tag == tag)))
    for location in query.location_ids:
        where.append(
            c.id.in_(select(device_locations.c.device_id).where(device_locations.c.location_id == location))
        )
    for name in ("application", "manufacturer", "model"):
        value = getattr(query, name)
        if value is not None:
            where.append(c[name] == value)
    if query.cert_expires_before is not None:
        newest = latest_valid_not_after().subquery()
        where.append(
            c.id.in_(select(newest.c.subject).where(newest.c.not_after <= query.cert_expires_before))
        )
    if query.last_seen_before is not None:
        where.append(c.last_seen_at < query.last_seen_before)
    return and_(true(), *where)


def order_by(sort: tuple[str, ...]) -> list[Any]:
    order: list[Any] = []
    for key in sort:
        column = sort_column(field_of(key))
        clause = column.desc() if descending(key) else column.asc()
        order.append(clause.nulls_last() if SORT_FIELDS[field_of(key)][1] else clause)
    order.append(devices.c.id.asc())
    return order


def _beyond(key: str, value: CursorValue) -> Any:
    """Rows strictly after `value` in the order of `key` (empty values come last)."""
    column = sort_column(field_of(key))
    nullable = SORT_FIELDS[field_of(key)][1]
    if value is None:
        return false()  # nothing sorts after an empty value but other empty values (ties)
    bound = literal(value, column.type)  # typed: booleans and times compare as the column stores them
    beyond = column < bound if descending(key) else column > bound
    return or_(beyond, column.is_(None)) if nullable else beyond


def _same(key: str, value: CursorValue) -> Any:
    column = sort_column(field_of(key))
    return column.is_(None) if value is None else column == literal(value, column.type)


def after(cursor: Cursor) -> Any:
    """Rows after the cursor's row in its order: the keyset condition of the next page."""
    branches = []
    ties: list[Any] = []
    for key, value in zip(cursor.sort, cursor.values, strict=True):
        branches.append(and_(*ties, _beyond(key, value)))
        ties.append(_same(key, value))
    branches.append(and_(*ties, devices.c.id > cursor.last_id))
    condition = or_(*branches)
    # The same condition again as a plain range on the first key, for the planner to seek by.
    first_key, first = cursor.sort[0], cursor.values[0]
    column = sort_column(field_of(first_key))
    if first is None:
        return and_(column.is_(None), condition)
    if not SORT_FIELDS[field_of(first_key)][1]:
        bound = literal(first, column.type)
        return and_(column <= bound if descending(first_key) else column >= bound, condition)
    return condition


def cursor_of(row: Row[Any], sort: tuple[str, ...]) -> Cursor:
    """The cursor that continues after `row` (a full devices row)."""
    values = tuple(row._mapping[sort_column(field_of(key)).name] for key in sort)
    return Cursor(sort, values, row.id)


async def summary(conn: AsyncConnection, where: Any, now: datetime) -> DeviceSummary:
    c = devices.c
    states = (
        await conn.execute(
            select(c.status, c.connection, c.blocked, func.count())
            .where(where)
            .group_by(c.status, c.connection, c.blocked)
        )
    ).all()
    status = dict.fromkeys((s.value for s in DeviceStatus), 0)
    connection = dict.fromkeys((s.value for s in Connection), 0)
    blocked = total = 0
    for row_status, row_connection, row_blocked, count in states:
        status[row_status] = status.get(row_status, 0) + count
        connection[row_connection] = connection.get(row_connection, 0) + count
        blocked += count if row_blocked else 0
        total += count

    async def groups(column: Column[Any]) -> list[tuple[str | None, int]]:
        counted = func.count().label("n")
        rows = await conn.execute(
            select(column, counted)
            .where(where)
            .group_by(column)
            .order_by(counted.desc(), column.asc().nulls_last())
            .limit(SUMMARY_GROUPS_MAX)
        )
        return [(value, int(count)) for value, count in rows]

    newest = latest_valid_not_after().subquery()
    horizons = {label: now + window for label, window in EXPIRY_WINDOWS.items()}
    expiring = (
        await conn.execute(
            select(
                *(
                    func.coalesce(func.sum(case((newest.c.not_after <= moment, 1), else_=0)), 0)
                    for moment in horizons.values()
                )
            )
            .select_from(devices.join(newest, newest.c.subject == c.id))
            .where(where, newest.c.not_after <= max(horizons.values()))
        )
    ).one()
    return DeviceSummary(
        total=total,
        status=status,
        connection=connection,
        blocked=blocked,
        application=await groups(c.application),
        model=await groups(c.model),
        firmware_version=await groups(c.firmware_version),
        certificates_expiring={label: int(n) for label, n in zip(horizons, expiring, strict=True)},
    )
