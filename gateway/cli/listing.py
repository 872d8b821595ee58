"""``gateway devices list``, ``summary``, ``show``, ``update`` and ``rename``: device records through
the running gateway's listing and PATCH routes (DESIGN.md §6).

Receives the command line's options. The filters ``list`` and ``summary`` share are turned
into the API's query parameters in one place (`filter_params`; ``--last-seen-before`` read by
`gateway.cli.data.moment`, ISO 8601 or a duration back from now). ``update`` sends every
change as one PATCH. Hands on a table (colour on a terminal only) or, with ``--json``,
exactly one JSON document: a page as the API sends it (``data``, ``total``, ``limit``,
``offset``, ``next``), every page with ``--all``, the summary, or the device.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from gateway.cli.catalog import ApiOpt, JsonOpt, client, json_value, show
from gateway.cli.common import Progress, colour_on, fails_cleanly, print_json, print_table
from gateway.cli.data import moment
from gateway.core.clock import iso, utcnow
from gateway.errors import ConfigError

API_PAGE = 1000  # the listing's largest `limit`: --all asks for pages this big unless told

LIST_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("status", "STATUS"),
    ("connection", "CONNECTION"),
    ("blocked", "BLOCKED"),
    ("last_connected_at", "LAST CONNECTED"),
]

SearchOpt = Annotated[str | None, typer.Option("--search", help="Text in the name or id (any case).")]
BlockedOpt = Annotated[str, typer.Option("--blocked", help="all | hide | only")]
StatusOpt = Annotated[
    str | None, typer.Option("--status", help="pending | active | inactive | maintenance | revoked")
]
ConnectionOpt = Annotated[str | None, typer.Option("--connection", help="online | offline")]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="Has this tag (repeat: has them all).")]
LocationOpt = Annotated[
    list[str] | None,
    typer.Option("--location", metavar="SITE", help="Placed at this site id (repeat: at them all)."),
]
GroupOpt = Annotated[str | None, typer.Option("--group", help="In this device group (static or dynamic).")]
ApplicationOpt = Annotated[str | None, typer.Option("--application", help="Runs this application.")]
ManufacturerOpt = Annotated[str | None, typer.Option("--manufacturer", help="Made by this manufacturer.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Of this model.")]
ExpiringOpt = Annotated[
    str | None,
    typer.Option(
        "--expiring",
        metavar="DURATION",
        help="Newest valid certificate ends within this time, e.g. 30d, 12h.",
    ),
]
LastSeenOpt = Annotated[
    str | None,
    typer.Option(
        "--last-seen-before",
        metavar="WHEN",
        help="Last packet before this time: ISO 8601 or a duration back, e.g. 1h, 7d (never seen: left out).",
    ),
]
DeviceArg = Annotated[str, typer.Argument(metavar="ID", help="The device id.")]


def filter_params(
    *,
    search: str | None,
    blocked: str,
    status: str | None,
    connection: str | None,
    tag: list[str] | None,
    location: list[str] | None,
    group: str | None,
    application: str | None,
    manufacturer: str | None,
    model: str | None,
    expiring: str | None,
    last_seen_before: str | None,
) -> dict[str, Any]:
    """The listing's filters as API query parameters (the API judges every value)."""
    params: dict[str, Any] = {"blocked": blocked}
    if tag:
        params["tag"] = tag
    if location:
        params["location_id"] = location
    if last_seen_before is not None:
        params["last_seen_before"] = iso(moment(last_seen_before, utcnow(), "--last-seen-before"))
    for key, value in (
        ("search", search),
        ("status", status),
        ("connection", connection),
        ("group", group),
        ("application", application),
        ("manufacturer", manufacturer),
        ("model", model),
        ("cert_expires_within", expiring),
    ):
        if value is not None:
            params[key] = value
    return params


