"""``gateway profiles ...``: device profiles through the running gateway's API
(``/api/v1/device-profiles``): the components a kind of device is expected to announce, the
schema its settings follow and the settings operators may change; ``assign`` gives devices
a profile, ``conformance`` shows how they match it. Reads need devices:read, changes
devices:write, ``delete`` admin (``--force`` for a profile devices have: it is cleared).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gateway.cli.catalog import (
    ApiOpt,
    JsonOpt,
    LimitOpt,
    OffsetOpt,
    YesOpt,
    client,
    confirmed,
    json_value,
    show,
    show_created,
    show_page,
)
from gateway.cli.common import fails_cleanly, print_json, print_table

app = typer.Typer(
    help="Device profiles: expected components, a settings schema, writable settings.", no_args_is_help=True
)

COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("device_count", "DEVICES"),
    ("components_text", "COMPONENTS"),
    ("settings_text", "SETTINGS"),
]
CONFORMANCE_COLUMNS = [("device_id", "DEVICE"), ("conforms", "CONFORMS"), ("differences_text", "DIFFERENCES")]
FIELDS = ("name", "description", "components", "settings_schema", "writable")

DescriptionOpt = Annotated[str | None, typer.Option("--description", help="Free text ('' clears it).")]
ComponentsOpt = Annotated[
    str | None,
    typer.Option(
        "--components",
        metavar="JSON",
        help='Expected components, as devices announce them: \'[{"id": "pump", "sensors": '
        '[{"name": "flow", "value_type": "number"}]}]\' or @file.json.',
    ),
]
SchemaOpt = Annotated[
    str | None,
    typer.Option(
        "--settings-schema",
        metavar="JSON",
        help='Field -> spec, e.g. \'{"interval_s": {"type": "integer", "min": 1, "required": true}}\' '
        "or @file.json; null: settings unchecked.",
    ),
]
WritableOpt = Annotated[
    list[str] | None,
    typer.Option("--writable", "-w", help="A settings field operators may change (repeat; default: all)."),
]


def _given(
    description: str | None, components: str | None, schema: str | None, writable: list[str] | None
) -> dict[str, Any]:
    given: dict[str, Any] = {}
    if description is not None:
        given["description"] = description or None
    if components is not None:
        given["components"] = json_value(components, "--components")
    if schema is not None:
        given["settings_schema"] = json_value(schema, "--settings-schema")
    if writable is not None:
        given["writable"] = [field for item in writable for field in item.split(",") if field]
    return given


def _row(profile: dict[str, Any]) -> dict[str, Any]:
    schema = profile["settings_schema"]
    return {
        **profile,
        "components_text": ", ".join(c["id"] for c in profile["components"]) or None,
        "settings_text": None if schema is None else ", ".join(schema) or "(none)",
    }


def _differences(found: dict[str, Any]) -> str | None:
    parts = []
    for d in found["differences"]:
        where = d["component"] + (f".{d['sensor']}" if d["sensor"] else "")
        detail = f" ({d['expected']} expected, {d['announced'] or 'none'} announced)" if d["expected"] else ""
        parts.append(f"{d['kind']} {where}{detail}")
    return "; ".join(parts) or None


@app.command("list")
@fails_cleanly
def list_profiles(
    ctx: typer.Context,
    limit: LimitOpt = 100,
    offset: OffsetOpt = 0,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """List the profiles by name, with how many devices have each.

    Example: gateway profiles list --json
    """
    with client(ctx, api) as c:
        result = c.request("GET", "/device-profiles", params={"limit": limit, "offset": offset})
    show_page(result, [_row(p) for p in result["data"]], COLUMNS, "profile", json_out)


@app.command("show")
@fails_cleanly
def show_profile(
    ctx: typer.Context,
    profile_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Show one profile.

    Example: gateway profiles show pump-v2
    """
    with client(ctx, api) as c:
        show(c.request("GET", f"/device-profiles/{profile_id}")["data"], json_out)


