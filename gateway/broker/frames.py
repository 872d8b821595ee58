"""Framing for one connection: MQTT packets out of the TLS byte stream, with no await per packet.

Receives the connection's asyncio `StreamReader`; hands on each packet as
(type, flags, body), CONNECT included, so that whatever arrived in the same chunk as
CONNECT is kept for the session. Bytes are read in chunks of up to `CHUNK_BYTES` and
every complete packet in the buffer is handed on without going through the event
loop; the framing rules (Remaining Length, size limit) are `gateway.core.wire`'s.

Two duties that used to cost a task and a timer per packet (``asyncio.wait_for``)
live here, at one timer per connection:

- keep-alive: with an idle limit set, a reader that has waited that long for a
  packet raises `IdleTimeout`. The clock runs from the moment the reader started
  waiting for the packet and only while it waits for bytes, never while the caller
  holds off reading (back-pressure from a full ingest queue), as with the per-read
  timeout it replaces;
- fairness: every `YIELD_EVERY` packets the reader yields to the loop once, so that
  a connection whose buffer is always full (a QoS 0 flood) cannot starve the others.
"""

from __future__ import annotations

import asyncio

from gateway.core import wire

CHUNK_BYTES = 64 * 1024
YIELD_EVERY = 64

Frame = tuple[int, int, bytes]  # packet type, fixed-header flags, body


class IdleTimeout(TimeoutError):
    """No complete packet arrived within the idle limit while the reader waited for one."""


class FrameReader:
    """Packets from one stream. Not shared: one reader task awaits `next` at a time."""

    def __init__(self, stream: asyncio.StreamReader, max_bytes: int) -> None:
        self._stream = stream
        self.max_bytes = max_bytes
        self._buf = b""
        self._pos = 0  # start of the first packet not handed on yet
        self._since_yield = 0
        # Keep-alive: one timer, re-armed lazily (at most once per idle limit).
        self._idle_limit: float | None = None
        self._wait_started: float | None = None  # loop time the wait for the next packet began
        self._waiting = False  # inside a read from the stream
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._expired = False

    def set_idle_limit(self, seconds: float | None) -> None:
        """Raise `IdleTimeout` after `seconds` of waiting for a packet (None: wait forever)."""
        self._idle_limit = seconds

    def close(self) -> None:
        """Stop the keep-alive timer (the connection is ending)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next(self) -> Frame | None:
        """The next packet; None on EOF between packets.

        Raises `ProtocolViolation` (a bad or oversize header), `asyncio.IncompleteReadError`
        (EOF inside a packet), `IdleTimeout`, or whatever the stream raises.
        """
        while True:
            buf, pos = self._buf, self._pos
            header = wire.frame_header(buf, pos, self.max_bytes)
            if header is not None and header[2] <= len(buf):
                first, start, end = header
                self._pos = end
                self._wait_started = None
                self._since_yield += 1
                if self._since_yield >= YIELD_EVERY:
                    self._since_yield = 0
                    await asyncio.sleep(0)
                return first >> 4, first & 0x0F, buf[start:end]
            missing = None if header is None else header[2] - len(buf)
            if not await self._fill(missing):
                return None

    async def _fill(self, missing: int | None) -> bool:
        """Append bytes from the stream (all `missing` ones of a large packet at once); False on EOF."""
        rest = self._buf[self._pos :]
        self._buf, self._pos = rest, 0  # consumed packets are released while we wait
        if self._idle_limit is not None:
            self._arm()
        self._waiting = True
        try:
            if missing is not None and missing > CHUNK_BYTES:
                chunk = await self._stream.readexactly(missing)
            else:
                chunk = await self._stream.read(CHUNK_BYTES)
        except asyncio.CancelledError as exc:
            if self._expired:
                self._expired = False
                if self._task is not None and self._task.uncancel() == 0:
                    raise IdleTimeout(f"no packet within {self._idle_limit} s") from exc
            raise
        finally:
            self._waiting = False
        if not chunk:
            if rest:
                raise asyncio.IncompleteReadError(rest, None)
            return False
        self._buf = rest + chunk if rest else chunk
        return True

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self._wait_started is None:
            self._wait_started = loop.time()
        if self._timer is None and self._idle_limit is not None:
            deadline = self._wait_started + self._idle_limit
            self._timer = loop.call_at(deadline, self._check, deadline)

    def _check(self, scheduled: float) -> None:
        """The timer fired: expire if the reader is (still) waiting past its deadline, else re-arm."""
        self._timer = None
        if not self._waiting or self._wait_started is None or self._idle_limit is None:
            return  # not waiting: the next read arms the timer again
        deadline = self._wait_started + self._idle_limit
        if deadline <= scheduled:
            if self._task is not None and not self._task.done():
                self._expired = True
                self._task.cancel()
            return
        self._timer = asyncio.get_running_loop().call_at(deadline, self._check, deadline)
