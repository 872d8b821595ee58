"""Ingest end to end over real loopback mutual TLS: devices publish, the data API reads it back.

Devices are real `MqttClient`s with enrolled certificates; the gateway is the real
`GatewayApp` (SQLite in `tmp_path`). Where a test needs a slow database it holds a
write transaction on the gateway's SQLite file from a second connection, so the
ingest writer really cannot commit. DESIGN.md §6-§8 and AMQTT-NOTES gap 7 are the
contract checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import IngestSettings, RetentionSettings, Settings
from gateway.core import tokens
from gateway.core.clock import iso, utcnow
from gateway.mqtt_client import MqttClient
from gateway.retention import Retention
from gateway.store import Store
from gateway.store.data import DeviceData, IngestBatch
from tests.conftest import Harness, make_settings

MAX_PAYLOAD = 2048
# Fast last_seen flushes and a small payload limit; tests override more via indirect parametrize.
INGEST = {"last_seen_flush_s": 0.2, "max_payload_bytes": MAX_PAYLOAD}
# One message per batch and a two-message queue: the queue is full as soon as the writer stalls.
TINY_QUEUE = {"queue_size": 2, "max_batch_rows": 1, "max_batch_delay_ms": 0}


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    overrides: dict[str, Any] = getattr(request, "param", {})
    return make_settings(tmp_path).model_copy(update={"ingest": IngestSettings(**{**INGEST, **overrides})})


# --- helpers ---------------------------------------------------------------------------------


async def online(gw: Harness, name: str = "sensor", **kwargs: Any) -> tuple[str, MqttClient]:
    """A registered, enrolled, connected device whose ONLINE status is stored: its id and its client.

    The broker reads a session's packets only once ONLINE is committed (just after
    CONNACK); a test that then locks the database must not catch that write.
    """
    creds = await gw.device(name=name)
    client = await gw.connect(creds, **kwargs)

    async def stored_online() -> bool:
        return bool((await device_record(gw, creds.name))["connection"] == "online")

    await eventually(stored_online, f"{creds.name} ONLINE in the database")
    return creds.name, client


async def get_json(gw: Harness, path: str, **params: Any) -> Any:
    response = await gw.api.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def readings_of(gw: Harness, device_id: str, **params: Any) -> list[dict[str, Any]]:
    page: list[dict[str, Any]] = (await get_json(gw, f"/devices/{device_id}/readings", **params))["data"]
    return page


async def device_record(gw: Harness, device_id: str) -> dict[str, Any]:
    record: dict[str, Any] = (await get_json(gw, f"/devices/{device_id}"))["data"]
    return record


async def eventually(check: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Call (and await, if need be) `check()` until it is truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s (last: {result!r})")
        await asyncio.sleep(0.05)


def at(moment: datetime) -> str:
    return iso(moment) or ""


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@contextlib.asynccontextmanager
async def write_locked(db: Path) -> AsyncIterator[None]:
    """Hold SQLite's write lock on `db` from another connection, so no one else can commit."""
    conn = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        # In a thread: if the gateway is mid-commit, our wait must not block its event loop.
        await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")
        try:
            yield
        finally:
            await asyncio.to_thread(conn.execute, "ROLLBACK")
    finally:
        conn.close()


def db_path(gw: Harness) -> Path:
    return gw.app.settings.paths.data_dir / "gateway.db"


def base_time() -> datetime:
    """A measurement time an hour ago, whole seconds, so stored and sent times compare exactly."""
    return utcnow().replace(microsecond=0) - timedelta(hours=1)


# --- readings -------------------------------------------------------------------------------


