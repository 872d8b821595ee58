"""The certificate lifecycle end to end over real loopback mTLS: renewal over MQTT with overlap,
renewal hints, credential reset, revocation that bites (CRL, TLS, kick, resumption), expiry
visibility, certificates of an external CA, and the additive schema upgrade."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import ssl
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

import ca
from ca import files as ca_files
from gateway.app import GatewayApp
from gateway.config import CaSettings, ExternalAnchor, Settings
from gateway.core import tokens
from gateway.core.admission import CertificateKind
from gateway.core.clock import utcnow
from gateway.core.ids import DeviceId
from gateway.core.records import DeviceQuery, NewCertificate
from gateway.errors import StoreUnavailable
from gateway.mqtt_client import ConnectionClosed, ConnectRefused, Message, MqttClient
from gateway.store import Store
from tests.conftest import Creds, Harness, make_settings
from tests.integration.test_gateway import blocking_connect, next_status, watcher

TIMEOUT_S = 10.0  # a shared 2-core machine: generous, never reached when things work
SHORT_LIVED = {"device_validity_hours": 1, "renew_when_remaining": 0.99}  # always in its last share


@dataclass(frozen=True)
class ExternalCa:
    """A CA the operator brings: its certificate and CRL files, and the means to issue and revoke."""

    authority: ca.Authority
    cert_path: Path
    crl_path: Path

    def issue(self, folder: Path, device_id: str, gateway_ca: Path) -> tuple[Creds, x509.Certificate]:
        key = ca.generate_key()
        cert = ca.issue_client_certificate(
            self.authority,
            key.public_key(),
            subject_id=f"hw-{folder.name}",  # whatever the vendor names it: mapped by fingerprint
            kind="device",
            now=utcnow(),
            validity=timedelta(days=365),
        )
        return save_creds(folder, device_id, key, ca.certificate_pem(cert), gateway_ca), cert

    def revoke(self, *certs: x509.Certificate) -> None:
        entries = [ca.RevokedEntry(cert.serial_number, utcnow()) for cert in certs]
        crl = ca.build_crl(self.authority, entries, now=utcnow(), crl_number=int(time.time() * 1000))
        self.crl_path.write_bytes(ca.crl_pem(crl))


@pytest.fixture
def external_ca(tmp_path: Path) -> ExternalCa:
    folder = tmp_path / "acme"
    folder.mkdir()
    authority = ca.create_authority(now=utcnow(), common_name="Acme Devices CA")
    found = ExternalCa(authority, folder / "acme-ca.crt", folder / "acme-crl.pem")
    found.cert_path.write_bytes(authority.certificate_pem)
    found.revoke()
    return found


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Loopback settings; ``ca`` overrides and an ``external_ca`` come by indirect parametrize."""
    param: dict[str, Any] = getattr(request, "param", {})
    overrides: dict[str, Any] = dict(param.get("ca", {}))
    if param.get("external_ca"):
        anchor: ExternalCa = request.getfixturevalue("external_ca")
        overrides["external_anchors"] = [ExternalAnchor(cert=anchor.cert_path, crl=anchor.crl_path)]
    base = make_settings(tmp_path)
    return base.model_copy(update={"ca": CaSettings(**overrides)})


# --- helpers ---------------------------------------------------------------------------------


def save_creds(folder: Path, device_id: str, key: Any, cert_pem: bytes | str, ca_path: Path) -> Creds:
    """Write a key and certificate where a device keeps them; the Creds of that pair."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_files.write_private_key(folder / "device.key", key, overwrite=True)
    (folder / "device.crt").write_bytes(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    return Creds(device_id, folder / "device.key", folder / "device.crt", ca_path)


def keep(creds: Creds, folder: Path) -> Creds:
    """A copy of `creds` in `folder` (the harness's enroll overwrites a device's files)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "device.key").write_bytes(creds.key.read_bytes())
    (folder / "device.key").chmod(0o600)
    (folder / "device.crt").write_bytes(creds.cert.read_bytes())
    return Creds(creds.name, folder / "device.key", folder / "device.crt", creds.ca)


def serial_of(creds: Creds) -> str:
    return ca.serial_hex(x509.load_pem_x509_certificate(creds.cert.read_bytes()).serial_number)


async def certificate_channel(gw: Harness, creds: Creds) -> MqttClient:
    """A connected device subscribed to its certificate answers (the subscription is granted)."""
    client = await gw.connect(creds)
    assert await client.subscribe((f"devices/{creds.name}/certificate/+", 1)) == [1]
    return client


async def next_on(client: MqttClient, topic_suffixes: tuple[str, ...]) -> Message:
    """The next message whose topic ends with one of `topic_suffixes` (the renew echo is skipped)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        message = await client.next_message(timeout=max(0.01, deadline - time.monotonic()))
        if message.topic.endswith(topic_suffixes):
            return message


async def ask_renewal(client: MqttClient, device_id: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """Publish one renewal request; the answer's kind (accepted | rejected) and body."""
    await client.publish(f"devices/{device_id}/certificate/renew", payload, qos=1)
    answer = await next_on(client, ("/accepted", "/rejected"))
    return answer.topic.rsplit("/", 1)[1], json.loads(answer.payload)


