"""The device listing in the store, on each database and each SQLite plan: every sort pages by
cursor exactly as one page lists, empty values last both ways; filters and summary agree.

PostgreSQL is the `postgres_url` fixture's (tests/conftest.py): a throwaway server, or
``GATEWAY_TEST_POSTGRES_URL`` naming a database the test may empty.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest

from gateway.core.admission import CertificateKind
from gateway.core.clock import utcnow
from gateway.core.groups import GroupFilter, GroupKind, GroupSpec
from gateway.core.ids import DeviceId
from gateway.core.lifecycle import DeviceStatus
from gateway.core.listing import SORT_FIELDS, parse_sort
from gateway.core.presence import Connection, OfflineReason
from gateway.core.records import DeviceQuery, DeviceRecord, GroupScope, NewCertificate, NewDevice
from gateway.errors import Conflict, NotFound
from gateway.store import Store, listing
from gateway.store.models import Base

NOW = utcnow()


@pytest.fixture(params=["sqlite-rowids", "sqlite-counted", "sqlite-walked", "postgresql"])
async def store(
    request: pytest.FixtureRequest, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Store]:
    """An empty registry: SQLite finding pages from the matches' rowids (few matches), SQLite
    counting first (as with many matches: walk the order or sort), SQLite always walking the
    order (from the rowids, or after counting), or PostgreSQL."""
    if request.param == "postgresql":
        store = Store(request.getfixturevalue("postgres_url"))
        async with store.engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
    else:
        store = Store(f"sqlite+aiosqlite:///{tmp_path}/gateway.db")
        if request.param == "sqlite-counted":
            monkeypatch.setattr(listing, "_FEW", 0)
        if request.param == "sqlite-walked":  # the sort order walked whenever there is a match
            monkeypatch.setattr(listing, "walks", lambda total, table_rows, wanted: total > 0)
    await store.create_schema()
    try:
        yield store
    finally:
        await store.close()


def certificate(device_id: str, ends: datetime, serial: int) -> NewCertificate:
    return NewCertificate(
        serial=f"{serial:032x}",
        fingerprint_sha256=f"{serial:064x}",
        kind=CertificateKind.DEVICE,
        subject=device_id,
        not_before=NOW - timedelta(days=1),
        not_after=ends,
        pem="-",
    )


async def fleet(store: Store) -> list[DeviceRecord]:
    """Twelve devices: names differing in case, ties, and empty (NULL) values in every nullable field."""
    names = [
        "Pump A",
        "pump b",
        "Meter",
        "METER two",
        "Sensor 100%",
        "valve",
        "Valve",
        "gate",
        "x",
        "Y",
        "z",
        "Å",
    ]
    for index, name in enumerate(names):
        device_id = f"d{index:02d}" if index % 3 else f"D_{index:02d}"
        await store.create_device(DeviceId(device_id), name, NOW - timedelta(minutes=60 - index))
        fields: dict[str, object] = {}
        if index % 2:
            fields |= {"application": ["irrigation", "metering"][index % 4 // 2], "model": f"M{index % 3}"}
        if index % 3 == 1:
            fields |= {"manufacturer": "Acme", "firmware_version": "1.0", "os": "linux", "tags": ("prod",)}
        if index % 4 == 2:
            fields |= {
                "blocked": True,
                "blocked_at": NOW - timedelta(hours=index),
                "location_ids": ("site-1",),
            }
        if fields:
            await store.update_device(device_id, NOW - timedelta(minutes=30 - index), **fields)
        if index % 5 != 4:  # some never connect: empty presence times
            change = await store.mark_online(
                device_id,
                NOW - timedelta(hours=index % 4),  # ties in last_connected_at / last_seen_at
                client_ip="127.0.0.1",
                serial="00",
                check_in=(DeviceStatus.PENDING, DeviceStatus.ACTIVE),
            )
            if index % 2:
                await store.mark_offline(device_id, change.epoch, OfflineReason.CLIENT_DISCONNECT, NOW)
        if index % 3 != 2:
            ends = NOW + timedelta(days=[3, 20, 300][index % 3])
            await store.credentials.add_certificate(certificate(device_id, ends, index + 1), NOW)
    return (await store.list_devices(DeviceQuery(limit=1000))).devices


async def ids(store: Store, query: DeviceQuery) -> list[str]:
    return [device.id for device in (await store.list_devices(query)).devices]


async def paged(store: Store, query: DeviceQuery, limit: int) -> list[str]:
    found: list[str] = []
    query = dataclasses.replace(query, limit=limit)
    for _ in range(100):
        page = await store.list_devices(query)
        found += [device.id for device in page.devices]
        if page.next is None:
            return found
        query = dataclasses.replace(query, after=page.next)
    raise AssertionError("paging never ended")


async def test_every_sort_pages_as_one_page_lists_with_empty_values_last(store: Store) -> None:
    """For each sortable field both ways and a few multi-key sorts: cursor pages of 2 and 3 rows
    list exactly what one page lists, and devices without a value come after all with one."""
    devices = {d.id: d for d in await fleet(store)}
    sorts = [f"{sign}{field}" for field in SORT_FIELDS for sign in ("", "-")]
    sorts += ["-last_seen_at,name", "application,-model,name", "blocked,-firmware_version", "-status,os,-id"]
    wrong = {}
    for raw in sorts:
        query = DeviceQuery(sort=parse_sort(raw), limit=1000)
        whole = await ids(store, query)
        assert sorted(whole) == sorted(devices)
        first = parse_sort(raw)[0].removeprefix("-")
        values = [getattr(devices[i], first) for i in whole]
        empty_last = values == [v for v in values if v is not None] + [v for v in values if v is None]
        if not (empty_last and whole == await paged(store, query, 2) == await paged(store, query, 3)):
            wrong[raw] = whole
    assert not wrong, wrong


async def test_times_and_flags_sort_in_order_and_name_without_case(store: Store) -> None:
    """Times, booleans and case-folded names are in order, ties broken by id, on every database."""
    devices = {d.id: d for d in await fleet(store)}
    for raw in ("last_seen_at", "-last_seen_at", "blocked", "-created_at"):
        field, desc = raw.removeprefix("-"), raw.startswith("-")
        listed = await ids(store, DeviceQuery(sort=(raw,), limit=1000))
        keyed = [(getattr(devices[i], field), i) for i in listed if getattr(devices[i], field) is not None]
        present = [value for value, _ in keyed]
        assert present == sorted(present, reverse=desc), raw
        for (a, id_a), (b, id_b) in itertools.pairwise(keyed):
            assert a != b or id_a < id_b, f"{raw}: ties go by id"
    by_name = await ids(store, DeviceQuery(sort=("name",), limit=1000))
    assert [devices[i].name.lower() for i in by_name if devices[i].name.isascii()] == sorted(
        devices[i].name.lower() for i in by_name if devices[i].name.isascii()
    )


async def test_filters_and_summary_agree_on_every_database(store: Store) -> None:
    """Search (any case, % literal), tags, locations, identification, presence, blocked, certificate
    expiry and last seen select the same devices; the summary counts what the list lists."""
    devices = await fleet(store)
    by_id = {d.id: d for d in devices}

    async def found(**filters: object) -> set[str]:
        page = await store.list_devices(DeviceQuery(limit=1000, **filters))  # type: ignore[arg-type]
        assert page.total == len(page.devices)
        return {d.id for d in page.devices}

    assert await found(search="METER") == {i for i, d in by_id.items() if "meter" in d.name.lower()}
    assert await found(search="d_0") == {i for i in by_id if "d_0" in i.lower()}
    assert await found(search="100%") == {i for i, d in by_id.items() if "100%" in d.name}
    assert await found(tags=("prod",)) == {i for i, d in by_id.items() if "prod" in d.tags}
    assert await found(location_ids=("site-1",)) == {
        i for i, d in by_id.items() if "site-1" in d.location_ids
    }
    assert await found(application="metering") == {i for i, d in by_id.items() if d.application == "metering"}
    assert await found(manufacturer="Acme", model="M1") == {
        i for i, d in by_id.items() if (d.manufacturer, d.model) == ("Acme", "M1")
    }
    assert await found(connection=Connection.ONLINE) == {
        i for i, d in by_id.items() if d.connection is Connection.ONLINE
    }
    assert await found(blocked="only") == {i for i, d in by_id.items() if d.blocked}
    assert await found(blocked="hide", status=DeviceStatus.ACTIVE) == {
        i for i, d in by_id.items() if not d.blocked and d.status is DeviceStatus.ACTIVE
    }
    for days in (7, 30, 400):
        limit = NOW + timedelta(days=days)
        assert await found(cert_expires_before=limit) == {
            i for i, d in by_id.items() if d.certificate is not None and d.certificate.not_after <= limit
        }, days
    moment = NOW - timedelta(hours=1, minutes=30)
    assert await found(last_seen_before=moment) == {
        i for i, d in by_id.items() if d.last_seen_at is not None and d.last_seen_at < moment
    }

    summary = await store.device_summary(DeviceQuery(), NOW)
    assert summary.total == len(devices)
    assert summary.blocked == sum(d.blocked for d in devices)
    assert summary.status["active"] == sum(d.status is DeviceStatus.ACTIVE for d in devices)
    assert summary.connection == {c.value: sum(d.connection is c for d in devices) for c in Connection}
    assert dict(summary.application) == {
        value: sum(d.application == value for d in devices) for value in {d.application for d in devices}
    }
    assert summary.certificates_expiring == {
        label: sum(
            d.certificate is not None and d.certificate.not_after <= NOW + timedelta(days=days)
            for d in devices
        )
        for label, days in (("7d", 7), ("30d", 30))
    }
    narrowed = await store.device_summary(DeviceQuery(tags=("prod",)), NOW)
    assert narrowed.total == len(await found(tags=("prod",)))


async def test_cursor_pages_continue_after_rows_inserted_before_and_after_them(store: Store) -> None:
    """Rows inserted between pages, before and after the cursor, never repeat or skip an old one."""
    await fleet(store)
    query = DeviceQuery(sort=("name",), limit=4)
    first = await store.list_devices(query)
    assert first.next is not None
    for index, name in enumerate(["!!! first", "pz middle", "zzzz last"]):
        await store.create_device(DeviceId(f"new-{index}"), name, utcnow())
    rest = await paged(store, dataclasses.replace(query, after=first.next), 3)
    seen = [d.id for d in first.devices] + rest
    assert len(seen) == len(set(seen))
    assert "new-0" not in rest and {"new-1", "new-2"} <= set(rest)
    old = {d.id for d in (await store.list_devices(DeviceQuery(limit=1000))).devices} - {
        "new-0",
        "new-1",
        "new-2",
    }
    assert old <= set(seen)


async def test_a_deleted_device_takes_its_tags_locations_and_certificates_filter_with_it(
    store: Store,
) -> None:
    """Deleting a device removes its tag and location rows (cascade): filters never list ghosts."""
    await fleet(store)
    tagged = await ids(store, DeviceQuery(tags=("prod",), limit=1000))
    await store.delete_device(tagged[0])
    assert tagged[0] not in await ids(store, DeviceQuery(tags=("prod",), limit=1000))
    summary = await store.device_summary(DeviceQuery(tags=("prod",)), NOW)
    assert summary.total == len(tagged) - 1


async def test_expiry_filter_follows_every_certificate_change(store: Store) -> None:
    """The expiry filter and summary read each device's latest unrevoked certificate end as every
    change leaves it: enrolment (earlier ones revoked), renewal (the old one still valid until the new
    one is used), first use, revocation, and an external certificate attached."""
    soon, later = NOW + timedelta(days=3), NOW + timedelta(days=300)
    within_week = DeviceQuery(cert_expires_before=NOW + timedelta(days=7), limit=1000)

    async def expiring() -> tuple[list[str], int]:
        page = await ids(store, within_week)
        return page, (await store.device_summary(DeviceQuery(), NOW)).certificates_expiring["7d"]

    await store.create_device(DeviceId("dev-a"), "A", NOW, certificate=certificate("dev-a", soon, 1))
    await store.create_device(DeviceId("dev-b"), "B", NOW)
    assert await expiring() == (["dev-a"], 1)
    # enrolment by token: dev-b's first certificate ends soon too
    await store.credentials.add_registration_token("dev-b", "h" * 64, NOW, NOW + timedelta(hours=1))
    await store.credentials.provision("h" * 64, NOW, lambda device_id: certificate(device_id, soon, 2))
    assert await expiring() == (["dev-a", "dev-b"], 2)
    # renewal: the new certificate ends later while the old one stays valid until first use
    renewed, _ = await store.credentials.renew(
        "dev-a", f"{1:032x}", NOW, lambda: certificate("dev-a", later, 3), min_interval=timedelta(0)
    )
    assert await expiring() == (["dev-b"], 1)
    assert await store.credentials.first_use(renewed.serial, NOW) == [f"{1:032x}"]
    assert await expiring() == (["dev-b"], 1)
    # revoking every certificate leaves none valid: no end to list by
    await store.credentials.revoke_certificates(CertificateKind.DEVICE, "dev-b", NOW)
    assert await expiring() == ([], 0)
    await store.credentials.add_certificate(certificate("dev-b", soon, 4), NOW)
    assert await expiring() == (["dev-b"], 1)
    # an operator certificate names no device
    operator = dataclasses.replace(certificate("dev-a", soon, 5), kind=CertificateKind.OPERATOR)
    await store.credentials.add_certificate(operator, NOW)
    assert await expiring() == (["dev-b"], 1)


async def test_concurrent_certificate_changes_leave_the_latest_end_right(store: Store) -> None:
    """Two transactions changing one device's certificates at once: the one that waits for the other
    computes the device's latest end from what the other committed (PostgreSQL's READ COMMITTED
    would otherwise compute it from the snapshot its statement started with)."""
    from gateway.store import credentials as store_credentials

    soon, later = NOW + timedelta(days=3), NOW + timedelta(days=300)
    await store.create_device(DeviceId("dev-c"), "C", NOW, certificate=certificate("dev-c", soon, 1))
    await store.credentials.add_certificate(certificate("dev-c", soon, 2), NOW)
    inserted = asyncio.Event()
    async with store.engine.connect() as first, store.engine.connect() as second:
        first_tx, second_tx = await first.begin(), await second.begin()

        async def add_later() -> None:  # a renewal ending later, committed after the other starts
            await store_credentials.insert_certificate(first, certificate("dev-c", later, 3), NOW)
            inserted.set()
            await asyncio.sleep(0.3)
            await first_tx.commit()

        async def revoke_one() -> None:  # an old one revoked meanwhile: waits for the first
            await inserted.wait()
            match = store_credentials.certificates.c.serial == f"{2:032x}"
            await store_credentials._revoke(second, match, NOW)
            await second_tx.commit()

        await asyncio.gather(add_later(), revoke_one())
    device = await store.get_device("dev-c")
    assert device.certificate is not None and device.certificate.not_after == later
    within_week = DeviceQuery(cert_expires_before=NOW + timedelta(days=7))
    assert await ids(store, within_week) == []


async def test_devices_created_together_list_like_any_and_a_taken_id_creates_none(store: Store) -> None:
    """`create_devices` (bulk registration): one transaction with details, tags and tokens; an id
    that exists refuses the whole batch (Conflict) and leaves nothing of it."""
    await store.create_device(DeviceId("taken"), "Taken", NOW)
    expires = NOW + timedelta(days=1)

    def new(device_id: str, **details: object) -> NewDevice:
        return NewDevice(device_id, device_id.title(), details, f"{device_id:x<64}", expires)

    created = await store.create_devices(
        [new("bulk-a", tags=("prod", "water"), description="north"), new("bulk-b", metadata={"k": 1})], NOW
    )
    assert [(d.id, d.tags, d.description, d.metadata) for d in created] == [
        ("bulk-a", ("prod", "water"), "north", {}),
        ("bulk-b", (), None, {"k": 1}),
    ]
    assert await ids(store, DeviceQuery(tags=("prod",))) == ["bulk-a"]
    with pytest.raises(Conflict):
        await store.create_devices([new("bulk-c", tags=("prod",)), new("taken")], NOW)
    assert await ids(store, DeviceQuery(tags=("prod",))) == ["bulk-a"]
    with pytest.raises(NotFound):
        await store.get_device("bulk-c")


async def test_a_group_narrows_listing_pages_and_summary_on_every_plan(store: Store) -> None:
    """A static group's members and a dynamic group's saved filters narrow the listing, its cursor pages
    and the summary, ANDed with the query's own filters, and the groups count their members alike."""
    by_id = {device.id: device for device in await fleet(store)}
    picked = sorted(by_id)[::2]
    await store.groups.create("picked", GroupSpec("Picked", None, GroupKind.STATIC, None), NOW, picked)
    saved = GroupFilter(tags=("prod",), blocked="hide")
    prod = await store.groups.create("prod", GroupSpec("Prod", None, GroupKind.DYNAMIC, saved), NOW)
    static, dynamic = GroupScope("picked"), GroupScope("prod", saved.query())
    active = {i for i, d in by_id.items() if d.status is DeviceStatus.ACTIVE}
    in_prod = {i for i, d in by_id.items() if "prod" in d.tags and not d.blocked}
    cases = [
        (DeviceQuery(group=static), set(picked)),
        (DeviceQuery(group=static, status=DeviceStatus.ACTIVE), set(picked) & active),
        (DeviceQuery(group=static, search="valve"), {i for i in picked if "valve" in by_id[i].name.lower()}),
        (DeviceQuery(group=dynamic), in_prod),
        (
            DeviceQuery(group=dynamic, connection=Connection.ONLINE),
            {i for i in in_prod if by_id[i].connection is Connection.ONLINE},
        ),
        (DeviceQuery(group=dynamic, blocked="only"), set()),  # hide saved, only asked: both must hold
        (
            DeviceQuery(
                group=GroupScope("x", DeviceQuery(status=DeviceStatus.ACTIVE)), status=DeviceStatus.PENDING
            ),
            set(),
        ),
    ]
    assert picked and in_prod, "the fleet gives both groups members"
    for query, expected in cases:
        assert set(await ids(store, dataclasses.replace(query, limit=1000))) == expected, query
        assert set(await paged(store, dataclasses.replace(query, sort=("name",)), 2)) == expected, query
        assert (await store.device_summary(query, NOW)).total == len(expected), query
    assert (prod.member_count, (await store.groups.get("picked")).member_count) == (len(in_prod), len(picked))
