"""The device simulator's pure core: which devices, what they publish, what was counted.

Receives device ids, the state a previous run left (per id: the certificate serial it
enrolled, a registration token it got but did not use yet), the gateway's device
records, times and seeds. Hands on:

- `plan`: per device, what provisioning does with it (the one decision table below);
- `SimulatedDevice`: payload bytes for ``devices/{id}/info``, ``components``,
  ``readings`` and ``health`` (DESIGN.md §7; `gateway.core.payloads.parse` accepts
  them), with values that drift like real sensors do;
- `Counters`: what a run sent, had acknowledged, lost and had rejected.

No I/O and no clock (``now`` is passed in); `gateway.simulator` does the awaiting.
"""

from __future__ import annotations

import enum
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from gateway.core.clock import iso
from gateway.core.ids import DeviceId

APPLICATION: Final = "gateway-simulator"


def device_ids(prefix: str, count: int) -> list[str]:
    """``prefix-0001`` .. ``prefix-NNNN``: stable across runs, so a rerun finds its devices again."""
    return [DeviceId(f"{prefix}-{n:04d}").value for n in range(1, count + 1)]


# --- provisioning plan ----------------------------------------------------------------------


class Action(enum.Enum):
    REUSE = "reuse"  # enrolled by an earlier run; its certificate is the device's current one
    REGISTER = "register"  # unknown to the gateway: register, then enroll
    ENROLL = "enroll"  # registered by an earlier run that stopped before enrolling: use its token
    CONFLICT = "conflict"  # neither: the operator has to decide


@dataclass(frozen=True, slots=True)
class Local:
    """What the state directory holds for one device."""

    certificate_serial: str | None = None
    token: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    reason: str = ""


def plan_one(remote: Mapping[str, Any] | None, local: Local) -> Step:
    """The decision table for one device: its gateway record (or None) and its local state."""
    if remote is None:
        return Step(Action.REGISTER)
    if remote.get("status") == "revoked":
        return Step(Action.CONFLICT, "revoked at the gateway")
    certificate = remote.get("certificate") or {}
    if local.certificate_serial is not None and certificate.get("serial") == local.certificate_serial:
        return Step(Action.REUSE)
    if not certificate and local.token is not None:
        return Step(Action.ENROLL)
    if certificate:
        return Step(Action.CONFLICT, "its current certificate is not the one in the state directory")
    return Step(Action.CONFLICT, "registered at the gateway, but not by this state directory")


def plan(
    ids: Iterable[str], remote: Mapping[str, Mapping[str, Any]], local: Mapping[str, Local]
) -> dict[str, Step]:
    return {device_id: plan_one(remote.get(device_id), local.get(device_id, Local())) for device_id in ids}


# --- payloads -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sensor:
    """A numeric channel that wanders around a per-device mean and is pulled back to it."""

    component: str
    name: str
    unit: str
    mean: float
    spread: float  # device means differ by up to this much; values stay within 3 x of the mean
    step: float  # standard deviation of one tick's change
    digits: int


SENSORS: Final = (
    Sensor("env", "temperature", "Cel", 21.0, 2.5, 0.05, 2),
    Sensor("env", "humidity", "%RH", 45.0, 8.0, 0.3, 1),
    Sensor("env", "pressure", "hPa", 1013.25, 6.0, 0.05, 1),
    Sensor("air", "co2", "ppm", 650.0, 150.0, 8.0, 0),
)
DOOR: Final = ("door", "open")  # a boolean contact: (component, sensor)
PROFILES: Final = {"env": "bme280", "air": "scd40", "door": "reed-switch"}
READINGS_PER_MESSAGE: Final = len(SENSORS) + 1
_PULL: Final = 0.05  # how strongly a value is drawn back to its mean per tick
_DOOR_FLIP: Final = 0.02
_LINKS: Final = ("wifi", "wifi", "wifi", "lte")
_MODELS: Final = ("EnvNode-2", "EnvNode-2", "EnvNode-3 Pro")


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


