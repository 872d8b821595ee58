"""The session reader over real mutual TLS: keep-alive under back-pressure, and fairness under a flood.

The unit tests (tests/unit/test_frames.py) pin the FrameReader's rules; these check them
where they matter, in the running gateway: a reader held back by a full ingest queue is
not a silent device, and one device flooding the gateway does not starve another.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import IngestSettings, Settings
from gateway.mqtt_client import encode_connect, encode_publish
from tests.conftest import HOST, Harness, make_settings
from tests.integration.test_broker_gaps import closed_by_gateway, raw_session, shut
from tests.integration.test_ingest import TINY_QUEUE, db_path, device_record, eventually, write_locked

PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    overrides: dict[str, Any] = getattr(request, "param", {})
    return make_settings(tmp_path).model_copy(update={"ingest": IngestSettings(**overrides)})


async def stored_online(gw: Harness, device_id: str) -> None:
    """Wait until ONLINE is committed: the broker reads the session's packets only after it."""

    async def check() -> bool:
        return bool((await device_record(gw, device_id))["connection"] == "online")

    await eventually(check, f"{device_id} ONLINE in the database")


@pytest.mark.parametrize("settings", [TINY_QUEUE], indirect=True, ids=["tiny-queue"])
async def test_keepalive_does_not_expire_while_back_pressure_holds_the_reader(gateway: Harness) -> None:
    """A reader held past 1.5 x keep-alive by a full queue keeps the session, and then waits a full
    1.5 x keep-alive for the next packet (not from the packet that was held)."""
    creds = await gateway.device()
    reader, writer = await raw_session(gateway, creds, keepalive=1)
    await stored_online(gateway, creds.name)
    stats = gateway.app.ingest.stats
    topic = f"devices/{creds.name}/readings"
    async with write_locked(db_path(gateway)):
        # One in the stalled batch, two queued, the fourth holds the reader at the full queue.
        for packet_id in range(1, 5):
            writer.write(encode_publish(topic, b'{"sensor":"t","value":1}', qos=1, packet_id=packet_id))
        await writer.drain()
        await eventually(lambda: stats.accepted == 4, "the reader held on the fourth PUBLISH")
        await asyncio.sleep(2.5)  # > 1.5 s: a timer running now would end the session
        assert gateway.app.engine.is_connected(creds.name)
    acks = await asyncio.wait_for(reader.readexactly(16), 15)
    assert acks == b"".join(b"\x40\x02" + n.to_bytes(2, "big") for n in range(1, 5))
    await asyncio.sleep(0.8)  # the wait for the next packet started at the release, not before
    writer.write(PINGREQ)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(2), 2) == PINGRESP
    started = time.monotonic()
    assert await closed_by_gateway(reader, timeout=4)  # keep-alive still enforced afterwards
    assert 1.2 <= time.monotonic() - started <= 2.5
    await shut(writer)


async def test_a_flooding_device_does_not_starve_another_devices_ping(gateway: Harness) -> None:
    """While one device floods QoS 0 readings as fast as TLS takes them, another device's
    PINGREQs are still answered promptly."""
    flooder, pinger = await gateway.device(name="flood"), await gateway.device(name="ping")
    _, f_writer = await raw_session(gateway, flooder)
    p_reader, p_writer = await raw_session(gateway, pinger)
    await stored_online(gateway, flooder.name)
    burst = encode_publish(f"devices/{flooder.name}/readings", b'{"sensor":"t","value":1}') * 2000
    stop = asyncio.Event()

    async def flood() -> None:
        while not stop.is_set():
            f_writer.write(burst)
            await f_writer.drain()

    flooding = asyncio.create_task(flood())
    try:
        await eventually(lambda: gateway.app.ingest.stats.accepted > 20_000, "the flood under way", 15)
        latencies = []
        for _ in range(20):
            sent = time.monotonic()
            p_writer.write(PINGREQ)
            await p_writer.drain()
            assert await asyncio.wait_for(p_reader.readexactly(2), 5) == PINGRESP
            latencies.append(time.monotonic() - sent)
            await asyncio.sleep(0.02)
        accepted = gateway.app.ingest.stats.accepted
        await asyncio.sleep(0.2)
        assert gateway.app.ingest.stats.accepted > accepted, "the flood went on during the pings"
    finally:
        stop.set()
        with contextlib.suppress(ConnectionError, OSError):
            await flooding
    assert statistics.median(latencies) < 0.15, latencies
    assert max(latencies) < 1.0, latencies
    await shut(f_writer)
    await shut(p_writer)


async def test_packets_sent_in_the_same_write_as_connect_are_all_handled(gateway: Harness) -> None:
    """CONNECT, a QoS 1 PUBLISH and a PINGREQ in one TLS record: CONNACK, PUBACK and PINGRESP come back."""
    creds = await gateway.device()
    reader, writer = await asyncio.open_connection(
        HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST
    )
    writer.write(
        encode_connect(client_id=creds.name, keepalive=60, clean_session=True)
        + encode_publish(f"devices/{creds.name}/readings", b'{"sensor":"t","value":7}', qos=1, packet_id=9)
        + PINGREQ
    )
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
    rest = await asyncio.wait_for(reader.readexactly(4 + 2), 10)
    assert rest in (b"\x40\x02\x00\x09" + PINGRESP, PINGRESP + b"\x40\x02\x00\x09")  # PUBACK waits for commit
    rows = (await gateway.api.get(f"/devices/{creds.name}/readings")).json()["data"]
    assert [row["value"] for row in rows] == [7]
    await shut(writer)
