"""``gateway groups ...``: device groups through the running gateway's API (``/api/v1/device-groups``).

Static groups list their members (``add``, ``remove``); dynamic ones save a device filter
(``--tag``, ``--status``, ... or ``--filter JSON``) and their members are the devices it
matches. ``members`` lists either kind's devices like ``gateway devices list``. Reads need
devices:read, changes devices:write, ``delete`` admin.
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
    compact,
    confirmed,
    json_value,
    show,
    show_page,
)
from gateway.cli.common import fails_cleanly, print_json, print_table
from gateway.errors import ConfigError

app = typer.Typer(
    help="Device groups: static (explicit members) or dynamic (a saved device filter).", no_args_is_help=True
)

COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("kind", "KIND"),
    ("member_count", "MEMBERS"),
    ("filter_text", "FILTER"),
]
MEMBER_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("status", "STATUS"),
    ("connection", "CONNECTION"),
    ("blocked", "BLOCKED"),
    ("last_seen_at", "LAST SEEN"),
]

FilterOpt = Annotated[
    str | None,
    typer.Option(
        "--filter",
        metavar="JSON",
        help='A dynamic group\'s whole filter, e.g. \'{"tags": ["prod"]}\' or @file.json.',
    ),
]
TagOpt = Annotated[
    list[str] | None, typer.Option("--tag", help="Filter: has this tag (repeat: all of them).")
]
LocationOpt = Annotated[
    list[str] | None, typer.Option("--location", help="Filter: placed at this site (repeat: all of them).")
]
StatusOpt = Annotated[
    str | None, typer.Option("--status", help="Filter: pending | active | inactive | maintenance | revoked.")
]
ConnectionOpt = Annotated[str | None, typer.Option("--connection", help="Filter: online | offline.")]
BlockedOpt = Annotated[str | None, typer.Option("--blocked", help="Filter: all | hide | only.")]
SearchOpt = Annotated[str | None, typer.Option("--search", help="Filter: text in the name or id.")]
ApplicationOpt = Annotated[str | None, typer.Option("--application", help="Filter: this application.")]
ManufacturerOpt = Annotated[str | None, typer.Option("--manufacturer", help="Filter: this manufacturer.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Filter: this model.")]


def _filter(raw: str | None, **options: Any) -> dict[str, Any] | None:
    """The filter the options describe: --filter's JSON, with the single options laid over it."""
    chosen: dict[str, Any] = {}
    if raw is not None:
        parsed = json_value(raw, "--filter")
        if not isinstance(parsed, dict):
            raise ConfigError('--filter: a JSON object of device filters, e.g. {"tags": ["prod"]}')
        chosen.update(parsed)
    for key, value in options.items():
        if value:  # None or [] : not given
            chosen[key] = value
    return chosen if raw is not None or chosen else None


def _row(group: dict[str, Any]) -> dict[str, Any]:
    return {**group, "filter_text": compact(group.get("filter"))}


