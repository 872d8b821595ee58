"""Connect failures: refused CONNECTs aggregated for operators, and approval of unknown certificates.

Receives every refusal from the gatekeeper (`refused`, no await: it only counts, in a
bounded `FailureAggregator`); hands on one upsert per key and interval to the store
(`gateway.store.failures`), so a flood of refusals is one small transaction per
``history.flush_s``, never a write per attempt; and pages of failures to the API.

`approve` turns an unknown certificate (`gateway.core.failures.APPROVABLE`) into a
device bound to it, through `DeviceService.adopt` (which vets the certificate against
the configured external CAs, records ``device.approved`` in the audit trail and
publishes the ``device`` event); the failure row then names the device it became.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from gateway.config import HistorySettings
from gateway.core.clock import utcnow
from gateway.core.failures import APPROVABLE, Attempt, FailureAggregator, FailureQuery, FailureRecord
from gateway.core.ids import Fingerprint
from gateway.core.records import DeviceRecord
from gateway.devices import DeviceService
from gateway.errors import Conflict, NotFound
from gateway.logs import get_logger
from gateway.store.failures import FailureStore

log = get_logger("gateway.failures")


class ConnectFailures:
    def __init__(self, store: FailureStore, devices: DeviceService, settings: HistorySettings) -> None:
        self._store = store
        self._devices = devices
        self._settings = settings
        self._aggregator = FailureAggregator(settings.max_pending)
        self._lock = asyncio.Lock()
        self.batches = 0  # transactions written: one per flush that had anything to write

    @property
    def pending(self) -> int:
        """Keys waiting for the next flush (at most ``history.max_pending``)."""
        return self._aggregator.pending

    @property
    def dropped(self) -> int:
        return self._aggregator.dropped

    def refused(self, attempt: Attempt) -> None:
        """Count one refused CONNECT (memory only; written at the next flush)."""
        if not self._aggregator.add(attempt) and self._aggregator.dropped % 1000 == 1:
            log.warning("connect_failures.dropped", dropped=self._aggregator.dropped, pending=self.pending)

    async def flush(self) -> None:
        """Merge what was counted since the last flush into the store (kept for the next on failure)."""
        async with self._lock:  # in order: a later flush never moves last_seen_at back
            tallies = self._aggregator.drain()
            if not tallies:
                return
            try:
                await self._store.merge(tallies, max_rows=self._settings.failures_max_rows)
            except Exception:
                self._aggregator.restore(tallies)
                raise
            self.batches += 1

    async def purge(self) -> int:
        """Delete the failures not seen for ``failures_days``."""
        deleted = await self._store.purge(utcnow() - timedelta(days=self._settings.failures_days))
        if deleted:
            log.info("connect_failures.purged", rows=deleted)
        return deleted

    async def find(self, query: FailureQuery) -> tuple[list[FailureRecord], int]:
        """A page of failures, most recently seen first (what was counted until now included)."""
        await self.flush()
        return await self._store.query(query)

    async def approve(self, fingerprint: str, *, name: str, device_id: str | None = None) -> DeviceRecord:
        """Create a device bound to the unknown certificate with this fingerprint."""
        wanted = Fingerprint(fingerprint.strip().lower())
        rows, _ = await self.find(FailureQuery(fingerprint=wanted.value, limit=100))
        if not rows:
            raise NotFound(f"no connect failure with fingerprint {wanted}", code="failure_not_found")
        unknown = next((row for row in rows if row.reason in APPROVABLE), None)
        if unknown is None:
            reasons = ", ".join(sorted({row.reason for row in rows}))
            raise Conflict(
                f"certificate {wanted.short()}... was refused as {reasons}; only an unknown "
                "certificate can be approved (the others belong to devices already)",
                code="not_approvable",
            )
        if unknown.approved_device_id is not None:
            raise Conflict(
                f"certificate {wanted.short()}... was approved already, "
                f"as device {unknown.approved_device_id}",
                code="already_approved",
            )
        if unknown.certificate_pem is None:
            raise Conflict(
                f"certificate {wanted.short()}... was not kept (too large); attach it to a device instead",
                code="not_approvable",
            )
        device = await self._devices.adopt(name, device_id, unknown.certificate_pem.encode("ascii"))
        await self._store.mark_approved(unknown.key, unknown.reason, device.id, utcnow())
        log.info("connect_failures.approved", fingerprint=wanted.value, device_id=device.id)
        return device
