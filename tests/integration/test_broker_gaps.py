"""One regression test per amqtt 0.12.1 gap the broker adapter closes (AMQTT-NOTES.md).

Each test drives the real gateway over loopback mutual TLS with raw or real clients;
if an amqtt upgrade or a change in `gateway/broker/` reopens a gap, its test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time

import amqtt
import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from gateway.mqtt_client import ConnectRefused, MqttClient, encode_connect, encode_publish, encode_subscribe
from tests.conftest import HOST, Creds, Harness
from tests.integration.test_gateway import next_status, watcher


def test_amqtt_is_the_pinned_version() -> None:
    """The adapter overrides amqtt internals checked against 0.12.1 only: an upgrade must fail loudly."""
    assert amqtt.__version__ == "0.12.1"


async def raw_session(
    gw: Harness, creds: Creds, *, keepalive: int = 60
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A device connection where the test writes exact bytes after an accepted CONNECT."""
    reader, writer = await asyncio.open_connection(HOST, gw.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
    writer.write(encode_connect(client_id=creds.name, keepalive=keepalive, clean_session=True))
    await writer.drain()
    assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
    return reader, writer


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close our side and wait for it, so no transport outlives the test."""
    writer.close()
    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2)


async def closed_by_gateway(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """True when the gateway closes the connection (EOF) within `timeout`, ignoring data it sends first."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    return True


# --- gap 3: authentication before session bookkeeping ------------------------------------


async def test_gap3_refused_connect_with_a_victims_id_keeps_the_victims_persistent_session(
    gateway: Harness,
) -> None:
    """A refused CONNECT using another device's id (clean session) neither wipes nor replaces its session."""
    victim_creds, attacker_creds = await gateway.device(), await gateway.device()
    victim = await gateway.connect(victim_creds, clean_session=False)
    await victim.subscribe((f"devices/{victim_creds.name}/commands/#", 1))
    await victim.disconnect()  # offline, persistent session and subscription kept
    await asyncio.sleep(0.1)
    assert gateway.app.engine.subscriptions_of(victim_creds.name) == [
        f"devices/{victim_creds.name}/commands/#"
    ]

    attacker = gateway.client(victim_creds.name, clean_session=True)
    with pytest.raises(ConnectRefused):
        await attacker.connect(HOST, gateway.mqtt_port, ssl=attacker_creds.tls(), server_hostname=HOST)
    assert gateway.app.engine.subscriptions_of(victim_creds.name) == [
        f"devices/{victim_creds.name}/commands/#"
    ]
    again = gateway.client(victim_creds.name, clean_session=False)
    assert await again.connect(HOST, gateway.mqtt_port, ssl=victim_creds.tls(), server_hostname=HOST) == 1


# --- gap 2 and the disconnect-waiter race -------------------------------------------------


async def test_gap2_keepalive_is_enforced_at_one_and_a_half_times(gateway: Harness) -> None:
    """No packet for 1.5 x keep-alive closes the connection; a PINGREQ in time keeps it."""
    creds = await gateway.device()
    reader, writer = await raw_session(gateway, creds, keepalive=1)
    for _ in range(3):  # 3 s of pings every 0.8 s: still open
        await asyncio.sleep(0.8)
        writer.write(b"\xc0\x00")
        await writer.drain()
        assert await reader.readexactly(2) == b"\xd0\x00"
    started = time.monotonic()
    assert await closed_by_gateway(reader, timeout=3)
    assert 1.2 <= time.monotonic() - started <= 2.5
    await shut(writer)


async def test_connection_dropped_right_after_connack_still_ends_the_session(gateway: Harness) -> None:
    """A client gone right after CONNACK is marked offline (amqtt lost this EOF and kept a zombie)."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    for _ in range(5):
        reader, writer = await asyncio.open_connection(
            HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST
        )
        writer.write(encode_connect(client_id=creds.name, keepalive=0, clean_session=True))
        await writer.drain()
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
        writer.transport.abort()  # gone while the gateway is still recording ONLINE
        assert (await next_status(ops, creds.name, "offline"))["reason"] == "connection_lost"
    assert not gateway.app.engine.is_connected(creds.name)


# --- gap 5: retained messages only through the ACL -----------------------------------------


async def test_gap5_retained_messages_are_not_pushed_to_devices(gateway: Harness) -> None:
    """Retained statuses matching an operator's gateway/# are never pushed to a connecting device."""
    ops = await watcher(gateway)  # the broker now holds a gateway/# subscription
    first, second = await gateway.device(), await gateway.device()
    await gateway.connect(first)
    await next_status(ops, first.name, "online")
    assert gateway.app.engine.retained(f"gateway/status/{first.name}") is not None
    device = await gateway.connect(second, clean_session=False)
    await device.subscribe((f"devices/{second.name}/errors", 1))
    with pytest.raises(TimeoutError):
        await device.next_message(timeout=0.5)


async def test_gap5_retained_status_reaches_operators(gateway: Harness) -> None:
    """The same retained status does reach an operator who subscribes (RECEIVE allowed)."""
    creds = await gateway.device()
    await gateway.connect(creds)
    await asyncio.sleep(0.1)
    ops = await watcher(gateway)
    message = await ops.next_message(timeout=5)
    assert message.retain
    assert message.topic == f"gateway/status/{creds.name}"


# --- gap 6 and 11: bad packets close the connection through the normal flow ----------------


@pytest.mark.parametrize(
    ("name", "packet"),
    [
        ("wildcard topic", encode_publish("devices/+/readings", b"1", qos=0)),
        ("NUL in topic", b"\x30" + bytes([2 + 5 + 1]) + struct.pack("!H", 5) + b"a\x00b/c" + b"1"),
        ("invalid UTF-8 topic", b"\x30" + bytes([2 + 3 + 1]) + struct.pack("!H", 3) + b"a\xffb" + b"1"),
        ("SUBSCRIBE QoS 3", b"\x82\x06\x00\x01\x00\x01a\x03"),
        ("SUBSCRIBE flags 0", b"\x80\x06\x00\x01\x00\x01a\x00"),
        ("SUBSCRIBE without filters", b"\x82\x02\x00\x01"),
        ("second CONNECT", encode_connect(client_id="x", keepalive=60, clean_session=True)),
        ("server-only packet", b"\x20\x02\x00\x00"),
        ("reserved type", b"\xf0\x00"),
        ("QoS 0 with DUP", b"\x38\x04\x00\x01a1"),
    ],
)
async def test_gap6_gap11_protocol_violations_close_and_mark_offline(
    gateway: Harness, name: str, packet: bytes
) -> None:
    """Each violation closes the connection; the device goes OFFLINE (protocol_error): no zombie."""
    creds = await gateway.device()
    ops = await watcher(gateway)
    reader, writer = await raw_session(gateway, creds)
    await next_status(ops, creds.name, "online")
    writer.write(packet)
    await writer.drain()
    assert await closed_by_gateway(reader), name
    assert (await next_status(ops, creds.name, "offline"))["reason"] == "protocol_error"
    assert not gateway.app.engine.is_connected(creds.name)
    await shut(writer)


async def test_dollar_topics_are_denied_without_closing(gateway: Harness) -> None:
    """A publish to $SYS/... is refused by the ACL and counted; the session stays up (amqtt left a zombie)."""
    creds = await gateway.device()
    device = await gateway.connect(creds)
    await device.subscribe((f"devices/{creds.name}/errors", 0))
    denied = gateway.app.gatekeeper.denied_publishes
    await device.publish("$SYS/broker/x", b"1", qos=1)
    error = await device.next_message(timeout=5)
    assert json.loads(error.payload)["topic"] == "$SYS/broker/x"
    assert gateway.app.gatekeeper.denied_publishes == denied + 1
    assert gateway.app.engine.is_connected(creds.name)


async def test_gap11_a_nul_topic_never_reaches_wildcard_subscribers(gateway: Harness) -> None:
    """Operators subscribed to devices/+/readings never see a topic with NUL or bad UTF-8."""
    creds = await gateway.device()
    ops = await gateway.connect(await gateway.operator(), client_id="")
    await ops.subscribe(("devices/+/readings", 0))
    _, writer = await raw_session(gateway, creds)
    bad = f"devices/{creds.name}/readings\x00x".encode()
    writer.write(b"\x30" + bytes([2 + len(bad) + 1]) + struct.pack("!H", len(bad)) + bad + b"1")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await ops.next_message(timeout=0.5)
    await shut(writer)


async def test_oversize_packets_close_the_connection(gateway: Harness) -> None:
    """A packet above mqtt.max_packet_bytes closes the connection before its body is read."""
    creds = await gateway.device()
    reader, writer = await raw_session(gateway, creds)
    limit = gateway.app.settings.mqtt.max_packet_bytes
    writer.write(encode_publish(f"devices/{creds.name}/readings", b"x" * (limit + 1), qos=0))
    await writer.drain()
    assert await closed_by_gateway(reader)
    await shut(writer)


async def test_no_connect_in_time_closes_the_connection(settings: object, tmp_path: object) -> None:
    """A TLS client that never sends CONNECT is dropped after mqtt.connect_timeout_s."""
    from gateway.app import GatewayApp
    from tests.conftest import make_settings

    app = GatewayApp(make_settings(tmp_path, connect_timeout_s=0.5))  # type: ignore[arg-type]
    await app.start()
    gw = Harness(app, tmp_path)  # type: ignore[arg-type]
    try:
        creds = await gw.device()
        reader, writer = await asyncio.open_connection(
            HOST, gw.mqtt_port, ssl=creds.tls(), server_hostname=HOST
        )
        started = time.monotonic()
        assert await closed_by_gateway(reader, timeout=3)
        assert time.monotonic() - started < 2
        await shut(writer)
    finally:
        await gw.close()
        await app.stop()


# --- gaps 8 and 9: hook failures are visible and fail closed ------------------------------


async def test_gap9_an_admission_failure_refuses_with_connack_3_and_is_logged(gateway: Harness) -> None:
    """When the registry cannot answer, CONNECT gets CONNACK 3 (not silence) and the error is logged."""
    creds = await gateway.device()
    async with gateway.app.store.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE certificates RENAME TO certificates_gone"))
    try:
        with capture_logs() as logs:
            client = gateway.client(creds.name)
            with pytest.raises(ConnectRefused) as refused:
                await client.connect(
                    HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST, timeout=5
                )
        assert refused.value.return_code == 3
        assert any(entry["event"] == "session.admission_failed" for entry in logs)
        assert gateway.app.engine.session_count == 0
    finally:
        async with gateway.app.store.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE certificates_gone RENAME TO certificates"))


async def test_gap8_a_presence_failure_is_logged_and_the_session_closed(gateway: Harness) -> None:
    """If ONLINE cannot be recorded, the error is logged (not lost in a task) and the session is closed."""
    creds = await gateway.device()
    async with gateway.app.store.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE TRIGGER no_presence BEFORE UPDATE OF epoch ON devices "
                "BEGIN SELECT RAISE(ABORT, 'presence store down'); END"
            )
        )
    with capture_logs() as logs:
        client = await gateway.connect(creds)
        await client.wait_closed(timeout=3)
    assert any(entry["event"] == "session.start_failed" for entry in logs)
    assert not gateway.app.engine.is_connected(creds.name)


