"""Provisioning over MQTT: a real gateway with its provisioning listener on loopback, driven by our
MQTT client (server-authenticated TLS, no client certificate) and by raw sockets; and the HTTPS
route's rate limit beside the listener's."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

import ca
from ca import files as ca_files
from gateway import simulator
from gateway.config import ProvisioningSettings, Settings
from gateway.core.ratelimit import Rate, RateLimiter
from gateway.mqtt_client import (
    ConnectionClosed,
    ConnectRefused,
    Message,
    MqttClient,
    decode_packet,
    encode_connect,
    parse_connack,
)
from gateway.simulator import Api
from tests.conftest import HOST, Creds, Harness, make_settings
from tests.integration.test_gateway import next_status, watcher

ENABLED = {"mqtt_enabled": True, "mqtt_host": HOST, "mqtt_port": 0}
ANSWER_TIMEOUT_S = 15.0  # a shared 2-core machine: generous, never reached when things work


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """The provisioning listener on (port 0) unless a test asks for other settings."""
    param: dict[str, Any] = getattr(request, "param", {})
    if param.get("defaults"):
        return make_settings(tmp_path)
    base = make_settings(tmp_path, **param.get("mqtt", {}))
    provisioning = ProvisioningSettings(**{**ENABLED, **param.get("provisioning", {})})
    return base.model_copy(update={"provisioning": provisioning})


def server_only_tls(gateway: Harness) -> ssl.SSLContext:
    """What a device without a certificate has: the gateway's CA, nothing else."""
    return ssl.create_default_context(cafile=str(gateway.ca_path))


def new_csr() -> tuple[Any, str]:
    key = ca.generate_key()
    return key, ca.make_csr(key, "whoever").decode()


