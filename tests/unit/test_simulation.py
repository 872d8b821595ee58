"""The simulator's pure core: payloads the gateway accepts, the provisioning decision table, counters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.payloads import Channel, Component, DeviceInfo, Health, Reading, parse
from gateway.core.simulation import (
    DOOR,
    READINGS_PER_MESSAGE,
    SENSORS,
    Action,
    Counters,
    Local,
    SimulatedDevice,
    device_ids,
    plan,
    plan_one,
)
from gateway.errors import InvalidValue

START = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
DEVICE_IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")


def tick(n: int) -> datetime:
    return START + timedelta(seconds=5 * n)


def device(device_id: str = "sim-0001") -> SimulatedDevice:
    return SimulatedDevice(device_id, started_at=START, version="9.9.9")


@settings(max_examples=30, deadline=None)
@given(device_id=DEVICE_IDS, ticks=st.integers(min_value=1, max_value=200))
def test_every_payload_is_accepted_by_the_gateways_parser(device_id: str, ticks: int) -> None:
    """Info, components and every tick's readings and health parse as DESIGN.md §7 payloads."""
    sim = device(device_id)
    info = parse(Channel.INFO, sim.info(), received_at=START)
    assert isinstance(info, DeviceInfo)
    assert info.fields["application_version"] == "9.9.9"
    components = parse(Channel.COMPONENTS, sim.components(), received_at=START)
    assert isinstance(components, list)
    declared = {(c.id, s.name) for c in components if isinstance(c, Component) for s in c.sensors}
    for n in range(1, ticks + 1):
        now = tick(n)
        found = parse(Channel.READINGS, sim.readings(now), received_at=now)
        assert isinstance(found, list)
        assert len(found) == READINGS_PER_MESSAGE
        assert all(isinstance(r, Reading) and r.ts == now for r in found)
        assert {(r.component, r.sensor) for r in found if isinstance(r, Reading)} == declared
        report = parse(Channel.HEALTH, sim.health(now), received_at=now)
        assert isinstance(report, Health)
        assert report.readings_sent == n * READINGS_PER_MESSAGE


def test_values_stay_realistic_over_a_long_run() -> None:
    """Over a simulated day every numeric sensor stays within three spreads of its nominal mean."""
    sim = device()
    seen: dict[str, list[float]] = {s.name: [] for s in SENSORS}
    for n in range(1, 17_281):
        for record in json.loads(sim.readings(tick(n))):
            if record["sensor"] != DOOR[1]:
                seen[record["sensor"]].append(record["value"])
    for s in SENSORS:
        values = seen[s.name]
        assert min(values) >= s.mean - 4 * s.spread, s.name
        assert max(values) <= s.mean + 4 * s.spread, s.name
        assert max(values) > min(values), f"{s.name} never changes"


def test_health_grows_uptime_and_keeps_fields_in_range() -> None:
    """Uptime grows with the clock; signal, heap and battery stay inside the contract's ranges."""
    sim = device("sim-0042")
    first = json.loads(sim.health(tick(1)))
    later = json.loads(sim.health(tick(721)))  # an hour on
    assert later["uptime_s"] == pytest.approx(first["uptime_s"] + 3600, abs=0.2)
    for report in (first, later):
        assert -150 <= report["rssi_dbm"] <= 0
        assert report["free_heap_bytes"] > 0
        assert report.get("battery_pct") is None or 0 <= report["battery_pct"] <= 100


def test_a_device_is_reproducible_from_its_id() -> None:
    """Two models of one id produce the same payloads; another id produces different ones."""
    one, again, other = device("a-1"), device("a-1"), device("a-2")
    assert [one.readings(tick(n)) for n in range(5)] == [again.readings(tick(n)) for n in range(5)]
    assert one.readings(tick(9)) != other.readings(tick(9))


def test_dropped_readings_show_in_health() -> None:
    """Readings the shell reports as dropped appear in the next health report."""
    sim = device()
    sim.readings(tick(1))
    sim.readings_dropped += READINGS_PER_MESSAGE
    report = json.loads(sim.health(tick(2)))
    assert report["readings_dropped"] == READINGS_PER_MESSAGE


def test_device_ids_are_numbered_and_validated() -> None:
    """Ids are PREFIX-0001.. (stable across runs); a prefix that makes an invalid id is refused."""
    assert device_ids("sim", 3) == ["sim-0001", "sim-0002", "sim-0003"]
    assert device_ids("lab.a", 12_345)[-1] == "lab.a-12345"
    for bad in ("", "-x", "a/b", "a+b", "x" * 60):
        with pytest.raises(InvalidValue):
            device_ids(bad, 1)


CERT = {"serial": "abc1", "fingerprint_sha256": "f" * 64, "not_after": "2030-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("remote", "local", "action"),
    [
        pytest.param(None, Local(), Action.REGISTER, id="unknown-device"),
        pytest.param(None, Local("abc1", None), Action.REGISTER, id="unknown-with-stale-files"),
        pytest.param({"status": "active", "certificate": CERT}, Local("abc1"), Action.REUSE, id="reuse"),
        pytest.param(
            {"status": "pending", "certificate": None}, Local(None, "grt_x"), Action.ENROLL, id="token"
        ),
        pytest.param(
            {"status": "active", "certificate": CERT}, Local("other"), Action.CONFLICT, id="new-cert"
        ),
        pytest.param({"status": "active", "certificate": CERT}, Local(), Action.CONFLICT, id="no-files"),
        pytest.param({"status": "pending", "certificate": None}, Local(), Action.CONFLICT, id="not-ours"),
        pytest.param(
            {"status": "revoked", "certificate": CERT}, Local("abc1"), Action.CONFLICT, id="revoked"
        ),
        pytest.param(
            {"status": "active", "blocked": True, "certificate": CERT},
            Local("abc1"),
            Action.REUSE,
            id="blocked",
        ),
    ],
)
def test_provisioning_decision_table(remote: dict[str, object] | None, local: Local, action: Action) -> None:
    """Each combination of gateway record and local state leads to its one provisioning action."""
    step = plan_one(remote, local)
    assert step.action is action
    assert bool(step.reason) == (action is Action.CONFLICT), "conflicts, and only they, say why"


def test_plan_covers_every_id() -> None:
    """`plan` decides for every id, looking each up in the gateway's records and the local state."""
    steps = plan(
        ["a", "b", "c"],
        {"b": {"status": "active", "certificate": CERT}},
        {"b": Local("abc1"), "c": Local("zzz")},
    )
    assert {i: s.action for i, s in steps.items()} == {
        "a": Action.REGISTER,
        "b": Action.REUSE,
        "c": Action.REGISTER,
    }


def test_counters_snapshot() -> None:
    """The summary reports rate over acknowledged messages and ack latency in milliseconds."""
    counters = Counters(devices=2, qos=1)
    counters.sent = 4
    for latency in (0.010, 0.030):
        counters.on_ack(latency)
    snapshot = counters.snapshot(timedelta(seconds=2))
    assert snapshot["acknowledged"] == 2
    assert snapshot["messages_per_s"] == 1.0
    assert snapshot["ack_latency_ms"] == {"mean": 20.0, "max": 30.0}
    assert "acked 2" in counters.progress_line(timedelta(seconds=2))
    idle = Counters(devices=1, qos=0)
    idle.sent = 10
    assert idle.snapshot(timedelta(seconds=5))["messages_per_s"] == 2.0
    assert idle.snapshot(timedelta(0))["ack_latency_ms"] == {"mean": None, "max": None}
    assert "acked" not in idle.progress_line(timedelta(seconds=1))
