"""``gateway devices ...``: manage devices and their credentials through the running gateway's API,
and enroll (or renew) as a device."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

import ca
from ca import files as ca_files
from gateway.cli import bulk, history, listing, renewal
from gateway.cli.catalog import show
from gateway.cli.client import ApiClient
from gateway.cli.common import (
    fails_cleanly,
    mqtt_target,
    print_json,
    print_record,
    print_table,
    settings_from,
)
from gateway.config import Settings
from gateway.errors import ConfigError

app = typer.Typer(
    help="Register, enroll, list and manage devices and their certificates.", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")]

CERTIFICATE_COLUMNS = [
    ("serial", "SERIAL"),
    ("source", "SOURCE"),
    ("not_after", "NOT AFTER"),
    ("first_used_at", "FIRST USED"),
    ("revoked_at", "REVOKED"),
    ("renews", "RENEWS"),
]


def _client(ctx: typer.Context, api: str | None = None) -> ApiClient:
    return ApiClient.for_settings(settings_from(ctx), api=api)


@app.command()
@fails_cleanly
def register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A human-readable name.")],
    device_id: Annotated[
        str | None,
        typer.Option("--id", help="Choose the id, e.g. a hardware serial (default: dev_<random>)"),
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
    _print_registration(result, json_out, "registered")


def _print_registration(result: dict[str, Any], json_out: bool, done: str) -> None:
    """A device with its new one-time token (shown once) and how to enroll with it."""
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
    typer.echo(f"{done} {device['id']} ({device['name']}), status {device['status']}")
    typer.echo(f"registration token (one use, expires {result['token_expires_at']}):")
    typer.echo(f"  {result['registration_token']}")
    typer.echo(
        f"enroll the device with: gateway devices enroll --token {result['registration_token']} --out DIR"
    )


@app.command()
@fails_cleanly
def reset(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    revoke_existing: Annotated[
        bool,
        typer.Option(
            "--revoke-existing",
            help="Also revoke every certificate of the device now (CRL) and cut its live session.",
        ),
    ] = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Give a device a fresh one-time registration token, to enroll it again (e.g. a replaced board).

    Without --revoke-existing its certificates keep working until it enrolls with the new token
    (enrolling revokes them); with it they are revoked at once (CRL) and its live session is
    cut, so the device is off until it enrolls. Example:

      gateway devices reset SN-0042 --revoke-existing
    """
    params = {"revoke_existing": "true" if revoke_existing else "false"}
    with _client(ctx, api) as client:
        result = client.request("POST", f"/devices/{device_id}/credentials/reset", params=params)
    _print_registration(result, json_out, "reset credentials of")


@app.command()
@fails_cleanly
def enroll(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="Directory for device.key, device.crt and ca.crt.", file_okay=False)
    ],
    token: Annotated[
        str | None,
        typer.Option("--token", help="The one-time registration token.", envvar="GATEWAY_REGISTRATION_TOKEN"),
    ] = None,
    api: ApiOpt = None,
    cacert: Annotated[
        Path | None,
        typer.Option(
            "--cacert",
            help="The gateway's CA certificate (default: <certs_dir>/ca.crt; with --renew: DIR/ca.crt)",
            dir_okay=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key in --out.")] = False,
    renew: Annotated[
        bool,
        typer.Option(
            "--renew", help="Renew the certificate in --out over MQTT, connecting with it (no token)."
        ),
    ] = False,
    host: Annotated[
        str | None, typer.Option("--host", help="MQTT host for --renew (default: mqtt.host)")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="MQTT port for --renew (default: mqtt.port)")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the gateway with --renew.")
    ] = 30.0,
    json_out: JsonOpt = False,
) -> None:
    """Act as a device: make a key locally, get a certificate for it, save both in --out.

    With --token: send a CSR with the one-time token to the API. With --renew: connect over
    MQTT with the certificate already in --out and ask for a new one on
    devices/{id}/certificate/renew; the new key and certificate replace the old ones only once
    the gateway has issued them (the old pair is kept as *.previous until the new one has
    connected). The private key never leaves this machine. Examples:

      gateway devices enroll --token grt_... --out ./device-1 --api https://gw.example:8443 --cacert ca.crt

      gateway devices enroll --renew --out ./device-1 --host gw.example --port 8883
    """
    settings = settings_from(ctx)
    if renew:
        given = [option for option in ("token", "api", "force") if _on_command_line(ctx, option)]
        if given:
            dropped = ", ".join(f"--{option}" for option in given)
            raise ConfigError(f"--renew uses the certificate in --out; drop {dropped}")
        files = renewal.DeviceFiles(out)
        target = renewal.Target(*mqtt_target(settings, host, port), cacert or files.ca, timeout)
        renewed = asyncio.run(renewal.renew(files, target))
        summary = {
            "id": renewed.device_id,
            "certificate_serial": renewed.certificate_serial,
            "not_after": renewed.not_after,
        }
        paths = (files.key, files.cert, files.ca)
        verb = "renewed"
    else:
        if host is not None or port is not None:
            raise ConfigError("--host and --port go with --renew (enrolling with a token uses the API)")
        if token is None:
            raise ConfigError("pass --token (from `gateway devices register`), or --renew to renew")
        paths = (out / "device.key", out / "device.crt", out / "ca.crt")
        summary = _enroll_with_token(settings, token, paths, api=api, cacert=cacert, force=force)
        verb = "enrolled"
    if json_out:
        print_json(summary)
        return
    typer.echo(
        f"{verb} {summary['id']}: certificate {summary['certificate_serial']} "
        f"valid until {summary['not_after']}"
    )
    typer.echo(f"  key  {paths[0]} (0600)\n  cert {paths[1]}\n  ca   {paths[2]}")


