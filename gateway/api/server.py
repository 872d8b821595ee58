"""uvicorn in the gateway's own event loop, over TLS with the server certificate.

The composition root owns signals and shutdown, so uvicorn's own signal capture is
switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

API_SHUTDOWN_GRACE_S = 2


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiServer:
    def __init__(self, app: FastAPI, *, host: str, port: int, certfile: Path, keyfile: Path) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            # An idle keep-alive client (an SDK, a dashboard) must not hold shutdown, and
            # with it every device's OFFLINE status, for asyncio's 30 s TLS close wait.
            timeout_graceful_shutdown=API_SHUTDOWN_GRACE_S,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="api-server")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises the start-up error (port in use, bad cert)
                raise RuntimeError("API server stopped during start-up")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                port: int = sock.getsockname()[1]
                return port
        raise RuntimeError("API server not started")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
