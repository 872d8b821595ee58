"""`kill -9` of a real `gateway serve` loses no acknowledged QoS 1 reading (DESIGN.md §8).

The gateway runs as a child process (this checkout, ``python -m gateway serve``, ports
chosen by the kernel and read from its ``gateway.started`` log line). Devices enrolled
over its API publish numbered QoS 1 readings as fast as it lets them, pipelined; every
sequence number whose PUBACK arrived is recorded. The gateway is killed with SIGKILL
mid-stream, restarted on the same directories, and every acknowledged number must be in
its database. Run against acknowledge-on-receipt (stock amqtt's behaviour, with a long
batch delay), the same check finds acknowledged readings missing: the test can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import ca
from ca import files as ca_files
from gateway.mqtt_client import ConnectionClosed, MqttClient, MqttError
from tests.integration.test_cli import (
    GATEWAY,
    HOST,
    START_TIMEOUT_S,
    Lines,
    Processes,
    base_env,
    is_event,
    json_line,
)

DEVICES = 4
MAX_INFLIGHT = 50
RUN_BEFORE_KILL_S = 1.5
MIN_ACKED = 100  # fewer acknowledged readings would make the check meaningless

SAFE: dict[str, str] = {}  # the defaults: PUBACK after commit, 5 ms group commit
UNSAFE = {  # acknowledge on receipt and commit only every 5 s: a crash loses what was acknowledged
    "GATEWAY_INGEST__ACK_AFTER_COMMIT": "false",
    "GATEWAY_INGEST__MAX_BATCH_DELAY_MS": "5000",
    "GATEWAY_INGEST__MAX_BATCH_ROWS": "100000",
}


@pytest.fixture
def processes() -> Iterator[Processes]:
    children = Processes()
    try:
        yield children
    finally:
        children.stop_all()


@dataclass
class Served:
    """A running `gateway serve` child."""

    proc: subprocess.Popen[str]
    log: Lines
    started: dict[str, Any]
    mqtt_port: int
    api_port: int


def serve(processes: Processes, root: Path, extra_env: dict[str, str]) -> Served:
    """Start `gateway serve` on `root`'s data and certs; return once it logged ``gateway.started``."""
    env = {
        **base_env(),
        "GATEWAY_PATHS__DATA_DIR": str(root / "data"),
        "GATEWAY_PATHS__CERTS_DIR": str(root / "certs"),
        "GATEWAY_LOGGING__LEVEL": "warning",  # keep the child's pipe quiet under load
        **extra_env,
    }
    child = processes.start([*GATEWAY, "serve"], cwd=root, env=env)
    line = child.err.wait_for(is_event("gateway.started"), "gateway.started", timeout=START_TIMEOUT_S)
    started = json_line(line)
    assert started is not None
    return Served(child.proc, child.err, started, int(started["mqtt_port"]), int(started["api_port"]))


@dataclass(frozen=True)
class Device:
    id: str
    tls: ssl.SSLContext


async def enroll_devices(root: Path, gw: Served, count: int) -> list[Device]:
    """Register `count` devices and enroll each (key made here, CSR to the provisioning endpoint)."""
    ca_path = root / "certs" / "ca.crt"
    token = (root / "data" / "admin.token").read_text().strip()
    devices = []
    async with httpx.AsyncClient(
        base_url=f"https://{HOST}:{gw.api_port}/api/v1",
        verify=ssl.create_default_context(cafile=str(ca_path)),
        timeout=20,
    ) as api:
        for index in range(count):
            registered = await api.post(
                "/devices", json={"name": f"crash-{index}"}, headers={"Authorization": f"Bearer {token}"}
            )
            assert registered.status_code == 201, registered.text
            key = ca.generate_key()
            request = {
                "token": registered.json()["registration_token"],
                "csr": ca.make_csr(key, "x").decode(),
            }
            provisioned = await api.post("/devices/provision", json=request)
            assert provisioned.status_code == 200, provisioned.text
            body = provisioned.json()
            folder = root / "devices" / body["device_id"]
            folder.mkdir(parents=True)
            ca_files.write_private_key(folder / "device.key", key, overwrite=True)
            (folder / "device.crt").write_text(body["certificate"])
            context = ssl.create_default_context(cafile=str(ca_path))
            context.load_cert_chain(str(folder / "device.crt"), str(folder / "device.key"))
            devices.append(Device(body["device_id"], context))
    return devices


