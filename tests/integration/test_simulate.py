"""`gateway simulate` end to end: a real `gateway serve`, the simulator as a real process that
registers and enrolls its devices through the API and publishes over mutual-TLS MQTT, and the
API showing what arrived (DESIGN.md §5-§7).

One gateway serves the module; each test uses its own device id prefix.
"""

from __future__ import annotations

import json
import signal
import ssl
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.processes import (
    GATEWAY,
    Gateway,
    Processes,
    is_event,
    mode,
    start_gateway,
)

SENSORS = {"temperature", "humidity", "pressure", "co2", "open"}
READINGS_PER_TICK = len(SENSORS)
RUN_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    processes = Processes()
    try:
        yield start_gateway(processes, tmp_path_factory.mktemp("simulate"))
    finally:
        processes.stop_all()


@pytest.fixture
def processes() -> Iterator[Processes]:
    children = Processes()
    try:
        yield children
    finally:
        children.stop_all()


def api(gw: Gateway) -> httpx.Client:
    """An operator's HTTPS client of the gateway's API (admin token, the gateway's CA)."""
    root = gw.cli.cwd
    return httpx.Client(
        base_url=f"https://127.0.0.1:{gw.api_port}/api/v1",
        headers={"Authorization": f"Bearer {(root / 'data' / 'admin.token').read_text().strip()}"},
        verify=ssl.create_default_context(cafile=str(root / "certs" / "ca.crt")),
        timeout=30,
    )


def wait_for_readings(gw: Gateway, device_id: str, timeout: float = 30.0) -> None:
    """Polls the API until the device has stored readings; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    with api(gw) as http:
        while time.monotonic() < deadline:
            response = http.get(f"/devices/{device_id}/readings", params={"limit": 1})
            if response.status_code == 200 and response.json()["data"]:
                return
            time.sleep(0.1)
    pytest.fail(f"no readings from {device_id} within {timeout} s")


def simulate(gw: Gateway, *args: str) -> dict[str, Any]:
    """Runs `gateway simulate ... --json` to its end: exit 0 and exactly one JSON document."""
    result = gw.cli("simulate", *args, "--json", timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def test_simulated_devices_publish_into_the_api(served: Gateway) -> None:
    """Three devices for 2 s at QoS 1: all acknowledged, none failed, every acknowledged reading stored."""
    summary = simulate(served, "--devices", "3", "--interval", "0.2", "--duration", "2", "--qos", "1")
    assert (summary["registered"], summary["reused"], summary["sessions"]) == (3, 0, 3)
    assert summary["acknowledged"] > 0
    assert summary["failed"] == 0
    assert summary["acknowledged"] == summary["sent"]
    assert (summary["rejected"], summary["connect_failures"], summary["disconnects"]) == (0, 0, 0), summary
    ids = ["sim-0001", "sim-0002", "sim-0003"]
    stored = 0
    with api(served) as http:
        for device_id in ids:
            readings = http.get(f"/devices/{device_id}/readings", params={"limit": 1000}).json()["data"]
            assert {r["sensor"] for r in readings} == SENSORS
            stored += len(readings)
            latest = http.get(f"/devices/{device_id}/health/latest").json()["data"]
            assert latest is not None
            assert latest["readings_sent"] > 0
            assert latest["readings_dropped"] == 0
            components = http.get(f"/devices/{device_id}/components").json()["data"]
            assert {c["id"] for c in components} == {"env", "air", "door"}
            assert {s["name"] for c in components for s in c["sensors"]} == SENSORS
            device = http.get(f"/devices/{device_id}").json()["data"]
            assert device["application"] == "gateway-simulator"
            assert device["status"] == "active", "the first session was the check-in"
            assert (device["connection"], device["disconnect_reason"]) == ("offline", "client_disconnect")
    # Per session: info and components, then a readings and a health message per tick.
    ticks = (summary["acknowledged"] - 2 * len(ids)) // 2
    assert stored == ticks * READINGS_PER_TICK, "a PUBACK means the reading was committed"
    assert mode(served.cli.cwd / "data" / "simulator" / "sim-0001" / "device.key") == 0o600


def test_a_rerun_reuses_enrolled_devices(served: Gateway) -> None:
    """A second run with one device more reuses the enrolled ones and registers only the new one."""
    first = simulate(served, "--devices", "2", "--prefix", "again", "--interval", "0.5", "--duration", "0.5")
    assert (first["registered"], first["reused"]) == (2, 0)
    second = simulate(served, "--devices", "3", "--prefix", "again", "--interval", "0.5", "--duration", "1")
    assert (second["registered"], second["reused"], second["sessions"]) == (1, 2, 3)
    assert second["failed"] == 0
    assert second["acknowledged"] == second["sent"] > 0


def test_a_device_it_did_not_enroll_is_refused_up_front(served: Gateway) -> None:
    """An id taken by someone else's device stops the run before anything is registered, naming it."""
    with api(served) as http:
        taken = http.post("/devices", json={"name": "Not the simulator's", "id": "taken-0002"})
        assert taken.status_code == 201, taken.text
        error = served.cli.fails("simulate", "--devices", "2", "--prefix", "taken", "--duration", "1")
        assert "taken-0002" in error
        assert "gateway devices delete" in error
        assert http.get("/devices/taken-0001").status_code == 404, "nothing registered before the refusal"


def test_sigterm_stops_cleanly_with_a_summary(served: Gateway, processes: Processes) -> None:
    """SIGTERM during a run without --duration: exit 0, one JSON summary, sessions closed with DISCONNECT."""
    at = served.log.mark()
    child = processes.start(
        [*GATEWAY, "simulate", "--devices", "2", "--interval", "0.3", "--prefix", "sig", "--json"],
        cwd=served.cli.cwd,
        env=served.cli.env,
    )
    for device_id in ("sig-0001", "sig-0002"):
        served.log.wait_for(
            is_event("presence.online", device_id=device_id), f"{device_id} online", since=at, timeout=60
        )
    wait_for_readings(served, "sig-0002")
    child.proc.send_signal(signal.SIGTERM)
    assert child.proc.wait(timeout=60) == 0, child.output
    summary = json.loads(child.out.text)
    assert summary["sessions"] == 2
    assert summary["failed"] == 0
    assert summary["acknowledged"] == summary["sent"] >= 6, "info, components and a tick of each device"
    assert "Traceback" not in child.err.text
    for device_id in ("sig-0001", "sig-0002"):
        served.log.wait_for(
            is_event("presence.offline", device_id=device_id, reason="client_disconnect"),
            f"{device_id} offline",
            since=at,
            timeout=20,
        )