def _on_command_line(ctx: typer.Context, parameter: str) -> bool:
    """Whether the user typed this option (not a default, not an environment variable)."""
    source = ctx.get_parameter_source(parameter)
    return source is not None and source.name == "COMMANDLINE"


def _enroll_with_token(
    settings: Settings,
    token: str,
    paths: tuple[Path, Path, Path],
    *,
    api: str | None,
    cacert: Path | None,
    force: bool,
) -> dict[str, Any]:
    key_path, cert_path, ca_path = paths
    if key_path.exists() and not force:
        raise ConfigError(f"{key_path} already exists; pass --force to replace it")
    key = ca.generate_key()
    csr = ca.make_csr(key, "device").decode("ascii")
    with ApiClient.for_settings(settings, api=api, authenticated=False, cacert=cacert) as client:
        result = client.request("POST", "/devices/provision", json={"token": token, "csr": csr})
    key_path.parent.mkdir(parents=True, exist_ok=True)
    ca_files.write_private_key(key_path, key, overwrite=True)
    ca_files.write_public(cert_path, result["certificate"].encode("ascii"))
    ca_files.write_public(ca_path, result["ca_chain"].encode("ascii"))
    return {
        "id": result["device_id"],
        "certificate_serial": result["certificate_serial"],
        "not_after": result["not_after"],
    }


# list, summary, show, update, rename (gateway.cli.listing); here, so that --help lists them in this order.
listing.register(app)


@app.command()
@fails_cleanly
def certificates(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """List every certificate of a device, oldest first, revoked ones included.

    RENEWS names the certificate a renewal replaces; the old one is revoked when the new one
    is first used.

    Example: gateway devices certificates SN-0042
    """
    with _client(ctx, api) as client:
        result = client.request("GET", f"/devices/{device_id}/certificates")
    if json_out:
        print_json({"data": result["data"]})
        return
    print_table(result["data"], CERTIFICATE_COLUMNS)
    typer.echo(f"{len(result['data'])} certificate(s)")


@app.command("attach-cert")
@fails_cleanly
def attach_cert(
    ctx: typer.Context,
    device_id: Annotated[str, typer.Argument(metavar="ID")],
    cert: Annotated[
        Path,
        typer.Option("--cert", help="PEM certificate issued by a CA in ca.external_anchors.", dir_okay=False),
    ],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Bind a certificate of an external CA (ca.external_anchors) to a device, by its fingerprint.

    The device then connects with that certificate and its own key. Example:

      gateway devices attach-cert SN-0042 --cert vendor/SN-0042.pem
    """
    try:
        pem = cert.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the certificate {cert}: {exc}") from exc
    with _client(ctx, api) as client:
        result = client.request("POST", f"/devices/{device_id}/certificates", json={"certificate": pem})
    if json_out:
        print_json(result["data"])
        return
    typer.echo(f"attached certificate {result['data']['serial']} to {device_id}")
    print_record(result["data"])


def _action(
    path_suffix: str, method: str = "POST", body: dict[str, Any] | None = None, *, doc: str, example: str
) -> Any:
    """A command that sends one request about a device and shows the device; `doc` is its help
    line, `example` a command line for its --help."""

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
        show(result["data"], json_out)

    command.__doc__ = f"{doc}\n\nExample: {example}"
    return command


app.command("block")(
    _action(
        "/block",
        doc="Refuse the device and cut its live session at once (certificates stay valid).",
        example="gateway devices block SN-0042",
    )
)
app.command("unblock")(
    _action("/unblock", doc="Let a blocked device connect again.", example="gateway devices unblock SN-0042")
)
app.command("deactivate")(
    _action(
        "",
        "PATCH",
        {"status": "inactive"},
        doc="Take the device out of service (cuts its session).",
        example="gateway devices deactivate SN-0042 --json",
    )
)
app.command("activate")(
    _action(
        "",
        "PATCH",
        {"status": "active"},
        doc="Put a deactivated or maintenance device back in service.",
        example="gateway devices activate SN-0042",
    )
)
app.command("maintenance")(
    _action(
        "",
        "PATCH",
        {"status": "maintenance"},
        doc="Mark the device as in maintenance (it may still connect).",
        example="gateway devices maintenance SN-0042",
    )
)
app.command("revoke")(
    _action(
        "/revoke",
        doc="Final: revoke the device and all its certificates (CRL), cut its session.",
        example="gateway devices revoke SN-0042 --json",
    )
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
    """Revoke the device, cut its session and remove its record (certificates stay on the CRL).

    Asks first on a terminal, unless --yes. Example:

      gateway devices delete SN-0042 --yes
    """
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


# Bulk registration and export (gateway.cli.bulk).
app.command("import")(bulk.import_devices)
app.command("export")(bulk.export_devices)

# A device's sessions (gateway.cli.history).
app.command("history")(history.history)
