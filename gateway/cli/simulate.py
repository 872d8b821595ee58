"""``gateway simulate``: a fleet of simulated devices against the running gateway, end to end.

Registers and enrolls the devices through the API (reusing those a previous run left in
the state directory), connects each with its own certificate over mutual TLS, publishes
info and components once, then readings and health every interval (`gateway.simulator`).
On a terminal a progress line is redrawn on stderr; at the end a summary goes to stdout
(``--json``: one JSON document). Ctrl-C or SIGTERM stop cleanly: outstanding
acknowledgements get a few seconds and the summary is printed; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from gateway.cli.client import ca_bundle, read_token
from gateway.cli.common import Progress, fails_cleanly, mqtt_target, print_json, settings_from
from gateway.core.simulation import Counters, device_ids
from gateway.errors import ConfigError
from gateway.simulator import Api, Target, provision, run

PROGRESS_EVERY_S = 2.0


def _install_stop(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop``; the second one gets the default behaviour (stop at once)."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        stop.set()
        loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


async def _report_progress(counters: Counters, started: float, progress: Progress) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        progress.show(counters.progress_line(timedelta(seconds=time.monotonic() - started)))


async def _simulate(
    api_url: str,
    token: str,
    cacert: Path,
    state_dir: Path,
    ids: list[str],
    *,
    prefix: str,
    concurrency: int,
    target: Target,
    duration: float | None,
) -> tuple[Counters, float, bool]:
    """Provision, then run until ``duration`` or a signal; (counters, run seconds, stopped early)."""
    stop = asyncio.Event()
    _install_stop(stop)
    progress = Progress()
    counters = Counters(devices=len(ids), qos=target.qos)
    verify = ssl.create_default_context(cafile=str(cacert))
    async with httpx.AsyncClient(base_url=api_url + "/api/v1", verify=verify, timeout=30.0) as http:
        fleet = await provision(
            Api(http, token),
            ids,
            state_dir,
            prefix=prefix,
            concurrency=concurrency,
            stop=stop,
            on_progress=lambda done, total: progress.show(f"provisioning devices: {done}/{total}"),
        )
    progress.done()
    counters.registered, counters.reused = fleet.registered, fleet.reused
    if stop.is_set():
        return counters, 0.0, True
    started = time.monotonic()
    if duration is not None:
        asyncio.get_running_loop().call_later(duration, stop.set)
    reporter = (
        asyncio.create_task(_report_progress(counters, started, progress)) if progress.enabled else None
    )
    try:
        await run(fleet.devices, target, counters, stop)
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        progress.done()
    return counters, time.monotonic() - started, False


def _print_summary(summary: dict[str, Any], interval: float) -> None:
    latency = summary["ack_latency_ms"]
    acked = f"{summary['acknowledged']}" if summary["qos"] else "- (QoS 0 has no acknowledgements)"
    if latency["mean"] is not None:
        acked += f"  (latency mean {latency['mean']} ms, max {latency['max']} ms)"
    lines = [
        f"simulated {summary['devices']} device(s) for {summary['elapsed_s']} s, "
        f"every {interval} s at QoS {summary['qos']} "
        f"({summary['registered']} registered now, {summary['reused']} reused)",
        f"  sessions      {summary['sessions']}  (connect failures {summary['connect_failures']}, "
        f"lost {summary['disconnects']})",
        f"  sent          {summary['sent']}",
        f"  acknowledged  {acked}",
        f"  failed        {summary['failed']}",
        f"  rejected      {summary['rejected']}",
        f"  rate          {summary['messages_per_s']} msg/s",
    ]
    if summary["last_error"]:
        lines.append(f"  last error    {summary['last_error']}")
    typer.echo("\n".join(lines))


@fails_cleanly
def simulate(
    ctx: typer.Context,
    devices: Annotated[
        int, typer.Option("--devices", "-n", min=1, max=10_000, help="How many devices.")
    ] = 10,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between readings (and health) per device.")
    ] = 5.0,
    qos: Annotated[int, typer.Option("--qos", min=0, max=1, help="0 or 1 (1: counts acknowledgements).")] = 1,
    duration: Annotated[
        float | None,
        typer.Option("--duration", min=0.1, help="Stop after this many seconds (default: run until Ctrl-C)."),
    ] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Device ids are PREFIX-0001, PREFIX-0002, ...")
    ] = "sim",
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=64, help="Devices registered and enrolled at once.")
    ] = 8,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir", file_okay=False, help="Simulator credentials (default: <data_dir>/simulator)"
        ),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="MQTT host (default: mqtt.host)")] = None,
    port: Annotated[int | None, typer.Option("--port", help="MQTT port (default: mqtt.port)")] = None,
    api: Annotated[str | None, typer.Option("--api", help="API base URL (default: from settings)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document at the end.")] = False,
) -> None:
    """Simulate a fleet of devices: register, enroll, connect over mTLS and publish data.

    Devices PREFIX-0001..PREFIX-N are registered and enrolled through the API (a rerun
    reuses those in the state directory), publish info and components once, then
    readings (temperature, humidity, pressure, CO2, a door contact) and health every
    --interval seconds. Prints sent, acknowledged, failed and rejected counts at the
    end; Ctrl-C stops cleanly. Examples:

      gateway simulate --devices 50 --interval 5

      gateway simulate --devices 300 --interval 10 --duration 60 --json

      gateway simulate --devices 5 --interval 0.5 --qos 0 --prefix lab
    """
    settings = settings_from(ctx)
    ids = device_ids(prefix, devices)
    token, cacert = read_token(settings), ca_bundle(settings)
    mqtt_host, mqtt_port = mqtt_target(settings, host, port)
    target = Target(host=mqtt_host, port=mqtt_port, interval_s=interval, qos=qos)
    try:
        counters, elapsed, early = asyncio.run(
            _simulate(
                api or settings.api_url,
                token,
                cacert,
                state_dir or settings.paths.data_dir / "simulator",
                ids,
                prefix=prefix,
                concurrency=concurrency,
                target=target,
                duration=duration,
            )
        )
    except KeyboardInterrupt:  # the second Ctrl-C: stop at once, without a summary
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    summary = counters.snapshot(timedelta(seconds=elapsed))
    if json_out:
        print_json(summary)
    else:
        _print_summary(summary, interval)
    if not early and counters.sessions == 0 and counters.connect_failures:
        raise ConfigError(
            f"no simulated device could connect to MQTT at {mqtt_host}:{mqtt_port}: {counters.last_error}"
        )
