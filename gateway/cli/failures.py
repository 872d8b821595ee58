"""``gateway connect-failures``: refused CONNECTs, and approving an unknown certificate.

Receives the command line's options; calls ``GET /api/v1/connect-failures``
(devices:read) and ``POST /api/v1/connect-failures/{fingerprint}/approve`` (admin) of
the running gateway, and hands on a table, or with ``--json`` exactly one JSON
document: the API's response body.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gateway.cli.client import ApiClient
from gateway.cli.common import fails_cleanly, print_json, print_table, settings_from

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (the API's response).")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")]

FAILURE_COLUMNS = [
    ("fingerprint", "FINGERPRINT"),
    ("reason", "REASON"),
    ("count", "COUNT"),
    ("last_seen_at", "LAST SEEN"),
    ("last_client_ip", "ADDRESS"),
    ("last_client_id", "CLIENT ID"),
    ("device_id", "DEVICE"),
    ("note", "NOTE"),
]

# No help= here: it would hide the callback's docstring, the help of the listing it does.
app = typer.Typer(invoke_without_command=True)


def _note(failure: dict[str, Any]) -> str | None:
    if failure["approved_device_id"]:
        return f"approved as {failure['approved_device_id']}"
    if failure["approvable"]:
        subject = (failure.get("certificate") or {}).get("subject", "")
        return f"approvable ({subject})" if subject else "approvable"
    return None


@app.callback()
@fails_cleanly
def connect_failures(
    ctx: typer.Context,
    reason: Annotated[
        str | None,
        typer.Option("--reason", help="Only this reason, e.g. unknown_certificate, device_blocked."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1000, help="At most this many rows.")
    ] = 100,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Refused connections, grouped by certificate (or address) and reason; approve unknown ones.

    Alone it lists them, most recently seen first: one row per certificate fingerprint (or
    client address) and reason, with how often and when it was last seen. An unknown
    certificate of a configured external CA can be approved with
    `gateway connect-failures approve FINGERPRINT --name NAME`. Examples:

      gateway connect-failures

      gateway connect-failures --reason unknown_certificate --limit 20 --json
    """
    if ctx.invoked_subcommand is not None:
        return
    params: dict[str, Any] = {"limit": limit}
    if reason:
        params["reason"] = reason
    with ApiClient.for_settings(settings_from(ctx), api=api) as client:
        result = client.request("GET", "/connect-failures", params=params)
    if json_out:
        print_json(result)
        return
    if not result["data"]:
        typer.echo("no refused connections recorded")
        return
    print_table([{**row, "note": _note(row)} for row in result["data"]], FAILURE_COLUMNS)


@app.command()
@fails_cleanly
def approve(
    ctx: typer.Context,
    fingerprint: Annotated[str, typer.Argument(help="The unknown certificate's SHA-256 fingerprint.")],
    name: Annotated[str, typer.Option("--name", help="The new device's name.")],
    device_id: Annotated[
        str | None, typer.Option("--id", help="The new device's id (default: dev_<random>).")
    ] = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Create a device bound to an unknown certificate that a configured external CA issued.

    It connects with that certificate from now on (client id = the device id).

    Example: gateway connect-failures approve 3f2a...e9 --name "Pump 7" --id pump-7
    """
    body: dict[str, Any] = {"name": name}
    if device_id is not None:
        body["device_id"] = device_id
    with ApiClient.for_settings(settings_from(ctx), api=api) as client:
        result = client.request("POST", f"/connect-failures/{fingerprint}/approve", json=body)
    if json_out:
        print_json(result["data"])
        return
    device = result["data"]
    typer.echo(f"approved: device {device['id']} ({device['name']}), status {device['status']}")
    cert = device.get("certificate")
    if cert:
        typer.echo(f"certificate {cert['serial']}, valid until {cert['not_after']}")
    typer.echo(f"it connects with that certificate and client id {device['id']}")