async def renew(gw: Harness, client: MqttClient, device_id: str, folder: str) -> Creds:
    """Renew over MQTT with a fresh key; the new certificate's Creds (in its own folder)."""
    key = ca.generate_key()
    kind, body = await ask_renewal(client, device_id, csr_request(key))
    assert kind == "accepted", body
    return save_creds(gw.root / "renewed" / folder, device_id, key, body["certificate"], gw.ca_path)


def csr_request(key: Any) -> bytes:
    return json.dumps({"csr": ca.make_csr(key, "whatever").decode()}).encode()


async def refused_at_tls(gw: Harness, creds: Creds) -> None:
    """The handshake fails (no CONNACK at all) and the listener counts one TLS failure."""
    failures = gw.app.listener.tls_failures
    with pytest.raises(ConnectionClosed):
        await gw.connect(creds)
    assert gw.app.listener.tls_failures == failures + 1


async def refused_with(gw: Harness, creds: Creds, code: int) -> None:
    """TLS passes, the CONNECT is refused with CONNACK `code`."""
    failures = gw.app.listener.tls_failures
    with pytest.raises(ConnectRefused) as refused:
        await gw.connect(creds)
    assert refused.value.return_code == code
    assert gw.app.listener.tls_failures == failures


async def crl_serials(gw: Harness) -> set[int]:
    response = await gw.api.get("/ca/crl", headers={"Authorization": ""})
    assert response.status_code == 200
    crl = x509.load_pem_x509_crl(response.content)
    assert crl.is_signature_valid(gw.app.pki.authority.key.public_key())
    return {entry.serial_number for entry in crl}


async def certificates(gw: Harness, device_id: str) -> dict[str, dict[str, Any]]:
    """GET /devices/{id}/certificates, keyed by serial."""
    response = await gw.api.get(f"/devices/{device_id}/certificates")
    assert response.status_code == 200, response.text
    return {cert["serial"]: cert for cert in response.json()["data"]}


