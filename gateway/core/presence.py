"""Presence as values: reasons, the retained status payload, and the epoch rule.

Receives a device's connection event; hands on the JSON bytes published retained on
``gateway/status/{id}``. ``epoch`` grows by one per session of a device (the store
assigns it when the session goes online); a consumer drops any status whose epoch is
lower than one it has already seen for that device.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from datetime import datetime

from gateway.core.clock import iso


class Connection(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class OfflineReason(enum.StrEnum):
    CLIENT_DISCONNECT = "client_disconnect"
    CONNECTION_LOST = "connection_lost"
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    PROTOCOL_ERROR = "protocol_error"  # the device broke MQTT; the gateway closed the connection
    STORE_UNAVAILABLE = "store_unavailable"  # a message could not be stored; closed so it is resent
    BLOCKED = "blocked"
    REVOKED = "revoked"
    DEACTIVATED = "deactivated"
    DELETED = "deleted"
    TAKEN_OVER = "taken_over"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    GATEWAY_RESTART = "gateway_restart"


ONLINE_REASON = "connected"

# A taken-over session hands the device to its successor: it never marks it offline.
NOT_OFFLINE = frozenset({OfflineReason.TAKEN_OVER})


@dataclass(frozen=True, slots=True)
class StatusChange:
    device_id: str
    connection: Connection
    reason: str
    epoch: int
    at: datetime
    client_ip: str | None = None
    certificate_serial: str | None = None

    def payload(self) -> bytes:
        body: dict[str, object] = {
            "device_id": self.device_id,
            "status": self.connection.value,
            "reason": self.reason,
            "epoch": self.epoch,
            "ts": iso(self.at),
        }
        if self.client_ip is not None:
            body["client_ip"] = self.client_ip
        if self.certificate_serial is not None:
            body["certificate_serial"] = self.certificate_serial
        return json.dumps(body, separators=(",", ":")).encode()


def supersedes(seen_epoch: int | None, epoch: int) -> bool:
    """Should a consumer that has seen `seen_epoch` accept a status with `epoch`?"""
    return seen_epoch is None or epoch >= seen_epoch