class SimulatedDevice:
    """One device's behaviour, reproducible from its id; methods return payload bytes."""

    def __init__(self, device_id: str, *, started_at: datetime, version: str) -> None:
        self.device_id = device_id
        # Not for security: a reproducible walk per device id.
        self._rng = random.Random(device_id)  # noqa: S311
        rng = self._rng
        self._version = version
        self._started_at = started_at
        self._boot_uptime = rng.uniform(60, 3 * 86400)
        self._means = {s.name: s.mean + rng.uniform(-s.spread, s.spread) for s in SENSORS}
        self._values = dict(self._means)
        self._door = False
        self.link = rng.choice(_LINKS)
        self.model = rng.choice(_MODELS)
        self._battery: float | None = rng.uniform(55, 100) if rng.random() < 0.6 else None  # else mains
        self._heap = rng.uniform(140_000, 190_000)
        self._rssi = rng.uniform(-80, -45)
        self.readings_sent = 0
        self.readings_dropped = 0

    def info(self) -> bytes:
        return _dumps(
            {
                "application": APPLICATION,
                "application_version": self._version,
                "os": "FreeRTOS",
                "os_version": "10.5.1",
                "manufacturer": "Acme Sensors",
                "model": self.model,
                "firmware_version": "1.4.2",
            }
        )

    def components(self) -> bytes:
        sensors: dict[str, list[dict[str, str]]] = {name: [] for name in PROFILES}
        for s in SENSORS:
            sensors[s.component].append({"name": s.name, "value_type": "number", "unit": s.unit})
        sensors[DOOR[0]].append({"name": DOOR[1], "value_type": "boolean"})
        return _dumps([{"id": c, "profile": PROFILES[c], "sensors": sensors[c]} for c in PROFILES])

    def readings(self, now: datetime) -> bytes:
        """One array with a value of every sensor, all measured at ``now``."""
        rng, ts = self._rng, iso(now)
        records: list[dict[str, Any]] = []
        for s in SENSORS:
            mean, value = self._means[s.name], self._values[s.name]
            value += _PULL * (mean - value) + rng.gauss(0, s.step)
            value = _clamp(value, mean - 3 * s.spread, mean + 3 * s.spread)
            self._values[s.name] = value
            shown: float | int = round(value, s.digits) if s.digits else round(value)
            records.append(
                {"component": s.component, "sensor": s.name, "value": shown, "unit": s.unit, "ts": ts}
            )
        if rng.random() < _DOOR_FLIP:
            self._door = not self._door
        records.append({"component": DOOR[0], "sensor": DOOR[1], "value": self._door, "ts": ts})
        self.readings_sent += len(records)
        return _dumps(records)

    def health(self, now: datetime) -> bytes:
        rng = self._rng
        self._heap = _clamp(self._heap + rng.gauss(0, 1500), 60_000, 220_000)
        self._rssi = _clamp(self._rssi + rng.gauss(0, 1.5), -95, -35)
        report: dict[str, Any] = {
            "uptime_s": round(self._boot_uptime + max(0.0, (now - self._started_at).total_seconds()), 1),
            "free_heap_bytes": int(self._heap),
            "rssi_dbm": round(self._rssi),
            "connection_type": self.link,
            "readings_sent": self.readings_sent,
            "readings_dropped": self.readings_dropped,
            "ts": iso(now),
        }
        if self._battery is not None:
            self._battery = max(0.0, self._battery - 0.01)
            report["battery_pct"] = round(self._battery, 1)
        return _dumps(report)


# --- counters -------------------------------------------------------------------------------


@dataclass
class Counters:
    """What a run did. ``failed``: publishes not written, or (QoS 1) never acknowledged."""

    devices: int
    qos: int
    registered: int = 0
    reused: int = 0
    connected: int = 0  # sessions up right now
    sessions: int = 0  # sessions established in all
    connect_failures: int = 0
    disconnects: int = 0  # sessions lost while running
    sent: int = 0
    acknowledged: int = 0
    awaiting: int = 0  # QoS 1: sent, acknowledgement still outstanding
    failed: int = 0
    rejected: int = 0  # messages the gateway refused (devices/{id}/errors)
    last_error: str | None = None
    _latency_total_s: float = field(default=0.0, repr=False)
    _latency_max_s: float = field(default=0.0, repr=False)

    def on_ack(self, latency_s: float) -> None:
        self.acknowledged += 1
        self._latency_total_s += latency_s
        self._latency_max_s = max(self._latency_max_s, latency_s)

    def snapshot(self, elapsed: timedelta) -> dict[str, Any]:
        seconds = elapsed.total_seconds()
        done = self.acknowledged if self.qos else self.sent
        acked = self.acknowledged
        return {
            "devices": self.devices,
            "registered": self.registered,
            "reused": self.reused,
            "qos": self.qos,
            "elapsed_s": round(seconds, 2),
            "sessions": self.sessions,
            "connected": self.connected,
            "connect_failures": self.connect_failures,
            "disconnects": self.disconnects,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "failed": self.failed,
            "unacknowledged": self.awaiting,
            "rejected": self.rejected,
            "messages_per_s": round(done / seconds, 1) if seconds > 0 else 0.0,
            "ack_latency_ms": {
                "mean": round(1000 * self._latency_total_s / acked, 2) if acked else None,
                "max": round(1000 * self._latency_max_s, 2) if acked else None,
            },
            "last_error": self.last_error,
        }

    def progress_line(self, elapsed: timedelta) -> str:
        s = self.snapshot(elapsed)
        acked = f"  acked {s['acknowledged']}" if self.qos else ""
        return (
            f"{s['elapsed_s']:>7.1f}s  connected {s['connected']}/{s['devices']}  sent {s['sent']}{acked}"
            f"  failed {s['failed']}  rejected {s['rejected']}  {s['messages_per_s']} msg/s"
        )
