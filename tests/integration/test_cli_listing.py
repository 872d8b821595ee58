"""`gateway devices list`, `summary`, `show` and `update` against a real `gateway serve`
(DESIGN.md §5): filters, sorting, paging by cursor and `--all`, one PATCH per update, tables
and exactly one JSON document.

One gateway serves the whole module; the contract (one JSON document, the exit status, the
error line) is checked on a `python -m gateway` subprocess, the option matrix in this process
(`InProcess`), because every subprocess pays the CLI's start-up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.processes import Cli, Gateway, InProcess, Processes, start_gateway

FLEET = {  # id -> (name, tags)
    "pump-1": ("Pump one", ["prod", "water"]),
    "pump-2": ("Pump two", ["prod"]),
    "meter-1": ("Meter one", ["lab"]),
    "meter-2": ("Meter two", []),
    "valve-1": ("Valve", []),
}


@dataclass
class Fixture:
    gw: Gateway
    cli: Cli
    fast: InProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    processes = Processes()
    try:
        gw = start_gateway(processes, tmp_path_factory.mktemp("cli-listing"))
        fast = InProcess.beside(gw)
        fast.json("sites", "create", "Plant North", "--id", "site-1")
        for device_id, (name, tags) in FLEET.items():
            fast.json("devices", "register", name, "--id", device_id)
            if tags:
                fast.json("devices", "update", device_id, *(arg for tag in tags for arg in ("--tag", tag)))
        fast.json("devices", "update", "pump-1", "--location", "site-1")
        fast.json("devices", "block", "meter-2")
        yield Fixture(gw, gw.cli, fast)
    finally:
        processes.stop_all()


def ids(document: dict[str, object]) -> list[str]:
    data = document["data"]
    assert isinstance(data, list)
    return [device["id"] for device in data]


def test_list_json_is_one_page_document_with_next(served: Fixture) -> None:
    """`devices list --json` (a subprocess) prints the API's page: data, total, limit, offset, next."""
    page = served.cli.json("devices", "list", "--limit", "2", "--sort", "id")
    assert set(page) == {"data", "total", "limit", "offset", "next"}
    assert (ids(page), page["total"], page["next"] is not None) == (["meter-1", "meter-2"], 5, True)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tag", "prod"], {"pump-1", "pump-2"}),
        (["--tag", "prod", "--tag", "water"], {"pump-1"}),
        (["--location", "site-1"], {"pump-1"}),
        (["--blocked", "only"], {"meter-2"}),
        (["--blocked", "hide", "--search", "meter"], {"meter-1"}),
        (["--status", "pending", "--connection", "offline", "--search", "valve"], {"valve-1"}),
        (["--last-seen-before", "1h"], set()),  # never seen: not listed
        (["--last-seen-before", "2030-01-01T00:00:00Z"], set()),
        (["--application", "none-such"], set()),
        (["--manufacturer", "none-such"], set()),
        (["--model", "none-such"], set()),
    ],
)
def test_list_filters(served: Fixture, args: list[str], expected: set[str]) -> None:
    """Each filter option narrows the listing to the devices it describes, with a matching total."""
    page = served.fast.json("devices", "list", *args)
    assert (set(ids(page)), page["total"]) == (expected, len(expected))


def test_list_pages_by_cursor_and_all(served: Fixture) -> None:
    """--cursor continues after a page (same --sort); --all follows `next` to the end in one document."""
    first = served.fast.json("devices", "list", "--limit", "2", "--sort", "-name")
    second = served.fast.json("devices", "list", "--limit", "2", "--sort", "-name", "--cursor", first["next"])
    every = served.fast.json("devices", "list", "--limit", "2", "--sort", "-name", "--all")
    assert every["next"] is None and every["total"] == 5
    assert ids(every) == ["valve-1", "pump-2", "pump-1", "meter-2", "meter-1"]
    assert ids(first) + ids(second) == ids(every)[:4]
    assert "pass either --cursor or --offset" in served.fast.fails(
        "devices", "list", "--cursor", first["next"], "--offset", "1"
    )


def test_list_table_tells_how_to_go_on(served: Fixture) -> None:
    """The table (no colour when piped) ends with the count and, when there is more, the next cursor."""
    result = served.fast("devices", "list", "--limit", "2", "--sort", "id")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "STATUS", "CONNECTION"]
    assert "\x1b[" not in result.stdout
    assert rows[-2] == "2 of 5 device(s)"
    assert rows[-1].startswith("more: --cursor ")


def test_summary(served: Fixture) -> None:
    """`devices summary` counts by dimension, with the filters of `list`; --json is the summary object."""
    whole = served.fast.json("devices", "summary")
    assert whole["total"] == 5
    assert whole["status"]["pending"] == 5
    assert whole["blocked"] == {"blocked": 1, "unblocked": 4}
    assert served.fast.json("devices", "summary", "--tag", "prod")["total"] == 2
    table = served.fast("devices", "summary")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0] == "5 device(s)"
    assert "STATUS" in table.stdout and "CERTIFICATES EXPIRING WITHIN" in table.stdout


def test_update_is_one_patch_and_clears(served: Fixture, tmp_path: Path) -> None:
    """`devices update` changes name, status and details at once; --clear-* and JSON from @file."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"floor": 2}))
    device = served.fast.json(
        "devices", "update", "valve-1", "--name", "Valve A", "--description", "east wing",
        "--tag", "spare", "--location", "site-1", "--metadata", f"@{meta}", "--settings", '{"interval_s": 5}',
    )  # fmt: skip
    assert (device["name"], device["description"], device["tags"], device["location_ids"]) == (
        "Valve A", "east wing", ["spare"], ["site-1"],
    )  # fmt: skip
    assert (device["metadata"], device["settings"]) == ({"floor": 2}, {"interval_s": 5})
    cleared = served.fast.json(
        "devices", "update", "valve-1", "--clear-description", "--clear-tags", "--clear-locations"
    )
    assert (cleared["description"], cleared["tags"], cleared["location_ids"]) == (None, [], [])
    assert cleared["metadata"] == {"floor": 2}, "what is not given stays"
    assert served.fast.json("devices", "show", "valve-1")["name"] == "Valve A"


def test_update_refuses_contradictions_and_nothing(served: Fixture) -> None:
    """Conflicting options, no change at all and bad JSON fail with one error line (exit 1)."""
    assert "--tag or --clear-tags" in served.fast.fails(
        "devices", "update", "pump-2", "--tag", "a", "--clear-tags"
    )
    assert "nothing to change" in served.fast.fails("devices", "update", "pump-2")
    assert "--metadata: not JSON" in served.fast.fails("devices", "update", "pump-2", "--metadata", "{")
    assert "error: " in served.fast.fails("devices", "update", "pump-2", "--status", "asleep")
    assert "not found" in served.fast.fails("devices", "update", "no-such", "--name", "x")
