"""The gateway end to end over real loopback: mutual TLS, admission, presence, kicks, the ACL."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import ssl
import statistics
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
from _pytest.logging import LogCaptureHandler
from cryptography import x509
from structlog.testing import capture_logs

import ca
from ca import files as ca_files
from gateway.core.clock import utcnow
from gateway.mqtt_client import ConnectionClosed, ConnectRefused, MqttClient, encode_connect
from tests.conftest import HOST, Creds, Harness


async def next_status(
    client: MqttClient, device_id: str, status: str, timeout: float = 5.0
) -> dict[str, object]:
    """Read messages until the status of `device_id` becomes `status`."""
    deadline = time.monotonic() + timeout
    while True:
        message = await client.next_message(timeout=max(0.01, deadline - time.monotonic()))
        if message.topic == f"gateway/status/{device_id}":
            body: dict[str, object] = json.loads(message.payload)
            if body["status"] == status:
                return body


async def watcher(gw: Harness) -> MqttClient:
    """An operator subscribed to every status and event."""
    ops = await gw.connect(await gw.operator(), client_id="")
    assert await ops.subscribe(("gateway/#", 1)) == [1]
    return ops


def write_cert(folder: Path, name: str, key: object, cert: x509.Certificate, ca_path: Path) -> Creds:
    folder.mkdir(parents=True, exist_ok=True)
    ca_files.write_private_key(folder / f"{name}.key", key, overwrite=True)  # type: ignore[arg-type]
    (folder / f"{name}.crt").write_bytes(ca.certificate_pem(cert))
    return Creds(name, folder / f"{name}.key", folder / f"{name}.crt", ca_path)


def unregistered(
    gw: Harness,
    name: str,
    *,
    now_shift: timedelta = timedelta(0),
    validity: timedelta = timedelta(days=1),
    authority: ca.Authority | None = None,
) -> Creds:
    """A certificate the gateway's database knows nothing about (or from another CA)."""
    paths = gw.app.pki.paths
    issuer = authority or ca_files.load_authority(paths.ca_cert, paths.ca_key)
    key = ca.generate_key()
    cert = ca.issue_client_certificate(
        issuer, key.public_key(), subject_id=name, kind="device", now=utcnow() + now_shift, validity=validity
    )
    return write_cert(gw.root / "rogue", name, key, cert, gw.ca_path)


async def test_device_connects_and_goes_online_for_operators(gateway: Harness) -> None:
    """A registered, enrolled device is admitted; ONLINE is stored and seen retained by an operator."""
    creds = await gateway.device()
    device = await gateway.connect(creds)
    ops = await watcher(gateway)  # subscribes after the fact: sees the retained status
    status = await next_status(ops, creds.name, "online")
    assert status["reason"] == "connected"
    assert status["epoch"] == 1
    assert status["client_ip"] == HOST
    record = (await gateway.api.get(f"/devices/{creds.name}")).json()["data"]
    assert record["status"] == "active"  # the first accepted connection was the check-in
    assert record["connection"] == "online"
    assert record["certificate"]["serial"] == status["certificate_serial"]

    await device.disconnect()
    offline = await next_status(ops, creds.name, "offline")
    assert (offline["reason"], offline["epoch"]) == ("client_disconnect", 1)
    record = (await gateway.api.get(f"/devices/{creds.name}")).json()["data"]
    assert (record["connection"], record["disconnect_reason"]) == ("offline", "client_disconnect")