async def next_event(ops: MqttClient, kind: str, **fields: object) -> dict[str, Any]:
    """Read the operator's messages until an event of `kind` with `fields` arrives."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        message = await ops.next_message(timeout=max(0.01, deadline - time.monotonic()))
        if message.topic == f"gateway/events/{kind}":
            event: dict[str, Any] = json.loads(message.payload)
            if all(event.get(key) == value for key, value in fields.items()):
                return event


async def extra_token(gw: Harness, *scopes: str) -> dict[str, str]:
    """Authorization headers of a new API token with only `scopes`."""
    token = tokens.new_token(tokens.API_PREFIX)
    await gw.app.store.tokens.add("limited", tokens.hash_token(token), frozenset(scopes), utcnow())
    return {"Authorization": f"Bearer {token}"}


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- renewal over MQTT -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [{"ca": {"renew_min_interval_s": 0}}], indirect=True, ids=["renew-often"]
)
async def test_renewal_overlaps_until_the_new_certificate_is_first_used(gateway: Harness) -> None:
    """Renewal over MQTT: the old certificate works until the new one connects, then fails at TLS."""
    old = await gateway.device()
    ops = await watcher(gateway)
    device = await certificate_channel(gateway, old)
    key = ca.generate_key()
    kind, body = await ask_renewal(device, old.name, csr_request(key))
    assert kind == "accepted", body
    assert set(body) == {"device_id", "certificate", "ca_chain", "certificate_serial", "not_after"}
    issued = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert body["device_id"] == old.name
    assert body["certificate_serial"] == ca.serial_hex(issued.serial_number)
    assert issued.public_key() == key.public_key()  # the device's own key, which never left it
    assert body["ca_chain"].encode() == gateway.ca_path.read_bytes()
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate(body["ca_chain"].encode()))
    assert when(body["not_after"]) == issued.not_valid_after_utc
    assert (await next_event(ops, "device", action="certificate_renewed"))["device_id"] == old.name
    new = save_creds(gateway.root / "renewed", old.name, key, body["certificate"], gateway.ca_path)

    # Overlap: both are valid; the old one still connects (and is still not on the CRL).
    await device.disconnect()
    again = await gateway.connect(old)
    assert int(serial_of(old), 16) not in await crl_serials(gateway)
    listed = await certificates(gateway, old.name)
    assert listed[body["certificate_serial"]]["renews"] == serial_of(old)
    assert listed[body["certificate_serial"]]["first_used_at"] is None
    assert listed[serial_of(old)]["revoked_at"] is None

    # First use of the new one: it takes over the session and revokes the old one.
    renewed = await gateway.connect(new)
    await again.wait_closed(timeout=TIMEOUT_S)
    event = await next_event(ops, "device", action="certificates_superseded")
    assert (event["certificate_serials"], event["by"]) == ([serial_of(old)], serial_of(new))
    listed = await certificates(gateway, old.name)
    assert listed[serial_of(old)]["revoked_at"] is not None
    assert listed[serial_of(new)]["first_used_at"] is not None
    assert int(serial_of(old), 16) in await crl_serials(gateway)
    await refused_at_tls(gateway, old)
    assert not renewed.closed
    record = (await gateway.api.get(f"/devices/{old.name}")).json()["data"]
    assert record["certificate"]["serial"] == serial_of(new)


@pytest.mark.parametrize(
    "settings", [{"ca": {"renew_min_interval_s": 0}}], indirect=True, ids=["renew-often"]
)
async def test_a_second_renewal_before_first_use_replaces_the_first(gateway: Harness) -> None:
    """A second renewal revokes the unused first one; the original stays valid until the second is used."""
    old = await gateway.device()
    device = await certificate_channel(gateway, old)
    first = await renew(gateway, device, old.name, "first")
    second = await renew(gateway, device, old.name, "second")
    listed = await certificates(gateway, old.name)
    assert listed[serial_of(first)]["revoked_at"] is not None
    assert listed[serial_of(second)]["revoked_at"] is None
    assert listed[serial_of(second)]["renews"] == serial_of(old)
    assert int(serial_of(first), 16) in await crl_serials(gateway)
    await device.disconnect()

    await refused_at_tls(gateway, first)
    original = await gateway.connect(old)  # the original is untouched by the replacement
    await original.disconnect()
    client = await gateway.connect(second)
    # The broker reads a session's packets only once it started: first use is recorded by then.
    assert await client.subscribe((f"devices/{old.name}/errors", 0)) == [0]
    assert int(serial_of(old), 16) in await crl_serials(gateway)
    await refused_at_tls(gateway, old)


@pytest.mark.parametrize(
    "settings", [{"ca": {"renew_min_interval_s": 0}}], indirect=True, ids=["renew-often"]
)
async def test_a_saved_tls_session_of_a_superseded_certificate_cannot_be_resumed(gateway: Harness) -> None:
    """During the overlap a TLS session of the old certificate resumes; once superseded it never does."""
    old = await gateway.device()
    context = old.tls()
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # session ids: resumption decided in the handshake
    code, session, _ = await asyncio.to_thread(blocking_connect, old, context, gateway.mqtt_port)
    assert code == 0
    device = await certificate_channel(gateway, old)
    new = await renew(gateway, device, old.name, "new")
    await device.disconnect()
    code, _, reused = await asyncio.to_thread(blocking_connect, old, context, gateway.mqtt_port, session)
    assert (code, reused) == (0, True)  # overlap: the old certificate is still good, resumption too

    client = await gateway.connect(new)
    assert await client.subscribe((f"devices/{old.name}/certificate/#", 1)) == [1]  # session started
    code, _, reused = await asyncio.to_thread(blocking_connect, old, context, gateway.mqtt_port, session)
    assert (code, reused) == (-1, False)


GARBAGE_PEM = b"-----BEGIN CERTIFICATE REQUEST-----\\nAAAA\\n-----END CERTIFICATE REQUEST-----"


def bad_renewals() -> list[tuple[bytes, str]]:
    """(payload, expected rejection code) for every way a renewal request can be wrong."""
    from tests.integration.test_provisioning_mqtt import tampered_csr

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return [
        (b"not json", "bad_request"),
        (b"\xff\xfe{", "bad_request"),
        (b"[" * 100_000, "bad_request"),  # nested too deeply for the JSON parser
        (b'["csr"]', "bad_request"),
        (b'{"csr": 42}', "bad_request"),
        (b'{"csr": "x", "key": "y"}', "bad_request"),
        (b'{"csr": "' + GARBAGE_PEM + b'"}', "csr_malformed"),
        (b'{"csr": "caf\\u00e9"}', "csr_malformed"),
        (json.dumps({"csr": tampered_csr()}).encode(), "csr_bad_signature"),
        (csr_request(weak), "csr_weak_key"),
    ]


async def test_bad_renewal_requests_are_rejected_and_the_session_stays(gateway: Harness) -> None:
    """Bad JSON, wrong shape, unparseable, tampered or weak CSRs get certificate/rejected with a code."""
    creds = await gateway.device()
    device = await certificate_channel(gateway, creds)
    cases = bad_renewals()
    for payload, code in cases:
        kind, body = await ask_renewal(device, creds.name, payload)
        assert (kind, body["code"]) == ("rejected", code), (payload[:40], body)
        assert set(body) == {"code", "message"}
    assert gateway.app.certificates.renewals_refused == len(cases)
    assert list(await certificates(gateway, creds.name)) == [serial_of(creds)]  # nothing issued
    assert not device.closed
    assert await device.subscribe((f"devices/{creds.name}/errors", 0)) == [0]  # still served


@pytest.mark.parametrize("settings", [{"ca": {"renew_min_interval_s": 3}}], indirect=True, ids=["3s"])
async def test_renewals_are_rate_limited_per_device(gateway: Harness) -> None:
    """Within renew_min_interval_s of the device's last renewal another is rejected (rate_limited)."""
    creds = await gateway.device()
    device = await certificate_channel(gateway, creds)
    first = serial_of(await renew(gateway, device, creds.name, "first"))  # enrolment does not count
    kind, body = await ask_renewal(device, creds.name, csr_request(ca.generate_key()))
    assert (kind, body["code"]) == ("rejected", "rate_limited")  # the renewal was just now
    renewed = when((await certificates(gateway, creds.name))[first]["created_at"])
    await asyncio.sleep(max(0.0, (renewed - utcnow()).total_seconds() + 3 + 0.2))
    await renew(gateway, device, creds.name, "second")
    assert len(await certificates(gateway, creds.name)) == 3


