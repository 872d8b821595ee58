"""Device profiles over real HTTPS (``/api/v1/device-profiles``): declarations, a device's profile and
settings checked against it (PATCH), new schemas against the devices that have the profile,
deletion, conformance of what devices announced over mutual-TLS MQTT, scopes and the audit trail;
and `gateway profiles ...` against a real `gateway serve`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.core import tokens
from tests.conftest import Harness
from tests.integration.processes import Gateway, InProcess, Processes, start_gateway

Json = dict[str, Any]
COMPONENTS = [
    {"id": "pump", "sensors": [{"name": "flow", "value_type": "number", "unit": "l/min"}]},
    {"id": "door", "profile": "reed", "sensors": [{"name": "open", "value_type": "boolean"}]},
]
SCHEMA = {
    "interval_s": {"type": "integer", "min": 1, "max": 3600, "required": True},
    "variant": {"type": "string", "enum": ["a", "b"]},
}
PUMP = {
    "id": "pump-v2",
    "name": "Pump v2",
    "components": COMPONENTS,
    "settings_schema": SCHEMA,
    "writable": ["interval_s"],
}


async def ok(response: httpx.Response, status: int = 200) -> Json:
    assert response.status_code == status, response.text
    body: Json = response.json()
    return body


async def refused(response: httpx.Response, status: int, code: str) -> Json:
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    error: Json = response.json()["error"]
    return error


async def patch(gw: Harness, device_id: str, **body: Any) -> httpx.Response:
    return await gw.api.patch(f"/devices/{device_id}", json=body)


async def test_a_profile_is_declared_shown_listed_and_replaced(gateway: Harness) -> None:
    """Components, schema and writable fields are kept as declared (writable defaults to every field);
    bad declarations are refused with the place at fault."""
    created = (await ok(await gateway.api.post("/device-profiles", json=PUMP), 201))["data"]
    assert created["components"] == [
        {
            "id": "pump",
            "profile": None,
            "sensors": [{"name": "flow", "value_type": "number", "unit": "l/min"}],
        },
        {
            "id": "door",
            "profile": "reed",
            "sensors": [{"name": "open", "value_type": "boolean", "unit": None}],
        },
    ]
    assert (created["settings_schema"], created["writable"], created["device_count"]) == (
        SCHEMA,
        ["interval_s"],
        0,
    )
    plain = (await ok(await gateway.api.post("/device-profiles", json={"name": "Plain"}), 201))["data"]
    assert plain["id"].startswith("prof_") and (
        plain["components"],
        plain["settings_schema"],
        plain["writable"],
    ) == ([], None, [])
    listed = await ok(await gateway.api.get("/device-profiles"))
    assert [p["name"] for p in listed["data"]] == ["Plain", "Pump v2"] and listed["total"] == 2
    replaced = await ok(
        await gateway.api.put(
            "/device-profiles/pump-v2",
            json={"name": "Pump v2.1", "settings_schema": {"x": {"type": "boolean"}}},
        )
    )
    assert (replaced["data"]["components"], replaced["data"]["writable"]) == ([], ["x"])

    cases = [
        (
            {"name": "b", "settings_schema": {"x": {"type": "float"}}},
            "settings_schema.x.type",
            "invalid_settings_schema",
        ),
        ({"name": "b", "components": [{"id": "c"}]}, "components", "invalid_components"),
        (
            {"name": "b", "settings_schema": {"x": {"type": "string"}}, "writable": ["y"]},
            "writable",
            "invalid_profile",
        ),
    ]
    for body, path, code in cases:
        assert (await refused(await gateway.api.post("/device-profiles", json=body), 422, code))[
            "path"
        ] == path
    await refused(await gateway.api.post("/device-profiles", json=PUMP), 409, "profile_exists")
    await refused(await gateway.api.get("/device-profiles/nope"), 404, "profile_not_found")


async def test_a_devices_settings_are_checked_against_its_profile(gateway: Harness) -> None:
    """PATCH profile_id needs an existing profile and conforming settings; later settings are checked
    (422 with the field's path), fixed fields keep their value, and the trail records each change."""
    await ok(await gateway.api.post("/device-profiles", json=PUMP), 201)
    await gateway.register("pump-1", "pump-1")
    await ok(await patch(gateway, "pump-1", settings={"interval_s": 60, "colour": "red"}))

    unknown = await refused(await patch(gateway, "pump-1", profile_id="pump-v9"), 422, "unknown_profile")
    assert unknown["path"] == "profile_id"
    extra = await refused(await patch(gateway, "pump-1", profile_id="pump-v2"), 422, "invalid_settings")
    assert extra["path"] == "settings.colour" and "not a field" in extra["message"]
    assert (await ok(await gateway.api.get("/devices/pump-1")))["data"]["profile_id"] is None, "refused whole"

    assigned = await ok(
        await patch(gateway, "pump-1", profile_id="pump-v2", settings={"interval_s": 60, "variant": "a"})
    )
    assert (assigned["data"]["profile_id"], assigned["data"]["settings"]) == (
        "pump-v2",
        {"interval_s": 60, "variant": "a"},
    )
    assert (await ok(await patch(gateway, "pump-1", settings={"interval_s": 30, "variant": "a"})))["data"][
        "settings"
    ]["interval_s"] == 30
    for settings, path, code in [
        ({"interval_s": 0, "variant": "a"}, "settings.interval_s", "invalid_settings"),
        ({"interval_s": "30", "variant": "a"}, "settings.interval_s", "invalid_settings"),
        ({"variant": "a"}, "settings.interval_s", "invalid_settings"),
        ({"interval_s": 30, "variant": "b"}, "settings.variant", "read_only_setting"),
        ({"interval_s": 30}, "settings.variant", "read_only_setting"),
    ]:
        error = await refused(await patch(gateway, "pump-1", name="Renamed", settings=settings), 422, code)
        assert error["path"] == path, settings
    assert (await ok(await gateway.api.get("/devices/pump-1")))["data"]["name"] == "pump-1", "refused whole"
    reassigned = await patch(gateway, "pump-1", profile_id=None)
    assert (await ok(reassigned))["data"]["profile_id"] is None
    assert (await ok(await patch(gateway, "pump-1", settings={"free": True})))["data"]["settings"] == {
        "free": True
    }

    trail = (
        await ok(await gateway.api.get("/audit", params={"target_id": "pump-1", "action": "device.updated"}))
    )["data"]
    assert [e["detail"]["fields"] for e in reversed(trail)] == [
        ["settings"],
        ["profile_id", "settings"],
        ["settings"],
        ["profile_id"],
        ["settings"],
    ]
    assert (trail[1]["before"]["profile_id"], trail[1]["after"]["profile_id"]) == ("pump-v2", None)


async def test_a_new_schema_must_fit_every_device_that_has_the_profile(gateway: Harness) -> None:
    """PUT of a schema that a device's settings break is refused (409, naming the device); a fitting one
    is taken; deleting a profile in use needs force, which clears it from the devices."""
    await ok(await gateway.api.post("/device-profiles", json=PUMP), 201)
    for device_id in ("pump-1", "pump-2"):
        await gateway.register(device_id, device_id)
        await ok(await patch(gateway, device_id, profile_id="pump-v2", settings={"interval_s": 600}))
    stricter = {**PUMP, "settings_schema": {**SCHEMA, "interval_s": {"type": "integer", "max": 300}}}
    stricter.pop("id")
    error = await refused(
        await gateway.api.put("/device-profiles/pump-v2", json=stricter), 409, "settings_nonconforming"
    )
    assert (
        "2 device(s)" in error["message"]
        and "pump-1 (settings.interval_s must be at most 300)" in error["message"]
    )
    looser = {**stricter, "settings_schema": {**SCHEMA, "interval_s": {"type": "integer", "max": 9000}}}
    assert (await ok(await gateway.api.put("/device-profiles/pump-v2", json=looser)))["data"][
        "device_count"
    ] == 2

    in_use = await refused(await gateway.api.delete("/device-profiles/pump-v2"), 409, "profile_in_use")
    assert "2 device(s)" in in_use["message"]
    deleted = await ok(await gateway.api.delete("/device-profiles/pump-v2", params={"force": "true"}))
    assert deleted == {"success": True, "released_device_ids": ["pump-1", "pump-2"]}
    device = (await ok(await gateway.api.get("/devices/pump-1")))["data"]
    assert (device["profile_id"], device["settings"]) == (None, {"interval_s": 600})
    trail = (await ok(await gateway.api.get("/audit", params={"target_type": "profile"})))["data"]
    assert [e["action"] for e in reversed(trail)] == ["profile.created", "profile.updated", "profile.deleted"]
    assert (
        trail[0]["detail"]["released_device_ids"] == ["pump-1", "pump-2"]
        and trail[0]["before"]["name"] == "Pump v2"
    )


async def test_conformance_compares_announced_components_with_the_expected_ones(gateway: Harness) -> None:
    """A device that announced its components over MQTT conforms or shows each difference; one that
    announced nothing misses every expected component."""
    await ok(await gateway.api.post("/device-profiles", json=PUMP), 201)
    creds = await gateway.device("pump-a", name="pump-a")
    await gateway.register("pump-b", "pump-b")
    for device_id in ("pump-a", "pump-b"):
        await ok(await patch(gateway, device_id, profile_id="pump-v2", settings={"interval_s": 5}))
    client = await gateway.connect(creds)
    announced = [
        {
            "id": "pump",
            "sensors": [
                {"name": "flow", "value_type": "string", "unit": "l/min"},
                {"name": "rpm", "value_type": "number"},
            ],
        },
        {"id": "door", "sensors": [{"name": "open", "value_type": "boolean"}]},
    ]
    await client.publish("devices/pump-a/components", json.dumps(announced), qos=1)  # PUBACK after commit

    page = await ok(await gateway.api.get("/device-profiles/pump-v2/conformance"))
    assert page["total"] == 2
    by_id = {d["device_id"]: d for d in page["data"]}
    assert by_id["pump-a"]["components_announced"] == 2 and not by_id["pump-a"]["conforms"]
    assert by_id["pump-a"]["differences"] == [
        {
            "kind": "value_type",
            "component": "pump",
            "sensor": "flow",
            "expected": "number",
            "announced": "string",
        }
    ]
    assert [(d["kind"], d["component"]) for d in by_id["pump-b"]["differences"]] == [
        ("missing_component", "pump"),
        ("missing_component", "door"),
    ]
    announced[0]["sensors"][0]["value_type"] = "number"
    await client.publish("devices/pump-a/components", json.dumps(announced), qos=1)
    again = await ok(await gateway.api.get("/device-profiles/pump-v2/conformance", params={"limit": 1}))
    assert [(d["device_id"], d["conforms"], d["differences"]) for d in again["data"]] == [
        ("pump-a", True, [])
    ]


async def test_profile_scopes(gateway: Harness) -> None:
    """devices:read reads profiles and conformance, devices:write declares and changes them, admin deletes."""
    await ok(await gateway.api.post("/device-profiles", json=PUMP), 201)
    bearer = {}
    for name, scope in (("reader", tokens.READ), ("writer", tokens.WRITE)):
        made = await ok(await gateway.api.post("/tokens", json={"name": name, "scopes": [scope]}), 201)
        bearer[name] = {"Authorization": f"Bearer {made['token']}"}
    for path in ("/device-profiles", "/device-profiles/pump-v2", "/device-profiles/pump-v2/conformance"):
        assert (await gateway.api.get(path, headers=bearer["reader"])).status_code == 200, path
    forbidden = [
        await gateway.api.post("/device-profiles", json={"name": "r"}, headers=bearer["reader"]),
        await gateway.api.put("/device-profiles/pump-v2", json={"name": "r"}, headers=bearer["reader"]),
        await gateway.api.delete("/device-profiles/pump-v2", headers=bearer["writer"]),
    ]
    assert [(r.status_code, r.json()["error"]["code"]) for r in forbidden] == [(403, "forbidden")] * 3
    writer = bearer["writer"]
    await ok(await gateway.api.post("/device-profiles", json={"id": "w", "name": "W"}, headers=writer), 201)


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    processes = Processes()
    try:
        yield start_gateway(processes, tmp_path_factory.mktemp("profiles"))
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def fast(gw: Gateway) -> InProcess:
    return InProcess.beside(gw)


def test_cli_profiles(gw: Gateway, fast: InProcess) -> None:
    """`profiles create` (components from a file), `assign` with settings, `conformance`, `list`,
    `update` and `delete --force`: JSON documents, tables and clean errors."""
    components = gw.cli.cwd / "pump-components.json"
    components.write_text(json.dumps(COMPONENTS))
    created = fast.json(
        "profiles", "create", "Pump v2", "--id", "cli-pump", "--components", f"@{components}",
        "--settings-schema", json.dumps(SCHEMA), "-w", "interval_s",
    )  # fmt: skip
    assert ([c["id"] for c in created["components"]], created["writable"]) == (
        ["pump", "door"],
        ["interval_s"],
    )
    fast.json("devices", "register", "cli-1", "--id", "cli-1")
    fast.json("devices", "register", "cli-2", "--id", "cli-2")
    assigned = fast.json(
        "profiles", "assign", "cli-pump", "cli-1", "cli-2", "--settings", '{"interval_s": 10}'
    )
    assert [(d["id"], d["profile_id"], d["settings"]) for d in assigned["data"]] == [
        ("cli-1", "cli-pump", {"interval_s": 10}),
        ("cli-2", "cli-pump", {"interval_s": 10}),
    ]
    assert "[invalid_settings]" in fast.fails(
        "profiles", "assign", "cli-pump", "cli-1", "--settings", '{"interval_s": 0}'
    )

    table = fast("profiles", "list")
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "DEVICES", "COMPONENTS", "SETTINGS"]
    assert rows[0].split() == ["cli-pump", "Pump", "v2", "2", "pump,", "door", "interval_s,", "variant"]
    report = fast("profiles", "conformance", "cli-pump")
    assert report.exit_code == 0, report.output
    assert "missing_component pump; missing_component door" in report.stdout
    assert "2 of 2 device(s), 2 not conforming" in report.stdout
    assert fast.json("profiles", "conformance", "cli-pump")["total"] == 2

    updated = fast.json(
        "profiles", "update", "cli-pump", "--description", "second edition", "--components", "[]"
    )
    assert (updated["description"], updated["components"], updated["writable"]) == (
        "second edition",
        [],
        ["interval_s"],
    )
    assert "[settings_nonconforming]" in fast.fails(
        "profiles", "update", "cli-pump", "--settings-schema", '{"interval_s": {"type": "integer", "max": 5}}'
    )
    assert "[profile_in_use]" in fast.fails("profiles", "delete", "cli-pump", "--yes")
    assert fast.json("profiles", "delete", "cli-pump", "--force", "--yes")["released_device_ids"] == [
        "cli-1",
        "cli-2",
    ]
    assert fast.json("devices", "show", "cli-1")["profile_id"] is None
