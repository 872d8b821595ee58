"""``gateway tokens create|list|revoke``: operator API tokens, through the running gateway's API
(``/api/v1/tokens``, admin scope). A new token's value is printed once and never again."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from gateway.cli.client import ApiClient
from gateway.cli.common import fails_cleanly, print_json, print_record, print_table, settings_from
from gateway.core.clock import iso, parse_duration
from gateway.errors import ApiError, ConfigError, InvalidValue

app = typer.Typer(
    help="Create, list and revoke API tokens (scopes devices:read, devices:write, admin).",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")]

COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("scopes", "SCOPES"),
    ("state", "STATE"),
    ("created_at", "CREATED"),
    ("expires_at", "EXPIRES"),
    ("last_used_at", "LAST USED"),
    ("mark", ""),
]


def _client(ctx: typer.Context, api: str | None) -> ApiClient:
    return ApiClient.for_settings(settings_from(ctx), api=api)


def expiry(text: str) -> dict[str, str]:
    """``--expires`` as the API takes it: a duration from now (30d, 12h) or an ISO 8601 time."""
    try:
        parse_duration(text)
    except InvalidValue:
        pass
    else:
        return {"expires_in": text}
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InvalidValue(
            f"invalid --expires {text!r}: a duration (30d, 12h) or an ISO 8601 time", code="invalid_expiry"
        ) from exc
    return {"expires_at": iso(moment) or ""}


@app.command()
@fails_cleanly
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Unique for good: A-Z a-z 0-9 . _ -, starting with a letter.")],
    scopes: Annotated[
        list[str],
        typer.Option(
            "--scope",
            "-s",
            help="devices:read, devices:write or admin; repeat (or separate with commas) for several.",
        ),
    ],
    expires: Annotated[
        str | None,
        typer.Option(
            "--expires", metavar="WHEN", help="Expire after a duration (30d, 12h) or at an ISO time."
        ),
    ] = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Create an API token; its value is printed once (the gateway keeps only a hash).

    Example: gateway tokens create ci-reader --scope devices:read --expires 30d
    """
    body: dict[str, Any] = {
        "name": name,
        "scopes": [part.strip() for scope in scopes for part in scope.split(",") if part.strip()],
    }
    if expires is not None:
        body.update(expiry(expires))
    with _client(ctx, api) as client:
        result = client.request("POST", "/tokens", json=body)
    token = result["data"]
    if json_out:
        print_json({**token, "token": result["token"]})
        return
    until = f", expires {token['expires_at']}" if token["expires_at"] else ", never expires"
    typer.echo(f"created token {token['id']} {token['name']!r} ({' '.join(token['scopes'])}{until})")
    typer.echo("token (shown once; use it as GATEWAY_TOKEN or Authorization: Bearer ...):")
    typer.echo(f"  {result['token']}")


@app.command("list")
@fails_cleanly
def list_tokens(ctx: typer.Context, json_out: JsonOpt = False, api: ApiOpt = None) -> None:
    """List every token, revoked and expired ones too (never their values); * marks the one in use.

    Example: gateway tokens list --json
    """
    with _client(ctx, api) as client:
        result = client.request("GET", "/tokens")
    if json_out:
        print_json({"data": result["data"], "total": result["total"]})
        return
    rows = [
        {**t, "scopes": ",".join(t["scopes"]), "mark": "*" if t["current"] else ""} for t in result["data"]
    ]
    print_table(rows, COLUMNS)
    typer.echo(f"{result['total']} token(s); * = the token this command used")


@app.command()
@fails_cleanly
def revoke(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="ID|NAME")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Revoke even the last usable admin token (locks every operator out)."),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Revoke the token this command uses without asking.")
    ] = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Revoke a token at once: its next request is refused. Revoked tokens stay listed.

    Revoking the token this command runs with asks first (--yes skips the question); the last
    usable admin token is refused unless --force.

    Example: gateway tokens revoke ci-reader
    """
    with _client(ctx, api) as client:
        listed = client.request("GET", "/tokens")["data"]
        target = next((t for t in listed if ref in (str(t["id"]), t["name"])), None)
        if target is not None and target["current"]:
            _confirm_own(target, yes=yes)
        try:
            result = client.request(
                "DELETE", f"/tokens/{ref}", params={"force": "true" if force else "false"}
            )
        except ApiError as exc:
            if exc.code == "last_admin_token":
                raise ApiError(
                    f"{exc.message.removesuffix(', or force it')}, or pass --force", code=exc.code
                ) from exc
            raise
    token = result["data"]
    if json_out:
        print_json(token)
        return
    typer.echo(f"revoked token {token['id']} {token['name']!r}")
    print_record({key: token[key] for key in ("scopes", "created_at", "last_used_at", "revoked_at")})


def _confirm_own(token: dict[str, Any], *, yes: bool) -> None:
    warning = (
        f"warning: {token['name']!r} is the token this command runs with "
        "(GATEWAY_TOKEN or <data_dir>/admin.token); commands need another token afterwards"
    )
    typer.echo(warning, err=True)
    if yes:
        return
    if not sys.stdin.isatty():
        raise ConfigError("refusing to revoke the token in use without --yes")
    if not typer.confirm("Revoke it?"):
        raise typer.Exit(1)
