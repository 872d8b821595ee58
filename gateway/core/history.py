"""Connection history as values: a device session's start, its end, and the stored row.

Receives what the gatekeeper knows when a device session starts (epoch, address,
certificate serial) and ends (reason, traffic counters); hands on `SessionStart` and
`SessionEnd`, which the history writer stores in batches, and `SessionRecord`, the row
the API and CLI show. A session is identified by (device id, epoch): the epoch grows
by one per session of a device (`gateway.core.presence`), so an end finds its start
without any id kept in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Traffic:
    """What crossed one connection: bytes of MQTT packets, and PUBLISH packets, each way."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0


@dataclass(frozen=True, slots=True)
class SessionStart:
    device_id: str
    epoch: int
    connected_at: datetime
    client_ip: str
    client_port: int
    certificate_serial: str


@dataclass(frozen=True, slots=True)
class SessionEnd:
    device_id: str
    epoch: int
    disconnected_at: datetime
    reason: str
    traffic: Traffic


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session of a device; ``disconnected_at`` is None while it lasts (or until it is written)."""

    device_id: str
    epoch: int
    connected_at: datetime
    disconnected_at: datetime | None
    reason: str | None
    client_ip: str
    client_port: int
    certificate_serial: str
    traffic: Traffic

    @property
    def duration_s(self) -> float | None:
        if self.disconnected_at is None:
            return None
        return max(0.0, (self.disconnected_at - self.connected_at).total_seconds())

    def with_traffic(self, traffic: Traffic) -> SessionRecord:
        """The record with the counters of the session still running."""
        return replace(self, traffic=traffic)
