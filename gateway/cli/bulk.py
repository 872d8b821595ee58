"""``gateway devices import FILE`` and ``gateway devices export``: the registry in and out, as CSV
or JSON lines (formats in `gateway.cli.device_files`).

Import reads the whole file first and reports its problems by line, then sends it in chunks
of ``--chunk-size`` rows to ``POST /api/v1/devices:bulk``. All or nothing by default: when the
file spans several chunks, every chunk is checked first (``dry_run``) and nothing is
registered unless all pass. With ``--continue-on-error`` the valid rows are registered and
the others reported. The one-time registration tokens are secrets: they go to
``--tokens-out`` (CSV ``id,token,expires_at``, created with mode 0600, never overwritten,
written as each chunk returns), or else into the ``--json`` document, and nowhere else.
Export pages through ``GET /api/v1/devices`` and writes what import takes back.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from gateway.cli import device_files
from gateway.cli.client import ApiClient
from gateway.cli.common import Progress, fails_cleanly, print_json, settings_from
from gateway.cli.device_files import FileRow
from gateway.errors import ApiError, ConfigError

MAX_CHUNK = 1000  # the API's limit per request
DEFAULT_CHUNK = 500  # a request commits once: 5,000 devices import in ~6 s (1,000: same, coarser progress)
CHUNK_TIMEOUT_S = 600.0
EXPORT_PAGE = 1000
REGISTERED_FIELDS = ("id", "name", "status", "registration_token", "token_expires_at")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format", metavar="csv|jsonl", help="File format (default: from the file name, else csv)."
    ),
]


@dataclass
class Outcome:
    registered: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    aborted: str | None = None  # why the gateway refused a chunk (then later chunks were not sent)
    unsent: int = 0  # rows neither registered nor reported as bad

    def add_errors(self, chunk: list[FileRow], errors: list[dict[str, Any]]) -> None:
        for error in errors:
            self.errors.append(
                {
                    "line": chunk[int(error["row"]) - 1].line,
                    "id": error.get("id"),
                    "code": error.get("code"),
                    "message": error.get("message"),
                }
            )


class RowProgress:
    """``checked 300/1200 rows``, on a terminal only (`Progress`)."""

    def __init__(self, verb: str, total: int) -> None:
        self.verb, self.total, self.done = verb, total, 0
        self._line = Progress()

    def advance(self, rows: int) -> None:
        self.done += rows
        if self.total > 0:
            self._line.show(f"{self.verb} {self.done}/{self.total} rows")

    def close(self) -> None:
        self._line.done()


class TokensFile:
    """The one-time tokens as CSV ``id,token,expires_at``: created 0600 (never world-readable,
    even briefly), never overwritten, flushed to disk after every chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise ConfigError(f"{path} exists; the tokens file is never overwritten: choose another") from exc
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc}") from exc
        self._file: IO[str] = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self._csv = csv.writer(self._file, lineterminator="\n")
        self._csv.writerow(device_files.TOKEN_COLUMNS)
        self.written = 0

    def add(self, registered: list[dict[str, Any]]) -> None:
        self._csv.writerows([r["id"], r["registration_token"], r["token_expires_at"]] for r in registered)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written += len(registered)

    def close(self) -> None:
        """Closed; removed when no token got into it (a refused import leaves nothing behind)."""
        self._file.close()
        if self.written == 0:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _client(ctx: typer.Context, api: str | None) -> ApiClient:
    return ApiClient.for_settings(settings_from(ctx), api=api)


def _post(client: ApiClient, chunk: list[FileRow], *, dry_run: bool, continue_on_error: bool) -> Any:
    body = {
        "devices": [row.fields for row in chunk],
        "dry_run": dry_run,
        "continue_on_error": continue_on_error,
    }
    return client.request("POST", "/devices:bulk", json=body, timeout=CHUNK_TIMEOUT_S)


