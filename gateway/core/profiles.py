"""Device profiles: what a kind of device is expected to announce, and which settings it takes.

Receives a profile's raw fields (a request body) and hands on a frozen `ProfileSpec`, or
raises `InvalidValue` (`FieldRejected` where a place in the body is at fault):

- ``components``: the components and sensors a device of this profile is expected to
  announce, in the very shape devices announce them (DESIGN.md §7,
  ``[{"id", "profile"?, "sensors": [{"name", "value_type", "unit"?}]}]``), read by the
  same parser (`gateway.core.payloads`); ``[]`` expects nothing;
- ``settings_schema``: `gateway.core.settings_schema`, or ``null`` for settings unchecked;
- ``writable``: the schema fields operators may change on a device that has the profile.
  Omitted, every field is writable; given, each must be a field of the schema. The others
  are fixed once the profile is assigned: they are set in the PATCH that assigns it (or
  while no profile is assigned), and later PATCHes must leave them as they are.

The rules over a device, stated once: `check_settings` (its settings against the profile,
on every write of settings or profile_id) and `conformance` (the components it announced
against those expected).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.core import device_fields, payloads
from gateway.core.catalog import parse_name
from gateway.core.clock import iso
from gateway.core.records import ComponentRecord
from gateway.core.settings_schema import SettingsSchema
from gateway.errors import FieldRejected, InvalidValue

_PARSED_AT = datetime(2000, 1, 1, tzinfo=UTC)  # components carry no times; the parser wants one


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """What an operator declares about a profile (everything but its id and times)."""

    name: str
    description: str | None
    components: tuple[payloads.Component, ...]
    settings_schema: SettingsSchema | None
    writable: tuple[str, ...]

    def __post_init__(self) -> None:
        known = set(self.settings_schema.fields) if self.settings_schema is not None else set()
        unknown = sorted(set(self.writable) - known)
        if unknown:
            raise FieldRejected(
                f"{', '.join(unknown)} not in settings_schema", path="writable", code="invalid_profile"
            )

    @classmethod
    def parse(
        cls,
        *,
        name: object,
        description: object,
        components: object,
        settings_schema: object,
        writable: object,
    ) -> ProfileSpec:
        schema = None if settings_schema is None else SettingsSchema.parse(settings_schema)
        if writable is None:
            chosen = tuple(schema.fields) if schema is not None else ()
        elif isinstance(writable, list) and all(isinstance(item, str) for item in writable):
            chosen = tuple(sorted(set(writable)))
        else:
            raise FieldRejected("must be a list of field names", path="writable", code="invalid_profile")
        return cls(
            name=parse_name(name, "profile"),
            description=device_fields.parse_description(description),
            components=parse_components(components),
            settings_schema=schema,
            writable=chosen,
        )

    def check_settings(self, settings: Mapping[str, object], previous: Mapping[str, object] | None) -> None:
        """Settings of a device with this profile: they conform to the schema, and, when the
        profile was assigned already (`previous` are its settings before this write), fields
        that are not writable keep their value (present or absent alike)."""
        if self.settings_schema is None:
            return
        self.settings_schema.check(settings)
        if previous is None:
            return
        for name in sorted(set(self.settings_schema.fields) - set(self.writable)):
            if (name in settings, settings.get(name)) != (name in previous, previous.get(name)):
                raise FieldRejected(
                    "is not writable in the device's profile (it is set when the profile is assigned)",
                    path=f"settings.{name}",
                    code="read_only_setting",
                )

    def components_json(self) -> list[dict[str, Any]]:
        return [
            {
                "id": component.id,
                "profile": component.profile,
                "sensors": [
                    {"name": s.name, "value_type": s.value_type, "unit": s.unit} for s in component.sensors
                ],
            }
            for component in self.components
        ]


def parse_components(raw: object) -> tuple[payloads.Component, ...]:
    """Expected components, in the announcement's shape and by its parser; None and [] are none."""
    if raw is None or raw == []:
        return ()
    try:
        text = json.dumps(raw, allow_nan=False)
        parsed = payloads.parse(payloads.Channel.COMPONENTS, text.encode("utf-8"), received_at=_PARSED_AT)
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON (a request body always is)
        raise FieldRejected("must be a JSON array", path="components", code="invalid_components") from exc
    except InvalidValue as exc:
        raise FieldRejected(exc.message, path="components", code="invalid_components") from exc
    if not isinstance(parsed, list):  # the components channel always parses to a list
        raise FieldRejected("must be a JSON array", path="components", code="invalid_components")
    return tuple(component for component in parsed if isinstance(component, payloads.Component))


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    id: str
    spec: ProfileSpec
    created_at: datetime
    updated_at: datetime
    device_count: int = 0  # devices that have the profile

    def as_json(self) -> dict[str, Any]:
        """The profile as the API shows it (and the audit trail keeps it, count aside)."""
        spec = self.spec
        return {
            "id": self.id,
            "name": spec.name,
            "description": spec.description,
            "components": spec.components_json(),
            "settings_schema": None if spec.settings_schema is None else spec.settings_schema.as_json(),
            "writable": list(spec.writable),
            "device_count": self.device_count,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


# --- conformance: announced components against expected ones --------------------------------


@dataclass(frozen=True, slots=True)
class Difference:
    """One way a device's announcement falls short of its profile."""

    kind: str  # missing_component | missing_sensor | value_type | unit
    component: str
    sensor: str | None = None
    expected: str | None = None
    announced: str | None = None


def conformance(
    expected: Sequence[payloads.Component], announced: Sequence[ComponentRecord]
) -> list[Difference]:
    """How `announced` differs from `expected`, in the profile's order; empty when it conforms.

    Extra components and sensors are fine (a profile states a minimum); a unit is compared only
    when the profile names one.
    """
    by_id = {component.id: component for component in announced}
    found: list[Difference] = []
    for component in expected:
        present = by_id.get(component.id)
        if present is None:
            found.append(Difference("missing_component", component.id))
            continue
        sensors = {sensor.name: sensor for sensor in present.sensors}
        for spec in component.sensors:
            sensor = sensors.get(spec.name)
            if sensor is None:
                found.append(Difference("missing_sensor", component.id, spec.name))
            elif sensor.value_type != spec.value_type:
                found.append(
                    Difference("value_type", component.id, spec.name, spec.value_type, sensor.value_type)
                )
            elif spec.unit is not None and sensor.unit != spec.unit:
                found.append(Difference("unit", component.id, spec.name, spec.unit, sensor.unit))
    return found
