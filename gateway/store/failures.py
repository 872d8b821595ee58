"""Connect failures in the registry: one row per (key, reason), merged batch by batch.

Receives the tallies of `gateway.core.failures.FailureAggregator` at each flush; merges
them in one transaction (an upsert: counts add up, last seen and the latest client
move on, a kept certificate stays), then keeps the table at most ``max_rows`` long
(the least recently seen rows go). Hands back pages of `FailureRecord`, most recently
seen first, and marks an approved unknown certificate with the device made for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.core.failures import FailureQuery, FailureRecord, FailureTally
from gateway.store.models import ConnectFailureRow

failures = cast(Table, ConnectFailureRow.__table__)


class FailureStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def merge(self, tallies: Sequence[FailureTally], *, max_rows: int) -> None:
        """Add one flush's tallies to their rows (created when new), then cap the table."""
        if not tallies:
            return
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(failures)
        statement = statement.on_conflict_do_update(
            index_elements=[failures.c.key, failures.c.reason],
            set_={
                "attempts": failures.c.attempts + statement.excluded.attempts,
                "last_seen_at": statement.excluded.last_seen_at,
                "last_client_id": statement.excluded.last_client_id,
                "last_client_ip": statement.excluded.last_client_ip,
                "device_id": statement.excluded.device_id,
                "certificate_pem": func.coalesce(
                    failures.c.certificate_pem, statement.excluded.certificate_pem
                ),
            },
        )
        async with self.engine.begin() as conn:
            await conn.execute(statement, [_values(tally) for tally in tallies])
            await _cap(conn, max_rows)

    async def query(self, query: FailureQuery) -> tuple[list[FailureRecord], int]:
        conditions: list[Any] = []
        if query.reason is not None:
            conditions.append(failures.c.reason == query.reason)
        if query.fingerprint is not None:
            conditions.append(failures.c.fingerprint == query.fingerprint)
        async with self.engine.connect() as conn:
            total = (
                await conn.execute(select(func.count()).select_from(failures).where(*conditions))
            ).scalar_one()
            rows = await conn.execute(
                select(failures)
                .where(*conditions)
                .order_by(failures.c.last_seen_at.desc(), failures.c.id.desc())
                .limit(query.limit)
                .offset(query.offset)
            )
            return [_record(row) for row in rows], int(total)

    async def mark_approved(self, key: str, reason: str, device_id: str, now: datetime) -> bool:
        """Record that a device was made for this failure; False if it was approved already."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(failures)
                .where(failures.c.key == key, failures.c.reason == reason)
                .where(failures.c.approved_device_id.is_(None))
                .values(approved_device_id=device_id, approved_at=now)
            )
        return bool(result.rowcount == 1)

    async def purge(self, seen_before: datetime) -> int:
        """Delete the rows last seen before `seen_before`; how many were."""
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(failures).where(failures.c.last_seen_at < seen_before))
        return int(result.rowcount or 0)


async def _cap(conn: AsyncConnection, max_rows: int) -> None:
    """Keep the `max_rows` most recently seen rows."""
    count = (await conn.execute(select(func.count()).select_from(failures))).scalar_one()
    if count <= max_rows:
        return
    oldest = (
        select(failures.c.id)
        .order_by(failures.c.last_seen_at.desc(), failures.c.id.desc())
        .offset(max_rows)
        .scalar_subquery()
    )
    await conn.execute(delete(failures).where(failures.c.id.in_(oldest)))


def _values(tally: FailureTally) -> dict[str, Any]:
    return {
        "key": tally.key,
        "reason": tally.reason,
        "fingerprint": tally.fingerprint,
        "attempts": tally.count,
        "first_seen_at": tally.first_seen_at,
        "last_seen_at": tally.last_seen_at,
        "last_client_id": tally.last_client_id,
        "last_client_ip": tally.last_client_ip,
        "device_id": tally.device_id,
        "certificate_pem": tally.certificate_pem,
    }


def _record(row: Any) -> FailureRecord:
    return FailureRecord(
        key=row.key,
        reason=row.reason,
        fingerprint=row.fingerprint,
        count=int(row.attempts),
        first_seen_at=row.first_seen_at,
        last_seen_at=row.last_seen_at,
        last_client_id=row.last_client_id,
        last_client_ip=row.last_client_ip,
        device_id=row.device_id,
        certificate_pem=row.certificate_pem,
        approved_device_id=row.approved_device_id,
        approved_at=row.approved_at,
    )
