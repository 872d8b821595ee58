"""Operator device management over the API, in process and over real HTTPS: every filter and
sort of GET /devices, cursor paging under concurrent inserts, the summary, the detail fields
(description, tags, location ids, metadata, settings) through PATCH, scopes, schema upgrade."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

import ca
from gateway.api import ApiContext, create_app
from gateway.core import tokens
from gateway.core.admission import CertificateKind
from gateway.core.clock import iso, utcnow
from gateway.core.lifecycle import DeviceStatus
from gateway.core.listing import SORT_FIELDS
from gateway.core.presence import OfflineReason
from gateway.store import Store
from tests.conftest import Harness

Json = dict[str, Any]
NOW = utcnow()


@pytest.fixture(params=["in-process", "https"])
async def api(request: pytest.FixtureRequest, gateway: Harness) -> AsyncIterator[httpx.AsyncClient]:
    """The admin's API client: the ASGI app called in process, or the running gateway over HTTPS."""
    if request.param == "https":
        yield gateway.api
        return
    app = gateway.app
    asgi = create_app(
        ApiContext(
            devices=app.devices,
            store=app.store,
            pki=app.pki,
            data=app.data,
            audit=app.audit_store,
            session_count=lambda: app.engine.connected_count,
        )
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=asgi),
        base_url="http://in-process/api/v1",
        headers={"Authorization": f"Bearer {gateway.admin_token}"},
    ) as client:
        yield client


async def ok(request: Awaitable[httpx.Response], status: int = 200) -> Json:
    response = await request
    assert response.status_code == status, response.text
    body: Json = response.json()
    return body


async def register(api: httpx.AsyncClient, device_id: str, name: str) -> str:
    body = await ok(api.post("/devices", json={"name": name, "id": device_id}), 201)
    return str(body["registration_token"])


async def sites(api: httpx.AsyncClient, *site_ids: str) -> None:
    """The sites that location ids name (each added one must exist)."""
    for site_id in site_ids:
        await ok(api.post("/sites", json={"id": site_id, "name": site_id}), 201)


async def seen(gw: Harness, device_id: str, at: datetime, *, stay_online: bool = False) -> None:
    """The device checked in at `at` (active) and, unless `stay_online`, left a minute later."""
    store = gw.app.store
    change = await store.mark_online(
        device_id,
        at,
        client_ip="127.0.0.1",
        serial="00",
        check_in=(DeviceStatus.PENDING, DeviceStatus.ACTIVE),
    )
    if not stay_online:
        await store.mark_offline(
            device_id, change.epoch, OfflineReason.CLIENT_DISCONNECT, at + timedelta(minutes=1)
        )


async def certificate(gw: Harness, device_id: str, validity: timedelta) -> None:
    """A real certificate from the gateway's CA, recorded for the device, ending after `validity`."""
    issued = gw.app.pki.issue(
        ca.generate_key().public_key(),
        subject=device_id,
        kind=CertificateKind.DEVICE,
        now=utcnow(),
        validity=validity,
    )
    await gw.app.store.credentials.add_certificate(issued, utcnow())


FLEET_IDS = {"pump-1", "pump-2", "meter-1", "meter-2", "sensor_x"}


async def fleet(gw: Harness, api: httpx.AsyncClient) -> None:
    """Five devices that differ in every filtered field (see the table in the filter test)."""
    for device_id, name in [
        ("pump-1", "Pump A"),
        ("pump-2", "pump b"),
        ("meter-1", "Meter"),
        ("meter-2", "METER two"),
        ("sensor_x", "Sensor 100%"),
    ]:
        await register(api, device_id, name)
    store = gw.app.store
    identification = {
        "pump-1": {
            "application": "irrigation",
            "manufacturer": "Acme",
            "model": "P100",
            "firmware_version": "1.0",
        },
        "pump-2": {
            "application": "irrigation",
            "manufacturer": "Acme",
            "model": "P200",
            "firmware_version": "1.1",
        },
        "meter-1": {"application": "metering", "manufacturer": "Globex", "model": "M1"},
        "meter-2": {"firmware_version": "1.0"},
    }
    for device_id, fields in identification.items():
        await store.update_device(device_id, utcnow(), **fields)
    await seen(gw, "pump-1", NOW - timedelta(hours=1), stay_online=True)
    await seen(gw, "pump-2", NOW - timedelta(days=3))
    await seen(gw, "meter-2", NOW - timedelta(days=2))
    await ok(api.post("/devices/pump-2/block"))
    await ok(api.patch("/devices/meter-1", json={"status": "inactive"}))
    await ok(api.patch("/devices/meter-2", json={"status": "maintenance"}))
    details = {
        "pump-1": {"tags": ["prod", "water"], "location_ids": ["site-1"]},
        "pump-2": {"tags": ["prod"], "location_ids": ["site-2"]},
        "meter-1": {"tags": ["lab"], "location_ids": ["site-1", "room-3"]},
    }
    await sites(api, "site-1", "site-2", "room-3")
    for device_id, body in details.items():
        await ok(api.patch(f"/devices/{device_id}", json=body))
    await certificate(gw, "pump-1", timedelta(days=365))
    await certificate(gw, "meter-1", timedelta(days=3))
    await certificate(gw, "meter-2", timedelta(days=20))


