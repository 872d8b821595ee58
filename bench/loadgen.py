"""The load generator of `bench/ingest`: raw MQTT 3.1.1 devices over mutual TLS, one process each.

Receives a `Job` (broker address, the devices' credentials, one `Phase`) through
`run_worker`, run in a child process by `multiprocessing`; connects every device (one TLS
connection each, client id = device id), reports ``ready``, waits for the common start time
sent by the parent, publishes to ``devices/{id}/readings`` for ``phase.seconds``, waits for
the outstanding PUBACKs, disconnects and sends back a `WorkerResult`.

The client is deliberately raw and lean (the generator must not be the bottleneck): one
reader task and one sender task per device, the PUBLISH bytes built from precomputed parts
(checked once against `gateway.mqtt_client.encode_publish`), PUBACKs parsed by a fast path.
Each PUBLISH is its own ``write`` and so its own TLS record, as separate devices' readings
are. Latency is publish-to-PUBACK: from the moment the PUBLISH is written to the socket to the
moment its PUBACK is parsed, both in this process (``perf_counter``).

Modes: ``max`` keeps ``inflight`` unacknowledged QoS 1 publishes per device (QoS 0: bursts of
``inflight`` publishes, each closed by a PINGREQ, at most two bursts unanswered, see
`_Conn._max_unacknowledged`); ``paced`` spreads ``rate`` readings per second evenly over all
devices of all workers (late sends go out at once and are counted).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import resource
import ssl
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from gateway.mqtt_client import encode_connect, encode_publish, encode_remaining_length

DISCONNECT = b"\xe0\x00"
PINGREQ = b"\xc0\x00"
QOS0_BURSTS = 2  # QoS 0 max: bursts of `inflight` publishes, each closed by a PINGREQ, in flight
ACK_DRAIN_S = 10.0  # bound on waiting for outstanding PUBACKs after the window
CONNECT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Device:
    id: str
    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class Phase:
    name: str
    qos: int
    mode: str  # "max" | "paced"
    seconds: float
    warmup: float  # excluded from rates and latencies
    batch: int = 1  # readings per PUBLISH (a JSON array when > 1)
    rate: float = 1000.0  # paced: readings per second over all devices
    inflight: int = 20  # max: unacknowledged QoS 1 publishes per device


@dataclass(frozen=True)
class Job:
    host: str
    port: int
    devices: list[Device]
    first_index: int  # index of devices[0] among all devices (staggers paced sends)
    total_devices: int
    phase: Phase


@dataclass
class WorkerResult:
    sent: int = 0  # PUBLISHes written, whole phase
    acked: int = 0  # PUBACKs received, whole phase
    sent_window: int = 0  # PUBLISHes written inside the measurement window
    acked_window: int = 0  # PUBACKs received inside the window
    late: int = 0  # paced sends that were behind schedule by more than 5 ms
    unacked: int = 0  # still unacknowledged after the drain
    latencies: list[float] = field(default_factory=list)  # seconds, PUBLISHes sent in the window
    cpu_s: float = 0.0  # this process's CPU time (user + system) inside the window
    window_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def _tls(device: Device) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=device.ca)
    ctx.load_cert_chain(device.cert, device.key)
    return ctx


def _payloads(batch: int, variants: int = 64) -> list[bytes]:
    """A few distinct payloads to cycle through (values change; parsing cost stays realistic)."""
    out = []
    for n in range(variants):
        readings = [{"sensor": f"s{i}", "value": round(20 + (n * 7 + i) % 100 / 10, 1)} for i in range(batch)]
        document: Any = readings[0] if batch == 1 else readings
        out.append(json.dumps(document, separators=(",", ":")).encode())
    return out


class _Publisher:
    """Precomputed PUBLISH framing for one topic: header + topic + packet id + payload."""

    def __init__(self, topic: str, qos: int, payloads: list[bytes]) -> None:
        self.qos = qos
        encoded_topic = len(topic.encode()).to_bytes(2, "big") + topic.encode()
        id_len = 2 if qos else 0
        first = bytes(((3 << 4) | (qos << 1),))
        self.parts = [
            (first + encode_remaining_length(len(encoded_topic) + id_len + len(p)) + encoded_topic, p)
            for p in payloads
        ]
        _, payload = self.parts[0]
        expected = encode_publish(topic, payload, qos=qos, packet_id=1 if qos else None)
        if self.build(0, 1) != expected:
            raise RuntimeError("precomputed PUBLISH framing differs from encode_publish")

    def build(self, n: int, packet_id: int) -> bytes:
        head, payload = self.parts[n % len(self.parts)]
        if self.qos:
            return head + packet_id.to_bytes(2, "big") + payload
        return head + payload


class _Conn:
    """One device connection: sender state, in-flight table, reader."""

    def __init__(self, worker: _Worker, device: Device, index: int) -> None:
        self.w = worker
        self.device = device
        self.index = index
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, float] = {}  # QoS 1: packet id -> perf_counter when sent
        self.pings: collections.deque[float] = collections.deque()  # QoS 0: PINGREQs unanswered
        self.next_id = 0
        self.slot: asyncio.Future[None] | None = None
        self.closed = False

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.w.job.host, self.w.job.port, ssl=_tls(self.device), server_hostname=self.w.job.host
        )
        self.writer.write(encode_connect(client_id=self.device.id, keepalive=60, clean_session=True))
        connack = await self.reader.readexactly(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"{self.device.id}: CONNACK {connack.hex()}")

    def _packet_id(self) -> int:
        while True:
            self.next_id = self.next_id % 65535 + 1
            if self.next_id not in self.pending:
                return self.next_id

    async def read_loop(self) -> None:
        reader = self.reader
        if reader is None:
            return
        w = self.w
        result = w.result
        buf = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf = buf + chunk if buf else chunk
                now = time.perf_counter()
                i, end = 0, len(buf)
                while end - i >= 2:
                    if buf[i] == 0xD0 and buf[i + 1] == 0:  # PINGRESP: a QoS 0 burst was processed
                        i += 2
                        if self.pings:
                            self.pings.popleft()
                        self._wake()
                        continue
                    if buf[i] != 0x40 or buf[i + 1] != 2:
                        _unexpected(buf[i : i + 4])
                    if end - i < 4:
                        break
                    sent_at = self.pending.pop(int.from_bytes(buf[i + 2 : i + 4], "big"), None)  # PUBACK
                    i += 4
                    if sent_at is None:
                        continue
                    result.acked += 1
                    if w.window_start <= now < w.window_end:
                        result.acked_window += 1
                    if w.window_start <= sent_at < w.window_end:
                        result.latencies.append(now - sent_at)
                    self._wake()
                buf = buf[i:]
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
            if not self.closed:
                result.errors.append(f"{self.device.id}: read: {exc!r}")
        finally:
            self.closed = True
            self._wake()

    def _wake(self) -> None:
        slot = self.slot
        if slot is not None and not slot.done():
            slot.set_result(None)

    async def send_loop(self) -> None:
        writer = self.writer
        if writer is None:
            return
        publisher = self.w.publisher(self.device.id)
        await _sleep_until_perf(self.w.start)
        phase = self.w.job.phase
        try:
            if phase.mode == "paced":
                await self._paced(writer, publisher)
            elif phase.qos:
                await self._max_acknowledged(writer, publisher)
            else:
                await self._max_unacknowledged(writer, publisher)
        except OSError as exc:
            self.w.result.errors.append(f"{self.device.id}: write: {exc!r}")
            self.closed = True

    async def _paced(self, writer: asyncio.StreamWriter, publisher: _Publisher) -> None:
        """Sends on a fixed schedule, staggered over all devices; a late send goes at once."""
        w, phase = self.w, self.w.job.phase
        interval = w.job.total_devices * phase.batch / phase.rate
        due = w.start + interval * (self.index / w.job.total_devices)
        n = 0
        while due < w.stop and not self.closed:
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                now = time.perf_counter()
            elif now - due > 0.005:
                w.result.late += 1
            self._send(writer, publisher, n, now)
            n += 1
            due += interval
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()

    async def _max_acknowledged(self, writer: asyncio.StreamWriter, publisher: _Publisher) -> None:
        """QoS 1 as fast as PUBACKs come back, at most `inflight` unacknowledged."""
        w, limit = self.w, self.w.job.phase.inflight
        loop = asyncio.get_running_loop()
        n = 0
        while not self.closed and (now := time.perf_counter()) < w.stop:
            if len(self.pending) >= limit:
                self.slot = loop.create_future()
                await self.slot
                continue
            self._send(writer, publisher, n, now)
            n += 1
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()

    async def _max_unacknowledged(self, writer: asyncio.StreamWriter, publisher: _Publisher) -> None:
        """QoS 0 as fast as the broker processes it.

        QoS 0 has no acknowledgement, and loopback socket buffers hold megabytes: a generator
        writing blindly would only fill them (and take the broker's CPU on a 2-core machine).
        So each burst of `inflight` publishes is followed by a PINGREQ, and at most
        `QOS0_BURSTS` bursts are unanswered: brokers answer PINGREQ in order, after the
        publishes before it were read (the gateway: handed to ingest, stored or dropped).
        """
        w, burst = self.w, self.w.job.phase.inflight
        loop = asyncio.get_running_loop()
        n = 0
        while not self.closed and (now := time.perf_counter()) < w.stop:
            if len(self.pings) >= QOS0_BURSTS:
                self.slot = loop.create_future()
                await self.slot
                continue
            for _ in range(burst):
                self._send(writer, publisher, n, now)
                n += 1
            writer.write(PINGREQ)
            self.pings.append(now)
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()

    def _send(self, writer: asyncio.StreamWriter, publisher: _Publisher, n: int, now: float) -> None:
        w, result = self.w, self.w.result
        if publisher.qos:
            packet_id = self._packet_id()
            self.pending[packet_id] = now
            writer.write(publisher.build(n, packet_id))
        else:
            writer.write(publisher.build(n, 0))
        result.sent += 1
        if w.window_start <= now < w.window_end:
            result.sent_window += 1

    async def wait_acks(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while (self.pending or self.pings) and not self.closed and time.perf_counter() < deadline:
            self.slot = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.slot, max(0.0, deadline - time.perf_counter()))

    async def close(self) -> None:
        self.closed = True
        if self.writer is None:
            return
        with contextlib.suppress(Exception):
            self.writer.write(DISCONNECT)
            await asyncio.wait_for(self.writer.drain(), 2)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def _unexpected(head: bytes) -> None:
    """Devices here subscribe to nothing: anything but a PUBACK is a broker bug (or a refusal)."""
    raise RuntimeError(f"unexpected packet {head.hex()} from the broker")


async def _sleep_until_perf(at: float) -> None:
    delay = at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


class _Worker:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.result = WorkerResult()
        self._payloads = _payloads(job.phase.batch)
        # perf_counter times, set once the parent sent the common start (wall clock)
        self.start = self.stop = self.window_start = self.window_end = float("inf")

    def publisher(self, device_id: str) -> _Publisher:
        return _Publisher(f"devices/{device_id}/readings", self.job.phase.qos, self._payloads)

    async def run(self, pipe: Connection) -> WorkerResult:
        conns = [_Conn(self, d, self.job.first_index + i) for i, d in enumerate(self.job.devices)]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.connect() for c in conns)), CONNECT_TIMEOUT_S)
        except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.result.errors.append(f"connect: {exc!r}")
            pipe.send(("failed", repr(exc)))
            return self.result
        readers = [asyncio.create_task(c.read_loop()) for c in conns]
        pipe.send(("ready", None))
        loop = asyncio.get_running_loop()
        start_wall: float = await loop.run_in_executor(None, pipe.recv)
        phase = self.job.phase
        offset = time.perf_counter() - time.time()
        self.start = start_wall + offset
        self.stop = self.start + phase.seconds
        self.window_start, self.window_end = self.start + phase.warmup, self.stop
        cpu: list[float] = []
        loop.call_at(loop.time() + (self.window_start - time.perf_counter()), lambda: cpu.append(_cpu()))
        loop.call_at(loop.time() + (self.window_end - time.perf_counter()), lambda: cpu.append(_cpu()))
        await asyncio.gather(*(c.send_loop() for c in conns))
        deadline = time.perf_counter() + ACK_DRAIN_S
        await asyncio.gather(*(c.wait_acks(deadline) for c in conns))
        self.result.unacked = sum(len(c.pending) for c in conns)
        await _sleep_until_perf(self.window_end + 0.01)  # both CPU marks taken
        await asyncio.gather(*(c.close() for c in conns))
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        if len(cpu) == 2:
            self.result.cpu_s = cpu[1] - cpu[0]
        self.result.window_s = self.window_end - self.window_start
        return self.result


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(job: Job, pipe: Connection) -> None:
    """Child-process entry point: connect, report ready, run the phase, send the result."""
    try:
        result = asyncio.run(_Worker(job).run(pipe))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which must never hang on us
        result = WorkerResult(errors=[f"worker crashed: {exc!r}"])
    pipe.send(("result", result))
    pipe.close()
