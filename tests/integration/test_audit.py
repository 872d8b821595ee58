"""The audit trail: every operator action recorded with who, when, before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ca
from gateway.core import tokens
from gateway.core.clock import utcnow
from tests.conftest import Harness


async def audit(gw: Harness, **params: Any) -> list[dict[str, Any]]:
    response = await gw.api.get("/audit", params=params)
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["data"]
    return entries


async def test_every_device_action_is_recorded_with_actor_before_and_after(gateway: Harness) -> None:
    """Register, provision, rename, block, unblock, (de)activate, reset, revoke, delete: one entry each."""
    device_id, token = await gateway.register("Pump", "pump-1")
    await gateway.enroll(token)
    api = gateway.api
    assert (await api.patch("/devices/pump-1", json={"name": "Pump A"})).status_code == 200
    assert (await api.post("/devices/pump-1/block")).status_code == 200
    assert (await api.post("/devices/pump-1/unblock")).status_code == 200
    assert (await api.patch("/devices/pump-1", json={"status": "inactive"})).status_code == 200
    assert (await api.patch("/devices/pump-1", json={"status": "active"})).status_code == 200
    assert (await api.post("/devices/pump-1/credentials/reset")).status_code == 200
    assert (await api.post("/devices/pump-1/revoke")).status_code == 200
    assert (await api.delete("/devices/pump-1")).status_code == 200

    entries = list(reversed(await audit(gateway, target_id=device_id)))  # oldest first
    assert [e["action"] for e in entries] == [
        "device.registered",
        "device.provisioned",
        "device.renamed",
        "device.blocked",
        "device.unblocked",
        "device.status_changed",
        "device.status_changed",
        "device.credentials_reset",
        "device.revoked",
        "device.deleted",
    ]
    by_action = {e["action"]: e for e in entries}
    assert all(e["target_type"] == "device" for e in entries)
    assert {e["actor"] for e in entries if e["action"] != "device.provisioned"} == {"token:admin"}
    assert by_action["device.provisioned"]["actor"] == "device:pump-1"  # the token holder, not an operator
    registered = by_action["device.registered"]
    assert registered["before"] is None and registered["after"]["name"] == "Pump"
    renamed = by_action["device.renamed"]
    assert (renamed["before"]["name"], renamed["after"]["name"]) == ("Pump", "Pump A")
    blocked = by_action["device.blocked"]
    assert (blocked["before"]["blocked"], blocked["after"]["blocked"]) == (False, True)
    deactivated = entries[5]
    assert (deactivated["before"]["status"], deactivated["after"]["status"]) == ("pending", "inactive")
    revoked = by_action["device.revoked"]
    assert revoked["after"]["status"] == "revoked" and revoked["detail"]["certificate_serials"]
    deleted = by_action["device.deleted"]
    assert deleted["before"]["id"] == "pump-1" and deleted["after"] is None
    assert "registration_token" not in str(entries) and token not in str(entries), "no secret in the trail"


async def test_audit_filters_and_paging(gateway: Harness) -> None:
    """Filters by action (exact or prefix), actor and time; newest first; limit and offset page."""
    before = utcnow()
    for index in range(3):
        await gateway.register(f"dev {index}", f"dev-{index}")
    assert (await gateway.api.post("/devices/dev-0/block")).status_code == 200
    assert len(await audit(gateway, action="device.registered")) == 3
    assert len(await audit(gateway, action="device.")) == 4
    assert [e["target_id"] for e in await audit(gateway, action="device.registered")] == [
        "dev-2",
        "dev-1",
        "dev-0",
    ]
    assert await audit(gateway, actor="token:someone-else") == []
    assert len(await audit(gateway, since=before.isoformat())) == 4
    earlier = await audit(gateway, until=before.isoformat())
    assert [(e["action"], e["target_id"]) for e in earlier] == [("token.created", "admin")], "init's token"
    response = await gateway.api.get("/audit", params={"action": "device.", "limit": 2, "offset": 2})
    body = response.json()
    assert body["total"] == 4 and len(body["data"]) == 2


async def test_only_admin_tokens_read_the_audit_trail(gateway: Harness) -> None:
    """A devices:write token may act (and is recorded by its name) but may not read the trail."""
    writer = tokens.new_token(tokens.API_PREFIX)
    await gateway.app.store.tokens.add(
        "ops-bot", tokens.hash_token(writer), frozenset({tokens.WRITE}), utcnow()
    )
    headers = {"Authorization": f"Bearer {writer}"}
    response = await gateway.api.post("/devices", json={"name": "by bot", "id": "bot-1"}, headers=headers)
    assert response.status_code == 201, response.text
    assert (await gateway.api.get("/audit", headers=headers)).status_code == 403
    (entry,) = await audit(gateway, target_id="bot-1")
    assert entry["actor"] == "token:ops-bot"


async def test_renewal_over_mqtt_is_recorded_as_the_devices_own_action(gateway: Harness) -> None:
    """A renewal is in the trail too, with the device as the actor."""
    creds = await gateway.device(device_id="renewer")
    client = await gateway.connect(creds)
    await client.subscribe(("devices/renewer/certificate/+", 1))
    csr = ca.make_csr(ca.generate_key(), "renewer").decode()
    await client.publish("devices/renewer/certificate/renew", json.dumps({"csr": csr}), qos=1)
    message = await client.next_message(timeout=5)
    assert message.topic.endswith("/accepted"), message.payload
    entries = await audit(gateway, action="certificate.renewed")
    assert [(e["actor"], e["target_id"]) for e in entries] == [("device:renewer", "renewer")]
    assert entries[0]["detail"]["renews"] == client_serial(gateway, creds.cert)


def client_serial(gw: Harness, cert_path: Path) -> str:
    return ca.serial_hex(ca.load_certificate(cert_path.read_bytes()).serial_number)
