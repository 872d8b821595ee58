"""The settings schema of a device profile: a tiny language, and the one check of settings against it.

Receives a profile's ``settings_schema`` (any JSON value: a request body) and a device's
``settings`` (a JSON object already within `gateway.core.device_fields`' limits); hands on a
frozen `SettingsSchema`, and either silence or a `FieldRejected` naming the first field at
fault (``settings.interval_s``). Nothing else is raised, whatever the input.

A schema is a JSON object: field name (``^[A-Za-z_][A-Za-z0-9_]{0,63}$``) -> spec, at most
`FIELDS_MAX` of them. A spec is an object with:

- ``type``: ``string`` | ``number`` | ``integer`` | ``boolean`` (the only required key);
- ``required``: ``true`` when the field must be present (default ``false``);
- ``enum``: 1-`ENUM_MAX` distinct values of the type, the only ones allowed;
- ``min``, ``max``: finite numbers, ``min <= max`` (``number`` and ``integer`` only);
- ``max_length``: characters, 0-`device_fields.JSON_BYTES_MAX` (``string`` only);
- ``description``: text for people (up to 1,000 characters), ignored by the check.

Settings conform when every key names a field of the schema (no others: a misspelt key is
refused, not kept), every required field is present, and every value has its field's type
(JSON types taken strictly: ``true`` is never a number, ``5.0`` is not an integer, ``null``
is not a value), lies within ``min``..``max``, is at most ``max_length`` characters long and
is one of ``enum``. Fields are flat: no value is an object or a list.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from gateway.core import device_fields
from gateway.errors import FieldRejected, InvalidValue

FieldType = Literal["string", "number", "integer", "boolean"]
Scalar = str | int | float | bool

FIELD_TYPES: tuple[FieldType, ...] = ("string", "number", "integer", "boolean")
FIELDS_MAX = 100
ENUM_MAX = 100
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
SPEC_KEYS = frozenset({"type", "required", "enum", "min", "max", "max_length", "description"})
_SCHEMA_CODE = "invalid_settings_schema"
_SETTINGS_CODE = "invalid_settings"


def _has_type(value: object, kind: FieldType) -> bool:
    """The one table of JSON types: booleans are never numbers, integers are numbers."""
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if kind == "string":
        return isinstance(value, str)
    return False


def _bound(raw: object, where: str) -> int | float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise FieldRejected("must be a finite number", path=where, code=_SCHEMA_CODE)
    return raw


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of a schema; consistent by construction (bounds only on numbers, and so on)."""

    type: FieldType
    required: bool = False
    enum: tuple[Scalar, ...] | None = None
    min: int | float | None = None
    max: int | float | None = None
    max_length: int | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if self.type not in FIELD_TYPES:
            raise InvalidValue(f"type must be one of {', '.join(FIELD_TYPES)}", code=_SCHEMA_CODE)
        numeric = self.type in ("number", "integer")
        if (self.min is not None or self.max is not None) and not numeric:
            raise InvalidValue("min and max apply to number and integer fields only", code=_SCHEMA_CODE)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise InvalidValue("min must not exceed max", code=_SCHEMA_CODE)
        if self.max_length is not None and self.type != "string":
            raise InvalidValue("max_length applies to string fields only", code=_SCHEMA_CODE)
        if self.enum is not None:
            if not 1 <= len(self.enum) <= ENUM_MAX:
                raise InvalidValue(f"enum must list 1-{ENUM_MAX} values", code=_SCHEMA_CODE)
            for value in self.enum:
                problem = self._problem(value, with_enum=False)
                if problem is not None:
                    raise InvalidValue(f"enum value {value!r} {problem}", code=_SCHEMA_CODE)
            if len(set(self.enum)) != len(self.enum):
                raise InvalidValue("enum values must be distinct", code=_SCHEMA_CODE)

    def problem(self, value: object) -> str | None:
        """What is wrong with `value` for this field, or None when it fits."""
        return self._problem(value, with_enum=True)

    def _problem(self, value: object, *, with_enum: bool) -> str | None:
        if not _has_type(value, self.type):
            return f"must be {'an' if self.type == 'integer' else 'a'} {self.type}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.min is not None and value < self.min:
                return f"must be at least {self.min}"
            if self.max is not None and value > self.max:
                return f"must be at most {self.max}"
        if isinstance(value, str) and self.max_length is not None and len(value) > self.max_length:
            return f"must be at most {self.max_length} characters"
        if with_enum and self.enum is not None and not any(_same(value, item) for item in self.enum):
            return f"must be one of {', '.join(repr(item) for item in self.enum)}"
        return None

    def as_json(self) -> dict[str, Any]:
        """The spec as given: ``type`` and the keys that are set."""
        out: dict[str, Any] = {"type": self.type}
        if self.required:
            out["required"] = True
        for key in ("enum", "min", "max", "max_length", "description"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "enum" else value
        return out


def _same(value: object, item: Scalar) -> bool:
    """Equal as JSON values (``1 == 1.0``, but never ``true == 1``)."""
    return isinstance(value, bool) == isinstance(item, bool) and value == item


def _spec(raw: object, where: str) -> FieldSpec:
    if not isinstance(raw, Mapping):
        raise FieldRejected("must be an object with a type", path=where, code=_SCHEMA_CODE)
    unknown = sorted(str(key) for key in raw if key not in SPEC_KEYS)
    if unknown:
        raise FieldRejected(
            f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SPEC_KEYS))}",
            path=where,
            code=_SCHEMA_CODE,
        )
    kind = raw.get("type")
    if kind not in FIELD_TYPES:
        raise FieldRejected(
            f"must be one of {', '.join(FIELD_TYPES)}", path=f"{where}.type", code=_SCHEMA_CODE
        )
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise FieldRejected("must be true or false", path=f"{where}.required", code=_SCHEMA_CODE)
    enum = raw.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise FieldRejected("must be a list of values", path=f"{where}.enum", code=_SCHEMA_CODE)
    max_length = raw.get("max_length")
    if max_length is not None and (
        isinstance(max_length, bool)
        or not isinstance(max_length, int)
        or not 0 <= max_length <= device_fields.JSON_BYTES_MAX
    ):
        raise FieldRejected(
            f"must be an integer from 0 to {device_fields.JSON_BYTES_MAX}",
            path=f"{where}.max_length",
            code=_SCHEMA_CODE,
        )
    try:
        description = device_fields.parse_description(raw.get("description"))
    except InvalidValue as exc:
        raise FieldRejected(exc.message, path=f"{where}.description", code=_SCHEMA_CODE) from exc
    try:
        return FieldSpec(
            type=cast(FieldType, kind),
            required=required,
            enum=None if enum is None else tuple(enum),
            min=_bound(raw.get("min"), f"{where}.min"),
            max=_bound(raw.get("max"), f"{where}.max"),
            max_length=max_length,
            description=description,
        )
    except FieldRejected:
        raise
    except InvalidValue as exc:  # the spec's own consistency (bounds on a string, min > max, ...)
        raise FieldRejected(exc.message, path=where, code=_SCHEMA_CODE) from exc


