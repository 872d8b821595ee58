"""Shared CLI plumbing: settings from ``--config``, output as a table or one JSON document,
errors as one line on stderr with a non-zero exit status, and a progress line for long work.

Colour (`colour_on`): only when the stream is a terminal and ``NO_COLOR`` is unset (and
``TERM`` is not ``dumb``); piped output is plain text. Which cell gets which colour is the
table `CELL_STYLES`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import typer

from gateway.config import Settings, load_settings
from gateway.errors import ApiError, ConfigError, GatewayError

P = ParamSpec("P")
R = TypeVar("R")


class State:
    config: Path | None = None


def settings_from(ctx: typer.Context) -> Settings:
    state: State = ctx.find_root().obj or State()
    return load_settings(state.config)


def mqtt_target(settings: Settings, host: str | None, port: int | None) -> tuple[str, int]:
    """Where to reach the gateway's MQTT listener: ``--host``/``--port`` or ``mqtt.host``/``mqtt.port``."""
    target = host or settings.mqtt.host
    if target in ("0.0.0.0", "::"):  # noqa: S104 - a bind-all address is not a place to connect to
        target = "127.0.0.1"
    port = port or settings.mqtt.port
    if port == 0:
        raise ConfigError("mqtt.port is 0 (chosen at start): pass --port or set GATEWAY_MQTT__PORT")
    return target, port


def fails_cleanly(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the gateway's errors into ``error: ...`` on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            detail = f" [{exc.code}]" if exc.code not in ("api_error", "unreachable") else ""
            typer.echo(f"error: {exc.message}{detail}", err=True)
            raise typer.Exit(1) from exc
        except GatewayError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(1) from exc

    return wrapper


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False) + "\n")


def cell(value: Any) -> str:
    """A value as a person reads it: ``-`` for nothing, ``yes``/``no`` for booleans."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def colour_on(stream: IO[str] | None = None) -> bool:
    """Whether to colour what goes to `stream` (stdout): a terminal, ``NO_COLOR`` unset."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


# (column, shown value) -> typer.style options, for tables on a terminal.
CELL_STYLES: dict[tuple[str, str], dict[str, Any]] = {
    ("status", "active"): {"fg": "green"},
    ("status", "pending"): {"fg": "cyan"},
    ("status", "maintenance"): {"fg": "yellow"},
    ("status", "inactive"): {"fg": "yellow"},
    ("status", "revoked"): {"fg": "red"},
    ("connection", "online"): {"fg": "green", "bold": True},
    ("connection", "offline"): {"dim": True},
    ("blocked", "yes"): {"fg": "red", "bold": True},
    ("state", "active"): {"fg": "green"},
    ("state", "expired"): {"fg": "yellow"},
    ("state", "revoked"): {"fg": "red"},
}


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """An aligned table (header, rows); ``-`` for empty cells; colour only on a terminal."""
    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [title for _, title in columns]
    widths = [max([len(headers[i])] + [len(r[i]) for r in cells]) for i in range(len(columns))]
    colour = colour_on()
    header = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    typer.echo(typer.style(header, bold=True) if colour else header)
    for row in cells:
        parts = []
        for index, ((key, _), text, width) in enumerate(zip(columns, row, widths, strict=True)):
            padded = text if index == len(columns) - 1 else text.ljust(width)  # no trailing blanks
            style = CELL_STYLES.get((key, text)) if colour else None
            parts.append(typer.style(padded, **style) if style else padded)
        typer.echo("  ".join(parts))


class Progress:
    """A progress line on stderr (``listed 3000/120000 devices``), redrawn in place, only when
    stderr is a terminal: piped or redirected output never sees it."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty()
        self._drawn = False

    def show(self, line: str) -> None:
        if self.enabled:
            self._stream.write("\r\x1b[K" + line)
            self._stream.flush()
            self._drawn = True

    def done(self) -> None:
        """End the line (once something was drawn), so that what follows starts afresh."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def print_record(record: dict[str, Any], *, skip: Sequence[str] = ()) -> None:
    """A record as ``key: value`` lines, nested objects indented."""
    width = max(len(k) for k in record)
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for sub, sub_value in value.items():
                typer.echo(f"  {sub}: {cell(sub_value)}")
        else:
            typer.echo(f"{key.ljust(width)}  {cell(value)}")
