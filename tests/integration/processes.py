"""Real processes for the CLI's end-to-end tests: `gateway serve` and `gateway ...` children run
from a fresh directory with this checkout's code (``python -m gateway``), Mosquitto's own clients
as devices, and the lines the children print.

Ports are chosen by the kernel (port 0) and read back from the gateway's ``gateway.started``
log line. Shared by tests/integration/test_cli*.py and test_simulate.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from typer.testing import CliRunner, Result

from gateway.cli.main import app

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


@dataclass
class InProcess:
    """The `gateway` Typer app run in this process with the CLI environment of a running gateway."""

    env: dict[str, str]

    @classmethod
    def beside(cls, gw: Gateway) -> InProcess:
        """The CLI environment of `gw`, with its directories absolute (this process has another cwd)."""
        root = gw.cli.cwd
        return cls(
            {
                **gw.cli.env,
                "GATEWAY_PATHS__DATA_DIR": str(root / "data"),
                "GATEWAY_PATHS__CERTS_DIR": str(root / "certs"),
            }
        )

    def __call__(self, *args: str) -> Result:
        return CliRunner().invoke(app, list(args), env=self.env, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, f"gateway {' '.join(args)} exited {result.exit_code}:\n{result.stderr}"
        return json.loads(result.stdout)

    def fails(self, *args: str) -> str:
        """Runs a command that must fail: exit 1 and an ``error: ...`` line on stderr; returns it."""
        result = self(*args)
        assert result.exit_code == 1, f"gateway {' '.join(args)} exited {result.exit_code}:\n{result.output}"
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors, f"no error line on stderr:\n{result.stderr}"
        return errors[0]


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