async def test_devices_cannot_forge_certificate_answers(gateway: Harness) -> None:
    """A device may publish only certificate/renew in its channel, never answers or another device's renew."""
    creds, other = await gateway.device(), await gateway.device()
    device = await certificate_channel(gateway, creds)
    victim = await certificate_channel(gateway, other)
    assert await device.subscribe((f"devices/{creds.name}/errors", 0)) == [0]
    assert await device.subscribe((f"devices/{other.name}/certificate/#", 0)) == [0x80]
    forged = json.dumps({"certificate": "-----BEGIN CERTIFICATE-----"}).encode()
    before = gateway.app.gatekeeper.denied_publishes
    for topic in (
        f"devices/{creds.name}/certificate/accepted",
        f"devices/{creds.name}/certificate/rejected",
        f"devices/{creds.name}/certificate/expiring",
        f"devices/{creds.name}/certificate/renew/extra",
        f"devices/{other.name}/certificate/renew",
        f"devices/{other.name}/certificate/accepted",
    ):
        await device.publish(topic, forged, qos=1)
        error = await device.next_message(timeout=TIMEOUT_S)  # the error, not the forged message
        assert error.topic == f"devices/{creds.name}/errors", error.topic
        assert (json.loads(error.payload)["code"], json.loads(error.payload)["topic"]) == (
            "acl_denied",
            topic,
        )
    assert gateway.app.gatekeeper.denied_publishes == before + 6
    assert gateway.app.certificates.renewed == 0
    # The victim's channel got nothing: its next message is the answer to its own request.
    kind, _ = await ask_renewal(victim, other.name, b"{}")
    assert kind == "rejected"


# --- renewal hints and short-lived certificates ----------------------------------------------


@pytest.mark.parametrize("settings", [{"ca": SHORT_LIVED}], indirect=True, ids=["short-lived"])
async def test_a_certificate_in_its_last_share_gets_a_retained_renewal_hint(gateway: Harness) -> None:
    """With 1-hour certificates and renew_when_remaining 0.99 the hint is retained on certificate/expiring."""
    creds = await gateway.device()
    listed = (await certificates(gateway, creds.name))[serial_of(creds)]
    lifetime = when(listed["not_after"]) - when(listed["created_at"])
    assert timedelta(minutes=59) < lifetime <= timedelta(hours=1)  # device_validity_hours overrides days
    device = await gateway.connect(creds)
    assert await device.subscribe((f"devices/{creds.name}/certificate/#", 1)) == [1]
    hint = await device.next_message(timeout=TIMEOUT_S)
    assert (hint.topic, hint.retain) == (f"devices/{creds.name}/certificate/expiring", True)
    body = json.loads(hint.payload)
    assert set(body) == {"device_id", "certificate_serial", "not_after", "remaining_s"}
    assert (body["device_id"], body["certificate_serial"]) == (creds.name, serial_of(creds))
    assert when(body["not_after"]) == when(listed["not_after"])
    assert 3000 < body["remaining_s"] <= 3600


async def test_no_renewal_hint_while_much_validity_remains(gateway: Harness) -> None:
    """A year-long certificate is not in its last share: nothing is retained on certificate/expiring."""
    creds = await gateway.device()
    device = await gateway.connect(creds)
    assert await device.subscribe((f"devices/{creds.name}/certificate/#", 1)) == [1]
    # Retained messages are sent on SUBSCRIBE, before the next packet is read: the first
    # message is the answer to this request, so there was no hint.
    await device.publish(f"devices/{creds.name}/certificate/renew", b"{}", qos=1)
    first = await device.next_message(timeout=TIMEOUT_S)
    assert first.topic == f"devices/{creds.name}/certificate/rejected"
    assert gateway.app.engine.retained(f"devices/{creds.name}/certificate/expiring") is None


# --- credential reset ------------------------------------------------------------------------


async def test_reset_keeps_the_old_certificate_until_the_new_token_is_enrolled(gateway: Harness) -> None:
    """Reset without revoke: the old certificate works; enrolling with the new token revokes it and kicks."""
    creds = await gateway.device()
    old = keep(creds, gateway.root / "old")
    ops = await watcher(gateway)
    device = await gateway.connect(old)
    await next_status(ops, old.name, "online")

    response = await gateway.api.post(f"/devices/{old.name}/credentials/reset")
    assert response.status_code == 200, response.text
    token = response.json()["registration_token"]
    assert response.json()["data"]["id"] == old.name
    event = await next_event(ops, "device", action="credentials_reset")
    assert (event["revoke_existing"], event["certificate_serials"]) == (False, [])
    assert await device.subscribe((f"devices/{old.name}/errors", 0)) == [0]  # not kicked
    await device.disconnect()
    assert (await next_status(ops, old.name, "offline"))["reason"] == "client_disconnect"
    device = await gateway.connect(old)  # and it still connects
    await next_status(ops, old.name, "online")
    assert int(serial_of(old), 16) not in await crl_serials(gateway)

    fresh = await gateway.enroll(token)
    await device.wait_closed(timeout=TIMEOUT_S)  # enrolment revoked the old certificate: kicked
    assert (await next_status(ops, old.name, "offline"))["reason"] == "revoked"
    assert int(serial_of(old), 16) in await crl_serials(gateway)
    await refused_at_tls(gateway, old)
    await gateway.connect(fresh)
    assert (await next_status(ops, old.name, "online"))["certificate_serial"] == serial_of(fresh)
    listed = await certificates(gateway, old.name)
    assert listed[serial_of(old)]["revoked_at"] is not None
    assert listed[serial_of(fresh)]["revoked_at"] is None


