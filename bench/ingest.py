"""bench/ingest: ingest throughput and PUBACK latency of the gateway against stock amqtt 0.12.1.

A benchmark, not a test: it prints figures and checks nothing but the guarantee that every
acknowledged QoS 1 reading was stored (listed under "problems" when it fails). In one run it:

1. starts a real ``gateway serve`` (this checkout, or ``--gateway-root``; with
   ``--candidate`` a second one, e.g. a worktree with a change) in a temporary folder, and
   registers and enrolls ``--devices`` devices over its HTTPS API;
2. starts stock amqtt 0.12.1 twice (`bench/stock_amqtt.py`, the gateway's CA and server
   certificate, amqtt's own TLS listener): with a plain plugin that stores every received
   message in SQLite from ``on_broker_message_received`` ("amqtt+store") and without it
   ("amqtt");
3. for each phase, run and target (targets side by side, so that they share the noise of
   the moment), starts ``--procs`` load-generator processes (`bench/loadgen.py`) that
   connect every device over mutual TLS and publish readings to ``devices/{id}/readings``:

   - ``qos1-max``: QoS 1, ``--inflight`` unacknowledged publishes per device;
   - ``qos1-paced``: QoS 1 at ``--rate`` readings/s over all devices;
   - ``qos0-max``: QoS 0 as fast as the broker reads it (bursts closed by PINGREQ, see
     loadgen); ``qos0-paced``: QoS 0 at ``--rate``. QoS 0 has no PUBACK, so no latency;
     "lost" is what was sent and never stored;

4. measures, in the window after ``--warmup``: readings stored per second (new rows in the
   target's database between the window's start and end), PUBLISHes acknowledged and sent
   per second, publish-to-PUBACK latency p50/p99, the target's peak RSS, its CPU (cores, and
   microseconds per reading), the generators' CPU, and the CPU that everything else on the
   machine used ("other": other agents' test suites, i.e. noise);
5. after the window, waits until the stored count stops growing and the target is idle
   ("lag": how long after the last send rows were still being written), and checks
   stored >= acknowledged (stock amqtt acknowledges before storing, and fails this);
6. prints medians over ``--runs`` runs, the ratios a / b computed within each run (then the
   median), and the issue's targets.

    bench/ingest                      # full: 20 devices, 3 runs, batch 1 and 10 (~15 min)
    bench/ingest --quick              # one run, 3 s phases, batch 1 (~2 min)
    bench/ingest --targets gateway --phases qos1-max --seconds 30   # e.g. under py-spy
    bench/ingest --candidate /tmp/wt --targets gateway --phases qos1-max --runs 5

Figures on a shared 2-core machine are noisy: read the ratios, us/rdg and "other".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # the spawned generator processes import `loadgen` from here

import loadgen  # noqa: E402 - needs the path above

import ca  # noqa: E402
from ca import files as ca_files  # noqa: E402

ROOT = BENCH.parent
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
PHASES = ("qos1-max", "qos1-paced", "qos0-max", "qos0-paced")
TARGETS = ("gateway", "candidate", "amqtt+store", "amqtt")  # candidate: --candidate CHECKOUT
MB = 1024 * 1024


# --------------------------------------------------------------------------- processes


class Lines:
    """A child's pipe, drained on a thread (the child never blocks on it); the last lines kept."""

    def __init__(self, stream: IO[str], keep: int = 400) -> None:
        self.lines: list[str] = []
        self._keep = keep
        self._cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    del self.lines[: -self._keep]
                    self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    tail = "\n".join(self.lines[-30:])
                    raise RuntimeError(f"no {what} within {timeout} s; last output:\n{tail}")
                self._cond.wait(remaining)

    def tail(self, n: int = 20) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])


def _json(line: str) -> dict[str, Any] | None:
    try:
        document = json.loads(line)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


