"""The operator-managed fields of a device record, and the one place their rules live.

Receives raw values (from a PATCH body, a CLI flag, a query parameter) and hands back
normalised values or raises `InvalidValue`:

- ``description``: up to `DESCRIPTION_MAX` characters of text (newlines and tabs
  allowed, other control characters not); blank clears it (``None``);
- ``tags`` and ``location_ids``: labels of 1-`LABEL_MAX` printable characters,
  surrounding spaces dropped, at most `LABELS_MAX` per device; duplicates collapse and
  the result is sorted (the store keeps them as a set);
- ``metadata`` and ``settings``: JSON objects, nested at most `JSON_DEPTH_MAX` deep and
  at most `JSON_BYTES_MAX` bytes as compact UTF-8 JSON; numbers finite, integers within
  64 bits, text valid Unicode (no lone surrogates);
- ``profile_id``: a device profile's id (`gateway.core.catalog.RecordId`), or ``None``.

These are the rules of each value alone. The rules between a device's values and other
records (a profile's schema over ``settings``, ``location_ids`` naming sites, the profile
existing) are `DeviceService.update_details`' (`gateway.core.profiles`, `gateway.core.sites`).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from gateway.core.catalog import RecordId
from gateway.errors import InvalidValue

DESCRIPTION_MAX = 1000
LABEL_MAX = 64
LABELS_MAX = 50
JSON_DEPTH_MAX = 8  # the object itself is depth 1
JSON_BYTES_MAX = 16 * 1024
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_TEXT_CONTROLS_ALLOWED = frozenset("\n\r\t")

JsonObject = dict[str, Any]


def _is_control(ch: str) -> bool:
    """Control, format, surrogate and unassigned code points never belong in a label or text."""
    return unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn"}


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def parse_description(raw: object) -> str | None:
    """A description (stripped), or ``None`` for none/blank."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidValue("description must be text", code="invalid_description")
    text = raw.strip()
    if len(text) > DESCRIPTION_MAX or any(
        _is_control(ch) and ch not in _TEXT_CONTROLS_ALLOWED for ch in text
    ):
        raise InvalidValue(
            f"description must be at most {DESCRIPTION_MAX} characters without control characters",
            code="invalid_description",
        )
    return text or None


def parse_label(raw: object, what: str = "tag") -> str:
    """One tag or location id: 1-64 printable characters, surrounding spaces dropped."""
    text = raw.strip() if isinstance(raw, str) else ""
    if not text or len(text) > LABEL_MAX or any(_is_control(ch) for ch in text):
        raise InvalidValue(
            f"invalid {what} {raw!r}: 1-{LABEL_MAX} printable characters", code=f"invalid_{what}"
        )
    return text


def _labels(raw: object, what: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str | bytes) or not isinstance(raw, list | tuple):
        raise InvalidValue(f"{what}s must be a list of text", code=f"invalid_{what}")
    if len(raw) > LABELS_MAX:  # checked before the work, and again after de-duplication
        raise InvalidValue(f"at most {LABELS_MAX} {what}s per device", code=f"invalid_{what}")
    return tuple(sorted({parse_label(item, what) for item in raw}))


def parse_tags(raw: object) -> tuple[str, ...]:
    """A device's tags as a sorted tuple without duplicates; ``None`` is none."""
    return _labels(raw, "tag")


def parse_location_ids(raw: object) -> tuple[str, ...]:
    """A device's location ids as a sorted tuple without duplicates; ``None`` is none."""
    return _labels(raw, "location_id")


def parse_json_object(raw: object, what: str = "metadata") -> JsonObject:
    """A JSON object within the depth and size limits, copied; ``None`` is ``{}``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidValue(f"{what} must be a JSON object", code=f"invalid_{what}")
    copied = _json_value(raw, what, 1)
    serialized = dump_json(copied)
    if len(serialized.encode("utf-8")) > JSON_BYTES_MAX:
        raise InvalidValue(f"{what} is larger than {JSON_BYTES_MAX} bytes as JSON", code=f"invalid_{what}")
    result: JsonObject = copied
    return result


def _json_value(value: object, what: str, depth: int) -> Any:
    """A copy of `value` made of JSON types only. Recursion is bounded by `JSON_DEPTH_MAX`."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidValue(f"{what}: integers must fit in 64 bits", code=f"invalid_{what}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidValue(f"{what}: numbers must be finite", code=f"invalid_{what}")
        return value
    if isinstance(value, str):
        if _has_surrogate(value):
            raise InvalidValue(f"{what}: text must be valid Unicode", code=f"invalid_{what}")
        return value
    if isinstance(value, Mapping | list | tuple):
        if depth > JSON_DEPTH_MAX:
            raise InvalidValue(
                f"{what} is nested deeper than {JSON_DEPTH_MAX} levels", code=f"invalid_{what}"
            )
        if isinstance(value, Mapping):
            copied: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str) or _has_surrogate(key):
                    raise InvalidValue(f"{what}: keys must be text", code=f"invalid_{what}")
                copied[key] = _json_value(item, what, depth + 1)
            return copied
        return [_json_value(item, what, depth + 1) for item in value]
    raise InvalidValue(f"{what}: {type(value).__name__} is not a JSON value", code=f"invalid_{what}")


def parse_metadata(raw: object) -> JsonObject:
    """Free-form metadata: a JSON object within the limits."""
    return parse_json_object(raw, "metadata")


def parse_settings(raw: object) -> JsonObject:
    """Per-integration settings: a JSON object within the limits (its profile's schema aside)."""
    return parse_json_object(raw, "settings")


def parse_profile_id(raw: object) -> str | None:
    """The device's profile: a profile id, or ``None`` (blank too) for none."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise InvalidValue("profile_id must be a profile id or null", code="invalid_profile_id")
    return RecordId("profile", raw.strip()).value


def dump_json(value: JsonObject) -> str:
    """The stored form: compact JSON, Unicode kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# Field name -> parser: what PATCH may change besides name and status.
DETAIL_FIELDS: dict[str, Callable[[object], object]] = {
    "description": parse_description,
    "tags": parse_tags,
    "location_ids": parse_location_ids,
    "metadata": parse_metadata,
    "settings": parse_settings,
    "profile_id": parse_profile_id,
}


def parse_details(raw: Mapping[str, object]) -> dict[str, object]:
    """The detail fields present in `raw`, each through its parser; unknown fields are refused."""
    unknown = sorted(set(raw) - set(DETAIL_FIELDS))
    if unknown:
        raise InvalidValue(f"unknown device field(s): {', '.join(unknown)}", code="invalid_field")
    return {name: DETAIL_FIELDS[name](value) for name, value in raw.items()}
