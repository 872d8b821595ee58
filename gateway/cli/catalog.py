"""What ``gateway groups``, ``gateway sites`` and ``gateway profiles`` share: options, the API
client, JSON option values, and how a record or a deletion is shown.

Receives the command line's values; hands on API requests (through `ApiClient`) and output:
a table or ``key: value`` lines on a terminal, or with ``--json`` exactly one JSON document
(the record, or the API's response body for lists). The API judges every value; this module
only reads JSON option values (``'{"a": 1}'`` or ``@file.json``) so that they reach it intact.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.client import ApiClient
from gateway.cli.common import print_json, print_record, print_table, settings_from
from gateway.errors import ConfigError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="At most this many rows.")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="Skip this many rows.")]


def client(ctx: typer.Context, api: str | None) -> ApiClient:
    return ApiClient.for_settings(settings_from(ctx), api=api)


def json_value(text: str, option: str) -> Any:
    """A JSON option value, given inline or as ``@path`` (a file holding the JSON)."""
    source = text
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{option}: cannot read {path}: {exc}") from exc
    try:
        return json.loads(source)
    except ValueError as exc:
        raise ConfigError(f"{option}: not JSON ({exc})") from exc


def show(record: dict[str, Any], json_out: bool) -> None:
    """One record: the JSON document, or its fields one per line (nested JSON compacted)."""
    if json_out:
        print_json(record)
        return
    print_record({key: _line(value) for key, value in record.items()})


def show_page(
    result: dict[str, Any],
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str]],
    noun: str,
    json_out: bool,
) -> None:
    """A list response: with `json_out` the API's document as it came, else `rows` (the records
    as table cells) and a ``3 of 40 site(s)`` line."""
    if json_out:
        print_json(result)
        return
    print_table(rows, columns)
    typer.echo(f"{len(result['data'])} of {result['total']} {noun}(s)")


def show_created(record: dict[str, Any], kind: str, json_out: bool) -> None:
    """A record just created: the JSON document, or ``created site plant-north (Plant North)``."""
    if json_out:
        print_json(record)
        return
    typer.echo(f"created {kind} {record['id']} ({record['name']})")


def _line(value: Any) -> Any:
    """Lists and nested objects as compact JSON; a flat object stays one for `print_record`."""
    flat = isinstance(value, dict) and value and not any(isinstance(v, dict | list) for v in value.values())
    return value if flat or not isinstance(value, dict | list) else compact(value)


def confirmed(question: str, yes: bool) -> None:
    """Ask on a terminal (never in a script: stdin not a TTY) unless `yes`; exit 1 on no."""
    if not yes and sys.stdin.isatty() and not typer.confirm(question):
        raise typer.Exit(1)


def compact(value: Any) -> str | None:
    """A nested JSON value as one table cell."""
    if value is None or value in ({}, []):
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
