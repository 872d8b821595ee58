"""Bulk registration and export: ``POST /api/v1/devices:bulk`` over real HTTPS (all or nothing,
per-row errors, continue_on_error, dry_run, limits, routing beside ``/devices/{id}``) and
`gateway devices import` / `export` against a real `gateway serve` (CSV and JSON lines,
line-numbered errors, chunks, the 0600 tokens file, an export imported into a fresh gateway)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.core import tokens
from gateway.core.clock import utcnow
from tests.conftest import Harness
from tests.integration.processes import Gateway, InProcess, Processes, mode, start_gateway

Json = dict[str, Any]


async def bulk(gw: Harness, rows: list[Any], status: int = 201, **options: Any) -> Json:
    response = await gw.api.post("/devices:bulk", json={"devices": rows, **options})
    assert response.status_code == status, response.text
    body: Json = response.json()
    return body


async def device_ids(gw: Harness) -> set[str]:
    response = await gw.api.get("/devices", params={"limit": 1000})
    return {device["id"] for device in response.json()["data"]}


async def test_bulk_registers_each_device_as_if_alone(gateway: Harness) -> None:
    """Every row gets a device, its detail fields, a one-time token, an audit entry and an event."""
    operator = await gateway.operator()
    watcher = await gateway.connect(operator)
    await watcher.subscribe(("gateway/events/device", 1))
    rows = [
        {"name": "Pump 1", "id": "bulk-pump-1", "tags": ["pumps", "hall b"], "description": "north"},
        {"name": "Pump 2", "id": "bulk-pump-2", "metadata": {"serial": 2}},
        {"name": "No id"},
    ]
    body = await bulk(gateway, rows)
    assert (body["registered"], body["failed"], body["errors"], body["dry_run"]) == (3, 0, [], False)
    assert [d["row"] for d in body["data"]] == [1, 2, 3]
    first, second, third = body["data"]
    assert (first["id"], first["name"], first["status"]) == ("bulk-pump-1", "Pump 1", "pending")
    assert third["id"].startswith("dev_")
    assert all(d["registration_token"].startswith(tokens.REGISTRATION_PREFIX) for d in body["data"])
    shown = (await gateway.api.get("/devices/bulk-pump-1")).json()["data"]
    assert (shown["tags"], shown["description"]) == (["hall b", "pumps"], "north")
    assert (await gateway.api.get("/devices/bulk-pump-2")).json()["data"]["metadata"] == {"serial": 2}

    creds = await gateway.enroll(second["registration_token"])  # the tokens work
    assert creds.name == "bulk-pump-2"
    registered = (await gateway.api.get("/audit", params={"action": "device.registered"})).json()["data"]
    assert {e["target_id"] for e in registered} == {"bulk-pump-1", "bulk-pump-2", third["id"]}
    pump = next(e for e in registered if e["target_id"] == "bulk-pump-1")
    assert (pump["after"]["tags"], pump["after"]["description"]) == (["hall b", "pumps"], "north")
    events = [json.loads((await watcher.next_message(timeout=5)).payload) for _ in range(3)]
    assert [(e["action"], e["device_id"]) for e in events] == [
        ("registered", "bulk-pump-1"),
        ("registered", "bulk-pump-2"),
        ("registered", third["id"]),
    ]
    audit_text = (await gateway.api.get("/audit", params={"limit": 1000})).text
    assert all(d["registration_token"] not in audit_text for d in body["data"])


async def test_registering_one_device_with_a_taken_or_bad_id_is_refused(gateway: Harness) -> None:
    """POST /devices (one registration, the same path as a bulk row): a taken id is 409 naming it,
    a malformed one 422; neither leaves a device or an audit entry behind."""
    await gateway.register("First", "solo-1")
    taken = await gateway.api.post("/devices", json={"name": "Second", "id": "solo-1"})
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "device_exists")
    assert "solo-1 already exists" in taken.json()["error"]["message"]
    bad = await gateway.api.post("/devices", json={"name": "Bad", "id": "not an id"})
    assert bad.status_code == 422, bad.text
    assert (await gateway.api.get("/devices/solo-1")).json()["data"]["name"] == "First"
    entries = (await gateway.api.get("/audit", params={"action": "device.registered"})).json()["data"]
    assert [e["target_id"] for e in entries] == ["solo-1"]


async def test_one_bad_row_refuses_the_request_with_every_bad_row_listed(gateway: Harness) -> None:
    """All or nothing: each bad row by number with its reason; nothing registered."""
    await gateway.register("Taken", "taken-1")
    rows: list[Any] = [
        {"name": "Fine", "id": "fine-1"},
        {"name": "Twice", "id": "twice"},
        {"name": "Twice again", "id": "twice"},
        {"name": "Exists", "id": "taken-1"},
        {"name": "Bad id", "id": "has/slash"},
        {"name": ""},
        {"id": "no-name"},
        {"name": "Odd", "colour": "red"},
        {"name": "Bad tags", "tags": "not-a-list"},
        "not an object",
    ]
    before = await device_ids(gateway)
    response = await gateway.api.post("/devices:bulk", json={"devices": rows})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_rows" and "nothing was registered" in error["message"]
    assert [(r["row"], r["code"]) for r in error["rows"]] == [
        (3, "duplicate_id"),
        (4, "device_exists"),
        (5, "invalid_device_id"),
        (6, "invalid_name"),
        (7, "invalid_name"),
        (8, "invalid_field"),
        (9, "invalid_tag"),
        (10, "invalid_row"),
    ]
    by_row = {r["row"]: r for r in error["rows"]}
    assert "also in row 2" in by_row[3]["message"] and by_row[4]["id"] == "taken-1"
    assert "colour" in by_row[8]["message"]
    assert await device_ids(gateway) == before


async def test_continue_on_error_and_dry_run(gateway: Harness) -> None:
    """continue_on_error registers the good rows and reports the rest; dry_run registers nothing."""
    rows = [
        {"name": "Good", "id": "coe-1"},
        {"name": "Bad", "id": "bad id"},
        {"name": "Good 2", "id": "coe-2"},
    ]
    checked = await bulk(gateway, rows, status=200, dry_run=True, continue_on_error=True)
    assert (checked["data"], checked["dry_run"]) == ([], True)
    assert [(e["row"], e["code"]) for e in checked["errors"]] == [(2, "invalid_device_id")]
    refused = await gateway.api.post("/devices:bulk", json={"devices": rows, "dry_run": True})
    assert refused.status_code == 422
    assert not {"coe-1", "coe-2"} & await device_ids(gateway)
    body = await bulk(gateway, rows, continue_on_error=True)
    assert [(d["row"], d["id"]) for d in body["data"]] == [(1, "coe-1"), (3, "coe-2")]
    assert (body["registered"], body["failed"]) == (2, 1) and body["errors"][0]["row"] == 2


async def test_an_id_registered_meanwhile_fails_only_its_row(
    gateway: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are registered in one transaction; an id someone registers between the checks and
    that transaction undoes it, and the rows are registered one by one: only that row fails."""
    from gateway import bulk as bulk_module

    checked = bulk_module.check

    async def racing(devices: Any, rows: Any) -> Any:
        found = await checked(devices, rows)
        await devices.register("Taken meanwhile", "race-2")
        return found

    monkeypatch.setattr(bulk_module, "check", racing)
    rows = [{"name": f"Race {n}", "id": f"race-{n}", "tags": ["race"]} for n in (1, 2, 3)]
    body = await bulk(gateway, rows)
    assert [(d["row"], d["id"]) for d in body["data"]] == [(1, "race-1"), (3, "race-3")]
    assert [(e["row"], e["id"], e["code"]) for e in body["errors"]] == [(2, "race-2", "device_exists")]
    taken = (await gateway.api.get("/devices/race-2")).json()["data"]
    assert (taken["name"], taken["tags"]) == ("Taken meanwhile", [])
    listed = (await gateway.api.get("/devices", params={"tag": "race"})).json()
    assert sorted(d["id"] for d in listed["data"]) == ["race-1", "race-3"]


