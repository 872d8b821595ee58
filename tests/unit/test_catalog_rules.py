"""The pure rules of device groups, sites and profiles (`gateway.core.catalog`, `.groups`, `.sites`,
`.profiles`): ids, saved filters, coordinates and time zones, writable settings, conformance."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import sites
from gateway.core.catalog import RecordId
from gateway.core.groups import FILTER_KEYS, GroupFilter, GroupKind, GroupSpec
from gateway.core.lifecycle import DeviceStatus
from gateway.core.presence import Connection
from gateway.core.profiles import Difference, ProfileSpec, conformance
from gateway.core.records import ComponentRecord, DeviceQuery, SensorRecord
from gateway.core.sites import SiteSpec
from gateway.errors import FieldRejected, InvalidValue

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_record_ids_follow_the_device_id_grammar_and_generated_ones_carry_their_prefix() -> None:
    """Chosen ids are checked like device ids; generated ones start grp_, site_ or prof_."""
    assert RecordId("site", "plant-north.1").value == "plant-north.1"
    assert RecordId.chosen_or_new("group", None).value.startswith("grp_")
    assert RecordId.chosen_or_new("profile", "").value.startswith("prof_")
    for bad in ("", "a/b", "-x", "x" * 65, "a b", "ü"):
        with pytest.raises(InvalidValue) as info:
            RecordId("site", bad)
        assert info.value.code == "invalid_site_id"


def test_a_saved_filter_takes_the_listing_filters_and_shows_only_those_set() -> None:
    """Known keys parse to the listing's values; ``as_json`` shows what is set, ``query`` the same filters."""
    saved = GroupFilter.parse(
        {
            "tags": ["prod", " eu", "prod"],
            "status": "active",
            "connection": "online",
            "blocked": "all",
            "model": None,
        }
    )
    assert saved == GroupFilter(tags=("eu", "prod"), status=DeviceStatus.ACTIVE, connection=Connection.ONLINE)
    assert saved.as_json() == {"status": "active", "connection": "online", "tags": ["eu", "prod"]}
    assert saved.query() == DeviceQuery(
        tags=("eu", "prod"), status=DeviceStatus.ACTIVE, connection=Connection.ONLINE
    )
    assert GroupFilter.parse({}) == GroupFilter() and GroupFilter().as_json() == {}


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (["prod"], "filter"),
        ({"tag": "prod"}, "filter"),  # the saved key is tags (a list)
        ({"cert_expires_within": "7d"}, "filter"),  # time-relative filters are not saved
        ({"status": "asleep"}, "filter.status"),
        ({"connection": True}, "filter.connection"),
        ({"blocked": "some"}, "filter.blocked"),
        ({"tags": "prod"}, "filter.tags"),
        ({"location_ids": [""]}, "filter.location_ids"),
        ({"search": ""}, "filter.search"),
        ({"model": "x" * 201}, "filter.model"),
        ({"application": "\ud800"}, "filter.application"),
    ],
)
def test_a_saved_filter_refuses_unknown_keys_and_bad_values_by_place(raw: object, path: str) -> None:
    """Each filter is checked as the listing checks it, and refused with its place in the body."""
    with pytest.raises(FieldRejected) as info:
        GroupFilter.parse(raw)
    assert (info.value.path, info.value.code) == (path, "invalid_filter")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=15,
)
filter_like = st.dictionaries(
    st.sampled_from(FILTER_KEYS) | st.text(max_size=6),
    json_values
    | st.sampled_from(["active", "online", "hide", "only"])
    | st.lists(st.text(max_size=6), max_size=3),
    max_size=5,
)


@given(filter_like | json_values)
def test_parsing_any_filter_gives_one_that_round_trips_or_raises_ours(raw: object) -> None:
    """Property: a saved filter or InvalidValue; what is saved reads back the same."""
    try:
        saved = GroupFilter.parse(raw)
    except InvalidValue:
        return
    assert GroupFilter.parse(saved.as_json()) == saved


def test_dynamic_groups_have_a_filter_and_static_ones_none() -> None:
    """The kind decides whether a filter belongs; any other kind is refused."""
    dynamic = GroupSpec.parse(name=" Prod ", description=None, kind="dynamic", filter={})
    assert (dynamic.name, dynamic.kind, dynamic.filter) == ("Prod", GroupKind.DYNAMIC, GroupFilter())
    cases = [("dynamic", None, "filter"), ("static", {}, "filter"), ("smart", None, "kind")]
    for kind, saved, path in cases:
        with pytest.raises(FieldRejected) as info:
            GroupSpec.parse(name="g", description=None, kind=kind, filter=saved)
        assert info.value.path == path


def test_sites_take_coordinates_in_range_and_both_together() -> None:
    """Latitude -90..90 and longitude -180..180, both or neither; integers are degrees too."""
    site = SiteSpec.parse({"name": "North", "latitude": -90, "longitude": 180.0, "timezone": "Europe/Berlin"})
    assert (site.latitude, site.longitude, site.timezone) == (-90.0, 180.0, "Europe/Berlin")
    for bad, path in [
        ({"latitude": 90.5, "longitude": 0}, "latitude"),
        ({"latitude": 0, "longitude": -181}, "longitude"),
        ({"latitude": True, "longitude": 0}, "latitude"),
        ({"latitude": 1.0}, "latitude"),
        ({"longitude": 1.0}, "latitude"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"timezone": "Europe/../etc"}, "timezone"),
        ({"address": "x" * 501}, "address"),
    ]:
        with pytest.raises(FieldRejected) as info:
            SiteSpec.parse({"name": "North", **bad})
        assert info.value.path == path, bad
    assert SiteSpec.parse({"name": "Utc", "timezone": "UTC"}).timezone == "UTC"


