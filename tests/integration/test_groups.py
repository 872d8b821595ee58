"""Device groups over real HTTPS (``/api/v1/device-groups``, ``GET /devices?group=``): static members
and dynamic saved filters, counts, the group filter with the others, scopes and the audit trail;
and `gateway groups ...` against a real `gateway serve`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.core import tokens
from tests.conftest import Harness
from tests.integration.processes import Gateway, InProcess, Processes, start_gateway

Json = dict[str, Any]
FLEET = {
    "pump-1": {"tags": ["prod", "water"]},
    "pump-2": {"tags": ["prod"]},
    "pump-3": {"tags": ["prod"], "status": "maintenance"},
    "meter-1": {"tags": ["lab"]},
}


async def ok(response: httpx.Response, status: int = 200) -> Json:
    assert response.status_code == status, response.text
    body: Json = response.json()
    return body


async def refused(response: httpx.Response, status: int, code: str) -> Json:
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    error: Json = response.json()["error"]
    return error


async def fleet(gw: Harness) -> None:
    """Four devices: three pumps tagged prod (one in maintenance, one also water), a lab meter."""
    for device_id, fields in FLEET.items():
        await gw.register(device_id, device_id)
        await ok(await gw.api.patch(f"/devices/{device_id}", json=fields))


async def ids(gw: Harness, path: str, **params: Any) -> list[str]:
    body = await ok(await gw.api.get(path, params={"limit": 1000, **params}))
    assert body["total"] == len(body["data"])
    return sorted(device["id"] for device in body["data"])


async def create(gw: Harness, **body: Any) -> Json:
    return (await ok(await gw.api.post("/device-groups", json=body), 201))["data"]


async def test_a_static_group_lists_and_counts_its_members(gateway: Harness) -> None:
    """Members are added (existing devices only, twice is once), removed, counted and paged; a deleted
    device leaves the group."""
    await fleet(gateway)
    group = await create(
        gateway, id="pilot", name="Pilot pumps", kind="static", device_ids=["pump-1", "pump-2"]
    )
    assert (group["kind"], group["filter"], group["member_count"]) == ("static", None, 2)
    assert await ids(gateway, "/device-groups/pilot/members") == ["pump-1", "pump-2"]

    added = await ok(
        await gateway.api.post("/device-groups/pilot/members", json={"device_ids": ["pump-2", "meter-1"]})
    )
    assert (added["added"], added["data"]["member_count"]) == (["meter-1"], 3)
    unknown = await gateway.api.post(
        "/device-groups/pilot/members", json={"device_ids": ["meter-1", "ghost"]}
    )
    error = await refused(unknown, 422, "unknown_device")
    assert error["path"] == "device_ids" and "ghost" in error["message"]

    page = await ok(
        await gateway.api.get("/device-groups/pilot/members", params={"limit": 2, "sort": "name"})
    )
    assert ([d["id"] for d in page["data"]], page["total"]) == (["meter-1", "pump-1"], 3)
    assert page["next"] is not None and set(page["data"][0]) >= {
        "status",
        "tags",
        "certificate",
        "profile_id",
    }
    after = await ok(
        await gateway.api.get("/device-groups/pilot/members", params={"sort": "name", "cursor": page["next"]})
    )
    assert [d["id"] for d in after["data"]] == ["pump-2"]

    removed = await ok(await gateway.api.delete("/device-groups/pilot/members/pump-1"))
    assert removed["data"]["member_count"] == 2
    await refused(await gateway.api.delete("/device-groups/pilot/members/pump-1"), 404, "member_not_found")
    await ok(await gateway.api.delete("/devices/pump-2"))
    assert await ids(gateway, "/device-groups/pilot/members") == ["meter-1"]
    listed = await ok(await gateway.api.get("/device-groups"))
    assert [(g["id"], g["member_count"]) for g in listed["data"]] == [("pilot", 1)] and listed["total"] == 1

    await refused(
        await gateway.api.post("/device-groups", json={"id": "pilot", "name": "again", "kind": "static"}),
        409,
        "group_exists",
    )
    await refused(await gateway.api.get("/device-groups/nope"), 404, "group_not_found")


async def test_a_dynamic_groups_members_follow_its_filter(gateway: Harness) -> None:
    """A dynamic group's members are the devices its saved filter matches now; its filter is replaced by
    PUT, its kind never changes, and it takes no explicit members."""
    await fleet(gateway)
    group = await create(
        gateway, id="prod", name="Production", kind="dynamic", filter={"tags": ["prod"], "status": "active"}
    )
    assert group["filter"] == {"status": "active", "tags": ["prod"]} and group["member_count"] == 0
    await ok(
        await gateway.api.patch("/devices/pump-3", json={"status": "active"})
    )  # pending devices cannot be active
    assert await ids(gateway, "/device-groups/prod/members") == []
    replaced = await ok(
        await gateway.api.put(
            "/device-groups/prod", json={"name": "Production", "filter": {"tags": ["prod"]}}
        )
    )
    assert replaced["data"]["member_count"] == 3
    await ok(await gateway.api.patch("/devices/meter-1", json={"tags": ["prod", "lab"]}))
    assert await ids(gateway, "/device-groups/prod/members") == ["meter-1", "pump-1", "pump-2", "pump-3"]

    everything = await create(gateway, name="Everything", kind="dynamic", filter={})
    assert everything["id"].startswith("grp_") and everything["member_count"] == 4

    await refused(
        await gateway.api.post("/device-groups/prod/members", json={"device_ids": ["pump-1"]}),
        409,
        "dynamic_group",
    )
    await refused(await gateway.api.delete("/device-groups/prod/members/pump-1"), 409, "dynamic_group")
    change = await gateway.api.put("/device-groups/prod", json={"name": "x", "kind": "static"})
    await refused(change, 409, "group_kind_fixed")
    bad = await gateway.api.post(
        "/device-groups", json={"name": "bad", "kind": "dynamic", "filter": {"status": "asleep"}}
    )
    assert (await refused(bad, 422, "invalid_filter"))["path"] == "filter.status"
    no_filter = await gateway.api.post("/device-groups", json={"name": "bad", "kind": "dynamic"})
    await refused(no_filter, 422, "invalid_filter")
    members = await gateway.api.post(
        "/device-groups", json={"name": "bad", "kind": "dynamic", "filter": {}, "device_ids": ["pump-1"]}
    )
    await refused(members, 422, "dynamic_group")


async def test_the_group_filter_of_the_listing_takes_either_kind_with_the_other_filters(
    gateway: Harness,
) -> None:
    """``?group=`` narrows GET /devices and the summary to a group, ANDed with every other filter; a
    dynamic group's saved filter and the request's must both hold."""
    await fleet(gateway)
    await create(gateway, id="picked", name="Picked", kind="static", device_ids=["pump-1", "meter-1"])
    await create(gateway, id="prod", name="Prod", kind="dynamic", filter={"tags": ["prod"]})
    await create(gateway, id="busy", name="Busy", kind="dynamic", filter={"status": "maintenance"})
    cases: list[tuple[Json, list[str]]] = [
        ({"group": "picked"}, ["meter-1", "pump-1"]),
        ({"group": "picked", "tag": "prod"}, ["pump-1"]),
        ({"group": "picked", "search": "meter"}, ["meter-1"]),
        ({"group": "prod"}, ["pump-1", "pump-2", "pump-3"]),
        ({"group": "prod", "tag": "water"}, ["pump-1"]),
        ({"group": "prod", "status": "maintenance"}, ["pump-3"]),
        ({"group": "busy", "status": "pending"}, []),  # both must hold
        ({"group": "busy", "tag": "prod"}, ["pump-3"]),
        ({"group": "busy", "blocked": "only"}, []),
    ]
    for params, expected in cases:
        assert await ids(gateway, "/devices", **params) == expected, params
    await ok(await gateway.api.post("/devices/pump-2/block"))
    assert await ids(gateway, "/devices", group="prod", blocked="hide") == ["pump-1", "pump-3"]
    summary = (await ok(await gateway.api.get("/devices/summary", params={"group": "prod"})))["data"]
    assert (summary["total"], summary["blocked"], summary["status"]["maintenance"]) == (
        3,
        {"blocked": 1, "unblocked": 2},
        1,
    )

    first = await ok(await gateway.api.get("/devices", params={"group": "prod", "limit": 2, "sort": "-name"}))
    rest = await ok(
        await gateway.api.get("/devices", params={"group": "prod", "sort": "-name", "cursor": first["next"]})
    )
    assert [d["id"] for d in first["data"] + rest["data"]] == ["pump-3", "pump-2", "pump-1"]
    await refused(await gateway.api.get("/devices", params={"group": "nope"}), 404, "group_not_found")


async def test_reads_writes_and_deletes_need_their_scopes(gateway: Harness) -> None:
    """devices:read lists and shows groups and members; devices:write creates and changes them; only
    admin deletes a group."""
    await fleet(gateway)
    await create(gateway, id="pilot", name="Pilot", kind="static", device_ids=["pump-1"])
    bearer = {}
    for name, scope in (("reader", tokens.READ), ("writer", tokens.WRITE)):
        made = await ok(await gateway.api.post("/tokens", json={"name": name, "scopes": [scope]}), 201)
        bearer[name] = {"Authorization": f"Bearer {made['token']}"}
    for path in ("/device-groups", "/device-groups/pilot", "/device-groups/pilot/members"):
        assert (await gateway.api.get(path, headers=bearer["reader"])).status_code == 200, path
    read_only = [
        await gateway.api.post(
            "/device-groups", json={"name": "r", "kind": "static"}, headers=bearer["reader"]
        ),
        await gateway.api.put("/device-groups/pilot", json={"name": "r"}, headers=bearer["reader"]),
        await gateway.api.post(
            "/device-groups/pilot/members", json={"device_ids": ["pump-2"]}, headers=bearer["reader"]
        ),
        await gateway.api.delete("/device-groups/pilot/members/pump-1", headers=bearer["reader"]),
        await gateway.api.delete("/device-groups/pilot", headers=bearer["writer"]),
    ]
    assert [(r.status_code, r.json()["error"]["code"]) for r in read_only] == [(403, "forbidden")] * 5
    writer = bearer["writer"]
    await ok(
        await gateway.api.post(
            "/device-groups", json={"id": "w", "name": "W", "kind": "static"}, headers=writer
        ),
        201,
    )
    await ok(
        await gateway.api.post("/device-groups/w/members", json={"device_ids": ["pump-2"]}, headers=writer)
    )
    await ok(await gateway.api.delete("/device-groups/w"))
    assert (await ok(await gateway.api.get("/devices/pump-2")))["data"]["id"] == "pump-2", "the devices stay"
    anonymous = await gateway.api.get("/device-groups", headers={"Authorization": ""})
    await refused(anonymous, 401, "unauthorized")


async def test_every_group_change_is_in_the_audit_trail(gateway: Harness) -> None:
    """Creation, replacement, members added and removed, deletion: each an entry naming the actor."""
    await fleet(gateway)
    await create(gateway, id="pilot", name="Pilot", kind="static", device_ids=["pump-1"])
    await ok(
        await gateway.api.put(
            "/device-groups/pilot", json={"name": "Pilot 2", "description": "for the trial"}
        )
    )
    await ok(
        await gateway.api.post("/device-groups/pilot/members", json={"device_ids": ["pump-1", "pump-2"]})
    )
    await ok(await gateway.api.delete("/device-groups/pilot/members/pump-1"))
    await ok(await gateway.api.delete("/device-groups/pilot"))
    trail = (
        await ok(await gateway.api.get("/audit", params={"target_type": "group", "target_id": "pilot"}))
    )["data"]
    assert [(e["action"], e["actor"]) for e in reversed(trail)] == [
        ("group.created", "token:admin"),
        ("group.updated", "token:admin"),
        ("group.members_added", "token:admin"),
        ("group.member_removed", "token:admin"),
        ("group.deleted", "token:admin"),
    ]
    deleted, removed, added, updated, created = trail
    assert created["after"]["name"] == "Pilot" and created["detail"]["device_ids"] == ["pump-1"]
    assert (updated["before"]["name"], updated["after"]["name"], updated["after"]["description"]) == (
        "Pilot",
        "Pilot 2",
        "for the trial",
    )
    assert added["detail"]["device_ids"] == ["pump-2"], "only the new member"
    assert removed["detail"]["device_id"] == "pump-1"
    assert deleted["before"]["name"] == "Pilot 2" and deleted["after"] is None


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    processes = Processes()
    try:
        yield start_gateway(processes, tmp_path_factory.mktemp("groups"))
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def fast(gw: Gateway) -> InProcess:
    return InProcess.beside(gw)


def test_cli_static_and_dynamic_groups(gw: Gateway, fast: InProcess) -> None:
    """`groups create` (static with -d, dynamic with filter options), `add`, `remove`, `members`,
    `list`, `show`, `update` and `delete`: JSON documents, tables and clean errors."""
    fleet_file = gw.cli.cwd / "group-fleet.jsonl"
    fleet_file.write_text(
        "".join(
            f'{{"name": "{i}", "id": "{i}", "tags": ["{t}"]}}\n'
            for i, t in (("cli-1", "prod"), ("cli-2", "prod"), ("cli-3", "lab"))
        )
    )
    assert fast.json("devices", "import", str(fleet_file))["registered"] == 3

    static = fast.json("groups", "create", "Pilot", "--id", "cli-pilot", "-d", "cli-1")
    assert (static["kind"], static["member_count"]) == ("static", 1)
    added = fast.json("groups", "add", "cli-pilot", "cli-2", "cli-3", "cli-1")
    assert (added["added"], added["data"]["member_count"]) == (["cli-2", "cli-3"], 3)
    assert fast.json("groups", "remove", "cli-pilot", "cli-3")["member_count"] == 2
    members = fast.json("groups", "members", "cli-pilot")
    assert (sorted(d["id"] for d in members["data"]), members["total"]) == (["cli-1", "cli-2"], 2)

    dynamic = fast.json(
        "groups", "create", "Prod", "--id", "cli-prod", "--tag", "prod", "--status", "pending"
    )
    assert (dynamic["kind"], dynamic["filter"], dynamic["member_count"]) == (
        "dynamic",
        {"status": "pending", "tags": ["prod"]},
        2,
    )
    updated = fast.json("groups", "update", "cli-prod", "--filter", '{"tags": ["lab"]}', "--name", "Lab")
    assert (updated["name"], updated["filter"], updated["member_count"]) == ("Lab", {"tags": ["lab"]}, 1)

    table = fast("groups", "list")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "KIND", "MEMBERS", "FILTER"]
    assert any(line.split()[:4] == ["cli-prod", "Lab", "dynamic", "1"] for line in lines)
    assert "cli-pilot" in fast("groups", "show", "cli-pilot").stdout
    listed = fast("groups", "members", "cli-pilot")
    assert "2 of 2 device(s) in cli-pilot" in listed.stdout

    assert "is static" in fast.fails("groups", "update", "cli-pilot", "--tag", "x")
    assert "[dynamic_group]" in fast.fails("groups", "add", "cli-prod", "cli-1")
    assert "[unknown_device]" in fast.fails("groups", "add", "cli-pilot", "ghost")
    assert "[invalid_filter]" in fast.fails("groups", "create", "Bad", "--status", "asleep")
    assert "--filter: not JSON" in fast.fails("groups", "create", "Bad", "--filter", "{")
    assert fast.json("groups", "delete", "cli-prod", "--yes") == {"success": True}
    assert "[group_not_found]" in fast.fails("groups", "show", "cli-prod")
