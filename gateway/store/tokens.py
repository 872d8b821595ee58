"""Operator API tokens in the registry: only their SHA-256 is stored, never the value.

Receives names, hashes, scopes and times from `gateway.tokens`; hands back
`ApiTokenRecord` values. Tokens are never deleted, only revoked (the audit trail
names them), so a name stays taken for good. Two rules hold in SQL, so that they
hold for concurrent requests and for several gateway instances on one database:
``last_used_at`` is written at most once per `TOUCH_INTERVAL` per token (a
conditional UPDATE, not a write per request), and revoking the last usable admin
token is refused unless forced (one UPDATE whose condition checks the others).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Row, Table, exists, func, insert, literal, not_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.selectable import NamedFromClause

from gateway.core import tokens
from gateway.core.records import ApiTokenRecord
from gateway.errors import Conflict, NotFound
from gateway.store.models import ApiToken

api_tokens = cast(Table, ApiToken.__table__)

TOUCH_INTERVAL = timedelta(minutes=1)


def _is_admin(table: NamedFromClause) -> ColumnElement[bool]:
    """Scopes are stored sorted and space separated: match ``admin`` as a whole word."""
    return (literal(" ") + table.c.scopes + literal(" ")).like(f"% {tokens.ADMIN} %")


def _usable(table: NamedFromClause, now: datetime) -> ColumnElement[bool]:
    return table.c.revoked_at.is_(None) & or_(table.c.expires_at.is_(None), table.c.expires_at > now)


class TokenStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(
        self,
        name: str,
        token_hash: str,
        scopes: frozenset[str],
        now: datetime,
        expires_at: datetime | None = None,
    ) -> ApiTokenRecord:
        """A new token; `Conflict` (``token_name_taken``) when any token, revoked too, has the name."""
        taken = Conflict(
            f"a token named {name!r} exists (names are never reused; revoked tokens keep theirs)",
            code="token_name_taken",
        )
        try:
            async with self.engine.begin() as conn:
                # Checked here too: a database from before names were unique lacks the index.
                if (await conn.execute(select(api_tokens.c.id).where(api_tokens.c.name == name))).first():
                    raise taken
                row = (
                    await conn.execute(
                        insert(api_tokens)
                        .values(
                            name=name,
                            token_hash=token_hash,
                            scopes=" ".join(sorted(scopes)),
                            created_at=now,
                            expires_at=expires_at,
                        )
                        .returning(api_tokens)
                    )
                ).one()
        except IntegrityError as exc:
            raise taken from exc
        return _record(row)

    async def find(self, token_hash: str, now: datetime) -> ApiTokenRecord | None:
        """The usable token with this hash (not revoked, not expired), its use recorded.

        ``last_used_at`` is written only when it is older than `TOUCH_INTERVAL`: one read
        per request, a write at most once a minute per token.
        """
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(api_tokens).where(api_tokens.c.token_hash == token_hash))
            ).one_or_none()
        if row is None or tokens.state(row.expires_at, row.revoked_at, now) != "active":
            return None
        record = _record(row)
        if row.last_used_at is None or row.last_used_at <= now - TOUCH_INTERVAL:
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(api_tokens)
                    .where(
                        api_tokens.c.id == row.id,
                        or_(
                            api_tokens.c.last_used_at.is_(None),
                            api_tokens.c.last_used_at <= now - TOUCH_INTERVAL,
                        ),
                    )
                    .values(last_used_at=now)
                )
        return record

    async def all(self) -> list[ApiTokenRecord]:
        """Every token, revoked and expired ones included, oldest first."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(api_tokens).order_by(api_tokens.c.id))
            return [_record(row) for row in rows]

    async def get(self, ref: int | str) -> ApiTokenRecord:
        """By id (an int) or name (a str)."""
        column = api_tokens.c.id if isinstance(ref, int) else api_tokens.c.name
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(api_tokens).where(column == ref))).one_or_none()
        if row is None:
            raise NotFound(f"no API token {ref!r}", code="token_not_found")
        return _record(row)

    async def revoke(self, token_id: int, now: datetime, *, keep_an_admin: bool = True) -> ApiTokenRecord:
        """Revoke a token at once (the next request with it is refused).

        With `keep_an_admin`, refused (`Conflict`, ``last_admin_token``) when it is the last
        usable token with the admin scope: nobody could manage tokens any more.
        """
        condition: list[Any] = [api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None)]
        if keep_an_admin:
            other = api_tokens.alias("other")
            another_admin = exists().where(other.c.id != token_id, _usable(other, now), _is_admin(other))
            condition.append(or_(not_(_is_admin(api_tokens)), not_(_usable(api_tokens, now)), another_admin))
        async with self.engine.begin() as conn:
            result = await conn.execute(update(api_tokens).where(*condition).values(revoked_at=now))
            row = (await conn.execute(select(api_tokens).where(api_tokens.c.id == token_id))).one_or_none()
        if row is None:
            raise NotFound(f"no API token {token_id}", code="token_not_found")
        if result.rowcount == 1:
            return _record(row)
        if row.revoked_at is not None:
            raise Conflict(f"token {row.name!r} is already revoked", code="token_revoked")
        raise Conflict(
            f"token {row.name!r} is the last usable admin token: revoking it would lock every operator "
            "out of the API; create another admin token first, or force it",
            code="last_admin_token",
        )

    async def count(self) -> int:
        """Every token ever made (revoked ones too): zero means a fresh registry."""
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(api_tokens))).scalar_one())


def _record(row: Row[Any]) -> ApiTokenRecord:
    return ApiTokenRecord(
        id=int(row.id),
        name=row.name,
        scopes=frozenset(row.scopes.split()),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )
