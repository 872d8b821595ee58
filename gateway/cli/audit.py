"""``gateway audit``: who did what and when, from ``GET /api/v1/audit`` (admin), newest first.

Receives filters (``--since``/``--until`` as ISO 8601 or a duration back, as in
``gateway readings``); hands on a table (time, actor, action, target, what changed, in
`change_summary`) or with ``--json`` one document ``{"data": [...], "total": N}``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gateway.cli.client import ApiClient
from gateway.cli.common import cell, fails_cleanly, print_json, print_table, settings_from
from gateway.cli.data import moment
from gateway.core.clock import iso, utcnow
from gateway.errors import ConfigError

API_PAGE = 1000  # the audit route's largest `limit`
SUMMARY_WIDTH = 80

COLUMNS = [
    ("at", "TIME"),
    ("actor", "ACTOR"),
    ("action", "ACTION"),
    ("target", "TARGET"),
    ("change", "CHANGE"),
]


def _short(value: Any, width: int = 24) -> str:
    if isinstance(value, dict):
        value = value.get("serial", "{...}")  # a certificate names itself by its serial
    elif isinstance(value, list):
        value = ",".join(str(item) for item in value) or "[]"
    text = cell(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def change_summary(entry: dict[str, Any], width: int = SUMMARY_WIDTH) -> str:
    """What changed, short: ``name: Pump -> Pump A``; ``created``/``deleted``; else the detail."""
    before, after = entry.get("before"), entry.get("after")
    if before is not None and after is not None:
        changed = [key for key in after if before.get(key) != after.get(key)]
        text = "; ".join(f"{key}: {_short(before.get(key))} -> {_short(after.get(key))}" for key in changed)
        text = text or "no change"
    elif after is not None:
        text = "created " + (after.get("name") or "")
    elif before is not None:
        text = "deleted " + (before.get("name") or "")
    else:
        detail = entry.get("detail") or {}
        text = " ".join(f"{key}={_short(value)}" for key, value in detail.items())
    text = text.strip()
    return text if len(text) <= width else text[: width - 3] + "..."


@fails_cleanly
def audit(
    ctx: typer.Context,
    actor: Annotated[
        str | None, typer.Option("--actor", help="e.g. token:admin, device:SN-0042, system")
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(
            "--action", help="Exact (device.blocked) or a prefix ending in a dot (device., token.)."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", metavar="ID", help="Entries about this device.")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", metavar="NAME", help="Entries about this API token.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="From then on: ISO 8601 or a duration back (1h, 7d).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Before then: ISO 8601 or a duration back.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100_000, help="At most this many.")] = 100,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    api: Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")] = None,
) -> None:
    """Show the audit trail, newest first: every operator action with who, when, before and after.

    Examples:

    gateway audit --device SN-0042

    gateway audit --action token. --since 7d
    """
    if device is not None and token is not None:
        raise ConfigError("pass --device or --token, not both")
    params: dict[str, Any] = {}
    now = utcnow()
    for key, value in (
        ("actor", actor),
        ("action", action),
        ("since", iso(moment(since, now, "--since")) if since else None),
        ("until", iso(moment(until, now, "--until")) if until else None),
    ):
        if value is not None:
            params[key] = value
    if device is not None:
        params.update(target_type="device", target_id=device)
    if token is not None:
        params.update(target_type="token", target_id=token)
    entries: list[dict[str, Any]] = []
    total = 0
    with ApiClient.for_settings(settings_from(ctx), api=api) as client:
        while len(entries) < limit:
            page = client.request(
                "GET",
                "/audit",
                params={**params, "limit": min(API_PAGE, limit - len(entries)), "offset": len(entries)},
            )
            entries += page["data"]
            total = page["total"]
            if not page["data"] or len(entries) >= total:
                break
    if json_out:
        print_json({"data": entries, "total": total})
        return
    rows = [
        {**e, "target": f"{e['target_type']}:{e['target_id']}", "change": change_summary(e)} for e in entries
    ]
    print_table(rows, COLUMNS)
    typer.echo(f"{len(entries)} of {total} entr{'y' if total == 1 else 'ies'}")