async def test_reset_with_revoke_existing_cuts_the_device_off_at_once(gateway: Harness) -> None:
    """Reset with revoke_existing: kicked at once, serial on the CRL, handshake fails; new token enrols."""
    creds = await gateway.device()
    old = keep(creds, gateway.root / "old")
    ops = await watcher(gateway)
    device = await gateway.connect(old)
    await next_status(ops, old.name, "online")

    started = time.perf_counter()
    response = await gateway.api.post(
        f"/devices/{old.name}/credentials/reset", params={"revoke_existing": "true"}
    )
    await device.wait_closed(timeout=TIMEOUT_S)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert (await next_status(ops, old.name, "offline"))["reason"] == "revoked"
    event = await next_event(ops, "device", action="credentials_reset")
    assert (event["revoke_existing"], event["certificate_serials"]) == (True, [serial_of(old)])
    assert int(serial_of(old), 16) in await crl_serials(gateway)
    await refused_at_tls(gateway, old)
    record = (await gateway.api.get(f"/devices/{old.name}")).json()["data"]
    assert (record["status"], record["certificate"]) == ("active", None)  # reset is not a revoke

    fresh = await gateway.enroll(response.json()["registration_token"])
    await gateway.connect(fresh)
    assert (await next_status(ops, old.name, "online"))["certificate_serial"] == serial_of(fresh)
    assert elapsed < 2.0, elapsed


async def test_reset_refusals_and_tokens(gateway: Harness) -> None:
    """Reset needs admin scope, a known and unrevoked device, and each reset voids the previous token."""
    device_id, _ = await gateway.register()
    writer = await extra_token(gateway, tokens.READ, tokens.WRITE)
    forbidden = await gateway.api.post(f"/devices/{device_id}/credentials/reset", headers=writer)
    assert forbidden.status_code == 403
    missing = await gateway.api.post("/devices/no-such-device/credentials/reset")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "device_not_found")

    first = (await gateway.api.post(f"/devices/{device_id}/credentials/reset")).json()["registration_token"]
    second = (await gateway.api.post(f"/devices/{device_id}/credentials/reset")).json()["registration_token"]
    csr = ca.make_csr(ca.generate_key(), "x").decode()
    stale = await gateway.api.post(
        "/devices/provision", json={"token": first, "csr": csr}, headers={"Authorization": ""}
    )
    assert stale.json()["error"]["code"] == "token_expired"
    await gateway.enroll(second)

    await gateway.api.post(f"/devices/{device_id}/revoke")
    revoked = await gateway.api.post(f"/devices/{device_id}/credentials/reset")
    assert (revoked.status_code, revoked.json()["error"]["code"]) == (409, "device_revoked")


# --- revocation that bites -------------------------------------------------------------------


async def test_revoke_cuts_live_sessions_within_100ms_and_tls_refuses_them(gateway: Harness) -> None:
    """Revoking live devices cuts each session in under 100 ms (median of 5); each next handshake fails."""
    fleet = [await gateway.device() for _ in range(5)]
    elapsed = []
    for creds in fleet:
        device = await gateway.connect(creds)
        assert await device.subscribe((f"devices/{creds.name}/errors", 0)) == [0]  # session started
        started = time.perf_counter()
        response = await gateway.api.post(f"/devices/{creds.name}/revoke")
        await device.wait_closed(timeout=TIMEOUT_S)
        elapsed.append(time.perf_counter() - started)
        assert response.status_code == 200
    assert statistics.median(elapsed) < 0.100, elapsed
    assert {int(serial_of(c), 16) for c in fleet} <= await crl_serials(gateway)
    for creds in fleet:
        await refused_at_tls(gateway, creds)


def openssl_crl(path: Path, form: str, ca_path: Path) -> tuple[set[int], str]:
    """Serials `openssl crl` lists in the CRL at `path`, and what it said about the signature."""
    done = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-inform", form, "-CAfile", str(ca_path), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    serials = {int(found, 16) for found in re.findall(r"Serial Number: ([0-9A-Fa-f]+)", done.stdout)}
    return serials, done.stderr + done.stdout


