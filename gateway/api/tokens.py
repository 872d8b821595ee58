"""``/api/v1/tokens``: operator API tokens (admin). The value is in the creation response only.

Receives JSON bodies and the caller's token (``request.state.token_id``, set by
`gateway.api.auth`); hands requests to `gateway.tokens.ApiTokens`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.api.auth import ADMIN, context
from gateway.api.schemas import RequestBody
from gateway.core import tokens
from gateway.core.clock import as_utc, iso, parse_duration, utcnow
from gateway.core.records import ApiTokenRecord
from gateway.errors import InvalidValue


class TokenIn(RequestBody):
    name: str = Field(
        min_length=1, max_length=64, description="unique for good; A-Z a-z 0-9 . _ -, starting with a letter"
    )
    scopes: list[str] = Field(min_length=1, description="devices:read, devices:write and/or admin")
    expires_in: str | None = Field(default=None, description="e.g. 30d, 12h; or give expires_at")
    expires_at: datetime | None = Field(default=None, description="ISO 8601; or give expires_in")


class TokenOut(BaseModel):
    id: int
    name: str
    scopes: list[str]
    state: Literal["active", "expired", "revoked"]
    created_at: str
    expires_at: str | None
    last_used_at: str | None = Field(description="to the minute: written at most once a minute")
    revoked_at: str | None
    current: bool = Field(description="the token of this request")


class TokenEnvelope(BaseModel):
    data: TokenOut


class TokenCreated(BaseModel):
    data: TokenOut
    token: str = Field(description="the bearer token: shown here once, stored only as a hash")


class TokenList(BaseModel):
    data: list[TokenOut]
    total: int


def token_out(record: ApiTokenRecord, request: Request) -> TokenOut:
    return TokenOut(
        id=record.id,
        name=record.name,
        scopes=sorted(record.scopes),
        state=tokens.state(record.expires_at, record.revoked_at, utcnow()),
        created_at=iso(record.created_at) or "",
        expires_at=iso(record.expires_at),
        last_used_at=iso(record.last_used_at),
        revoked_at=iso(record.revoked_at),
        current=record.id == getattr(request.state, "token_id", None),
    )


def _expiry(body: TokenIn) -> datetime | None:
    if body.expires_in is not None and body.expires_at is not None:
        raise InvalidValue("give expires_in or expires_at, not both", code="invalid_expiry")
    if body.expires_in is not None:
        return utcnow() + parse_duration(body.expires_in)
    return as_utc(body.expires_at)


def build_router() -> APIRouter:
    r = APIRouter(tags=["tokens"], dependencies=[ADMIN])

    @r.post("/tokens", response_model=TokenCreated, status_code=201)
    async def create(body: TokenIn, request: Request) -> TokenCreated:
        """Create a token with the given scopes and an optional expiry; its value is shown only here."""
        created = await context(request).tokens.create(
            body.name, frozenset(body.scopes), expires_at=_expiry(body)
        )
        return TokenCreated(data=token_out(created.record, request), token=created.value)

    @r.get("/tokens", response_model=TokenList)
    async def list_tokens(request: Request) -> TokenList:
        """Every token, revoked and expired ones included (never their values), oldest first."""
        found = await context(request).tokens.all()
        return TokenList(data=[token_out(t, request) for t in found], total=len(found))

    @r.delete("/tokens/{ref}", response_model=TokenEnvelope)
    async def revoke(
        ref: str,
        request: Request,
        force: Annotated[
            bool, Query(description="also revoke the last usable admin token (locks operators out)")
        ] = False,
    ) -> TokenEnvelope:
        """Revoke a token by id or name, at once. The caller's own token may be revoked;
        the last usable admin token only with ``force=true`` (409 ``last_admin_token`` otherwise)."""
        record = await context(request).tokens.revoke(ref, force=force)
        return TokenEnvelope(data=token_out(record, request))

    return r
