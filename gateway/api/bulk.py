"""``POST /api/v1/devices:bulk``: register up to 1,000 devices in one request (devices:write).

The colon keeps the route apart from ``/devices/{id}`` (a device id can never contain
one). Receives the rows; hands them to `gateway.bulk.register_many` (the rules, the
all-or-nothing check) and answers each registered row with its one-time token.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from gateway.api.auth import WRITE, context
from gateway.api.schemas import RequestBody, when
from gateway.bulk import MAX_ROWS, ROW_FIELDS, register_many


class BulkIn(RequestBody):
    devices: list[Any] = Field(
        min_length=1, description=f"at most {MAX_ROWS} objects with {', '.join(ROW_FIELDS)} (name required)"
    )
    continue_on_error: bool = Field(
        default=False, description="register the valid rows and report the others (default: all or nothing)"
    )
    dry_run: bool = Field(default=False, description="only check the rows; register nothing")


class BulkRegistered(BaseModel):
    row: int = Field(description="1-based position in `devices`")
    id: str
    name: str
    status: str
    registration_token: str = Field(description="one-time enrolment token; shown once, stored only as a hash")
    token_expires_at: str


class BulkRowError(BaseModel):
    row: int
    id: str | None
    code: str
    message: str


class BulkOut(BaseModel):
    data: list[BulkRegistered]
    errors: list[BulkRowError]
    registered: int
    failed: int
    dry_run: bool


def build_router() -> APIRouter:
    r = APIRouter(tags=["devices"])

    @r.post(
        "/devices:bulk",
        response_model=BulkOut,
        status_code=201,
        dependencies=[WRITE],
        responses={
            200: {"description": "dry run: the rows were only checked"},
            422: {
                "description": "rows refused (`error.code` invalid_rows, `error.rows`): nothing registered"
            },
        },
    )
    async def bulk_register(body: BulkIn, request: Request, response: Response) -> BulkOut:
        """Register many devices; each gets its audit entry, event and one-time token.

        All or nothing: one invalid row (bad name or id, unknown field, an id twice, an id
        already registered) refuses the request with every bad row listed, unless
        ``continue_on_error``; then the valid rows are registered and the others are in ``errors``.
        """
        result = await register_many(
            context(request).devices,
            body.devices,
            continue_on_error=body.continue_on_error,
            dry_run=body.dry_run,
        )
        if result.dry_run:
            response.status_code = 200
        return BulkOut(
            data=[
                BulkRegistered(
                    row=done.row,
                    id=done.registration.device.id,
                    name=done.registration.device.name,
                    status=done.registration.device.status.value,
                    registration_token=done.registration.token,
                    token_expires_at=when(done.registration.expires_at),
                )
                for done in result.registered
            ],
            errors=[
                BulkRowError(row=error.row, id=error.device_id, code=error.code, message=error.message)
                for error in result.errors
            ],
            registered=len(result.registered),
            failed=len(result.errors),
            dry_run=result.dry_run,
        )

    return r