@dataclass(frozen=True, slots=True)
class SettingsSchema:
    """Field name -> spec; never mutated after construction."""

    fields: dict[str, FieldSpec] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: object, where: str = "settings_schema") -> SettingsSchema:
        """A schema from its JSON form; `FieldRejected` names the first problem's place."""
        if not isinstance(raw, Mapping):
            raise FieldRejected("must be an object: field name -> spec", path=where, code=_SCHEMA_CODE)
        if len(raw) > FIELDS_MAX:
            raise FieldRejected(f"at most {FIELDS_MAX} fields", path=where, code=_SCHEMA_CODE)
        fields: dict[str, FieldSpec] = {}
        for name in sorted(raw, key=str):
            if not isinstance(name, str) or not FIELD_NAME.fullmatch(name):
                raise FieldRejected(
                    f"field name {name!r}: 1-64 of A-Z a-z 0-9 _, not starting with a digit",
                    path=where,
                    code=_SCHEMA_CODE,
                )
            fields[name] = _spec(raw[name], f"{where}.{name}")
        return cls(fields)

    def problems(self, settings: Mapping[str, object]) -> list[tuple[str, str]]:
        """Every (path, problem) of `settings`, by field name; empty when they conform."""
        found: list[tuple[str, str]] = []
        for name in sorted(set(settings) | set(self.fields)):
            spec = self.fields.get(name)
            if spec is None:
                found.append((f"settings.{name}", "is not a field of the device's profile"))
            elif name not in settings:
                if spec.required:
                    found.append((f"settings.{name}", "is required by the device's profile"))
            else:
                problem = spec.problem(settings[name])
                if problem is not None:
                    found.append((f"settings.{name}", problem))
        return found

    def check(self, settings: Mapping[str, object]) -> None:
        """Silence when `settings` conform; `FieldRejected` (``invalid_settings``) for the first field not."""
        problems = self.problems(settings)
        if problems:
            path, problem = problems[0]
            raise FieldRejected(problem, path=path, code=_SETTINGS_CODE)

    def as_json(self) -> dict[str, Any]:
        return {name: spec.as_json() for name, spec in self.fields.items()}
