"""Device groups: static ones list their members, dynamic ones save a device filter.

Receives a group's raw fields (a request body) and hands on a frozen `GroupSpec`, or
raises `InvalidValue` (`FieldRejected` for a place in the filter). The rules:

- ``kind`` is ``static`` (explicit members, added and removed one by one, never more than
  `MEMBERS_PER_REQUEST` per request) or ``dynamic`` (a saved ``filter``); it never changes;
- a dynamic group's ``filter`` is an object with the device listing's filters
  (`FILTER_KEYS`: ``search``, ``blocked``, ``status``, ``connection``, ``tags``,
  ``location_ids``, ``application``, ``manufacturer``, ``model``), each with the meaning and
  the values ``GET /devices`` gives it (``tags`` and ``location_ids``: all of them present).
  ``{}`` matches every device. The time-relative filters (certificate expiry, last seen) are
  not saved: a group's meaning does not drift with the clock;
- its members are the devices the filter matches when asked; ``GET /devices?group=`` ANDs the
  saved filter with the request's own (a filter both name must hold both ways: ``status``
  ``active`` saved and ``inactive`` asked matches nothing);
- a static group has no filter; its members must exist when added, and leave when deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from enum import Enum
from typing import Any

from gateway.core import device_fields
from gateway.core.catalog import parse_name
from gateway.core.clock import iso
from gateway.core.lifecycle import DeviceStatus
from gateway.core.presence import Connection
from gateway.core.records import DeviceQuery
from gateway.errors import FieldRejected, InvalidValue

MEMBERS_PER_REQUEST = 1000
TEXT_MAX = 200  # search and the identification filters, as in the listing's query parameters
BLOCKED = ("all", "hide", "only")


class GroupKind(Enum):
    STATIC = "static"
    DYNAMIC = "dynamic"


@dataclass(frozen=True, slots=True)
class GroupFilter:
    """The saved filters of a dynamic group (the device listing's, time-relative ones aside)."""

    search: str | None = None
    blocked: str = "all"
    status: DeviceStatus | None = None
    connection: Connection | None = None
    tags: tuple[str, ...] = ()
    location_ids: tuple[str, ...] = ()
    application: str | None = None
    manufacturer: str | None = None
    model: str | None = None

    @classmethod
    def parse(cls, raw: object) -> GroupFilter:
        """A filter from its JSON form; `FieldRejected` names the first key at fault."""
        if not isinstance(raw, Mapping):
            raise FieldRejected("must be an object of device filters", path="filter", code="invalid_filter")
        unknown = sorted(str(key) for key in raw if key not in FILTER_KEYS)
        if unknown:
            raise FieldRejected(
                f"unknown filter(s) {', '.join(unknown)}; known: {', '.join(FILTER_KEYS)}",
                path="filter",
                code="invalid_filter",
            )
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None:
                continue
            try:
                values[key] = _PARSERS[key](value)
            except InvalidValue as exc:
                raise FieldRejected(exc.message, path=f"filter.{key}", code="invalid_filter") from exc
        return cls(**values)

    def as_json(self) -> dict[str, Any]:
        """The filters that are set (``blocked`` only when not ``all``), as the API shows them."""
        out: dict[str, Any] = {}
        for name in FILTER_KEYS:
            value = getattr(self, name)
            if value is None or value == () or (name == "blocked" and value == "all"):
                continue
            out[name] = (
                value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value
            )
        return out

    def query(self) -> DeviceQuery:
        """The saved filters as a device query (its order and page unused)."""
        return DeviceQuery(**{name: getattr(self, name) for name in FILTER_KEYS})


def _text(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip() or len(raw) > TEXT_MAX:
        raise InvalidValue(f"must be 1-{TEXT_MAX} characters of text", code="invalid_filter")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800") is not text
        raise InvalidValue("must be valid Unicode", code="invalid_filter") from exc
    return raw


def _choice(choices: tuple[str, ...]) -> Any:
    def parse(raw: object) -> str:
        if raw not in choices:
            raise InvalidValue(f"must be one of {', '.join(choices)}", code="invalid_filter")
        return str(raw)

    return parse


_PARSERS: dict[str, Any] = {
    "search": _text,
    "blocked": _choice(BLOCKED),
    "status": lambda raw: DeviceStatus(_choice(tuple(s.value for s in DeviceStatus))(raw)),
    "connection": lambda raw: Connection(_choice(tuple(c.value for c in Connection))(raw)),
    "tags": device_fields.parse_tags,
    "location_ids": device_fields.parse_location_ids,
    "application": _text,
    "manufacturer": _text,
    "model": _text,
}
FILTER_KEYS = tuple(f.name for f in fields(GroupFilter))


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """What an operator declares about a group (everything but its id, members and times)."""

    name: str
    description: str | None
    kind: GroupKind
    filter: GroupFilter | None  # dynamic groups only

    def __post_init__(self) -> None:
        if (self.kind is GroupKind.DYNAMIC) != (self.filter is not None):
            raise FieldRejected(
                "a dynamic group needs a filter ({} for every device); a static group has none",
                path="filter",
                code="invalid_filter",
            )

    @classmethod
    def parse(cls, *, name: object, description: object, kind: object, filter: object) -> GroupSpec:
        try:
            chosen = GroupKind(kind)
        except ValueError as exc:
            raise FieldRejected("must be static or dynamic", path="kind", code="invalid_kind") from exc
        return cls(
            name=parse_name(name, "group"),
            description=device_fields.parse_description(description),
            kind=chosen,
            filter=None if filter is None else GroupFilter.parse(filter),
        )


@dataclass(frozen=True, slots=True)
class GroupRecord:
    id: str
    spec: GroupSpec
    created_at: datetime
    updated_at: datetime
    member_count: int = 0  # static: members; dynamic: the devices the filter matches now

    def as_json(self) -> dict[str, Any]:
        """The group as the API shows it (and the audit trail keeps it, count aside)."""
        return {
            "id": self.id,
            "name": self.spec.name,
            "description": self.spec.description,
            "kind": self.spec.kind.value,
            "filter": None if self.spec.filter is None else self.spec.filter.as_json(),
            "member_count": self.member_count,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }
