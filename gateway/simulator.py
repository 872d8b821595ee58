"""The device simulator's shell: provision devices through the API, run them over mutual-TLS MQTT.

Receives an `Api` (an `httpx.AsyncClient` that trusts the gateway's CA, and an operator
token with write scope), a state directory, a `Target` (MQTT address, interval, QoS)
and a stop event. `provision` hands on a `Fleet`: the credentials of every device ready
to connect, registering and enrolling (``concurrency`` at a time) those that the state
directory does not hold yet. `run` connects every device with its own certificate,
publishes info and components once per session, then readings and health every
interval until ``stop`` is set, reconnecting with back-off when a session is lost, and
keeps a `Counters` current. What to do and what to send is decided in
`gateway.core.simulation`; this module only awaits.

State directory (``<data_dir>/simulator`` by default), one folder per device:
``device.key`` (0600), ``device.crt``, ``ca.crt``, ``device.json`` (id and certificate
serial) and, only between registration and enrollment, ``token`` (0600).

Every task has an owner: provisioning workers and device tasks live in TaskGroups; each
MQTT connection adds the client's own two tasks.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

import ca
import gateway
from ca import files as ca_files
from gateway.core.clock import utcnow
from gateway.core.simulation import READINGS_PER_MESSAGE, Action, Counters, Local, SimulatedDevice, plan
from gateway.errors import ApiError, ConfigError, Conflict, GatewayError
from gateway.mqtt_client import ConnectionClosed, MqttClient, MqttError

LIST_PAGE = 1000


RATE_LIMITED_RETRIES = 10
MAX_RETRY_AFTER_S = 30.0


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return max(0.1, float(response.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


class Api:
    """The few API calls the simulator makes; error responses become `ApiError`."""

    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self._http = http
        self._token = token

    async def call(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> Any:
        """One request; a 429 (provisioning's rate limit) waits its Retry-After, a few times."""
        for attempt in range(1, RATE_LIMITED_RETRIES + 1):
            response = await self._send(method, path, auth=auth, **kwargs)
            if response.status_code != 429 or attempt == RATE_LIMITED_RETRIES:
                break
            await asyncio.sleep(min(_retry_after_s(response), MAX_RETRY_AFTER_S))
        return self._result(response)

    async def _send(self, method: str, path: str, *, auth: bool, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._token}"} if auth else {}
        try:
            return await self._http.request(method, path, headers=headers, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiError(
                f"cannot reach the gateway API at {self._http.base_url} ({exc}); is `gateway serve` running?",
                code="unreachable",
            ) from exc
        except httpx.HTTPError as exc:
            raise ApiError(
                f"request to {self._http.base_url} failed: {exc!r}", code="transport_error"
            ) from exc

    @staticmethod
    def _result(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = str(error["code"]), str(error["message"])
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", f"HTTP {response.status_code}: {response.text[:200]}"
            raise ApiError(message, code=code, status=response.status_code)
        return response.json()


@dataclass(frozen=True)
class Creds:
    """A simulated device's enrolled files."""

    device_id: str
    folder: Path

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.folder / "ca.crt"))
        ctx.load_cert_chain(str(self.folder / "device.crt"), str(self.folder / "device.key"))
        return ctx


@dataclass(frozen=True)
class Fleet:
    devices: list[Creds]
    registered: int
    reused: int


# --- the state directory (small synchronous file operations) -------------------------------


def _read_local(folder: Path) -> Local:
    serial: str | None = None
    token: str | None = None
    if all((folder / name).is_file() for name in ("device.key", "device.crt", "ca.crt")):
        try:
            serial = str(
                json.loads((folder / "device.json").read_text(encoding="utf-8"))["certificate_serial"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            serial = None
    try:
        token = (folder / "token").read_text(encoding="utf-8").strip() or None
    except OSError:
        token = None
    return Local(serial, token)


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _save_creds(folder: Path, key: Any, result: dict[str, Any]) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_files.write_private_key(folder / "device.key", key, overwrite=True)
    ca_files.write_public(folder / "device.crt", result["certificate"].encode("ascii"))
    ca_files.write_public(folder / "ca.crt", result["ca_chain"].encode("ascii"))
    summary = {"id": result["device_id"], "certificate_serial": result["certificate_serial"]}
    ca_files.write_public(folder / "device.json", json.dumps(summary).encode())
    (folder / "token").unlink(missing_ok=True)


# --- provisioning ----------------------------------------------------------------------------


async def _remote_devices(api: Api, prefix: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The gateway's records of ``ids`` (one listing per thousand devices, not one call each)."""
    wanted, found, offset = set(ids), {}, 0
    while True:
        page = await api.call(
            "GET", "/devices", params={"search": prefix, "limit": LIST_PAGE, "offset": offset}
        )
        found.update({d["id"]: d for d in page["data"] if d["id"] in wanted})
        offset += len(page["data"])
        if not page["data"] or offset >= page["total"]:
            return found


async def _provision_one(api: Api, device_id: str, action: Action, folder: Path, token: str | None) -> None:
    if action is Action.REGISTER:
        result = await api.call("POST", "/devices", json={"name": f"Simulated {device_id}", "id": device_id})
        token = str(result["registration_token"])
        _write_secret(folder / "token", token)  # a rerun can enroll with it if we stop right here
    key = ca.generate_key()
    csr = ca.make_csr(key, device_id).decode("ascii")
    result = await api.call("POST", "/devices/provision", auth=False, json={"token": token, "csr": csr})
    _save_creds(folder, key, result)


async def provision(
    api: Api,
    ids: Sequence[str],
    state_dir: Path,
    *,
    prefix: str,
    concurrency: int,
    stop: asyncio.Event,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> Fleet:
    """Credentials for every device in ``ids``: reused, or registered and enrolled now."""
    remote = await _remote_devices(api, prefix, ids)
    local = {device_id: _read_local(state_dir / device_id) for device_id in ids}
    steps = plan(ids, remote, local)
    conflicts = [f"{i} ({s.reason})" for i, s in steps.items() if s.action is Action.CONFLICT]
    if conflicts:
        shown = ", ".join(conflicts[:3]) + (f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
        raise Conflict(
            f"cannot use {shown}: delete them (gateway devices delete ID) or choose another --prefix",
            code="simulator_conflict",
        )
    todo = [i for i in ids if steps[i].action in (Action.REGISTER, Action.ENROLL)]
    failures: dict[str, str] = {}
    provisioned: set[str] = set()
    queue = iter(todo)  # shared by the workers: each takes the next id

    async def worker() -> None:
        for device_id in queue:
            if stop.is_set():
                return
            action, token = steps[device_id].action, local[device_id].token
            try:
                await _provision_one(api, device_id, action, state_dir / device_id, token)
            except (GatewayError, ca.CAError, OSError, KeyError) as exc:
                failures[device_id] = getattr(exc, "message", None) or repr(exc)
            else:
                provisioned.add(device_id)
            on_progress(len(provisioned) + len(failures), len(todo))

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(todo))):
            group.create_task(worker())
    if failures:
        first = next(iter(failures))
        raise ApiError(
            f"{len(failures)} of {len(todo)} device(s) could not be provisioned "
            f"(a rerun retries them); {first}: {failures[first]}",
            code="simulator_provisioning",
        )
    ready = [i for i in ids if steps[i].action is Action.REUSE or i in provisioned]
    reused = sum(steps[i].action is Action.REUSE for i in ids)
    return Fleet([Creds(i, state_dir / i) for i in ready], registered=len(provisioned), reused=reused)


# --- running ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    interval_s: float
    qos: int
    connect_timeout_s: float = 30.0
    ack_grace_s: float = 5.0  # at stop, how long outstanding acknowledgements may take
    connect_slots: int = 16  # TLS handshakes in progress at once
    max_backoff_s: float = 30.0


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{text} ({exc.__cause__})" if exc.__cause__ is not None else text


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """True as soon as ``stop`` is set, False once ``seconds`` have passed without it."""
    try:
        async with asyncio.timeout(max(0.0, seconds)):
            await stop.wait()
    except TimeoutError:
        return False
    return True


class _Device:
    """One simulated device's life: connect, announce, publish on the interval, reconnect."""

    def __init__(
        self, creds: Creds, target: Target, counters: Counters, stop: asyncio.Event, slots: asyncio.Semaphore
    ) -> None:
        self.id = creds.device_id
        self.model = SimulatedDevice(creds.device_id, started_at=utcnow(), version=gateway.__version__)
        self._tls = creds.tls()
        self._target, self._counters, self._stop, self._slots = target, counters, stop, slots
        self._pending: set[asyncio.Future[None]] = set()

    async def live(self, first_tick: float) -> None:
        target, counters = self._target, self._counters
        backoff = 1.0
        while not self._stop.is_set():
            client = MqttClient(client_id=self.id, keepalive=60)
            try:
                async with self._slots:
                    if self._stop.is_set():  # stopped while waiting for a slot: do not connect now
                        return
                    await client.connect(
                        target.host,
                        target.port,
                        ssl=self._tls,
                        server_hostname=target.host,
                        timeout=target.connect_timeout_s,
                    )
            except (MqttError, OSError, TimeoutError) as exc:
                counters.connect_failures += 1
                counters.last_error = f"{self.id}: connect: {_describe(exc)}"
                await _stopped_within(self._stop, backoff)
                backoff = min(2 * backoff, target.max_backoff_s)
                continue
            backoff = 1.0
            counters.sessions += 1
            counters.connected += 1
            try:
                first_tick = await self._session(client, first_tick)
                await self._settle(client, target.ack_grace_s)
            except (MqttError, OSError) as exc:
                if not self._stop.is_set():
                    counters.disconnects += 1
                    counters.last_error = f"{self.id}: session lost: {_describe(exc)}"
            finally:
                counters.connected -= 1
                for future in list(self._pending):
                    future.cancel()  # never acknowledged: counted as failed
                await client.disconnect()

    async def _session(self, client: MqttClient, tick: float) -> float:
        """Announce, then publish on the interval until ``stop``; returns the next tick."""
        loop = asyncio.get_running_loop()
        interval = self._target.interval_s
        await client.subscribe((f"devices/{self.id}/errors", 0))
        await self._publish(client, "info", self.model.info())
        await self._publish(client, "components", self.model.components())
        while True:
            if await _stopped_within(self._stop, tick - loop.time()):
                return tick
            if client.closed:
                raise ConnectionClosed("connection lost")
            await self._count_rejections(client)
            now = utcnow()
            await self._publish(client, "readings", self.model.readings(now), READINGS_PER_MESSAGE)
            await self._publish(client, "health", self.model.health(now))
            tick += interval
            late = loop.time() - tick
            if late >= 0:  # fell behind (a slow gateway): skip the missed ticks, do not burst
                tick += interval * (math.floor(late / interval) + 1)

    async def _publish(self, client: MqttClient, channel: str, payload: bytes, readings: int = 0) -> None:
        counters, loop = self._counters, asyncio.get_running_loop()
        try:
            done = await client.publish_nowait_ack(
                f"devices/{self.id}/{channel}", payload, qos=self._target.qos
            )
        except (MqttError, OSError):
            counters.failed += 1
            self.model.readings_dropped += readings
            raise
        counters.sent += 1
        if self._target.qos == 0:
            return
        counters.awaiting += 1
        sent_at = loop.time()
        self._pending.add(done)

        def settled(future: asyncio.Future[None]) -> None:
            self._pending.discard(future)
            counters.awaiting -= 1
            if future.cancelled() or future.exception() is not None:
                counters.failed += 1
                self.model.readings_dropped += readings
            else:
                counters.on_ack(loop.time() - sent_at)

        done.add_done_callback(settled)

    async def _settle(self, client: MqttClient, grace_s: float) -> None:
        """Give outstanding acknowledgements ``grace_s``, then count what the gateway refused."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=grace_s)
        await self._count_rejections(client)

    async def _count_rejections(self, client: MqttClient) -> None:
        """Take every message waiting on ``devices/{id}/errors`` (never waits for more)."""
        while True:
            try:
                message = await client.next_message(timeout=0)
            except (TimeoutError, MqttError):
                return
            self._counters.rejected += 1
            try:
                error = json.loads(message.payload)
                self._counters.last_error = f"{self.id}: rejected: {error['code']}: {error['message']}"
            except (ValueError, KeyError, TypeError):
                self._counters.last_error = f"{self.id}: rejected: {message.payload[:200]!r}"


async def _cancel_late(stop: asyncio.Event, tasks: Sequence[asyncio.Task[None]], grace_s: float) -> None:
    """After ``stop``, give the devices ``grace_s`` to finish cleanly, then cancel the rest."""
    await stop.wait()
    _, late = await asyncio.wait(tasks, timeout=grace_s)
    for task in late:
        task.cancel()


def _load(
    creds: Creds, target: Target, counters: Counters, stop: asyncio.Event, slots: asyncio.Semaphore
) -> _Device:
    try:
        return _Device(creds, target, counters, stop, slots)
    except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; named for the reader
        raise ConfigError(
            f"cannot load the credentials of {creds.device_id} from {creds.folder}: {exc}; "
            "delete the device (gateway devices delete ID) and rerun to enroll it afresh"
        ) from exc


async def run(fleet: Sequence[Creds], target: Target, counters: Counters, stop: asyncio.Event) -> None:
    """Run every device of ``fleet`` until ``stop`` is set; their first ticks spread over one interval."""
    if not fleet:
        return
    slots = asyncio.Semaphore(target.connect_slots)
    start = asyncio.get_running_loop().time()
    devices = [_load(creds, target, counters, stop, slots) for creds in fleet]
    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(
                device.live(start + target.interval_s * n / len(devices)), name=f"sim-{device.id}"
            )
            for n, device in enumerate(devices)
        ]
        group.create_task(_cancel_late(stop, tasks, target.ack_grace_s + target.connect_timeout_s))