async def listed(api: httpx.AsyncClient, **params: Any) -> list[str]:
    body = await ok(api.get("/devices", params={"limit": 1000, **params}))
    assert body["total"] == len(body["data"])
    return [device["id"] for device in body["data"]]


FILTERS: list[tuple[dict[str, Any], set[str]]] = [
    ({}, FLEET_IDS),
    ({"search": "pump"}, {"pump-1", "pump-2"}),
    ({"search": "METER"}, {"meter-1", "meter-2"}),  # any case
    ({"search": "p-1"}, {"pump-1"}),  # in the id
    ({"search": "100%"}, {"sensor_x"}),  # % is literal
    ({"search": "r_x"}, {"sensor_x"}),  # _ is literal
    ({"search": "_"}, {"sensor_x"}),
    ({"blocked": "only"}, {"pump-2"}),
    ({"blocked": "hide"}, FLEET_IDS - {"pump-2"}),
    ({"blocked": "all"}, FLEET_IDS),
    ({"status": "active"}, {"pump-1", "pump-2"}),
    ({"status": "inactive"}, {"meter-1"}),
    ({"status": "maintenance"}, {"meter-2"}),
    ({"status": "pending"}, {"sensor_x"}),
    ({"status": "revoked"}, set()),
    ({"connection": "online"}, {"pump-1"}),
    ({"connection": "offline"}, FLEET_IDS - {"pump-1"}),
    ({"tag": "prod"}, {"pump-1", "pump-2"}),
    ({"tag": ["prod", "water"]}, {"pump-1"}),  # repeated: all of them
    ({"tag": "lab"}, {"meter-1"}),
    ({"tag": "Prod"}, set()),  # tags are exact
    ({"location_id": "site-1"}, {"pump-1", "meter-1"}),
    ({"location_id": ["site-1", "room-3"]}, {"meter-1"}),
    ({"application": "irrigation"}, {"pump-1", "pump-2"}),
    ({"application": ""}, set()),  # an empty value is a filter too (its total once counted every device)
    ({"manufacturer": "Globex"}, {"meter-1"}),
    ({"model": "P200"}, {"pump-2"}),
    ({"cert_expires_within": "7d"}, {"meter-1"}),
    ({"cert_expires_within": "30d"}, {"meter-1", "meter-2"}),
    ({"cert_expires_within": "400d"}, {"meter-1", "meter-2", "pump-1"}),
    ({"last_seen_before": iso(NOW - timedelta(days=1))}, {"pump-2", "meter-2"}),
    ({"last_seen_before": iso(NOW - timedelta(days=2, hours=12))}, {"pump-2"}),
    ({"status": "active", "connection": "offline"}, {"pump-2"}),
    ({"tag": "prod", "blocked": "hide"}, {"pump-1"}),
    ({"search": "meter", "location_id": "site-1", "application": "metering"}, {"meter-1"}),
]


async def test_every_filter_narrows_the_listing(gateway: Harness, api: httpx.AsyncClient) -> None:
    """Each filter, alone and combined, lists exactly the devices it describes, with a matching total."""
    await fleet(gateway, api)
    wrong = {}
    for params, expected in FILTERS:
        found = set(await listed(api, **params))
        if found != expected:
            wrong[str(params)] = (sorted(found), sorted(expected))
    assert not wrong, wrong