@dataclass
class Target:
    """A running broker under test: where to connect, its process, and how to count its rows."""

    name: str
    proc: subprocess.Popen[str]
    port: int
    db: Path | None
    err: Lines
    devices: list[loadgen.Device] = field(default_factory=list)  # enrolled with this target's CA

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rows(self) -> int | None:
        """Readings stored so far (max rowid: O(log n), unlike count(*))."""
        if self.db is None or not self.db.exists():
            return None
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)) as conn:
            value = conn.execute("SELECT max(rowid) FROM readings").fetchone()[0]
        return int(value or 0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_gateway(name: str, work: Path, root: Path, extra_env: dict[str, str]) -> tuple[Target, int]:
    """`gateway serve` of checkout `root` in `work` on kernel-chosen ports; the target and its API port."""
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env.update(
        PYTHONUNBUFFERED="1",
        GATEWAY_PATHS__DATA_DIR=str(work / "data"),
        GATEWAY_PATHS__CERTS_DIR=str(work / "certs"),
        GATEWAY_MQTT__HOST=HOST,
        GATEWAY_MQTT__PORT="0",
        GATEWAY_API__HOST=HOST,
        GATEWAY_API__PORT="0",
        GATEWAY_LOGGING__LEVEL="warning",
        GATEWAY_LOGGING__FORMAT="json",
    )
    env.update(extra_env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        cwd=work, env=env, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    err = Lines(proc.stderr)
    started = _json(
        err.wait_for(lambda line: '"gateway.started"' in line, "gateway.started log line", START_TIMEOUT_S)
    )
    assert started is not None
    target = Target(name, proc, int(started["mqtt_port"]), work / "data" / "gateway.db", err)
    return target, int(started["api_port"])


def start_stock(name: str, work: Path, certs: Path, store: bool) -> Target:
    db = work / f"{name.replace('+', '-')}.db" if store else None
    args = [sys.executable, str(BENCH / "stock_amqtt.py"), "--certs", str(certs)]
    if db is not None:
        args += ["--db", str(db)]
    proc = subprocess.Popen(
        args, cwd=work, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    ready = out.wait_for(lambda line: line.startswith("ready "), f"{name} ready line", START_TIMEOUT_S)
    return Target(name, proc, int(ready.split()[1]), db, err)


def enroll_devices(api_port: int, work: Path, count: int) -> list[loadgen.Device]:
    """Register and enroll `count` devices over the HTTPS API, as operators and devices do."""
    ca_path = work / "certs" / "ca.crt"
    token = (work / "data" / "admin.token").read_text().strip()
    devices = []
    with httpx.Client(
        base_url=f"https://{HOST}:{api_port}/api/v1",
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=str(ca_path)),
        timeout=30,
    ) as api:
        for index in range(count):
            device_id = f"bench-{index:04d}"  # the same ids on every target: same topic lengths
            response = api.post("/devices", json={"name": f"bench {index}", "id": device_id})
            response.raise_for_status()
            registration = response.json()["registration_token"]
            key = ca.generate_key()
            csr = ca.make_csr(key, device_id).decode()
            response = api.post(
                "/devices/provision", json={"token": registration, "csr": csr}, headers={"Authorization": ""}
            )
            response.raise_for_status()
            body = response.json()
            folder = work / "devices" / device_id
            folder.mkdir(parents=True, exist_ok=True)
            ca_files.write_private_key(folder / "device.key", key, overwrite=True)
            (folder / "device.crt").write_text(body["certificate"])
            (folder / "ca.crt").write_text(body["ca_chain"])
            devices.append(
                loadgen.Device(
                    device_id, str(folder / "device.crt"), str(folder / "device.key"), str(folder / "ca.crt")
                )
            )
    return devices


class RssSampler:
    """Samples the RSS of the processes under test every 50 ms; peak per pid since `reset`."""

    def __init__(self, pids: Iterable[int]) -> None:
        self._procs = {pid: psutil.Process(pid) for pid in pids}
        self._peak: dict[int, int] = dict.fromkeys(self._procs, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid, proc in self._procs.items():
                with contextlib.suppress(psutil.Error):
                    rss = proc.memory_info().rss
                    with self._lock:
                        self._peak[pid] = max(self._peak[pid], rss)

    def reset(self, pid: int) -> None:
        with self._lock:
            self._peak[pid] = 0

    def peak(self, pid: int) -> int:
        with self._lock:
            return self._peak[pid]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


# --------------------------------------------------------------------------- one phase


@dataclass
class PhaseResult:
    target: str
    phase: str
    batch: int
    run: int
    window_s: float
    stored_per_s: float | None  # readings, from the database
    acked_per_s: float | None  # PUBLISHes acknowledged (QoS 1)
    sent_per_s: float  # PUBLISHes written
    p50_ms: float | None
    p99_ms: float | None
    sent_readings: int
    acked_readings: int
    stored_readings: int | None  # after the drain
    lost_readings: int | None  # sent, never stored
    lag_s: float | None  # last row stored, after the last send
    rss_peak_mb: float
    target_cpu: float  # cores
    cpu_us_per_reading: float | None  # target CPU time per reading handled (see _per_reading)
    gen_cpu: float  # cores
    other_cpu: float  # cores: machine busy minus target and generator
    late_sends: int
    unacked: int
    errors: list[str] = field(default_factory=list)


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _busy(times: Any) -> tuple[float, float]:
    total = sum(times)
    return total - times.idle - getattr(times, "iowait", 0.0), total


def _sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        time.sleep(delay)


class Generators:
    """The load-generator processes of one phase: the devices dealt out round-robin."""

    def __init__(self, port: int, devices: list[loadgen.Device], phase: loadgen.Phase, procs: int) -> None:
        ctx = mp.get_context("spawn")
        self._workers = []
        first = 0
        for index in range(procs):
            group = devices[index::procs]
            if not group:
                continue
            job = loadgen.Job(HOST, port, group, first, len(devices), phase)
            first += len(group)
            parent, child = ctx.Pipe()
            process = ctx.Process(target=loadgen.run_worker, args=(job, child), daemon=True)
            process.start()
            child.close()
            self._workers.append((process, parent))

    def wait_ready(self, timeout: float = 60.0) -> None:
        for _, pipe in self._workers:
            if not pipe.poll(timeout):
                raise RuntimeError(f"a load generator did not connect within {timeout} s")
            kind, detail = pipe.recv()
            if kind != "ready":
                raise RuntimeError(f"load generator failed to connect: {detail}")

    def start(self, at: float) -> None:
        for _, pipe in self._workers:
            pipe.send(at)

    def results(self, timeout: float) -> list[loadgen.WorkerResult]:
        results = []
        for _, pipe in self._workers:
            if not pipe.poll(timeout):
                raise RuntimeError("a load generator did not report")
            _, result = pipe.recv()
            results.append(result)
        return results

    def close(self) -> None:
        for process, pipe in self._workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
            pipe.close()


@dataclass
class Mark:
    """What the parent reads at the window's start and end."""

    rows: int | None
    cpu_s: float  # the target's
    busy: tuple[float, float]  # the machine's (busy, total) CPU seconds

    @classmethod
    def take(cls, target: Target, proc: psutil.Process) -> Mark:
        return cls(target.rows(), _cpu_s(proc), _busy(psutil.cpu_times()))


def run_phase(
    target: Target,
    phase: loadgen.Phase,
    procs: int,
    sampler: RssSampler,
    run: int,
    drain_timeout: float,
) -> PhaseResult:
    generators = Generators(target.port, target.devices, phase, procs)
    try:
        generators.wait_ready()
        proc = psutil.Process(target.pid)
        base = target.rows()
        start = time.time() + 0.3
        generators.start(start)
        sampler.reset(target.pid)
        _sleep_until(start + phase.warmup)
        mark0 = Mark.take(target, proc)
        _sleep_until(start + phase.seconds)
        mark1 = Mark.take(target, proc)
        results = generators.results(loadgen.ACK_DRAIN_S + 30)
        stored_final, lag = _drain(target, start + phase.seconds, drain_timeout)
        rss_peak = sampler.peak(target.pid)
    finally:
        generators.close()
    return _result(target, phase, run, results, base, stored_final, lag, mark0, mark1, rss_peak)


def _result(
    target: Target,
    phase: loadgen.Phase,
    run: int,
    results: list[loadgen.WorkerResult],
    base: int | None,
    stored_final: int | None,
    lag: float | None,
    mark0: Mark,
    mark1: Mark,
    rss_peak: int,
) -> PhaseResult:
    window = phase.seconds - phase.warmup
    errors = [error for r in results for error in r.errors]
    sent_readings = sum(r.sent for r in results) * phase.batch
    acked_readings = sum(r.acked for r in results) * phase.batch
    latencies = sorted(x for r in results for x in r.latencies)
    stored = None if stored_final is None or base is None else stored_final - base
    if phase.qos and stored is not None and stored < acked_readings:
        errors.append(f"{acked_readings - stored} acknowledged readings were not stored")
    stored_rate = None if mark0.rows is None or mark1.rows is None else (mark1.rows - mark0.rows) / window
    acked_rate = sum(r.acked_window for r in results) / window if phase.qos else None
    sent_rate = sum(r.sent_window for r in results) / window
    target_cpu = (mark1.cpu_s - mark0.cpu_s) / window
    gen_cpu = sum(r.cpu_s for r in results) / window
    cores = psutil.cpu_count() or 1
    busy = (mark1.busy[0] - mark0.busy[0]) / max(1e-9, mark1.busy[1] - mark0.busy[1]) * cores
    return PhaseResult(
        target=target.name,
        phase=phase.name,
        batch=phase.batch,
        run=run,
        window_s=window,
        stored_per_s=stored_rate,
        acked_per_s=acked_rate,
        sent_per_s=sent_rate,
        p50_ms=_percentile(latencies, 0.50) * 1000 if latencies else None,
        p99_ms=_percentile(latencies, 0.99) * 1000 if latencies else None,
        sent_readings=sent_readings,
        acked_readings=acked_readings,
        stored_readings=stored,
        lost_readings=None if stored is None else max(0, sent_readings - stored),
        lag_s=lag,
        rss_peak_mb=rss_peak / MB,
        target_cpu=target_cpu,
        cpu_us_per_reading=_per_reading(target_cpu, stored_rate, acked_rate, sent_rate, phase),
        gen_cpu=gen_cpu,
        other_cpu=max(0.0, busy - target_cpu - gen_cpu),
        late_sends=sum(r.late for r in results),
        unacked=sum(r.unacked for r in results),
        errors=errors,
    )


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _per_reading(
    cpu: float, stored: float | None, acked: float | None, sent: float, phase: loadgen.Phase
) -> float | None:
    """CPU microseconds per reading handled (acknowledged at QoS 1; stored, else sent, at QoS 0).

    Other load on the machine barely moves this figure, unlike the rates.
    """
    if acked is not None:
        rate: float | None = acked * phase.batch
    else:
        rate = stored if stored is not None else sent * phase.batch
    return cpu / rate * 1e6 if rate else None


def _drain(target: Target, sent_until: float, timeout: float) -> tuple[int | None, float | None]:
    """Wait until the target is done: stored count unchanged and the process idle for 1 s.

    Idle matters: a flooded broker can go seconds between commits while it still works
    through what it read. Returns the final count and the lag of its last change.
    """
    proc = psutil.Process(target.pid)
    rows = target.rows()
    last_change = time.time()
    deadline = last_change + timeout
    cpu = [(time.time(), _cpu_s(proc))]
    while time.time() < deadline:
        time.sleep(0.1)
        now = time.time()
        cpu.append((now, _cpu_s(proc)))
        now_rows = target.rows()
        if now_rows != rows:
            rows, last_change = now_rows, now
            continue
        recent = [(t, c) for t, c in cpu if now - t <= 1.0]
        span = recent[-1][0] - recent[0][0]
        idle = span >= 0.9 and (recent[-1][1] - recent[0][1]) / span < 0.1
        if now - last_change >= 1.0 and idle:
            break
    if rows is None:
        return None, None
    return rows, max(0.0, last_change - sent_until)


def settle(target: Target, timeout: float = 30.0) -> None:
    """Before a phase: wait until the target has been idle (< 0.05 cores) for 0.5 s."""
    proc = psutil.Process(target.pid)
    deadline = time.time() + timeout
    while time.time() < deadline:
        before = _cpu_s(proc)
        time.sleep(0.5)
        if (_cpu_s(proc) - before) / 0.5 < 0.05:
            return


# --------------------------------------------------------------------------- report


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 0, width: int = 8) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:,.{digits}f}".rjust(width)


COLUMNS = (
    ("stored rdg/s", "stored_per_s", 0, 12),
    ("acked msg/s", "acked_per_s", 0, 11),
    ("sent msg/s", "sent_per_s", 0, 10),
    ("p50 ms", "p50_ms", 1, 7),
    ("p99 ms", "p99_ms", 1, 7),
    ("lost rdg", "lost_readings", 0, 9),
    ("lag s", "lag_s", 1, 6),
    ("RSS MB", "rss_peak_mb", 0, 7),
    ("cpu", "target_cpu", 2, 5),
    ("us/rdg", "cpu_us_per_reading", 0, 6),
    ("gen cpu", "gen_cpu", 2, 7),
    ("other", "other_cpu", 2, 5),
)


def summarise(results: list[PhaseResult]) -> dict[tuple[int, str, str], dict[str, float | None]]:
    groups: dict[tuple[int, str, str], list[PhaseResult]] = {}
    for r in results:
        groups.setdefault((r.batch, r.phase, r.target), []).append(r)
    return {
        key: {attr: _median(getattr(r, attr) for r in rs) for _, attr, _, _ in COLUMNS}
        for key, rs in groups.items()
    }


def print_report(results: list[PhaseResult], args: argparse.Namespace, devices: int) -> None:
    medians = summarise(results)
    batches = sorted({r.batch for r in results})
    phases = [p for p in PHASES if any(r.phase == p for r in results)]
    targets = [t for t in TARGETS if any(r.target == t for r in results)]
    print()
    print(
        f"bench/ingest: {devices} devices over {args.procs} generator processes, mutual TLS on loopback; "
        f"{args.seconds:g} s per phase ({args.warmup:g} s warm-up excluded), medians of {args.runs} run(s); "
        f"max = {args.inflight} in flight per device, paced = {args.rate:g} readings/s in total; "
        f"machine: {psutil.cpu_count()} cores"
    )
    print(
        "cpu = cores used by the broker process, us/rdg = its CPU microseconds per reading "
        "(acked at QoS 1, stored at QoS 0),\ngen cpu = cores used by the load generators, "
        "other = everything else on the machine (other agents: noise)"
    )
    for batch in batches:
        print()
        print(f"== {batch} reading(s) per PUBLISH ==")
        header = f"{'phase':<11} {'target':<12}" + "".join(
            f" {name:>{width}}" for name, _, _, width in COLUMNS
        )
        print(header)
        print("-" * len(header))
        for phase in phases:
            for index, target in enumerate(targets):
                row = medians.get((batch, phase, target))
                if row is None:
                    continue
                cells = "".join(f" {_fmt(row[attr], digits, width)}" for _, attr, digits, width in COLUMNS)
                print(f"{phase if index == 0 else '':<11} {target:<12}{cells}")
        pairs = [("candidate", "gateway")] if "candidate" in targets and "gateway" in targets else []
        pairs += [("gateway", t) for t in targets if t.startswith("amqtt") and "gateway" in targets]
        if pairs:
            print()
            print("ratios a / b, within each run, then the median over runs:")
            names = ("stored rdg/s", "acked msg/s", "sent msg/s", "p99", "RSS", "us/rdg")
            attrs = (
                "stored_per_s",
                "acked_per_s",
                "sent_per_s",
                "p99_ms",
                "rss_peak_mb",
                "cpu_us_per_reading",
            )
            print(f"{'phase':<11} {'a / b':<24}" + "".join(f" {n:>12}" for n in names))
            for phase in phases:
                for a, b in pairs:
                    cells = "".join(f" {_run_ratio(results, batch, phase, a, b, attr):>12}" for attr in attrs)
                    print(f"{phase:<11} {a + ' / ' + b:<24}{cells}")
        _print_targets(medians, batch, targets)
    problems = [(r, e) for r in results for e in r.errors]
    if problems:
        print()
        print("problems seen:")
        for r, error in problems[:30]:
            print(f"  {r.target} {r.phase} batch {r.batch} run {r.run}: {error}")


def _run_ratio(results: list[PhaseResult], batch: int, phase: str, a: str, b: str, attr: str) -> str:
    """Median over runs of a/b within the same run (the noise of a run is shared by both)."""
    ratios = []
    for run in {r.run for r in results}:
        mine = [r for r in results if (r.batch, r.phase, r.target, r.run) == (batch, phase, a, run)]
        theirs = [r for r in results if (r.batch, r.phase, r.target, r.run) == (batch, phase, b, run)]
        if mine and theirs:
            value, other = getattr(mine[0], attr), getattr(theirs[0], attr)
            if value is not None and other:
                ratios.append(value / other)
    return f"{statistics.median(ratios):.2f}x" if ratios else "-"


def _print_targets(
    medians: dict[tuple[int, str, str], dict[str, float | None]], batch: int, targets: list[str]
) -> None:
    gw_max = medians.get((batch, "qos1-max", "gateway"))
    gw_paced = medians.get((batch, "qos1-paced", "gateway"))
    stock = medians.get((batch, "qos1-max", "amqtt"))
    print()
    print("issue targets (QoS 1):")
    if gw_max is not None:
        stored = gw_max["stored_per_s"]
        verdict = "met" if stored is not None and stored >= 5000 else "NOT met"
        print(f"  >= 5,000 durable readings/s:         {_fmt(stored, 0, 0)} readings/s  ({verdict})")
        if stock is not None and "amqtt" in targets:
            stock_readings = None if stock["acked_per_s"] is None else stock["acked_per_s"] * batch
            ratio = None if stored is None or not stock_readings else stored / stock_readings
            verdict = "met" if ratio is not None and ratio >= 5 else "NOT met"
            print(
                f"  5x stock amqtt's QoS 1 rate:         {_fmt(ratio, 2, 0)}x of {_fmt(stock_readings, 0, 0)}"
                f" readings/s acknowledged, not stored  ({verdict})"
            )
    if gw_paced is not None:
        p99 = gw_paced["p99_ms"]
        verdict = "met" if p99 is not None and p99 < 50 else "NOT met"
        print(f"  p99 PUBACK < 50 ms at paced rate:    {_fmt(p99, 1, 0)} ms  ({verdict})")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=20, help="devices (one TLS connection each)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds at the start of a phase not measured"
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--inflight", type=int, default=20, help="max phases: unacknowledged QoS 1 per device"
    )
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="paced phases: readings/s over all devices"
    )
    parser.add_argument("--batch", default="1,10", help="readings per PUBLISH, comma-separated list")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    parser.add_argument(
        "--targets", default="gateway,amqtt+store,amqtt", help=f"subset of {','.join(TARGETS)}"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="max wait for stored rows to settle"
    )
    parser.add_argument(
        "--gateway-root", type=Path, default=ROOT, help="checkout whose gateway is benchmarked"
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        help="a second checkout (e.g. a worktree with a change), run as target 'candidate'",
    )
    parser.add_argument(
        "--gateway-env", action="append", default=[], metavar="KEY=VALUE", help="extra env for gateway serve"
    )
    parser.add_argument("--json", type=Path, help="also write every raw result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (prints its path)")
    parser.add_argument("--quick", action="store_true", help="one run, 3 s phases, batch 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.seconds, args.warmup, args.batch = 1, 3.0, 0.5, "1"
    args.batches = [int(b) for b in args.batch.split(",") if b]
    args.phase_list = [p for p in args.phases.split(",") if p]
    args.target_list = [t for t in args.targets.split(",") if t]
    if args.candidate is not None and "candidate" not in args.target_list:
        args.target_list.insert(1 if "gateway" in args.target_list else 0, "candidate")
    for name in args.phase_list:
        if name not in PHASES:
            parser.error(f"unknown phase {name!r}")
    for name in args.target_list:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}")
    if "candidate" in args.target_list and args.candidate is None:
        parser.error("target 'candidate' needs --candidate CHECKOUT")
    if any(t.startswith("amqtt") for t in args.target_list) and "gateway" not in args.target_list:
        parser.error("the amqtt targets use the devices enrolled with target 'gateway': include it")
    if args.warmup >= args.seconds:
        parser.error("--warmup must be shorter than --seconds")
    return args


