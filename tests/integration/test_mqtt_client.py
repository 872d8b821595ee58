"""Integration tests of `gateway.mqtt_client` against a real mosquitto on loopback.

Mosquitto runs as a subprocess per module (one plain + mutual-TLS instance, one that
requires credentials). Where an exact exchange has to be observed (PINGREQ timing,
in-flight limits, duplicate QoS 2 deliveries, a peer that vanishes mid-request), a
scripted fake broker on an asyncio server plays the other side instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import gc
import hashlib
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.mqtt_client import (
    ConnectionClosed,
    ConnectRefused,
    Message,
    MqttClient,
    MqttProtocolError,
    Packet,
    PacketType,
    decode_packet,
    decode_remaining_length,
    encode_connect,
    encode_puback,
    encode_publish,
    encode_pubrel,
    encode_remaining_length,
    encode_subscribe,
    parse_publish,
    parse_suback,
)

HOST = "127.0.0.1"
USERNAME, PASSWORD = "device-7", b"s3cret-pass"
CONNACK_OK = b"\x20\x02\x00\x00"


# --------------------------------------------------------------------------- brokers


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        pytest.fail("mosquitto is not installed (Debian package 'mosquitto'); these tests need a real broker")
    return found


def _free_port() -> int:
    # Mosquitto cannot listen on port 0, so borrow a free port from the kernel.
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
        except OSError:
            time.sleep(0.02)
        else:
            return
    pytest.fail(f"mosquitto did not listen on {port}:\n{log.read_text()}")


@dataclass(frozen=True)
class Broker:
    port: int
    tls_port: int = 0
    ca: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def tls_context(self, *, with_client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


@contextlib.contextmanager
def _run_mosquitto(directory: Path, lines: list[str], ports: list[int]) -> Iterator[None]:
    # Running as root, mosquitto would switch to the 'mosquitto' user and lose access to
    # our 0600 key files; naming the current user keeps it as is (ignored when not root).
    config = directory / "mosquitto.conf"
    config.write_text(
        "\n".join([f"user {pwd.getpwuid(os.getuid()).pw_name}", "persistence false", *lines]) + "\n"
    )
    log = directory / "mosquitto.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen([_mosquitto_binary(), "-c", str(config)], stdout=log_file, stderr=log_file)
    try:
        for port in ports:
            _wait_for_port(proc, port, log)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    usage: x509.ObjectIdentifier | None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    paths = {
        name: directory / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key")
    }
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test CA", ca_key, None, ca_key, usage=None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "localhost",
        server_key,
        ca,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("device-1", client_key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    for name, cert in (("ca", ca), ("server", server), ("client", client)):
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server-key"], server_key)
    _write_key(paths["client-key"], client_key)
    return paths


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Mosquitto with an anonymous plain listener and a mutual-TLS listener."""
    directory = tmp_path_factory.mktemp("mosquitto")
    pki = _make_pki(directory)
    port, tls_port = _free_port(), _free_port()
    lines = [
        "allow_anonymous true",
        f"listener {port} {HOST}",
        f"listener {tls_port} {HOST}",
        f"cafile {pki['ca']}",
        f"certfile {pki['server']}",
        f"keyfile {pki['server-key']}",
        "require_certificate true",
    ]
    with _run_mosquitto(directory, lines, [port, tls_port]):
        yield Broker(port, tls_port, pki["ca"], pki["client"], pki["client-key"])


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Mosquitto that refuses anonymous clients and knows one user."""
    directory = tmp_path_factory.mktemp("mosquitto-auth")
    # Mosquitto's "$6$" entry: base64(salt) and base64(SHA-512(password + salt)).
    salt = os.urandom(12)
    digest = hashlib.sha512(PASSWORD + salt).digest()
    password_file = directory / "passwords"
    password_file.write_text(
        f"{USERNAME}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"
    )
    password_file.chmod(0o600)
    port = _free_port()
    lines = ["allow_anonymous false", f"password_file {password_file}", f"listener {port} {HOST}"]
    with _run_mosquitto(directory, lines, [port]):
        yield Broker(port)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Fail the test if asyncio reports an unretrieved task or future exception."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    assert errors == []


ClientFactory = Callable[..., Awaitable[MqttClient]]


@pytest.fixture
async def connect(broker: Broker) -> AsyncIterator[ClientFactory]:
    """Connect clients to the plain listener; whatever the test left open is closed after it."""
    made: list[MqttClient] = []

    async def factory(**kwargs: Any) -> MqttClient:
        client = MqttClient(**kwargs)
        made.append(client)
        await client.connect(HOST, broker.port)
        return client

    yield factory
    for client in made:
        await client.close()


@pytest.fixture
def topic() -> str:
    """A topic no other test uses (the broker and its retained store are shared)."""
    return f"test/{uuid.uuid4().hex}"


def _only_current_task() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


@dataclass
class Peer:
    """The broker side of one connection to the fake broker."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read_packet(self, wait: float = 3.0) -> Packet:
        async with asyncio.timeout(wait):
            first = await self.reader.readexactly(1)
            header = bytearray(first)
            while True:
                header += await self.reader.readexactly(1)
                if decode_remaining_length(header, 1) is not None:
                    break
            decoded = decode_remaining_length(header, 1)
            assert decoded is not None
            body = await self.reader.readexactly(decoded[0])
        result = decode_packet(bytes(header) + body)
        assert result is not None
        return result[0]

    async def accept_connect(self) -> Packet:
        connect_packet = await self.read_packet()
        assert connect_packet.type == PacketType.CONNECT
        self.writer.write(CONNACK_OK)
        return connect_packet


