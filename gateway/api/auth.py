"""What every route needs: the services (`ApiContext`, on ``app.state``) and bearer-token scopes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.audit import set_actor
from gateway.core import tokens
from gateway.core.clock import utcnow
from gateway.devices import DeviceService
from gateway.errors import Forbidden, Unauthorized
from gateway.pki import Pki
from gateway.store import Store
from gateway.store.audit import AuditStore
from gateway.store.data import DeviceData


@dataclass(frozen=True)
class ApiContext:
    devices: DeviceService
    store: Store
    pki: Pki
    data: DeviceData
    audit: AuditStore
    session_count: Callable[[], int]


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


_bearer = HTTPBearer(auto_error=False, description="an API token (gateway init prints the admin token)")


def require(scope: str) -> Any:
    """A dependency that admits a request whose bearer token grants `scope`."""

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if credentials is None or not credentials.credentials:
            raise Unauthorized("missing bearer token", code="unauthorized")
        token = await context(request).store.find_api_token(
            tokens.hash_token(credentials.credentials), utcnow()
        )
        if token is None:
            raise Unauthorized("invalid, expired or revoked token", code="unauthorized")
        if not tokens.allows(token.scopes, scope):
            raise Forbidden(f"this token lacks the {scope!r} scope", code="forbidden")
        request.state.token_name = token.name
        set_actor(f"token:{token.name}")  # for the audit trail and the request's logs

    return Depends(check)


READ, WRITE, ADMIN = require(tokens.READ), require(tokens.WRITE), require(tokens.ADMIN)