async def test_readings_in_all_three_forms_are_stored_and_listed_newest_first(gateway: Harness) -> None:
    """One object, an array and a SenML pack (bn, bt, bu, bv) all land in GET .../readings, newest first."""
    device_id, client = await online(gateway)
    t0 = base_time()

    def t(seconds: int) -> datetime:
        return t0 + timedelta(seconds=seconds)

    topic = f"devices/{device_id}/readings"
    one = {"sensor": "temp", "component": "board", "value": 21.5, "unit": "Cel", "ts": at(t0)}
    array = [
        {"sensor": "temp", "component": "board", "value": 22, "unit": "Cel", "ts": at(t(10))},
        {"sensor": "hum", "value": 40.5, "unit": "%RH", "ts": t(20).timestamp()},  # epoch seconds
        {"sensor": "door", "value": True, "ts": at(t(30))},
        {"sensor": "label", "value": "ok", "ts": at(t(40))},
    ]
    senml = [  # bn prefixes names, bt + t is the time, bu the default unit, bv + v the value
        {"bn": "env.", "bt": t(50).timestamp(), "bu": "Cel", "bv": 20, "n": "temp", "v": 1.5},
        {"n": "temp", "t": 10, "v": 2},
        {"n": "rh", "u": "%RH", "t": 20, "v": 3},
    ]
    for payload in (one, array, senml):
        await client.publish(topic, json.dumps(payload), qos=1)  # returns on PUBACK: committed

    rows = await readings_of(gateway, device_id)
    got = [(r["sensor"], r["component"], r["value"], r["value_type"], r["unit"], r["ts"]) for r in rows]
    assert got == [
        ("env.rh", None, 23, "number", "%RH", at(t(70))),
        ("env.temp", None, 22, "number", "Cel", at(t(60))),
        ("env.temp", None, 21.5, "number", "Cel", at(t(50))),
        ("label", None, "ok", "string", None, at(t(40))),
        ("door", None, True, "boolean", None, at(t(30))),
        ("hum", None, 40.5, "number", "%RH", at(t(20))),
        ("temp", "board", 22, "number", "Cel", at(t(10))),
        ("temp", "board", 21.5, "number", "Cel", at(t0)),
    ]
    assert all(parse_time(r["received_at"]) > t0 for r in rows)


async def test_a_reading_without_a_time_is_stamped_with_its_receipt(gateway: Harness) -> None:
    """A reading with no "ts" (and a SenML record with no time) takes the moment the gateway received it."""
    device_id, client = await online(gateway)
    before = utcnow()
    await client.publish(f"devices/{device_id}/readings", '{"sensor":"t","value":1}', qos=1)
    await client.publish(f"devices/{device_id}/readings", '[{"n":"s","v":2}]', qos=1)
    after = utcnow()
    rows = await readings_of(gateway, device_id)
    assert [r["sensor"] for r in rows] == ["s", "t"]
    for row in rows:
        assert row["ts"] == row["received_at"]
        assert before - timedelta(seconds=1) <= parse_time(row["ts"]) <= after + timedelta(seconds=1)