class FakeBroker:
    """An asyncio server whose connections the test scripts packet by packet."""

    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._accepted: list[Peer] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Return at once: the test drives the connection, and no handler task outlives it.
        peer = Peer(reader, writer)
        self._accepted.append(peer)
        self.peers.put_nowait(peer)

    async def accept(self) -> Peer:
        async with asyncio.timeout(3):
            return await self.peers.get()

    async def stop(self) -> None:
        for peer in self._accepted:
            peer.writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def fake_broker() -> AsyncIterator[FakeBroker]:
    """A scripted peer on a free loopback port."""
    fake = FakeBroker()
    await fake.start()
    yield fake
    await fake.stop()


async def _connect_to_fake(fake: FakeBroker, **kwargs: Any) -> tuple[MqttClient, Peer]:
    client = MqttClient(**kwargs)
    connecting = asyncio.create_task(client.connect(HOST, fake.port))
    peer = await fake.accept()
    await peer.accept_connect()
    assert await connecting == 0
    return client, peer


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_matches_the_spec_table(length: int, encoded: bytes) -> None:
    """Remaining Length encodes the boundary values of MQTT 3.1.1 table 2.4."""
    assert encode_remaining_length(length) == encoded
    assert decode_remaining_length(encoded) == (length, len(encoded))


@given(st.integers(min_value=0, max_value=268_435_455))
def test_remaining_length_round_trips(length: int) -> None:
    """Any valid Remaining Length decodes to itself; a prefix of it is reported incomplete."""
    encoded = encode_remaining_length(length)
    assert decode_remaining_length(encoded) == (length, len(encoded))
    assert decode_remaining_length(encoded[:-1]) is None


def test_codec_rejects_malformed_input() -> None:
    """Out-of-range lengths, five-byte lengths and wrong fixed-header flags are refused."""
    with pytest.raises(ValueError, match="remaining length"):
        encode_remaining_length(268_435_456)
    with pytest.raises(MqttProtocolError):
        decode_remaining_length(b"\xff\xff\xff\xff\x01")
    with pytest.raises(MqttProtocolError, match="flags"):
        decode_packet(b"\x60\x02\x00\x01")  # PUBREL must carry flags 0010
    with pytest.raises(MqttProtocolError, match="QoS 3"):
        parse_publish(0b0110, b"\x00\x01a\x00\x01")
    with pytest.raises(ValueError, match="empty"):
        encode_publish("", b"x")
    with pytest.raises(ValueError, match="65535"):
        encode_publish("t" * 65_536, b"x")


