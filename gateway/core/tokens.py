"""Bearer secrets (registration and API tokens), API scopes and the rules for API tokens.

Tokens are 256-bit random values with a readable prefix; only their SHA-256 is
stored (a fast hash is right here: the input is random, not a password). Scope
rules live in `allows`; what a token name may be, in `parse_name`; which scopes
exist, in `parse_scopes`; whether a token is usable, in `state`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import Literal

from gateway.errors import InvalidValue

REGISTRATION_PREFIX = "grt_"
API_PREFIX = "gat_"

READ = "devices:read"
WRITE = "devices:write"
ADMIN = "admin"
ALL_SCOPES = frozenset({READ, WRITE, ADMIN})
# A scope grants itself and everything listed here.
_IMPLIES = {ADMIN: frozenset({READ, WRITE, ADMIN}), WRITE: frozenset({READ, WRITE}), READ: frozenset({READ})}

# A name starts with a letter, so that an all-digit reference is always a token id. Names
# appear in the audit trail and the logs as ``token:<name>``: no spaces, no colons.
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")

TokenState = Literal["active", "expired", "revoked"]


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


def allows(granted: frozenset[str], required: str) -> bool:
    """Does a token with `granted` scopes allow an action that needs `required`?"""
    return any(required in _IMPLIES.get(scope, frozenset()) for scope in granted)


def parse_name(raw: object) -> str:
    """An API token's name: 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter."""
    if not isinstance(raw, str) or not _NAME.fullmatch(raw):
        raise InvalidValue(
            f"invalid token name {raw!r}: 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter",
            code="invalid_token_name",
        )
    return raw


def parse_scopes(raw: Iterable[object]) -> frozenset[str]:
    """At least one known scope; duplicates collapse."""
    scopes = frozenset(raw)
    unknown = sorted(str(scope) for scope in scopes - ALL_SCOPES)
    if unknown or not scopes:
        raise InvalidValue(
            f"invalid scope(s) {', '.join(unknown) or '(none)'}: give one or more of "
            f"{', '.join(sorted(ALL_SCOPES))}",
            code="invalid_scope",
        )
    return frozenset(str(scope) for scope in scopes)


def parse_ref(raw: str) -> int | str:
    """A token reference as typed: ASCII digits are an id, anything else a name.

    ASCII only: ``str.isdigit`` also holds for ``"²"``, which ``int`` refuses.
    """
    text = raw.strip()
    return int(text) if text.isascii() and text.isdigit() else parse_name(text)


def state(expires_at: datetime | None, revoked_at: datetime | None, now: datetime) -> TokenState:
    """Revocation is final and wins over expiry; a token is usable only while ``active``."""
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"
