"""The `gateway` command line end to end, with real processes from a fresh directory.

`gateway serve`, `gateway tail` and the management commands run as subprocesses (the
code of this checkout, via ``python -m gateway``), devices are Mosquitto's own clients
(`mosquitto_pub`, `mosquitto_sub`), and ports are chosen by the kernel (port 0, read back
from the ``gateway.started`` log line; helpers in `tests.integration.processes`). DESIGN.md
§4, §5 and §7 are the contract checked.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import (
    GATEWAY,
    HOST,
    START_TIMEOUT_S,  # noqa: F401 - re-exported for test_crash.py
    Cli,
    Lines,  # noqa: F401 - re-exported for test_crash.py
    Processes,
    base_env,
    crl_serials,
    hold_connection,
    is_event,
    is_status,
    json_line,
    mode,
    publish,
    register_and_enroll,
    start_gateway,
    stop_gateway,
)


@pytest.fixture
def processes() -> Iterator[Processes]:
    children = Processes()
    try:
        yield children
    finally:
        children.stop_all()


def test_walk_through_from_a_fresh_directory(tmp_path: Path, processes: Processes) -> None:
    """serve, register, enroll, tail, Mosquitto clients, block, unblock, manage, revoke, SIGTERM."""
    # 1. `gateway serve` initialises a fresh directory and prints the admin token once.
    gw = start_gateway(processes, tmp_path)
    cli = gw.cli
    data, certs = tmp_path / "data", tmp_path / "certs"
    admin_token = (data / "admin.token").read_text().strip()
    assert admin_token
    assert gw.log.text.count(admin_token) == 1, "the admin token is printed exactly once"
    assert not any(admin_token in line for line in gw.log.lines if json_line(line)), "never in a log event"
    assert mode(data / "admin.token") == 0o600
    assert mode(certs / "ca.key") == 0o600

    # 2. Register: one JSON document, the token shown once.
    registered = cli.json("devices", "register", "Boiler sensor", "--id", "boiler-1")
    assert set(registered) == {"id", "name", "status", "registration_token", "token_expires_at"}
    assert registered["id"] == "boiler-1"
    assert registered["name"] == "Boiler sensor"
    assert registered["status"] == "pending"
    token = registered["registration_token"]

    # 3. Enroll as the device: key made locally (0600); the token works once.
    enrolled = cli.json("devices", "enroll", "--token", token, "--out", "dev")
    assert set(enrolled) == {"id", "certificate_serial", "not_after"}
    assert enrolled["id"] == "boiler-1"
    assert mode(tmp_path / "dev" / "device.key") == 0o600
    assert (tmp_path / "dev" / "device.crt").is_file() and (tmp_path / "dev" / "ca.crt").is_file()
    error = cli.fails("devices", "enroll", "--token", token, "--out", "dev-again")
    assert "already used" in error
    assert not (tmp_path / "dev-again" / "device.key").exists(), "no key is left behind on refusal"

    # 4. `gateway tail --json` issues its operator certificate on first use and connects.
    mark = gw.log.mark()
    tail_child = processes.start([*GATEWAY, "tail", "--json"], cwd=tmp_path, env=cli.env)
    tail = tail_child.out
    gw.log.wait_for(is_event("session.admitted"), "the tail's operator session", since=mark, timeout=15)
    assert mode(data / "operators" / "cli" / "operator.key") == 0o600

    # 5. Mosquitto's own clients as the device: a reading (check-in), then a held connection.
    code, output = publish(gw, Path("dev"), "boiler-1")
    assert code == 0, output
    assert "received PUBACK" in output
    sub = hold_connection(processes, gw, Path("dev"), "boiler-1")
    tail.wait_for(is_status("boiler-1", "online", epoch=2, client_ip=HOST), "boiler-1 ONLINE (epoch 2)")
    device = cli.json("devices", "show", "boiler-1")
    assert device["connection"] == "online"
    assert device["status"] == "active", "the first accepted connection is the check-in"
    assert device["last_data_at"] is not None, "the reading was stored"
    assert device["certificate"]["serial"] == enrolled["certificate_serial"]

    # 6. Block cuts the held session at once and refuses reconnects; unblock restores access.
    at = tail.mark()
    assert cli.json("devices", "block", "boiler-1")["blocked"] is True
    tail.wait_for(is_status("boiler-1", "offline", reason="blocked"), "boiler-1 OFFLINE blocked", since=at)
    # mosquitto_sub reconnects on its own, is refused (CONNACK 5) and gives up.
    assert sub.proc.wait(timeout=10) != 0
    assert "not authorised" in sub.output
    code, output = publish(gw, Path("dev"), "boiler-1")
    assert code != 0
    assert "Connection Refused: not authorised" in output
    tail.wait_for(
        is_event("connect_failed", reason="device_blocked", client_id="boiler-1"), "connect_failed", since=at
    )
    assert cli.json("devices", "unblock", "boiler-1")["blocked"] is False
    code, output = publish(gw, Path("dev"), "boiler-1")
    assert code == 0, output

    # 7. Query and manage.
    listed = cli.json("devices", "list")
    assert listed["total"] == 1
    assert [d["id"] for d in listed["data"]] == ["boiler-1"]
    table = cli("devices", "list")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "STATUS", "CONNECTION"]
    assert rows[0].startswith("boiler-1  Boiler sensor  active")
    assert cli.json("devices", "rename", "boiler-1", "Boiler room")["name"] == "Boiler room"
    assert cli.json("devices", "show", "boiler-1")["name"] == "Boiler room"
    assert cli.json("devices", "deactivate", "boiler-1")["status"] == "inactive"
    code, output = publish(gw, Path("dev"), "boiler-1")
    assert code != 0
    assert "not authorised" in output
    assert cli.json("devices", "activate", "boiler-1")["status"] == "active"
    assert cli.json("devices", "revoke", "boiler-1")["status"] == "revoked"
    assert int(enrolled["certificate_serial"], 16) in crl_serials(certs)
    at = gw.log.mark()
    code, output = publish(gw, Path("dev"), "boiler-1")
    assert code != 0
    assert "received CONNACK" not in output, "refused at TLS, before MQTT"
    gw.log.wait_for(
        lambda line: is_event("tls.handshake_failed")(line) and "revoked" in line, "TLS refusal", since=at
    )
    assert "revoked" in cli.fails("devices", "activate", "boiler-1")

    # 8. SIGTERM with a device connected: exit 0 within 10 s, the device stored OFFLINE with
    #    gateway_shutdown; a tail of the restarted gateway shows it as the current status.
    register_and_enroll(gw, "Pump", "pump-1", "pump")
    at = tail.mark()
    hold_connection(processes, gw, Path("pump"), "pump-1")
    tail.wait_for(is_status("pump-1", "online", epoch=1), "pump-1 ONLINE", since=at)
    stop_gateway(gw)
    gw.log.wait_for(is_event("presence.offline", device_id="pump-1", reason="gateway_shutdown"), "shutdown")
    assert tail_child.proc.wait(timeout=10) == 1, "the tail reports that it lost the gateway"
    assert "error: lost the MQTT connection" in tail_child.err.text
    assert "Traceback" not in gw.log.text + tail_child.err.text

    again = start_gateway(processes, tmp_path)
    assert again.started["recovered_offline"] == 0, "nothing was left ONLINE"
    assert "Admin API token" not in again.log.text, "a restart never makes a new admin token"
    current = again.cli("tail", "--json", "--count", "2", timeout=20)
    assert current.returncode == 0, current.stderr
    statuses = {m["payload"]["device_id"]: m for m in map(json.loads, current.stdout.splitlines())}
    assert statuses["pump-1"]["retained"] is True
    assert statuses["pump-1"]["payload"]["status"] == "offline"
    assert statuses["pump-1"]["payload"]["reason"] == "gateway_shutdown"
    assert statuses["boiler-1"]["payload"]["status"] == "offline"
    pump = again.cli.json("devices", "show", "pump-1")
    assert (pump["connection"], pump["disconnect_reason"]) == ("offline", "gateway_shutdown")
    stop_gateway(again)


def test_live_tail_sees_devices_go_offline_at_shutdown(tmp_path: Path, processes: Processes) -> None:
    """A `gateway tail` running through a SIGTERM prints the connected device OFFLINE (gateway_shutdown)."""
    gw = start_gateway(processes, tmp_path)
    register_and_enroll(gw, "Pump", "pump-1", "pump")
    tail = processes.start([*GATEWAY, "tail", "--json"], cwd=tmp_path, env=gw.cli.env).out
    hold_connection(processes, gw, Path("pump"), "pump-1")
    tail.wait_for(is_status("pump-1", "online", epoch=1), "pump-1 ONLINE")
    stop_gateway(gw)
    tail.wait_for(
        is_status("pump-1", "offline", reason="gateway_shutdown"), "pump-1 OFFLINE gateway_shutdown"
    )


def test_help_lists_the_commands(tmp_path: Path) -> None:
    """`gateway --help` and `gateway devices --help` exit 0 and name every command."""
    cli = Cli(tmp_path, base_env())
    top = cli("--help")
    assert top.returncode == 0, top.stderr
    for command in ("init", "serve", "devices", "operators", "tail"):
        assert re.search(rf"^\W*{command}\s", top.stdout, re.MULTILINE), command
    sub = cli("devices", "--help")
    assert sub.returncode == 0, sub.stderr
    for command in ("register", "reset", "enroll", "list", "show", "rename", "certificates", "attach-cert",
                    "block", "unblock", "deactivate", "activate", "revoke", "delete"):  # fmt: skip
        assert re.search(rf"^\W*{command}\s", sub.stdout, re.MULTILINE), command


def test_management_command_without_a_gateway_fails_clearly(tmp_path: Path) -> None:
    """With no gateway listening, `devices list` and `tail` exit 1 with an `error: cannot reach ...` line."""
    cli = Cli(tmp_path, base_env())
    cli.json("init")
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    cli.env["GATEWAY_API__URL"] = f"https://{HOST}:{port}"
    cli.env["GATEWAY_MQTT__PORT"] = str(port)
    assert cli.fails("devices", "list").startswith(
        f"error: cannot reach the gateway API at https://{HOST}:{port}"
    )
    assert cli.fails("tail").startswith("error: cannot reach")


def test_init_prints_the_token_once_and_never_overwrites(tmp_path: Path) -> None:
    """`gateway init --json` prints one document with the admin token; a second run changes nothing."""
    cli = Cli(tmp_path, base_env())
    first = cli.json("init")
    assert first["admin_token"]
    assert first["admin_token"] == (tmp_path / "data" / "admin.token").read_text().strip()
    assert mode(tmp_path / "certs" / "ca.key") == 0o600
    ca_cert, ca_key = (
        (tmp_path / "certs" / "ca.crt").read_bytes(),
        (tmp_path / "certs" / "ca.key").read_bytes(),
    )
    token_file = (tmp_path / "data" / "admin.token").read_bytes()

    second = cli.json("init")
    assert second["created"] == []
    assert second["admin_token"] is None
    assert (tmp_path / "certs" / "ca.crt").read_bytes() == ca_cert
    assert (tmp_path / "certs" / "ca.key").read_bytes() == ca_key
    assert (tmp_path / "data" / "admin.token").read_bytes() == token_file
    again = cli("init")
    assert again.returncode == 0
    assert "nothing changed" in again.stdout

    # Locked out (every admin token revoked or lost): a fresh one, from the host itself.
    fresh = cli.json("init", "--new-admin-token")
    assert fresh["admin_token"] and fresh["admin_token"] != first["admin_token"]
    assert fresh["admin_token"] == (tmp_path / "data" / "admin.token").read_text().strip()
    assert mode(tmp_path / "data" / "admin.token") == 0o600
    assert (tmp_path / "certs" / "ca.key").read_bytes() == ca_key, "the CA is still never touched"
