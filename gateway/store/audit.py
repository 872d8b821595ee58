"""The audit log in the registry: append-only rows of operator actions.

Receives `AuditEntry` values from `gateway.audit`; hands back pages of them, newest
first. There is no update or delete: retention, if any, is an operator's decision
outside the gateway.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.core.records import AuditEntry, AuditQuery
from gateway.store.models import AuditRow

audit_log = cast(Table, AuditRow.__table__)


def _dumps(value: dict[str, object] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _loads(text: str | None) -> dict[str, object] | None:
    return None if text is None else cast(dict[str, object], json.loads(text))


def _row(entry: AuditEntry, at: datetime) -> dict[str, object]:
    return {
        "at": at,
        "actor": entry.actor,
        "action": entry.action,
        "target_type": entry.target_type,
        "target_id": entry.target_id,
        "before": _dumps(entry.before),
        "after": _dumps(entry.after),
        "detail": _dumps(entry.detail),
    }


class AuditStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def append_many(self, entries: list[AuditEntry], at: datetime) -> None:
        """Entries in one transaction (one action's, or a bulk registration's), in order."""
        if entries:
            async with self.engine.begin() as conn:
                await conn.execute(insert(audit_log), [_row(entry, at) for entry in entries])

    async def query(self, query: AuditQuery) -> tuple[list[AuditEntry], int]:
        conditions: list[Any] = []
        if query.actor is not None:
            conditions.append(audit_log.c.actor == query.actor)
        if query.action is not None:
            if query.action.endswith("."):
                conditions.append(audit_log.c.action.startswith(query.action, autoescape=True))
            else:
                conditions.append(audit_log.c.action == query.action)
        if query.target_type is not None:
            conditions.append(audit_log.c.target_type == query.target_type)
        if query.target_id is not None:
            conditions.append(audit_log.c.target_id == query.target_id)
        if query.since is not None:
            conditions.append(audit_log.c.at >= query.since)
        if query.until is not None:
            conditions.append(audit_log.c.at < query.until)
        async with self.engine.connect() as conn:
            total = (
                await conn.execute(select(func.count()).select_from(audit_log).where(*conditions))
            ).scalar_one()
            rows = await conn.execute(
                select(audit_log)
                .where(*conditions)
                .order_by(audit_log.c.at.desc(), audit_log.c.id.desc())
                .limit(query.limit)
                .offset(query.offset)
            )
            entries = [
                AuditEntry(
                    actor=r.actor,
                    action=r.action,
                    target_type=r.target_type,
                    target_id=r.target_id,
                    before=_loads(r.before),
                    after=_loads(r.after),
                    detail=_loads(r.detail),
                    id=int(r.id),
                    at=r.at,
                )
                for r in rows
            ]
        return entries, int(total)