def _check(client: ApiClient, chunks: list[list[FileRow]], outcome: Outcome, continue_on_error: bool) -> None:
    """Every chunk checked (nothing registered); every bad row into `outcome`."""
    progress = RowProgress("checked", sum(len(chunk) for chunk in chunks))
    try:
        for chunk in chunks:
            try:
                errors = _post(client, chunk, dry_run=True, continue_on_error=continue_on_error)["errors"]
            except ApiError as exc:
                if exc.code != "invalid_rows":
                    raise
                errors = exc.detail.get("rows", [])
            outcome.add_errors(chunk, errors)
            progress.advance(len(chunk))
    finally:
        progress.close()


def _register(
    client: ApiClient,
    chunks: list[list[FileRow]],
    outcome: Outcome,
    *,
    continue_on_error: bool,
    tokens: TokensFile | None,
) -> None:
    progress = RowProgress("registered", sum(len(chunk) for chunk in chunks))
    try:
        for index, chunk in enumerate(chunks):
            try:
                result = _post(client, chunk, dry_run=False, continue_on_error=continue_on_error)
            except ApiError as exc:
                outcome.unsent = sum(len(later) for later in chunks[index:])
                if exc.code != "invalid_rows":
                    outcome.aborted = exc.message
                    return
                # One chunk alone, or rows checked before and someone registered an id meanwhile.
                rows = exc.detail.get("rows", [])
                outcome.add_errors(chunk, rows)
                outcome.unsent -= len(rows)
                return
            registered = [
                {"line": chunk[int(done["row"]) - 1].line, **{key: done[key] for key in REGISTERED_FIELDS}}
                for done in result["data"]
            ]
            if tokens is not None:
                tokens.add(registered)
            outcome.registered += registered
            outcome.add_errors(chunk, result["errors"])
            progress.advance(len(chunk))
    finally:
        progress.close()


@fails_cleanly
def import_devices(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="CSV with a header line, or JSON lines.", dir_okay=False)
    ],
    tokens_out: Annotated[
        Path | None,
        typer.Option(
            "--tokens-out",
            metavar="FILE",
            help="Write the one-time registration tokens here (CSV id,token,expires_at; mode 0600; "
            "must not exist).",
            dir_okay=False,
        ),
    ] = None,
    fmt: FormatOpt = None,
    continue_on_error: Annotated[
        bool,
        typer.Option("--continue-on-error", help="Register the valid rows and report the others."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only check the file; register nothing.")
    ] = False,
    chunk_size: Annotated[
        int, typer.Option("--chunk-size", min=1, max=MAX_CHUNK, help="Rows per API request.")
    ] = DEFAULT_CHUNK,
    json_out: JsonOpt = False,
    api: ApiOpt = None,
) -> None:
    """Register every device of a CSV or JSON lines file (only the name column is required).

    Columns: name, id, description, tags, location_ids, metadata, settings, profile_id.

    All or nothing: one bad row (line numbers reported) and nothing is registered, unless
    --continue-on-error. The one-time registration tokens go to --tokens-out, or with --json
    into the JSON document (not both). Examples:

      gateway devices import fleet.csv --tokens-out fleet-tokens.csv

      gateway devices import fleet.jsonl --dry-run
    """
    if not dry_run and not json_out and tokens_out is None:
        raise ConfigError(
            "the registration tokens are shown only once: pass --tokens-out FILE (written 0600) or --json"
        )
    fmt_ = device_files.format_of(file, fmt)
    try:
        with file.open(encoding="utf-8-sig", newline="") as handle:  # newlines as they are (csv wants it)
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}") from exc
    rows, problems = device_files.read_rows(text, fmt_)
    if not rows and not problems:
        raise ConfigError(f"{file} holds no devices")
    outcome = Outcome(
        errors=[{"line": p.line, "id": p.device_id, "code": p.code, "message": p.message} for p in problems]
    )
    chunks = [rows[start : start + chunk_size] for start in range(0, len(rows), chunk_size)]
    tokens = TokensFile(tokens_out) if tokens_out is not None and not dry_run else None
    try:
        if rows:
            with _client(ctx, api) as client:
                # All or nothing across requests: every chunk is checked before any is registered
                # (and with problems in the file, to report the gateway's too, all at once).
                if dry_run or (not continue_on_error and (problems or len(chunks) > 1)):
                    _check(client, chunks, outcome, continue_on_error)
                if not dry_run and (continue_on_error or not outcome.errors):
                    _register(client, chunks, outcome, continue_on_error=continue_on_error, tokens=tokens)
    finally:
        if tokens is not None:
            tokens.close()
    _report(
        file,
        outcome,
        rows=len(rows) + len(problems),
        dry_run=dry_run,
        continue_on_error=continue_on_error,
        tokens=tokens,
        json_out=json_out,
    )


