"""The `gateway` command line end to end, with real processes from a fresh directory.

`gateway serve`, `gateway tail` and the management commands run as subprocesses (the
code of this checkout, via ``python -m gateway``), devices are Mosquitto's own clients
(`mosquitto_pub`, `mosquitto_sub`), and ports are chosen by the kernel (port 0, read back
from the ``gateway.started`` log line). DESIGN.md §4, §5 and §7 are the contract checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
GATEWAY = [sys.executable, "-m", "gateway"]
READING = '{"sensor":"t","value":21.5}'
START_TIMEOUT_S = 20.0


def base_env() -> dict[str, str]:
    """The environment of every child: this checkout's code, loopback, kernel-chosen ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(GATEWAY_MQTT__HOST=HOST, GATEWAY_MQTT__PORT="0", GATEWAY_API__HOST=HOST, GATEWAY_API__PORT="0")
    return env


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Lines:
    """The lines of a child's pipe, read on a thread so that the child never blocks on it."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """A position: `wait_for(..., since=mark)` looks only at lines that came after it."""
        with self._cond:
            return len(self.lines)

    def wait_for(
        self, predicate: Callable[[str], bool], what: str, *, since: int = 0, timeout: float = 5.0
    ) -> str:
        """The first line from `since` on that satisfies `predicate`; fails the test after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[since:]:
                    if predicate(line):
                        return line
                since = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    collected = "\n".join(self.lines)
                    pytest.fail(f"no line with {what} within {timeout} s; collected so far:\n{collected}")
                self._cond.wait(remaining)


def json_line(line: str) -> dict[str, Any] | None:
    try:
        document = json.loads(line)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def is_status(device_id: str, status: str, **fields: Any) -> Callable[[str], bool]:
    """Matches a `gateway tail --json` line carrying this status of this device (and `fields`)."""

    def match(line: str) -> bool:
        message = json_line(line)
        if message is None or message.get("topic") != f"gateway/status/{device_id}":
            return False
        payload = message["payload"]
        return payload["status"] == status and all(payload.get(k) == v for k, v in fields.items())

    return match


def is_event(event: str, **fields: Any) -> Callable[[str], bool]:
    """Matches a gateway JSON log line (or a tail event payload) with this event name and `fields`."""

    def match(line: str) -> bool:
        document = json_line(line)
        if document is None:
            return False
        body = document.get("payload", document)
        if not isinstance(body, dict):
            return False
        name = body.get("event", body.get("kind"))
        return bool(name == event and all(body.get(k) == v for k, v in fields.items()))

    return match


