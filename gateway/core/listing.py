"""The device listing's order and cursor: which fields sort, and how a page says where it ended.

Receives the raw ``sort`` parameter and ``cursor`` strings from the API or CLI; hands on
sort keys (``"-last_seen_at"``: a field, ``-`` for descending) and `Cursor` values the
store turns into keyset conditions. The order rules, stated once:

- every order ends with ``id`` ascending, so rows never tie and pages never overlap;
- empty values (``NULL``) sort last whichever the direction, on every database;
- ``name`` sorts without regard to case.

A cursor carries the sort it was made for and the last row's values of those keys; a
cursor made for another sort is refused. Cursors are opaque to clients (base64url JSON).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from gateway.core.clock import as_utc
from gateway.errors import InvalidValue


class Kind(Enum):
    TEXT = "text"
    TIME = "time"
    BOOL = "bool"


# Sortable field -> (kind, may be empty).
SORT_FIELDS: dict[str, tuple[Kind, bool]] = {
    "id": (Kind.TEXT, False),
    "name": (Kind.TEXT, False),
    "status": (Kind.TEXT, False),
    "connection": (Kind.TEXT, False),
    "blocked": (Kind.BOOL, False),
    "blocked_at": (Kind.TIME, True),
    "created_at": (Kind.TIME, False),
    "updated_at": (Kind.TIME, False),
    "last_connected_at": (Kind.TIME, True),
    "last_disconnected_at": (Kind.TIME, True),
    "last_seen_at": (Kind.TIME, True),
    "last_data_at": (Kind.TIME, True),
    "manufacturer": (Kind.TEXT, True),
    "model": (Kind.TEXT, True),
    "application": (Kind.TEXT, True),
    "application_version": (Kind.TEXT, True),
    "os": (Kind.TEXT, True),
    "os_version": (Kind.TEXT, True),
    "firmware_version": (Kind.TEXT, True),
}
DEFAULT_SORT = ("created_at",)
MAX_SORT_KEYS = 5

CursorValue = str | bool | datetime | None


def field_of(key: str) -> str:
    return key.removeprefix("-")


def descending(key: str) -> bool:
    return key.startswith("-")


def parse_sort(raw: str | None) -> tuple[str, ...]:
    """``"-last_seen_at,name"`` as sort keys; blank is the default (oldest first)."""
    if raw is None or not raw.strip():
        return DEFAULT_SORT
    keys = tuple(part.strip() for part in raw.split(",") if part.strip())
    bad = [key for key in keys if field_of(key) not in SORT_FIELDS]
    if bad:
        raise InvalidValue(
            f"cannot sort by {', '.join(bad)}; sortable: {', '.join(sorted(SORT_FIELDS))}",
            code="invalid_sort",
        )
    fields = [field_of(key) for key in keys]
    if len(set(fields)) != len(fields) or len(keys) > MAX_SORT_KEYS:
        raise InvalidValue(f"sort by at most {MAX_SORT_KEYS} distinct fields, each once", code="invalid_sort")
    return keys


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: its sort, the last row's values of the sort keys, and its id."""

    sort: tuple[str, ...]
    values: tuple[CursorValue, ...]
    last_id: str

    def __post_init__(self) -> None:
        if len(self.values) != len(self.sort):
            raise InvalidValue("cursor values do not match its sort", code="invalid_cursor")

    def encode(self) -> str:
        body = {
            "s": list(self.sort),
            "v": [value.isoformat() if isinstance(value, datetime) else value for value in self.values],
            "id": self.last_id,
        }
        raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str, sort: tuple[str, ...]) -> Cursor:
        """The cursor `text` for a listing in `sort` order; `InvalidValue` for anything else."""
        try:
            padded = text.encode("ascii") + b"=" * (-len(text) % 4)
            body = json.loads(base64.urlsafe_b64decode(padded))
        except (ValueError, UnicodeError, binascii.Error, RecursionError) as exc:
            raise _bad_cursor() from exc
        if not isinstance(body, dict) or set(body) != {"s", "v", "id"}:
            raise _bad_cursor()
        if body["s"] != list(sort):
            raise InvalidValue(
                "this cursor was made for another sort; pass the same sort as the first page",
                code="invalid_cursor",
            )
        values, last_id = body["v"], body["id"]
        if not isinstance(values, list) or len(values) != len(sort) or not isinstance(last_id, str):
            raise _bad_cursor()
        return cls(sort, tuple(_value(key, value) for key, value in zip(sort, values, strict=True)), last_id)


def _value(key: str, raw: object) -> CursorValue:
    kind, nullable = SORT_FIELDS[field_of(key)]
    if raw is None and nullable:
        return None
    if kind is Kind.BOOL and isinstance(raw, bool):
        return raw
    if kind is Kind.TEXT and isinstance(raw, str):
        return raw
    if kind is Kind.TIME and isinstance(raw, str):
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError as exc:
            raise _bad_cursor() from exc
        if moment.tzinfo is not None:
            try:
                return as_utc(moment)
            except InvalidValue as exc:
                raise _bad_cursor() from exc
    raise _bad_cursor()


def _bad_cursor() -> InvalidValue:
    return InvalidValue("invalid cursor; pass `next` from the previous page", code="invalid_cursor")
