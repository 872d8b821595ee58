"""Device data in the registry: readings, health, identification, components and sensors.

Receives batches the ingest writer assembled (plain rows, already validated) and
writes each in one transaction; hands back time-series pages and summaries as
frozen records. Rows for a device that was deleted while its data was queued are
dropped, never allowed to fail the batch.

On SQLite a batch is written in one hop to a writer thread that owns its own
connection (the registry's settings copied onto it): aiosqlite made a hop to its
thread, and so an event-loop turn, for every cursor, statement, fetch and commit
(12 per batch), and ``AsyncConnection.run_sync`` does not change that. Elsewhere
(PostgreSQL) the same statements run through ``run_sync`` on the registry's engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    or_,
    pool,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry

from gateway.core.records import (
    ComponentRecord,
    HealthRecord,
    ReadingRecord,
    SensorRecord,
    TimeWindow,
)
from gateway.store.bulk import BulkInserter
from gateway.store.models import (
    ComponentRow,
    Device,
    HealthLatestRow,
    HealthRow,
    ReadingRow,
    SensorRow,
    UTCDateTime,
)

readings = cast(Table, ReadingRow.__table__)
health = cast(Table, HealthRow.__table__)
health_latest = cast(Table, HealthLatestRow.__table__)
components = cast(Table, ComponentRow.__table__)
sensors = cast(Table, SensorRow.__table__)
devices = cast(Table, Device.__table__)

NO_COMPONENT = ""  # sensors.component for sensors that belong to no component
HEALTH_NUMERIC = (
    "uptime_s",
    "free_heap_bytes",
    "rssi_dbm",
    "readings_sent",
    "readings_dropped",
    "battery_pct",
)


@dataclass
class IngestBatch:
    """Everything one commit writes. Rows are dicts keyed by column name."""

    readings: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, dict[str, str]] = field(default_factory=dict)  # device id -> identification fields
    components: list[dict[str, Any]] = field(default_factory=list)
    sensors: list[dict[str, Any]] = field(default_factory=list)  # named by readings: added if missing
    announced_sensors: list[dict[str, Any]] = field(default_factory=list)  # from announcements: updated
    last_data: dict[str, datetime] = field(default_factory=dict)  # device id -> newest reading receipt
    last_seen: dict[str, datetime] = field(default_factory=dict)

    def device_ids(self) -> set[str]:
        ids = {row["device_id"] for row in self.readings} | {row["device_id"] for row in self.health}
        ids |= {row["device_id"] for row in self.components} | {row["device_id"] for row in self.sensors}
        ids |= {row["device_id"] for row in self.announced_sensors}
        return ids | set(self.info) | set(self.last_data) | set(self.last_seen)

    def __len__(self) -> int:
        return len(self.readings) + len(self.health) + len(self.info) + len(self.components)


@dataclass(frozen=True)
class BatchResult:
    stored: int
    dropped_unknown_device: int


class DeviceData:
    """Reads and writes device data on the registry's engine."""

    # Per-connection SQLite settings the writer thread's connection takes from the
    # registry's (journal_mode=WAL is stored in the file itself).
    _COPIED_PRAGMAS = ("synchronous", "foreign_keys", "busy_timeout")

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # Sensors known to exist, so that readings of them cost no upsert: device id ->
        # (the device's created_at, {(component, name)}). The creation time tells a device
        # deleted and registered again under the same id (its sensors went with it).
        self._sensors_seen: dict[str, tuple[datetime, set[tuple[str, str]]]] = {}
        # The SQLite writer thread and its engine, made on first use; None elsewhere.
        database = engine.url.database
        self._threaded = self._dialect == "sqlite" and database not in (None, "", ":memory:")
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._writer: Engine | None = None
        self._writer_ready = asyncio.Lock()
        self._bulk = BulkInserter()  # readings and health rows, in few driver calls on SQLite

    async def close(self) -> None:
        """Close the writer thread and its connection, after the batches already handed to it;
        later batches go through the registry's engine."""
        async with self._writer_ready:
            self._threaded = False
            thread, writer = self._thread, self._writer
            self._thread = self._writer = None
        if thread is not None:
            if writer is not None:  # queued behind the batches in flight: they finish first
                await asyncio.get_running_loop().run_in_executor(thread, writer.dispose)
            thread.shutdown(wait=True)

    def _upsert(self, table: Table) -> Any:
        return (sqlite.insert if self._dialect == "sqlite" else postgresql.insert)(table)

    # --- writing ----------------------------------------------------------------------

    async def write_batch(self, batch: IngestBatch) -> BatchResult:
        """Write `batch` in one transaction; what it stored, and the rows dropped for unknown devices."""
        if self._threaded:
            writer = await self._writer_thread()
            if writer is not None:
                thread, engine = writer
                return await asyncio.get_running_loop().run_in_executor(
                    thread, self._write_in_thread, engine, batch
                )
        async with self.engine.begin() as conn:
            result, known = await conn.run_sync(self._write, batch)
        self._remember_sensors(batch, known)
        return result

    async def _writer_thread(self) -> tuple[concurrent.futures.ThreadPoolExecutor, Engine] | None:
        """The writer thread and its engine, made on first use; None once closed."""
        async with self._writer_ready:
            if not self._threaded:
                return None
            if self._thread is None or self._writer is None:
                async with self.engine.connect() as conn:
                    copied = {
                        name: int((await conn.exec_driver_sql(f"PRAGMA {name}")).scalar_one())
                        for name in self._COPIED_PRAGMAS
                    }
                writer = create_engine(
                    self.engine.url.set(drivername="sqlite+pysqlite"),
                    poolclass=pool.StaticPool,  # one connection, used by the one thread
                    connect_args={"check_same_thread": False},
                )

                @event.listens_for(writer, "connect")
                def _pragmas(dbapi_conn: DBAPIConnection, _: ConnectionPoolEntry) -> None:
                    cursor = dbapi_conn.cursor()
                    for name, value in copied.items():
                        cursor.execute(f"PRAGMA {name}={value}")
                    cursor.close()

                self._writer = writer
                self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ingest-db")
            return self._thread, self._writer

    def _write_in_thread(self, writer: Engine, batch: IngestBatch) -> BatchResult:
        with writer.begin() as conn:
            result, known = self._write(conn, batch)
        self._remember_sensors(batch, known)  # committed: they exist now
        return result

    def _write(self, conn: Connection, batch: IngestBatch) -> tuple[BatchResult, dict[str, datetime]]:
        """The statements of one batch, on a synchronous connection inside its transaction."""
        wanted = batch.device_ids()
        known: dict[str, datetime] = (
            {
                row.id: row.created_at
                for row in conn.execute(
                    select(devices.c.id, devices.c.created_at).where(devices.c.id.in_(wanted))
                )
            }
            if wanted
            else {}
        )
        dropped = _drop_unknown(batch, set(known))
        missing = [row for row in batch.sensors if not self._sensor_seen(known, row)]
        if missing:
            conn.execute(self._upsert(sensors).on_conflict_do_nothing(), missing)
        for row in batch.components:
            stmt = self._upsert(components).values(**row)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["device_id", "id"],
                    set_={"profile": stmt.excluded.profile, "updated_at": stmt.excluded.updated_at},
                )
            )
        for row in batch.announced_sensors:
            stmt = self._upsert(sensors).values(**row)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["device_id", "component", "name"],
                    set_={
                        "value_type": stmt.excluded.value_type,
                        "unit": stmt.excluded.unit,
                        "updated_at": stmt.excluded.updated_at,
                    },
                )
            )
        if batch.readings:
            self._bulk.insert_rows(conn, readings, batch.readings)
        if batch.health:
            self._bulk.insert_rows(conn, health, batch.health)
            self._latest_health(conn, batch.health)
        for device_id, fields in batch.info.items():
            conn.execute(update(devices).where(devices.c.id == device_id).values(**fields))
        for column, values in (("last_data_at", batch.last_data), ("last_seen_at", batch.last_seen)):
            if values:
                conn.execute(
                    update(devices)
                    .where(devices.c.id == bindparam("did"))
                    .values({column: bindparam("at", type_=UTCDateTime())}),
                    [{"did": device_id, "at": at} for device_id, at in values.items()],
                )
        stored = len(batch.readings) + len(batch.health)
        return BatchResult(stored=stored, dropped_unknown_device=dropped), known

    def _sensor_seen(self, known: dict[str, datetime], row: dict[str, Any]) -> bool:
        entry = self._sensors_seen.get(row["device_id"])
        return (
            entry is not None
            and entry[0] == known[row["device_id"]]
            and (row["component"], row["name"]) in entry[1]
        )

    def _remember_sensors(self, batch: IngestBatch, known: dict[str, datetime]) -> None:
        for row in (*batch.sensors, *batch.announced_sensors):
            created_at = known[row["device_id"]]
            entry = self._sensors_seen.get(row["device_id"])
            if entry is None or entry[0] != created_at:
                entry = self._sensors_seen[row["device_id"]] = (created_at, set())
            entry[1].add((row["component"], row["name"]))

    def _latest_health(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        newest: dict[str, dict[str, Any]] = {}
        for row in rows:
            current = newest.get(row["device_id"])
            if current is None or row["ts"] >= current["ts"]:
                newest[row["device_id"]] = row
        for row in newest.values():
            stmt = self._upsert(health_latest).values(**row)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["device_id"],
                    set_={k: getattr(stmt.excluded, k) for k in row if k != "device_id"},
                    where=health_latest.c.ts <= stmt.excluded.ts,
                )
            )

    # --- reading ----------------------------------------------------------------------

    async def readings(
        self, device_id: str, window: TimeWindow, *, sensor: str | None = None, component: str | None = None
    ) -> list[ReadingRecord]:
        conditions = [readings.c.device_id == device_id, *_window(readings, window)]
        if sensor is not None:
            conditions.append(readings.c.sensor == sensor)
        if component is not None:
            conditions.append(readings.c.component == component)
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(readings)
                .where(*conditions)
                .order_by(readings.c.ts.desc(), readings.c.id.desc())
                .limit(window.limit)
            )
            return [_reading(row) for row in rows]

    async def health_history(self, device_id: str, window: TimeWindow) -> list[HealthRecord]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(health)
                .where(health.c.device_id == device_id, *_window(health, window))
                .order_by(health.c.ts.desc(), health.c.id.desc())
                .limit(window.limit)
            )
            return [_health(row, row.id) for row in rows]

    async def latest_health(self, device_id: str) -> HealthRecord | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(health_latest).where(health_latest.c.device_id == device_id))
            ).one_or_none()
        return None if row is None else _health(row, None)

    async def health_summary(self, device_id: str, since: datetime) -> dict[str, Any]:
        """min, max and mean of each numeric health field since `since`, and the sample count."""
        columns = []
        for name in HEALTH_NUMERIC:
            column = health.c[name]
            columns += [func.min(column), func.max(column), func.avg(column)]
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(func.count(), *columns).where(
                        health.c.device_id == device_id, health.c.ts >= since
                    )
                )
            ).one()
        summary: dict[str, Any] = {"samples": int(row[0])}
        for index, name in enumerate(HEALTH_NUMERIC):
            low, high, mean = row[1 + 3 * index : 4 + 3 * index]
            summary[name] = {
                "min": low,
                "max": high,
                "mean": None if mean is None else float(mean),
            }
        return summary

    async def components_of(self, device_id: str) -> list[ComponentRecord]:
        async with self.engine.connect() as conn:
            comps = (
                await conn.execute(
                    select(components).where(components.c.device_id == device_id).order_by(components.c.id)
                )
            ).all()
            found = await self._sensors(conn, [sensors.c.device_id == device_id])
        by_component: dict[str, list[SensorRecord]] = {}
        for sensor in found:
            by_component.setdefault(sensor.component or NO_COMPONENT, []).append(sensor)
        return [
            ComponentRecord(
                c.device_id, c.id, c.profile, c.created_at, c.updated_at, tuple(by_component.get(c.id, ()))
            )
            for c in comps
        ]

    async def sensors(
        self,
        *,
        device_id: str | None = None,
        value_type: str | None = None,
        component: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[SensorRecord]:
        conditions = []
        if device_id is not None:
            conditions.append(sensors.c.device_id == device_id)
        if value_type is not None:
            conditions.append(sensors.c.value_type == value_type)
        if component is not None:
            conditions.append(sensors.c.component == component)
        async with self.engine.connect() as conn:
            return await self._sensors(conn, conditions, limit=limit, offset=offset)

    async def _sensors(
        self, conn: AsyncConnection, conditions: list[Any], *, limit: int = 10_000, offset: int = 0
    ) -> list[SensorRecord]:
        rows = await conn.execute(
            select(sensors)
            .where(*conditions)
            .order_by(sensors.c.device_id, sensors.c.component, sensors.c.name)
            .limit(limit)
            .offset(offset)
        )
        return [
            SensorRecord(
                r.device_id, r.component or None, r.name, r.value_type, r.unit, r.created_at, r.updated_at
            )
            for r in rows
        ]

    # --- retention --------------------------------------------------------------------

    async def purge(self, table_name: str, older_than: datetime, batch_size: int) -> int:
        """Delete up to `batch_size` rows of `readings` or `health` measured before `older_than`."""
        table = {"readings": readings, "health": health}[table_name]
        async with self.engine.begin() as conn:
            ids = select(table.c.id).where(table.c.ts < older_than).limit(batch_size).scalar_subquery()
            result = await conn.execute(delete(table).where(table.c.id.in_(ids)))
        return int(result.rowcount or 0)


def _drop_unknown(batch: IngestBatch, known: set[str]) -> int:
    before = len(batch.readings) + len(batch.health)
    batch.readings = [row for row in batch.readings if row["device_id"] in known]
    batch.health = [row for row in batch.health if row["device_id"] in known]
    batch.components = [row for row in batch.components if row["device_id"] in known]
    batch.sensors = [row for row in batch.sensors if row["device_id"] in known]
    batch.announced_sensors = [row for row in batch.announced_sensors if row["device_id"] in known]
    batch.info = {k: v for k, v in batch.info.items() if k in known}
    batch.last_data = {k: v for k, v in batch.last_data.items() if k in known}
    batch.last_seen = {k: v for k, v in batch.last_seen.items() if k in known}
    return before - len(batch.readings) - len(batch.health)


def _window(table: Table, window: TimeWindow) -> list[Any]:
    conditions: list[Any] = []
    if window.since is not None:
        conditions.append(table.c.ts >= window.since)
    if window.until is not None:
        conditions.append(table.c.ts < window.until)
    if window.before is not None:
        ts, row_id = window.before
        conditions.append(or_(table.c.ts < ts, and_(table.c.ts == ts, table.c.id < row_id)))
    return conditions


def _reading(row: Any) -> ReadingRecord:
    if row.value_bool is not None:
        value: float | int | bool | str = bool(row.value_bool)
        kind = "boolean"
    elif row.value_str is not None:
        value, kind = row.value_str, "string"
    else:
        number = float(row.value_num)
        value, kind = (int(number) if number.is_integer() and abs(number) < 2**53 else number), "number"
    return ReadingRecord(
        int(row.id), row.device_id, row.component, row.sensor, value, kind, row.unit, row.ts, row.received_at
    )


def _health(row: Any, row_id: int | None) -> HealthRecord:
    return HealthRecord(
        id=row_id,
        device_id=row.device_id,
        ts=row.ts,
        received_at=row.received_at,
        uptime_s=float(row.uptime_s),
        free_heap_bytes=int(row.free_heap_bytes),
        rssi_dbm=float(row.rssi_dbm),
        connection_type=row.connection_type,
        readings_sent=int(row.readings_sent),
        readings_dropped=int(row.readings_dropped),
        battery_pct=None if row.battery_pct is None else float(row.battery_pct),
        extra=json.loads(row.extra) if row.extra else {},
    )


def dumps_extra(extra: Iterable[tuple[str, Any]] | dict[str, Any]) -> str | None:
    data = dict(extra)
    return json.dumps(data, separators=(",", ":"), sort_keys=True) if data else None
