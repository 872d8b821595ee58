"""Time as values: UTC only, ISO 8601 with a ``Z`` on the wire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.errors import InvalidValue


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """An aware UTC datetime; a naive one (from a query string without a zone) is taken as UTC.

    `InvalidValue` for a moment that has no UTC date (0001-01-01T00:00+01:00, 9999-12-31T23:00-02:00).
    """
    if moment is None:
        return None
    try:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError as exc:
        raise InvalidValue(f"time {moment.isoformat()} is out of range in UTC", code="invalid_time") from exc


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC with ``Z``; ``None`` stays ``None``. Naive datetimes are taken as UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h``, ``7d``, ``2w`` (a number and one unit) as a timedelta."""
    raw = text.strip().lower() if isinstance(text, str) else ""
    number, unit = raw[:-1], raw[-1:] if raw else ""
    try:
        amount = float(number)
    except ValueError as exc:
        raise InvalidValue(
            f"invalid duration {text!r}: use e.g. 30m, 1h, 7d", code="invalid_duration"
        ) from exc
    if unit not in _UNITS or not 0 < amount <= 10 * 365 * 86400 / _UNITS[unit]:
        raise InvalidValue(f"invalid duration {text!r}: use e.g. 30m, 1h, 7d", code="invalid_duration")
    return timedelta(seconds=amount * _UNITS[unit])