def tampered_csr() -> str:
    """A CSR whose signed content was altered after signing (its signature no longer matches)."""
    _, pem = new_csr()
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[der.index(b"whoever")] = ord("W")
    body = "\n".join(textwrap.wrap(base64.b64encode(bytes(der)).decode(), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def provisioning_port(gateway: Harness) -> int:
    port = gateway.app.provisioning_port
    assert port is not None
    return port


async def open_provisioning(gateway: Harness, client_id: str = "") -> MqttClient:
    client = gateway.client(client_id)
    await client.connect(
        HOST, provisioning_port(gateway), ssl=server_only_tls(gateway), server_hostname=HOST, timeout=10
    )
    return client


async def ask(gateway: Harness, payload: bytes, *, qos: int = 1) -> tuple[MqttClient, Message]:
    """Subscribe to both answers, send one request, return the client and the answer it got."""
    client = await open_provisioning(gateway)
    assert await client.subscribe(("provision/csr/+", 1)) == [0]
    await client.publish("provision/csr", payload, qos=qos)
    return client, await client.next_message(timeout=ANSWER_TIMEOUT_S)


async def provision(gateway: Harness, token: str, csr: str, *, qos: int = 1) -> tuple[str, dict[str, str]]:
    client, answer = await ask(gateway, json.dumps({"token": token, "csr": csr}).encode(), qos=qos)
    await client.wait_closed(timeout=ANSWER_TIMEOUT_S)
    return answer.topic, json.loads(answer.payload)


async def next_event(ops: MqttClient, kind: str, **fields: object) -> dict[str, object]:
    """Read the operator's messages until an event of `kind` with `fields` arrives."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        message = await ops.next_message(timeout=max(0.01, deadline - time.monotonic()))
        if message.topic == f"gateway/events/{kind}":
            event: dict[str, object] = json.loads(message.payload)
            if all(event.get(key) == value for key, value in fields.items()):
                return event


async def raw_tls(
    gateway: Harness, *, source: str = HOST
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(
            HOST,
            provisioning_port(gateway),
            ssl=server_only_tls(gateway),
            server_hostname=HOST,
            local_addr=(source, 0),
        ),
        10,
    )


async def raw_connack(gateway: Harness, *, source: str) -> int:
    """CONNECT from `source` over raw TLS; the CONNACK return code."""
    reader, writer = await raw_tls(gateway, source=source)
    try:
        writer.write(encode_connect(client_id="", keepalive=0, clean_session=True))
        await writer.drain()
        data = await asyncio.wait_for(reader.readexactly(4), 10)
        decoded = decode_packet(data)
        assert decoded is not None
        return parse_connack(decoded[0].body)[1]
    finally:
        writer.transport.abort()


async def test_a_device_provisions_over_mqtt_and_then_goes_online(gateway: Harness) -> None:
    """Token and CSR over MQTT give a certificate the mTLS listener admits; the device goes ONLINE."""
    device_id, token = await gateway.register("mqtt-only")
    key, csr = new_csr()
    topic, body = await provision(gateway, token, csr)
    assert topic == "provision/csr/accepted"
    assert set(body) == {"device_id", "certificate", "ca_chain", "certificate_serial", "not_after"}
    assert body["device_id"] == device_id
    assert body["ca_chain"] == gateway.ca_path.read_text()
    assert body["not_after"].endswith("Z")

    folder = gateway.root / "mqtt-enrolled"
    folder.mkdir()
    ca_files.write_private_key(folder / "device.key", key, overwrite=True)
    (folder / "device.crt").write_text(body["certificate"])
    (folder / "ca.crt").write_text(body["ca_chain"])
    ops = await watcher(gateway)
    await gateway.connect(Creds(device_id, folder / "device.key", folder / "device.crt", folder / "ca.crt"))
    status = await next_status(ops, device_id, "online", timeout=ANSWER_TIMEOUT_S)
    assert status["certificate_serial"] == body["certificate_serial"]
    shown = (await gateway.api.get(f"/devices/{device_id}")).json()["data"]
    assert (shown["status"], shown["connection"]) == ("active", "online")
    assert gateway.app.provisioning is not None
    assert gateway.app.provisioning.provisioned == 1


async def test_a_token_is_single_use_across_mqtt_and_https(gateway: Harness) -> None:
    """A token redeemed over MQTT is refused with token_used over MQTT and over HTTPS."""
    _, token = await gateway.register()
    assert (await provision(gateway, token, new_csr()[1]))[0] == "provision/csr/accepted"
    topic, body = await provision(gateway, token, new_csr()[1])
    assert (topic, body["code"]) == ("provision/csr/rejected", "token_used")
    response = await gateway.api.post(
        "/devices/provision", json={"token": token, "csr": new_csr()[1]}, headers={"Authorization": ""}
    )
    assert (response.status_code, response.json()["error"]["code"]) == (403, "token_used")


@pytest.mark.parametrize(
    ("csr", "code"),
    [("not a certificate request", "csr_malformed"), (None, "csr_bad_signature")],
    ids=["malformed", "tampered"],
)
async def test_a_bad_csr_is_refused_and_leaves_the_token_unused(
    gateway: Harness, csr: str | None, code: str
) -> None:
    """A malformed or tampered CSR is answered on rejected with its code; the token still works."""
    _, token = await gateway.register()
    topic, body = await provision(gateway, token, csr if csr is not None else tampered_csr())
    assert (topic, body["code"]) == ("provision/csr/rejected", code)
    assert body["message"]
    assert (await provision(gateway, token, new_csr()[1]))[0] == "provision/csr/accepted"


async def test_a_request_with_a_bad_token_is_answered_then_the_connection_closes(gateway: Harness) -> None:
    """A QoS 0 request with an unknown token gets token_invalid, then the gateway closes the connection."""
    client, answer = await ask(
        gateway, json.dumps({"token": "gwreg_nope", "csr": new_csr()[1]}).encode(), qos=0
    )
    assert answer.topic == "provision/csr/rejected"
    assert json.loads(answer.payload)["code"] == "token_invalid"
    await client.wait_closed(timeout=ANSWER_TIMEOUT_S)
    with pytest.raises(ConnectionClosed):
        await client.publish("provision/csr", b"{}", qos=1)


@pytest.mark.parametrize(
    "settings", [{"mqtt": {"max_packet_bytes": 1024}}], indirect=True, ids=["1KiB-packets"]
)
async def test_an_oversize_request_closes_the_connection_unanswered(gateway: Harness) -> None:
    """A request larger than mqtt.max_packet_bytes ends the connection without an answer or a redemption."""
    _, token = await gateway.register()
    client = await open_provisioning(gateway)
    assert await client.subscribe("provision/csr/+") == [0]
    padded = json.dumps({"token": token, "csr": "A" * 2000}).encode()
    await client.publish("provision/csr", padded, qos=0)
    await client.wait_closed(timeout=ANSWER_TIMEOUT_S)
    with pytest.raises(ConnectionClosed):
        await client.next_message(timeout=1)
    listener = gateway.app.provisioning
    assert listener is not None
    assert listener.refused["protocol_violation"] == 1
    assert (await provision(gateway, token, new_csr()[1]))[0] == "provision/csr/accepted"


@pytest.mark.parametrize(
    "topic", ["devices/dev-1/readings", "gateway/events/device", "provision/csr/accepted", "provision"]
)
async def test_publishing_anywhere_else_closes_the_connection(gateway: Harness, topic: str) -> None:
    """A publish to any topic but provision/csr closes the connection, answered by nothing."""
    client = await open_provisioning(gateway)
    assert await client.subscribe("provision/csr/+") == [0]
    await client.publish(topic, b"{}", qos=0)
    await client.wait_closed(timeout=ANSWER_TIMEOUT_S)
    with pytest.raises(ConnectionClosed):
        await client.next_message(timeout=1)
    listener = gateway.app.provisioning
    assert listener is not None
    assert listener.refused["topic_forbidden"] == 1


async def test_subscribing_elsewhere_is_refused_and_nothing_else_is_delivered(gateway: Harness) -> None:
    """Only the answer topics are granted; gateway/# and devices/# get 0x80 and deliver nothing."""
    client = await open_provisioning(gateway)
    codes = await client.subscribe(
        "gateway/#",
        "devices/#",
        "#",
        "provision/#",
        "gateway/events/connect_failed",
        "provision/csr/accepted",
    )
    assert codes == [0x80, 0x80, 0x80, 0x80, 0x80, 0]
    # gateway/events/device and gateway/status/... are published now; none may reach this client.
    device = await gateway.device()
    await gateway.connect(device)
    with pytest.raises(TimeoutError):
        await client.next_message(timeout=1.0)
    assert not client.closed


async def test_a_request_without_subscriptions_is_not_redeemed(gateway: Harness) -> None:
    """A request sent before subscribing to both answers is dropped unread; its token stays usable."""
    _, token = await gateway.register()
    client = await open_provisioning(gateway)
    assert await client.subscribe("provision/csr/accepted") == [0]
    await client.publish("provision/csr", json.dumps({"token": token, "csr": new_csr()[1]}), qos=0)
    await client.wait_closed(timeout=ANSWER_TIMEOUT_S)
    with pytest.raises(ConnectionClosed):
        await client.next_message(timeout=1)
    assert (await provision(gateway, token, new_csr()[1]))[0] == "provision/csr/accepted"


async def test_the_mtls_listener_still_refuses_clients_without_certificates(gateway: Harness) -> None:
    """Turning the provisioning listener on leaves the device listener requiring a client certificate."""
    client = gateway.client("")
    with pytest.raises(ConnectionClosed):
        await client.connect(HOST, gateway.mqtt_port, ssl=server_only_tls(gateway), server_hostname=HOST)


@pytest.mark.parametrize(
    "settings", [{"provisioning": {"mqtt_attempts_per_minute": 2}}], indirect=True, ids=["2-per-minute"]
)
async def test_attempts_are_rate_limited_per_source_address(gateway: Harness) -> None:
    """The third connection in a minute from one address gets CONNACK 3 and an event; another does not."""
    ops = await watcher(gateway)
    assert await raw_connack(gateway, source="127.0.0.1") == 0
    assert await raw_connack(gateway, source="127.0.0.1") == 0
    assert await raw_connack(gateway, source="127.0.0.1") == 3
    with pytest.raises(ConnectRefused) as refused:
        await open_provisioning(gateway)
    assert refused.value.return_code == 3
    event = await next_event(ops, "connect_failed", reason="rate_limited")
    assert (event["listener"], event["client_ip"]) == ("provisioning", "127.0.0.1")
    assert 0 < float(str(event["retry_after_s"])) <= 30
    assert await raw_connack(gateway, source="127.0.0.2") == 0
    listener = gateway.app.provisioning
    assert listener is not None
    assert (listener.attempts, listener.refused["rate_limited"]) == (5, 2)


@pytest.mark.parametrize(
    "settings", [{"provisioning": {"https_attempts_per_minute": 2}}], indirect=True, ids=["2-per-minute"]
)
async def test_https_provisioning_is_rate_limited_per_source_address(gateway: Harness) -> None:
    """POST /devices/provision: the third attempt in a minute from one address is 429 with Retry-After
    (before the token is looked at: a good one stays unused); another address is not held back."""
    device_id, token = await gateway.register("limited")

    async def attempt(source: str, token: str = "gwreg_wrong") -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(local_address=source, verify=server_only_tls(gateway))
        async with httpx.AsyncClient(transport=transport, base_url=str(gateway.api.base_url)) as client:
            return await client.post("/devices/provision", json={"token": token, "csr": new_csr()[1]})

    assert [(await attempt("127.0.0.1")).status_code for _ in range(2)] == [403, 403]
    refused = await attempt("127.0.0.1", token)
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    accepted = await attempt("127.0.0.2", token)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["device_id"] == device_id


async def test_the_simulator_waits_out_the_rate_limit(gateway: Harness, tmp_path: Path) -> None:
    """`gateway simulate` provisioning more devices than the limit lets through at once waits each
    429's Retry-After and enrolls every one (here: one attempt at once, another every 0.2 s)."""
    # A faster limiter than settings can ask for (per minute), put where the route reads it.
    object.__setattr__(gateway.app.api_context, "provisioning_limit", RateLimiter(Rate(1, per_s=0.2)))
    ids = [f"sim-rl-{n}" for n in range(3)]
    async with httpx.AsyncClient(
        base_url=str(gateway.api.base_url), verify=server_only_tls(gateway), timeout=10
    ) as http:
        api = Api(http, gateway.admin_token)
        fleet = await simulator.provision(
            api, ids, tmp_path / "sim", prefix="sim-rl-", concurrency=3, stop=asyncio.Event()
        )
    assert sorted(creds.device_id for creds in fleet.devices) == ids
    assert fleet.registered == 3


async def test_failures_are_published_on_connect_failed(gateway: Harness) -> None:
    """A refused request reaches operators on gateway/events/connect_failed with its code and address."""
    ops = await watcher(gateway)
    _, token = await gateway.register()
    await provision(gateway, token, "garbage")
    event = await next_event(ops, "connect_failed", listener="provisioning")
    assert event["reason"] == "csr_malformed"
    assert event["client_ip"] == "127.0.0.1"
    assert event["fingerprint"] is None
    listener = gateway.app.provisioning
    assert listener is not None
    assert listener.refused["csr_malformed"] == 1


async def test_outcomes_are_logged_without_the_token_or_the_csr(gateway: Harness) -> None:
    """provisioning.accepted and provisioning.refused are logged, and no log entry carries a token or CSR."""
    _, token = await gateway.register()
    _, csr = new_csr()
    with capture_logs() as logs:
        await provision(gateway, token, csr)
        await provision(gateway, token, csr)
    events = [entry["event"] for entry in logs]
    assert "provisioning.accepted" in events
    refused = [entry for entry in logs if entry["event"] == "provisioning.refused"]
    assert [entry["reason"] for entry in refused] == ["token_used"]
    dumped = json.dumps(logs, default=str)
    assert token not in dumped
    assert "CERTIFICATE REQUEST" not in dumped


@pytest.mark.parametrize(
    "settings", [{"mqtt": {"connect_timeout_s": 0.5}}], indirect=True, ids=["half-second"]
)
async def test_a_silent_client_is_dropped_after_the_connect_timeout(gateway: Harness) -> None:
    """A client that completes TLS and sends nothing is closed after mqtt.connect_timeout_s."""
    reader, writer = await raw_tls(gateway)
    try:
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(1), ANSWER_TIMEOUT_S) == b""
        assert time.monotonic() - started < ANSWER_TIMEOUT_S
    finally:
        writer.transport.abort()
    listener = gateway.app.provisioning
    assert listener is not None
    assert listener.dropped["timeout"] == 1


def listening_tcp_ports() -> set[int]:
    """The TCP ports this process listens on (Linux: our socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize("settings", [{"defaults": True}], indirect=True, ids=["defaults"])
async def test_the_listener_is_off_by_default(gateway: Harness) -> None:
    """With default settings there is no provisioning listener: the gateway listens on MQTT and API only."""
    assert gateway.app.settings.provisioning.mqtt_enabled is False
    assert gateway.app.provisioning is None
    assert gateway.app.provisioning_port is None
    assert listening_tcp_ports() == {gateway.mqtt_port, gateway.app.api_port}
