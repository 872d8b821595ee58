"""The settings schema language of device profiles (`gateway.core.settings_schema`): what a schema
may say, how settings are checked against it, and that neither ever raises anything but ours."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.settings_schema import FIELD_TYPES, FieldSpec, SettingsSchema
from gateway.errors import FieldRejected, InvalidValue

SCHEMA = SettingsSchema.parse(
    {
        "interval_s": {"type": "integer", "min": 1, "max": 3600, "required": True},
        "gain": {"type": "number", "min": -1.5, "max": 1.5},
        "mode": {"type": "string", "enum": ["eco", "full"]},
        "label": {"type": "string", "max_length": 8, "description": "shown on the display"},
        "enabled": {"type": "boolean"},
    }
)


def refused(settings: dict[str, Any]) -> tuple[str, str]:
    """The path and code `settings` are refused with."""
    with pytest.raises(FieldRejected) as info:
        SCHEMA.check(settings)
    return info.value.path, info.value.code


def test_conforming_settings_pass() -> None:
    """Every field of its type and within its limits passes; optional fields may be left out."""
    SCHEMA.check({"interval_s": 60})
    SCHEMA.check({"interval_s": 1, "gain": 1.5, "mode": "eco", "label": "12345678", "enabled": False})
    SCHEMA.check({"interval_s": 3600, "gain": -1})  # an integer is a number


@pytest.mark.parametrize(
    ("settings", "path"),
    [
        ({}, "settings.interval_s"),  # required
        ({"interval_s": 0}, "settings.interval_s"),  # below min
        ({"interval_s": 3601}, "settings.interval_s"),  # above max
        ({"interval_s": 5.0}, "settings.interval_s"),  # 5.0 is not an integer
        ({"interval_s": True}, "settings.interval_s"),  # true is never a number
        ({"interval_s": "60"}, "settings.interval_s"),
        ({"interval_s": None}, "settings.interval_s"),  # null is not a value
        ({"interval_s": 60, "gain": False}, "settings.gain"),
        ({"interval_s": 60, "gain": 2}, "settings.gain"),
        ({"interval_s": 60, "mode": "turbo"}, "settings.mode"),
        ({"interval_s": 60, "label": "123456789"}, "settings.label"),
        ({"interval_s": 60, "enabled": 1}, "settings.enabled"),
        ({"interval_s": 60, "nested": {"a": 1}}, "settings.nested"),  # not a field of the schema
        ({"interval_s": 60, "Mode": "eco"}, "settings.Mode"),  # field names are exact
    ],
)
def test_settings_are_refused_with_the_path_of_the_field_at_fault(
    settings: dict[str, Any], path: str
) -> None:
    """Missing required fields, wrong types, values out of range or enum, unknown keys: refused by field."""
    assert refused(settings) == (path, "invalid_settings")


def test_problems_lists_every_field_at_fault_by_name() -> None:
    """`problems` reports each field once, in name order; `check` raises the first."""
    problems = SCHEMA.problems({"mode": "turbo", "gain": "x"})
    assert [path for path, _ in problems] == ["settings.gain", "settings.interval_s", "settings.mode"]
    assert problems[1][1] == "is required by the device's profile"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ([], "settings_schema"),
        ({"x": "integer"}, "settings_schema.x"),
        ({"x": {}}, "settings_schema.x.type"),
        ({"x": {"type": "float"}}, "settings_schema.x.type"),
        ({"x": {"type": "string", "min": 1}}, "settings_schema.x"),
        ({"x": {"type": "integer", "max_length": 3}}, "settings_schema.x"),
        ({"x": {"type": "integer", "min": 5, "max": 1}}, "settings_schema.x"),
        ({"x": {"type": "number", "min": True}}, "settings_schema.x.min"),
        ({"x": {"type": "number", "max": "9"}}, "settings_schema.x.max"),
        ({"x": {"type": "string", "max_length": -1}}, "settings_schema.x.max_length"),
        ({"x": {"type": "string", "enum": []}}, "settings_schema.x"),
        ({"x": {"type": "string", "enum": "a"}}, "settings_schema.x.enum"),
        ({"x": {"type": "string", "enum": ["a", "a"]}}, "settings_schema.x"),
        ({"x": {"type": "integer", "enum": [1, 1.0]}}, "settings_schema.x"),
        ({"x": {"type": "integer", "enum": [1, 9], "max": 5}}, "settings_schema.x"),
        ({"x": {"type": "boolean", "enum": [1]}}, "settings_schema.x"),
        ({"x": {"type": "string", "default": "a"}}, "settings_schema.x"),  # unknown key
        ({"x": {"type": "string", "required": "yes"}}, "settings_schema.x.required"),
        ({"x": {"type": "string", "description": "bell\x07"}}, "settings_schema.x.description"),
        ({"9lives": {"type": "string"}}, "settings_schema"),
        ({"a.b": {"type": "string"}}, "settings_schema"),
        ({f"f{i}": {"type": "string"} for i in range(101)}, "settings_schema"),
    ],
)
def test_inconsistent_schemas_are_refused_with_the_place_at_fault(raw: object, path: str) -> None:
    """A schema says only what the language can: known types, bounds on numbers, lengths on strings."""
    with pytest.raises(FieldRejected) as info:
        SettingsSchema.parse(raw)
    assert (info.value.path, info.value.code) == (path, "invalid_settings_schema")


def test_an_empty_schema_allows_no_settings_at_all() -> None:
    """``{}`` declares no field: only empty settings conform (``null`` instead leaves them unchecked)."""
    empty = SettingsSchema.parse({})
    empty.check({})
    with pytest.raises(FieldRejected):
        empty.check({"anything": 1})


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=20,
)
spec_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from([*FIELD_TYPES, "float"]) | json_values,
        "required": st.booleans() | json_scalars,
        "enum": st.lists(json_scalars, max_size=4) | json_values,
        "min": st.integers() | st.floats() | json_values,
        "max": st.integers() | st.floats() | json_values,
        "max_length": st.integers(min_value=-2, max_value=40) | json_values,
        "description": st.text(max_size=10) | json_values,
        "other": json_values,
    },
)
schema_like = st.dictionaries(
    st.sampled_from(["a", "b", "c_1", "9x", ""]) | st.text(max_size=5), spec_like, max_size=4
)


@given(schema_like | json_values)
def test_parsing_any_json_gives_a_schema_or_raises_ours(raw: object) -> None:
    """Property: a schema comes back, or InvalidValue; and what comes back round-trips through its JSON."""
    try:
        schema = SettingsSchema.parse(raw)
    except InvalidValue:
        return
    assert SettingsSchema.parse(schema.as_json()) == schema


@given(schema_like, st.dictionaries(st.sampled_from(["a", "b", "c_1", "zz"]), json_values, max_size=4))
def test_checking_any_settings_passes_or_raises_field_rejected(raw: object, settings: dict[str, Any]) -> None:
    """Property: check is silent exactly when problems is empty, and raises nothing but FieldRejected."""
    try:
        schema = SettingsSchema.parse(raw)
    except InvalidValue:
        return
    problems = schema.problems(settings)
    if not problems:
        schema.check(settings)
        return
    with pytest.raises(FieldRejected) as info:
        schema.check(settings)
    assert info.value.path == problems[0][0] and info.value.path.startswith("settings.")


@st.composite
def schema_and_settings(draw: st.DrawFn) -> tuple[SettingsSchema, dict[str, Any]]:
    """A consistent schema and settings that conform to it, built side by side."""
    fields: dict[str, FieldSpec] = {}
    settings: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(["a", "b", "c", "d_2"]), unique=True, max_size=4)):
        kind = draw(st.sampled_from(FIELD_TYPES))
        required = draw(st.booleans())
        if kind == "integer":
            low = draw(st.integers(-100, 100))
            spec = FieldSpec(kind, required, min=low, max=low + draw(st.integers(0, 50)))
            value: Any = draw(st.integers(spec.min, spec.max))  # type: ignore[arg-type]
        elif kind == "number":
            spec = FieldSpec(kind, required, min=-1.5, max=draw(st.floats(0, 10)))
            value = draw(st.floats(spec.min, spec.max))  # type: ignore[arg-type]
        elif kind == "string":
            choices = draw(st.lists(st.text(max_size=5), min_size=1, max_size=3, unique=True))
            spec = FieldSpec(kind, required, enum=tuple(choices), max_length=5)
            value = draw(st.sampled_from(choices))
        else:
            spec = FieldSpec(kind, required)
            value = draw(st.booleans())
        fields[name] = spec
        if required or draw(st.booleans()):
            settings[name] = value
    return SettingsSchema(fields), settings


@given(schema_and_settings())
def test_settings_built_from_a_schema_conform_to_it(case: tuple[SettingsSchema, dict[str, Any]]) -> None:
    """Property: values within every spec pass, and the schema survives its JSON form."""
    schema, settings = case
    schema.check(settings)
    assert SettingsSchema.parse(schema.as_json()) == schema
