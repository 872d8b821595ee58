"""Ingest: device data from accepted PUBLISHes into the database, acknowledged after commit.

Receives, from the gatekeeper, each PUBLISH a device may make (topic, payload, QoS);
parses it once (`gateway.core.payloads`), rejects bad input with an error to the
device and an ``ingest_rejected`` event (the device stays connected), and queues the
rest. One writer task commits the queue in batches (group commit: up to
``max_batch_rows`` rows or ``max_batch_delay_ms``) and then resolves each message's
future, which is what releases its PUBACK. The queue is bounded: when it is full,
QoS 1 submitters wait (the broker stops reading their sockets) and QoS 0 messages are
dropped and counted, their publisher's socket left unread for `QOS0_DROP_PAUSE_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.config import IngestSettings
from gateway.core import payloads
from gateway.core.clock import utcnow
from gateway.errors import InvalidValue, StoreUnavailable
from gateway.events import Events
from gateway.logs import get_logger
from gateway.store.data import NO_COMPONENT, DeviceData, IngestBatch, dumps_extra

log = get_logger("gateway.ingest")

QOS0_DROP_PAUSE_S = 0.002  # a publisher whose QoS 0 message met a full queue rests this long

Parsed = list[payloads.Reading] | payloads.Health | payloads.DeviceInfo | list[payloads.Component]


@dataclass(slots=True)
class _Item:
    device_id: str
    channel: payloads.Channel
    value: Parsed
    received_at: datetime
    stored: asyncio.Future[None] | None
    rows: int
    queued_at: float  # loop time it was queued: it waits at most max_batch_delay_ms from here


@dataclass
class IngestStats:
    accepted: int = 0  # parsed and valid (a QoS 0 message dropped on a full queue is not parsed)
    stored_rows: int = 0
    rejected: int = 0
    dropped_qos0: int = 0
    dropped_unknown_device: int = 0
    batches: int = 0
    failed_batches: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)


class Ingest:
    def __init__(
        self,
        data: DeviceData,
        events: Events,
        settings: IngestSettings,
        last_seen: Callable[[], Iterable[tuple[str, float]]],
    ) -> None:
        self._data = data
        self._events = events
        self._settings = settings
        self._last_seen = last_seen
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=settings.queue_size)
        self._seen_flushed: dict[str, float] = {}  # device id -> last packet time written
        self._ended_seen: dict[str, float] = {}  # sessions that ended since the last flush
        self._tasks: list[asyncio.Task[None]] = []
        self.stats = IngestStats()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._writer(), name="ingest-writer"),
            asyncio.create_task(self._flush_last_seen_periodically(), name="ingest-last-seen"),
        ]

    async def stop(self) -> None:
        """Commit what is queued (bounded wait), then stop the tasks."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=10)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_last_seen()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # --- submission (called by the broker for each accepted PUBLISH) --------------------

    async def submit(
        self, device_id: str, topic: str, payload: bytes, qos: int
    ) -> asyncio.Future[None] | None:
        """Parse and queue one message; the returned future resolves when it is committed."""
        if qos == 0 and self._queue.full():
            # Dropped before it is parsed: under overload, the CPU a parse would cost goes to
            # the writer (10 readings a PUBLISH: 3,300 stored/s while dropping, vs 15,400 at QoS 1).
            self._drop_qos0(device_id)
            # And this publisher's socket rests a moment: reading messages only to drop them
            # took the CPU the writer needed; its TCP window slows the sender meanwhile.
            await asyncio.sleep(QOS0_DROP_PAUSE_S)
            return None
        received_at = utcnow()
        try:
            channel, value = self._parse(topic, payload, received_at)
        except InvalidValue as exc:
            await self._reject(device_id, topic, exc)
            return None
        rows = len(value) if isinstance(value, list) else 1
        loop = asyncio.get_running_loop()
        item = _Item(device_id, channel, value, received_at, None, rows, loop.time())
        self.stats.accepted += 1
        if qos == 0:
            self._queue.put_nowait(item)  # not full: checked above, and parsing never yields
            return None
        if self._settings.ack_after_commit:
            item.stored = loop.create_future()
        try:
            self._queue.put_nowait(item)  # the common case, without a coroutine per message
        except asyncio.QueueFull:
            await self._queue.put(item)  # waits while the queue is full: back-pressure
        return item.stored

    def _drop_qos0(self, device_id: str) -> None:
        self.stats.dropped_qos0 += 1
        if self.stats.dropped_qos0 % 1000 == 1:
            log.warning("ingest.qos0_dropped", device_id=device_id, dropped=self.stats.dropped_qos0)

    def _parse(self, topic: str, payload: bytes, received_at: datetime) -> tuple[payloads.Channel, Parsed]:
        channel = payloads.channel_of(topic.split("/"))
        if channel is None:
            raise InvalidValue(f"unknown channel in {topic!r}", code="unknown_channel")
        if len(payload) > self._settings.max_payload_bytes:
            raise InvalidValue(
                f"payload of {len(payload)} bytes exceeds {self._settings.max_payload_bytes}",
                code="payload_too_large",
            )
        return channel, payloads.parse(channel, payload, received_at=received_at)

    async def _reject(self, device_id: str, topic: str, exc: InvalidValue) -> None:
        self.stats.rejected += 1
        self.stats.rejected_by_code[exc.code] = self.stats.rejected_by_code.get(exc.code, 0) + 1
        log.info("ingest.rejected", device_id=device_id, topic=topic, code=exc.code, reason=exc.message)
        await self._events.device_error(device_id, topic=topic, code=exc.code, message=exc.message)
        await self._events.emit(
            "ingest_rejected", device_id=device_id, topic=topic, code=exc.code, message=exc.message
        )

    # --- the writer ---------------------------------------------------------------------

    async def _writer(self) -> None:
        """Group commit: a batch is the first queued message and whatever joins it within
        max_batch_delay_ms of its arrival (or up to max_batch_rows).

        The delay counts from when the first message was queued, not from when the writer
        took it: messages that queued up while the previous batch was committing have
        waited long enough, and go at once.
        """
        loop = asyncio.get_running_loop()
        delay = self._settings.max_batch_delay_ms / 1000
        while True:
            items = [await self._queue.get()]
            rows = items[0].rows
            deadline = items[0].queued_at + delay
            while rows < self._settings.max_batch_rows:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if deadline <= loop.time():
                        break
                    try:
                        async with asyncio.timeout_at(deadline):  # a timer, not a task per wait
                            item = await self._queue.get()
                    except TimeoutError:
                        break
                items.append(item)
                rows += item.rows
            try:
                await self._commit(items)
            finally:
                for _ in items:
                    self._queue.task_done()

    async def _commit(self, items: list[_Item]) -> None:
        batch = self._batch(items)
        try:
            result = await self._data.write_batch(batch)
        except Exception as exc:
            self.stats.failed_batches += 1
            log.exception("ingest.batch_failed", messages=len(items))
            error = StoreUnavailable(f"batch not stored: {type(exc).__name__}")
            for item in items:
                if item.stored is not None and not item.stored.done():
                    item.stored.set_exception(error)
                    item.stored.exception()  # retrieved here; the session closes on it
            return
        self.stats.batches += 1
        self.stats.stored_rows += result.stored
        self.stats.dropped_unknown_device += result.dropped_unknown_device
        for item in items:
            if item.stored is not None and not item.stored.done():
                item.stored.set_result(None)

    def _batch(self, items: list[_Item]) -> IngestBatch:
        """Rows for one transaction; each sensor the readings name once (the store adds missing ones)."""
        batch = IngestBatch()
        sensors: set[tuple[str, str, str]] = set()
        for item in items:
            device_id, at, value = item.device_id, item.received_at, item.value
            if isinstance(value, payloads.Health):
                batch.health.append(_health_row(device_id, value, at))
            elif isinstance(value, payloads.DeviceInfo):
                batch.info.setdefault(device_id, {}).update(value.fields)
            elif item.channel is payloads.Channel.COMPONENTS:
                for component in (c for c in value if isinstance(c, payloads.Component)):
                    batch.components.append(
                        {
                            "device_id": device_id,
                            "id": component.id,
                            "profile": component.profile,
                            "created_at": at,
                            "updated_at": at,
                        }
                    )
                    for spec in component.sensors:
                        batch.announced_sensors.append(
                            {
                                "device_id": device_id,
                                "component": component.id,
                                "name": spec.name,
                                "value_type": spec.value_type,
                                "unit": spec.unit,
                                "created_at": at,
                                "updated_at": at,
                            }
                        )
            else:
                for reading in (r for r in value if isinstance(r, payloads.Reading)):
                    batch.readings.append(_reading_row(device_id, reading, at))
                    key = (device_id, reading.component or NO_COMPONENT, reading.sensor)
                    if key not in sensors:
                        sensors.add(key)
                        batch.sensors.append(
                            {
                                "device_id": device_id,
                                "component": key[1],
                                "name": reading.sensor,
                                "value_type": reading.value_type,
                                "unit": reading.unit,
                                "created_at": at,
                                "updated_at": at,
                            }
                        )
                batch.last_data[device_id] = at
        return batch

    # --- last_seen_at, batched -------------------------------------------------------------

    async def _flush_last_seen_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._settings.last_seen_flush_s)
            try:
                await self._flush_last_seen()
            except Exception:
                log.exception("ingest.last_seen_flush_failed")

    def session_ended(self, device_id: str, last_packet_at: float) -> None:
        """Keep an ended session's last packet time for the next flush (it left the live set)."""
        if last_packet_at > self._ended_seen.get(device_id, 0.0):
            self._ended_seen[device_id] = last_packet_at

    async def _flush_last_seen(self) -> None:
        """Write last_seen_at of every device seen since the last flush, in one batch.

        What was flushed is remembered only after the commit (a failed flush is retried
        next time) and only for devices still connected, so memory follows the live set.
        """
        live = dict(self._last_seen())
        seen = dict(self._ended_seen)
        for device_id, at in live.items():
            seen[device_id] = max(at, seen.get(device_id, 0.0))
        updates = {
            device_id: datetime.fromtimestamp(at, UTC)
            for device_id, at in seen.items()
            if at > self._seen_flushed.get(device_id, 0.0)
        }
        if updates:
            await self._data.write_batch(IngestBatch(last_seen=updates))
        for device_id, at in seen.items():
            if self._ended_seen.get(device_id) == at:
                del self._ended_seen[device_id]
        self._seen_flushed = {device_id: at for device_id, at in seen.items() if device_id in live}


def _reading_row(device_id: str, reading: payloads.Reading, received_at: datetime) -> dict[str, Any]:
    value = reading.value
    return {
        "device_id": device_id,
        "component": reading.component,
        "sensor": reading.sensor,
        "value_num": float(value) if reading.value_type == "number" else None,
        "value_bool": value if reading.value_type == "boolean" else None,
        "value_str": value if reading.value_type == "string" else None,
        "unit": reading.unit,
        "ts": reading.ts,
        "received_at": received_at,
    }


def _health_row(device_id: str, report: payloads.Health, received_at: datetime) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "ts": report.ts,
        "received_at": received_at,
        "uptime_s": report.uptime_s,
        "free_heap_bytes": report.free_heap_bytes,
        "rssi_dbm": report.rssi_dbm,
        "connection_type": report.connection_type,
        "readings_sent": report.readings_sent,
        "readings_dropped": report.readings_dropped,
        "battery_pct": report.battery_pct,
        "extra": dumps_extra(report.extra),
    }
