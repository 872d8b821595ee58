"""Operator-managed device fields (description, tags, location ids, metadata, settings) and the
listing's sort keys and cursors: the rules of `gateway.core.device_fields` and `gateway.core.listing`."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import device_fields as fields
from gateway.core.listing import SORT_FIELDS, Cursor, parse_sort
from gateway.devices import clean_name
from gateway.errors import InvalidValue


def nested(depth: int) -> dict[str, Any]:
    """A JSON object `depth` levels deep (the object itself is level 1)."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


def test_description_is_stripped_and_blank_clears_it() -> None:
    """Surrounding space goes, newlines and tabs stay, blank or None is no description."""
    assert fields.parse_description("  line one\n\tline two  ") == "line one\n\tline two"
    assert fields.parse_description("   ") is None
    assert fields.parse_description(None) is None
    assert fields.parse_description("x" * fields.DESCRIPTION_MAX) == "x" * fields.DESCRIPTION_MAX


@pytest.mark.parametrize("raw", ["x" * 1001, "bell\x07", "nul\x00", "esc\x1b[0m", "lone \ud800", 42, ["a"]])
def test_description_refuses_long_text_control_characters_and_non_text(raw: object) -> None:
    """Over 1,000 characters, control characters (but newline/tab), surrogates or a non-string: refused."""
    with pytest.raises(InvalidValue) as info:
        fields.parse_description(raw)
    assert info.value.code == "invalid_description"


def test_tags_are_deduplicated_sorted_and_stripped() -> None:
    """Tags come back as a sorted set of stripped labels; None and [] are no tags."""
    assert fields.parse_tags([" prod", "b", "prod ", "Prod", "é-zone"]) == ("Prod", "b", "prod", "é-zone")
    assert fields.parse_tags(None) == () == fields.parse_tags([])
    assert fields.parse_location_ids(["site-1", "site-1"]) == ("site-1",)


@pytest.mark.parametrize(
    "raw",
    [
        "prod",  # a string is not a list of tags
        [""],
        ["   "],
        ["x" * 65],
        ["tab\there"],
        ["zero\u200bwidth"],
        [7],
        [None],
        [f"t{i}" for i in range(fields.LABELS_MAX + 1)],
        {"prod": True},
    ],
)
def test_tags_refuse_empty_long_control_or_too_many(raw: object) -> None:
    """Each tag is 1-64 printable characters, at most 50 of them, in a list."""
    with pytest.raises(InvalidValue) as info:
        fields.parse_tags(raw)
    assert info.value.code == "invalid_tag"
    with pytest.raises(InvalidValue) as info:
        fields.parse_location_ids(raw)
    assert info.value.code == "invalid_location_id"


def test_fifty_distinct_tags_of_sixty_four_characters_are_accepted() -> None:
    """The limits themselves are allowed."""
    tags = [f"{i:02d}".ljust(fields.LABEL_MAX, "x") for i in range(fields.LABELS_MAX)]
    assert fields.parse_tags(tags) == tuple(sorted(tags))


def test_json_objects_are_copied_and_none_is_empty() -> None:
    """Metadata and settings come back as a copy of plain JSON values; None is {}."""
    raw = {"a": [1, 2.5, True, None, "x"], "b": {"c": (1, 2)}}
    parsed = fields.parse_metadata(raw)
    assert parsed == {"a": [1, 2.5, True, None, "x"], "b": {"c": [1, 2]}}
    assert parsed["b"] is not raw["b"]
    assert fields.parse_settings(None) == {}
    assert fields.parse_settings(nested(fields.JSON_DEPTH_MAX)) == nested(fields.JSON_DEPTH_MAX)


@pytest.mark.parametrize(
    "raw",
    [
        [1, 2],
        "{}",
        nested(fields.JSON_DEPTH_MAX + 1),
        {"list": [[[[[[[[[]]]]]]]]]},
        {"big": "x" * fields.JSON_BYTES_MAX},
        {"nan": float("nan")},
        {"inf": float("inf")},
        {"huge": 2**64},
        {1: "non-text key"},
        {"bytes": b"raw"},
        {"set": {1, 2}},
        {"lone": "\udc80"},
    ],
)
def test_json_objects_refuse_non_objects_depth_size_and_non_json_values(raw: object) -> None:
    """Not an object, deeper than 8, over 16 KiB, NaN/inf, >64-bit ints, non-text keys, non-JSON: refused."""
    with pytest.raises(InvalidValue) as info:
        fields.parse_settings(raw)
    assert info.value.code == "invalid_settings"


