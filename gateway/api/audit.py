"""``GET /api/v1/audit``: the operator actions the gateway recorded, newest first (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from gateway.api.auth import ADMIN, context
from gateway.api.schemas import Offset
from gateway.core.clock import as_utc, iso
from gateway.core.records import AuditQuery


class AuditEntryOut(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    detail: dict[str, Any] | None


class AuditPage(BaseModel):
    data: list[AuditEntryOut]
    total: int
    limit: int
    offset: int


def build_router() -> APIRouter:
    r = APIRouter(tags=["audit"])

    @r.get("/audit", response_model=AuditPage, dependencies=[ADMIN])
    async def audit(
        request: Request,
        actor: Annotated[str | None, Query(max_length=120, description="e.g. token:admin")] = None,
        action: Annotated[
            str | None, Query(max_length=64, description="exact (device.blocked) or a prefix (device.)")
        ] = None,
        target_type: Annotated[str | None, Query(max_length=32)] = None,
        target_id: Annotated[str | None, Query(max_length=128)] = None,
        since: Annotated[datetime | None, Query(description="ISO 8601, at or after")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601, before")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> AuditPage:
        """Who did what and when, with the record before and after; append-only."""
        query = AuditQuery(actor, action, target_type, target_id, as_utc(since), as_utc(until), limit, offset)
        entries, total = await context(request).audit.query(query)
        return AuditPage(
            data=[
                AuditEntryOut(
                    id=entry.id or 0,
                    at=iso(entry.at) or "",
                    actor=entry.actor,
                    action=entry.action,
                    target_type=entry.target_type,
                    target_id=entry.target_id,
                    before=entry.before,
                    after=entry.after,
                    detail=entry.detail,
                )
                for entry in entries
            ],
            total=total,
            limit=limit,
            offset=offset,
        )

    return r
