"""The MQTT listener: TCP accept, our own TLS handshake, then the MQTT engine.

Receives TCP connections on ``mqtt.host:mqtt.port``; upgrades each with the TLS
context current at that moment (`TlsContexts.current`: CERT_REQUIRED, our CA, the
CRL) within ``mqtt.tls_handshake_timeout_s``; hands the encrypted stream to
`MqttEngine.serve_connection`. Certificates the TLS layer can judge (wrong CA,
expired, not yet valid, revoked, none at all) fail here and never reach MQTT.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from gateway.broker import MqttEngine
from gateway.config import MqttSettings
from gateway.pki import TlsContexts
from gateway.tls_server import TlsServer


class MqttListener(TlsServer):
    name = "mqtt"

    def __init__(self, engine: MqttEngine, tls: TlsContexts, settings: MqttSettings) -> None:
        super().__init__(settings.host, settings.port, handshake_timeout_s=settings.tls_handshake_timeout_s)
        self._engine = engine
        self._tls = tls

    def context(self) -> ssl.SSLContext:
        return self._tls.current

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: tuple[str, int],
        admission: Any,
    ) -> None:
        await self._engine.serve_connection(reader, writer)
