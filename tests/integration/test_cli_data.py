"""`gateway readings` and `gateway health` end to end: a real `gateway serve`, a device publishing
with Mosquitto's own client, and the CLI reading the data back through the API (DESIGN.md §5, §6).

One gateway serves the whole module (it only ever gains data here). The contract (one JSON
document on stdout, tables, error lines and exit status) is checked on `python -m gateway`
subprocesses; the option matrix runs the same Typer app in this process (`InProcess`),
because every subprocess pays the CLI's start-up (about 1 s on this machine).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.core.clock import iso
from tests.integration.processes import (
    Cli,
    Gateway,
    InProcess,
    Processes,
    base_env,
    device_args,
    mosquitto,
    start_gateway,
)

DEVICE = "probe-1"
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
READINGS = [
    {"sensor": "temperature", "component": "env", "value": 21.5, "unit": "Cel", "ts": iso(T0)},
    {"sensor": "door", "value": True, "ts": iso(T0 + timedelta(seconds=1))},
    {
        "sensor": "temperature",
        "component": "env",
        "value": 22.0,
        "unit": "Cel",
        "ts": iso(T0 + timedelta(minutes=5)),
    },
]
HEALTH = {
    "uptime_s": 4321.5,
    "free_heap_bytes": 150_000,
    "rssi_dbm": -61,
    "connection_type": "wifi",
    "readings_sent": 3,
    "readings_dropped": 0,
    "battery_pct": 87.5,
    "ts": iso(T0 + timedelta(minutes=5)),
}


@dataclass
class Fixture:
    gw: Gateway
    cli: Cli
    fast: InProcess


def publish(gw: Gateway, channel: str, payload: object) -> None:
    """One QoS 1 message from the enrolled device with `mosquitto_pub`; it must be acknowledged."""
    result = subprocess.run(
        [mosquitto("mosquitto_pub"), *device_args(gw.cli.cwd / "dev", gw.mqtt_port, DEVICE),
         "-t", f"devices/{DEVICE}/{channel}", "-m", json.dumps(payload), "-q", "1", "-d"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "received PUBACK" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    processes = Processes()
    try:
        gw = start_gateway(processes, tmp_path_factory.mktemp("cli-data"))
        root = gw.cli.cwd
        fast = InProcess.beside(gw)
        token = fast.json("devices", "register", "Probe", "--id", DEVICE)["registration_token"]
        fast.json("devices", "enroll", "--token", token, "--out", str(root / "dev"))
        publish(gw, "readings", READINGS)  # PUBACK only after commit: readable at once
        publish(gw, "health", HEALTH)
        yield Fixture(gw, gw.cli, fast)
    finally:
        processes.stop_all()


def test_readings_json_shows_what_the_device_published(served: Fixture) -> None:
    """`gateway readings ID --json` prints one document with every reading, newest first, typed as sent."""
    document = served.cli.json("readings", DEVICE)
    assert set(document) == {"data", "next_cursor"}
    assert document["next_cursor"] is None
    got = [(r["sensor"], r["component"], r["value"], r["unit"], r["ts"]) for r in document["data"]]
    expected = [(r["sensor"], r.get("component"), r["value"], r.get("unit"), r["ts"]) for r in READINGS]
    assert got == expected[::-1]
    assert document["data"][1]["value_type"] == "boolean"


def test_readings_filters_and_pages(served: Fixture) -> None:
    """--sensor, --component, --since/--until (ISO and durations) and --limit/--cursor narrow the rows."""
    cli = served.fast
    temps = cli.json("readings", DEVICE, "--sensor", "temperature")["data"]
    assert [r["value"] for r in temps] == [22.0, 21.5]
    env = cli.json("readings", DEVICE, "--component", "env")["data"]
    assert {r["sensor"] for r in env} == {"temperature"}
    assert len(cli.json("readings", DEVICE, "--since", "1h")["data"]) == 3
    assert cli.json("readings", DEVICE, "--until", "1h")["data"] == [], "nothing is older than an hour"
    late = cli.json("readings", DEVICE, "--since", iso(T0 + timedelta(minutes=1)) or "")["data"]
    assert [r["value"] for r in late] == [22.0]
    first = cli.json("readings", DEVICE, "--limit", "2")
    assert len(first["data"]) == 2
    assert first["next_cursor"]
    rest = cli.json("readings", DEVICE, "--cursor", first["next_cursor"])
    assert [r["value"] for r in rest["data"]] == [21.5]
    assert rest["next_cursor"] is None


def test_readings_table(served: Fixture) -> None:
    """Without --json, a table with a header and one line per reading, booleans as true/false."""
    result = served.cli("readings", DEVICE)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["TIME", "COMPONENT", "SENSOR", "VALUE", "UNIT"]
    assert len(rows) == 4, result.stdout  # three readings and the count line
    assert rows[1].split()[1:] == ["-", "door", "true", "-"]
    assert rows[-1].startswith("3 reading(s), newest first")


def test_health_latest_json_is_the_report_sent(served: Fixture) -> None:
    """`gateway health ID --latest --json` prints one document holding the report as the device sent it."""
    latest = served.cli.json("health", DEVICE, "--latest")
    assert set(latest) == {"data"}
    for key, value in HEALTH.items():
        assert latest["data"][key] == value, key


def test_health_history_summary_and_table(served: Fixture) -> None:
    """The health history and --summary agree with the one report; --latest without --json is a table."""
    cli = served.fast
    history = cli.json("health", DEVICE, "--since", "1h")
    assert [h["uptime_s"] for h in history["data"]] == [HEALTH["uptime_s"]]
    assert cli.json("health", DEVICE, "--until", "1h")["data"] == []
    summary = cli.json("health", DEVICE, "--summary", "1h")["data"]
    assert summary["samples"] == 1
    assert summary["rssi_dbm"] == {"min": -61, "max": -61, "mean": -61}
    table = cli("health", DEVICE, "--latest")
    assert table.exit_code == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["TIME", "UPTIME", "S"]
    assert "4321.5" in row.split()


def test_unknown_device_fails_clearly(served: Fixture) -> None:
    """`gateway readings` of an unknown device exits 1 with one `error:` line naming it, and no output."""
    result = served.cli("readings", "no-such-device", "--json")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip() == "error: device no-such-device not found [device_not_found]"


def test_bad_options_fail_clearly(served: Fixture) -> None:
    """An unknown device for health, a bad time or window and clashing options each give one error line."""
    cli = served.fast
    assert "no-such-device not found" in cli.fails("health", "no-such-device", "--latest")
    assert "invalid --since 'yesterday'" in cli.fails("readings", DEVICE, "--since", "yesterday")
    assert "invalid --until" in cli.fails("health", DEVICE, "--until", "soon")
    assert "invalid duration" in cli.fails("health", DEVICE, "--summary", "often")
    assert "not both" in cli.fails("health", DEVICE, "--latest", "--summary", "1h")
    assert "history only" in cli.fails("health", DEVICE, "--latest", "--since", "1h")


def test_help_shows_examples(tmp_path: Path) -> None:
    """`readings --help` and `health --help` exit 0 and show usage examples."""
    cli = InProcess(base_env())
    for command in ("readings", "health"):
        result = cli(command, "--help")
        assert result.exit_code == 0, result.output
        assert f"gateway {command} boiler-1 --" in result.stdout
        assert "--since" in result.stdout
