"""bench/devices: device listing and summary latency on a large SQLite registry.

A benchmark, not a test: it prints figures and checks only that every query answered. It:

1. initialises a gateway in a temporary folder (or ``--root``) and bulk-inserts ``--devices``
   devices (100,000 by default) straight into its SQLite database: statuses, presence,
   blocked, identification, last-seen times, tags, locations and one certificate each, in
   proportions a fleet might have (a few seconds; reused when ``--root`` already holds it);
2. runs a set of filtered and sorted page queries (`SCENARIOS`), ``--reps`` times each,
   shuffled, through three paths: ``store`` (`Store.list_devices`), ``asgi`` (the API app in
   process over httpx's ASGITransport: routing, auth, validation, JSON) and ``https`` (the
   running gateway's HTTPS API over loopback);
3. prints p50/p99 per scenario and over all queries of each path, and the summary endpoint;
4. with ``--without-indexes``, drops the secondary indexes of the device tables and runs the
   store path again as a reference, then puts the indexes back.

    bench/devices                         # 100,000 devices, 25 reps, all paths (~3 min)
    bench/devices --devices 20000 --reps 10 --paths store
    bench/devices --root /tmp/fleet --without-indexes   # keeps the fleet for the next run

Figures on a shared 2-core machine are noisy; "other" CPU is not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import sqlite3
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
from sqlalchemy import Table, insert, update

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from gateway import logs  # noqa: E402
from gateway.api import ApiContext, create_app  # noqa: E402
from gateway.app import GatewayApp, initialise, settle_runtime  # noqa: E402
from gateway.config import ApiSettings, LoggingSettings, MqttSettings, PathsSettings, Settings  # noqa: E402
from gateway.core.clock import iso, parse_duration  # noqa: E402
from gateway.core.lifecycle import DeviceStatus  # noqa: E402
from gateway.core.listing import Cursor, parse_sort  # noqa: E402
from gateway.core.presence import Connection  # noqa: E402
from gateway.core.records import DeviceQuery  # noqa: E402
from gateway.store import Store  # noqa: E402
from gateway.store.credentials import latest_end  # noqa: E402
from gateway.store.models import Certificate, Device, DeviceLocation, DeviceTag  # noqa: E402

STATUSES = [("active", 70), ("pending", 10), ("inactive", 10), ("maintenance", 8), ("revoked", 2)]
APPLICATIONS = [f"app-{i}" for i in range(10)]
MANUFACTURERS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli"]
MODELS = [f"M{i:02d}" for i in range(20)]
FIRMWARE = [f"1.{i}.0" for i in range(15)]
TAGS = [f"tag-{i:02d}" for i in range(30)]
SITES = [f"site-{i:03d}" for i in range(200)]
WORDS = ["pump", "meter", "valve", "sensor", "gate", "relay", "boiler", "fan"]
CHUNK = 5000


@dataclass(frozen=True)
class Scenario:
    name: str
    params: dict[str, Any]  # as the API takes them
    reference: bool = False  # shown, but not part of the ALL line (offset paging: why cursors)


SCENARIOS = [
    Scenario("first page, default order", {}),
    Scenario("active, -last_seen_at", {"status": "active", "sort": "-last_seen_at"}),
    Scenario("online, name", {"connection": "online", "sort": "name"}),
    Scenario(
        "offline+hide blocked, -last_seen_at,name",
        {"connection": "offline", "blocked": "hide", "sort": "-last_seen_at,name"},
    ),
    Scenario("tag, -last_seen_at", {"tag": "tag-07", "sort": "-last_seen_at"}),
    Scenario("two tags", {"tag": ["tag-03", "tag-11"]}),
    Scenario("location", {"location_id": "site-042", "sort": "name"}),
    Scenario(
        "application+active, -last_seen_at",
        {"application": "app-3", "status": "active", "sort": "-last_seen_at"},
    ),
    Scenario("manufacturer+model", {"manufacturer": "Globex", "model": "M07"}),
    Scenario("search id substring", {"search": "00042"}),
    Scenario("search name word", {"search": "valve 12", "sort": "name"}),
    Scenario("blocked only", {"blocked": "only", "sort": "-updated_at"}),
    Scenario("cert expires within 30d", {"cert_expires_within": "30d", "sort": "name"}),
    Scenario("not seen for 7d, last_seen_at", {"last_seen_before": "7d", "sort": "last_seen_at"}),
    Scenario("sort by firmware, model", {"sort": "firmware_version,model"}),
    Scenario("page 200 by cursor, -last_seen_at", {"sort": "-last_seen_at", "cursor": "deep"}),
    Scenario("page 200 by offset, -last_seen_at", {"sort": "-last_seen_at", "offset": 19_900}, True),
]


def settings_for(root: Path) -> Settings:
    return Settings(
        paths=PathsSettings(data_dir=root / "data", certs_dir=root / "certs"),
        mqtt=MqttSettings(host="127.0.0.1", port=0),
        api=ApiSettings(host="127.0.0.1", port=0),
        logging=LoggingSettings(level="warning"),
    )


def pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


async def populate(store: Store, count: int, now: datetime) -> None:
    """Bulk insert `count` devices with tags, locations and a certificate each."""
    rng = random.Random(42)
    devices = cast(Table, Device.__table__)
    tags, locations = cast(Table, DeviceTag.__table__), cast(Table, DeviceLocation.__table__)
    certificates = cast(Table, Certificate.__table__)
    for start in range(0, count, CHUNK):
        rows, tag_rows, location_rows, cert_rows = [], [], [], []
        for index in range(start, min(start + CHUNK, count)):
            device_id = f"dev-{index:06d}"
            name = f"{rng.choice(WORDS)} {rng.randrange(1000)}"
            status = pick(rng, STATUSES)
            seen = None if rng.random() < 0.1 else now - timedelta(seconds=rng.randrange(30 * 86400))
            created = now - timedelta(seconds=rng.randrange(365 * 86400))
            blocked = rng.random() < 0.02
            rows.append(
                {
                    "id": device_id,
                    "name": name,
                    "name_lower": name.lower(),
                    "status": status,
                    "blocked": blocked,
                    "blocked_at": now if blocked else None,
                    "created_at": created,
                    "updated_at": created,
                    "connection": "online" if seen and rng.random() < 0.3 else "offline",
                    "epoch": 1 if seen else 0,
                    "last_seen_at": seen,
                    "last_connected_at": seen,
                    "manufacturer": rng.choice(MANUFACTURERS),
                    "model": rng.choice(MODELS),
                    "application": rng.choice(APPLICATIONS),
                    "firmware_version": None if rng.random() < 0.05 else rng.choice(FIRMWARE),
                }
            )
            tag_rows += [{"device_id": device_id, "tag": t} for t in rng.sample(TAGS, rng.randrange(4))]
            location_rows += [
                {"device_id": device_id, "location_id": s} for s in rng.sample(SITES, rng.randrange(1, 3))
            ]
            cert_rows.append(
                {
                    "serial": f"{index:032x}",
                    "fingerprint_sha256": f"{index:064x}",
                    "kind": "device",
                    "subject": device_id,
                    "not_before": created,
                    "not_after": now + timedelta(seconds=rng.randrange(400 * 86400)),
                    "created_at": created,
                    "revoked_at": now if status == "revoked" else None,
                    "pem": "-",
                    "source": "issued",
                }
            )
        async with store.engine.begin() as conn:
            await conn.execute(insert(devices), rows)
            await conn.execute(insert(tags), tag_rows)
            await conn.execute(insert(locations), location_rows)
            await conn.execute(insert(certificates), cert_rows)
    async with store.engine.begin() as conn:  # what the store keeps when it records certificates
        await conn.execute(update(devices).values(cert_not_after=latest_end(devices.c.id)))


def as_query(params: dict[str, Any], now: datetime) -> DeviceQuery:
    """The DeviceQuery the API builds from `params` (for the store path)."""
    tags = params.get("tag", ())
    return DeviceQuery(
        search=params.get("search"),
        blocked=params.get("blocked", "all"),
        status=DeviceStatus(params["status"]) if "status" in params else None,
        connection=Connection(params["connection"]) if "connection" in params else None,
        tags=(tags,) if isinstance(tags, str) else tuple(tags),
        location_ids=(params["location_id"],) if "location_id" in params else (),
        application=params.get("application"),
        manufacturer=params.get("manufacturer"),
        model=params.get("model"),
        cert_expires_before=now + parse_duration(params["cert_expires_within"])
        if "cert_expires_within" in params
        else None,
        last_seen_before=now - parse_duration(params["last_seen_before"])
        if "last_seen_before" in params
        else None,
        sort=parse_sort(params.get("sort")),
        limit=100,
        offset=params.get("offset", 0),
    )


def api_params(params: dict[str, Any], now: datetime) -> dict[str, Any]:
    out = dict(params)
    if "last_seen_before" in out:
        out["last_seen_before"] = iso(now - parse_duration(out["last_seen_before"]))
    return out


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


Samples = dict[str, list[tuple[float, float]]]  # name -> [(wall ms, process CPU ms)]


async def timed(runs: list[tuple[str, Callable[[], Awaitable[None]]]]) -> Samples:
    """Wall time and this process's CPU time (every thread: the SQLite worker, uvicorn) per run."""
    out: Samples = {}
    for name, run in runs:
        cpu, wall = time.process_time(), time.perf_counter()
        await run()
        elapsed = ((time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000)
        out.setdefault(name, []).append(elapsed)
    return out


def report(path: str, samples: Samples) -> None:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n== {path}: ms per query (limit 100); wall, and CPU of this process; load average {load}")
    print(f"{'scenario':44} {'p50':>7} {'p99':>7} {'max':>7} | {'cpu p50':>7} {'cpu p99':>7}")

    def line(name: str, rows: list[tuple[float, float]]) -> None:
        wall, cpu = [w for w, _ in rows], [c for _, c in rows]
        print(
            f"{name:44} {pct(wall, 0.5):7.1f} {pct(wall, 0.99):7.1f} {max(wall):7.1f} |"
            f" {pct(cpu, 0.5):7.1f} {pct(cpu, 0.99):7.1f}"
        )

    for scenario in SCENARIOS:
        if scenario.name in samples:
            line(scenario.name + (" (reference)" if scenario.reference else ""), samples[scenario.name])
    for name in sorted(set(samples) - {sc.name for sc in SCENARIOS}):
        line(name, samples[name])
    counted = {sc.name for sc in SCENARIOS if not sc.reference}
    every = [row for name, rows in samples.items() if name in counted for row in rows]
    line(f"ALL {len(every)} filtered/sorted page queries", every)


async def deep_cursor(store: Store, now: datetime) -> str:
    """The cursor at the end of page 199 of -last_seen_at (for the deep-page scenario)."""
    page = await store.list_devices(as_query({"sort": "-last_seen_at", "offset": 19_800}, now))
    assert page.next is not None
    return page.next.encode()


async def store_path(store: Store, reps: int, now: datetime, rng: random.Random) -> Samples:
    cursor = await deep_cursor(store, now)

    def run(scenario: Scenario) -> Callable[[], Awaitable[None]]:
        params = dict(scenario.params)
        after = None
        if params.pop("cursor", None):
            after = Cursor.decode(cursor, parse_sort(params.get("sort")))
        query = as_query(params, now)
        if after is not None:
            query = dataclasses.replace(query, after=after)

        async def once() -> None:
            page = await store.list_devices(query)
            assert page.total >= 0

        return once

    plan = [(s.name, run(s)) for s in SCENARIOS for _ in range(reps)]
    rng.shuffle(plan)
    samples = await timed(plan)

    async def summary() -> None:
        await store.device_summary(DeviceQuery(), now)

    samples.update(await timed([("summary (store)", summary)] * max(3, reps // 5)))
    return samples


async def http_path(
    client: httpx.AsyncClient, reps: int, now: datetime, cursor: str, rng: random.Random
) -> Samples:
    def run(scenario: Scenario) -> Callable[[], Awaitable[None]]:
        params = api_params(scenario.params, now)
        if params.get("cursor"):
            params["cursor"] = cursor

        async def once() -> None:
            response = await client.get("/devices", params={"limit": 100, **params})
            if response.status_code != 200:
                raise RuntimeError(f"{scenario.name}: {response.status_code} {response.text}")

        return once

    plan = [(s.name, run(s)) for s in SCENARIOS for _ in range(reps)]
    rng.shuffle(plan)
    samples = await timed(plan)

    async def summary() -> None:
        response = await client.get("/devices/summary")
        if response.status_code != 200:
            raise RuntimeError(f"summary: {response.status_code} {response.text}")

    samples.update(await timed([("GET /devices/summary", summary)] * max(3, reps // 5)))
    return samples


def device_indexes(db: Path) -> list[tuple[str, str]]:
    """(name, CREATE statement) of every secondary index on the device tables."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return list(
            conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                " AND tbl_name IN ('devices', 'device_tags', 'device_locations')"
            )
        )


async def prepare(settings: Settings, count: int, now: datetime) -> tuple[str, Path] | None:
    """Initialise the gateway and its fleet (reused when present); (admin token, database)."""
    report_init = await initialise(settings)
    token = report_init.admin_token or settings.admin_token_path.read_text().strip()
    db = settings.paths.data_dir / "gateway.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        existing = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
    if existing != count:
        if existing:
            print(f"{db} holds {existing} devices, not {count}: use another --root", file=sys.stderr)
            return None
        store = Store(settings.database_url)
        started = time.perf_counter()
        await populate(store, count, now)
        await store.close()
        print(
            f"inserted {count} devices (+ tags, locations, certificates)"
            f" in {time.perf_counter() - started:.1f} s"
        )
    print(f"database: {db} ({db.stat().st_size / 1e6:.0f} MB), SQLite {sqlite3.sqlite_version}")
    return token, db


def set_online_again(db: Path) -> None:
    """A gateway start marks every ONLINE device offline (gateway_restart), and so does its stop
    (gateway_shutdown); the fleet is data here, the same for every run on a kept --root."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "UPDATE devices SET connection = 'online', disconnect_reason = NULL"
            " WHERE disconnect_reason IN ('gateway_restart', 'gateway_shutdown')"
        )
        conn.commit()


async def api_paths(
    args: argparse.Namespace, settings: Settings, token: str, cursor: str, now: datetime
) -> None:
    rng = random.Random(2)
    app = GatewayApp(settings)
    await app.start()
    settle_runtime()
    set_online_again(settings.paths.data_dir / "gateway.db")
    try:
        headers = {"Authorization": f"Bearer {token}"}
        if "asgi" in args.paths:
            asgi = create_app(
                ApiContext(app.devices, app.store, app.pki, app.data, app.audit_store, lambda: 0)
            )
            transport = httpx.ASGITransport(app=asgi)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://bench/api/v1", headers=headers
            ) as client:
                report(
                    "asgi (API in process, httpx ASGITransport)",
                    await http_path(client, args.reps, now, cursor, rng),
                )
        if "https" in args.paths:
            verify = ssl.create_default_context(cafile=str(settings.paths.certs_dir / "ca.crt"))
            url = f"https://127.0.0.1:{app.api_port}/api/v1"
            async with httpx.AsyncClient(base_url=url, headers=headers, verify=verify, timeout=30) as client:
                report(
                    "https (running gateway, loopback, keep-alive)",
                    await http_path(client, args.reps, now, cursor, rng),
                )
    finally:
        await app.stop()
        set_online_again(settings.paths.data_dir / "gateway.db")


async def without_indexes(settings: Settings, db: Path, reps: int, now: datetime) -> None:
    """The store path again with the device tables' secondary indexes dropped, then restored."""
    indexes = device_indexes(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.commit()
    try:
        store = Store(settings.database_url)
        reference = await store_path(store, reps, now, random.Random(3))
        await store.close()
        report(f"store WITHOUT the {len(indexes)} secondary device indexes (reference)", reference)
    finally:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            for _, sql in indexes:
                conn.execute(sql)
            conn.commit()


async def main_async(args: argparse.Namespace) -> int:
    logs.configure(LoggingSettings(level="warning", format="console"), cache=False)
    now = datetime.now(UTC)
    with contextlib.ExitStack() as stack:
        root = Path(args.root) if args.root else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        settings = settings_for(root)
        prepared = await prepare(settings, args.devices, now)
        if prepared is None:
            return 2
        token, db = prepared
        set_online_again(db)  # as populated, should an earlier run have stopped without restoring it
        store = Store(settings.database_url)
        settle_runtime()  # as `gateway serve` runs (heap frozen after start-up, GIL switch interval)
        if "store" in args.paths:
            report("store (Store.list_devices)", await store_path(store, args.reps, now, random.Random(1)))
        cursor = await deep_cursor(store, now)
        await store.close()
        if {"asgi", "https"} & set(args.paths):
            await api_paths(args, settings, token, cursor, now)
        if args.without_indexes:
            await without_indexes(settings, db, max(3, args.reps // 5), now)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/devices", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=25, help="runs of each scenario per path")
    parser.add_argument(
        "--paths", nargs="+", default=["store", "asgi", "https"], choices=["store", "asgi", "https"]
    )
    parser.add_argument("--root", help="keep the gateway (and its fleet) here; reused when present")
    parser.add_argument(
        "--without-indexes",
        action="store_true",
        help="also time the store path with the device indexes dropped (then restored)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