@given(
    st.dictionaries(
        st.sampled_from(["name", "address", "latitude", "longitude", "timezone", "metadata"]), json_values
    )
)
def test_parsing_any_site_gives_a_site_or_raises_ours(raw: dict[str, Any]) -> None:
    """Property: a site or InvalidValue, nothing else."""
    try:
        SiteSpec.parse({"name": "n", **raw})
    except InvalidValue:
        pass


def test_a_write_adds_only_the_location_ids_the_device_did_not_have() -> None:
    """Only added ids must name sites; kept and removed ones are not looked up."""
    assert sites.added_locations(("legacy", "a"), ("a", "c", "b")) == ["b", "c"]
    assert sites.added_locations(("a",), ()) == []


PUMP = ProfileSpec.parse(
    name="Pump",
    description=None,
    components=[
        {"id": "pump", "sensors": [{"name": "flow", "value_type": "number", "unit": "l/min"}]},
        {"id": "door", "sensors": [{"name": "open", "value_type": "boolean"}]},
    ],
    settings_schema={
        "interval_s": {"type": "integer", "min": 1, "required": True},
        "variant": {"type": "string", "enum": ["a", "b"]},
    },
    writable=["interval_s"],
)


def test_writable_defaults_to_every_field_and_must_name_fields_of_the_schema() -> None:
    """Omitted, every schema field is writable; naming a field the schema lacks is refused."""
    every = ProfileSpec.parse(
        name="p", description=None, components=None, settings_schema={"a": {"type": "string"}}, writable=None
    )
    assert every.writable == ("a",)
    for schema, writable in [({"a": {"type": "string"}}, ["b"]), (None, ["a"]), (None, "a")]:
        with pytest.raises(FieldRejected) as info:
            ProfileSpec.parse(
                name="p", description=None, components=None, settings_schema=schema, writable=writable
            )
        assert info.value.path == "writable"


def test_expected_components_are_read_by_the_announcement_parser() -> None:
    """Components take the announcement's shape and rules (sensor types, duplicates); [] expects none."""
    assert [c.id for c in PUMP.components] == ["pump", "door"]
    assert (
        ProfileSpec.parse(
            name="p", description=None, components=[], settings_schema=None, writable=None
        ).components
        == ()
    )
    for bad in (
        {"id": "x"},
        [{"id": "x", "sensors": [{"name": "t", "value_type": "float"}]}],
        [{"id": "x"}],
        "x",
    ):
        with pytest.raises(FieldRejected) as info:
            ProfileSpec.parse(name="p", description=None, components=bad, settings_schema=None, writable=None)
        assert (info.value.path, info.value.code) == ("components", "invalid_components")


def test_fixed_settings_are_set_when_the_profile_is_assigned_and_kept_after() -> None:
    """Assigning (no previous settings under the profile) sets any field; later only writable ones change."""
    PUMP.check_settings({"interval_s": 10, "variant": "a"}, None)
    PUMP.check_settings({"interval_s": 99, "variant": "a"}, {"interval_s": 10, "variant": "a"})
    for after in ({"interval_s": 10, "variant": "b"}, {"interval_s": 10}):  # changed, or removed
        with pytest.raises(FieldRejected) as info:
            PUMP.check_settings(after, {"interval_s": 10, "variant": "a"})
        assert (info.value.path, info.value.code) == ("settings.variant", "read_only_setting")
    with pytest.raises(FieldRejected) as schema_first:
        PUMP.check_settings({"interval_s": 0}, {"interval_s": 10})
    assert schema_first.value.code == "invalid_settings"
    unchecked = ProfileSpec.parse(
        name="p", description=None, components=None, settings_schema=None, writable=None
    )
    unchecked.check_settings({"anything": [1, {"goes": True}]}, {})


def sensor(component: str, name: str, value_type: str, unit: str | None = None) -> SensorRecord:
    return SensorRecord("d1", component, name, value_type, unit, T0, T0)


def test_conformance_names_what_is_missing_or_typed_otherwise_and_allows_extras() -> None:
    """Missing components and sensors, another value type or unit are differences; more is fine."""
    announced = [
        ComponentRecord(
            "d1",
            "pump",
            None,
            T0,
            T0,
            (sensor("pump", "flow", "string", "l/min"), sensor("pump", "x", "number")),
        ),
        ComponentRecord("d1", "extra", None, T0, T0, ()),
    ]
    assert conformance(PUMP.components, announced) == [
        Difference("value_type", "pump", "flow", "number", "string"),
        Difference("missing_component", "door"),
    ]
    fine = [
        ComponentRecord("d1", "pump", None, T0, T0, (sensor("pump", "flow", "number", "l/min"),)),
        ComponentRecord("d1", "door", None, T0, T0, ()),
    ]
    assert conformance(PUMP.components, fine) == [Difference("missing_sensor", "door", "open")]
    wrong_unit = [ComponentRecord("d1", "pump", None, T0, T0, (sensor("pump", "flow", "number", "gal/min"),))]
    assert conformance(PUMP.components[:1], wrong_unit) == [
        Difference("unit", "pump", "flow", "l/min", "gal/min")
    ]
    assert conformance((), announced) == []