async def publish_until_cut(client: MqttClient, device_id: str, acked: set[int]) -> int:
    """Publish readings 0, 1, 2... pipelined until the connection dies; returns how many were sent."""
    sent = 0

    def record(seq: int) -> Any:
        def done(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                acked.add(seq)

        return done

    topic = f"devices/{device_id}/readings"
    with contextlib.suppress(ConnectionClosed, MqttError, OSError):
        while True:
            payload = json.dumps({"sensor": "seq", "value": sent})
            ack = await client.publish_nowait_ack(topic, payload, qos=1)  # waits for a free slot
            ack.add_done_callback(record(sent))
            sent += 1
    return sent


def stored_sequences(db: Path) -> dict[str, set[int]]:
    """Sequence numbers in the database, per device."""
    found: dict[str, set[int]] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for device_id, value in conn.execute("SELECT device_id, value_num FROM readings WHERE sensor='seq'"):
            found.setdefault(device_id, set()).add(int(value))
    return found


async def streaming(acked: dict[str, set[int]]) -> None:
    """Return once the devices have published for RUN_BEFORE_KILL_S and MIN_ACKED PUBACKs came back."""
    start = time.monotonic()
    while time.monotonic() - start < RUN_BEFORE_KILL_S or sum(map(len, acked.values())) < MIN_ACKED:
        if time.monotonic() - start > 20:
            pytest.fail(f"only {sum(map(len, acked.values()))} PUBACKs in 20 s")
        await asyncio.sleep(0.05)


@dataclass
class CrashRun:
    """What one publish-kill-restart run saw: sequence numbers per device id."""

    acked: dict[str, set[int]]
    stored: dict[str, set[int]]
    sent: int

    @property
    def acked_count(self) -> int:
        return sum(map(len, self.acked.values()))

    @property
    def stored_count(self) -> int:
        return sum(map(len, self.stored.values()))

    def lost(self) -> dict[str, set[int]]:
        """Acknowledged but not stored, per device."""
        return {
            device_id: missing
            for device_id, numbers in self.acked.items()
            if (missing := numbers - self.stored.get(device_id, set()))
        }


async def crash_run(processes: Processes, root: Path, extra_env: dict[str, str]) -> CrashRun:
    """Publish, SIGKILL, restart on the same directories; what was acknowledged and what was stored."""
    gw = serve(processes, root, extra_env)
    devices = await enroll_devices(root, gw, DEVICES)
    clients = []
    for device in devices:
        client = MqttClient(client_id=device.id, max_inflight=MAX_INFLIGHT, keepalive=30)
        await client.connect(HOST, gw.mqtt_port, ssl=device.tls, server_hostname=HOST, timeout=20)
        clients.append(client)
    acked: dict[str, set[int]] = {device.id: set() for device in devices}
    publishers = [
        asyncio.create_task(publish_until_cut(client, device.id, acked[device.id]))
        for client, device in zip(clients, devices, strict=True)
    ]
    try:
        await streaming(acked)
        os.kill(gw.proc.pid, signal.SIGKILL)
        sent = await asyncio.wait_for(asyncio.gather(*publishers), 20)
    finally:
        for task in publishers:
            task.cancel()
        for client in clients:
            await client.close()
    assert gw.proc.wait(timeout=10) == -signal.SIGKILL

    again = serve(processes, root, extra_env)
    assert again.started["recovered_offline"] == DEVICES, "the kill left every device ONLINE"
    stored = stored_sequences(root / "data" / "gateway.db")
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(timeout=15) == 0, again.log.text
    return CrashRun(acked, stored, sum(sent))


async def test_kill_9_loses_no_acknowledged_reading(tmp_path: Path, processes: Processes) -> None:
    """With PUBACK after commit, every reading acknowledged before SIGKILL is in the database afterwards."""
    run = await crash_run(processes, tmp_path, SAFE)
    assert run.acked_count >= MIN_ACKED, run.sent
    assert run.acked_count < run.sent, "the kill landed mid-stream, with readings still in flight"
    assert run.lost() == {}
    assert run.stored_count >= run.acked_count


async def test_the_crash_check_detects_acknowledge_on_receipt(tmp_path: Path, processes: Processes) -> None:
    """Acknowledging on receipt with a 5 s batch delay loses acknowledged readings, and the check sees it."""
    run = await crash_run(processes, tmp_path, UNSAFE)
    assert run.acked_count >= MIN_ACKED, run.sent
    assert run.lost() != {}, "acknowledge-on-receipt should have lost the uncommitted batch"
    assert run.stored_count < run.acked_count