async def test_crl_is_served_as_pem_and_der_and_both_parse(gateway: Harness, tmp_path: Path) -> None:
    """GET /ca/crl as PEM and (Accept: application/pkix-crl) DER: cryptography and openssl list the serial."""
    revoked, kept = await gateway.device(), await gateway.device()
    await gateway.api.post(f"/devices/{revoked.name}/revoke")
    serial = int(serial_of(revoked), 16)
    bare = {"Authorization": ""}
    pem = await gateway.api.get("/ca/crl", headers=bare)
    der = await gateway.api.get("/ca/crl", headers={**bare, "Accept": "application/pkix-crl"})
    assert (pem.status_code, der.status_code) == (200, 200)
    assert pem.headers["content-type"].startswith("application/x-pem-file")
    assert der.headers["content-type"].startswith("application/pkix-crl")
    assert pem.content.startswith(b"-----BEGIN X509 CRL-----")
    from_pem, from_der = x509.load_pem_x509_crl(pem.content), x509.load_der_x509_crl(der.content)
    assert from_pem == from_der  # the same CRL in two encodings
    ca_key = gateway.app.pki.authority.key.public_key()
    assert from_der.is_signature_valid(ca_key)
    assert from_der.issuer == gateway.app.pki.authority.certificate.subject
    assert from_der.get_revoked_certificate_by_serial_number(serial) is not None
    assert from_der.get_revoked_certificate_by_serial_number(int(serial_of(kept), 16)) is None
    assert from_der.next_update_utc is not None and from_der.next_update_utc > utcnow()

    for name, body, form in (("crl.pem", pem.content, "PEM"), ("crl.der", der.content, "DER")):
        (tmp_path / name).write_bytes(body)
        listed, said = openssl_crl(tmp_path / name, form, gateway.ca_path)
        assert serial in listed, said
        assert int(serial_of(kept), 16) not in listed
        assert "verify OK" in said, said


# --- expiry visibility -----------------------------------------------------------------------


@pytest.fixture
async def mixed_fleet(tmp_path: Path) -> AsyncIterator[tuple[Harness, dict[str, str]]]:
    """A gateway whose device validity was cut from a year to 12 hours: devices enrolled before
    keep year-long certificates. Yields the harness and device ids by role."""
    first = GatewayApp(make_settings(tmp_path))
    await first.start()
    gw = Harness(first, tmp_path)
    try:
        ids = {"long": (await gw.device(name="long")).name}
        ids["pending"], _ = await gw.register("pending")
    finally:
        await gw.close()
        await first.stop()
    admin_token = gw.admin_token
    base = make_settings(tmp_path)
    app = GatewayApp(base.model_copy(update={"ca": CaSettings(device_validity_hours=12)}))
    await app.start()
    assert app.init_report is not None
    app.init_report.admin_token = admin_token  # a restart prints no token: reuse the first one
    gw = Harness(app, tmp_path)
    try:
        ids["short"] = (await gw.device(name="short")).name
        ids["revoked"] = (await gw.device(name="revoked")).name
        assert (await gw.api.post(f"/devices/{ids['revoked']}/revoke")).status_code == 200
        yield gw, ids
    finally:
        await gw.close()
        await app.stop()


async def test_devices_can_be_listed_by_certificate_expiry(
    mixed_fleet: tuple[Harness, dict[str, str]],
) -> None:
    """cert_expires_within lists devices whose newest valid certificate ends within the window."""
    gw, ids = mixed_fleet

    async def within(window: str) -> set[str]:
        response = await gw.api.get("/devices", params={"cert_expires_within": window})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == len(body["data"])
        return {device["id"] for device in body["data"]}

    assert await within("1h") == set()
    assert await within("13h") == {ids["short"]}
    assert await within("30d") == {ids["short"]}
    assert await within("400d") == {ids["short"], ids["long"]}  # never the pending or the revoked one
    assert len((await gw.api.get("/devices")).json()["data"]) == 4  # without the filter: every device
    bad = await gw.api.get("/devices", params={"cert_expires_within": "soon"})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_duration")


async def test_expiring_certificates_are_announced_to_operators(
    mixed_fleet: tuple[Harness, dict[str, str]],
) -> None:
    """The daily check publishes gateway/events/certificate_expiring for each device within the horizon."""
    gw, ids = mixed_fleet
    ops = await watcher(gw)
    serial = (await gw.api.get(f"/devices/{ids['short']}")).json()["data"]["certificate"]["serial"]
    assert await gw.app.certificates.announce_expiring(gw.app.engine.live_sessions()) == 1
    event = await next_event(ops, "certificate_expiring")
    assert (event["device_id"], event["certificate_serial"], event["expired"]) == (
        ids["short"],
        serial,
        False,
    )
    assert timedelta(hours=11) < when(event["not_after"]) - utcnow() <= timedelta(hours=12)
    # Nothing else was announced: the next event is one we cause now.
    await gw.register("sentinel")
    following = await ops.next_message(timeout=TIMEOUT_S)
    while not following.topic.startswith("gateway/events/"):  # retained statuses may come first
        following = await ops.next_message(timeout=TIMEOUT_S)
    assert following.topic == "gateway/events/device"
    assert json.loads(following.payload)["action"] == "registered"


