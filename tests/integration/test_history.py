"""Connection history end to end over real mutual TLS: a row per session with how it ended, the
traffic counters byte for byte, retention per device and by age, and recovery after a restart."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import ca
from gateway.app import GatewayApp
from gateway.config import HistorySettings, Settings
from gateway.core.clock import utcnow
from gateway.core.history import SessionStart
from gateway.mqtt_client import (
    DISCONNECT,
    PacketType,
    decode_packet,
    encode_connect,
    encode_publish,
    encode_subscribe,
)
from gateway.store.history import HistoryStore
from tests.conftest import HOST, Creds, Harness, make_settings
from tests.integration.test_gateway import next_status, watcher

TIMEOUT_S = 10.0  # a shared 2-core machine: generous, never reached when things work
Json = dict[str, Any]


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Loopback settings; [history] overrides come by indirect parametrize."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    return make_settings(tmp_path).model_copy(update={"history": HistorySettings(**overrides)})


async def sessions(gw: Harness, device_id: str, **params: Any) -> Json:
    response = await gw.api.get(f"/devices/{device_id}/connections", params=params)
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until it holds; fails after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {TIMEOUT_S} s: {what}")
        await asyncio.sleep(0.05)


async def ended(gw: Harness, device_id: str, count: int) -> list[Json]:
    """The device's sessions once `count` of them have ended (newest first)."""
    found: list[Json] = []

    async def done() -> bool:
        nonlocal found
        found = (await sessions(gw, device_id))["data"]
        return sum(1 for s in found if s["disconnected_at"] is not None) >= count

    await eventually(done, f"{count} ended sessions of {device_id}")
    return found


def serial_of(creds: Creds) -> str:
    return ca.serial_hex(x509.load_pem_x509_certificate(creds.cert.read_bytes()).serial_number)


