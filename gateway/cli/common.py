"""Shared CLI plumbing: settings from ``--config``, output as a table or one JSON document,
and errors as one line on stderr with a non-zero exit status."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

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


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """A plain aligned table (header, rows); ``-`` for empty cells."""
    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [title for _, title in columns]
    widths = [max([len(headers[i])] + [len(r[i]) for r in cells]) for i in range(len(columns))]
    bold = sys.stdout.isatty()
    header = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    typer.echo(typer.style(header, bold=True) if bold else header)
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


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
