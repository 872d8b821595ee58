"""``gateway readings ID`` and ``gateway health ID``: a device's data through the running gateway's API.

Receives the command line's options; turns ``--since``/``--until`` (ISO 8601 or a
duration back from now, such as ``1h``) into UTC times once, in `moment`; calls the
read-scope data routes (DESIGN.md §6) and hands on a table, or with ``--json``
exactly one JSON document: the API's response body (pages merged when ``--limit``
exceeds one API page, with the ``next_cursor`` of the last one).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from gateway.cli.client import ApiClient
from gateway.cli.common import fails_cleanly, print_json, print_table, settings_from
from gateway.core.clock import iso, parse_duration, utcnow
from gateway.errors import InvalidValue

API_PAGE = 1000  # the data routes' largest `limit`

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (the API's response).")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")]
DeviceArg = Annotated[str, typer.Argument(metavar="ID", help="The device id.")]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since", help="From this time on: ISO 8601 (2024-05-01T12:00Z) or a duration back (1h, 7d)."
    ),
]
UntilOpt = Annotated[
    str | None, typer.Option("--until", help="Before this time: ISO 8601 or a duration back (30m).")
]
LimitOpt = Annotated[int, typer.Option("--limit", "-n", min=1, max=100_000, help="At most this many rows.")]
CursorOpt = Annotated[
    str | None, typer.Option("--cursor", help="Continue after a previous page (its next_cursor).")
]

READING_COLUMNS = [
    ("ts", "TIME"),
    ("component", "COMPONENT"),
    ("sensor", "SENSOR"),
    ("value", "VALUE"),
    ("unit", "UNIT"),
]
HEALTH_COLUMNS = [
    ("ts", "TIME"),
    ("uptime_s", "UPTIME S"),
    ("free_heap_bytes", "FREE HEAP"),
    ("rssi_dbm", "RSSI DBM"),
    ("connection_type", "LINK"),
    ("readings_sent", "SENT"),
    ("readings_dropped", "DROPPED"),
    ("battery_pct", "BATTERY %"),
]


def moment(text: str, now: datetime, option: str = "--since") -> datetime:
    """``text`` as UTC: ISO 8601 (naive is UTC), or a duration (``90s 30m 1h 7d 2w``) before ``now``."""
    raw = text.strip()
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        pass
    else:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    try:
        return now - parse_duration(raw)
    except InvalidValue as exc:
        raise InvalidValue(
            f"invalid {option} {text!r}: use ISO 8601 (2024-05-01T12:00:00Z) or a duration: 30m, 1h, 7d",
            code="invalid_time",
        ) from exc


def _window(since: str | None, until: str | None) -> dict[str, str]:
    now = utcnow()
    params: dict[str, str] = {}
    if since is not None:
        params["since"] = iso(moment(since, now, "--since")) or ""
    if until is not None:
        params["until"] = iso(moment(until, now, "--until")) or ""
    return params


def _pages(client: ApiClient, path: str, params: dict[str, Any], limit: int) -> dict[str, Any]:
    """Up to ``limit`` rows, newest first, following ``next_cursor``; one merged document."""
    rows: list[dict[str, Any]] = []
    cursor = params.pop("cursor", None)
    while True:
        page_params = {**params, "limit": min(API_PAGE, limit - len(rows))}
        if cursor:
            page_params["cursor"] = cursor
        page = client.request("GET", path, params=page_params)
        rows.extend(page["data"])
        cursor = page.get("next_cursor")
        if not cursor or len(rows) >= limit:
            return {"data": rows, "next_cursor": cursor}


def _display(value: Any) -> str:
    """A reading's value as typed: ``true``/``false`` for booleans, strings as they are."""
    if isinstance(value, bool):
        return json.dumps(value)
    return "-" if value is None else str(value)


def _more(document: dict[str, Any], what: str, shown: int) -> None:
    cursor = document.get("next_cursor")
    suffix = f"; older ones: --cursor {cursor}" if cursor else ""
    typer.echo(f"{shown} {what}, newest first{suffix}")


