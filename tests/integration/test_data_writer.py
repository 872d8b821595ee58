"""DeviceData's writes: on SQLite the writer thread (the registry's busy timeout, one thread,
a clean close, rows stored exactly as SQLAlchemy stores them); on both databases a batch of
every kind of row read back.

A real SQLite file in `tmp_path`; the lock is held from a second connection, as in
tests/integration/test_ingest.py. PostgreSQL is the `postgres_url` fixture's
(tests/conftest.py): a throwaway server, or ``GATEWAY_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import OperationalError

from gateway.core.clock import utcnow
from gateway.core.ids import DeviceId
from gateway.core.records import TimeWindow
from gateway.store import Store
from gateway.store.data import DeviceData, IngestBatch, health, readings
from gateway.store.models import Base
from tests.integration.test_ingest import health_row, reading_row, write_locked

DEVICE = "dev-writer-1"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}", busy_timeout_s=0.5)
    await store.create_schema()
    await store.create_device(DeviceId(DEVICE), "writer", utcnow())
    try:
        yield store
    finally:
        await store.close()


def batch(value: float) -> IngestBatch:
    now = utcnow()
    return IngestBatch(readings=[reading_row(DEVICE, now, value)], last_data={DEVICE: now})


async def stored(store: Store) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(readings))).scalar_one())


def writer_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("ingest-db")]


async def test_the_writer_waits_for_a_locked_database_as_long_as_the_registry_would(
    store: Store, tmp_path: Path
) -> None:
    """The writer's connection takes the registry's busy timeout (0.5 s here, not sqlite3's 5 s)."""
    data = DeviceData(store.engine)
    try:
        await data.write_batch(batch(1))
        async with write_locked(tmp_path / "gateway.db"):
            started = time.monotonic()
            with pytest.raises(OperationalError, match="locked"):
                await data.write_batch(batch(2))
            assert 0.4 <= time.monotonic() - started < 3.0
        async with write_locked(tmp_path / "gateway.db"):
            late = asyncio.create_task(data.write_batch(batch(3)))
            await asyncio.sleep(0.2)  # released within the busy timeout: the batch waits, then commits
        assert (await asyncio.wait_for(late, 5)).stored == 1
        assert await stored(store) == 2
    finally:
        await data.close()


async def test_batches_share_one_writer_thread_that_close_ends(store: Store) -> None:
    """Concurrent batches go through one writer thread; after close() none is left and later
    batches still land, through the registry's engine."""
    data = DeviceData(store.engine)
    results = await asyncio.gather(*(data.write_batch(batch(n)) for n in range(10)))
    assert [result.stored for result in results] == [1] * 10
    assert len(writer_threads()) == 1
    await data.close()
    assert writer_threads() == []
    assert (await data.write_batch(batch(99))).stored == 1
    assert writer_threads() == []
    assert await stored(store) == 11


async def test_rows_written_through_the_driver_are_stored_exactly_as_sqlalchemy_stores_them(
    store: Store,
) -> None:
    """Readings and health rows of every kind, written by write_batch, are byte for byte what
    SQLAlchemy's own INSERT stores (same datetime text, booleans, NULLs)."""
    other = "dev-writer-2"
    await store.create_device(DeviceId(other), "reference", utcnow())
    moment = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    values: list[tuple[str, Any]] = [("value_num", 21.5), ("value_bool", True), ("value_str", "on")]
    rows = []
    for index, (column, value) in enumerate(values):
        row = reading_row(DEVICE, moment + timedelta(microseconds=index * 250_001), 0)
        row.update(value_num=None, component="board" if index else None, unit="C")
        row[column] = value
        rows.append(row)
    healths = [
        health_row(DEVICE, moment),
        {**health_row(DEVICE, utcnow()), "battery_pct": 80.0, "extra": '{"a":1}'},
    ]
    data = DeviceData(store.engine)
    try:
        await data.write_batch(
            IngestBatch(readings=[dict(r) for r in rows], health=[dict(h) for h in healths])
        )
    finally:
        await data.close()
    async with store.engine.begin() as conn:  # the reference: SQLAlchemy's executemany
        await conn.execute(insert(readings), [{**r, "device_id": other} for r in rows])
        await conn.execute(insert(health), [{**h, "device_id": other} for h in healths])
    async with store.engine.connect() as conn:
        for table in ("readings", "health"):
            raw = (await conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY id")).all()
            ours = [row[2:] for row in raw if row[1] == DEVICE]
            reference = [row[2:] for row in raw if row[1] == other]
            assert ours == reference and len(ours) == len(rows if table == "readings" else healths)


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A registry with one device, on SQLite (the writer thread) or PostgreSQL (run_sync)."""
    if request.param == "postgresql":
        store = Store(request.getfixturevalue("postgres_url"))
        async with store.engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    else:
        store = Store(f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}")
    await store.create_schema()
    await store.create_device(DeviceId(DEVICE), "writer", utcnow())
    try:
        yield store
    finally:
        await store.close()


async def test_every_kind_of_row_in_a_batch_is_stored_and_read_back(any_store: Store) -> None:
    """One batch with readings of each type, health, components with sensors, info and
    last_data: everything reads back as written, and a second batch updates, not duplicates."""
    at = utcnow().replace(microsecond=0) - timedelta(minutes=5)
    readings_in = [reading_row(DEVICE, at, 1.5), reading_row(DEVICE, at + timedelta(seconds=1), 0)]
    readings_in[1].update(value_num=None, value_bool=True, component="board")
    sensors_in = [
        {"device_id": DEVICE, "component": "", "name": "t", "value_type": "number", "unit": None,
         "created_at": at, "updated_at": at},
    ]  # fmt: skip
    announced = [
        {"device_id": DEVICE, "component": "board", "name": "t", "value_type": "boolean", "unit": "x",
         "created_at": at, "updated_at": at},
    ]  # fmt: skip
    component = {"device_id": DEVICE, "id": "board", "profile": "p1", "created_at": at, "updated_at": at}
    data = DeviceData(any_store.engine)
    try:
        for _ in range(2):  # the second time: upserts update, sensors seen are not written again
            result = await data.write_batch(
                IngestBatch(
                    readings=[dict(r) for r in readings_in],
                    health=[{**health_row(DEVICE, at), "battery_pct": 50.0, "extra": '{"k":1}'}],
                    info={DEVICE: {"model": "m1"}},
                    components=[dict(component)],
                    sensors=[dict(s) for s in sensors_in],
                    announced_sensors=[dict(s) for s in announced],
                    last_data={DEVICE: at},
                )
            )
            assert (result.stored, result.dropped_unknown_device) == (3, 0)
        stored = await data.readings(DEVICE, TimeWindow(limit=10))
        assert sorted((r.sensor, r.component or "", r.value, r.value_type) for r in stored) == [
            ("t", "", 1.5, "number"),
            ("t", "", 1.5, "number"),
            ("t", "board", True, "boolean"),
            ("t", "board", True, "boolean"),
        ]
        assert {r.ts for r in stored} == {at, at + timedelta(seconds=1)}
        latest = await data.latest_health(DEVICE)
        assert latest is not None and (latest.battery_pct, latest.extra, latest.ts) == (50.0, {"k": 1}, at)
        (board,) = await data.components_of(DEVICE)
        assert (board.id, board.profile, [(s.name, s.value_type, s.unit) for s in board.sensors]) == (
            "board",
            "p1",
            [("t", "boolean", "x")],
        )
        record = await any_store.get_device(DEVICE)
        assert record.last_data_at == at
    finally:
        await data.close()


@pytest.mark.parametrize("count", [1, 255, 256, 257, 700])
async def test_batches_of_any_size_are_stored_whole_and_in_order(store: Store, count: int) -> None:
    """Multi-row INSERTs of 256, 128, ... rows: every row of a batch is stored, in batch order."""
    now = utcnow()
    data = DeviceData(store.engine)
    try:
        result = await data.write_batch(
            IngestBatch(readings=[reading_row(DEVICE, now, n) for n in range(count)])
        )
    finally:
        await data.close()
    assert result.stored == count
    async with store.engine.connect() as conn:
        values = (await conn.execute(select(readings.c.value_num).order_by(readings.c.id))).scalars().all()
    assert values == [float(n) for n in range(count)]


async def test_close_lets_the_batches_in_flight_finish(store: Store) -> None:
    """Batches already handed to the writer thread are committed before close() ends it."""
    data = DeviceData(store.engine)
    await data.write_batch(batch(0))
    writes = [asyncio.create_task(data.write_batch(batch(n))) for n in range(1, 11)]
    await asyncio.sleep(0)  # every one of them handed over
    await data.close()
    assert [(await write).stored for write in writes] == [1] * 10
    assert await stored(store) == 11
    assert writer_threads() == []