# --- bring your own CA -----------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"external_ca": True}], indirect=True, ids=["external-ca"])
async def test_certificates_of_an_external_ca_identify_devices_once_attached(
    gateway: Harness, external_ca: ExternalCa
) -> None:
    """An attached external certificate connects ONLINE; an unattached one of that CA gets CONNACK 5."""
    ops = await watcher(gateway)
    device_id, _ = await gateway.register("acme")
    creds, cert = external_ca.issue(gateway.root / "acme-1", device_id, gateway.ca_path)
    response = await gateway.api.post(
        f"/devices/{device_id}/certificates", json={"certificate": ca.certificate_pem(cert).decode()}
    )
    assert response.status_code == 201, response.text
    attached = response.json()["data"]
    assert (attached["source"], attached["serial"]) == ("attached", ca.serial_hex(cert.serial_number))
    assert attached["fingerprint_sha256"] == ca.fingerprint_sha256(cert)
    assert (await next_event(ops, "device", action="certificate_attached"))["device_id"] == device_id

    device = await gateway.connect(creds)
    status = await next_status(ops, device_id, "online")
    assert status["certificate_serial"] == attached["serial"]
    record = (await gateway.api.get(f"/devices/{device_id}")).json()["data"]
    assert record["status"] == "active"  # the check-in

    stranger, unknown = external_ca.issue(gateway.root / "acme-2", device_id, gateway.ca_path)
    await refused_with(gateway, stranger, 5)  # passes TLS (a configured CA), refused by the registry
    failed = await next_event(ops, "connect_failed")
    assert (failed["reason"], failed["fingerprint"]) == (
        "unknown_certificate",
        ca.fingerprint_sha256(unknown),
    )
    assert not device.closed and gateway.app.engine.is_connected(device_id)  # the refusal disturbed nobody

    await gateway.api.post(f"/devices/{device_id}/revoke")
    await device.wait_closed(timeout=TIMEOUT_S)
    await refused_with(gateway, creds, 5)  # our CRL cannot list a foreign serial: the registry refuses
    assert (await next_event(ops, "connect_failed"))["reason"] == "certificate_revoked"


def broken_extension(pem: str) -> str:
    """`pem` with its extended key usage made unparseable (the certificate itself still loads)."""
    der = bytearray(ssl.PEM_cert_to_DER_cert(pem))
    eku = bytes(der).index(b"\x55\x1d\x25\x04\x0c\x30\x0a")  # id-ce-extKeyUsage, its value
    der[eku + 7] = 0x05  # the OID inside the value is no longer an OID
    return ssl.DER_cert_to_PEM_cert(bytes(der))


@pytest.mark.parametrize("settings", [{"external_ca": True}], indirect=True, ids=["external-ca"])
async def test_attaching_refuses_certificates_that_cannot_identify_a_device(
    gateway: Harness, external_ca: ExternalCa
) -> None:
    """Other CAs, our own CA, CA certificates, garbage, duplicates and non-admins are refused."""
    device_id, _ = await gateway.register("acme")
    other = ca.create_authority(now=utcnow(), common_name="Acme Devices CA")  # same name, other key
    own = gateway.app.pki.authority

    def client_cert(authority: ca.Authority) -> str:
        cert = ca.issue_client_certificate(
            authority,
            ca.generate_key().public_key(),
            subject_id="hw",
            kind="device",
            now=utcnow(),
            validity=timedelta(days=30),
        )
        return ca.certificate_pem(cert).decode()

    async def attach(pem: str, **kwargs: Any) -> tuple[int, str | None]:
        response = await gateway.api.post(
            f"/devices/{device_id}/certificates", json={"certificate": pem}, **kwargs
        )
        return response.status_code, response.json().get("error", {}).get("code")

    assert await attach(client_cert(other)) == (422, "certificate_untrusted_issuer")
    assert await attach(client_cert(own)) == (422, "certificate_untrusted_issuer")
    assert await attach(external_ca.authority.certificate_pem.decode()) == (
        422,
        "certificate_not_a_client_certificate",
    )
    assert await attach("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n") == (
        422,
        "certificate_malformed",
    )
    assert await attach("caf\u00e9") == (422, "certificate_malformed")
    good = client_cert(external_ca.authority)
    assert await attach(broken_extension(good)) == (422, "certificate_malformed")  # parses, then breaks
    writer = await extra_token(gateway, tokens.READ, tokens.WRITE)
    assert (await attach(good, headers=writer))[0] == 403
    assert await attach(good) == (201, None)
    assert await attach(good) == (409, "certificate_exists")
    listed = await certificates(gateway, device_id)
    assert [c["source"] for c in listed.values()] == ["attached"]


@pytest.mark.parametrize("settings", [{"external_ca": True}], indirect=True, ids=["external-ca"])
async def test_the_external_crl_is_honoured_at_tls_after_a_refresh(
    gateway: Harness, external_ca: ExternalCa
) -> None:
    """A certificate the external CA revokes in its CRL file fails the handshake after the next refresh."""
    device_id, _ = await gateway.register("acme")
    creds, cert = external_ca.issue(gateway.root / "acme-1", device_id, gateway.ca_path)
    pem = ca.certificate_pem(cert).decode()
    assert (
        await gateway.api.post(f"/devices/{device_id}/certificates", json={"certificate": pem})
    ).status_code == 201
    external_ca.revoke(cert)
    await (await gateway.connect(creds)).disconnect()  # the CRL is reread at refresh, not on every connect
    await gateway.app.revocations.refresh()
    await refused_at_tls(gateway, creds)


