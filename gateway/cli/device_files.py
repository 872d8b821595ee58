"""Device registry files: CSV or JSON lines in (``gateway devices import``), out (``export``).

Receives a file's text; hands back one JSON object per device, with the line it came
from, and the problems found (line, message). Pure: no I/O beyond the text given.

Columns (CSV header, JSON keys): ``name`` (required), ``id`` (optional: the gateway makes
one), ``description``, ``tags``, ``location_ids``, ``metadata``, ``settings``, ``profile_id``. In CSV an
empty cell is an absent field; ``tags`` and ``location_ids`` are ``;``-separated (or a
JSON array, written so when a label holds a ``;``); ``metadata`` and ``settings`` are JSON
objects. What a value may be is the gateway's to judge (`gateway.core.device_fields`); this
module only reads and writes the two formats, so export then import gives the same devices.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from gateway.errors import InvalidValue

Format = Literal["csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl")
_SUFFIXES: dict[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

Kind = Literal["text", "labels", "object"]
# Column -> how a CSV cell holds it; the order is the export's.
COLUMNS: dict[str, Kind] = {
    "id": "text",
    "name": "text",
    "description": "text",
    "tags": "labels",
    "location_ids": "labels",
    "metadata": "object",
    "settings": "object",
    "profile_id": "text",
}
TOKEN_COLUMNS = ("id", "token", "expires_at")


@dataclass(frozen=True, slots=True)
class FileRow:
    line: int  # where the row starts in the file (1-based; the CSV header is line 1)
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FileError:
    line: int
    message: str
    device_id: str | None = None
    code: str = "invalid_row"


def format_of(path: Path | None, given: str | None) -> Format:
    """``--format`` when given, else from the file's suffix (.csv, .jsonl, .ndjson), else CSV."""
    if given is not None:
        lowered = given.lower()
        for fmt in FORMATS:
            if lowered == fmt:
                return fmt
        raise InvalidValue(f"unknown format {given!r}: csv or jsonl", code="invalid_format")
    return _SUFFIXES.get(path.suffix.lower(), "csv") if path is not None else "csv"


def read_rows(text: str, fmt: Format) -> tuple[list[FileRow], list[FileError]]:
    """The devices of a file and its problems; duplicate ids are problems (the later line's)."""
    rows, errors = _read_csv(text) if fmt == "csv" else _read_jsonl(text)
    first_line: dict[str, int] = {}
    unique: list[FileRow] = []
    for row in rows:
        device_id = row.fields.get("id")
        if isinstance(device_id, str) and device_id:
            if device_id in first_line:
                errors.append(
                    FileError(
                        row.line,
                        f"id {device_id} is also on line {first_line[device_id]}",
                        device_id,
                        "duplicate_id",
                    )
                )
                continue
            first_line[device_id] = row.line
        unique.append(row)
    return unique, sorted(errors, key=lambda error: error.line)


def _read_jsonl(text: str) -> tuple[list[FileRow], list[FileError]]:
    rows: list[FileRow] = []
    errors: list[FileError] = []
    # Split on line feeds only: str.splitlines would also split inside JSON strings (U+2028, U+0085).
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError as exc:
            errors.append(FileError(number, f"invalid JSON: {exc}"))
            continue
        if not isinstance(document, dict):
            errors.append(FileError(number, "not a JSON object"))
            continue
        rows.append(FileRow(number, document))
    return rows, errors


def _read_csv(text: str) -> tuple[list[FileRow], list[FileError]]:
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    rows: list[FileRow] = []
    errors: list[FileError] = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            return rows, [*errors, FileError(start, f"unreadable CSV: {exc}")]
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in cells]
            problem = _header_problem(header)
            if problem:
                return [], [FileError(start, problem)]
            continue
        if len(cells) > len(header):
            errors.append(FileError(start, f"{len(cells)} cells but {len(header)} columns"))
            continue
        try:
            fields = {
                column: _cell(column, cell)
                for column, cell in zip(header, cells, strict=False)
                if cell.strip()
            }
        except InvalidValue as exc:
            errors.append(FileError(start, exc.message))
            continue
        rows.append(FileRow(start, fields))
    if header is None:
        return [], [FileError(1, "empty file: expected a header line such as: id,name,tags")]
    return rows, errors


def _header_problem(header: list[str]) -> str | None:
    unknown = [column for column in header if column not in COLUMNS]
    if unknown:
        return f"unknown column(s) {', '.join(unknown) or '(empty)'}; known: {', '.join(COLUMNS)}"
    if len(set(header)) != len(header):
        return "a column appears twice in the header"
    if "name" not in header:
        return "no name column (required)"
    return None


def _cell(column: str, cell: str) -> Any:
    kind = COLUMNS[column]
    if kind == "text":
        return cell.strip() if column in ("id", "name") else cell
    raw = cell.strip()
    if kind == "labels":
        if raw.startswith("["):
            labels = _json(column, raw)
            if not isinstance(labels, list):
                raise InvalidValue(f"{column}: a JSON array or ;-separated labels")
            return labels
        return [label.strip() for label in raw.split(";") if label.strip()]
    value = _json(column, raw)
    if not isinstance(value, dict):
        raise InvalidValue(f"{column}: not a JSON object")
    return value


def _json(column: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidValue(f"{column}: invalid JSON: {exc}") from exc


# --- writing -----------------------------------------------------------------------------


def export_fields(device: dict[str, Any]) -> dict[str, Any]:
    """What import takes back of a device record (the API's Device JSON), in column order."""
    return {column: device[column] for column in COLUMNS if column in device}


def write_jsonl(devices: Iterable[dict[str, Any]], out: IO[str]) -> int:
    count = 0
    for device in devices:
        out.write(json.dumps(export_fields(device), ensure_ascii=False, separators=(",", ":")) + "\n")
        count += 1
    return count


class CsvWriter:
    """Rows of devices as CSV; the header comes from the first device's fields."""

    def __init__(self, out: IO[str]) -> None:
        self._writer = csv.writer(out)  # CRLF (RFC 4180): a lone CR in a cell gets quoted too
        self._columns: list[str] | None = None

    def write(self, device: dict[str, Any]) -> None:
        fields = export_fields(device)
        if self._columns is None:
            self._columns = list(fields)
            self._writer.writerow(self._columns)
        self._writer.writerow([_to_cell(column, fields.get(column)) for column in self._columns])

    def finish(self) -> None:
        if self._columns is None:  # no devices: the header alone, so that the file imports
            self._writer.writerow(["id", "name"])


def _to_cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    kind = COLUMNS[column]
    if kind == "labels":
        labels = [str(label) for label in value]
        if any(";" in label or label.startswith("[") for label in labels):
            return json.dumps(labels, ensure_ascii=False)
        return ";".join(labels)
    if kind == "object":
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")) if value else ""
    return str(value)
