"""Sites: the locations devices are placed in, as records of their own.

Receives a site's raw fields (a request body) and hands on a frozen `SiteSpec`, or raises
`InvalidValue` (`FieldRejected` with the field's name). The rules:

- ``name`` as every record's (`gateway.core.catalog`), ``description`` and ``metadata`` as a
  device's (`gateway.core.device_fields`); ``address`` is text of up to `ADDRESS_MAX`
  characters (newlines allowed);
- ``latitude`` (-90..90) and ``longitude`` (-180..180) are decimal degrees (WGS 84), both or
  neither;
- ``timezone`` is an IANA name (``Europe/Berlin``, ``UTC``) the time zone database knows;
  where the interpreter has no database at all, a name of that shape is taken.

How devices point to sites (the one place: `DeviceService.update_details`): a device's
``location_ids`` are site ids. Every id a write adds to a device must name an existing site
(422 ``unknown_site``); ids a device already had are kept as they are, so devices placed
before sites were records keep their locations. A site that devices point to is deleted
only with ``force``, which takes it out of those devices' ``location_ids`` (409
``site_in_use`` otherwise).
"""

from __future__ import annotations

import math
import re
import zoneinfo
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

from gateway.core import device_fields
from gateway.core.catalog import parse_name
from gateway.core.clock import iso
from gateway.errors import FieldRejected, InvalidValue

ADDRESS_MAX = 500
_ZONE_SHAPE = re.compile(r"^(?:UTC|[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+){0,2})$")


@cache
def _known_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def parse_timezone(raw: object) -> str | None:
    """An IANA time zone name, or None for none."""
    if raw is None or raw == "":
        return None
    name = raw.strip() if isinstance(raw, str) else ""
    known = _known_zones()
    if not _ZONE_SHAPE.fullmatch(name) or (known and name not in known and name != "UTC"):
        raise FieldRejected(
            f"{raw!r} is not an IANA time zone name (e.g. Europe/Berlin, UTC)",
            path="timezone",
            code="invalid_site",
        )
    return name


def _degrees(raw: object, what: str, limit: float) -> float | None:
    if raw is None:
        return None
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not math.isfinite(raw)
        or abs(raw) > limit
    ):
        raise FieldRejected(f"must be a number from -{limit:g} to {limit:g}", path=what, code="invalid_site")
    return float(raw)


def parse_address(raw: object) -> str | None:
    if raw is None:
        return None
    try:
        text = device_fields.parse_description(raw)
    except InvalidValue as exc:
        raise FieldRejected(
            "must be text without control characters", path="address", code="invalid_site"
        ) from exc
    if text is not None and len(text) > ADDRESS_MAX:
        raise FieldRejected(f"must be at most {ADDRESS_MAX} characters", path="address", code="invalid_site")
    return text


@dataclass(frozen=True, slots=True)
class SiteSpec:
    """What an operator declares about a site (everything but its id and times)."""

    name: str
    description: str | None = None
    address: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    timezone: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.latitude is None) != (self.longitude is None):
            raise FieldRejected(
                "latitude and longitude go together (both or neither)", path="latitude", code="invalid_site"
            )

    @classmethod
    def parse(cls, raw: dict[str, object]) -> SiteSpec:
        """A site from a body's fields (``name`` required, the others optional)."""
        return cls(
            name=parse_name(raw.get("name"), "site"),
            description=device_fields.parse_description(raw.get("description")),
            address=parse_address(raw.get("address")),
            latitude=_degrees(raw.get("latitude"), "latitude", 90),
            longitude=_degrees(raw.get("longitude"), "longitude", 180),
            timezone=parse_timezone(raw.get("timezone")),
            metadata=device_fields.parse_metadata(raw.get("metadata")),
        )


@dataclass(frozen=True, slots=True)
class SiteRecord:
    id: str
    spec: SiteSpec
    created_at: datetime
    updated_at: datetime
    device_count: int = 0  # devices whose location_ids name the site

    def as_json(self) -> dict[str, Any]:
        """The site as the API shows it (and the audit trail keeps it, count aside)."""
        spec = self.spec
        return {
            "id": self.id,
            "name": spec.name,
            "description": spec.description,
            "address": spec.address,
            "latitude": spec.latitude,
            "longitude": spec.longitude,
            "timezone": spec.timezone,
            "metadata": spec.metadata,
            "device_count": self.device_count,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


def added_locations(before: tuple[str, ...], after: tuple[str, ...]) -> list[str]:
    """The location ids a write adds to a device: those that must name sites."""
    return sorted(set(after) - set(before))