def make_phase(name: str, batch: int, args: argparse.Namespace) -> loadgen.Phase:
    qos, mode = (1 if name.startswith("qos1") else 0), name.split("-")[1]
    return loadgen.Phase(
        name=name,
        qos=qos,
        mode=mode,
        seconds=args.seconds,
        warmup=args.warmup,
        batch=batch,
        rate=args.rate,
        inflight=args.inflight,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    targets: dict[str, Target] = {}
    results: list[PhaseResult] = []
    sampler: RssSampler | None = None
    try:
        roots = {"gateway": args.gateway_root}
        if args.candidate is not None:
            roots["candidate"] = args.candidate
        for name, root in roots.items():
            target, api_port = start_gateway(name, work / name, root.resolve(), extra_env)
            targets[name] = target
            print(f"{name}: gateway serve of {root} pid {target.pid}, MQTT port {target.port}", flush=True)
            target.devices = enroll_devices(api_port, work / name, args.devices)
        certs = work / "gateway" / "certs"  # stock amqtt serves the gateway's certificate, trusts its CA
        for name, store in (("amqtt+store", True), ("amqtt", False)):
            if name in args.target_list:
                targets[name] = start_stock(name, work, certs, store=store)
                targets[name].devices = targets["gateway"].devices
        chosen = [targets[t] for t in TARGETS if t in args.target_list]
        sampler = RssSampler(t.pid for t in chosen)
        for batch in args.batches:
            for run in range(1, args.runs + 1):
                for name in args.phase_list:  # targets side by side: they share the noise of the moment
                    phase = make_phase(name, batch, args)
                    for target in chosen if run % 2 else chosen[::-1]:  # alternate who goes first
                        settle(target)
                        result = run_phase(target, phase, args.procs, sampler, run, args.drain_timeout)
                        results.append(result)
                        print(_progress(result), flush=True)
                        if target.proc.poll() is not None:
                            raise RuntimeError(f"{target.name} exited:\n{target.err.tail()}")
        print_report(results, args, args.devices)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    finally:
        if sampler is not None:
            sampler.close()
        for target in targets.values():
            target.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


def _progress(r: PhaseResult) -> str:
    return (
        f"  batch {r.batch} run {r.run} {r.target:<12} {r.phase:<10}"
        f" stored {_fmt(r.stored_per_s, 0, 7)} rdg/s  acked {_fmt(r.acked_per_s, 0, 7)} msg/s"
        f"  sent {_fmt(r.sent_per_s, 0, 7)} msg/s  p99 {_fmt(r.p99_ms, 1, 7)} ms"
        f"  cpu {r.target_cpu:.2f} gen {r.gen_cpu:.2f} other {r.other_cpu:.2f}"
        + (f"  [{len(r.errors)} problem(s)]" if r.errors else "")
    )


if __name__ == "__main__":
    sys.exit(main())
