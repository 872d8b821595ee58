"""Device registry files (`gateway.cli.device_files`) and the bulk row rules (`gateway.bulk.parse_row`):
CSV and JSON lines in with line numbers, out so that import takes them back."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.bulk import ROW_FIELDS, parse_row
from gateway.cli import device_files
from gateway.cli.device_files import CsvWriter, format_of, read_rows, write_jsonl
from gateway.core import device_fields
from gateway.errors import InvalidValue


def test_columns_follow_the_device_fields() -> None:
    """The file columns are exactly what a bulk row takes: name, id and every detail field."""
    assert set(device_files.COLUMNS) == set(ROW_FIELDS) == {"name", "id", *device_fields.DETAIL_FIELDS}


def test_format_from_option_or_suffix() -> None:
    """--format wins; else .csv / .jsonl / .ndjson; else CSV."""
    assert format_of(Path("a.JSONL"), None) == "jsonl"
    assert format_of(Path("a.ndjson"), None) == "jsonl"
    assert format_of(Path("a.txt"), None) == "csv"
    assert format_of(Path("a.csv"), "jsonl") == "jsonl"
    assert format_of(None, None) == "csv"
    with pytest.raises(InvalidValue):
        format_of(None, "xml")


def test_csv_cells_and_line_numbers() -> None:
    """Empty cells are absent; labels split on ';' or as a JSON array; objects as JSON; quoted newlines."""
    text = (
        "Name , ID,tags,location_ids,metadata,description\n"
        "\n"
        ' Boiler , b-1 ,heating; hall a ;,["x;y"],{"floor": 1},"two\nlines"\n'
        "Pump,,,,,\n"
    )
    rows, errors = read_rows(text, "csv")
    assert errors == []
    assert [row.line for row in rows] == [3, 5]
    assert rows[0].fields == {
        "name": "Boiler",
        "id": "b-1",
        "tags": ["heating", "hall a"],
        "location_ids": ["x;y"],
        "metadata": {"floor": 1},
        "description": "two\nlines",
    }
    assert rows[1].fields == {"name": "Pump"}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        pytest.param("", 1, "empty file", id="empty"),
        pytest.param("name,colour\nx,red\n", 1, "unknown column(s) colour", id="unknown-column"),
        pytest.param("id,tags\nx,y\n", 1, "no name column", id="no-name"),
        pytest.param("name,name\nx,y\n", 1, "appears twice", id="twice"),
        pytest.param("name,id\nx,y,z\n", 2, "3 cells but 2 columns", id="too-many-cells"),
        pytest.param("name,metadata\nx,[1]\n", 2, "metadata: not a JSON object", id="not-object"),
        pytest.param("name,metadata\nx,{bad\n", 2, "metadata: invalid JSON", id="bad-json"),
        pytest.param("name,tags\nx,[bad\n", 2, "tags: invalid JSON", id="bad-labels"),
        pytest.param("name,id\na,d\nb,d\n", 3, "id d is also on line 2", id="duplicate"),
    ],
)
def test_csv_problems_by_line(text: str, line: int, message: str) -> None:
    """Each problem names its line; a header problem is the only one reported."""
    _, errors = read_rows(text, "csv")
    assert [(e.line, message in e.message) for e in errors] == [(line, True)], errors


def test_jsonl_lines() -> None:
    """One object per line; blank lines skipped; bad JSON and non-objects reported by line."""
    text = '{"name": "a", "id": "x"}\n\n[1]\nnot json\n{"name": "b", "id": "x"}\n{"name": "c", "colour": 1}\n'
    rows, errors = read_rows(text, "jsonl")
    assert [(row.line, row.fields["name"]) for row in rows] == [(1, "a"), (6, "c")], (
        "unknown keys: the gateway's"
    )
    assert [(e.line, e.code) for e in errors] == [(3, "invalid_row"), (4, "invalid_row"), (5, "duplicate_id")]


labels = st.lists(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=10)
    .map(str.strip)
    .filter(bool),
    max_size=4,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
devices = st.builds(
    lambda i, name, description, tags, locations, metadata, settings: {
        "id": f"dev-{i}",
        "name": name,
        "description": description,
        "tags": sorted(set(tags)),
        "location_ids": sorted(set(locations)),
        "metadata": metadata,
        "settings": settings,
        "status": "pending",  # not exported
    },
    st.integers(0, 10**6),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool),
    st.none()  # as the gateway keeps them: stripped, never blank
    | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
    .map(str.strip)
    .filter(bool),
    labels,
    labels,
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)


def _as_imported(device: dict[str, Any]) -> dict[str, Any]:
    """What a device looks like after import: empty values are absent (the gateway's default)."""
    return {
        key: value for key, value in device_files.export_fields(device).items() if value not in (None, [], {})
    }


@settings(max_examples=60, deadline=None)
@given(st.lists(devices, max_size=5, unique_by=lambda d: d["id"]))
def test_export_then_import_gives_the_same_devices(records: list[dict[str, Any]]) -> None:
    """CSV and JSON lines: what export writes, import reads back (status and the like left out)."""
    out = io.StringIO()
    writer = CsvWriter(out)
    for record in records:
        writer.write(record)
    writer.finish()
    rows, errors = read_rows(out.getvalue(), "csv")
    assert errors == []
    expected = [_as_imported(record) for record in records]
    assert [row.fields for row in rows] == expected
    out = io.StringIO()
    write_jsonl(records, out)
    rows, errors = read_rows(out.getvalue(), "jsonl")
    assert errors == []
    assert [row.fields for row in rows] == [device_files.export_fields(record) for record in records]
    assert all("status" not in json.loads(line) for line in out.getvalue().split("\n") if line)


def test_an_empty_export_still_imports() -> None:
    """No devices: a header alone, which reads as no rows and no problems."""
    out = io.StringIO()
    CsvWriter(out).finish()
    assert read_rows(out.getvalue(), "csv") == ([], [])


def test_bulk_row_rules() -> None:
    """A row as a single registration takes it: name required, id optional, details through their parsers."""
    row = parse_row({"name": " Pump ", "id": "p-1", "tags": ["b", "a", "a"], "metadata": None}, 7)
    assert (row.row, row.name, row.device_id) == (7, "Pump", "p-1")
    assert row.details == {"tags": ("a", "b"), "metadata": {}}
    assert parse_row({"name": "x", "id": ""}, 1).device_id is None
    for raw, code in (
        ("text", "invalid_row"),
        ({"name": "x", "colour": "red"}, "invalid_field"),
        ({"id": "x"}, "invalid_name"),
        ({"name": "x", "id": "a/b"}, "invalid_device_id"),
        ({"name": "x", "id": 5}, "invalid_device_id"),
        ({"name": "x", "settings": []}, "invalid_settings"),
    ):
        with pytest.raises(InvalidValue) as caught:
            parse_row(raw, 1)
        assert caught.value.code == code, raw


@given(st.dictionaries(st.sampled_from([*ROW_FIELDS, "other"]), json_values, max_size=8) | json_values)
def test_parse_row_returns_a_row_or_raises_ours(raw: object) -> None:
    """Any JSON value: a DeviceRow or InvalidValue, never anything else (a trust boundary)."""
    try:
        parse_row(raw, 1)
    except InvalidValue:
        pass