async def test_attaching_needs_a_configured_external_ca(gateway: Harness, external_ca: ExternalCa) -> None:
    """Without ca.external_anchors, attaching any certificate is refused with no_external_ca."""
    device_id, _ = await gateway.register("acme")
    _, cert = external_ca.issue(gateway.root / "acme-1", device_id, gateway.ca_path)
    response = await gateway.api.post(
        f"/devices/{device_id}/certificates", json={"certificate": ca.certificate_pem(cert).decode()}
    )
    assert (response.status_code, response.json()["error"]["code"]) == (422, "no_external_ca")


# --- schema upgrade --------------------------------------------------------------------------

OLD_CERTIFICATES = """
CREATE TABLE certificates (
    serial VARCHAR(64) NOT NULL PRIMARY KEY,
    fingerprint_sha256 VARCHAR(64) NOT NULL UNIQUE,
    kind VARCHAR(16) NOT NULL,
    subject VARCHAR(64) NOT NULL,
    not_before DATETIME NOT NULL,
    not_after DATETIME NOT NULL,
    created_at DATETIME NOT NULL,
    revoked_at DATETIME,
    pem TEXT NOT NULL
)
"""


def old_database(path: Path, ddl: str) -> None:
    """A registry as an earlier release left it: one revoked certificate in the old table shape."""
    with sqlite3.connect(path) as db:
        db.execute(ddl)
        db.execute(
            "INSERT INTO certificates (serial, fingerprint_sha256, kind, subject, not_before, not_after,"
            " created_at, revoked_at, pem) VALUES ('abc123', ?, 'device', 'dev-1', '2025-01-01 00:00:00',"
            " '2026-01-01 00:00:00', '2025-01-01 00:00:00', '2025-06-01 00:00:00', 'PEM')",
            ("f" * 64,),
        )
    db.close()


def columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as db:
        found = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    db.close()
    return found


async def test_create_schema_adds_the_lifecycle_columns_to_an_old_database(tmp_path: Path) -> None:
    """An old certificates table gains renews, first_used_at and source; old rows stay on the CRL."""
    path = tmp_path / "old.db"
    old_database(path, OLD_CERTIFICATES)
    assert not {"renews", "first_used_at", "source"} & columns(path, "certificates")
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        await store.create_schema()
        await store.create_schema()  # idempotent
        assert {"renews", "first_used_at", "source"} <= columns(path, "certificates")
        old = await store.credentials.certificate("abc123")
        assert (old.source, old.renews, old.first_used_at) == ("issued", None, None)
        assert [serial for serial, _ in await store.credentials.revoked_certificates()] == ["abc123"]
    finally:
        await store.close()


async def test_create_schema_fills_the_expiry_column_of_an_existing_registry(tmp_path: Path) -> None:
    """A registry from before devices.cert_not_after gets it filled from the certificates it kept:
    the latest unrevoked end of each device (revoked ones and devices without any: empty)."""
    path = tmp_path / "registry.db"
    store = Store(f"sqlite+aiosqlite:///{path}")
    now = utcnow()
    try:
        await store.create_schema()
        for name, ends in (("dev-1", [10, 40]), ("dev-2", [5]), ("dev-3", [])):
            await store.create_device(DeviceId(name), name, now)
            for index, days in enumerate(ends):
                await store.credentials.add_certificate(
                    NewCertificate(
                        serial=f"{name}-{index}",
                        fingerprint_sha256=f"{name}-{index}".ljust(64, "0"),
                        kind=CertificateKind.DEVICE,
                        subject=name,
                        not_before=now,
                        not_after=now + timedelta(days=days),
                        pem="-",
                    ),
                    now,
                )
        await store.credentials.revoke_certificates(CertificateKind.DEVICE, "dev-2", now)
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX ix_devices_cert_not_after")
        db.execute("ALTER TABLE devices DROP COLUMN cert_not_after")
    db.close()
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        await store.create_schema()
        within = DeviceQuery(cert_expires_before=now + timedelta(days=30))
        assert [d.id for d in (await store.list_devices(within)).devices] == []
        within = DeviceQuery(cert_expires_before=now + timedelta(days=41))
        assert [d.id for d in (await store.list_devices(within)).devices] == ["dev-1"]
    finally:
        await store.close()


async def test_create_schema_refuses_a_column_it_cannot_add_in_place(tmp_path: Path) -> None:
    """A table lacking a NOT NULL column without a default is refused, not half-upgraded."""
    path = tmp_path / "older.db"
    old_database(path, OLD_CERTIFICATES)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE devices (id VARCHAR(64) NOT NULL PRIMARY KEY)")
    db.close()
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        with pytest.raises(StoreUnavailable, match="devices lacks column"):
            await store.create_schema()
    finally:
        await store.close()
    assert "source" not in columns(path, "certificates")  # one transaction: nothing was added
