"""The process runner `gateway.app.serve`, in process: start-up state hidden from the collector,
a short GIL switch interval."""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path

from gateway.app import SWITCH_INTERVAL_S, serve
from tests.conftest import make_settings
from tests.integration.test_ingest import eventually


async def test_serve_freezes_what_start_up_built_and_stops_on_the_event(tmp_path: Path) -> None:
    """Once started, serve() has moved start-up objects out of the collector's sight (gc.freeze),
    so full collections stay short, and shortened the GIL switch interval for the writer thread;
    setting `stop` ends it cleanly."""
    settings = make_settings(tmp_path)
    gc.unfreeze()
    interval = sys.getswitchinterval()
    stop = asyncio.Event()
    running = asyncio.create_task(serve(settings, stop))
    try:
        await eventually(lambda: gc.get_freeze_count() > 10_000, "start-up objects frozen", 30)
        await eventually(lambda: sys.getswitchinterval() == SWITCH_INTERVAL_S, "switch interval set", 5)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        gc.unfreeze()  # the rest of the test session collects as usual
        sys.setswitchinterval(interval)
