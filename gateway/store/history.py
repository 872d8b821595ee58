"""The connection history in the registry: one row per device session.

Receives batches of session starts and ends (`gateway.core.history`) from the history
writer; hands back a device's sessions, newest first. A batch is one transaction:
starts are inserted, ends complete their start (found by device id and epoch), and
the devices that started a session are trimmed to their newest ``keep_per_device``
rows. A start whose device is gone meanwhile is skipped, never fails the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.core.history import SessionEnd, SessionRecord, SessionStart, Traffic
from gateway.errors import Conflict
from gateway.store.models import Device, SessionRow

sessions = cast(Table, SessionRow.__table__)
devices = cast(Table, Device.__table__)


class HistoryStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def write(
        self, starts: Sequence[SessionStart], ends: Sequence[SessionEnd], *, keep_per_device: int
    ) -> None:
        """Store one batch (starts before ends: an end may complete a start of the same batch).

        Raises `Conflict` when the batch can never be stored (it clashes with stored rows).
        """
        try:
            await self._write(starts, ends, keep_per_device)
        except IntegrityError as exc:
            raise Conflict(f"session history batch refused: {exc.orig}", code="history_conflict") from exc

    async def _write(
        self, starts: Sequence[SessionStart], ends: Sequence[SessionEnd], keep_per_device: int
    ) -> None:
        async with self.engine.begin() as conn:
            if starts:
                await self._insert_starts(conn, starts)
            if ends:
                await conn.execute(
                    update(sessions)
                    .where(
                        sessions.c.device_id == bindparam("b_device_id"),
                        sessions.c.epoch == bindparam("b_epoch"),
                    )
                    .values(
                        disconnected_at=bindparam("b_at"),
                        reason=bindparam("b_reason"),
                        bytes_in=bindparam("b_bytes_in"),
                        bytes_out=bindparam("b_bytes_out"),
                        messages_in=bindparam("b_messages_in"),
                        messages_out=bindparam("b_messages_out"),
                    ),
                    [
                        {
                            "b_device_id": end.device_id,
                            "b_epoch": end.epoch,
                            "b_at": end.disconnected_at,
                            "b_reason": end.reason,
                            "b_bytes_in": end.traffic.bytes_in,
                            "b_bytes_out": end.traffic.bytes_out,
                            "b_messages_in": end.traffic.messages_in,
                            "b_messages_out": end.traffic.messages_out,
                        }
                        for end in ends
                    ],
                )
            if starts:
                await _trim(conn, {start.device_id for start in starts}, keep_per_device)

    async def _insert_starts(self, conn: AsyncConnection, starts: Sequence[SessionStart]) -> None:
        wanted = {start.device_id for start in starts}
        present = set((await conn.execute(select(devices.c.id).where(devices.c.id.in_(wanted)))).scalars())
        latest = {(start.device_id, start.epoch): start for start in starts}  # one per session
        rows = [
            {
                "device_id": start.device_id,
                "epoch": start.epoch,
                "connected_at": start.connected_at,
                "client_ip": start.client_ip,
                "client_port": start.client_port,
                "certificate_serial": start.certificate_serial,
                "bytes_in": 0,
                "bytes_out": 0,
                "messages_in": 0,
                "messages_out": 0,
            }
            for start in latest.values()
            if start.device_id in present
        ]
        if rows:
            await conn.execute(insert(sessions), rows)

    async def close_open(self, reason: str, now: datetime) -> int:
        """At start: sessions a previous run never ended (it stopped abruptly) end with `reason`."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(sessions)
                .where(sessions.c.disconnected_at.is_(None))
                .values(disconnected_at=now, reason=reason)
            )
        return int(result.rowcount or 0)

    async def sessions_of(
        self, device_id: str, *, limit: int, offset: int
    ) -> tuple[list[SessionRecord], int]:
        """A device's sessions, newest first, and how many there are."""
        where = sessions.c.device_id == device_id
        async with self.engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(sessions).where(where))).scalar_one()
            rows = await conn.execute(
                select(sessions).where(where).order_by(sessions.c.epoch.desc()).limit(limit).offset(offset)
            )
            return [_record(row) for row in rows], int(total)

    async def purge(self, ended_before: datetime, batch_size: int) -> int:
        """Delete up to `batch_size` sessions that ended before `ended_before`; how many were."""
        async with self.engine.begin() as conn:
            doomed = (
                select(sessions.c.id)
                .where(sessions.c.disconnected_at < ended_before)
                .order_by(sessions.c.disconnected_at)
                .limit(batch_size)
                .scalar_subquery()
            )
            result = await conn.execute(delete(sessions).where(sessions.c.id.in_(doomed)))
        return int(result.rowcount or 0)


async def _trim(conn: AsyncConnection, device_ids: set[str], keep: int) -> None:
    """Delete every session of these devices beyond their newest `keep`."""
    over = (
        await conn.execute(
            select(sessions.c.device_id)
            .where(sessions.c.device_id.in_(device_ids))
            .group_by(sessions.c.device_id)
            .having(func.count() > keep)
        )
    ).scalars()
    for device_id in over:
        newest = (
            select(sessions.c.epoch)
            .where(sessions.c.device_id == device_id)
            .order_by(sessions.c.epoch.desc())
            .limit(1)
            .offset(keep - 1)
            .scalar_subquery()
        )
        await conn.execute(
            delete(sessions).where(sessions.c.device_id == device_id, sessions.c.epoch < newest)
        )


def _record(row: Any) -> SessionRecord:
    return SessionRecord(
        device_id=row.device_id,
        epoch=int(row.epoch),
        connected_at=row.connected_at,
        disconnected_at=row.disconnected_at,
        reason=row.reason,
        client_ip=row.client_ip,
        client_port=int(row.client_port),
        certificate_serial=row.certificate_serial,
        traffic=Traffic(int(row.bytes_in), int(row.bytes_out), int(row.messages_in), int(row.messages_out)),
    )