async def test_reading_filters_and_cursor_paging(gateway: Harness) -> None:
    """sensor, component, since/until (half-open), limit and next_cursor select and page the rows."""
    device_id, client = await online(gateway)
    t0 = base_time()
    batch = [
        {
            "sensor": "a" if i % 2 else "b",
            "component": "left" if i < 4 else "right",
            "value": i,
            "ts": at(t0 + timedelta(seconds=i)),
        }
        for i in range(9)
    ]
    await client.publish(f"devices/{device_id}/readings", json.dumps(batch), qos=1)
    path = f"/devices/{device_id}/readings"

    async def values(**params: Any) -> list[Any]:
        return [r["value"] for r in await readings_of(gateway, device_id, **params)]

    assert await values() == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert await values(sensor="a") == [7, 5, 3, 1]
    assert await values(component="left") == [3, 2, 1, 0]
    assert await values(sensor="b", component="right") == [8, 6, 4]
    assert await values(since=at(t0 + timedelta(seconds=2)), until=at(t0 + timedelta(seconds=5))) == [4, 3, 2]
    assert await values(since=at(t0 + timedelta(seconds=7)), limit=1) == [8]
    assert await values(sensor="nope") == []

    pages: list[list[int]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        body = await get_json(gateway, path, **params)
        pages.append([r["value"] for r in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == [[8, 7, 6, 5], [4, 3, 2, 1], [0]]

    # The cursor is stable while newer data arrives, and it combines with filters.
    first = await get_json(gateway, path, limit=2, sensor="a")
    await client.publish(f"devices/{device_id}/readings", '{"sensor":"a","value":99}', qos=1)
    second = await get_json(gateway, path, limit=2, sensor="a", cursor=first["next_cursor"])
    assert [r["value"] for r in first["data"]] == [7, 5]
    assert [r["value"] for r in second["data"]] == [3, 1]

    bad = await gateway.api.get(path, params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_cursor"
    too_many = await gateway.api.get(path, params={"limit": 1001})
    assert too_many.status_code == 422


# --- info, components, sensors ---------------------------------------------------------------


async def test_info_updates_the_device_record(gateway: Harness) -> None:
    """devices/{id}/info fills the identification fields of GET /devices/{id}; a later update merges."""
    device_id, client = await online(gateway)
    info = {
        "manufacturer": "Acme",
        "model": "TH-1",
        "firmware_version": "1.2.3",
        "application": "thermo",
        "application_version": "0.9.0",
        "os": "zephyr",
        "os_version": "3.5",
    }
    await client.publish(f"devices/{device_id}/info", json.dumps(info), qos=1)
    record = await device_record(gateway, device_id)
    assert {key: record[key] for key in info} == info

    await client.publish(f"devices/{device_id}/info", '{"firmware_version":"1.2.4"}', qos=1)
    record = await device_record(gateway, device_id)
    assert {key: record[key] for key in info} == {**info, "firmware_version": "1.2.4"}


async def test_components_create_components_and_sensors_and_readings_create_unknown_sensors(
    gateway: Harness,
) -> None:
    """An announcement creates components with typed sensors; a reading of an unknown sensor adds one."""
    device_id, client = await online(gateway)
    other_id, other = await online(gateway, name="other")
    announcement = [
        {
            "id": "board",
            "profile": "esp32",
            "sensors": [
                {"name": "temp", "value_type": "number", "unit": "Cel"},
                {"name": "door", "value_type": "boolean"},
            ],
        },
        {"id": "port1", "sensors": [{"name": "state", "value_type": "string"}]},
    ]
    await client.publish(f"devices/{device_id}/components", json.dumps(announcement), qos=1)
    await other.publish(f"devices/{other_id}/readings", '{"sensor":"temp","value":3,"unit":"K"}', qos=1)

    comps = (await get_json(gateway, f"/devices/{device_id}/components"))["data"]
    assert [(c["id"], c["profile"]) for c in comps] == [("board", "esp32"), ("port1", None)]
    assert [(s["name"], s["value_type"], s["unit"], s["component"]) for s in comps[0]["sensors"]] == [
        ("door", "boolean", None, "board"),
        ("temp", "number", "Cel", "board"),
    ]
    assert [s["name"] for s in comps[1]["sensors"]] == ["state"]

    # Readings of announced sensors add nothing; a reading of an unknown one creates it.
    await client.publish(
        f"devices/{device_id}/readings",
        '[{"sensor":"temp","component":"board","value":20},{"sensor":"rssi","value":-61,"unit":"dBm"}]',
        qos=1,
    )
    mine = (await get_json(gateway, "/sensors", device=device_id))["data"]
    assert [(s["component"], s["name"], s["value_type"], s["unit"]) for s in mine] == [
        (None, "rssi", "number", "dBm"),
        ("board", "door", "boolean", None),
        ("board", "temp", "number", "Cel"),
        ("port1", "state", "string", None),
    ]
    assert all(s["device_id"] == device_id for s in mine)
    numbers = (await get_json(gateway, "/sensors", value_type="number"))["data"]
    assert sorted((s["device_id"], s["name"]) for s in numbers) == sorted(
        [(device_id, "rssi"), (device_id, "temp"), (other_id, "temp")]
    )
    board = (await get_json(gateway, "/sensors", component="board", value_type="boolean"))["data"]
    assert [(s["device_id"], s["name"]) for s in board] == [(device_id, "door")]

    # A new announcement updates a sensor's type and unit and a component's profile.
    update = [
        {
            "id": "board",
            "profile": "esp32-s3",
            "sensors": [{"name": "temp", "value_type": "number", "unit": "K"}],
        }
    ]
    await client.publish(f"devices/{device_id}/components", json.dumps(update), qos=1)
    comps = (await get_json(gateway, f"/devices/{device_id}/components"))["data"]
    assert comps[0]["profile"] == "esp32-s3"
    assert {s["name"]: s["unit"] for s in comps[0]["sensors"]} == {"door": None, "temp": "K"}


# --- health --------------------------------------------------------------------------------


def health_report(**fields: Any) -> dict[str, Any]:
    report = {
        "uptime_s": 100,
        "free_heap_bytes": 50_000,
        "rssi_dbm": -60,
        "connection_type": "wifi",
        "readings_sent": 10,
        "readings_dropped": 0,
    }
    return {**report, **fields}


async def test_health_history_latest_and_summary(gateway: Harness) -> None:
    """Health reports are listed newest first, the newest by time is latest, and summary aggregates."""
    device_id, client = await online(gateway)
    path = f"/devices/{device_id}"
    assert (await get_json(gateway, f"{path}/health/latest"))["data"] is None
    now = utcnow().replace(microsecond=0)
    reports = [  # sent newest first: "latest" follows the measurement time, not arrival
        health_report(
            ts=at(now - timedelta(minutes=10)),
            uptime_s=300,
            rssi_dbm=-50,
            battery_pct=80,
            free_heap_bytes=40_000,
            extra_temp_c=41.5,
            reset={"reason": "wdt", "count": [1, 2]},
        ),
        health_report(ts=at(now - timedelta(minutes=20)), uptime_s=200, rssi_dbm=-70, free_heap_bytes=45_000),
        health_report(
            ts=at(now - timedelta(minutes=30)),
            uptime_s=100,
            rssi_dbm=-60,
            battery_pct=90,
            connection_type="cellular",
            free_heap_bytes=50_000,
        ),
        health_report(ts=at(now - timedelta(hours=2)), uptime_s=5, rssi_dbm=-100, free_heap_bytes=1),
    ]
    for report in reports:
        await client.publish(f"devices/{device_id}/health", json.dumps(report), qos=1)

    history = (await get_json(gateway, f"{path}/health"))["data"]
    assert [h["uptime_s"] for h in history] == [300, 200, 100, 5]
    assert history[0]["extra"] == {"extra_temp_c": 41.5, "reset": {"reason": "wdt", "count": [1, 2]}}
    assert history[1]["extra"] == {}
    assert (history[2]["connection_type"], history[2]["battery_pct"]) == ("cellular", 90)
    assert history[1]["battery_pct"] is None
    paged = await get_json(gateway, f"{path}/health", limit=3)
    rest = await get_json(gateway, f"{path}/health", limit=3, cursor=paged["next_cursor"])
    assert [h["uptime_s"] for h in paged["data"] + rest["data"]] == [300, 200, 100, 5]

    latest = (await get_json(gateway, f"{path}/health/latest"))["data"]
    assert (latest["uptime_s"], latest["ts"]) == (300, at(now - timedelta(minutes=10)))
    assert latest["extra"]["reset"] == {"reason": "wdt", "count": [1, 2]}

    summary = (await get_json(gateway, f"{path}/health/summary", window="1h"))["data"]
    assert summary["window"] == "1h"
    assert summary["samples"] == 3  # the two-hour-old report is outside the window
    assert summary["rssi_dbm"] == {"min": -70, "max": -50, "mean": -60}
    assert summary["uptime_s"] == {"min": 100, "max": 300, "mean": 200}
    assert summary["free_heap_bytes"] == {"min": 40_000, "max": 50_000, "mean": 45_000}
    assert summary["battery_pct"] == {"min": 80, "max": 90, "mean": 85}  # reports without it are skipped
    wider = (await get_json(gateway, f"{path}/health/summary", window="3h"))["data"]
    assert (wider["samples"], wider["rssi_dbm"]["min"]) == (4, -100)
    empty = (await get_json(gateway, f"{path}/health/summary", window="1m"))["data"]
    assert empty["samples"] == 0
    assert empty["uptime_s"] == {"min": None, "max": None, "mean": None}
    bad = await gateway.api.get(f"{path}/health/summary", params={"window": "forever"})
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "invalid_duration"


# --- bad input --------------------------------------------------------------------------------


BAD = [  # (case, channel, payload, the code the device and operators are told)
    ("bad-json", "readings", b'{"sensor": "t", "value": ', "bad_json"),
    ("not-utf8", "readings", b"\xff\xfe not utf-8", "bad_json"),
    ("wrong-type", "readings", b'{"sensor": "t", "value": [1, 2]}', "wrong_type"),
    ("health-type", "health", json.dumps(health_report(uptime_s="x")).encode(), "wrong_type"),
    ("info-type", "info", b'{"model": 5}', "wrong_type"),
    ("unknown-field", "readings", b'{"sensor": "t", "value": 1, "colour": "red"}', "unknown_field"),
    ("info-unknown-field", "info", b'{"colour": "red"}', "unknown_field"),
    ("missing-field", "readings", b'{"value": 1}', "missing_field"),
    ("unknown-channel", "weather", b'{"sensor": "t", "value": 1}', "unknown_channel"),
    (
        "oversize",
        "readings",
        json.dumps({"sensor": "t", "value": "x" * MAX_PAYLOAD}).encode(),
        "payload_too_large",
    ),
]


async def test_bad_payloads_are_rejected_with_an_error_and_an_event_and_harm_no_one(gateway: Harness) -> None:
    """The device gets devices/{id}/errors, operators ingest_rejected; it stays connected, others unharmed."""
    device_id, client = await online(gateway)
    other_id, other = await online(gateway, name="other")
    assert await client.subscribe((f"devices/{device_id}/errors", 0)) == [0]
    assert await other.subscribe((f"devices/{other_id}/errors", 0)) == [0]
    ops = await gateway.connect(await gateway.operator(), client_id="")
    assert await ops.subscribe(("gateway/events/ingest_rejected", 1)) == [1]
    expected_codes: dict[str, int] = {}

    for value, (case, channel, payload, code) in enumerate(BAD):
        topic = f"devices/{device_id}/{channel}"
        await client.publish(topic, payload, qos=1)  # acknowledged: resending it would not help

        error = await client.next_message(timeout=5)
        assert error.topic == f"devices/{device_id}/errors", case
        body = json.loads(error.payload)
        assert (body["code"], body["topic"]) == (code, topic), case
        assert body["message"], case
        event = await ops.next_message(timeout=5)
        assert event.topic == "gateway/events/ingest_rejected", case
        reported = json.loads(event.payload)
        assert (reported["kind"], reported["device_id"], reported["code"], reported["topic"]) == (
            "ingest_rejected",
            device_id,
            code,
            topic,
        ), case
        expected_codes[code] = expected_codes.get(code, 0) + 1
        assert gateway.app.ingest.stats.rejected_by_code == expected_codes, case

        # Still connected: its next good reading is stored, and so is the other device's.
        await client.publish(
            f"devices/{device_id}/readings", json.dumps({"sensor": "t", "value": value}), qos=1
        )
        await other.publish(
            f"devices/{other_id}/readings", json.dumps({"sensor": "t", "value": value}), qos=1
        )
        assert (await readings_of(gateway, device_id, limit=1))[0]["value"] == value, case
        assert not client.closed and not other.closed, case

    assert [r["value"] for r in await readings_of(gateway, device_id)] == list(reversed(range(len(BAD))))
    assert [r["value"] for r in await readings_of(gateway, other_id)] == list(reversed(range(len(BAD))))
    with pytest.raises(TimeoutError):
        await other.next_message(timeout=0.3)  # no error for the other device, ever
    record = await device_record(gateway, device_id)
    assert (record["connection"], record["manufacturer"], record["model"]) == ("online", None, None)
    assert (await get_json(gateway, f"/devices/{device_id}/health/latest"))["data"] is None
    assert gateway.app.ingest.stats.rejected == len(BAD)


# --- last_data_at, last_seen_at -------------------------------------------------------------


async def test_last_data_at_and_last_seen_at(gateway: Harness) -> None:
    """A reading sets last_data_at at once; any packet moves last_seen_at at the next periodic flush."""
    device_id, client = await online(gateway)
    record = await device_record(gateway, device_id)
    assert record["last_data_at"] is None
    connected_seen = parse_time(record["last_seen_at"])  # the CONNECT itself

    await asyncio.sleep(0.1)
    before = utcnow()
    await client.publish(f"devices/{device_id}/readings", '{"sensor":"t","value":1}', qos=1)
    record = await device_record(gateway, device_id)
    assert record["last_data_at"] is not None
    assert before <= parse_time(record["last_data_at"]) <= utcnow()

    async def seen_after(moment: datetime) -> bool:
        return parse_time((await device_record(gateway, device_id))["last_seen_at"]) >= moment

    await eventually(lambda: seen_after(before), "last_seen_at after the reading")
    assert before > connected_seen

    # Health is a packet too (not data): last_seen_at moves, last_data_at does not.
    data_at = record["last_data_at"]
    await asyncio.sleep(0.1)
    before_health = utcnow()
    await client.publish(f"devices/{device_id}/health", json.dumps(health_report()), qos=1)
    await eventually(lambda: seen_after(before_health), "last_seen_at after a health report")
    assert (await device_record(gateway, device_id))["last_data_at"] == data_at


@pytest.mark.parametrize("settings", [{"last_seen_flush_s": 3600}], indirect=True, ids=["no-periodic-flush"])
async def test_last_seen_of_a_session_that_ended_before_the_flush_is_kept(gateway: Harness) -> None:
    """A device that sends a packet and leaves before the next flush still gets its last_seen_at."""
    device_id, client = await online(gateway)
    await asyncio.sleep(0.05)
    before = utcnow()
    await client.publish(f"devices/{device_id}/health", json.dumps(health_report()), qos=1)
    await client.disconnect()

    async def offline() -> bool:
        return bool((await device_record(gateway, device_id))["connection"] == "offline")

    await eventually(offline, f"{device_id} OFFLINE")
    await gateway.app.stop()  # flushes last_seen_at; the session is long gone from the live set
    store = Store(gateway.app.settings.database_url)
    try:
        record = await store.get_device(device_id)
    finally:
        await store.close()
    assert record.last_seen_at is not None and record.last_seen_at >= before


# --- acknowledgement after commit, back-pressure ------------------------------------------


@pytest.mark.parametrize("qos", [1, 2])
async def test_gap7_puback_only_after_commit(gateway: Harness, qos: int) -> None:
    """While another connection holds the database's write lock, a QoS 1 or 2 reading stays unacknowledged."""
    device_id, client = await online(gateway)
    await client.publish(f"devices/{device_id}/readings", '{"sensor":"warm","value":0}', qos=1)
    async with write_locked(db_path(gateway)):
        acked = await client.publish_nowait_ack(  # resolves on PUBACK (QoS 1) or PUBCOMP (QoS 2)
            f"devices/{device_id}/readings", '{"sensor":"t","value":42}', qos=qos
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(acked), 1.0)
        assert [r["sensor"] for r in await readings_of(gateway, device_id)] == ["warm"], "not committed"
        assert gateway.app.ingest.stats.accepted == 2
    await asyncio.wait_for(acked, 15)
    assert [r["value"] for r in await readings_of(gateway, device_id, sensor="t")] == [42]


@pytest.mark.parametrize("settings", [TINY_QUEUE], indirect=True, ids=["tiny-queue"])
async def test_qos1_over_a_full_queue_is_held_back_not_dropped(gateway: Harness) -> None:
    """With the writer stalled and the queue full, the gateway stops reading the publisher; none is lost."""
    device_id, client = await online(gateway, max_inflight=30)
    other_id, other = await online(gateway, name="other")
    stats = gateway.app.ingest.stats
    count = 30
    async with write_locked(db_path(gateway)):
        acks = [
            await client.publish_nowait_ack(
                f"devices/{device_id}/readings", json.dumps({"sensor": "seq", "value": i}), qos=1
            )
            for i in range(count)
        ]
        await eventually(lambda: gateway.app.ingest.queued == 2, "a full queue")
        await asyncio.sleep(0.5)  # the reader had time to take more, if it were going to
        # One in the stalled batch, two queued, one waiting to be queued: the rest stays unread.
        assert stats.accepted <= 4, stats
        assert gateway.app.ingest.queued == 2
        assert not any(ack.done() for ack in acks), "no PUBACK before commit"
        assert stats.dropped_qos0 == 0
    await asyncio.wait_for(asyncio.gather(*acks), 20)
    assert stats.accepted == count
    rows = await readings_of(gateway, device_id, limit=1000)
    assert sorted(r["value"] for r in rows) == list(range(count))
    # The other device was never blocked by the stall once the database came back.
    await other.publish(f"devices/{other_id}/readings", '{"sensor":"t","value":1}', qos=1, timeout=10)


@pytest.mark.parametrize("settings", [TINY_QUEUE], indirect=True, ids=["tiny-queue"])
async def test_qos0_over_a_full_queue_is_dropped_and_counted(gateway: Harness) -> None:
    """QoS 0 readings that meet a full queue are dropped and counted in stats.dropped_qos0."""
    device_id, client = await online(gateway)
    stats = gateway.app.ingest.stats
    count = 20
    async with write_locked(db_path(gateway)):
        for i in range(count):
            await client.publish(f"devices/{device_id}/readings", json.dumps({"sensor": "s", "value": i}))
        await eventually(lambda: stats.accepted + stats.dropped_qos0 == count, "every QoS 0 reading read")
        assert gateway.app.ingest.queued == 2, "bounded"
        dropped = stats.dropped_qos0
        assert dropped >= count - 4
    await client.publish(f"devices/{device_id}/readings", '{"sensor":"after","value":1}', qos=1)
    stored = [r["value"] for r in await readings_of(gateway, device_id, sensor="s", limit=1000)]
    assert len(stored) + dropped == count
    assert stored == sorted(stored, reverse=True)  # what was kept came first, in order
    assert stats.dropped_qos0 == dropped


@pytest.mark.parametrize("settings", [TINY_QUEUE], indirect=True, ids=["tiny-queue"])
async def test_a_qos0_publisher_that_meets_a_full_queue_rests_then_reads_on(
    gateway: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a QoS 0 drop the broker leaves that publisher's socket unread for QOS0_DROP_PAUSE_S
    (here 1 s), so that dropping costs no CPU the writer needs; then it reads on."""
    from gateway import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "QOS0_DROP_PAUSE_S", 1.0)
    device_id, client = await online(gateway)
    stats = gateway.app.ingest.stats
    count = 6

    def read() -> int:
        return stats.accepted + stats.dropped_qos0

    async with write_locked(db_path(gateway)):
        for i in range(count):
            await client.publish(f"devices/{device_id}/readings", json.dumps({"sensor": "s", "value": i}))
        await eventually(lambda: stats.dropped_qos0 >= 1, "a first drop")
        seen = read()
        await asyncio.sleep(0.3)
        assert read() == seen < count, "resting: nothing more read"
        await eventually(lambda: read() == count, "then every message read", timeout=10)
    assert stats.dropped_qos0 >= 2


# --- retention ------------------------------------------------------------------------------


class CountingData(DeviceData):
    """The real store, remembering how many rows each purge transaction deleted."""

    def __init__(self, data: DeviceData) -> None:
        super().__init__(data.engine)
        self.purges: list[tuple[str, int]] = []

    async def purge(self, table_name: str, older_than: datetime, batch_size: int) -> int:
        count = await super().purge(table_name, older_than, batch_size)
        self.purges.append((table_name, count))
        return count


def reading_row(device_id: str, ts: datetime, value: float) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "component": None,
        "sensor": "t",
        "value_num": value,
        "value_bool": None,
        "value_str": None,
        "unit": None,
        "ts": ts,
        "received_at": ts,
    }


def health_row(device_id: str, ts: datetime) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "ts": ts,
        "received_at": ts,
        "uptime_s": 1.0,
        "free_heap_bytes": 1,
        "rssi_dbm": -50.0,
        "connection_type": "wifi",
        "readings_sent": 0,
        "readings_dropped": 0,
        "battery_pct": None,
        "extra": None,
    }


async def test_retention_purges_old_rows_in_batches(gateway: Harness) -> None:
    """Readings past readings_days and health past health_days are deleted, batch_size rows at a time."""
    device_id, _ = await gateway.register()
    now = utcnow()
    old_reading, old_health = now - timedelta(days=11), now - timedelta(days=6)
    await gateway.app.data.write_batch(
        IngestBatch(
            readings=[reading_row(device_id, old_reading - timedelta(minutes=i), i) for i in range(7)]
            + [reading_row(device_id, now - timedelta(days=9), 100)],  # younger than readings_days
            health=[health_row(device_id, old_health - timedelta(minutes=i)) for i in range(4)]
            + [health_row(device_id, now - timedelta(days=4))],
        )
    )
    data = CountingData(gateway.app.data)
    retention = Retention(data, RetentionSettings(readings_days=10, health_days=5, batch_size=3))

    assert await retention.purge_once() == {"readings": 7, "health": 4}
    assert data.purges == [("readings", 3), ("readings", 3), ("readings", 1), ("health", 3), ("health", 1)]
    assert [r["value"] for r in await readings_of(gateway, device_id)] == [100]
    assert len((await get_json(gateway, f"/devices/{device_id}/health"))["data"]) == 1
    assert await retention.purge_once() == {"readings": 0, "health": 0}


# --- the data API's access rules ------------------------------------------------------------

DATA_ROUTES = ["readings", "health", "health/latest", "health/summary", "components"]


async def test_data_routes_need_the_read_scope(gateway: Harness) -> None:
    """Without a token 401, with a token lacking devices:read 403, with devices:read 200."""
    device_id, _ = await gateway.register()
    now = utcnow()
    reader, nobody = tokens.new_token(tokens.API_PREFIX), tokens.new_token(tokens.API_PREFIX)
    await gateway.app.store.tokens.add("reader", tokens.hash_token(reader), frozenset({tokens.READ}), now)
    await gateway.app.store.tokens.add("nobody", tokens.hash_token(nobody), frozenset(), now)
    paths = [f"/devices/{device_id}/{route}" for route in DATA_ROUTES] + ["/sensors"]
    for path in paths:
        bare = await gateway.api.get(path, headers={"Authorization": ""})
        assert bare.status_code == 401, path
        assert bare.json()["error"]["code"] == "unauthorized"
        wrong = await gateway.api.get(path, headers={"Authorization": "Bearer gat_not-a-token"})
        assert wrong.status_code == 401, path
        scopeless = await gateway.api.get(path, headers={"Authorization": f"Bearer {nobody}"})
        assert scopeless.status_code == 403, path
        allowed = await gateway.api.get(path, headers={"Authorization": f"Bearer {reader}"})
        assert allowed.status_code == 200, (path, allowed.text)


async def test_data_routes_of_an_unknown_device_are_404(gateway: Harness) -> None:
    """Every per-device data route answers 404 with the error body for a device that does not exist."""
    for route in DATA_ROUTES:
        response = await gateway.api.get(f"/devices/no-such-device/{route}")
        assert response.status_code == 404, route
        assert set(response.json()["error"]) == {"code", "message"}
    assert (await gateway.api.get("/sensors", params={"device": "no-such-device"})).json() == {"data": []}


async def test_rows_of_a_device_deleted_while_queued_are_dropped_not_failing_the_batch(
    gateway: Harness,
) -> None:
    """A batch holding rows of a deleted device stores the live device's rows and counts the rest."""
    live_id, _ = await gateway.register()
    now = utcnow()
    result = await gateway.app.data.write_batch(
        IngestBatch(
            readings=[reading_row(live_id, now, 1), reading_row("gone", now, 2)],
            health=[health_row("gone", now)],
            last_data={live_id: now, "gone": now},
        )
    )
    assert (result.stored, result.dropped_unknown_device) == (1, 2)
    assert [r["value"] for r in await readings_of(gateway, live_id)] == [1]


async def test_a_device_deleted_and_registered_again_gets_its_sensors_again(gateway: Harness) -> None:
    """Deleting a device removes its sensors; the same id registered again gets them back from readings."""
    first = await gateway.device(device_id="hw-0001")
    client = await gateway.connect(first)
    await client.publish("devices/hw-0001/readings", '{"sensor":"t","value":1,"unit":"Cel"}', qos=1)
    assert [s["name"] for s in (await get_json(gateway, "/sensors", device="hw-0001"))["data"]] == ["t"]
    assert (await gateway.api.delete("/devices/hw-0001")).status_code == 200
    await client.wait_closed(timeout=5)

    again = await gateway.device(device_id="hw-0001")
    client = await gateway.connect(again)
    await client.publish("devices/hw-0001/readings", '{"sensor":"t","value":2,"unit":"Cel"}', qos=1)
    assert [r["value"] for r in await readings_of(gateway, "hw-0001")] == [2]
    sensors = (await get_json(gateway, "/sensors", device="hw-0001"))["data"]
    assert [(s["name"], s["unit"]) for s in sensors] == [("t", "Cel")]