async def silent_session(gw: Harness, creds: Creds, keepalive: int) -> asyncio.StreamWriter:
    """A raw connection that says CONNECT (with `keepalive`) and then nothing at all."""
    reader, writer = await asyncio.open_connection(HOST, gw.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
    writer.write(encode_connect(client_id=creds.name, keepalive=keepalive, clean_session=True))
    await writer.drain()
    assert (await reader.readexactly(4))[3] == 0
    return writer


async def test_every_session_is_a_row_with_how_it_ended(gateway: Harness) -> None:
    """Disconnect, lost connection, take-over, block and keep-alive timeout each end one row, in order."""
    creds = await gateway.device()
    device_id = creds.name
    ops = await watcher(gateway)

    client = await gateway.connect(creds)
    await next_status(ops, device_id, "online")
    await client.disconnect()  # 1: client_disconnect
    await next_status(ops, device_id, "offline")
    client = await gateway.connect(creds)
    await next_status(ops, device_id, "online")
    await client.close()  # 2: connection_lost (no DISCONNECT)
    await next_status(ops, device_id, "offline")
    first = await gateway.connect(creds)  # 3: taken over by 4
    await next_status(ops, device_id, "online")
    await gateway.connect(creds)
    await first.wait_closed(timeout=TIMEOUT_S)
    await next_status(ops, device_id, "online")
    await gateway.api.post(f"/devices/{device_id}/block")  # 4: blocked
    await next_status(ops, device_id, "offline")
    await gateway.api.post(f"/devices/{device_id}/unblock")
    writer = await silent_session(gateway, creds, keepalive=1)  # 5: keepalive_timeout
    await next_status(ops, device_id, "online")
    await next_status(ops, device_id, "offline", timeout=TIMEOUT_S)
    writer.close()

    rows = await ended(gateway, device_id, 5)
    assert [(r["epoch"], r["reason"]) for r in rows] == [
        (5, "keepalive_timeout"),
        (4, "blocked"),
        (3, "taken_over"),
        (2, "connection_lost"),
        (1, "client_disconnect"),
    ]
    serial = serial_of(creds)
    for row in rows:
        assert (row["client_ip"], row["certificate_serial"]) == (HOST, serial)
        assert row["client_port"] > 0
        assert row["connected_at"] <= row["disconnected_at"]
        assert 0 <= row["duration_s"] < 60
    record = (await gateway.api.get(f"/devices/{device_id}")).json()["data"]
    assert record["disconnect_reason"] == rows[0]["reason"]  # the history agrees with presence


async def test_counters_are_the_bytes_and_publishes_that_crossed_the_connection(gateway: Harness) -> None:
    """bytes in/out equal what the device sent and received; messages in = its PUBLISHes, out = those
    delivered to it; the running session shows its counters so far."""
    creds = await gateway.device()
    device_id = creds.name
    reader, writer = await asyncio.open_connection(
        HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST
    )
    received = bytearray()
    packets: list[int] = []
    position = 0

    async def read_until(count: int) -> None:
        """Read until `count` packets in all have arrived (every byte kept in `received`)."""
        nonlocal position
        while len(packets) < count:
            decoded = decode_packet(received, position)
            if decoded is None:
                received.extend(await asyncio.wait_for(reader.read(65536), TIMEOUT_S))
                continue
            packet, position = decoded
            packets.append(packet.type)

    sent = encode_connect(client_id=device_id, keepalive=60, clean_session=True)
    sent += encode_subscribe(1, [(f"devices/{device_id}/errors", 0)])
    writer.write(sent)
    await read_until(2)  # CONNACK, SUBACK: the subscription is in place
    readings = [
        encode_publish(
            f"devices/{device_id}/readings",
            json.dumps({"sensor": "t", "value": i}).encode(),
            qos=1,
            packet_id=10 + i,
        )
        for i in range(7)
    ]
    denied = [encode_publish("devices/somebody-else/readings", b"{}", qos=0) for _ in range(2)]
    publishes = b"".join(readings) + b"".join(denied)
    writer.write(publishes)
    sent += publishes
    await read_until(2 + 7 + 2)  # then 7 PUBACKs and an error message per denied PUBLISH
    assert packets[:2] == [PacketType.CONNACK, PacketType.SUBACK]
    assert sorted(packets[2:]) == [PacketType.PUBLISH] * 2 + [PacketType.PUBACK] * 7

    [running] = (await sessions(gateway, device_id))["data"]
    assert running["disconnected_at"] is None and running["reason"] is None
    assert (running["messages_in"], running["messages_out"]) == (9, 2)
    assert (running["bytes_in"], running["bytes_out"]) == (len(sent), len(received))

    writer.write(DISCONNECT)
    await writer.drain()
    while chunk := await asyncio.wait_for(reader.read(65536), TIMEOUT_S):
        received.extend(chunk)  # nothing more is expected; counted if it came
    writer.close()
    [row] = await ended(gateway, device_id, 1)
    assert row["reason"] == "client_disconnect"
    assert (row["messages_in"], row["messages_out"]) == (9, 2)
    assert (row["bytes_in"], row["bytes_out"]) == (len(sent) + len(DISCONNECT), len(received))


@pytest.mark.parametrize("settings", [{"connections_per_device": 3}], indirect=True, ids=["keep-3"])
async def test_only_the_newest_sessions_of_a_device_are_kept(gateway: Harness) -> None:
    """With connections_per_device = 3, five sessions leave the newest three; another device keeps its own."""
    creds, other = await gateway.device(), await gateway.device()
    for _ in range(5):
        client = await gateway.connect(creds)
        await client.disconnect()
        await client.wait_closed(timeout=TIMEOUT_S)
        await ended(gateway, creds.name, 1)  # each session written before the next starts
    client = await gateway.connect(other)
    await client.disconnect()

    async def trimmed() -> bool:
        return (await sessions(gateway, creds.name))["total"] == 3

    await eventually(trimmed, "history trimmed to 3 sessions")
    page = await sessions(gateway, creds.name)
    assert [r["epoch"] for r in page["data"]] == [5, 4, 3]
    assert [r["epoch"] for r in (await ended(gateway, other.name, 1))] == [1]
    paged = await sessions(gateway, creds.name, limit=2, offset=1)
    assert ([r["epoch"] for r in paged["data"]], paged["total"]) == ([4, 3], 3)


@pytest.mark.parametrize("settings", [{"connections_days": 1e-6}], indirect=True, ids=["days-1e-6"])
async def test_sessions_that_ended_long_enough_ago_are_purged(gateway: Harness) -> None:
    """Past connections_days an ended session is deleted by the purge; a running one stays."""
    creds = await gateway.device()
    client = await gateway.connect(creds)
    await client.disconnect()
    await ended(gateway, creds.name, 1)
    await gateway.connect(creds)
    await asyncio.sleep(0.2)  # 1e-6 days is 86 ms
    assert await gateway.app.history.purge() == 1
    [left] = (await sessions(gateway, creds.name))["data"]
    assert (left["epoch"], left["disconnected_at"]) == (2, None)


async def test_an_unknown_device_has_no_history_and_a_reader_token_reads_one(gateway: Harness) -> None:
    """404 for an unknown device; a devices:read token reads a history; no token gets 401."""
    response = await gateway.api.get("/devices/nobody/connections")
    assert (response.status_code, response.json()["error"]["code"]) == (404, "device_not_found")
    creds = await gateway.device()
    created = await gateway.api.post("/tokens", json={"name": "reader", "scopes": ["devices:read"]})
    assert created.status_code == 201, created.text
    reader = {"Authorization": f"Bearer {created.json()['token']}"}
    response = await gateway.api.get(f"/devices/{creds.name}/connections", headers=reader)
    assert (response.status_code, response.json()["total"]) == (200, 0)
    response = await gateway.api.get(f"/devices/{creds.name}/connections", headers={"Authorization": ""})
    assert response.status_code == 401


async def test_shutdown_ends_sessions_and_a_restart_closes_what_a_crash_left_open(
    settings: Settings, tmp_path: Path
) -> None:
    """A clean stop records gateway_shutdown; a row left open (a crash) ends as gateway_restart."""
    app = GatewayApp(settings)
    await app.start()
    gw = Harness(app, tmp_path)
    try:
        creds = await gw.device()
        await gw.connect(creds)
        await eventually(lambda: _has_open(gw, creds.name), "the running session in the history")
    finally:
        await app.stop()  # before the harness closes the device's connection
        await gw.close()
    # What a kill -9 leaves: a session that started and never ended.
    crashed = GatewayApp(settings)
    history = HistoryStore(crashed.store.engine)
    await history.write(
        [SessionStart(creds.name, 99, utcnow() - timedelta(minutes=5), HOST, 40000, serial_of(creds))],
        [],
        keep_per_device=100,
    )
    await crashed.store.close()

    again = GatewayApp(settings)
    await again.start()
    try:
        rows, _ = await again.history.sessions(creds.name, limit=10, offset=0)
        assert [(r.epoch, r.reason) for r in rows] == [(99, "gateway_restart"), (1, "gateway_shutdown")]
        assert all(r.disconnected_at is not None for r in rows)
    finally:
        await again.stop()


async def _has_open(gw: Harness, device_id: str) -> bool:
    return any(s["disconnected_at"] is None for s in (await sessions(gw, device_id))["data"])