@fails_cleanly
def readings(
    ctx: typer.Context,
    device_id: DeviceArg,
    sensor: Annotated[str | None, typer.Option("--sensor", "-s", help="Only this sensor.")] = None,
    component: Annotated[str | None, typer.Option("--component", help="Only this component.")] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = 100,
    cursor: CursorOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Show a device's readings, newest first.

    Examples:

      gateway readings boiler-1 --since 1h

      gateway readings boiler-1 --sensor temperature --since 2024-05-01T00:00Z --until 2024-05-02T00:00Z

      gateway readings boiler-1 --component env --limit 5000 --json > readings.json
    """
    params: dict[str, Any] = _window(since, until)
    for key, value in (("sensor", sensor), ("component", component), ("cursor", cursor)):
        if value is not None:
            params[key] = value
    with ApiClient.for_settings(settings_from(ctx), api=api) as client:
        document = _pages(client, f"/devices/{device_id}/readings", params, limit)
    if json_out:
        print_json(document)
        return
    rows = [{**row, "value": _display(row["value"])} for row in document["data"]]
    if not rows:
        typer.echo(f"no readings from {device_id} match", err=True)
        return
    print_table(rows, READING_COLUMNS)
    _more(document, "reading(s)", len(rows))


def _summary_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"field": name, **stats}
        for name, stats in summary.items()
        if isinstance(stats, dict) and {"min", "max", "mean"} <= stats.keys()
    ]


def _round(value: Any) -> Any:
    return round(value, 2) if isinstance(value, float) else value


@fails_cleanly
def health(
    ctx: typer.Context,
    device_id: DeviceArg,
    latest: Annotated[bool, typer.Option("--latest", help="Only the newest health report.")] = False,
    summary: Annotated[
        str | None,
        typer.Option(
            "--summary", metavar="WINDOW", help="min, max and mean over the last WINDOW (15m, 1h, 7d)."
        ),
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: LimitOpt = 100,
    cursor: CursorOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Show a device's health reports (uptime, heap, signal, counters, battery), newest first.

    Examples:

      gateway health boiler-1 --latest

      gateway health boiler-1 --since 30m --limit 20

      gateway health boiler-1 --summary 24h --json
    """
    if latest and summary is not None:
        raise InvalidValue("pass --latest or --summary, not both", code="invalid_options")
    if (latest or summary is not None) and (since, until, cursor) != (None, None, None):
        raise InvalidValue("--since, --until and --cursor apply to the history only", code="invalid_options")
    if summary is not None:
        parse_duration(summary)  # refuse a bad window here, with the same message as the API
    with ApiClient.for_settings(settings_from(ctx), api=api) as client:
        base = f"/devices/{device_id}/health"
        if latest:
            document = client.request("GET", f"{base}/latest")
        elif summary is not None:
            document = client.request("GET", f"{base}/summary", params={"window": summary})
        else:
            params: dict[str, Any] = _window(since, until)
            if cursor is not None:
                params["cursor"] = cursor
            document = _pages(client, base, params, limit)
    if json_out:
        print_json(document)
        return
    data = document["data"]
    if latest:
        if data is None:
            typer.echo(f"no health report from {device_id} yet", err=True)
            return
        print_table([data], HEALTH_COLUMNS)
        extra = data.get("extra") or {}
        if extra:
            typer.echo("extra: " + json.dumps(extra, sort_keys=True))
    elif summary is not None:
        typer.echo(f"{data['samples']} health report(s) since {data['since']} (window {data['window']})")
        if data["samples"]:
            rows = [{k: _round(v) for k, v in row.items()} for row in _summary_rows(data)]
            print_table(rows, [("field", "FIELD"), ("min", "MIN"), ("max", "MAX"), ("mean", "MEAN")])
    elif not data:
        typer.echo(f"no health reports from {device_id} match", err=True)
    else:
        print_table(data, HEALTH_COLUMNS)
        _more(document, "health report(s)", len(data))