@dataclass
class Cli:
    """Runs `gateway ...` in one directory with one environment, as an operator's shell would."""

    cwd: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*GATEWAY, *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str) -> Any:
        """Runs a command with ``--json``: exit 0 and exactly one JSON document on stdout."""
        result = self(*args, "--json")
        assert result.returncode == 0, (
            f"gateway {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
        return json.loads(result.stdout)  # refuses anything but exactly one document

    def fails(self, *args: str) -> str:
        """Runs a command that must fail: exit 1 and an ``error: ...`` line on stderr; returns it."""
        result = self(*args)
        assert result.returncode == 1, (
            f"gateway {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors, f"no error line on stderr:\n{result.stderr}"
        assert "Traceback" not in result.stderr
        return errors[0]


@dataclass
class Child:
    """A long-lived child process and what it prints on stdout and stderr."""

    proc: subprocess.Popen[str]
    out: Lines
    err: Lines

    @property
    def output(self) -> str:
        return self.out.text + "\n" + self.err.text


class Processes:
    """Every long-lived child of a test; the fixture kills whatever still runs at teardown."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> Child:
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self._children.append(proc)
        assert proc.stdout is not None and proc.stderr is not None
        return Child(proc, Lines(proc.stdout), Lines(proc.stderr))

    def stop_all(self) -> None:
        for proc in self._children:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    children = Processes()
    try:
        yield children
    finally:
        children.stop_all()


@dataclass
class Gateway:
    """A running `gateway serve` child and the CLI environment that finds it."""

    proc: subprocess.Popen[str]
    log: Lines
    started: dict[str, Any]  # the gateway.started log event
    mqtt_port: int
    api_port: int
    cli: Cli


def start_gateway(processes: Processes, cwd: Path) -> Gateway:
    """Starts `gateway serve` in `cwd` and waits for its ``gateway.started`` line (ports in it)."""
    env = base_env()
    child = processes.start([*GATEWAY, "serve"], cwd=cwd, env=env)
    log = child.err
    started = json_line(log.wait_for(is_event("gateway.started"), "gateway.started", timeout=START_TIMEOUT_S))
    assert started is not None
    mqtt_port, api_port = int(started["mqtt_port"]), int(started["api_port"])
    cli_env = {**env, "GATEWAY_MQTT__PORT": str(mqtt_port), "GATEWAY_API__URL": f"https://{HOST}:{api_port}"}
    return Gateway(child.proc, log, started, mqtt_port, api_port, Cli(cwd, cli_env))


def stop_gateway(gw: Gateway) -> None:
    """SIGTERM, as a container runtime sends it: a clean exit (status 0) within 10 s."""
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=10) == 0, gw.log.text


def mosquitto(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed (Debian package 'mosquitto-clients'); `make system-deps`")
    return found


def device_args(creds: Path, port: int, client_id: str) -> list[str]:
    """Mosquitto client options for a device that enrolled into `creds`."""
    return [
        "--cafile", str(creds / "ca.crt"),
        "--cert", str(creds / "device.crt"),
        "--key", str(creds / "device.key"),
        "-h", HOST, "-p", str(port), "-i", client_id,
    ]  # fmt: skip


def publish(gw: Gateway, creds: Path, device_id: str) -> tuple[int, str]:
    """One QoS 1 reading with `mosquitto_pub -d`; its exit status and all it printed."""
    result = subprocess.run(
        [mosquitto("mosquitto_pub"), *device_args(gw.cli.cwd / creds, gw.mqtt_port, device_id),
         "-t", f"devices/{device_id}/readings", "-m", READING, "-q", "1", "-d"],
        capture_output=True, text=True, timeout=15, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def hold_connection(processes: Processes, gw: Gateway, creds: Path, device_id: str) -> Child:
    """A long-lived device connection (`mosquitto_sub` on its own errors topic), once admitted.

    Readiness is read from the gateway's log: mosquitto_sub's own ``-d`` output is block-buffered
    into a pipe and would arrive late.
    """
    at = gw.log.mark()
    sub = processes.start(
        [mosquitto("mosquitto_sub"), *device_args(gw.cli.cwd / creds, gw.mqtt_port, device_id),
         "-t", f"devices/{device_id}/errors"],
        cwd=gw.cli.cwd, env=gw.cli.env,
    )  # fmt: skip
    gw.log.wait_for(is_event("presence.online", device_id=device_id), f"{device_id} online", since=at)
    return sub


def register_and_enroll(gw: Gateway, name: str, device_id: str, out: str) -> Any:
    """`devices register` then `devices enroll` into `out`; returns the enrollment summary."""
    token = gw.cli.json("devices", "register", name, "--id", device_id)["registration_token"]
    return gw.cli.json("devices", "enroll", "--token", token, "--out", out)


def crl_serials(certs: Path) -> set[int]:
    text = subprocess.run(
        ["openssl", "crl", "-in", str(certs / "crl.pem"), "-noout", "-text"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    return {int(serial, 16) for serial in re.findall(r"Serial Number:\s*([0-9A-Fa-f]+)", text)}


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
    for command in ("register", "enroll", "list", "show", "rename", "block", "unblock", "deactivate",
                    "activate", "revoke", "delete"):  # fmt: skip
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