@app.command("list")
@fails_cleanly
def list_groups(
    ctx: typer.Context,
    limit: LimitOpt = 100,
    offset: OffsetOpt = 0,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """List the groups by name, with how many devices each holds.

    Example: gateway groups list --limit 20 --json
    """
    with client(ctx, api) as c:
        result = c.request("GET", "/device-groups", params={"limit": limit, "offset": offset})
    show_page(result, [_row(g) for g in result["data"]], COLUMNS, "group", json_out)


@app.command("show")
@fails_cleanly
def show_group(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Show one group (list its devices with `gateway groups members ID`).

    Example: gateway groups show pilot
    """
    with client(ctx, api) as c:
        show(c.request("GET", f"/device-groups/{group_id}")["data"], json_out)


@app.command()
@fails_cleanly
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A human-readable name.")],
    group_id: Annotated[
        str | None, typer.Option("--id", help="Choose the id (default: grp_<random>).")
    ] = None,
    description: Annotated[str | None, typer.Option("--description", help="Free text.")] = None,
    dynamic: Annotated[
        bool,
        typer.Option("--dynamic", help="A dynamic group (implied by any filter option); {} matches all."),
    ] = False,
    devices: Annotated[
        list[str] | None, typer.Option("--device", "-d", help="A static group's first member (repeat).")
    ] = None,
    filter_json: FilterOpt = None,
    tag: TagOpt = None,
    location: LocationOpt = None,
    status: StatusOpt = None,
    connection: ConnectionOpt = None,
    blocked: BlockedOpt = None,
    search: SearchOpt = None,
    application: ApplicationOpt = None,
    manufacturer: ManufacturerOpt = None,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Create a static group (members added by id) or a dynamic one (a saved device filter).

    Examples:

      gateway groups create "Pilot pumps" --id pilot -d pump-1 -d pump-2

      gateway groups create "Prod online" --tag prod --connection online
    """
    saved = _filter(
        filter_json,
        tags=tag,
        location_ids=location,
        status=status,
        connection=connection,
        blocked=blocked,
        search=search,
        application=application,
        manufacturer=manufacturer,
        model=model,
    )
    kind = "dynamic" if dynamic or saved is not None else "static"
    body: dict[str, Any] = {"name": name, "kind": kind, "description": description}
    if kind == "dynamic":
        body["filter"] = saved or {}
    if group_id is not None:
        body["id"] = group_id
    if devices:
        body["device_ids"] = devices
    with client(ctx, api) as c:
        group = c.request("POST", "/device-groups", json=body)["data"]
    if json_out:
        print_json(group)
        return
    typer.echo(
        f"created {group['kind']} group {group['id']} ({group['name']}), {group['member_count']} device(s)"
    )


@app.command()
@fails_cleanly
def update(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option("--name", help="A new name.")] = None,
    description: Annotated[str | None, typer.Option("--description", help="New text ('' clears it).")] = None,
    filter_json: FilterOpt = None,
    tag: TagOpt = None,
    location: LocationOpt = None,
    status: StatusOpt = None,
    connection: ConnectionOpt = None,
    blocked: BlockedOpt = None,
    search: SearchOpt = None,
    application: ApplicationOpt = None,
    manufacturer: ManufacturerOpt = None,
    model: ModelOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Rename a group, change its description, or give a dynamic group a new filter.

    Filter options replace the saved filter as a whole. Example:

      gateway groups update prod-online --tag prod --tag eu --connection online
    """
    saved = _filter(
        filter_json,
        tags=tag,
        location_ids=location,
        status=status,
        connection=connection,
        blocked=blocked,
        search=search,
        application=application,
        manufacturer=manufacturer,
        model=model,
    )
    with client(ctx, api) as c:
        current = c.request("GET", f"/device-groups/{group_id}")["data"]
        if saved is not None and current["kind"] != "dynamic":
            raise ConfigError(f"group {group_id} is static: it has members, not a filter (see `groups add`)")
        body = {
            "name": current["name"] if name is None else name,
            "description": current["description"] if description is None else description,
            "filter": current["filter"] if saved is None else saved,
        }
        group = c.request("PUT", f"/device-groups/{group_id}", json=body)["data"]
    show(group, json_out)


@app.command()
@fails_cleanly
def delete(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Delete a group (admin); its devices stay as they are.

    Example: gateway groups delete pilot --yes
    """
    confirmed(f"Delete group {group_id}?", yes)
    with client(ctx, api) as c:
        result = c.request("DELETE", f"/device-groups/{group_id}")
    if json_out:
        print_json(result)
    else:
        typer.echo(f"deleted group {group_id}")


@app.command()
@fails_cleanly
def members(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Argument(metavar="ID")],
    sort: Annotated[str | None, typer.Option("--sort", help="As `devices list`, e.g. name")] = None,
    limit: LimitOpt = 100,
    offset: OffsetOpt = 0,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """List a group's devices: a static group's members, or the devices a dynamic one matches now.

    Other filters combine with a group in `gateway devices list --group ID`. Examples:

      gateway groups members prod-online --sort name

      gateway groups members pilot --limit 1000 --json
    """
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if sort:
        params["sort"] = sort
    with client(ctx, api) as c:
        result = c.request("GET", f"/device-groups/{group_id}/members", params=params)
    if json_out:
        print_json({"data": result["data"], "total": result["total"]})
        return
    print_table(result["data"], MEMBER_COLUMNS)
    typer.echo(f"{len(result['data'])} of {result['total']} device(s) in {group_id}")


@app.command()
@fails_cleanly
def add(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Argument(metavar="ID")],
    device_ids: Annotated[list[str], typer.Argument(metavar="DEVICE...", help="Devices to add.")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Add devices to a static group (those already in it are left as they are).

    Example: gateway groups add pilot pump-3 pump-4
    """
    with client(ctx, api) as c:
        result = c.request("POST", f"/device-groups/{group_id}/members", json={"device_ids": device_ids})
    if json_out:
        print_json(result)
        return
    added = result["added"]
    typer.echo(
        f"added {len(added)} device(s) to {group_id}" + (f": {', '.join(added)}" if added else "")
        + f"; {result['data']['member_count']} member(s)"
    )  # fmt: skip


@app.command()
@fails_cleanly
def remove(
    ctx: typer.Context,
    group_id: Annotated[str, typer.Argument(metavar="ID")],
    device_id: Annotated[str, typer.Argument(metavar="DEVICE")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Take a device out of a static group.

    Example: gateway groups remove pilot pump-2
    """
    with client(ctx, api) as c:
        group = c.request("DELETE", f"/device-groups/{group_id}/members/{device_id}")["data"]
    if json_out:
        print_json(group)
        return
    typer.echo(f"removed {device_id} from {group_id}; {group['member_count']} member(s)")