async def test_epochs_grow_per_session_and_connection_loss_is_reported(gateway: Harness) -> None:
    """Each session has a higher epoch; a dropped TCP connection is connection_lost."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    first = await gateway.connect(creds)
    assert (await next_status(ops, creds.name, "online"))["epoch"] == 1
    await first.close()  # no DISCONNECT: the network went away
    lost = await next_status(ops, creds.name, "offline")
    assert (lost["reason"], lost["epoch"]) == ("connection_lost", 1)
    await gateway.connect(creds)
    assert (await next_status(ops, creds.name, "online"))["epoch"] == 2


@pytest.mark.parametrize(
    "case", ["no_certificate", "foreign_ca", "same_dn_rogue_ca", "expired", "not_yet_valid"]
)
async def test_certificates_tls_can_judge_fail_the_handshake(gateway: Harness, case: str) -> None:
    """No certificate, foreign CA, same-name rogue CA, expired or future certificates never reach MQTT."""
    if case == "no_certificate":
        context = ssl.create_default_context(cafile=str(gateway.ca_path))
    else:
        if case == "foreign_ca":
            creds = unregistered(
                gateway, "dev-x", authority=ca.create_authority(now=utcnow(), common_name="Other CA")
            )
        elif case == "same_dn_rogue_ca":
            real = gateway.app.pki.authority.certificate.subject.rfc4514_string()
            rogue = ca.create_authority(now=utcnow(), common_name=real.split("CN=", 1)[1].split(",", 1)[0])
            assert rogue.certificate.subject == gateway.app.pki.authority.certificate.subject
            creds = unregistered(gateway, "dev-x", authority=rogue)
        elif case == "expired":
            creds = unregistered(gateway, "dev-x", now_shift=timedelta(days=-10), validity=timedelta(days=1))
        else:
            creds = unregistered(gateway, "dev-x", now_shift=timedelta(days=10))
        context = creds.tls()
    client = gateway.client("dev-x")
    with pytest.raises(ConnectionClosed):
        await client.connect(HOST, gateway.mqtt_port, ssl=context, server_hostname=HOST)
    assert gateway.app.engine.session_count == 0
    assert gateway.app.listener.tls_failures >= 1


async def test_client_id_mismatch_is_refused_and_the_victim_keeps_its_session(gateway: Harness) -> None:
    """CONNACK 2 for another device's id; the victim stays connected with its subscriptions intact."""
    victim_creds, attacker_creds = await gateway.device(), await gateway.device()
    victim = await gateway.connect(victim_creds, clean_session=False)
    assert await victim.subscribe((f"devices/{victim_creds.name}/errors", 1)) == [1]
    before = gateway.app.engine.subscriptions_of(victim_creds.name)

    attacker = gateway.client(victim_creds.name, clean_session=True)
    with pytest.raises(ConnectRefused) as refused:
        await attacker.connect(HOST, gateway.mqtt_port, ssl=attacker_creds.tls(), server_hostname=HOST)
    assert refused.value.return_code == 2

    assert gateway.app.engine.is_connected(victim_creds.name)
    assert (
        gateway.app.engine.subscriptions_of(victim_creds.name)
        == before
        == [f"devices/{victim_creds.name}/errors"]
    )
    # the victim still gets what is addressed to it: a denied publish produces an error for it
    await victim.publish(f"devices/{attacker_creds.name}/readings", b"{}", qos=1)
    error = await victim.next_message(timeout=5)
    assert error.topic == f"devices/{victim_creds.name}/errors"
    assert json.loads(error.payload)["code"] == "acl_denied"


