"""Connection history: every device session from its start to its end, written in batches.

Receives from the gatekeeper each device session once presence gave it its epoch, and
each end with its reason and the connection's traffic counters; hands on rows in the
store (`gateway.store.history`), all that came and went in one transaction every
``history.flush_s``, and a device's sessions, newest first, the running one with its
live counters. At most ``history.max_pending`` starts and ends wait in memory; beyond
that further ones are dropped and counted (presence, not this, is the durable truth).

Retention: a batch trims the devices it starts sessions for to their newest
``history.connections_per_device``; `purge` deletes sessions ended more than
``history.connections_days`` ago. At start-up, sessions a previous run left open end
with ``gateway_restart``, as presence does.

`run_periodically` drives the flushes and purges of this and of `gateway.failures`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from gateway.broker import LiveSession
from gateway.config import HistorySettings
from gateway.core.clock import utcnow
from gateway.core.history import SessionEnd, SessionRecord, SessionStart
from gateway.core.presence import OfflineReason
from gateway.errors import Conflict
from gateway.logs import get_logger
from gateway.store.history import HistoryStore

log = get_logger("gateway.history")

PURGE_BATCH_ROWS = 5_000


class ConnectionHistory:
    def __init__(
        self,
        store: HistoryStore,
        settings: HistorySettings,
        live: Callable[[], Iterable[LiveSession]],
    ) -> None:
        self._store = store
        self._settings = settings
        self._live = live
        self._starts: list[SessionStart] = []
        self._ends: list[SessionEnd] = []
        self._lock = asyncio.Lock()  # one flush at a time: a start is always stored before its end
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._starts) + len(self._ends)

    def _room(self) -> bool:
        if self.pending < self._settings.max_pending:
            return True
        self.dropped += 1
        if self.dropped % 1000 == 1:
            log.warning("history.dropped", dropped=self.dropped, pending=self.pending)
        return False

    def started(self, session: LiveSession, at: datetime) -> None:
        """A device session went online (its epoch is set)."""
        if session.device_id is None or session.epoch is None or not self._room():
            return
        self._starts.append(
            SessionStart(
                session.device_id,
                session.epoch,
                at,
                session.peer.host,
                session.peer.port,
                session.certificate.serial,
            )
        )

    def ended(self, session: LiveSession, reason: OfflineReason, at: datetime) -> None:
        """A device session ended (taken over included: the history shows each session)."""
        if session.device_id is None or session.epoch is None or not self._room():
            return
        self._ends.append(
            SessionEnd(session.device_id, session.epoch, at, reason.value, session.traffic.snapshot())
        )

    async def flush(self) -> None:
        """Write every start and end waiting; on a passing failure they wait for the next flush."""
        async with self._lock:
            starts, ends = self._starts, self._ends
            if not starts and not ends:
                return
            self._starts, self._ends = [], []
            try:
                await self._store.write(starts, ends, keep_per_device=self._settings.connections_per_device)
            except Conflict:
                log.exception("history.batch_dropped", starts=len(starts), ends=len(ends))
            except Exception:
                self._starts, self._ends = starts + self._starts, ends + self._ends
                self._trim()
                raise

    def _trim(self) -> None:
        """Back within ``max_pending`` after a failed flush put its batch back: the newest go."""
        excess = self.pending - self._settings.max_pending
        if excess <= 0:
            return
        self.dropped += excess
        cut = min(excess, len(self._ends))
        del self._ends[len(self._ends) - cut :]
        del self._starts[len(self._starts) - (excess - cut) :]

    async def recover(self) -> int:
        """At start: sessions left open by a previous run end with ``gateway_restart``."""
        closed = await self._store.close_open(OfflineReason.GATEWAY_RESTART.value, utcnow())
        if closed:
            log.info("history.recovered", sessions=closed)
        return closed

    async def sessions(self, device_id: str, *, limit: int, offset: int) -> tuple[list[SessionRecord], int]:
        """A device's sessions, newest first; the running one carries its live counters."""
        await self.flush()  # what happened until now is in the answer
        records, total = await self._store.sessions_of(device_id, limit=limit, offset=offset)
        running = {
            session.epoch: session.traffic.snapshot()
            for session in self._live()
            if session.device_id == device_id and session.epoch is not None
        }
        return [
            record.with_traffic(running[record.epoch])
            if record.disconnected_at is None and record.epoch in running
            else record
            for record in records
        ], total

    async def purge(self) -> int:
        """Delete sessions that ended more than ``connections_days`` ago."""
        cutoff = utcnow() - timedelta(days=self._settings.connections_days)
        total = 0
        while (deleted := await self._store.purge(cutoff, PURGE_BATCH_ROWS)) > 0:
            total += deleted
            if deleted < PURGE_BATCH_ROWS:
                break
            await asyncio.sleep(0)  # let other writers in between batches
        if total:
            log.info("history.purged", sessions=total)
        return total


class Recorder(Protocol):
    async def flush(self) -> None: ...

    async def purge(self) -> int: ...


async def run_periodically(recorders: Sequence[Recorder], *, flush_s: float, purge_every_s: float) -> None:
    """Flush every recorder every `flush_s`, and purge each every `purge_every_s` (first at start)."""
    loop = asyncio.get_running_loop()
    next_purge = loop.time()
    while True:
        for recorder in recorders:
            try:
                await recorder.flush()
            except Exception:
                log.exception("history.flush_failed", recorder=type(recorder).__name__)
        if loop.time() >= next_purge:
            next_purge = loop.time() + purge_every_s
            for recorder in recorders:
                try:
                    await recorder.purge()
                except Exception:
                    log.exception("history.purge_failed", recorder=type(recorder).__name__)
        await asyncio.sleep(flush_s)
