"""``gateway sites ...``: the locations devices are placed in, through the running gateway's API
(``/api/v1/sites``). A device is placed at a site by naming the site's id in its
``location_ids``, which must exist first. Reads need devices:read, changes devices:write,
``delete`` admin (``--force`` for a site devices name: it leaves their location ids).
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
from gateway.cli.common import fails_cleanly, print_json
from gateway.errors import ConfigError

app = typer.Typer(
    help="Sites: the locations devices are placed in (their location_ids).", no_args_is_help=True
)

COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("device_count", "DEVICES"),
    ("timezone", "TIMEZONE"),
    ("position", "LAT,LON"),
    ("address", "ADDRESS"),
]
FIELDS = ("name", "description", "address", "latitude", "longitude", "timezone", "metadata")

DescriptionOpt = Annotated[str | None, typer.Option("--description", help="Free text ('' clears it).")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Postal address ('' clears it).")]
LatOpt = Annotated[float | None, typer.Option("--lat", help="Latitude, WGS 84 degrees (with --lon).")]
LonOpt = Annotated[float | None, typer.Option("--lon", help="Longitude, WGS 84 degrees (with --lat).")]
TimezoneOpt = Annotated[str | None, typer.Option("--timezone", help="IANA name, e.g. Europe/Berlin.")]
MetadataOpt = Annotated[
    str | None,
    typer.Option("--metadata", metavar="JSON", help="A JSON object (or @file.json); {} clears it."),
]


def _given(
    description: str | None,
    address: str | None,
    lat: float | None,
    lon: float | None,
    timezone: str | None,
    metadata: str | None,
) -> dict[str, Any]:
    """The fields the options name (the API judges their values)."""
    given: dict[str, Any] = {}
    for key, value in (("description", description), ("address", address), ("timezone", timezone)):
        if value is not None:
            given[key] = value or None
    if lat is not None:
        given["latitude"] = lat
    if lon is not None:
        given["longitude"] = lon
    if metadata is not None:
        parsed = json_value(metadata, "--metadata")
        if not isinstance(parsed, dict):
            raise ConfigError("--metadata: a JSON object")
        given["metadata"] = parsed
    return given


def _row(site: dict[str, Any]) -> dict[str, Any]:
    located = site["latitude"] is not None
    return {**site, "position": f"{site['latitude']:g},{site['longitude']:g}" if located else None}


@app.command("list")
@fails_cleanly
def list_sites(
    ctx: typer.Context,
    search: Annotated[str | None, typer.Option("--search", help="Text in the name or id (any case).")] = None,
    limit: LimitOpt = 100,
    offset: OffsetOpt = 0,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """List the sites by name, with how many devices are placed at each.

    Example: gateway sites list --search plant
    """
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if search:
        params["search"] = search
    with client(ctx, api) as c:
        result = c.request("GET", "/sites", params=params)
    show_page(result, [_row(s) for s in result["data"]], COLUMNS, "site", json_out)


@app.command("show")
@fails_cleanly
def show_site(
    ctx: typer.Context,
    site_id: Annotated[str, typer.Argument(metavar="ID")],
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Show one site (its devices: `gateway devices list --location ID`).

    Example: gateway sites show plant-north --json
    """
    with client(ctx, api) as c:
        show(c.request("GET", f"/sites/{site_id}")["data"], json_out)


@app.command()
@fails_cleanly
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A human-readable name.")],
    site_id: Annotated[
        str | None, typer.Option("--id", help="Choose the id devices will name (default: site_<random>).")
    ] = None,
    description: DescriptionOpt = None,
    address: AddressOpt = None,
    lat: LatOpt = None,
    lon: LonOpt = None,
    timezone: TimezoneOpt = None,
    metadata: MetadataOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Create a site; place devices there by adding its id to their location_ids.

    Example:

      gateway sites create "Plant North" --id plant-north --timezone Europe/Berlin --lat 52.5 --lon 13.4
    """
    body = {"name": name, **_given(description, address, lat, lon, timezone, metadata)}
    if site_id is not None:
        body["id"] = site_id
    with client(ctx, api) as c:
        site = c.request("POST", "/sites", json=body)["data"]
    show_created(site, "site", json_out)


@app.command()
@fails_cleanly
def update(
    ctx: typer.Context,
    site_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str | None, typer.Option("--name", help="A new name.")] = None,
    description: DescriptionOpt = None,
    address: AddressOpt = None,
    lat: LatOpt = None,
    lon: LonOpt = None,
    timezone: TimezoneOpt = None,
    metadata: MetadataOpt = None,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Change the fields the options name; the others stay as they are.

    Example: gateway sites update plant-north --address "Hafenstr. 1, Hamburg"
    """
    with client(ctx, api) as c:
        current = c.request("GET", f"/sites/{site_id}")["data"]
        body = {key: current[key] for key in FIELDS}
        body.update(_given(description, address, lat, lon, timezone, metadata))
        if name is not None:
            body["name"] = name
        site = c.request("PUT", f"/sites/{site_id}", json=body)["data"]
    show(site, json_out)


@app.command()
@fails_cleanly
def delete(
    ctx: typer.Context,
    site_id: Annotated[str, typer.Argument(metavar="ID")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Also when devices are placed there: it leaves their location_ids."),
    ] = False,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Delete a site (admin); one that devices name needs --force.

    Example: gateway sites delete plant-north --force --yes
    """
    confirmed(f"Delete site {site_id}?", yes)
    with client(ctx, api) as c:
        result = c.request("DELETE", f"/sites/{site_id}", params={"force": "true" if force else "false"})
    if json_out:
        print_json(result)
        return
    detached = result["detached_device_ids"]
    typer.echo(f"deleted site {site_id}" + (f"; taken from {len(detached)} device(s)" if detached else ""))
