"""SQL for the device listing and summary: filters, order, keyset pages, counts.

Receives a `DeviceQuery` whose values the API or CLI already parsed, and the sort rules of
`gateway.core.listing`; hands the `Store` the rows of a page, its total and the `Cursor`
after its last row, or a `DeviceSummary`. Every filter is an indexed column or an indexed
association table (``device_tags``, ``device_locations``); ``search`` (a substring of name
or id, which no B-tree index can seek) reads the covering index ``ix_devices_name``.

``group`` (``?group=``, a `GroupScope`) narrows to a static group's members (the indexed
``device_group_members``), or ANDs a dynamic group's saved filters with the query's own,
column by column under the same plan as the query's.

Order: the sort keys, then ``id``; empty values last in both directions (``NULLS LAST``,
which SQLite >= 3.30 and PostgreSQL both understand), so that the keyset condition of a
cursor means the same on both databases.

Plan (SQLite, in `page`): its planner has no histograms and takes every equality for a
selective one, so ``status=active`` (most of a fleet) would sort tens of thousands of rows
for one page. So the rowids of up to `_FEW` matches are read first: when that is all of
them, they are the total and the page's candidates; when there are more, they are
counted. Either way the page then walks the first sort key's index (the filters, or the
candidates, hidden from the planner by a unary ``+``) and stops after ``limit`` rows,
unless sorting the matches is cheaper (`walks`): 4,900 candidates of 100,000 devices, 4 ms
walked against 12 ms sorted. PostgreSQL plans from its statistics and gets no hints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Row,
    Table,
    and_,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal

from gateway.core.lifecycle import DeviceStatus
from gateway.core.listing import SORT_FIELDS, Cursor, CursorValue, descending, field_of
from gateway.core.presence import Connection
from gateway.core.records import DeviceQuery, DeviceSummary
from gateway.store.models import Device, DeviceGroupMember, DeviceLocation, DeviceTag

devices = cast(Table, Device.__table__)
device_tags = cast(Table, DeviceTag.__table__)
device_locations = cast(Table, DeviceLocation.__table__)
group_members = cast(Table, DeviceGroupMember.__table__)

_STATE = frozenset({"status", "connection", "blocked"})
_FEW = 5000  # matches up to which a page is found by their rowids
SUMMARY_GROUPS_MAX = 100  # values listed per free-form field (application, model, firmware)
EXPIRY_WINDOWS = {"7d": timedelta(days=7), "30d": timedelta(days=30)}


class _Unindexed(ColumnElement[Any]):
    """A column SQLite must not use an index for (unary ``+``); plain SQL elsewhere."""

    inherit_cache = True
    # The cache key: SQLAlchemy's own protocol is a class-level list.
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _compile_unindexed(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(_Unindexed, "sqlite")
def _compile_unindexed_sqlite(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def sort_column(field: str) -> Column[Any]:
    """The column a sort field orders by (``name`` by its lower-case copy)."""
    return devices.c["name_lower" if field == "name" else field]


def _search(name: Any, device_id: Any, text: str, *, sqlite: bool) -> Any:
    """Name or id contains `text`, in any case. Names are matched by their lower-case copy;
    ids are ASCII, which SQLite's LIKE already folds (no lower() call per row)."""
    pattern = f"%{_escape_like(text.lower())}%"
    in_id = device_id.like(pattern, escape="\\") if sqlite else device_id.ilike(pattern, escape="\\")
    return or_(name.like(pattern, escape="\\"), in_id)


def _ids(values: Sequence[object]) -> Any:
    """The values as a one-parameter list (SQLite's json_each), not one parameter each."""
    return select(literal_column("value")).select_from(func.json_each(json.dumps(list(values))))


def _narrows(query: DeviceQuery) -> bool:
    """Has the query a filter besides the state columns?"""
    group = query.group
    if group is not None and (group.saved is None or _narrows(group.saved)):
        return True
    return bool(
        query.search
        or query.tags
        or query.location_ids
        # `is not None`, as `_where` tests them: an empty value is a filter (that matches none)
        or query.application is not None
        or query.manufacturer is not None
        or query.model is not None
        or query.cert_expires_before
        or query.last_seen_before
    )


def _filters(query: DeviceQuery) -> bool:
    return (
        _narrows(query)
        or query.blocked != "all"
        or query.status is not None
        or query.connection is not None
        or (query.group is not None and query.group.saved is not None and _filters(query.group.saved))
    )


def conditions(query: DeviceQuery, *, sqlite: bool, walk: bool = False) -> Any:
    """The WHERE clause of the query's filters (its order and page aside).

    On SQLite, with `walk` no filter may pick an index, so that it walks the sort order
    (`page`); and the state columns (status, connection, blocked: a few values each) seek
    an index only when no other filter can, since a state matches much of a fleet.
    """
    narrower = _narrows(query)

    def c(name: str) -> Any:
        column = devices.c[name]
        hidden = walk or (narrower and name in _STATE)
        return _Unindexed(column) if sqlite and hidden else column

    where = _where(query, c, sqlite=sqlite)
    group = query.group
    if group is not None and group.saved is None:
        where.append(
            c("id").in_(select(group_members.c.device_id).where(group_members.c.group_id == group.group_id))
        )
    elif group is not None and group.saved is not None:
        where += _where(group.saved, c, sqlite=sqlite)
    return and_(true(), *where)


