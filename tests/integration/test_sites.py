"""Sites over real HTTPS (``/api/v1/sites``): the records, how devices' location ids point to them
(added ids must exist, ids from before are kept, a site in use is deleted only with force), scopes
and the audit trail; and `gateway sites ...` against a real `gateway serve`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.core import tokens
from gateway.core.clock import utcnow
from tests.conftest import Harness
from tests.integration.processes import Gateway, InProcess, Processes, start_gateway

Json = dict[str, Any]
NORTH = {
    "id": "plant-north",
    "name": "Plant North",
    "description": "main plant",
    "address": "Nordstr. 1\n10115 Berlin",
    "latitude": 52.53,
    "longitude": 13.38,
    "timezone": "Europe/Berlin",
    "metadata": {"contact": {"name": "Ann"}},
}


async def ok(response: httpx.Response, status: int = 200) -> Json:
    assert response.status_code == status, response.text
    body: Json = response.json()
    return body


async def refused(response: httpx.Response, status: int, code: str) -> Json:
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    error: Json = response.json()["error"]
    return error


async def located(gw: Harness, device_id: str, *site_ids: str) -> httpx.Response:
    return await gw.api.patch(f"/devices/{device_id}", json={"location_ids": list(site_ids)})


async def test_a_site_is_created_shown_listed_replaced_and_counted(gateway: Harness) -> None:
    """Every field is kept as given; PUT replaces them all; the list is by name, with device counts."""
    created = (await ok(await gateway.api.post("/sites", json=NORTH), 201))["data"]
    assert {key: created[key] for key in NORTH} == NORTH and created["device_count"] == 0
    assert (await ok(await gateway.api.get("/sites/plant-north")))["data"] == created
    south = (await ok(await gateway.api.post("/sites", json={"name": "Depot south"}), 201))["data"]
    assert south["id"].startswith("site_") and south["latitude"] is None and south["metadata"] == {}

    await gateway.register("pump-1", "pump-1")
    await ok(await located(gateway, "pump-1", "plant-north", south["id"]))
    listed = await ok(await gateway.api.get("/sites"))
    assert [(s["name"], s["device_count"]) for s in listed["data"]] == [
        ("Depot south", 1),
        ("Plant North", 1),
    ]
    assert [
        s["id"] for s in (await ok(await gateway.api.get("/sites", params={"search": "NORTH"})))["data"]
    ] == ["plant-north"]
    replaced = (
        await ok(await gateway.api.put("/sites/plant-north", json={"name": "Plant N", "timezone": "UTC"}))
    )["data"]
    assert (replaced["name"], replaced["timezone"], replaced["address"], replaced["latitude"]) == (
        "Plant N",
        "UTC",
        None,
        None,
    )
    assert replaced["updated_at"] > created["updated_at"] and replaced["created_at"] == created["created_at"]

    await refused(await gateway.api.post("/sites", json=NORTH), 409, "site_exists")
    await refused(await gateway.api.get("/sites/nope"), 404, "site_not_found")
    for body, path in [
        ({"name": "x", "latitude": 91, "longitude": 0}, "latitude"),
        ({"name": "x", "latitude": 1}, "latitude"),
        ({"name": "x", "timezone": "Mars/Olympus"}, "timezone"),
    ]:
        assert (await refused(await gateway.api.post("/sites", json=body), 422, "invalid_site"))[
            "path"
        ] == path
    await refused(await gateway.api.post("/sites", json={"name": "x", "id": "a/b"}), 422, "invalid_site_id")
    await refused(await gateway.api.post("/sites", json={"name": " "}), 422, "invalid_name")


async def test_location_ids_must_name_sites_when_added(gateway: Harness) -> None:
    """A PATCH (or bulk row) that adds a location id names an existing site or is refused whole (422
    unknown_site with its path); ids a device had before sites existed are kept."""
    await gateway.register("pump-1", "pump-1")
    await ok(await gateway.api.post("/sites", json={"id": "a", "name": "A"}), 201)
    unknown = await gateway.api.patch(
        "/devices/pump-1", json={"name": "Renamed", "location_ids": ["a", "b", "c"]}
    )
    error = await refused(unknown, 422, "unknown_site")
    assert error["path"] == "location_ids" and "b, c" in error["message"]
    device = (await ok(await gateway.api.get("/devices/pump-1")))["data"]
    assert (device["name"], device["location_ids"]) == ("pump-1", []), "nothing changed"

    # A location id from before sites were records (written as an older release did).
    await gateway.app.store.update_device("pump-1", utcnow(), location_ids=("legacy-hall",))
    kept = await ok(await located(gateway, "pump-1", "legacy-hall", "a"))
    assert kept["data"]["location_ids"] == ["a", "legacy-hall"]
    await refused(await located(gateway, "pump-1", "legacy-hall", "a", "b"), 422, "unknown_site")
    assert (await ok(await located(gateway, "pump-1", "a")))["data"]["location_ids"] == ["a"]
    await refused(await located(gateway, "pump-1", "legacy-hall"), 422, "unknown_site")  # gone once removed

    rows = [
        {"name": "B1", "id": "bulk-1", "location_ids": ["a"]},
        {"name": "B2", "id": "bulk-2", "location_ids": ["zz"]},
    ]
    bulk = await gateway.api.post("/devices:bulk", json={"devices": rows, "continue_on_error": True})
    assert bulk.status_code in (200, 201, 207), bulk.text
    failed = [e for e in bulk.json()["errors"] if e["code"] == "unknown_site"]
    assert [e["id"] for e in failed] == ["bulk-2"]
    assert (await ok(await gateway.api.get("/devices/bulk-1")))["data"]["location_ids"] == ["a"]


async def test_a_site_in_use_is_deleted_only_with_force(gateway: Harness) -> None:
    """Deleting a site that devices name is refused (409 site_in_use); with force=true it leaves their
    location ids (their updated_at moves) and the trail names them."""
    await ok(await gateway.api.post("/sites", json={"id": "a", "name": "A"}), 201)
    await ok(await gateway.api.post("/sites", json={"id": "b", "name": "B"}), 201)
    for device_id in ("pump-1", "pump-2"):
        await gateway.register(device_id, device_id)
    await ok(await located(gateway, "pump-1", "a", "b"))
    before = (await ok(await located(gateway, "pump-2", "a")))["data"]
    error = await refused(await gateway.api.delete("/sites/a"), 409, "site_in_use")
    assert "2 device(s)" in error["message"]
    deleted = await ok(await gateway.api.delete("/sites/a", params={"force": "true"}))
    assert deleted == {"success": True, "detached_device_ids": ["pump-1", "pump-2"]}
    pump_1 = (await ok(await gateway.api.get("/devices/pump-1")))["data"]
    pump_2 = (await ok(await gateway.api.get("/devices/pump-2")))["data"]
    assert (pump_1["location_ids"], pump_2["location_ids"]) == (["b"], [])
    assert pump_2["updated_at"] > before["updated_at"]
    await refused(await gateway.api.get("/sites/a"), 404, "site_not_found")
    assert (await ok(await gateway.api.delete("/sites/b", params={"force": "true"})))[
        "detached_device_ids"
    ] == ["pump-1"]
    assert (await ok(await gateway.api.post("/sites", json={"id": "c", "name": "C"}), 201))["data"][
        "device_count"
    ] == 0
    assert await ok(await gateway.api.delete("/sites/c")) == {"success": True, "detached_device_ids": []}

    trail = (await ok(await gateway.api.get("/audit", params={"target_type": "site", "target_id": "a"})))[
        "data"
    ]
    assert [e["action"] for e in reversed(trail)] == ["site.created", "site.deleted"]
    assert trail[0]["detail"] == {"force": True, "detached_device_ids": ["pump-1", "pump-2"]}
    assert trail[0]["before"]["name"] == "A" and trail[1]["after"]["id"] == "a"


async def test_site_scopes_and_changes_in_the_audit_trail(gateway: Harness) -> None:
    """devices:read reads sites, devices:write creates and replaces them, admin deletes; PUT is audited
    with the site before and after."""
    await ok(await gateway.api.post("/sites", json={"id": "a", "name": "A"}), 201)
    bearer = {}
    for name, scope in (("reader", tokens.READ), ("writer", tokens.WRITE)):
        made = await ok(await gateway.api.post("/tokens", json={"name": name, "scopes": [scope]}), 201)
        bearer[name] = {"Authorization": f"Bearer {made['token']}"}
    assert (await gateway.api.get("/sites", headers=bearer["reader"])).status_code == 200
    assert (await gateway.api.get("/sites/a", headers=bearer["reader"])).status_code == 200
    forbidden = [
        await gateway.api.post("/sites", json={"name": "r"}, headers=bearer["reader"]),
        await gateway.api.put("/sites/a", json={"name": "r"}, headers=bearer["reader"]),
        await gateway.api.delete("/sites/a", headers=bearer["writer"]),
    ]
    assert [(r.status_code, r.json()["error"]["code"]) for r in forbidden] == [(403, "forbidden")] * 3
    await ok(
        await gateway.api.put("/sites/a", json={"name": "A2", "timezone": "UTC"}, headers=bearer["writer"])
    )
    trail = (await ok(await gateway.api.get("/audit", params={"action": "site.updated"})))["data"]
    assert len(trail) == 1 and trail[0]["actor"] == "token:writer"
    assert (trail[0]["before"]["name"], trail[0]["after"]["name"], trail[0]["after"]["timezone"]) == (
        "A",
        "A2",
        "UTC",
    )
    assert "device_count" not in trail[0]["after"]


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    processes = Processes()
    try:
        yield start_gateway(processes, tmp_path_factory.mktemp("sites"))
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def fast(gw: Gateway) -> InProcess:
    return InProcess.beside(gw)


def test_cli_sites(gw: Gateway, fast: InProcess) -> None:
    """`sites create`, `show`, `list`, `update` (only the fields named change) and `delete` (--force
    for a site in use): JSON documents, a table and clean errors."""
    site = fast.json(
        "sites", "create", "Plant North", "--id", "cli-north", "--timezone", "Europe/Berlin",
        "--lat", "52.5", "--lon", "13.4", "--metadata", '{"floor": 2}',
    )  # fmt: skip
    assert (site["id"], site["latitude"], site["longitude"], site["metadata"]) == (
        "cli-north",
        52.5,
        13.4,
        {"floor": 2},
    )
    updated = fast.json("sites", "update", "cli-north", "--address", "Nordstr. 1", "--name", "North")
    assert (updated["name"], updated["address"], updated["timezone"], updated["latitude"]) == (
        "North",
        "Nordstr. 1",
        "Europe/Berlin",
        52.5,
    )
    fleet_file = gw.cli.cwd / "site-fleet.jsonl"
    fleet_file.write_text('{"name": "S1", "id": "cli-s1", "location_ids": ["cli-north"]}\n')
    assert fast.json("devices", "import", str(fleet_file))["registered"] == 1
    assert fast.json("sites", "show", "cli-north")["device_count"] == 1

    table = fast("sites", "list")
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "DEVICES", "TIMEZONE", "LAT,LON", "ADDRESS"]
    assert rows[0].split()[:5] == ["cli-north", "North", "1", "Europe/Berlin", "52.5,13.4"]
    assert "timezone" in fast("sites", "show", "cli-north").stdout

    assert "[invalid_site]" in fast.fails("sites", "create", "Bad", "--lat", "100", "--lon", "0")
    assert "--metadata: a JSON object" in fast.fails("sites", "update", "cli-north", "--metadata", "[1]")
    assert "[site_in_use]" in fast.fails("sites", "delete", "cli-north", "--yes")
    deleted = fast("sites", "delete", "cli-north", "--force", "--yes")
    assert deleted.exit_code == 0 and "taken from 1 device(s)" in deleted.stdout
    assert fast.json("devices", "show", "cli-s1")["location_ids"] == []