@fails_cleanly
def list_devices(
    ctx: typer.Context,
    search: SearchOpt = None,
    blocked: BlockedOpt = "all",
    status: StatusOpt = None,
    connection: ConnectionOpt = None,
    tag: TagOpt = None,
    location: LocationOpt = None,
    group: GroupOpt = None,
    application: ApplicationOpt = None,
    manufacturer: ManufacturerOpt = None,
    model: ModelOpt = None,
    expiring: ExpiringOpt = None,
    last_seen_before: LastSeenOpt = None,
    sort: Annotated[
        str | None,
        typer.Option(
            "--sort", help="Fields, '-' for descending, e.g. -last_seen_at,name (default: oldest first)."
        ),
    ] = None,
    limit: Annotated[
        int,
        typer.Option("--limit", "-n", min=1, max=1000, help="Devices per page (with --all: per request)."),
    ] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many devices.")] = 0,
    cursor: Annotated[
        str | None, typer.Option("--cursor", help="Continue after a page: its `next` (same --sort).")
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every page to the end, following `next` (progress on a terminal).")
    ] = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """List devices, filtered, sorted and paged; --expiring finds certificates about to end.

    A page ends with `next` when there are more: pass it as --cursor (stable while devices are
    added), or use --all. Examples:

      gateway devices list --status active --blocked hide --sort name

      gateway devices list --tag prod --connection offline --last-seen-before 1h

      gateway devices list --expiring 30d --all --json > expiring.json
    """
    params = filter_params(
        search=search,
        blocked=blocked,
        status=status,
        connection=connection,
        tag=tag,
        location=location,
        group=group,
        application=application,
        manufacturer=manufacturer,
        model=model,
        expiring=expiring,
        last_seen_before=last_seen_before,
    )
    if sort is not None:
        params["sort"] = sort
    if cursor is not None and offset:
        raise ConfigError("pass either --cursor or --offset, not both")
    source = ctx.get_parameter_source("limit")
    page_size = API_PAGE if every and (source is None or source.name != "COMMANDLINE") else limit
    with client(ctx, api) as c:
        result = _pages(c, params, page_size, offset, cursor, every)
    if json_out:
        print_json(result)
        return
    columns = LIST_COLUMNS
    rows = result["data"]
    if expiring is not None:
        rows = [{**d, "cert_not_after": (d["certificate"] or {}).get("not_after")} for d in rows]
        columns = [*LIST_COLUMNS, ("cert_not_after", "CERT EXPIRES")]
    print_table(rows, columns)
    typer.echo(f"{len(rows)} of {result['total']} device(s)" + (f" from offset {offset}" if offset else ""))
    if result.get("next"):
        typer.echo(f"more: --cursor {result['next']} (or --all)")


def _pages(
    c: Any, params: dict[str, Any], limit: int, offset: int, cursor: str | None, every: bool
) -> dict[str, Any]:
    """One page as the API sends it, or with `every` all pages to the end as one document."""
    first = {**params, "limit": limit, "offset": offset, **({"cursor": cursor} if cursor else {})}
    page: dict[str, Any] = c.request("GET", "/devices", params=first)
    if not every:
        return page
    rows = list(page["data"])
    progress = Progress()
    try:
        while page.get("next"):
            progress.show(f"listed {len(rows)}/{page['total']} devices")
            page = c.request("GET", "/devices", params={**params, "limit": limit, "cursor": page["next"]})
            rows.extend(page["data"])
    finally:
        progress.done()
    return {"data": rows, "total": page["total"], "next": None}


@fails_cleanly
def summary(
    ctx: typer.Context,
    search: SearchOpt = None,
    blocked: BlockedOpt = "all",
    status: StatusOpt = None,
    connection: ConnectionOpt = None,
    tag: TagOpt = None,
    location: LocationOpt = None,
    group: GroupOpt = None,
    application: ApplicationOpt = None,
    manufacturer: ManufacturerOpt = None,
    model: ModelOpt = None,
    expiring: ExpiringOpt = None,
    last_seen_before: LastSeenOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Count devices by status, connection, blocked, application, model, firmware and expiry.

    Takes the filters of `gateway devices list`. Examples:

      gateway devices summary

      gateway devices summary --tag prod --json
    """
    params = filter_params(
        search=search,
        blocked=blocked,
        status=status,
        connection=connection,
        tag=tag,
        location=location,
        group=group,
        application=application,
        manufacturer=manufacturer,
        model=model,
        expiring=expiring,
        last_seen_before=last_seen_before,
    )
    with client(ctx, api) as c:
        found = c.request("GET", "/devices/summary", params=params)["data"]
    if json_out:
        print_json(found)
        return
    _print_summary(found)


def _print_summary(found: dict[str, Any]) -> None:
    """One small table per dimension, the total first."""
    total = f"{found['total']} device(s)"
    typer.echo(typer.style(total, bold=True) if colour_on() else total)
    for key, title in (("status", "STATUS"), ("connection", "CONNECTION"), ("blocked", "BLOCKED")):
        typer.echo()
        print_table(
            [{key: value, "count": n} for value, n in found[key].items()], [(key, title), ("count", "COUNT")]
        )
    for key, title in (("application", "APPLICATION"), ("model", "MODEL"), ("firmware_version", "FIRMWARE")):
        typer.echo()
        rows = [{key: group["value"], "count": group["count"]} for group in found[key]]
        print_table(rows, [(key, title), ("count", "COUNT")])
    typer.echo()
    expiring = [{"within": within, "count": n} for within, n in found["certificates_expiring"].items()]
    print_table(expiring, [("within", "CERTIFICATES EXPIRING WITHIN"), ("count", "COUNT")])


@fails_cleanly
def show_device(
    ctx: typer.Context, device_id: DeviceArg, json_out: JsonOpt = False, api: ApiOpt = None
) -> None:
    """Show one device: state, connection, certificate, identification and details.

    Example: gateway devices show SN-0042 --json
    """
    with client(ctx, api) as c:
        show(c.request("GET", f"/devices/{device_id}")["data"], json_out)


@fails_cleanly
def rename(
    ctx: typer.Context,
    device_id: DeviceArg,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Give a device a new name (the same as `gateway devices update ID --name NAME`).

    Example: gateway devices rename SN-0042 "Boiler room"
    """
    with client(ctx, api) as c:
        show(c.request("PATCH", f"/devices/{device_id}", json={"name": name})["data"], json_out)


@fails_cleanly
def update(
    ctx: typer.Context,
    device_id: DeviceArg,
    name: Annotated[str | None, typer.Option("--name", help="A new name.")] = None,
    status: Annotated[
        str | None, typer.Option("--status", help="active | inactive (cuts its session) | maintenance")
    ] = None,
    description: Annotated[str | None, typer.Option("--description", help="Free text (up to 1,000).")] = None,
    clear_description: Annotated[
        bool, typer.Option("--clear-description", help="Remove the description.")
    ] = False,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="The device's tags: replaces them all (repeat).")
    ] = None,
    clear_tags: Annotated[bool, typer.Option("--clear-tags", help="Remove every tag.")] = False,
    location: Annotated[
        list[str] | None,
        typer.Option("--location", metavar="SITE", help="Its sites (ids): replaces them all (repeat)."),
    ] = None,
    clear_locations: Annotated[bool, typer.Option("--clear-locations", help="Remove every site.")] = False,
    metadata: Annotated[
        str | None,
        typer.Option("--metadata", metavar="JSON", help="Free-form JSON object (or @file), replaced."),
    ] = None,
    settings: Annotated[
        str | None,
        typer.Option(
            "--settings",
            metavar="JSON",
            help="Settings JSON object (or @file), replaced; checked against the device's profile.",
        ),
    ] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="Give it this device profile.")] = None,
    clear_profile: Annotated[bool, typer.Option("--clear-profile", help="Remove its profile.")] = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Change a device's name, status and details in one request; what is not given stays.

    Examples:

      gateway devices update SN-0042 --tag prod --tag water --location site-1

      gateway devices update SN-0042 --status maintenance --description "pump replaced"

      gateway devices update SN-0042 --metadata @meta.json --clear-tags
    """
    given = (("name", name), ("status", status))
    body: dict[str, Any] = {key: value for key, value in given if value is not None}
    clearable: list[tuple[str, object, bool, str]] = [
        ("description", description, clear_description, "--description or --clear-description"),
        ("tags", tag, clear_tags, "--tag or --clear-tags"),
        ("location_ids", location, clear_locations, "--location or --clear-locations"),
        ("profile_id", profile, clear_profile, "--profile or --clear-profile"),
    ]
    for key, value, clear, options in clearable:
        if value is not None and clear:
            raise ConfigError(f"pass either {options}, not both")
        if value is not None or clear:
            body[key] = value  # None clears
    for key, raw in (("metadata", metadata), ("settings", settings)):
        if raw is not None:
            body[key] = json_value(raw, f"--{key}")
    if not body:
        raise ConfigError("nothing to change: pass --name, --status, --tag, ... (see --help)")
    with client(ctx, api) as c:
        show(c.request("PATCH", f"/devices/{device_id}", json=body)["data"], json_out)


def register(app: typer.Typer) -> None:
    """Add these commands to ``gateway devices``."""
    app.command("list")(list_devices)
    app.command("summary")(summary)
    app.command("show")(show_device)
    app.command("update")(update)
    app.command("rename")(rename)
