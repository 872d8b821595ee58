"""Connect failures end to end over real mutual TLS: every refusal kind grouped per certificate and
reason with counts, a flood kept to one row per key and a few writes, and the approval of an
unknown certificate of an external CA as a new device that then connects ONLINE."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import ca
from gateway.config import CaSettings, ExternalAnchor, HistorySettings, Settings
from gateway.core.clock import utcnow
from gateway.mqtt_client import ConnectRefused, Message, MqttClient
from tests.conftest import HOST, Creds, Harness, make_settings
from tests.integration.test_certificates import ExternalCa
from tests.integration.test_gateway import next_status, unregistered, watcher

TIMEOUT_S = 10.0  # a shared 2-core machine: generous, never reached when things work
Json = dict[str, Any]


@pytest.fixture
def external_ca(tmp_path: Path) -> ExternalCa:
    folder = tmp_path / "acme"
    folder.mkdir()
    authority = ca.create_authority(now=utcnow(), common_name="Acme Devices CA")
    found = ExternalCa(authority, folder / "acme-ca.crt", folder / "acme-crl.pem")
    found.cert_path.write_bytes(authority.certificate_pem)
    found.revoke()  # an empty CRL
    return found


@pytest.fixture
def settings(tmp_path: Path, external_ca: ExternalCa, request: pytest.FixtureRequest) -> Settings:
    """Loopback settings with the external CA configured; [history] overrides by indirect parametrize."""
    anchor = ExternalAnchor(cert=external_ca.cert_path, crl=external_ca.crl_path)
    return make_settings(tmp_path).model_copy(
        update={
            "ca": CaSettings(external_anchors=[anchor]),
            "history": HistorySettings(**getattr(request, "param", {})),
        }
    )


async def refused(gw: Harness, creds: Creds, client_id: str | None = None) -> int:
    """Connect with `creds` (client id: the device id unless given); the CONNACK refusal code."""
    client = MqttClient(client_id=creds.name if client_id is None else client_id)
    try:
        with pytest.raises(ConnectRefused) as refusal:
            await client.connect(HOST, gw.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
    finally:
        await client.close()
    return refusal.value.return_code


async def failures(gw: Harness, **params: Any) -> Json:
    response = await gw.api.get("/connect-failures", params=params)
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


def by_reason(page: Json) -> dict[str, Json]:
    return {row["reason"]: row for row in page["data"]}


def fingerprint_of(creds: Creds) -> str:
    return ca.fingerprint_sha256(x509.load_pem_x509_certificate(creds.cert.read_bytes()))


async def approve(gw: Harness, fingerprint: str, body: Json, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await gw.api.post(f"/connect-failures/{fingerprint}/approve", json=body, headers=headers)


async def next_event(client: MqttClient, kind: str) -> Json:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        message: Message = await client.next_message(timeout=max(0.01, deadline - time.monotonic()))
        if message.topic == f"gateway/events/{kind}":
            body: Json = json.loads(message.payload)
            return body


async def test_each_refusal_kind_is_one_row_per_certificate_with_its_count(
    gateway: Harness, external_ca: ExternalCa
) -> None:
    """Unknown, blocked, inactive, revoked and client-id mismatch: grouped per fingerprint and reason,
    counted, with the device, the latest client id and address; only the unknown one approvable."""
    stranger, _ = external_ca.issue(gateway.root / "stranger", "stranger", gateway.ca_path)
    blocked, inactive = await gateway.device(), await gateway.device()
    await gateway.api.post(f"/devices/{blocked.name}/block")
    await gateway.api.patch(f"/devices/{inactive.name}", json={"status": "inactive"})
    revoked_id, _ = await gateway.register("acme")
    revoked, cert = external_ca.issue(gateway.root / "revoked", revoked_id, gateway.ca_path)
    response = await gateway.api.post(
        f"/devices/{revoked_id}/certificates", json={"certificate": ca.certificate_pem(cert).decode()}
    )
    assert response.status_code == 201, response.text
    await gateway.api.post(f"/devices/{revoked_id}/revoke")  # our CRL cannot list it: the registry refuses
    mismatched = await gateway.device()

    for attempt in range(2):
        assert await refused(gateway, stranger, f"who-{attempt}") == 5
        assert await refused(gateway, blocked) == 5
        assert await refused(gateway, inactive) == 5
        assert await refused(gateway, revoked) == 5
        assert await refused(gateway, mismatched, f"not-me-{attempt}") == 2

    rows = by_reason(await failures(gateway))
    assert set(rows) == {
        "unknown_certificate",
        "device_blocked",
        "device_inactive",
        "certificate_revoked",
        "client_id_mismatch",
    }
    expected = {
        "unknown_certificate": (stranger, None, "who-1"),
        "device_blocked": (blocked, blocked.name, blocked.name),
        "device_inactive": (inactive, inactive.name, inactive.name),
        "certificate_revoked": (revoked, revoked_id, revoked_id),
        "client_id_mismatch": (mismatched, mismatched.name, "not-me-1"),
    }
    for reason, (creds, device_id, client_id) in expected.items():
        row = rows[reason]
        assert row["fingerprint"] == fingerprint_of(creds), reason
        assert (row["count"], row["device_id"], row["last_client_id"]) == (2, device_id, client_id), reason
        assert row["last_client_ip"] == HOST
        assert row["first_seen_at"] <= row["last_seen_at"]
        assert row["approvable"] is (reason == "unknown_certificate"), reason
    certificate = rows["unknown_certificate"]["certificate"]
    assert "CN=hw-stranger" in certificate["subject"] and "Acme Devices CA" in certificate["issuer"]
    assert rows["device_blocked"]["certificate"] is None  # kept only for unknown certificates

    only = await failures(gateway, reason="device_blocked")
    assert [row["reason"] for row in only["data"]] == ["device_blocked"] and only["total"] == 1
    mine = await failures(gateway, fingerprint=fingerprint_of(stranger))
    assert [row["reason"] for row in mine["data"]] == ["unknown_certificate"]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"flush_s": 0.5}], indirect=True, ids=["flush-0.5s"])
async def test_a_flood_of_refusals_is_one_row_and_a_few_writes(gateway: Harness) -> None:
    """500 refusals of one unknown certificate with 500 client ids: one row counting 500, one key
    in memory at most, and about one write per flush interval, not one per refusal."""
    creds = unregistered(gateway, "ghost")  # our own CA, unknown to the registry
    context = creds.tls()
    service = gateway.app.failures
    batches_before, started = service.batches, time.monotonic()
    most_pending = 0

    async def refuse(i: int) -> None:
        nonlocal most_pending
        client = MqttClient(client_id=f"ghost-{i}")
        with pytest.raises(ConnectRefused):
            await client.connect(HOST, gateway.mqtt_port, ssl=context, server_hostname=HOST)
        await client.close()
        most_pending = max(most_pending, service.pending)

    for offset in range(0, 500, 25):
        await asyncio.gather(*(refuse(i) for i in range(offset, offset + 25)))
    elapsed = time.monotonic() - started

    page = await failures(gateway)
    assert page["total"] == 1
    [row] = page["data"]
    assert (row["reason"], row["count"], row["fingerprint"]) == (
        "unknown_certificate",
        500,
        fingerprint_of(creds),
    )
    assert row["last_client_id"].startswith("ghost-")
    assert most_pending <= 1
    writes = service.batches - batches_before
    assert writes <= elapsed / 0.5 + 2, (writes, elapsed)
    assert (service.pending, service.dropped) == (0, 0)


@pytest.mark.parametrize("settings", [{"failures_max_rows": 3}], indirect=True, ids=["max-3"])
async def test_the_table_keeps_the_most_recently_seen_keys(gateway: Harness) -> None:
    """With failures_max_rows = 3, five refused certificates leave the three seen last."""
    strangers = [unregistered(gateway, f"ghost-{i}") for i in range(5)]
    for creds in strangers:
        assert await refused(gateway, creds) == 5
        await failures(gateway)  # one flush per refusal: each is a newer row
    page = await failures(gateway)
    assert page["total"] == 3
    assert [row["fingerprint"] for row in page["data"]] == [fingerprint_of(c) for c in strangers[:1:-1]]


async def test_approval_of_an_unknown_certificate_lets_that_device_connect(
    gateway: Harness, external_ca: ExternalCa
) -> None:
    """An admin approves an unknown external certificate: the device is created bound to it (audited,
    announced), connects ONLINE with it, checks in, and the failure names it; approving again is 409."""
    ops = await watcher(gateway)
    creds, cert = external_ca.issue(gateway.root / "pump-7", "pump-7", gateway.ca_path)
    assert await refused(gateway, creds) == 5
    fingerprint = ca.fingerprint_sha256(cert)
    [row] = (await failures(gateway, fingerprint=fingerprint))["data"]
    assert row["approvable"] is True
    assert row["certificate"]["serial"] == ca.serial_hex(cert.serial_number)

    response = await approve(gateway, fingerprint, {"name": "Pump 7", "device_id": "pump-7"})
    assert response.status_code == 201, response.text
    device = response.json()["data"]
    assert (device["id"], device["name"], device["status"]) == ("pump-7", "Pump 7", "pending")
    assert device["certificate"]["fingerprint_sha256"] == fingerprint
    assert device["certificate"]["serial"] == ca.serial_hex(cert.serial_number)
    event = await next_event(ops, "device")
    assert (event["action"], event["device_id"], event["actor"]) == ("approved", "pump-7", "token:admin")

    client = await gateway.connect(creds)
    status = await next_status(ops, "pump-7", "online")
    assert status["certificate_serial"] == device["certificate"]["serial"]
    assert not client.closed
    record = (await gateway.api.get("/devices/pump-7")).json()["data"]
    assert (record["status"], record["connection"]) == ("active", "online")  # checked in

    [row] = (await failures(gateway, fingerprint=fingerprint))["data"]
    assert (row["approvable"], row["approved_device_id"]) == (False, "pump-7")
    assert row["approved_at"] is not None
    again = await approve(gateway, fingerprint, {"name": "Pump 7 again"})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "already_approved")

    audit = (await gateway.api.get("/audit", params={"action": "device.approved"})).json()["data"]
    assert len(audit) == 1
    entry = audit[0]
    assert (entry["actor"], entry["target_type"], entry["target_id"]) == ("token:admin", "device", "pump-7")
    assert entry["before"] is None and entry["after"]["name"] == "Pump 7"
    assert entry["detail"]["fingerprint"] == fingerprint


async def test_approval_without_an_id_makes_one(gateway: Harness, external_ca: ExternalCa) -> None:
    """Without device_id the gateway makes a dev_ id; the device connects with it as client id."""
    creds, cert = external_ca.issue(gateway.root / "vendor-x", "unused", gateway.ca_path)
    assert await refused(gateway, creds) == 5
    response = await approve(gateway, ca.fingerprint_sha256(cert), {"name": "Vendor X"})
    assert response.status_code == 201, response.text
    device_id = response.json()["data"]["id"]
    assert device_id.startswith("dev_")
    client = await gateway.connect(Creds(device_id, creds.key, creds.cert, creds.ca))
    assert not client.closed and gateway.app.engine.is_connected(device_id)


async def test_approval_is_refused_for_anything_but_an_unknown_external_certificate(
    gateway: Harness, external_ca: ExternalCa
) -> None:
    """Not an unknown certificate, never seen, malformed, of our own CA, a taken id, a bad body, a
    reader or writer token: refused with a fitting code, and nothing is created."""
    blocked = await gateway.device()
    await gateway.api.post(f"/devices/{blocked.name}/block")
    assert await refused(gateway, blocked) == 5
    response = await approve(gateway, fingerprint_of(blocked), {"name": "x"})
    assert (response.status_code, response.json()["error"]["code"]) == (409, "not_approvable")

    response = await approve(gateway, "ab" * 32, {"name": "x"})
    assert (response.status_code, response.json()["error"]["code"]) == (404, "failure_not_found")
    response = await approve(gateway, "not-a-fingerprint", {"name": "x"})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_fingerprint")

    ours = unregistered(gateway, "restored")  # our CA issued it; the registry has no record
    assert await refused(gateway, ours) == 5
    response = await approve(gateway, fingerprint_of(ours), {"name": "x"})
    assert (response.status_code, response.json()["error"]["code"]) == (409, "own_ca_certificate")

    creds, cert = external_ca.issue(gateway.root / "taken", "taken", gateway.ca_path)
    assert await refused(gateway, creds) == 5
    fingerprint = ca.fingerprint_sha256(cert)
    response = await approve(gateway, fingerprint, {"name": "x", "device_id": blocked.name})
    assert (response.status_code, response.json()["error"]["code"]) == (409, "device_exists")
    response = await approve(gateway, fingerprint, {"name": "x", "id": "wrong-field"})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_request")
    response = await approve(gateway, fingerprint, {"name": "x", "device_id": "bad/id"})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_device_id")

    for scopes in (["devices:read"], ["devices:write"]):
        made = await gateway.api.post("/tokens", json={"name": scopes[0].replace(":", "-"), "scopes": scopes})
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        response = await approve(gateway, fingerprint, {"name": "x"}, token=token)
        assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
        listed = await gateway.api.get("/connect-failures", headers={"Authorization": f"Bearer {token}"})
        assert listed.status_code == 200  # reading needs devices:read only

    [row] = (await failures(gateway, fingerprint=fingerprint))["data"]
    assert row["approvable"] is True  # every refusal left it as it was
    assert (await gateway.api.get("/audit", params={"action": "device.approved"})).json()["total"] == 0
