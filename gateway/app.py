"""The composition root: builds every component once, starts them in order, stops them.

Receives `Settings`; hands on a running gateway (MQTT listener + HTTPS API in one
event loop) until asked to stop. Start order: PKI and database (``init``), MQTT
engine, presence recovery (devices left ONLINE -> ``gateway_restart``), CRL from the
registry, listener, provisioning listener (when enabled), API. Stop order: stop
accepting (a provisioning answer in progress may finish), close every device session with
``gateway_shutdown`` (DB first, then retained status), then, once those statuses were
delivered, the operators' sessions, then the engine and database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from gateway.api import ApiContext, create_app
from gateway.api.server import ApiServer
from gateway.audit import Audit
from gateway.broker import MqttEngine
from gateway.config import Settings
from gateway.core import tokens
from gateway.core.clock import utcnow
from gateway.core.presence import OfflineReason
from gateway.core.ratelimit import Rate
from gateway.credentials import CertificateLifecycle, Revocations
from gateway.devices import DeviceService
from gateway.events import Events
from gateway.failures import ConnectFailures
from gateway.history import ConnectionHistory, run_periodically
from gateway.ingest import Ingest
from gateway.listener import MqttListener
from gateway.logs import get_logger
from gateway.pki import Pki, PkiPaths, TlsContexts
from gateway.pki import initialise as initialise_pki
from gateway.presence import PresenceService
from gateway.provisioning import ProvisioningListener
from gateway.retention import Retention
from gateway.sessions import Gatekeeper
from gateway.store import Store
from gateway.store.audit import AuditStore
from gateway.store.data import DeviceData
from gateway.store.failures import FailureStore
from gateway.store.history import HistoryStore
from gateway.tokens import ApiTokens

log = get_logger("gateway.app")

CRL_REFRESH_INTERVAL_S = 6 * 3600
EXPIRY_CHECK_INTERVAL_S = 24 * 3600
SWITCH_INTERVAL_S = 0.001  # sys.setswitchinterval while serving (Python's default: 5 ms)


@dataclass
class InitReport:
    created: list[str] = field(default_factory=list)
    admin_token: str | None = None  # only when this run created it
    admin_token_path: Path | None = None


def write_secret(path: Path, value: str) -> None:
    """Write a secret file with mode 0600 (created so; never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


async def initialise(settings: Settings, *, new_admin_token: bool = False) -> InitReport:
    """Create the CA, server certificate, CRL, schema and admin token if missing (idempotent).

    `new_admin_token` adds an admin token even if tokens exist: the way back in when every
    admin token was revoked or lost (it needs the data directory, i.e. the host itself).
    """
    report = InitReport()
    settings.paths.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = utcnow()
    report.created += initialise_pki(
        PkiPaths(settings.paths.certs_dir),
        settings.server.hostnames,
        now,
        timedelta(days=settings.ca.crl_next_update_days),
    )
    store = Store(settings.database_url, busy_timeout_s=settings.database.busy_timeout_s)
    try:
        await store.create_schema()
        first = await store.tokens.count() == 0
        if first or new_admin_token:
            name = "admin" if first else f"admin-{now:%Y%m%d-%H%M%S}"  # names are unique for good
            created = await ApiTokens(store.tokens, Audit(AuditStore(store.engine))).create(
                name, tokens.ALL_SCOPES
            )
            write_secret(settings.admin_token_path, created.value)
            report.admin_token = created.value
            report.admin_token_path = settings.admin_token_path
            report.created.append("admin API token")
            log.info("init.admin_token_created", path=str(settings.admin_token_path))
    finally:
        await store.close()
    return report


class GatewayApp:
    """One running gateway. `start()`, then `stop()`; or ``async with``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.init_report: InitReport | None = None
        self.store = Store(settings.database_url, busy_timeout_s=settings.database.busy_timeout_s)
        self.engine = MqttEngine(settings.mqtt)
        self.events = Events(self.engine)
        self.presence = PresenceService(self.store, self.events)
        self.audit_store = AuditStore(self.store.engine)
        self.audit = Audit(self.audit_store)
        self.data = DeviceData(self.store.engine)
        self.ingest = Ingest(self.data, self.events, settings.ingest, last_seen=self._last_seen)
        self.retention = Retention(self.data, settings.retention)
        self.history = ConnectionHistory(
            HistoryStore(self.store.engine), settings.history, live=self.engine.live_sessions
        )
        self.provisioning: ProvisioningListener | None = None  # only when provisioning.mqtt_enabled
        self._background: list[asyncio.Task[None]] = []
        self._started = False

    async def start(self) -> None:
        self.init_report = await initialise(self.settings)
        ca_settings = self.settings.ca
        self.pki = Pki.load(PkiPaths(self.settings.paths.certs_dir), ca_settings.external_anchors)
        self.tls = TlsContexts(self.pki)
        self.revocations = Revocations(
            self.store.credentials, self.pki, self.tls, timedelta(days=ca_settings.crl_next_update_days)
        )
        self.certificates = CertificateLifecycle(
            self.store.credentials, self.pki, self.revocations, self.events, self.audit, ca_settings
        )
        self.devices = DeviceService(
            self.store,
            self.pki,
            self.revocations,
            self.engine,
            self.events,
            self.audit,
            token_ttl=timedelta(hours=self.settings.provisioning.token_ttl_hours),
            device_validity=ca_settings.device_validity,
        )
        self.failures = ConnectFailures(FailureStore(self.store.engine), self.devices, self.settings.history)
        self.gatekeeper = Gatekeeper(
            self.store,
            self.presence,
            self.events,
            self.ingest,
            self.certificates,
            self.history,
            self.failures,
        )
        await self.ingest.start()
        await self.engine.start(self.gatekeeper)
        recovered = await self.presence.recover()
        await self.history.recover()
        await self.revocations.refresh()
        self.listener = MqttListener(self.engine, self.tls, self.settings.mqtt)
        await self.listener.start()
        if self.settings.provisioning.mqtt_enabled:
            self.provisioning = ProvisioningListener(
                self.devices,
                self.events,
                self.pki.provisioning_context(),
                self.settings.provisioning,
                self.settings.mqtt,
            )
            await self.provisioning.start()
        self.api_context = ApiContext(
            devices=self.devices,
            store=self.store,
            pki=self.pki,
            data=self.data,
            audit=self.audit_store,
            session_count=lambda: self.engine.connected_count,
            history=self.history,
            failures=self.failures,
            provisioning_rate=Rate(self.settings.provisioning.https_attempts_per_minute, per_s=60.0),
        )
        api = create_app(self.api_context)
        self.api = ApiServer(
            api,
            host=self.settings.api.host,
            port=self.settings.api.port,
            certfile=self.pki.paths.server_cert,
            keyfile=self.pki.paths.server_key,
        )
        await self.api.start()
        self._background = [
            asyncio.create_task(self._refresh_crl_periodically(), name="crl-refresh"),
            asyncio.create_task(self._announce_expiring_daily(), name="certificate-expiry"),
            asyncio.create_task(self.retention.run(), name="retention"),
            asyncio.create_task(
                run_periodically(
                    [self.history, self.failures],
                    flush_s=self.settings.history.flush_s,
                    purge_every_s=self.settings.retention.interval_s,
                ),
                name="history",
            ),
        ]
        self._started = True
        log.warning(  # warning level: the one line an operator needs even with quiet logs
            "gateway.started",
            mqtt_host=self.settings.mqtt.host,
            mqtt_port=self.mqtt_port,
            api_url=f"https://{self.settings.api.host}:{self.api_port}",
            api_port=self.api_port,
            recovered_offline=recovered,
        )

    def _last_seen(self) -> list[tuple[str, float]]:
        return [
            (s.device_id, s.last_packet_at) for s in self.engine.live_sessions() if s.device_id is not None
        ]

    @property
    def mqtt_port(self) -> int:
        return self.listener.port

    @property
    def provisioning_port(self) -> int | None:
        return None if self.provisioning is None else self.provisioning.port

    @property
    def api_port(self) -> int:
        return self.api.port

    async def _refresh_crl_periodically(self) -> None:
        """Re-sign the CRL well before its next-update time (an expired CRL fails every handshake)."""
        while True:
            await asyncio.sleep(CRL_REFRESH_INTERVAL_S)
            try:
                await self.revocations.refresh()
            except Exception:
                log.exception("pki.crl_refresh_failed")

    async def _announce_expiring_daily(self) -> None:
        """certificate_expiring events and renewal hints for live sessions, at start and then daily."""
        while True:
            try:
                await self.certificates.announce_expiring(self.engine.live_sessions())
            except Exception:
                log.exception("certificate.expiry_check_failed")
            await asyncio.sleep(EXPIRY_CHECK_INTERVAL_S)

    async def stop(self) -> None:
        if not self._started:
            await self.store.close()
            return
        self._started = False
        log.info("gateway.stopping")
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.listener.stop_accepting()
        if self.provisioning is not None:
            await self.provisioning.stop()
        # The API stops taking requests at once; its idle keep-alive clients get up to
        # API_SHUTDOWN_GRACE_S while the sessions close, never delaying the OFFLINE statuses.
        api_stopped = asyncio.create_task(self.api.stop(), name="api-stop")
        # Devices first, operators last: a live `gateway tail` sees every device go OFFLINE.
        closed = await self.engine.kick_all(
            OfflineReason.GATEWAY_SHUTDOWN, which=lambda live: live.device_id is not None
        )
        await self.ingest.stop()  # commits what was queued before the sessions closed
        swept = await self.presence.sweep(OfflineReason.GATEWAY_SHUTDOWN)
        await self.engine.drain(timeout_s=2.0)
        closed += await self.engine.kick_all(OfflineReason.GATEWAY_SHUTDOWN)
        await api_stopped
        await self.listener.wait_connections_closed(grace_s=5)
        await self.engine.stop()
        for recorder in (self.history, self.failures):  # the sessions' ends, the last refusals
            try:
                await recorder.flush()
            except Exception:
                log.exception("history.flush_failed", recorder=type(recorder).__name__)
        await self.data.close()
        await self.store.close()
        log.info("gateway.stopped", sessions_closed=closed, swept=swept)

    async def __aenter__(self) -> GatewayApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def settle_runtime() -> None:
    """How a started gateway runs (`serve`, and the benchmarks that measure it): what start-up
    built lives as long as the process, so it goes out of the collector's sight, and threads
    get the GIL back sooner."""
    # A full collection then scans only what came later (~155k objects took 150-250 ms per
    # pass, an event-loop stall every few seconds under load; ~10 ms once frozen).
    gc.collect()
    gc.freeze()
    # The ingest writer thread (SQLite) takes the GIL back from the busy event loop several
    # times per batch; at the default 5 ms switch interval each time can cost up to 5 ms
    # (benchmarked: 1.3-1.5x QoS 1 throughput with 1 ms).
    sys.setswitchinterval(SWITCH_INTERVAL_S)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    app = GatewayApp(settings)
    try:
        await app.start()
        settle_runtime()
        await stop.wait()
    finally:
        await app.stop()