def _report(
    file: Path,
    outcome: Outcome,
    *,
    rows: int,
    dry_run: bool,
    continue_on_error: bool,
    tokens: TokensFile | None,
    json_out: bool,
) -> None:
    errors = sorted(outcome.errors, key=lambda error: error["line"])
    if json_out:
        registered = outcome.registered
        if tokens is not None:  # the tokens are in the file: in one place only
            registered = [{k: v for k, v in r.items() if k != "registration_token"} for r in registered]
        print_json(
            {
                "data": registered,
                "errors": errors,
                "registered": len(outcome.registered),
                "failed": len(errors),
                "dry_run": dry_run,
                "tokens_out": str(tokens.path) if tokens is not None and tokens.written else None,
            }
        )
    else:
        for error in errors:
            typer.echo(f"{file}:{error['line']}: {error['message']} [{error['code']}]", err=True)
        if dry_run:
            typer.echo(f"checked {rows} row(s) of {file}: {len(errors) or 'no'} problem(s)")
        elif outcome.registered:
            where = f"; their one-time registration tokens are in {tokens.path} (mode 0600)" if tokens else ""
            typer.echo(f"registered {len(outcome.registered)} of {rows} device(s) from {file}{where}")
    problems = [f"{len(errors)} problem(s) in {file}"] if errors else []
    if outcome.aborted is not None:
        problems.append(f"the gateway refused a request: {outcome.aborted}")
    if not dry_run and outcome.registered and outcome.unsent:
        problems.append(f"{outcome.unsent} later row(s) were not sent")
    if not problems:
        return
    if not dry_run and not outcome.registered:
        problems.append(
            "nothing was registered"
            + ("" if continue_on_error or not errors else " (fix them, or pass --continue-on-error)")
        )
    typer.echo("error: " + "; ".join(problems), err=True)
    raise typer.Exit(1)


def _devices(client: ApiClient) -> Iterator[dict[str, Any]]:
    """Every device, oldest first: by cursor where the API offers one (stable under inserts)."""
    params: dict[str, Any] = {"limit": EXPORT_PAGE, "sort": "created_at"}
    offset = 0
    while True:
        page = client.request("GET", "/devices", params=params)
        yield from page["data"]
        offset += len(page["data"])
        if "next" in page:
            if not page["next"]:
                return
            params = {"limit": EXPORT_PAGE, "sort": "created_at", "cursor": page["next"]}
        elif not page["data"] or offset >= page["total"]:
            return
        else:
            params = {"limit": EXPORT_PAGE, "sort": "created_at", "offset": offset}


@fails_cleanly
def export_devices(
    ctx: typer.Context,
    fmt: FormatOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE", help="Write here (default: stdout).", dir_okay=False),
    ] = None,
    api: ApiOpt = None,
) -> None:
    """Write every device (id, name, the operator-set fields) as CSV or JSON lines, oldest first.

    `gateway devices import` takes the file back. No secrets are in it.

    Example: gateway devices export --format jsonl --out fleet.jsonl
    """
    fmt_ = device_files.format_of(out, fmt)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(_client(ctx, api))
        if out is None:
            handle: IO[str] = sys.stdout
        else:
            try:
                handle = stack.enter_context(out.open("w", encoding="utf-8", newline=""))
            except OSError as exc:
                raise ConfigError(f"cannot write {out}: {exc}") from exc
        if fmt_ == "jsonl":
            count = device_files.write_jsonl(_devices(client), handle)
        else:
            writer = device_files.CsvWriter(handle)
            count = 0
            for device in _devices(client):
                writer.write(device)
                count += 1
            writer.finish()
    if out is not None:
        typer.echo(f"exported {count} device(s) to {out}")