async def test_bad_filters_are_refused_with_our_error_body(gateway: Harness, api: httpx.AsyncClient) -> None:
    """Malformed filter values get 422 and a {"error": {code, message}} body."""
    cases = [
        ({"tag": ""}, "invalid_tag"),
        ({"location_id": "x" * 65}, "invalid_location_id"),
        ({"status": "asleep"}, "invalid_request"),
        ({"connection": "maybe"}, "invalid_request"),
        ({"blocked": "some"}, "invalid_request"),
        ({"last_seen_before": "yesterday"}, "invalid_request"),
        ({"cert_expires_within": "soon"}, "invalid_duration"),
        ({"sort": "secret"}, "invalid_sort"),
        ({"sort": "name,-name"}, "invalid_sort"),
        ({"limit": 1001}, "invalid_request"),
        ({"limit": 0}, "invalid_request"),
        ({"offset": -1}, "invalid_request"),
        ({"cursor": "not a cursor"}, "invalid_cursor"),
    ]
    for params, code in cases:
        response = await api.get("/devices", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["code"] == code, (params, response.text)
        assert response.json()["error"]["message"]


def _moment(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def expected_order(devices: list[Json], sort: list[str]) -> list[str]:
    """The contract's order in Python: keys in turn, empty values last both ways, name by lower case, id."""
    ordered = sorted(devices, key=lambda d: d["id"])
    for key in reversed(sort):
        field, desc = key.removeprefix("-"), key.startswith("-")

        def value(device: Json, field: str = field) -> Any:
            raw = device[field]
            if field == "name":
                return raw.lower()
            return _moment(raw) if field.endswith("_at") else raw

        present = [d for d in ordered if d[field] is not None]
        empty = [d for d in ordered if d[field] is None]
        ordered = sorted(present, key=value, reverse=desc) + empty
    return [d["id"] for d in ordered]


async def page_through(api: httpx.AsyncClient, limit: int, **params: Any) -> list[str]:
    """Every id, following `next` page by page."""
    ids: list[str] = []
    cursor = None
    for _ in range(1000):
        body = await ok(
            api.get("/devices", params={"limit": limit, **params, **({"cursor": cursor} if cursor else {})})
        )
        ids += [device["id"] for device in body["data"]]
        cursor = body["next"]
        if cursor is None:
            assert len(body["data"]) <= limit
            return ids
        assert len(body["data"]) == limit
    raise AssertionError("paging never ended")


async def test_every_sort_field_orders_both_ways_and_pages_by_cursor(
    gateway: Harness, api: httpx.AsyncClient
) -> None:
    """Each sortable field, ascending and descending (and a few multi-key sorts), gives the contract's
    order in one page, and the same order followed two rows at a time through `next`."""
    await fleet(gateway, api)
    for index in range(4):  # ties and more pages: same application/model as others, some never seen
        await register(api, f"extra-{index}", "Pump A" if index % 2 else f"extra {index}")
        await gateway.app.store.update_device(
            f"extra-{index}", utcnow(), application="irrigation", model="P100"
        )
    everything = (await ok(api.get("/devices", params={"limit": 1000})))["data"]
    sorts = [[key] for field in SORT_FIELDS for key in (field, f"-{field}")]
    sorts += [["-last_seen_at", "name"], ["application", "-firmware_version"], ["blocked", "-status", "name"]]
    sorts += [["model", "-last_connected_at", "-manufacturer", "connection", "id"]]
    wrong = {}
    for sort in sorts:
        expected = expected_order(everything, sort)
        in_one = await listed(api, sort=",".join(sort))
        paged = await page_through(api, 2, sort=",".join(sort))
        if not expected == in_one == paged:
            wrong[",".join(sort)] = {"expected": expected, "one page": in_one, "paged": paged}
    assert not wrong, wrong
    assert await listed(api) == expected_order(everything, ["created_at"]), "default: oldest first"


async def test_offset_paging_still_works(gateway: Harness, api: httpx.AsyncClient) -> None:
    """limit/offset pages cover the listing in order; next is offered from an offset page too."""
    await fleet(gateway, api)
    everything = await listed(api, sort="name")
    pages = [
        await ok(api.get("/devices", params={"sort": "name", "limit": 2, "offset": o})) for o in (0, 2, 4)
    ]
    assert [d["id"] for page in pages for d in page["data"]] == everything
    assert [(p["limit"], p["offset"], p["total"]) for p in pages] == [(2, 0, 5), (2, 2, 5), (2, 4, 5)]
    assert pages[1]["next"] is not None and pages[2]["next"] is None
    rest = await ok(api.get("/devices", params={"sort": "name", "limit": 10, "cursor": pages[1]["next"]}))
    assert [d["id"] for d in rest["data"]] == everything[4:]
    both = await api.get("/devices", params={"sort": "name", "offset": 2, "cursor": pages[1]["next"]})
    assert (both.status_code, both.json()["error"]["code"]) == (422, "invalid_cursor")
    other_sort = await api.get("/devices", params={"sort": "-name", "cursor": pages[1]["next"]})
    assert (other_sort.status_code, other_sort.json()["error"]["code"]) == (422, "invalid_cursor")


async def test_cursor_pages_never_repeat_or_skip_a_device_while_others_are_inserted(
    gateway: Harness, api: httpx.AsyncClient
) -> None:
    """Paging by name while devices are registered concurrently lists every earlier device exactly
    once and nothing twice, where offset paging repeats a row."""
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    before = set()
    for index in range(40):
        device_id = f"old-{index:02d}"
        await register(api, device_id, f"{rng.choice(letters)}{rng.choice(letters)} {index}")
        before.add(device_id)
    stop, landed = asyncio.Event(), asyncio.Event()
    inserted: list[str] = []

    async def insert_meanwhile() -> None:
        while not stop.is_set():
            device_id = f"new-{len(inserted):03d}"
            await register(api, device_id, f"{rng.choice(letters)}{rng.choice(letters)} new")
            inserted.append(device_id)
            landed.set()

    async def page() -> list[str]:
        try:
            ids: list[str] = []
            cursor = None
            while True:
                params = {"sort": "name", "limit": 3, **({"cursor": cursor} if cursor else {})}
                body = await ok(api.get("/devices", params=params))
                ids += [d["id"] for d in body["data"]]
                cursor = body["next"]
                if cursor is None:
                    return ids
                landed.clear()  # let at least one registration land between two pages
                async with asyncio.timeout(10):
                    await landed.wait()
        finally:
            stop.set()

    inserter = asyncio.create_task(insert_meanwhile())
    ids = await page()
    await inserter
    assert len(inserted) >= 5, "devices were inserted while paging"
    assert len(ids) == len(set(ids)), "no device listed twice"
    assert before <= set(ids), "every device present before paging was listed"

    # The same situation, deterministic: a device that sorts first arrives between two pages.
    first = await ok(api.get("/devices", params={"sort": "name", "limit": 5}))
    await register(api, "aaa-first", "!first")
    by_cursor = await ok(api.get("/devices", params={"sort": "name", "limit": 5, "cursor": first["next"]}))
    by_offset = await ok(api.get("/devices", params={"sort": "name", "limit": 5, "offset": 5}))
    first_ids = {d["id"] for d in first["data"]}
    assert not first_ids & {d["id"] for d in by_cursor["data"]}
    assert first_ids & {d["id"] for d in by_offset["data"]}, "offset paging shifts under inserts"


async def test_summary_counts_the_fleet_and_takes_the_list_filters(
    gateway: Harness, api: httpx.AsyncClient
) -> None:
    """Counts by status, connection, blocked, application, model, firmware and expiring certificates."""
    await fleet(gateway, api)
    summary = (await ok(api.get("/devices/summary")))["data"]
    assert summary == {
        "total": 5,
        "status": {"pending": 1, "active": 2, "inactive": 1, "maintenance": 1, "revoked": 0},
        "connection": {"online": 1, "offline": 4},
        "blocked": {"blocked": 1, "unblocked": 4},
        "application": [
            {"value": "irrigation", "count": 2},
            {"value": None, "count": 2},
            {"value": "metering", "count": 1},
        ],
        "model": [
            {"value": None, "count": 2},
            {"value": "M1", "count": 1},
            {"value": "P100", "count": 1},
            {"value": "P200", "count": 1},
        ],
        "firmware_version": [
            {"value": "1.0", "count": 2},
            {"value": None, "count": 2},  # ties by value, the empty one last
            {"value": "1.1", "count": 1},
        ],
        "certificates_expiring": {"7d": 1, "30d": 2},
    }
    pumps = (await ok(api.get("/devices/summary", params={"tag": "prod", "blocked": "hide"})))["data"]
    assert (pumps["total"], pumps["status"]["active"], pumps["connection"]) == (
        1,
        1,
        {"online": 1, "offline": 0},
    )
    assert pumps["certificates_expiring"] == {"7d": 0, "30d": 0}
    bad = await api.get("/devices/summary", params={"tag": ""})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_tag")


async def test_patch_sets_and_clears_the_detail_fields(gateway: Harness, api: httpx.AsyncClient) -> None:
    """The detail fields are set, shown, replaced and cleared, with updated_at, an audit entry and a
    log event only when something changed."""
    await register(api, "pump-1", "Pump")
    await sites(api, "site-1")
    created = (await ok(api.get("/devices/pump-1")))["data"]
    assert (created["description"], created["tags"], created["location_ids"]) == (None, [], [])
    assert (created["metadata"], created["settings"]) == ({}, {})
    body = {
        "description": " North field pump\nsecond line ",
        "tags": ["water", "prod", "water"],
        "location_ids": ["site-1"],
        "metadata": {"serial": "A-17", "install": {"year": 2024, "by": ["ann", "bo"]}},
        "settings": {"influx": {"bucket": "pumps", "every_s": 10}, "enabled": True},
    }
    with capture_logs() as logs:
        patched = (await ok(api.patch("/devices/pump-1", json=body)))["data"]
    assert patched["description"] == "North field pump\nsecond line"
    assert (patched["tags"], patched["location_ids"]) == (["prod", "water"], ["site-1"])
    assert patched["metadata"] == body["metadata"] and patched["settings"] == body["settings"]
    assert patched["updated_at"] > created["updated_at"]
    assert (await ok(api.get("/devices/pump-1")))["data"] == patched, "stored, not only echoed"
    assert [e["fields"] for e in logs if e["event"] == "device.updated"] == [
        ["description", "location_ids", "metadata", "settings", "tags"]
    ]

    again = await ok(
        api.patch("/devices/pump-1", json={"tags": ["prod", "water"], "metadata": body["metadata"]})
    )
    assert again["data"]["updated_at"] == patched["updated_at"], "no change, no new updated_at"

    cleared = (
        await ok(
            api.patch(
                "/devices/pump-1",
                json={"tags": [], "location_ids": None, "description": None, "metadata": None},
            )
        )
    )["data"]
    assert (cleared["tags"], cleared["location_ids"], cleared["description"], cleared["metadata"]) == (
        [],
        [],
        None,
        {},
    )
    assert cleared["settings"] == body["settings"], "fields not named are kept"

    audit = (await ok(gateway.api.get("/audit", params={"target_id": "pump-1", "action": "device.updated"})))[
        "data"
    ]
    assert len(audit) == 2, "the no-op PATCH left no entry"
    newest, oldest = audit
    assert oldest["detail"]["fields"] == ["description", "location_ids", "metadata", "settings", "tags"]
    assert oldest["before"]["tags"] == [] and oldest["after"]["tags"] == ["prod", "water"]
    assert oldest["after"]["settings"] == body["settings"]
    assert newest["before"]["metadata"] == body["metadata"] and newest["after"]["metadata"] == {}


async def test_patch_refuses_bad_values_and_changes_nothing(gateway: Harness, api: httpx.AsyncClient) -> None:
    """One bad field refuses the whole PATCH (name included) with 422 and the field's code."""
    await register(api, "pump-1", "Pump")
    deep: Json = {}
    for _ in range(20):
        deep = {"k": deep}
    cases = [
        ({"name": "New", "tags": ["ok", ""]}, "invalid_tag"),
        ({"name": "New", "tags": ["x" * 65]}, "invalid_tag"),
        ({"tags": [f"t{i}" for i in range(51)]}, "invalid_tag"),
        ({"location_ids": ["bad\x00id"]}, "invalid_location_id"),
        ({"name": "New", "description": "x" * 1001}, "invalid_description"),
        ({"metadata": deep}, "invalid_metadata"),
        ({"settings": {"blob": "x" * 17000}}, "invalid_settings"),
        ({"metadata": ["not", "an", "object"]}, "invalid_request"),
        ({"tags": "prod"}, "invalid_request"),
        ({"profile": "x"}, "invalid_request"),
        ({"name": "New", "status": "revoked"}, "invalid_request"),
    ]
    for body, code in cases:
        response = await api.patch("/devices/pump-1", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["code"] == code, (body, response.text)
    device = (await ok(api.get("/devices/pump-1")))["data"]
    assert (device["name"], device["tags"], device["metadata"], device["description"]) == (
        "Pump",
        [],
        {},
        None,
    )
    missing = await api.patch("/devices/nope", json={"tags": ["a"]})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "device_not_found")


async def test_a_read_token_lists_but_cannot_write(gateway: Harness, api: httpx.AsyncClient) -> None:
    """devices:read lists, shows and summarises; PATCH, block and register need devices:write."""
    await register(api, "pump-1", "Pump")
    reader, writer = tokens.new_token(tokens.API_PREFIX), tokens.new_token(tokens.API_PREFIX)
    store = gateway.app.store
    await store.tokens.add("reader", tokens.hash_token(reader), frozenset({tokens.READ}), utcnow())
    await store.tokens.add("writer", tokens.hash_token(writer), frozenset({tokens.WRITE}), utcnow())
    read = {"Authorization": f"Bearer {reader}"}
    for path in ("/devices", "/devices/summary", "/devices/pump-1"):
        assert (await api.get(path, headers=read)).status_code == 200, path
    refused = [
        await api.patch("/devices/pump-1", json={"tags": ["x"]}, headers=read),
        await api.post("/devices/pump-1/block", headers=read),
        await api.post("/devices", json={"name": "n"}, headers=read),
    ]
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(403, "forbidden")] * 3
    assert (await ok(api.get("/devices/pump-1")))["data"]["tags"] == []
    write = {"Authorization": f"Bearer {writer}"}
    assert (await ok(api.patch("/devices/pump-1", json={"tags": ["x"]}, headers=write)))["data"]["tags"] == [
        "x"
    ]
    anonymous = await api.get("/devices", headers={"Authorization": ""})
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "unauthorized")
    summary_anonymous = await api.get("/devices/summary", headers={"Authorization": ""})
    assert summary_anonymous.status_code == 401


