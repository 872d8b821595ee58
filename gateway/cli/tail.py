"""``gateway tail``: follow every status change and event as an operator over MQTT.

Subscribes to ``gateway/status/#`` (retained: the current status of every device
first, then changes) and ``gateway/events/#``. Statuses older than one already seen
for a device (lower epoch) are dropped, as DESIGN.md §7 asks of every consumer.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.cli.common import fails_cleanly, mqtt_target, settings_from
from gateway.cli.operators import issue_operator
from gateway.config import Settings
from gateway.core.presence import supersedes
from gateway.errors import ConfigError
from gateway.mqtt_client import ConnectionClosed, ConnectRefused, Message, MqttClient

DEFAULT_OPERATOR = "cli"


def _paths(
    settings: Settings, cert: Path | None, key: Path | None, cacert: Path | None
) -> tuple[Path, Path, Path]:
    if (cert is None) != (key is None):
        raise ConfigError("pass both --cert and --key, or neither")
    if cert is not None and key is not None:
        return cert, key, cacert or settings.paths.certs_dir / "ca.crt"
    base = settings.paths.data_dir / "operators" / DEFAULT_OPERATOR
    if not (base / "operator.crt").exists():
        asyncio.run(issue_operator(settings, DEFAULT_OPERATOR, base))
    return base / "operator.crt", base / "operator.key", cacert or base / "ca.crt"


def _line(message: Message, payload: Any) -> str:
    if not isinstance(payload, dict):
        return f"{message.topic}  {payload!r}"
    ts = payload.get("ts", "")
    if message.topic.startswith("gateway/status/"):
        status = str(payload.get("status", "?")).upper()
        extra = f" ip={payload['client_ip']}" if payload.get("client_ip") else ""
        snapshot = "  (current)" if message.retain else ""
        return (
            f"{ts}  {status:<8} {payload.get('device_id')}  reason={payload.get('reason')} "
            f"epoch={payload.get('epoch')}{extra}{snapshot}"
        )
    fields = " ".join(f"{k}={v}" for k, v in payload.items() if k not in ("ts", "kind") and v is not None)
    return f"{ts}  EVENT    {payload.get('kind', message.topic)}  {fields}"


async def follow(
    settings: Settings,
    cert: Path,
    key: Path,
    cacert: Path,
    *,
    json_out: bool,
    count: int | None,
    host: str | None,
    port: int | None,
) -> int:
    ctx = ssl.create_default_context(cafile=str(cacert))
    ctx.load_cert_chain(str(cert), str(key))
    target, port = mqtt_target(settings, host, port)
    client = MqttClient(client_id="", keepalive=30)
    seen: dict[str, int] = {}
    printed = 0
    try:
        try:
            await client.connect(target, port, ssl=ctx, server_hostname=target)
        except OSError as exc:  # TCP itself failed (TLS and MQTT failures are ConnectionClosed)
            raise ConfigError(
                f"cannot reach the gateway's MQTT listener at {target}:{port} "
                f"({exc or type(exc).__name__}); is `gateway serve` running?"
            ) from exc
        await client.subscribe(("gateway/status/#", 1), ("gateway/events/#", 1))
        async for message in client.messages():
            try:
                payload: Any = json.loads(message.payload)
            except ValueError:
                payload = message.payload.decode("utf-8", "replace")
            if message.topic.startswith("gateway/status/") and isinstance(payload, dict):
                device, epoch = str(payload.get("device_id")), int(payload.get("epoch", 0))
                if not supersedes(seen.get(device), epoch):
                    continue
                seen[device] = epoch
            if json_out:
                sys.stdout.write(
                    json.dumps({"topic": message.topic, "retained": message.retain, "payload": payload})
                    + "\n"
                )
            else:
                sys.stdout.write(_line(message, payload) + "\n")
            sys.stdout.flush()
            printed += 1
            if count is not None and printed >= count:
                break
    finally:
        await client.close()
    return printed


@fails_cleanly
def tail(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document per line (NDJSON).")] = False,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Stop after this many messages.")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Operator certificate (default: issued for 'cli')")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Operator private key.")] = None,
    cacert: Annotated[Path | None, typer.Option("--cacert", help="The gateway's CA certificate.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="MQTT host (default: mqtt.host)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="MQTT port (default: mqtt.port)")] = None,
) -> None:
    """Print every device status change and gateway event as it happens (Ctrl-C to stop).

    The first lines are the current status of every known device. Without --cert/--key
    an operator certificate named 'cli' is issued once into <data_dir>/operators/cli. Examples:

      gateway tail

      gateway tail --count 20 --json > events.ndjson

      gateway tail --cert alice/operator.crt --key alice/operator.key \\
        --cacert alice/ca.crt
    """
    settings = settings_from(ctx)
    cert_path, key_path, ca_path = _paths(settings, cert, key, cacert)
    try:
        asyncio.run(
            follow(
                settings, cert_path, key_path, ca_path, json_out=json_out, count=count, host=host, port=port
            )
        )
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except ConnectRefused as exc:
        raise ConfigError(
            f"the gateway refused the operator certificate (CONNACK {exc.return_code})"
        ) from exc
    except (ConnectionClosed, OSError) as exc:
        raise ConfigError(f"lost the MQTT connection to the gateway: {exc}") from exc
