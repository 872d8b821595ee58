"""What every route needs: the services (`ApiContext`, on ``app.state``) and bearer-token scopes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.audit import Audit, set_actor
from gateway.core import tokens
from gateway.core.ratelimit import Rate, RateLimiter
from gateway.devices import DeviceService
from gateway.errors import Forbidden, Unauthorized
from gateway.failures import ConnectFailures
from gateway.groups import GroupService
from gateway.history import ConnectionHistory
from gateway.pki import Pki
from gateway.profiles import ProfileService
from gateway.sites import SiteService
from gateway.store import Store
from gateway.store.audit import AuditStore
from gateway.store.data import DeviceData
from gateway.tokens import ApiTokens


@dataclass(frozen=True)
class ApiContext:
    devices: DeviceService
    store: Store
    pki: Pki
    data: DeviceData
    audit: AuditStore
    session_count: Callable[[], int]
    # Built by the composition root; None in a context made for other routes (they answer 404).
    history: ConnectionHistory | None = None
    failures: ConnectFailures | None = None
    provisioning_rate: Rate | None = None  # POST /devices/provision per source address; None: unlimited

    @cached_property
    def provisioning_limit(self) -> RateLimiter | None:
        return None if self.provisioning_rate is None else RateLimiter(self.provisioning_rate)

    @cached_property
    def tokens(self) -> ApiTokens:
        """Built from the store and the audit trail, once, so that every context has it."""
        return ApiTokens(self.store.tokens, Audit(self.audit))

    @cached_property
    def groups(self) -> GroupService:
        """Device groups (built like `tokens`); members are listed through `devices`."""
        return GroupService(self.store.groups, self.devices, Audit(self.audit))

    @cached_property
    def sites(self) -> SiteService:
        return SiteService(self.store.sites, Audit(self.audit))

    @cached_property
    def profiles(self) -> ProfileService:
        return ProfileService(self.store.profiles, Audit(self.audit))


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
        token = await context(request).tokens.authenticate(credentials.credentials)
        if token is None:
            raise Unauthorized("invalid, expired or revoked token", code="unauthorized")
        if not tokens.allows(token.scopes, scope):
            raise Forbidden(f"this token lacks the {scope!r} scope", code="forbidden")
        request.state.token_id, request.state.token_name = token.id, token.name
        set_actor(f"token:{token.name}")  # for the audit trail and the request's logs

    return Depends(check)


READ, WRITE, ADMIN = require(tokens.READ), require(tokens.WRITE), require(tokens.ADMIN)
