"""``gateway devices ...``: manage devices through the running gateway's API, and enroll as a device."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

import ca
from ca import files as ca_files
from gateway.cli.client import ApiClient
from gateway.cli.common import fails_cleanly, print_json, print_record, print_table, settings_from
from gateway.errors import ConfigError

app = typer.Typer(help="Register, enroll, list and manage devices.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL [default: from settings]")]

LIST_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("status", "STATUS"),
    ("connection", "CONNECTION"),
    ("blocked", "BLOCKED"),
    ("last_connected_at", "LAST CONNECTED"),
]


def _client(ctx: typer.Context, api: str | None = None) -> ApiClient:
    return ApiClient.for_settings(settings_from(ctx), api=api)


def _show(device: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(device)
    else:
        print_record(device)


@app.command()
@fails_cleanly
def register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A human-readable name.")],
    device_id: Annotated[
        str | None,
        typer.Option("--id", help="Choose the id (e.g. a hardware serial) [default: dev_<random>]"),
    ] = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Create a pending device and its one-time registration token (shown once).

    Example: gateway devices register "Boiler room sensor" --id SN-0042
    """
    body: dict[str, Any] = {"name": name}
    if device_id is not None:
        body["id"] = device_id
    with _client(ctx, api) as client:
        result = client.request("POST", "/devices", json=body)
    device = result["data"]
    if json_out:
        print_json(
            {
                "id": device["id"],
                "name": device["name"],
                "status": device["status"],
                "registration_token": result["registration_token"],
                "token_expires_at": result["token_expires_at"],
            }
        )
        return
    typer.echo(f"registered {device['id']} ({device['name']}), status {device['status']}")
    typer.echo(f"registration token (one use, expires {result['token_expires_at']}):")
    typer.echo(f"  {result['registration_token']}")
    typer.echo(
        f"enroll the device with: gateway devices enroll --token {result['registration_token']} --out DIR"
    )


@app.command()
@fails_cleanly
def enroll(
    ctx: typer.Context,
    token: Annotated[
        str,
        typer.Option("--token", help="The one-time registration token.", envvar="GATEWAY_REGISTRATION_TOKEN"),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for device.key, device.crt and ca.crt.", file_okay=False)
    ],
    api: ApiOpt = None,
    cacert: Annotated[
        Path | None,
        typer.Option(
            "--cacert", help="The gateway's CA certificate [default: <certs_dir>/ca.crt]", dir_okay=False
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key in --out.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Act as a device: make a key locally, send a CSR with the token, save the certificate.

    The private key never leaves this machine. Example:
    gateway devices enroll --token grt_... --out ./device-1 --api https://gw.example:8443 --cacert ca.crt
    """
    key_path, cert_path, ca_path = out / "device.key", out / "device.crt", out / "ca.crt"
    if key_path.exists() and not force:
        raise ConfigError(f"{key_path} already exists; pass --force to replace it")
    settings = settings_from(ctx)
    key = ca.generate_key()
    csr = ca.make_csr(key, "device").decode("ascii")
    with ApiClient.for_settings(settings, api=api, authenticated=False, cacert=cacert) as client:
        result = client.request("POST", "/devices/provision", json={"token": token, "csr": csr})
    out.mkdir(parents=True, exist_ok=True)
    ca_files.write_private_key(key_path, key, overwrite=True)
    ca_files.write_public(cert_path, result["certificate"].encode("ascii"))
    ca_files.write_public(ca_path, result["ca_chain"].encode("ascii"))
    summary = {
        "id": result["device_id"],
        "certificate_serial": result["certificate_serial"],
        "not_after": result["not_after"],
    }
    if json_out:
        print_json(summary)
        return
    typer.echo(
        f"enrolled {summary['id']}: certificate {summary['certificate_serial']} "
        f"valid until {summary['not_after']}"
    )
    typer.echo(f"  key  {key_path} (0600)\n  cert {cert_path}\n  ca   {ca_path}")


@app.command("list")
@fails_cleanly
def list_devices(
    ctx: typer.Context,
    search: Annotated[str | None, typer.Option("--search", help="Text in the name or id (any case).")] = None,
    blocked: Annotated[str, typer.Option("--blocked", help="all | hide | only")] = "all",
    status: Annotated[
        str | None, typer.Option("--status", help="pending | active | inactive | maintenance | revoked")
    ] = None,
    connection: Annotated[str | None, typer.Option("--connection", help="online | offline")] = None,
    sort: Annotated[str | None, typer.Option("--sort", help="e.g. -last_connected_at,name")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """List devices. Example: gateway devices list --status active --blocked hide --sort name"""
    params: dict[str, Any] = {"blocked": blocked, "limit": limit, "offset": offset}
    for key, value in (("search", search), ("status", status), ("connection", connection), ("sort", sort)):
        if value is not None:
            params[key] = value
    with _client(ctx, api) as client:
        result = client.request("GET", "/devices", params=params)
    if json_out:
        print_json({"data": result["data"], "total": result["total"]})
        return
    print_table(result["data"], LIST_COLUMNS)
    shown = len(result["data"])
    typer.echo(f"{shown} of {result['total']} device(s)" + (f" from offset {offset}" if offset else ""))


@app.command()
@fails_cleanly
def show(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Show one device."""
    with _client(ctx, api) as client:
        _show(client.request("GET", f"/devices/{device_id}")["data"], json_out)


@app.command()
@fails_cleanly
def rename(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str, typer.Argument(metavar="NAME")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Give a device a new name."""
    with _client(ctx, api) as client:
        _show(client.request("PATCH", f"/devices/{device_id}", json={"name": name})["data"], json_out)


def _action(path_suffix: str, method: str = "POST", body: dict[str, Any] | None = None, doc: str = "") -> Any:
    @fails_cleanly
    def command(
        ctx: typer.Context,
        device_id: Annotated[str, typer.Argument(metavar="ID")],
        json_out: JsonOpt = False,
        api: ApiOpt = None,
    ) -> None:
        with _client(ctx, api) as client:
            path = f"/devices/{device_id}{path_suffix}"
            result = (
                client.request(method, path, json=body) if body is not None else client.request(method, path)
            )
        _show(result["data"], json_out)

    command.__doc__ = doc
    return command


app.command("block")(
    _action("/block", doc="Refuse the device and cut its live session at once (certificates stay valid).")
)
app.command("unblock")(_action("/unblock", doc="Let a blocked device connect again."))
app.command("deactivate")(
    _action("", "PATCH", {"status": "inactive"}, "Take the device out of service (cuts its session).")
)
app.command("activate")(
    _action("", "PATCH", {"status": "active"}, "Put a deactivated or maintenance device back in service.")
)
app.command("maintenance")(
    _action(
        "", "PATCH", {"status": "maintenance"}, "Mark the device as in maintenance (it may still connect)."
    )
)
app.command("revoke")(
    _action("/revoke", doc="Final: revoke the device and all its certificates (CRL), cut its session.")
)


@app.command()
@fails_cleanly
def delete(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Revoke the device, cut its session and remove its record (certificates stay on the CRL)."""
    if (
        not yes
        and sys.stdin.isatty()
        and not typer.confirm(f"Delete {device_id} and revoke its certificates?")
    ):
        raise typer.Exit(1)
    with _client(ctx, api) as client:
        result = client.request("DELETE", f"/devices/{device_id}")
    if json_out:
        print_json(result)
    else:
        typer.echo(f"deleted {device_id}")