def _where(query: DeviceQuery, c: Any, *, sqlite: bool) -> list[Any]:
    """The conditions of the query's own filters, over the columns `c` hands out."""
    where: list[Any] = []
    if query.search:
        where.append(_search(c("name_lower"), c("id"), query.search, sqlite=sqlite))
    if query.blocked == "hide":
        where.append(c("blocked").is_(False))
    elif query.blocked == "only":
        where.append(c("blocked").is_(True))
    if query.status is not None:
        where.append(c("status") == query.status.value)
    if query.connection is not None:
        where.append(c("connection") == query.connection.value)
    for tag in query.tags:
        where.append(c("id").in_(select(device_tags.c.device_id).where(device_tags.c.tag == tag)))
    for location in query.location_ids:
        where.append(
            c("id").in_(
                select(device_locations.c.device_id).where(device_locations.c.location_id == location)
            )
        )
    for name in ("application", "manufacturer", "model"):
        value = getattr(query, name)
        if value is not None:
            where.append(c(name) == value)
    if query.cert_expires_before is not None:  # NULL (no valid certificate) never matches
        where.append(c("cert_not_after") <= query.cert_expires_before)
    if query.last_seen_before is not None:
        where.append(c("last_seen_at") < query.last_seen_before)
    return where


async def count(conn: AsyncConnection, query: DeviceQuery, *, sqlite: bool) -> int:
    """How many devices the query's filters match (a dynamic group's members, say)."""
    where = conditions(query, sqlite=sqlite)
    return int((await conn.execute(select(func.count()).select_from(devices).where(where))).scalar_one())


def walks(total: int, table_rows: int, rows_wanted: int) -> bool:
    """Is walking the sort order cheaper than sorting every match?

    Walking visits about ``rows_wanted * table_rows / total`` rows; sorting costs about
    ``total``: walk when ``total ** 2 >= rows_wanted * table_rows``.
    """
    return total > 0 and total * total >= rows_wanted * table_rows


async def page(
    conn: AsyncConnection, query: DeviceQuery, *, sqlite: bool
) -> tuple[list[Row[Any]], int, Cursor | None]:
    """The rows of one page (in order), the total the filters match, and the next page's cursor."""
    where = conditions(query, sqlite=sqlite)
    if not sqlite:
        total = (await conn.execute(select(func.count()).select_from(devices).where(where))).scalar_one()
    elif not _filters(query):  # every device: count, then walk the order
        total = (await conn.execute(select(func.count()).select_from(devices))).scalar_one()
    else:
        # Few matches: their rowids are the total and the page's candidates (one pass over the
        # filters). Many: count them, then walk the sort order or sort them, whichever is cheaper.
        rowid: ColumnElement[int] = literal_column("devices.rowid")
        probe = select(rowid).select_from(devices).where(where).limit(_FEW + 1)
        found = (await conn.execute(probe)).scalars().all()
        wanted = query.offset + query.limit + 1
        if len(found) <= _FEW:
            total = len(found)
            listed: ColumnElement[int] = rowid
            if total >= wanted:  # else walking cannot win (the table has at least `total` rows)
                table_rows = (await conn.execute(select(func.count()).select_from(devices))).scalar_one()
                if walks(total, table_rows, wanted):  # each row of the order checked against them
                    listed = _Unindexed(rowid)
            where = listed.in_(_ids(found))
        else:
            counted = select(func.count()).select_from(devices).where(where).scalar_subquery()
            everything = select(func.count()).select_from(devices).scalar_subquery()
            total, table_rows = (await conn.execute(select(counted, everything))).one()
            if walks(total, table_rows, wanted):
                where = conditions(query, sqlite=sqlite, walk=True)
    if query.after is not None:
        where = and_(after(query.after), where)
    rows = (
        await conn.execute(
            select(devices)
            .where(where)
            .order_by(*order_by(query.sort))
            .limit(query.limit + 1)  # one more: is there a next page?
            .offset(query.offset)
        )
    ).all()
    more, rows = len(rows) > query.limit, rows[: query.limit]
    return list(rows), int(total), cursor_of(rows[-1], query.sort) if more else None


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


async def summary(conn: AsyncConnection, query: DeviceQuery, now: datetime, *, sqlite: bool) -> DeviceSummary:
    c = devices.c
    where = conditions(query, sqlite=sqlite)
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

    horizons = [now + window for window in EXPIRY_WINDOWS.values()]
    expiring = (
        await conn.execute(
            select(*(func.count().filter(c.cert_not_after <= moment) for moment in horizons)).where(
                where, c.cert_not_after <= max(horizons)
            )
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
        certificates_expiring={label: int(n) for label, n in zip(EXPIRY_WINDOWS, expiring, strict=True)},
    )