@app.command()
@fails_cleanly
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A human-readable name.")],
    profile_id: Annotated[
        str | None, typer.Option("--id", help="Choose the id (default: prof_<random>).")
    ] = None,
    description: DescriptionOpt = None,
    components: ComponentsOpt = None,
    settings_schema: SchemaOpt = None,
    writable: WritableOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Declare a profile: the components its devices announce, the settings they take.

    Examples:

      gateway profiles create "Pump v2" --id pump-v2 --components @pump.json

      gateway profiles create Meter --id meter -w interval_s \\
        --settings-schema '{"interval_s": {"type": "integer", "min": 1}}'
    """
    body = {"name": name, **_given(description, components, settings_schema, writable)}
    if profile_id is not None:
        body["id"] = profile_id
    with client(ctx, api) as c:
        profile = c.request("POST", "/device-profiles", json=body)["data"]
    show_created(profile, "profile", json_out)


@app.command()
@fails_cleanly
def update(
    ctx: typer.Context,
    profile_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option("--name", help="A new name.")] = None,
    description: DescriptionOpt = None,
    components: ComponentsOpt = None,
    settings_schema: SchemaOpt = None,
    writable: WritableOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Change what the options name; the rest stays.

    A new schema is refused while a device with the profile has settings it does not allow.

    Example: gateway profiles update pump-v2 --description "Firmware 2.x" -w interval_s
    """
    with client(ctx, api) as c:
        current = c.request("GET", f"/device-profiles/{profile_id}")["data"]
        body = {key: current[key] for key in FIELDS}
        body.update(_given(description, components, settings_schema, writable))
        if name is not None:
            body["name"] = name
        profile = c.request("PUT", f"/device-profiles/{profile_id}", json=body)["data"]
    show(profile, json_out)


@app.command()
@fails_cleanly
def delete(
    ctx: typer.Context,
    profile_id: Annotated[str, typer.Argument(metavar="ID")],
    force: Annotated[
        bool, typer.Option("--force", help="Also when devices have it: their profile is cleared.")
    ] = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Delete a profile (admin); one that devices have needs --force.

    Example: gateway profiles delete pump-v2 --force --yes
    """
    confirmed(f"Delete profile {profile_id}?", yes)
    with client(ctx, api) as c:
        result = c.request(
            "DELETE", f"/device-profiles/{profile_id}", params={"force": "true" if force else "false"}
        )
    if json_out:
        print_json(result)
        return
    released = result["released_device_ids"]
    typer.echo(
        f"deleted profile {profile_id}" + (f"; cleared from {len(released)} device(s)" if released else "")
    )


@app.command()
@fails_cleanly
def assign(
    ctx: typer.Context,
    profile_id: Annotated[
        str, typer.Argument(metavar="PROFILE", help="A profile id, or '' to remove the profile.")
    ],
    device_ids: Annotated[list[str], typer.Argument(metavar="DEVICE...")],
    settings: Annotated[
        str | None,
        typer.Option(
            "--settings", metavar="JSON", help="Settings to set with the profile (JSON object or @file)."
        ),
    ] = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Give devices a profile (PATCH profile_id); their settings must conform to its schema.

    Stops at the first device refused; those before it keep their new profile. Examples:

      gateway profiles assign pump-v2 pump-1 pump-2 --settings '{"interval_s": 60}'

      gateway profiles assign '' pump-3
    """
    body: dict[str, Any] = {"profile_id": profile_id or None}
    if settings is not None:
        body["settings"] = json_value(settings, "--settings")
    done = []
    with client(ctx, api) as c:
        for device_id in device_ids:
            done.append(c.request("PATCH", f"/devices/{device_id}", json=body)["data"])
            if not json_out:
                typer.echo(f"{device_id}: profile {profile_id or '(none)'}")
    if json_out:
        print_json({"data": done})


@app.command()
@fails_cleanly
def conformance(
    ctx: typer.Context,
    profile_id: Annotated[str, typer.Argument(metavar="ID")],
    limit: LimitOpt = 100,
    offset: OffsetOpt = 0,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """How the devices with the profile match it: components and sensors missing or typed otherwise.

    Example: gateway profiles conformance pump-v2 --json
    """
    params = {"limit": limit, "offset": offset}
    with client(ctx, api) as c:
        result = c.request("GET", f"/device-profiles/{profile_id}/conformance", params=params)
    if json_out:
        print_json(result)
        return
    print_table([{**d, "differences_text": _differences(d)} for d in result["data"]], CONFORMANCE_COLUMNS)
    failing = sum(1 for d in result["data"] if not d["conforms"])
    typer.echo(f"{len(result['data'])} of {result['total']} device(s), {failing} not conforming")
