"""Bearer secrets (registration and API tokens) and API scopes.

Tokens are 256-bit random values with a readable prefix; only their SHA-256 is
stored (a fast hash is right here: the input is random, not a password). Scope
rules live in `allows`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

REGISTRATION_PREFIX = "grt_"
API_PREFIX = "gat_"

READ = "devices:read"
WRITE = "devices:write"
ADMIN = "admin"
ALL_SCOPES = frozenset({READ, WRITE, ADMIN})
# A scope grants itself and everything listed here.
_IMPLIES = {ADMIN: frozenset({READ, WRITE, ADMIN}), WRITE: frozenset({READ, WRITE}), READ: frozenset({READ})}


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


def allows(granted: frozenset[str], required: str) -> bool:
    """Does a token with `granted` scopes allow an action that needs `required`?"""
    return any(required in _IMPLIES.get(scope, frozenset()) for scope in granted)