def test_size_counts_utf8_bytes_of_compact_json() -> None:
    """The limit is on the stored form: compact JSON in UTF-8 (a two-byte letter counts twice)."""
    overhead = len(fields.dump_json({"k": ""}))
    fits = {"k": "é" * ((fields.JSON_BYTES_MAX - overhead) // 2)}
    assert fields.parse_metadata(fits) == fits
    with pytest.raises(InvalidValue):
        fields.parse_metadata({"k": "é" * ((fields.JSON_BYTES_MAX - overhead) // 2 + 1)})


def test_an_absurdly_deep_object_is_refused_not_a_crash() -> None:
    """Nesting far beyond Python's recursion limit is refused at the depth limit."""
    with pytest.raises(InvalidValue):
        fields.parse_metadata(nested(100_000))


def test_parse_details_takes_only_the_detail_fields() -> None:
    """Known fields go through their parsers; an unknown one is refused by name."""
    assert fields.parse_details({"tags": ["b", "a"], "description": None}) == {
        "tags": ("a", "b"),
        "description": None,
    }
    with pytest.raises(InvalidValue, match="status"):
        fields.parse_details({"status": "active"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
anything = st.one_of(json_values, st.binary(), st.lists(st.text()), st.sets(st.integers()))


@given(anything)
def test_every_parser_returns_a_value_or_raises_invalid_value(raw: object) -> None:
    """Property: each detail parser accepts a value or raises InvalidValue, nothing else."""
    for parse in (*fields.DETAIL_FIELDS.values(), fields.parse_label):
        try:
            parse(raw)
        except InvalidValue:
            pass


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_accepted_json_objects_round_trip_through_their_stored_form(raw: dict[str, Any]) -> None:
    """Property: what parse_metadata accepts serialises within the limit and loads back equal."""
    try:
        parsed = fields.parse_metadata(raw)
    except InvalidValue:
        return
    stored = fields.dump_json(parsed)
    assert len(stored.encode("utf-8")) <= fields.JSON_BYTES_MAX
    assert json.loads(stored) == parsed


@given(st.lists(st.text(max_size=70), max_size=60))
def test_accepted_tags_obey_every_rule(raw: list[str]) -> None:
    """Property: accepted tags are sorted, distinct, stripped, 1-64 characters, at most 50."""
    try:
        tags = fields.parse_tags(raw)
    except InvalidValue:
        return
    assert list(tags) == sorted(set(tags))
    assert len(tags) <= fields.LABELS_MAX
    assert all(1 <= len(tag) <= fields.LABEL_MAX and tag == tag.strip() for tag in tags)


@pytest.mark.parametrize("raw", ["lone \ud800", "\udfff", "tab\tname", "del\x7f", "", "x" * 201])
def test_device_names_refuse_surrogates_and_control_characters(raw: str) -> None:
    """A name the database could not store (a lone surrogate) is refused like a control character."""
    with pytest.raises(InvalidValue):
        clean_name(raw)


# --- sort keys and cursors ---------------------------------------------------------------


def test_sort_keys_parse_with_direction_and_default() -> None:
    """Fields with '-' for descending, spaces ignored; blank is oldest first."""
    assert parse_sort("-last_seen_at, name") == ("-last_seen_at", "name")
    assert parse_sort(None) == ("created_at",) == parse_sort(" ")


@pytest.mark.parametrize("raw", ["secret", "--name", "name,-name", "+name", ",".join(list(SORT_FIELDS)[:6])])
def test_sort_refuses_unknown_repeated_or_too_many_fields(raw: str) -> None:
    """Unknown fields, a field twice, or more than five keys: invalid_sort."""
    with pytest.raises(InvalidValue) as info:
        parse_sort(raw)
    assert info.value.code == "invalid_sort"


def test_cursor_round_trips_values_of_every_kind() -> None:
    """Text, booleans, aware times and empty values come back as they went in."""
    sort = ("-last_seen_at", "blocked", "name", "model")
    at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    cursor = Cursor(sort, (at, True, "pump é", None), "dev-1")
    assert Cursor.decode(cursor.encode(), sort) == cursor


def test_cursor_is_refused_for_another_sort() -> None:
    """A cursor made for one order cannot continue another."""
    cursor = Cursor(("name",), ("a",), "dev-1").encode()
    with pytest.raises(InvalidValue, match="another sort"):
        Cursor.decode(cursor, ("-name",))


@pytest.mark.parametrize(
    ("sort", "values"),
    [
        (("name",), [None]),  # name is never empty
        (("created_at",), ["2025-01-01T00:00:00"]),  # a time without zone
        (("created_at",), ["yesterday"]),
        (("blocked",), ["yes"]),
        (("name",), [1]),
        (("name",), []),
    ],
)
def test_cursor_values_must_fit_their_fields(sort: tuple[str, ...], values: list[object]) -> None:
    """Values of the wrong kind for their sort field are an invalid cursor."""
    body = json.dumps({"s": list(sort), "v": values, "id": "x"}).encode()
    with pytest.raises(InvalidValue) as info:
        Cursor.decode(base64.urlsafe_b64encode(body).decode(), sort)
    assert info.value.code == "invalid_cursor"


@given(st.text(max_size=300))
def test_cursor_decoding_returns_a_cursor_or_raises_invalid_value(raw: str) -> None:
    """Property: any text given as a cursor is a Cursor or InvalidValue."""
    try:
        Cursor.decode(raw, ("-last_seen_at", "name"))
    except InvalidValue:
        pass


@given(st.binary(max_size=200))
def test_cursor_decoding_of_any_base64_payload_is_safe(raw: bytes) -> None:
    """Property: any payload behind valid base64 is a Cursor or InvalidValue."""
    try:
        Cursor.decode(base64.urlsafe_b64encode(raw).decode(), ("created_at",))
    except InvalidValue:
        pass