def test_encoders_produce_exact_bytes() -> None:
    """CONNECT, PUBLISH and SUBSCRIBE encode byte for byte as the spec lays them out."""
    will = Message("w", b"bye", qos=1, retain=True)
    connect = encode_connect(
        client_id="c", keepalive=60, clean_session=True, will=will, username="u", password=b"p"
    )
    assert connect == (
        b"\x10\x1b\x00\x04MQTT\x04\xee\x00\x3c"  # flags: user, password, will retain, will QoS 1, will, clean
        b"\x00\x01c\x00\x01w\x00\x03bye\x00\x01u\x00\x01p"
    )
    assert encode_publish("a/b", b"hi", qos=1, retain=True, packet_id=10) == b"\x33\x09\x00\x03a/b\x00\x0ahi"
    assert encode_subscribe(5, [("a/#", 2)]) == b"\x82\x08\x00\x05\x00\x03a/#\x02"
    packet, end = decode_packet(b"\x90\x04\x00\x05\x02\x80" + b"rest") or (None, 0)
    assert packet == Packet(PacketType.SUBACK, 0, b"\x00\x05\x02\x80")
    assert end == 6
    assert parse_suback(packet.body) == (5, [2, 0x80])
    message, packet_id = parse_publish(0b0011, b"\x00\x03a/b\x00\x0ahi")
    assert (message, packet_id) == (Message("a/b", b"hi", 1, True), 10)


# --------------------------------------------------------------------------- connect


async def test_connect_reports_session_present(broker: Broker) -> None:
    """CONNACK's session-present flag is 0 for a new persistent session and 1 when it resumes."""
    client_id = f"persist-{uuid.uuid4().hex[:8]}"
    for clean_session, expected in ((False, 0), (False, 1), (True, 0)):  # the last one drops it
        async with MqttClient(client_id=client_id, clean_session=clean_session) as client:
            assert await client.connect(HOST, broker.port) == expected
            await client.disconnect()


async def test_connect_without_credentials_is_refused_with_rc5(auth_broker: Broker) -> None:
    """A broker that requires credentials answers an anonymous CONNECT with return code 5."""
    client = MqttClient(client_id="anonymous")
    with pytest.raises(ConnectRefused) as refused:
        await client.connect(HOST, auth_broker.port)
    assert refused.value.return_code == 5
    assert client.closed
    assert _only_current_task()


async def test_connect_with_credentials_is_accepted(auth_broker: Broker) -> None:
    """User name and password are encoded so that the broker accepts them."""
    async with MqttClient(client_id="with-creds", username=USERNAME, password=PASSWORD) as client:
        assert await client.connect(HOST, auth_broker.port) == 0
        await client.disconnect()


async def test_empty_client_id_with_persistent_session_is_refused_with_rc2(broker: Broker) -> None:
    """A zero-length client id asking for a persistent session gets return code 2 (MQTT-3.1.3-8)."""
    client = MqttClient(client_id="", clean_session=False)
    with pytest.raises(ConnectRefused) as refused:
        await client.connect(HOST, broker.port)
    assert refused.value.return_code == 2


async def test_connect_to_a_closed_port_raises_oserror() -> None:
    """A refused TCP connect surfaces as the OSError itself and leaves nothing running."""
    client = MqttClient()
    with pytest.raises(ConnectionRefusedError):
        await client.connect(HOST, _free_port())
    assert client.closed
    assert _only_current_task()


