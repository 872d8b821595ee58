"""What every TLS listener of the gateway does alike: accept, handshake, track, close.

Receives TCP connections on a host and port; upgrades each with the context a
subclass supplies *at that moment* (so a swapped context applies to the next
handshake) within a handshake timeout; hands the encrypted stream to the subclass's
`serve`. Connection tasks are tracked so that shutdown can wait for them or cut
them; the raw socket is aborted at the end (asyncio would otherwise wait up to 30 s
for the peer's TLS close_notify, or leak the socket past shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterable
from typing import Any

from gateway.logs import get_logger

log = get_logger("gateway.tls")


def tls_reason(exc: BaseException) -> str:
    """A short, loggable reason for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate_rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    return type(exc).__name__


class TlsServer:
    """Subclasses implement `context` and `serve`; `accepted` runs before the handshake."""

    name = "tls"  # log event "<name>.listening"
    tls_failed_event = "tls.handshake_failed"

    def __init__(self, host: str, port: int, *, handshake_timeout_s: float) -> None:
        self._host = host
        self._port = port
        self._handshake_timeout_s = handshake_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.tls_failures = 0

    # --- what subclasses supply ---------------------------------------------------

    def context(self) -> ssl.SSLContext:
        raise NotImplementedError

    def accepted(self, host: str) -> object:
        """Called at accept, before TLS; its result is handed to `serve`."""
        return None

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: tuple[str, int],
        admission: Any,
    ) -> None:
        raise NotImplementedError

    # --- the shell ------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._port, reuse_address=True
        )
        log.info(f"{self.name}.listening", host=self._host, port=self.port)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError(f"{self.name} listener not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def started(self) -> bool:
        return self._server is not None

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def cut(self, tasks: Iterable[asyncio.Task[Any]]) -> None:
        for task in tasks:
            task.cancel()

    async def wait_connections_closed(self, grace_s: float) -> None:
        """Wait for live connections to end; cancel what remains after `grace_s`."""
        pending = set(self._connections)
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            self.cut(still)
            if still:
                await asyncio.wait(still, timeout=1)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        name = writer.get_extra_info("peername") or ("?", 0)
        peer = (str(name[0]), int(name[1]))
        raw = writer.transport  # start_tls replaces writer.transport; this one is the TCP socket
        try:
            admission = self.accepted(peer[0])
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await writer.start_tls(self.context(), ssl_handshake_timeout=self._handshake_timeout_s)
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                self.tls_failures += 1
                log.info(self.tls_failed_event, peer=peer[0], port=peer[1], reason=tls_reason(exc))
                return
            await self.serve(reader, writer, peer, admission)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            if task is not None:
                self._connections.discard(task)
            with contextlib.suppress(Exception):
                if not raw.is_closing():
                    raw.abort()
