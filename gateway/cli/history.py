"""``gateway devices history ID``: a device's sessions through the running gateway's API.

Receives a device id and ``--limit``; calls ``GET /api/v1/devices/{id}/connections``
(devices:read) and hands on a table, newest session first, or with ``--json`` exactly
one JSON document: the API's response body.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.cli.client import ApiClient
from gateway.cli.common import fails_cleanly, print_json, print_table, settings_from

HISTORY_COLUMNS = [
    ("epoch", "EPOCH"),
    ("connected_at", "CONNECTED"),
    ("disconnected_at", "DISCONNECTED"),
    ("reason", "REASON"),
    ("client_ip", "ADDRESS"),
    ("certificate_serial", "CERTIFICATE"),
    ("messages_in", "MSG IN"),
    ("messages_out", "MSG OUT"),
    ("bytes_in", "BYTES IN"),
    ("bytes_out", "BYTES OUT"),
]


@fails_cleanly
def history(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID", help="The device id.")],
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1000, help="At most this many sessions.")
    ] = 20,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON document (the API's response).")
    ] = False,
    api: Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")] = None,
) -> None:
    """List a device's sessions, newest first, with why each ended.

    For each: connected and disconnected at, why it ended, from where, with which certificate,
    and the messages and bytes each way (a running session with its counters so far;
    DISCONNECTED is - while it lasts).

    Example: gateway devices history boiler-1 --limit 5
    """
    with ApiClient.for_settings(settings_from(ctx), api=api) as client:
        result = client.request("GET", f"/devices/{device_id}/connections", params={"limit": limit})
    if json_out:
        print_json(result)
        return
    if not result["data"]:
        typer.echo(f"{device_id} has no recorded sessions")
        return
    print_table(result["data"], HISTORY_COLUMNS)
    if result["total"] > len(result["data"]):
        typer.echo(f"({len(result['data'])} of {result['total']} sessions; --limit for more)")