async def test_refusals_are_logged_and_published(gateway: Harness) -> None:
    """Every refusal is published on gateway/events/connect_failed with its reason."""
    ops = await watcher(gateway)
    creds = await gateway.device()
    other = gateway.client("not-me")
    with pytest.raises(ConnectRefused):
        await other.connect(HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
    while True:
        message = await ops.next_message(timeout=5)
        if message.topic == "gateway/events/connect_failed":
            break
    event = json.loads(message.payload)
    assert event["reason"] == "client_id_mismatch"
    assert event["client_id"] == "not-me"
    assert len(event["fingerprint"]) == 64


async def test_a_client_retrying_in_a_loop_is_one_event_per_interval_not_one_per_try(
    gateway: Harness,
) -> None:
    """connect_failed events are limited per certificate and reason; the next one counts those left out."""
    from gateway.core.ratelimit import Rate, RateLimiter

    gateway.app.gatekeeper._event_limit = RateLimiter(Rate(2, per_s=1.0))  # a burst of 2, then 1 per 0.5 s
    ops = await watcher(gateway)
    creds = unregistered(gateway, "looping")

    async def refused() -> None:
        with pytest.raises(ConnectRefused):
            await gateway.client("looping").connect(
                HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST
            )

    for _ in range(10):
        await refused()
    await asyncio.sleep(0.6)
    await refused()  # the bucket refilled: published, with the count of those left out
    events = []
    with contextlib.suppress(TimeoutError):
        while True:
            message = await ops.next_message(timeout=1)
            if message.topic == "gateway/events/connect_failed":
                events.append(json.loads(message.payload))
    assert [e["suppressed"] for e in events] == [0, 0, 8]
    assert gateway.app.gatekeeper.suppressed_events == 8


def live_objects() -> dict[str, int]:
    """How many session-shaped objects exist (amqtt sessions and handlers, our live sessions)."""
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.session import Session

    from gateway.broker import LiveSession

    gc.collect()
    kinds = {"Session": Session, "BrokerProtocolHandler": BrokerProtocolHandler, "LiveSession": LiveSession}
    counts = dict.fromkeys(kinds, 0)
    for obj in gc.get_objects():
        for name, kind in kinds.items():
            if isinstance(obj, kind):
                counts[name] += 1
    return counts


@pytest.mark.slow
async def test_a_thousand_refused_connects_leave_sessions_and_memory_flat(gateway: Harness) -> None:
    """1,000 refused CONNECTs (unknown certificate, random client ids) keep no session and no memory."""
    creds = unregistered(gateway, "ghost")
    context = creds.tls()
    engine = gateway.app.engine

    async def refuse(i: int) -> None:
        client = MqttClient(client_id=f"ghost-{i}")
        with pytest.raises(ConnectRefused) as refused:
            await client.connect(HOST, gateway.mqtt_port, ssl=context, server_hostname=HOST)
        assert refused.value.return_code == 5
        await client.close()

    async def wave(start: int, count: int) -> None:
        for offset in range(start, start + count, 25):
            await asyncio.gather(*(refuse(i) for i in range(offset, min(offset + 25, start + count))))

    await wave(0, 100)  # warm-up: allocator, caches, SSL contexts
    objects_before = live_objects()
    tracemalloc.start()
    gc.collect()
    before = tracemalloc.take_snapshot()
    await wave(100, 1000)
    # pytest keeps every log record of the test (session.refused carries the client id and
    # fingerprint): that is the test harness holding memory, not the broker.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogCaptureHandler):
            handler.records.clear()  # in place: pytest keeps a reference to this list
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert engine.session_count == 0
    assert engine.refused_count == 1100
    assert live_objects() == objects_before
    # Memory allocated by the broker's code and still held (amqtt kept 25-40 KB per refusal);
    # the test's own clients (gateway/mqtt_client.py) are not the broker.
    scope = [
        tracemalloc.Filter(True, "*/amqtt/*"),
        tracemalloc.Filter(True, "*/gateway/*"),
        tracemalloc.Filter(False, "*/gateway/mqtt_client.py"),
    ]
    diff = after.filter_traces(scope).compare_to(before.filter_traces(scope), "lineno")
    print("\n".join(str(d) for d in diff[:12]))
    held = sum(stat.size_diff for stat in diff)
    assert held < 256 * 1024, f"{held / 1024:.0f} KiB still held after 1,000 refusals"


async def test_silent_device_goes_offline_with_keepalive_timeout(gateway: Harness) -> None:
    """A device with keep-alive 2 s that goes silent is OFFLINE (keepalive_timeout) within 4 s."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    reader, writer = await asyncio.open_connection(
        HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST
    )
    writer.write(encode_connect(client_id=creds.name, keepalive=2, clean_session=True))
    await writer.drain()
    assert (await reader.readexactly(4))[3] == 0  # CONNACK accepted
    started = time.monotonic()
    await next_status(ops, creds.name, "online")
    offline = await next_status(ops, creds.name, "offline", timeout=6)
    elapsed = time.monotonic() - started
    assert offline["reason"] == "keepalive_timeout"
    assert 2.0 <= elapsed <= 4.0, elapsed
    assert await reader.read() == b""  # the gateway closed the socket
    writer.close()


async def test_block_kicks_within_100ms_refuses_reconnects_and_unblock_restores(gateway: Harness) -> None:
    """Block cuts a live session in under 100 ms (median of 5), reconnects get CONNACK 5, unblock restores."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    elapsed: list[float] = []
    for _ in range(5):
        device = await gateway.connect(creds)
        await next_status(ops, creds.name, "online")
        started = time.perf_counter()
        response = await gateway.api.post(f"/devices/{creds.name}/block")
        await device.wait_closed(timeout=2)
        elapsed.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.json()["data"]["blocked"] is True
        assert (await next_status(ops, creds.name, "offline"))["reason"] == "blocked"

        again = gateway.client(creds.name)
        with pytest.raises(ConnectRefused) as refused:
            await again.connect(HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
        assert refused.value.return_code == 5
        assert (await gateway.api.post(f"/devices/{creds.name}/unblock")).json()["data"]["blocked"] is False
    assert statistics.median(elapsed) < 0.100, elapsed
    await gateway.connect(creds)  # unblocked: admitted again
    assert gateway.app.engine.is_connected(creds.name)


async def test_deactivate_kicks_and_activate_restores(gateway: Harness) -> None:
    """PATCH status inactive cuts the session (deactivated) and refuses; active lets it back."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    device = await gateway.connect(creds)
    await next_status(ops, creds.name, "online")
    response = await gateway.api.patch(f"/devices/{creds.name}", json={"status": "inactive"})
    assert response.json()["data"]["status"] == "inactive"
    await device.wait_closed(timeout=1)
    assert (await next_status(ops, creds.name, "offline"))["reason"] == "deactivated"
    with pytest.raises(ConnectRefused):
        await gateway.connect(creds)
    response = await gateway.api.patch(f"/devices/{creds.name}", json={"status": "active"})
    assert response.json()["data"]["status"] == "active"
    await gateway.connect(creds)


async def test_revoke_lists_the_serial_on_the_crl_and_the_next_handshake_fails(gateway: Harness) -> None:
    """Revoke: kicked (revoked), serial on GET /ca/crl, next TLS handshake fails."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    device = await gateway.connect(creds)
    serial = (await gateway.api.get(f"/devices/{creds.name}")).json()["data"]["certificate"]["serial"]
    await next_status(ops, creds.name, "online")
    response = await gateway.api.post(f"/devices/{creds.name}/revoke")
    assert response.json()["data"]["status"] == "revoked"
    await device.wait_closed(timeout=1)
    assert (await next_status(ops, creds.name, "offline"))["reason"] == "revoked"

    crl = x509.load_pem_x509_crl((await gateway.api.get("/ca/crl")).content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    failures = gateway.app.listener.tls_failures
    with pytest.raises(ConnectionClosed):  # no CONNACK at all: refused by TLS, not by MQTT
        await gateway.connect(creds)
    assert gateway.app.listener.tls_failures == failures + 1


async def test_delete_kicks_and_clears_the_retained_status(gateway: Harness) -> None:
    """Delete cuts the session (deleted), revokes, and removes the device and its retained status."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    device = await gateway.connect(creds)
    await next_status(ops, creds.name, "online")
    assert (await gateway.api.delete(f"/devices/{creds.name}")).json() == {"success": True}
    await device.wait_closed(timeout=1)
    assert (await next_status(ops, creds.name, "offline"))["reason"] == "deleted"
    assert (await gateway.api.get(f"/devices/{creds.name}")).status_code == 404
    assert gateway.app.engine.retained(f"gateway/status/{creds.name}") is None


async def test_take_over_closes_the_old_socket_and_never_marks_offline(gateway: Harness) -> None:
    """A second connection of the same device replaces the first; no OFFLINE in between."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    first = await gateway.connect(creds)
    assert (await next_status(ops, creds.name, "online"))["epoch"] == 1
    second = await gateway.connect(creds)
    await first.wait_closed(timeout=2)
    status = json.loads((await ops.next_message(timeout=5)).payload)
    assert (status["status"], status["epoch"]) == ("online", 2)  # not an offline of epoch 1
    assert gateway.app.engine.is_connected(creds.name)
    assert not second.closed
    record = (await gateway.api.get(f"/devices/{creds.name}")).json()["data"]
    assert record["connection"] == "online"


async def test_device_acl_on_subscribe_and_publish(gateway: Harness) -> None:
    """A device may not subscribe outside its own errors/commands and its stray publishes are dropped."""
    creds, other = await gateway.device(), await gateway.device()
    device = await gateway.connect(creds)
    granted = await device.subscribe(
        (f"devices/{creds.name}/errors", 1), ("gateway/#", 1), (f"devices/{other.name}/errors", 0), ("#", 0)
    )
    assert granted == [1, 0x80, 0x80, 0x80]
    before = gateway.app.gatekeeper.denied_publishes
    await device.publish(f"devices/{other.name}/readings", b"{}", qos=1)
    await device.publish("gateway/status/evil", b"{}", qos=1)
    await device.next_message(timeout=5)
    await device.next_message(timeout=5)
    assert gateway.app.gatekeeper.denied_publishes == before + 2
    assert gateway.app.engine.retained("gateway/status/evil") is None


async def test_shutdown_marks_devices_offline(tmp_path: Path) -> None:
    """A clean stop marks connected devices OFFLINE with gateway_shutdown, in the database."""
    from gateway.app import GatewayApp
    from tests.conftest import make_settings

    app = GatewayApp(make_settings(tmp_path))
    await app.start()
    gw = Harness(app, tmp_path)
    try:
        creds = await gw.device()
        device = await gw.connect(creds)
        await app.stop()  # with the device still connected
        await device.wait_closed(timeout=2)
    finally:
        await gw.close()
        await app.stop()
    from gateway.store import Store

    store = Store(app.settings.database_url)  # the app's store is closed: read the file afresh
    try:
        record = await store.get_device(creds.name)
    finally:
        await store.close()
    assert (record.connection.value, record.disconnect_reason) == ("offline", "gateway_shutdown")


def blocking_connect(
    creds: Creds, context: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> tuple[int, ssl.SSLSession | None, bool]:
    """One CONNECT over a blocking TLS socket (to control TLS session resumption); returns
    (CONNACK code or -1 when refused by TLS, the TLS session, whether it was resumed)."""
    import socket

    with socket.create_connection((HOST, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=HOST, session=session) as tls:
                reused = tls.session_reused
                tls.sendall(encode_connect(client_id=creds.name, keepalive=60, clean_session=True))
                connack = tls.recv(4)
                code = connack[3] if len(connack) == 4 else -1
                return code, tls.session, reused
        except (ssl.SSLError, ConnectionError):
            return -1, None, False


async def test_tls_session_resumption_never_bypasses_block_or_revoke(gateway: Harness) -> None:
    """A resumed TLS session of a blocked device still gets CONNACK 5; after revoke none resumes."""
    creds = await gateway.device()
    context = creds.tls()
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # session ids: resumption decided in the handshake
    code, session, _ = await asyncio.to_thread(blocking_connect, creds, context, gateway.mqtt_port)
    assert code == 0
    code, session, reused = await asyncio.to_thread(
        blocking_connect, creds, context, gateway.mqtt_port, session
    )
    assert (code, reused) == (0, True)  # resumption works for a device in good standing

    await gateway.api.post(f"/devices/{creds.name}/block")
    code, _, reused = await asyncio.to_thread(blocking_connect, creds, context, gateway.mqtt_port, session)
    assert (code, reused) == (5, True)  # resumed at TLS, refused at admission
    await gateway.api.post(f"/devices/{creds.name}/unblock")

    await gateway.api.post(f"/devices/{creds.name}/revoke")
    code, _, reused = await asyncio.to_thread(blocking_connect, creds, context, gateway.mqtt_port, session)
    assert (code, reused) == (-1, False)  # new TLS context: no resumption, and the CRL refuses


async def test_status_is_published_within_100ms_of_the_event(gateway: Harness) -> None:
    """ONLINE reaches operators within 100 ms of CONNACK, OFFLINE of DISCONNECT (medians of 5)."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    online, offline = [], []
    for _ in range(5):
        client = gateway.client(creds.name)
        await client.connect(HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
        started = time.perf_counter()
        await next_status(ops, creds.name, "online")
        online.append(time.perf_counter() - started)
        started = time.perf_counter()
        await client.disconnect()
        await next_status(ops, creds.name, "offline")
        offline.append(time.perf_counter() - started)
    assert statistics.median(online) < 0.100, online
    assert statistics.median(offline) < 0.100, offline


async def test_session_logs_are_events_with_context_and_no_secrets(gateway: Harness) -> None:
    """Admission and refusal are dotted events with peer and reason; no token ever reaches a log."""
    with capture_logs() as logs:
        did, token = await gateway.register("logged")
        creds = await gateway.enroll(token)
        await gateway.connect(creds)
        with pytest.raises(ConnectRefused):
            await gateway.connect(creds, client_id="someone-else")
    events = {entry["event"]: entry for entry in logs}
    assert events["session.admitted"]["client_id"] == did
    assert events["session.admitted"]["peer"] == HOST
    refused = events["session.refused"]
    assert (refused["reason"], refused["peer"], refused["connack"]) == ("client_id_mismatch", HOST, 2)
    dumped = json.dumps(logs, default=str)
    assert token not in dumped
    assert gateway.admin_token not in dumped