async def test_gap8_an_unexpected_error_in_a_hook_ends_only_that_session_and_is_logged(
    gateway: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug raised while handling a PUBLISH is logged, that session goes OFFLINE, others carry on."""
    victim, bystander = await gateway.device(name="victim"), await gateway.device(name="bystander")
    ops = await watcher(gateway)
    accepted = gateway.app.gatekeeper.message_accepted

    async def buggy(session: object, topic: str, payload: bytes, qos: int) -> object:
        if topic.startswith(f"devices/{victim.name}/"):
            raise RuntimeError("a bug in the gateway")
        return await accepted(session, topic, payload, qos)  # type: ignore[arg-type]

    monkeypatch.setattr(gateway.app.gatekeeper, "message_accepted", buggy)
    client, other = await gateway.connect(victim), await gateway.connect(bystander)
    await next_status(ops, victim.name, "online")
    with capture_logs() as logs:
        await client.publish(f"devices/{victim.name}/readings", '{"sensor":"t","value":1}', qos=0)
        offline = await next_status(ops, victim.name, "offline")
    assert offline["reason"] == "connection_lost"
    assert any(entry["event"] == "session.crashed" and entry.get("exc_info") for entry in logs)
    await other.publish(f"devices/{bystander.name}/readings", '{"sensor":"t","value":1}', qos=1)
    assert gateway.app.engine.is_connected(bystander.name)


async def test_fan_out_to_a_stalled_subscriber_is_bounded_and_spares_everyone_else(
    gateway: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator that never acknowledges loses messages past its in-flight bound; others get all."""
    from gateway.broker import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_PENDING_DELIVERIES", 20)
    broker = gateway.app.engine._broker
    creds = await gateway.device()
    stalled_creds = await gateway.operator("stalled")
    reader, writer = await asyncio.open_connection(
        HOST, gateway.mqtt_port, ssl=stalled_creds.tls(), server_hostname=HOST
    )
    writer.write(encode_connect(client_id="stalled", keepalive=60, clean_session=True))
    writer.write(encode_subscribe(1, [(f"devices/{creds.name}/readings", 1)]))
    await writer.drain()
    assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
    assert await reader.readexactly(5) == b"\x90\x03\x00\x01\x01"  # SUBACK, QoS 1; never a PUBACK
    healthy = await gateway.connect(await gateway.operator("healthy"), client_id="")
    await healthy.subscribe((f"devices/{creds.name}/readings", 1))
    device = await gateway.connect(creds)
    for index in range(60):
        await device.publish(f"devices/{creds.name}/readings", f'{{"sensor":"t","value":{index}}}', qos=1)
    received = [await healthy.next_message(timeout=5) for _ in range(60)]
    assert len(received) == 60, "the acknowledging subscriber gets every message"
    assert broker.dropped_deliveries >= 40, "the stalled one is bounded at 20 in flight"
    await shut(writer)


async def test_fan_out_queue_is_bounded_and_unused_when_no_one_subscribes(
    gateway: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of gateway statuses (a sweep of a large fleet) queues nothing when no one subscribes;
    with a subscriber, what exceeds the fan-out bound is counted, not kept. Retained statuses are
    all kept either way (the durable state a later subscriber reads)."""
    from gateway.broker import engine as engine_module

    monkeypatch.setattr(engine_module, "BROADCAST_QUEUE_SIZE", 50)
    adapter, broker = gateway.app.engine, gateway.app.engine._broker
    for index in range(200):  # synchronously, as a sweep does: the fan-out task gets no turn
        await adapter.publish(f"gateway/status/burst-{index}", b"{}", retain=True)
    assert broker.dropped_broadcasts == 0
    ops = await gateway.connect(await gateway.operator("watcher"), client_id="")
    await ops.subscribe(("gateway/status/#", 1))
    retained = {(await ops.next_message(timeout=5)).topic for _ in range(200)}
    assert retained == {f"gateway/status/burst-{index}" for index in range(200)}
    for index in range(200):
        await adapter.publish(f"gateway/status/again-{index}", b"{}", retain=True)
    assert broker.dropped_broadcasts == 150, "past the bound of 50, counted"
    assert all(adapter.retained(f"gateway/status/again-{index}") == b"{}" for index in range(200))
    live = [await ops.next_message(timeout=5) for _ in range(50)]
    assert [m.topic for m in live] == [f"gateway/status/again-{index}" for index in range(50)]


# --- gap 12: delivery QoS -------------------------------------------------------------------


async def test_gap12_delivery_qos_is_the_minimum_of_publish_and_grant(gateway: Harness) -> None:
    """A QoS 0 publish reaches a QoS 1 subscriber at QoS 0, and a QoS 1 publish at QoS 1."""
    creds = await gateway.device()
    ops = await gateway.connect(await gateway.operator(), client_id="")
    await ops.subscribe((f"devices/{creds.name}/readings", 1))
    device = await gateway.connect(creds)
    await device.publish(f"devices/{creds.name}/readings", b'{"sensor":"t","value":1}', qos=0)
    assert (await ops.next_message(timeout=5)).qos == 0
    await device.publish(f"devices/{creds.name}/readings", b'{"sensor":"t","value":2}', qos=1)
    assert (await ops.next_message(timeout=5)).qos == 1


# --- operators cannot step on devices ----------------------------------------------------


async def test_operator_using_a_device_id_cannot_take_over_the_device(gateway: Harness) -> None:
    """An operator connecting with a device's client id gets its own session; the device stays online."""
    creds = await gateway.device()
    device = await gateway.connect(creds)
    operator = await gateway.connect(await gateway.operator(), client_id=creds.name)
    await asyncio.sleep(0.2)
    assert gateway.app.engine.is_connected(creds.name)
    assert not device.closed
    assert not operator.closed


async def test_a_device_will_cannot_spoof_status(gateway: Harness) -> None:
    """A will message on a gateway topic is refused at CONNECT (5); a will on its own topic is published."""
    creds = await gateway.device()
    from gateway.mqtt_client import Message

    spoof = MqttClient(client_id=creds.name, will=Message(f"gateway/status/{creds.name}", b"{}", 1, True))
    with pytest.raises(ConnectRefused) as refused:
        await spoof.connect(HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
    assert refused.value.return_code == 5

    ops = await gateway.connect(await gateway.operator(), client_id="")
    await ops.subscribe((f"devices/{creds.name}/health", 0))
    honest = gateway.client(
        creds.name, will=Message(f"devices/{creds.name}/health", b'{"gone":true}', 0, False)
    )
    await honest.connect(HOST, gateway.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
    await honest.close()  # no DISCONNECT: the will is published
    message = await ops.next_message(timeout=5)
    assert (message.topic, json.loads(message.payload)) == (f"devices/{creds.name}/health", {"gone": True})


# --- gap 7: inbound publishes are acknowledged by the gateway, in order ---------------------


async def test_qos1_acknowledgements_come_in_publish_order(gateway: Harness) -> None:
    """500 pipelined QoS 1 publishes are all acknowledged, PUBACKs in the order of the PUBLISHes."""
    creds = await gateway.device()
    reader, writer = await raw_session(gateway, creds)
    topic = f"devices/{creds.name}/readings"
    ids = list(range(1, 501))
    writer.write(
        b"".join(encode_publish(topic, b'{"sensor":"t","value":1}', qos=1, packet_id=i) for i in ids)
    )
    await writer.drain()
    acks = await asyncio.wait_for(reader.readexactly(4 * len(ids)), 10)
    assert [int.from_bytes(acks[i + 2 : i + 4], "big") for i in range(0, len(acks), 4)] == ids
    assert all(acks[i] == 0x40 for i in range(0, len(acks), 4))
    await shut(writer)


async def test_qos2_inbound_flow_delivers_once(gateway: Harness) -> None:
    """QoS 2: PUBREC, a resent PUBLISH (DUP) is not delivered again, PUBREL gets PUBCOMP."""
    creds = await gateway.device()
    ops = await gateway.connect(await gateway.operator(), client_id="")
    await ops.subscribe((f"devices/{creds.name}/readings", 2))
    reader, writer = await raw_session(gateway, creds)
    topic = f"devices/{creds.name}/readings"
    writer.write(encode_publish(topic, b'{"sensor":"t","value":1}', qos=2, packet_id=7))
    await writer.drain()
    assert await reader.readexactly(4) == b"\x50\x02\x00\x07"  # PUBREC
    writer.write(encode_publish(topic, b'{"sensor":"t","value":1}', qos=2, packet_id=7, dup=True))
    await writer.drain()
    assert await reader.readexactly(4) == b"\x50\x02\x00\x07"  # PUBREC again, not a new message
    writer.write(b"\x62\x02\x00\x07")  # PUBREL
    await writer.drain()
    assert await reader.readexactly(4) == b"\x70\x02\x00\x07"  # PUBCOMP
    assert (await ops.next_message(timeout=5)).payload == b'{"sensor":"t","value":1}'
    with pytest.raises(TimeoutError):
        await ops.next_message(timeout=0.3)
    await shut(writer)
