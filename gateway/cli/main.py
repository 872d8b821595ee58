"""Entry point: global ``--config``, then ``init``, ``serve``, ``devices``, ``operators``, ``tail``,
``readings``, ``health``, ``simulate``, ``tokens``, ``audit``, ``connect-failures``, ``groups``,
``sites``, ``profiles``."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Annotated

import typer

import gateway
from gateway.cli import (
    audit,
    data,
    devices,
    failures,
    groups,
    operators,
    profiles,
    simulate,
    sites,
    tail,
    tokens,
)
from gateway.cli.common import State, fails_cleanly, print_json, settings_from

# _SERVICE_ONLY: `init` and `serve` import the service (gateway.app: FastAPI, uvicorn,
# SQLAlchemy, amqtt) inside their bodies. Imported here it cost every client command about
# 1.5 s of start-up; tests/integration/test_cli_credentials.py checks it stays out.

app = typer.Typer(
    name="gateway",
    help="MQTT device gateway with mutual TLS: devices get an identity, connect with client "
    "certificates, show up ONLINE/OFFLINE, and are cut off the moment you block or revoke them.\n\n"
    "Quick start: `gateway serve` in one terminal, then `gateway devices register NAME`.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gateway {gateway.__version__}")
        raise typer.Exit


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML settings file (default: config/gateway.toml when present)",
            envvar="GATEWAY_CONFIG",
            dir_okay=False,
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    state = State()
    state.config = config
    ctx.obj = state


@app.command()
@fails_cleanly
def init(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    new_admin_token: Annotated[
        bool,
        typer.Option(
            "--new-admin-token",
            help="Also create a fresh admin API token (when every admin token was revoked or lost).",
        ),
    ] = False,
) -> None:
    """Create the CA, server certificate, CRL, database and admin API token (never overwrites).

    The admin token is printed once and written to <data_dir>/admin.token (mode 0600).
    Locked out (all admin tokens revoked)? Run the second example on the gateway's host. Examples:

      gateway init

      gateway init --new-admin-token --json
    """
    from gateway import logs  # noqa: PLC0415 - see _SERVICE_ONLY
    from gateway.app import initialise  # noqa: PLC0415 - see _SERVICE_ONLY

    settings = settings_from(ctx)
    logs.configure(settings.logging)
    report = asyncio.run(initialise(settings, new_admin_token=new_admin_token))
    if json_out:
        print_json(
            {
                "created": report.created,
                "admin_token": report.admin_token,
                "admin_token_path": str(report.admin_token_path) if report.admin_token_path else None,
                "certs_dir": str(settings.paths.certs_dir),
                "data_dir": str(settings.paths.data_dir),
            }
        )
        return
    if not report.created:
        typer.echo("Already initialised; nothing changed.")
    for item in report.created:
        typer.echo(f"created {item}")
    if report.admin_token:
        typer.echo(f"\nAdmin API token (shown once, also saved to {report.admin_token_path}):")
        typer.echo(f"  {report.admin_token}")


@app.command(name="serve")
@fails_cleanly
def serve_command(ctx: typer.Context) -> None:
    """Run the MQTT listener and the HTTPS API (runs `init` first if needed).

    SIGTERM or Ctrl-C shut down cleanly: every device is marked OFFLINE with reason
    gateway_shutdown before the process exits. Examples:

      gateway serve

      gateway --config /etc/gateway/gateway.toml serve
    """
    from gateway import logs  # noqa: PLC0415 - see _SERVICE_ONLY
    from gateway.app import initialise, serve  # noqa: PLC0415 - see _SERVICE_ONLY

    settings = settings_from(ctx)
    logs.configure(settings.logging)
    report = asyncio.run(initialise(settings))
    if report.admin_token:
        # Printed once, to the terminal only (never to the log); also in admin.token (0600).
        typer.echo(f"Admin API token (shown once, also saved to {report.admin_token_path}):", err=True)
        typer.echo(f"  {report.admin_token}", err=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())


# Registered after `init` and `serve` so that `gateway --help` lists those two first.
app.add_typer(devices.app, name="devices")
app.add_typer(operators.app, name="operators")
app.command("tail")(tail.tail)
app.command("readings")(data.readings)
app.command("health")(data.health)
app.command("simulate")(simulate.simulate)
app.add_typer(tokens.app, name="tokens")
app.command("audit")(audit.audit)
app.add_typer(failures.app, name="connect-failures")
app.add_typer(groups.app, name="groups")
app.add_typer(sites.app, name="sites")
app.add_typer(profiles.app, name="profiles")


def main() -> None:
    app()
