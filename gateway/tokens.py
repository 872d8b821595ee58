"""Operator API tokens: create (the value shown once), list, revoke, and authenticate a request.

Receives names, scopes and an expiry from the API (`gateway.api.tokens`) or from
``gateway init`` (the first admin token); hands on records to the API, entries to the
audit trail (``token.created``, ``token.revoked``: the record, never the value or its
hash) and ``token.*`` log events. Rules on names, scopes and usability are in
`gateway.core.tokens`; storage, the last-admin guard and the cheap ``last_used_at``
in `gateway.store.tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.audit import Audit
from gateway.core import tokens
from gateway.core.clock import iso, utcnow
from gateway.core.records import ApiTokenRecord
from gateway.errors import InvalidValue
from gateway.logs import get_logger
from gateway.store.tokens import TokenStore

log = get_logger("gateway.tokens")


@dataclass(frozen=True, slots=True)
class NewToken:
    record: ApiTokenRecord
    value: str  # shown once, never stored, never logged


def snapshot(record: ApiTokenRecord) -> dict[str, object]:
    """What the audit trail keeps of a token: everything but the secret (the store has only its hash)."""
    return {
        "id": record.id,
        "name": record.name,
        "scopes": sorted(record.scopes),
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "revoked_at": iso(record.revoked_at),
    }


class ApiTokens:
    def __init__(self, store: TokenStore, audit: Audit) -> None:
        self._store = store
        self._audit = audit

    async def create(
        self, name: str, scopes: frozenset[str], *, expires_at: datetime | None = None
    ) -> NewToken:
        now = utcnow()
        name, scopes = tokens.parse_name(name), tokens.parse_scopes(scopes)
        if expires_at is not None and expires_at <= now:
            raise InvalidValue("expires_at must be in the future", code="invalid_expiry")
        value = tokens.new_token(tokens.API_PREFIX)
        record = await self._store.add(name, tokens.hash_token(value), scopes, now, expires_at)
        log.info("token.created", token_id=record.id, name=name, scopes=sorted(scopes))
        await self._audit.record("token.created", "token", name, after=snapshot(record))
        return NewToken(record, value)

    async def all(self) -> list[ApiTokenRecord]:
        return await self._store.all()

    async def revoke(self, ref: str, *, force: bool = False) -> ApiTokenRecord:
        """Revoke by id or name; the last usable admin token only with `force`."""
        before = await self._store.get(tokens.parse_ref(ref))
        after = await self._store.revoke(before.id, utcnow(), keep_an_admin=not force)
        log.info("token.revoked", token_id=after.id, name=after.name, forced=force)
        await self._audit.record(
            "token.revoked", "token", after.name, before=snapshot(before), after=snapshot(after), forced=force
        )
        return after

    async def authenticate(self, value: str) -> ApiTokenRecord | None:
        """The usable token with this value, or None (unknown, expired or revoked)."""
        return await self._store.find(tokens.hash_token(value), utcnow())
