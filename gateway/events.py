"""Operator-facing events on ``gateway/events/{kind}`` and retained device status.

Receives what happened (a refused CONNECT, a registry change, a status change);
hands on MQTT publications through a `Publisher` (the MQTT engine). Publishing never
raises into the caller: an event that cannot be published is logged and dropped,
the action it reports has already happened.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from gateway.core import topics
from gateway.core.clock import iso, utcnow
from gateway.core.presence import StatusChange
from gateway.logs import get_logger

log = get_logger("gateway.events")


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None: ...

    def clear_retained(self, topic: str) -> None: ...


class Events:
    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def emit(self, kind: str, **fields: Any) -> None:
        body = {"kind": kind, "ts": iso(utcnow()), **fields}
        try:
            await self._publisher.publish(
                topics.event_topic(kind), json.dumps(body, separators=(",", ":")).encode(), qos=1
            )
        except Exception:
            log.exception("event.publish_failed", kind=kind)

    async def status(self, change: StatusChange) -> None:
        try:
            await self._publisher.publish(
                topics.status_topic(change.device_id), change.payload(), retain=True
            )
        except Exception:
            log.exception("status.publish_failed", device_id=change.device_id)

    def forget_status(self, device_id: str) -> None:
        self._publisher.clear_retained(topics.status_topic(device_id))

    async def publish(self, topic: str, body: dict[str, Any], *, retain: bool = False) -> None:
        """A JSON message from the gateway on one of its own topics (QoS 1)."""
        try:
            await self._publisher.publish(
                topic, json.dumps(body, separators=(",", ":")).encode(), retain=retain
            )
        except Exception:
            log.exception("publish_failed", topic=topic)

    def forget(self, topic: str) -> None:
        """Drop the retained message on `topic`, if any."""
        self._publisher.clear_retained(topic)

    async def device_error(self, device_id: str, **fields: Any) -> None:
        body = {"ts": iso(utcnow()), **fields}
        try:
            await self._publisher.publish(
                topics.errors_topic(device_id), json.dumps(body, separators=(",", ":")).encode(), qos=0
            )
        except Exception:
            log.exception("device_error.publish_failed", device_id=device_id)