async def test_limits_scope_and_routing(gateway: Harness) -> None:
    """At most 1,000 rows; write scope; the colon route never meets /devices/{id}."""
    too_many = await gateway.api.post("/devices:bulk", json={"devices": [{"name": "x"}] * 1001})
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "too_many_rows"
    empty = await gateway.api.post("/devices:bulk", json={"devices": []})
    assert empty.status_code == 422
    reader = tokens.new_token(tokens.API_PREFIX)
    await gateway.app.store.tokens.add(
        "reader", tokens.hash_token(reader), frozenset({tokens.READ}), utcnow()
    )
    forbidden = await gateway.api.post(
        "/devices:bulk", json={"devices": [{"name": "x"}]}, headers={"Authorization": f"Bearer {reader}"}
    )
    assert forbidden.status_code == 403
    await gateway.register("A device called bulk", "bulk")
    assert (await gateway.api.get("/devices/bulk")).json()["data"]["name"] == "A device called bulk"
    assert (await gateway.api.get("/devices:bulk")).status_code == 405
    assert (await gateway.api.post("/devices/bulk")).status_code == 405


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processes() -> Iterator[Processes]:
    children = Processes()
    try:
        yield children
    finally:
        children.stop_all()


@pytest.fixture(scope="module")
def gw(processes: Processes, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    return start_gateway(processes, tmp_path_factory.mktemp("bulk"))


@pytest.fixture(scope="module")
def fast(gw: Gateway) -> InProcess:
    return InProcess.beside(gw)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def token_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_import_csv_writes_the_tokens_file_0600(gw: Gateway, fast: InProcess) -> None:
    """A CSV import (a real subprocess): devices with their fields; tokens only in the 0600 file."""
    source = write(
        gw.cli.cwd / "fleet.csv",
        "name,id,tags,description,metadata\n"
        'Boiler,csv-boiler,heating;hall a,"two\nlines",{"floor": 1}\n'
        "\n"
        "Pump,csv-pump,,,\n"
        "Anonymous,,,,\n",
    )
    result = gw.cli("devices", "import", "fleet.csv", "--tokens-out", "fleet-tokens.csv")
    assert result.returncode == 0, result.stderr
    tokens_file = gw.cli.cwd / "fleet-tokens.csv"
    assert "registered 3 of 3 device(s) from fleet.csv" in result.stdout
    assert "fleet-tokens.csv (mode 0600)" in result.stdout
    assert mode(tokens_file) == 0o600
    assert tokens_file.read_text().splitlines()[0] == "id,token,expires_at"
    saved = token_rows(tokens_file)
    assert [row["id"] for row in saved[:2]] == ["csv-boiler", "csv-pump"] and saved[2]["id"].startswith(
        "dev_"
    )
    assert all(row["token"] not in result.stdout + result.stderr for row in saved), "secrets only in the file"
    boiler = fast.json("devices", "show", "csv-boiler")
    assert (boiler["tags"], boiler["description"], boiler["metadata"]) == (
        ["hall a", "heating"],
        "two\nlines",
        {"floor": 1},
    )
    enrolled = fast.json("devices", "enroll", "--token", saved[1]["token"], "--out", str(gw.cli.cwd / "pump"))
    assert enrolled["id"] == "csv-pump"
    again = fast("devices", "import", str(source), "--tokens-out", str(tokens_file))
    assert again.exit_code == 1 and "never overwritten" in again.stderr


def test_cli_import_jsonl_with_json_output(gw: Gateway, fast: InProcess) -> None:
    """JSON lines in, one JSON document out with each row's line and token."""
    fast.json("sites", "create", "Site 1", "--id", "site-1")  # location ids name sites
    source = write(
        gw.cli.cwd / "fleet.jsonl",
        '{"name": "J1", "id": "jl-1", "location_ids": ["site-1"], "settings": {"interval_s": 60}}\n'
        "\n"
        '{"name": "J2", "id": "jl-2"}\n',
    )
    body = fast.json("devices", "import", str(source))
    assert (body["registered"], body["failed"], body["tokens_out"]) == (2, 0, None)
    assert [(d["line"], d["id"]) for d in body["data"]] == [(1, "jl-1"), (3, "jl-2")]
    assert all(d["registration_token"].startswith(tokens.REGISTRATION_PREFIX) for d in body["data"])
    shown = fast.json("devices", "show", "jl-1")
    assert (shown["location_ids"], shown["settings"]) == (["site-1"], {"interval_s": 60})


def test_cli_import_reports_bad_rows_by_line_and_registers_nothing(gw: Gateway, fast: InProcess) -> None:
    """Bad rows (the file's and the gateway's) by line; nothing registered, no tokens file left."""
    fast.json("devices", "register", "Already", "--id", "bad-taken")
    source = write(
        gw.cli.cwd / "bad.csv",
        "name,id,metadata\n"
        "Fine,bad-fine,\n"  # line 2
        "Dup,bad-dup,\n"  # line 3
        "Dup again,bad-dup,\n"  # line 4: the file's own duplicate
        "Taken,bad-taken,\n"  # line 5: the gateway's
        ",bad-noname,\n"  # line 6
        "Meta,bad-meta,{not json\n",  # line 7
    )
    out = gw.cli.cwd / "bad-tokens.csv"
    result = fast("devices", "import", str(source), "--tokens-out", str(out))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{source}:")]
    assert [int(line.split(":")[1]) for line in lines] == [4, 5, 6, 7]
    assert "also on line 3" in lines[0] and "already exists [device_exists]" in lines[1]
    assert "[invalid_name]" in lines[2] and "invalid JSON" in lines[3]
    assert "nothing was registered" in result.stderr and "--continue-on-error" in result.stderr
    assert not out.exists()
    listed = {d["id"] for d in fast.json("devices", "list", "--search", "bad-")["data"]}
    assert listed == {"bad-taken"}

    fixed = write(gw.cli.cwd / "bad2.csv", "name,id\nFine,bad-fine\nTaken,bad-taken\n,bad-noname\n")
    result = fast("devices", "import", str(fixed), "--json")
    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert [(e["line"], e["code"]) for e in body["errors"]] == [(3, "device_exists"), (4, "invalid_name")]
    assert body["registered"] == 0 and body["data"] == []

    partial = fast("devices", "import", str(fixed), "--continue-on-error", "--tokens-out", str(out))
    assert partial.exit_code == 1, "some rows were not registered"
    assert "registered 1 of 3 device(s)" in partial.stdout and "2 problem(s)" in partial.stderr
    assert [row["id"] for row in token_rows(out)] == ["bad-fine"]


def test_cli_import_in_chunks_is_all_or_nothing_across_them(gw: Gateway, fast: InProcess) -> None:
    """A file larger than one request: checked whole first, so a bad row at the end stops it all."""
    good = "".join(f"Chunk {i},chunk-{i:02d}\n" for i in range(25))
    source = write(gw.cli.cwd / "chunks.csv", "name,id\n" + good + "Bad,bad id\n")
    out = gw.cli.cwd / "chunk-tokens.csv"
    refused = fast("devices", "import", str(source), "--chunk-size", "10", "--tokens-out", str(out))
    assert refused.exit_code == 1 and f"{source}:27:" in refused.stderr
    assert fast.json("devices", "list", "--search", "chunk-")["total"] == 0 and not out.exists()

    checked = fast("devices", "import", str(source), "--chunk-size", "10", "--dry-run")
    assert checked.exit_code == 1 and "checked 26 row(s)" in checked.stdout

    write(source, "name,id\n" + good)
    done = fast("devices", "import", str(source), "--chunk-size", "10", "--tokens-out", str(out))
    assert done.exit_code == 0, done.output
    assert len(token_rows(out)) == 25 and fast.json("devices", "list", "--search", "chunk-")["total"] == 25


def test_cli_import_needs_a_place_for_the_tokens(gw: Gateway, fast: InProcess) -> None:
    """Without --tokens-out or --json the tokens would be lost: refused before anything happens."""
    source = write(gw.cli.cwd / "nowhere.csv", "name,id\nLost,lost-1\n")
    assert "--tokens-out" in fast.fails("devices", "import", str(source))
    assert fast.json("devices", "list", "--search", "lost-1")["total"] == 0
    colour = write(gw.cli.cwd / "colour.csv", "name,colour\nx,red\n")
    result = fast("devices", "import", str(colour), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["errors"][0]["message"].startswith(
        "unknown column(s) colour; known: id,"
    )


def test_cli_export_round_trips_into_a_fresh_gateway(
    gw: Gateway, fast: InProcess, processes: Processes, tmp_path: Path
) -> None:
    """Export (CSV and JSON lines), import into a fresh gateway, export again: the same devices."""
    fast.json("devices", "import", str(write(
        gw.cli.cwd / "export-seed.jsonl",
        '{"name": "Semi; colon", "id": "exp-1", "tags": ["a;b", "c"], "description": "d, with comma"}\n'
        '{"name": "Plain", "id": "exp-2", "metadata": {"nested": {"x": [1, 2]}}, "settings": {"on": true}}\n',
    )))  # fmt: skip
    csv_out = gw.cli.cwd / "registry.csv"
    exported = gw.cli("devices", "export", "--out", "registry.csv")
    assert exported.returncode == 0, exported.stderr
    total = fast.json("devices", "list", "--limit", "1000")["total"]
    assert exported.stdout.strip() == f"exported {total} device(s) to registry.csv"
    jsonl = fast("devices", "export", "--format", "jsonl")
    assert jsonl.exit_code == 0, jsonl.output
    original = sorted((json.loads(line) for line in jsonl.stdout.splitlines()), key=lambda d: d["id"])
    assert len(original) == total and not any("token" in key for d in original for key in d)

    (tmp_path / "fresh").mkdir()
    fresh_gw = start_gateway(processes, tmp_path / "fresh")
    fresh = InProcess.beside(fresh_gw)
    fresh.json("sites", "create", "Site 1", "--id", "site-1")  # the sites the devices name come first
    imported = fresh.json("devices", "import", str(csv_out), "--chunk-size", "50")
    assert imported["registered"] == total
    again = fresh("devices", "export", "--format", "jsonl")
    assert again.exit_code == 0, again.output
    copied = sorted((json.loads(line) for line in again.stdout.splitlines()), key=lambda d: d["id"])
    assert copied == original
    exp_1 = next(d for d in copied if d["id"] == "exp-1")
    assert (exp_1["name"], exp_1["tags"], exp_1["description"]) == (
        "Semi; colon",
        ["a;b", "c"],
        "d, with comma",
    )