async def test_connect_times_out_without_connack(fake_broker: FakeBroker) -> None:
    """A peer that never answers CONNECT makes connect() raise TimeoutError and clean up."""
    client = MqttClient()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.connect(HOST, fake_broker.port, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert client.closed
    assert _only_current_task()


async def test_tls_connect_with_client_certificate(broker: Broker, topic: str) -> None:
    """With a CA-issued client certificate the client connects over mutual TLS and round-trips a message."""
    async with MqttClient(client_id="tls-device") as client:
        assert await client.connect(HOST, broker.tls_port, ssl=broker.tls_context()) == 0
        assert await client.subscribe((topic, 1)) == [1]
        await client.publish(topic, b"over tls", qos=1)
        assert await client.next_message(2) == Message(topic, b"over tls", 1, False)
        await client.disconnect()
    assert _only_current_task()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_connect_without_client_certificate_raises_connection_closed(
    broker: Broker, version: ssl.TLSVersion
) -> None:
    """A refused client certificate gives ConnectionClosed, under TLS 1.2 (handshake) and 1.3 (after it)."""
    context = broker.tls_context(with_client_cert=False)
    context.minimum_version = context.maximum_version = version
    client = MqttClient(client_id="no-cert")
    with pytest.raises(ConnectionClosed) as closed:
        await client.connect(HOST, broker.tls_port, ssl=context, server_hostname="localhost")
    cause = closed.value.__cause__
    assert cause is None or isinstance(cause, OSError)  # an SSL alert or a reset, when there is one
    assert client.closed
    assert _only_current_task()


# --------------------------------------------------------------------------- subscribe and publish


async def test_subscribe_returns_granted_qos(connect: ClientFactory, topic: str) -> None:
    """SUBACK return codes come back one per filter, in order; a bare string asks for QoS 0."""
    client = await connect()
    codes = await client.subscribe((f"{topic}/0", 0), (f"{topic}/1", 1), (f"{topic}/2", 2), f"{topic}/bare")
    assert codes == [0, 1, 2, 0]


async def test_unsubscribe_stops_delivery(connect: ClientFactory, topic: str) -> None:
    """After UNSUBACK the dropped filter no longer delivers while the other one still does."""
    client = await connect()
    assert await client.subscribe((f"{topic}/dropped", 1), (f"{topic}/kept", 1)) == [1, 1]
    await client.unsubscribe(f"{topic}/dropped")
    await client.publish(f"{topic}/dropped", b"lost", qos=1)
    await client.publish(f"{topic}/kept", b"kept", qos=1)
    assert await client.next_message(2) == Message(f"{topic}/kept", b"kept", 1, False)


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_publish_and_receive_at_each_qos(connect: ClientFactory, topic: str, qos: int) -> None:
    """25 messages, more than the broker's in-flight window (20), arrive in order: all ack flows complete."""
    subscriber = await connect()
    publisher = await connect()
    assert await subscriber.subscribe((topic, 2)) == [2]
    for i in range(25):
        await publisher.publish(topic, f"m{i}", qos=qos)
    received = [await subscriber.next_message(2) for _ in range(25)]
    assert received == [Message(topic, f"m{i}".encode(), qos, False) for i in range(25)]


async def test_retained_message_is_delivered_on_subscribe(connect: ClientFactory, topic: str) -> None:
    """A retained message reaches a later subscriber with the retain flag set."""
    publisher = await connect()
    await publisher.publish(topic, b"last known", qos=1, retain=True)
    subscriber = await connect()
    assert await subscriber.subscribe((topic, 1)) == [1]
    assert await subscriber.next_message(2) == Message(topic, b"last known", 1, True)
    await publisher.publish(topic, b"", qos=1, retain=True)  # an empty retained message clears it


async def test_will_is_published_when_client_closes_without_disconnect(
    connect: ClientFactory, topic: str
) -> None:
    """close() drops the connection without DISCONNECT, so the broker publishes the will."""
    watcher = await connect()
    await watcher.subscribe((topic, 1))
    device = await connect(client_id=f"will-{uuid.uuid4().hex[:8]}", will=Message(topic, b"gone", 1, False))
    await device.close()
    assert await watcher.next_message(2) == Message(topic, b"gone", 1, False)


async def test_will_is_discarded_after_disconnect(connect: ClientFactory, topic: str) -> None:
    """disconnect() sends DISCONNECT, so the broker discards the will."""
    watcher = await connect()
    await watcher.subscribe((topic, 1))
    device = await connect(client_id=f"will-{uuid.uuid4().hex[:8]}", will=Message(topic, b"gone", 1, False))
    await device.disconnect()
    assert device.closed
    with pytest.raises(TimeoutError):
        await watcher.next_message(0.5)


@pytest.mark.slow
async def test_pipelined_publishes_are_all_acknowledged(connect: ClientFactory, topic: str) -> None:
    """1,000 QoS 1 publishes sent back to back (at most max_inflight unacknowledged) all get their PUBACK."""
    client = await connect()
    acks = [await client.publish_nowait_ack(topic, f"{i}") for i in range(1000)]
    async with asyncio.timeout(10):
        assert await asyncio.gather(*acks) == [None] * 1000


# --------------------------------------------------------------------------- keep-alive and closing


@pytest.mark.slow
async def test_keepalive_keeps_an_idle_session_alive(connect: ClientFactory, topic: str) -> None:
    """With keepalive=1 an idle client outlives 1.5 x keepalive because its PINGREQs are answered."""
    client = await connect(keepalive=1)
    await client.subscribe((topic, 1))
    await asyncio.sleep(2.5)
    assert not client.closed
    await client.publish(topic, b"still here", qos=1, timeout=2)
    assert (await client.next_message(2)).payload == b"still here"


@pytest.mark.slow
async def test_keepalive_sends_pingreq_when_idle(fake_broker: FakeBroker) -> None:
    """An idle client sends PINGREQ every keepalive seconds and stays connected while PINGRESP comes back."""
    client, peer = await _connect_to_fake(fake_broker, keepalive=1)
    started = time.monotonic()
    arrivals = []
    for _ in range(2):
        assert await peer.read_packet(wait=2) == Packet(PacketType.PINGREQ, 0, b"")
        arrivals.append(time.monotonic() - started)
        peer.writer.write(b"\xd0\x00")  # PINGRESP
    assert 0.7 < arrivals[0] < 1.5
    assert 1.7 < arrivals[1] < 2.6
    assert not client.closed
    await client.close()


@pytest.mark.slow
async def test_unanswered_pingreq_ends_the_connection(fake_broker: FakeBroker) -> None:
    """A PINGREQ left unanswered for keepalive seconds closes the connection and fails the waiters."""
    client, peer = await _connect_to_fake(fake_broker, keepalive=1)
    waiter = asyncio.create_task(client.next_message(10))
    assert (await peer.read_packet(wait=2)).type == PacketType.PINGREQ
    await client.wait_closed(timeout=2)
    with pytest.raises(ConnectionClosed, match="PINGRESP"):
        await waiter
    await client.close()
    assert _only_current_task()


async def _iterate(client: MqttClient) -> list[Message]:
    return [message async for message in client.messages()]


async def test_wait_closed_fires_when_the_broker_takes_over_the_client_id(
    connect: ClientFactory, topic: str
) -> None:
    """A second client with the same id makes the broker drop the first, which wait_closed sees at once."""
    client_id = f"takeover-{uuid.uuid4().hex[:8]}"
    first = await connect(client_id=client_id)
    waiter = asyncio.create_task(first.next_message(10))
    second = await connect(client_id=client_id)
    started = time.monotonic()
    await first.wait_closed(timeout=1)
    assert time.monotonic() - started < 0.1
    assert first.closed
    assert not second.closed
    with pytest.raises(ConnectionClosed, match="closed by peer"):
        await waiter
    with pytest.raises(ConnectionClosed):
        await first.publish(topic, b"too late")
    with pytest.raises(ConnectionClosed):  # the peer ended it, so iteration raises instead of stopping
        await _iterate(first)


async def test_broker_drops_a_client_that_sends_a_malformed_packet(connect: ClientFactory) -> None:
    """send_raw writes a PUBLISH with a wildcard topic unchecked, and mosquitto disconnects the sender."""
    client = await connect()
    await client.send_raw(b"\x30\x07\x00\x03a/#hey")
    await client.wait_closed(timeout=2)
    assert client.closed


async def test_messages_iteration_ends_quietly_on_local_close(connect: ClientFactory, topic: str) -> None:
    """messages() yields what arrives and stops without an error once the client closes itself."""
    client = await connect()
    await client.subscribe((topic, 1))
    received: list[bytes] = []
    got_both = asyncio.Event()

    async def consume() -> None:
        async for message in client.messages():
            received.append(message.payload)
            if len(received) == 2:
                got_both.set()

    consumer = asyncio.create_task(consume())
    await client.publish(topic, b"one", qos=1)
    await client.publish(topic, b"two", qos=1)
    async with asyncio.timeout(2):
        await got_both.wait()
    await client.close()
    async with asyncio.timeout(2):
        await consumer  # returns instead of raising ConnectionClosed
    assert received == [b"one", b"two"]


async def test_close_leaves_no_pending_tasks(connect: ClientFactory, topic: str) -> None:
    """After close() neither the reader nor the keep-alive task is left, and close() is idempotent."""
    client = await connect(keepalive=5)
    await client.subscribe((topic, 1))
    await client.publish(topic, b"x", qos=2)
    assert len(asyncio.all_tasks()) == 3  # this test, the reader and the keep-alive task
    await client.close()
    assert _only_current_task()
    await client.close()
    assert client.closed


# --------------------------------------------------------------------------- exact exchanges (fake broker)


async def test_max_inflight_bounds_unacknowledged_publishes(fake_broker: FakeBroker) -> None:
    """With max_inflight=3 a fourth QoS 1 publish waits until a PUBACK frees a slot."""
    client, peer = await _connect_to_fake(fake_broker, max_inflight=3, keepalive=0)
    acks = [await client.publish_nowait_ack("t", b"x") for _ in range(3)]
    packet_ids = [parse_publish(p.flags, p.body)[1] for p in [await peer.read_packet() for _ in range(3)]]
    assert packet_ids == [1, 2, 3]
    fourth = asyncio.create_task(client.publish_nowait_ack("t", b"4"))
    await asyncio.sleep(0.1)
    assert not fourth.done()
    peer.writer.write(encode_puback(1))
    async with asyncio.timeout(2):
        fourth_ack = await fourth
        await acks[0]
    assert not acks[1].done()
    await client.close()
    for ack in (acks[1], acks[2], fourth_ack):
        with pytest.raises(ConnectionClosed):
            await ack


async def test_pending_requests_fail_when_the_connection_drops(fake_broker: FakeBroker) -> None:
    """SUBACK, PUBACK and message waiters, and pipelined futures nobody awaits, get ConnectionClosed."""
    client, peer = await _connect_to_fake(fake_broker, keepalive=0)
    subscribing = asyncio.create_task(client.subscribe("t"))
    publishing = asyncio.create_task(client.publish("t", b"x", qos=1))
    receiving = asyncio.create_task(client.next_message(10))
    await client.publish_nowait_ack("t", b"dropped on purpose", qos=2)  # no warning may follow
    for _ in range(3):
        await peer.read_packet()
    peer.writer.transport.abort()
    await client.wait_closed(timeout=2)
    for task in (subscribing, publishing, receiving):
        with pytest.raises(ConnectionClosed):
            await task
    await client.close()
    assert _only_current_task()


async def test_incoming_qos_flows_are_exact(fake_broker: FakeBroker) -> None:
    """A re-sent QoS 2 PUBLISH is acked again but delivered once, PUBREL gets PUBCOMP, QoS 1 gets PUBACK."""
    client, peer = await _connect_to_fake(fake_broker, keepalive=0)
    peer.writer.write(encode_publish("t", b"once", qos=2, packet_id=7))
    assert await peer.read_packet() == Packet(PacketType.PUBREC, 0, b"\x00\x07")
    peer.writer.write(encode_publish("t", b"once", qos=2, packet_id=7, dup=True))
    assert await peer.read_packet() == Packet(PacketType.PUBREC, 0, b"\x00\x07")
    peer.writer.write(encode_pubrel(7))
    assert await peer.read_packet() == Packet(PacketType.PUBCOMP, 0, b"\x00\x07")
    peer.writer.write(encode_publish("t", b"q1", qos=1, packet_id=8))
    assert await peer.read_packet() == Packet(PacketType.PUBACK, 0, b"\x00\x08")
    # PUBACK is sent once the message is queued, so both are buffered now and outlive close().
    await client.close()
    assert await client.next_message(1) == Message("t", b"once", 2, False)
    assert await client.next_message(1) == Message("t", b"q1", 1, False)
    with pytest.raises(ConnectionClosed, match="closed by client"):
        await client.next_message(1)


async def test_outgoing_qos2_flow_is_exact(fake_broker: FakeBroker) -> None:
    """A QoS 2 publish answers PUBREC with PUBREL and returns only on PUBCOMP."""
    client, peer = await _connect_to_fake(fake_broker, keepalive=0)
    publishing = asyncio.create_task(client.publish("t", b"x", qos=2))
    packet = await peer.read_packet()
    assert parse_publish(packet.flags, packet.body) == (Message("t", b"x", 2, False), 1)
    peer.writer.write(b"\x50\x02\x00\x01")  # PUBREC
    assert await peer.read_packet() == Packet(PacketType.PUBREL, 0b0010, b"\x00\x01")
    await asyncio.sleep(0.05)
    assert not publishing.done()
    peer.writer.write(b"\x70\x02\x00\x01")  # PUBCOMP
    async with asyncio.timeout(2):
        await publishing
    await client.disconnect()
    assert await peer.read_packet() == Packet(PacketType.DISCONNECT, 0, b"")


@pytest.mark.slow
async def test_full_inbound_queue_pushes_back_on_the_broker(fake_broker: FakeBroker) -> None:
    """Past 10,000 unread messages the client stops reading, so the next PUBACK waits for the application."""
    client, peer = await _connect_to_fake(fake_broker, keepalive=0)
    peer.writer.write(b"".join(encode_publish("t", b"m", qos=1, packet_id=i) for i in range(1, 10_002)))
    for i in range(1, 10_001):
        assert await peer.read_packet() == Packet(PacketType.PUBACK, 0, i.to_bytes(2, "big"))
    with pytest.raises(TimeoutError):
        await peer.read_packet(wait=0.2)
    assert await client.next_message(1) == Message("t", b"m", 1, False)
    assert await peer.read_packet() == Packet(PacketType.PUBACK, 0, (10_001).to_bytes(2, "big"))
    await client.close()


async def test_malformed_packet_from_the_peer_closes_the_connection(fake_broker: FakeBroker) -> None:
    """A packet with wrong fixed-header flags ends the connection with the protocol error as the cause."""
    client, peer = await _connect_to_fake(fake_broker, keepalive=0)
    peer.writer.write(b"\x60\x02\x00\x01")  # PUBREL must carry flags 0010
    with pytest.raises(ConnectionClosed, match="protocol violation") as closed:
        await client.next_message(2)
    assert isinstance(closed.value.__cause__, MqttProtocolError)
    await client.close()
