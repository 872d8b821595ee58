"""The MQTT listener: TCP accept, our own TLS handshake, then the MQTT engine.

Receives TCP connections on ``mqtt.host:mqtt.port``; upgrades each with the TLS
context current at that moment (`TlsContexts.current`: CERT_REQUIRED, our CA, the
CRL) within ``mqtt.tls_handshake_timeout_s``; hands the encrypted stream to
`MqttEngine.serve_connection`. Certificates the TLS layer can judge (wrong CA,
expired, not yet valid, revoked, none at all) fail here and never reach MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from gateway.broker import MqttEngine
from gateway.config import MqttSettings
from gateway.logs import get_logger
from gateway.pki import TlsContexts

log = get_logger("gateway.listener")


class MqttListener:
    def __init__(self, engine: MqttEngine, tls: TlsContexts, settings: MqttSettings) -> None:
        self._engine = engine
        self._tls = tls
        self._settings = settings
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.tls_failures = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, self._settings.host, self._settings.port, reuse_address=True
        )
        log.info("mqtt.listening", host=self._settings.host, port=self.port)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("listener not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def wait_connections_closed(self, grace_s: float) -> None:
        """Wait for live connections to end; cancel what remains after `grace_s`."""
        pending = set(self._connections)
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        raw = writer.transport  # the TCP transport under TLS; start_tls replaces writer.transport
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await writer.start_tls(
                    self._tls.current, ssl_handshake_timeout=self._settings.tls_handshake_timeout_s
                )
            except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                self.tls_failures += 1
                log.info("tls.handshake_failed", peer=peer[0], port=peer[1], reason=tls_reason(exc))
                writer.transport.abort()
                return
            await self._engine.serve_connection(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        finally:
            if task is not None:
                self._connections.discard(task)
            # The session is over and TLS close_notify was sent; asyncio would otherwise keep
            # the socket until the peer answers it (up to 30 s), or leak it past shutdown.
            with contextlib.suppress(Exception):
                if not raw.is_closing():
                    raw.abort()


def tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate_rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    return type(exc).__name__
