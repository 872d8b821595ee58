"""Retention: readings and health older than their configured age are deleted in the background.

Receives the retention settings; deletes in small transactions (``batch_size`` rows
each) so that the ingest writer is never locked out for long, and logs what it did.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from gateway.config import RetentionSettings
from gateway.core.clock import utcnow
from gateway.logs import get_logger
from gateway.store.data import DeviceData

log = get_logger("gateway.retention")


class Retention:
    def __init__(self, data: DeviceData, settings: RetentionSettings) -> None:
        self._data = data
        self._settings = settings

    async def purge_once(self) -> dict[str, int]:
        """Delete everything past its age, batch by batch; returns rows deleted per table."""
        deleted: dict[str, int] = {}
        for table, days in (
            ("readings", self._settings.readings_days),
            ("health", self._settings.health_days),
        ):
            cutoff = utcnow() - timedelta(days=days)
            total = 0
            while True:
                count = await self._data.purge(table, cutoff, self._settings.batch_size)
                total += count
                if count < self._settings.batch_size:
                    break
                await asyncio.sleep(0)  # let the ingest writer in between batches
            deleted[table] = total
        if any(deleted.values()):
            log.info("retention.purged", **deleted)
        return deleted

    async def run(self) -> None:
        while True:
            try:
                await self.purge_once()
            except Exception:
                log.exception("retention.failed")
            await asyncio.sleep(self._settings.interval_s)
