"""The registry store: devices and presence, over SQLAlchemy async.

Certificates and registration tokens are in `gateway.store.credentials`
(``Store.credentials``), API tokens in `gateway.store.tokens` (``Store.tokens``), device
groups, sites and profiles in `gateway.store.groups`, `.sites`, `.profiles` (``Store.groups``,
``Store.sites``, ``Store.profiles``), device data in `gateway.store.data`.

Receives plain values from the services (ids, hashes, times, statuses already decided
by the pure core) and hands back frozen records. Each public method is one
transaction. Conditional updates (`WHERE epoch = :epoch`, `WHERE used_at IS NULL`)
make single-use tokens and ordered presence hold under concurrency and across
gateway instances sharing one PostgreSQL database.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Row,
    Table,
    delete,
    event,
    insert,
    inspect,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.schema import CreateColumn

from gateway.core import device_fields
from gateway.core.admission import CertificateKind
from gateway.core.ids import DeviceId
from gateway.core.lifecycle import DeviceStatus
from gateway.core.presence import Connection, OfflineReason, StatusChange
from gateway.core.records import (
    CertificateSummary,
    DevicePage,
    DeviceQuery,
    DeviceRecord,
    DeviceSummary,
    NewCertificate,
    NewDevice,
)
from gateway.errors import Conflict, NotFound, StoreUnavailable
from gateway.store import listing
from gateway.store.credentials import (
    CredentialStore,
    insert_certificate,
    insert_registration_tokens,
    latest_end,
)
from gateway.store.groups import GroupStore
from gateway.store.models import REPLACED_INDEXES, Base, Certificate, Device, DeviceLocation, DeviceTag
from gateway.store.profiles import ProfileStore
from gateway.store.sites import SiteStore
from gateway.store.tokens import TokenStore

devices = cast(Table, Device.__table__)
certificates = cast(Table, Certificate.__table__)
device_tags = cast(Table, DeviceTag.__table__)
device_locations = cast(Table, DeviceLocation.__table__)
# Detail fields kept outside the devices row: field -> (table, value column).
_LABEL_TABLES = {"tags": (device_tags, "tag"), "location_ids": (device_locations, "location_id")}


SQLITE_MMAP_BYTES = 256 * 1024 * 1024


class Store:
    """One engine, one transaction per call."""

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, sqlite_synchronous: str = "FULL") -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        connect_args: dict[str, Any] = {"timeout": busy_timeout_s} if self.is_sqlite else {}
        self.engine: AsyncEngine = create_async_engine(url, connect_args=connect_args)
        self.credentials = CredentialStore(self.engine)
        self.tokens = TokenStore(self.engine)
        self.groups = GroupStore(self.engine)
        self.sites = SiteStore(self.engine)
        self.profiles = ProfileStore(self.engine)
        if self.is_sqlite:
            sync = sqlite_synchronous

            @event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(dbapi_conn: DBAPIConnection, _: ConnectionPoolEntry) -> None:
                cursor = dbapi_conn.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={sync}")
                cursor.execute("PRAGMA foreign_keys=ON")
                # Reads through the OS page cache, shared by every pooled connection, instead of
                # a 2 MiB private cache each (lookup-heavy listings over 100,000 devices: ~1.3-2x).
                cursor.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
                cursor.close()

    async def create_schema(self) -> None:
        """Create missing tables and indexes, and add columns newer releases introduced."""
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            added = await conn.run_sync(_add_missing_columns)
            if (devices.name, "cert_not_after") in added:  # from the certificates it kept
                await conn.execute(update(devices).values(cert_not_after=latest_end(devices.c.id)))
            await conn.run_sync(_add_missing_indexes)
            await conn.run_sync(_drop_replaced_indexes)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(select(1))
        except OperationalError as exc:
            raise StoreUnavailable(f"database unavailable: {exc.orig}") from exc

    # --- devices -----------------------------------------------------------------

    async def create_device(
        self, device_id: DeviceId, name: str, now: datetime, *, certificate: NewCertificate | None = None
    ) -> DeviceRecord:
        """A new ``pending`` device; with `certificate`, bound to it in the same transaction."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(devices).values(_new_row(device_id.value, name, now)))
                if certificate is not None:
                    await insert_certificate(conn, certificate, now)
                return await self._device(conn, device_id.value)
        except IntegrityError as exc:
            raise Conflict(f"device {device_id} already exists", code="device_exists") from exc

    async def existing_ids(self, device_ids: Sequence[str]) -> set[str]:
        """Which of these device ids are registered (any number: asked in slices)."""
        found: set[str] = set()
        async with self.engine.connect() as conn:
            for start in range(0, len(device_ids), 500):
                ids = device_ids[start : start + 500]
                rows = await conn.execute(select(devices.c.id).where(devices.c.id.in_(ids)))
                found.update(rows.scalars())
        return found

    async def get_device(self, device_id: str) -> DeviceRecord:
        async with self.engine.connect() as conn:
            return await self._device(conn, device_id)

    async def _device(self, conn: AsyncConnection, device_id: str) -> DeviceRecord:
        row = (await conn.execute(select(devices).where(devices.c.id == device_id))).one_or_none()
        if row is None:
            raise NotFound(f"device {device_id} not found", code="device_not_found")
        return (await self._records(conn, [row]))[0]

    async def _records(self, conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[DeviceRecord]:
        """Device rows as records, with their certificate (one query) and tags and locations (one)."""
        ids = [row.id for row in rows]
        summaries = await self._certificate_summaries(conn, ids)
        labels: dict[str, dict[str, list[str]]] = {name: {} for name in _LABEL_TABLES}
        if ids:
            found = await conn.execute(
                union_all(
                    *(
                        select(
                            literal(name).label("field"), table.c.device_id, table.c[column].label("value")
                        ).where(table.c.device_id.in_(ids))
                        for name, (table, column) in _LABEL_TABLES.items()
                    )
                )
            )
            for name, device_id, value in found:
                labels[name].setdefault(device_id, []).append(value)
        return [
            _device_record(
                row,
                summaries.get(row.id),
                tuple(sorted(labels["tags"].get(row.id, ()))),
                tuple(sorted(labels["location_ids"].get(row.id, ()))),
            )
            for row in rows
        ]

    async def _certificate_summaries(
        self, conn: AsyncConnection, device_ids: Sequence[str]
    ) -> dict[str, CertificateSummary]:
        """The newest unrevoked certificate of each device."""
        if not device_ids:
            return {}
        rows = await conn.execute(
            select(
                certificates.c.subject,
                certificates.c.serial,
                certificates.c.fingerprint_sha256,
                certificates.c.not_after,
            )
            .where(
                certificates.c.kind == CertificateKind.DEVICE.value,
                certificates.c.subject.in_(device_ids),
                certificates.c.revoked_at.is_(None),
            )
            .order_by(certificates.c.created_at)
        )
        return {  # unpacked: a Row's attributes resolve in Python
            subject: CertificateSummary(serial, fingerprint, not_after)
            for subject, serial, fingerprint, not_after in rows
        }

    async def list_devices(self, query: DeviceQuery) -> DevicePage:
        """One page of the devices the filters match, in order; `next` when more follow."""
        async with self.engine.connect() as conn:
            rows, total, following = await listing.page(conn, query, sqlite=self.is_sqlite)
            return DevicePage(await self._records(conn, rows), total, following)

    async def device_summary(self, query: DeviceQuery, now: datetime) -> DeviceSummary:
        """Counts over the devices the query's filters match (order and page ignored)."""
        async with self.engine.connect() as conn:
            return await listing.summary(conn, query, now, sqlite=self.is_sqlite)

    async def update_device(self, device_id: str, now: datetime, **fields: Any) -> DeviceRecord:
        """Set fields (name, blocked, identification, the detail fields) and ``updated_at``.

        Detail fields arrive parsed (`gateway.core.device_fields`); tags and location ids
        replace the device's whole set.
        """
        values, labels = _columns(fields)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(devices).where(devices.c.id == device_id).values(updated_at=now, **values)
            )
            if result.rowcount == 0:
                raise NotFound(f"device {device_id} not found", code="device_not_found")
            for name, chosen in labels.items():
                table, _ = _LABEL_TABLES[name]
                await conn.execute(delete(table).where(table.c.device_id == device_id))
                if chosen:
                    await conn.execute(insert(table), _label_rows(name, device_id, chosen))
            return await self._device(conn, device_id)

    async def create_devices(self, new: Sequence[NewDevice], now: datetime) -> list[DeviceRecord]:
        """Many ``pending`` devices, each with its detail fields and one-time token, in one
        transaction, in order; Conflict (and none created) when one of the ids exists."""
        rows: list[dict[str, Any]] = []
        labels: dict[str, list[dict[str, Any]]] = {name: [] for name in _LABEL_TABLES}
        for device in new:
            values, chosen = _columns({**_NO_DETAILS, **device.details})
            rows.append({**_new_row(device.device_id, device.name, now), **values})
            for name, given in chosen.items():
                labels[name] += _label_rows(name, device.device_id, given)
        if not rows:
            return []
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(devices), rows)
                for name, label_rows in labels.items():
                    if label_rows:
                        await conn.execute(insert(_LABEL_TABLES[name][0]), label_rows)
                await insert_registration_tokens(
                    conn, [(d.device_id, d.token_hash, d.token_expires_at) for d in new], now
                )
                ids = [d.device_id for d in new]
                found = (await conn.execute(select(devices).where(devices.c.id.in_(ids)))).all()
                by_id = {record.id: record for record in await self._records(conn, found)}
                return [by_id[device_id] for device_id in ids]
        except IntegrityError as exc:
            which = f"device {new[0].device_id}" if len(new) == 1 else "a device of this batch"
            raise Conflict(f"{which} already exists", code="device_exists") from exc

    async def change_status(
        self, device_id: str, expected: DeviceStatus, new: DeviceStatus, now: datetime
    ) -> DeviceRecord:
        """Compare-and-set the status: fails with Conflict when someone changed it meanwhile."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(devices)
                .where(devices.c.id == device_id, devices.c.status == expected.value)
                .values(status=new.value, updated_at=now)
            )
            if result.rowcount == 0:
                await self._device(conn, device_id)  # NotFound if it is gone
                raise Conflict(f"device {device_id} changed status concurrently; retry", code="conflict")
            return await self._device(conn, device_id)

    async def delete_device(self, device_id: str) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(devices).where(devices.c.id == device_id))
            if result.rowcount == 0:
                raise NotFound(f"device {device_id} not found", code="device_not_found")

    # --- presence ---------------------------------------------------------------------

    async def mark_online(
        self,
        device_id: str,
        now: datetime,
        *,
        client_ip: str | None,
        serial: str,
        check_in: tuple[DeviceStatus, DeviceStatus] | None = None,
    ) -> StatusChange:
        """Start a new session: epoch + 1, online. `check_in` is (expected, new) status."""
        values: dict[str, Any] = {
            "epoch": devices.c.epoch + 1,
            "connection": Connection.ONLINE.value,
            "last_connected_at": now,
            "last_seen_at": now,
            "client_ip": client_ip,
            "connected_serial": serial,
            "disconnect_reason": None,
        }
        async with self.engine.begin() as conn:
            if check_in is not None:
                expected, new = check_in
                await conn.execute(
                    update(devices)
                    .where(devices.c.id == device_id, devices.c.status == expected.value)
                    .values(status=new.value, checked_in_at=now, updated_at=now)
                )
            row = (
                await conn.execute(
                    update(devices)
                    .where(devices.c.id == device_id)
                    .values(**values)
                    .returning(devices.c.epoch)
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"device {device_id} not found", code="device_not_found")
        return StatusChange(device_id, Connection.ONLINE, "connected", int(row.epoch), now, client_ip, serial)

    async def mark_offline(
        self, device_id: str, epoch: int, reason: OfflineReason, now: datetime
    ) -> StatusChange | None:
        """End session `epoch`; None when a newer session (or nothing) is current."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(devices)
                .where(
                    devices.c.id == device_id,
                    devices.c.epoch == epoch,
                    devices.c.connection == Connection.ONLINE.value,
                )
                .values(
                    connection=Connection.OFFLINE.value,
                    last_disconnected_at=now,
                    disconnect_reason=reason.value,
                )
            )
        if result.rowcount != 1:
            return None
        return StatusChange(device_id, Connection.OFFLINE, reason.value, epoch, now)

    async def mark_all_offline(self, reason: OfflineReason, now: datetime) -> list[StatusChange]:
        """Every device still ONLINE goes offline with `reason` (start-up and shutdown)."""
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    select(devices.c.id, devices.c.epoch).where(
                        devices.c.connection == Connection.ONLINE.value
                    )
                )
            ).all()
            if rows:
                await conn.execute(
                    update(devices)
                    .where(devices.c.connection == Connection.ONLINE.value)
                    .values(
                        connection=Connection.OFFLINE.value,
                        last_disconnected_at=now,
                        disconnect_reason=reason.value,
                    )
                )
        return [StatusChange(r.id, Connection.OFFLINE, reason.value, int(r.epoch), now) for r in rows]

    async def presence_snapshot(self) -> list[StatusChange]:
        """The current status of every device that ever connected (to seed retained topics)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(
                    devices.c.id,
                    devices.c.connection,
                    devices.c.epoch,
                    devices.c.disconnect_reason,
                    devices.c.last_connected_at,
                    devices.c.last_disconnected_at,
                    devices.c.client_ip,
                    devices.c.connected_serial,
                ).where(devices.c.epoch > 0)
            )
            changes = []
            for r in rows:
                online = r.connection == Connection.ONLINE.value
                at = r.last_connected_at if online else (r.last_disconnected_at or r.last_connected_at)
                changes.append(
                    StatusChange(
                        r.id,
                        Connection(r.connection),
                        "connected"
                        if online
                        else (r.disconnect_reason or OfflineReason.CONNECTION_LOST.value),
                        int(r.epoch),
                        at,
                        r.client_ip if online else None,
                        r.connected_serial if online else None,
                    )
                )
            return changes


def _new_row(device_id: str, name: str, now: datetime) -> dict[str, Any]:
    """The devices row of a device just registered: pending, offline, never connected."""
    return {
        "id": device_id,
        "name": name,
        "name_lower": name.lower(),
        "status": DeviceStatus.PENDING.value,
        "blocked": False,
        "created_at": now,
        "updated_at": now,
        "connection": Connection.OFFLINE.value,
        "epoch": 0,
    }


_NO_DETAILS: dict[str, object] = {  # a new device's detail fields, unless given
    "description": None,
    "tags": (),
    "location_ids": (),
    "metadata": {},
    "settings": {},
    "profile_id": None,
}


def _columns(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Sequence[str]]]:
    """Record fields as devices columns, and the tag and location lists (their own tables)."""
    values: dict[str, Any] = dict(fields)
    labels = {name: cast(Sequence[str], values.pop(name)) for name in _LABEL_TABLES if name in values}
    for name, column in (("metadata", "metadata_json"), ("settings", "settings_json")):
        if name in values:
            document = values.pop(name)
            values[column] = device_fields.dump_json(document) if document else None
    if "name" in values:
        values["name_lower"] = str(values["name"]).lower()
    if "status" in values:
        values["status"] = DeviceStatus(values["status"]).value
    return values, labels


def _label_rows(name: str, device_id: str, values: Sequence[str]) -> list[dict[str, Any]]:
    _, column = _LABEL_TABLES[name]
    return [{"device_id": device_id, column: value} for value in values]


def _device_record(
    row: Row[Any], cert: CertificateSummary | None, tags: tuple[str, ...], location_ids: tuple[str, ...]
) -> DeviceRecord:
    # A plain dict first: a Row's attributes resolve in Python, a dict's in C (a page of 100
    # records: ~1.5 ms of 2 went to the attribute lookups).
    r = dict(zip(row._fields, row, strict=True))
    return DeviceRecord(
        id=r["id"],
        name=r["name"],
        status=DeviceStatus(r["status"]),
        connection=Connection(r["connection"]),
        blocked=bool(r["blocked"]),
        blocked_at=r["blocked_at"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        checked_in_at=r["checked_in_at"],
        last_connected_at=r["last_connected_at"],
        last_disconnected_at=r["last_disconnected_at"],
        disconnect_reason=r["disconnect_reason"],
        last_seen_at=r["last_seen_at"],
        last_data_at=r["last_data_at"],
        client_ip=r["client_ip"],
        epoch=int(r["epoch"]),
        manufacturer=r["manufacturer"],
        model=r["model"],
        application=r["application"],
        application_version=r["application_version"],
        os=r["os"],
        os_version=r["os_version"],
        firmware_version=r["firmware_version"],
        certificate=cert,
        description=r["description"],
        tags=tags,
        location_ids=location_ids,
        metadata=json.loads(r["metadata_json"]) if r["metadata_json"] else {},
        settings=json.loads(r["settings_json"]) if r["settings_json"] else {},
        profile_id=r["profile_id"],
    )


def _add_missing_columns(conn: SyncConnection) -> set[tuple[str, str]]:
    """Additive schema upgrade: columns a newer release added to an existing table; returns
    them as (table, column) names.

    Only nullable columns or columns with a server default are ever added, so
    existing rows stay valid; anything else needs a real migration.
    """
    inspector = inspect(conn)
    missing = []
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable and column.server_default is None:
                raise StoreUnavailable(
                    f"table {table.name} lacks column {column.name}, which cannot be added in place"
                )
            missing.append((table, column))
    # Only once every table passed: Python's sqlite3 driver commits each ALTER TABLE at once
    # (no transaction around DDL), so a refusal half-way would leave a half-upgraded schema.
    for table, column in missing:
        ddl = CreateColumn(column).compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))
    return {(table.name, column.name) for table, column in missing}


def _add_missing_indexes(conn: SyncConnection) -> None:
    """Indexes a newer release added to an existing table (new tables got theirs from create_all)."""
    inspector = inspect(conn)
    for table in Base.metadata.sorted_tables:
        present = {index["name"] for index in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in present:
                index.create(conn)


def _drop_replaced_indexes(conn: SyncConnection) -> None:
    """Indexes an earlier release made and a newer one replaced (`REPLACED_INDEXES`)."""
    inspector = inspect(conn)
    for table, names in REPLACED_INDEXES.items():
        present = {index["name"] for index in inspector.get_indexes(table)}
        for name in names:
            if name in present:
                conn.execute(text(f"DROP INDEX {name}"))
