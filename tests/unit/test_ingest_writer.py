"""The ingest writer's group commit, over an in-memory stand-in for the store."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from gateway.config import IngestSettings
from gateway.events import Events
from gateway.ingest import Ingest
from gateway.store.data import BatchResult, DeviceData, IngestBatch

TOPIC = "devices/d1/readings"


class SlowData:
    """Records each batch's size and when its commit started; the first commit takes `first_s`."""

    def __init__(self, first_s: float = 0.0) -> None:
        self.first_s = first_s
        self.commits: list[tuple[float, int]] = []

    async def write_batch(self, batch: IngestBatch) -> BatchResult:
        self.commits.append((time.monotonic(), len(batch.readings)))
        if len(self.commits) == 1:
            await asyncio.sleep(self.first_s)
        return BatchResult(stored=len(batch.readings), dropped_unknown_device=0)


def ingest(data: SlowData, **settings: Any) -> Ingest:
    return Ingest(
        cast(DeviceData, data),  # duck-typed stand-in: only write_batch is used
        cast(Events, None),  # valid payloads only: no rejection events
        IngestSettings(**settings),
        last_seen=list,
    )


async def reading(writer: Ingest, value: int) -> asyncio.Future[None]:
    stored = await writer.submit("d1", TOPIC, f'{{"sensor":"t","value":{value}}}'.encode(), 1)
    assert stored is not None
    return stored


async def test_a_lone_message_waits_the_batch_delay_for_company() -> None:
    """One message on an idle writer is committed about max_batch_delay_ms after it arrived."""
    data = SlowData()
    writer = ingest(data, max_batch_delay_ms=200)
    await writer.start()
    try:
        sent = time.monotonic()
        await asyncio.wait_for(await reading(writer, 1), 2)
        assert 0.18 <= data.commits[0][0] - sent <= 0.6
    finally:
        await writer.stop()


async def test_messages_queued_during_a_commit_go_at_once() -> None:
    """Messages that arrived while a commit ran are committed right after it, without a second delay."""
    data = SlowData(first_s=0.4)
    writer = ingest(data, max_batch_delay_ms=200)
    await writer.start()
    try:
        first = await reading(writer, 0)
        await asyncio.sleep(0.3)  # the first batch is committing (0.2 s delay, then 0.4 s)
        later = [await reading(writer, n) for n in range(1, 6)]
        await asyncio.wait_for(first, 2)
        first_done = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*later), 2)
        assert [rows for _, rows in data.commits] == [1, 5]
        assert data.commits[1][0] - first_done < 0.1  # not another 0.2 s
    finally:
        await writer.stop()