async def test_deleting_a_device_removes_its_tags_and_locations(
    gateway: Harness, api: httpx.AsyncClient
) -> None:
    """A device registered again under a deleted id starts without the old tags and locations."""
    await register(api, "pump-1", "Pump")
    await sites(api, "site-1")
    await ok(api.patch("/devices/pump-1", json={"tags": ["prod"], "location_ids": ["site-1"]}))
    await ok(api.delete("/devices/pump-1"))
    assert await listed(api, tag="prod") == []
    await register(api, "pump-1", "Pump again")
    again = (await ok(api.get("/devices/pump-1")))["data"]
    assert (again["tags"], again["location_ids"]) == ([], [])


async def test_create_schema_adds_detail_columns_tables_and_indexes_to_an_old_database(
    tmp_path: Path,
) -> None:
    """A devices table from before this release gains the new columns and indexes, and the tag and
    location tables appear; existing devices list and filter as before."""
    path = tmp_path / "old.db"
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        await store.create_schema()
    finally:
        await store.close()
    new_indexes = [
        "ix_devices_last_seen_at",
        "ix_devices_updated_at",
        "ix_devices_application_state",
        "ix_devices_model_state",
        "ix_devices_manufacturer_model",
        "ix_devices_firmware_version",
        "ix_devices_name",
        "ix_devices_state",
        "ix_devices_presence",
        "ix_certificates_expiry",
        "ix_certificates_validity",
    ]
    replaced = {  # what an earlier release made, which the listing's covering indexes replace
        "ix_devices_name_lower": "name_lower",
        "ix_devices_connection": "connection",
        "ix_devices_blocked": "blocked",
        "ix_devices_application": "application",
        "ix_devices_manufacturer": "manufacturer",
        "ix_devices_model": "model",
    }
    with sqlite3.connect(path) as db:
        for index in new_indexes:
            db.execute(f"DROP INDEX {index}")
        for index, column in replaced.items():
            db.execute(f"CREATE INDEX {index} ON devices ({column})")
        for column in ("description", "metadata_json", "settings_json"):
            db.execute(f"ALTER TABLE devices DROP COLUMN {column}")
        db.execute("DROP TABLE device_tags")
        db.execute("DROP TABLE device_locations")
        db.execute(
            "INSERT INTO devices (id, name, name_lower, status, blocked, created_at, updated_at,"
            " connection, epoch) VALUES ('old-1', 'Old', 'old', 'active', 0, '2024-01-01 00:00:00.000000',"
            " '2024-01-01 00:00:00.000000', 'offline', 0)"
        )
    db.close()
    store = Store(f"sqlite+aiosqlite:///{path}")
    try:
        await store.create_schema()
        await store.create_schema()  # idempotent
        with sqlite3.connect(path) as db:
            indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        db.close()
        assert set(new_indexes) <= indexes and {"device_tags", "device_locations"} <= tables
        assert not set(replaced) & indexes
        old = await store.get_device("old-1")
        assert (old.description, old.tags, old.metadata, old.settings) == (None, (), {}, {})
        await store.update_device("old-1", utcnow(), tags=("prod",), settings={"a": 1})
        updated = await store.get_device("old-1")
        assert (updated.tags, updated.settings) == (("prod",), {"a": 1})
    finally:
        await store.close()
