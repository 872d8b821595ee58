"""Presence: ONLINE/OFFLINE written to the database first, then published retained.

Receives session starts and ends from the gatekeeper, and the gateway's start and
stop; hands on rows in the store (epoch, reasons, timestamps) and retained
``gateway/status/{id}`` messages. Order per device is guaranteed by the epoch: the
store ends a session only if its epoch is still the current one, so a late OFFLINE
of an old session can never override a newer ONLINE.
"""

from __future__ import annotations

from gateway.broker import LiveSession
from gateway.core import lifecycle
from gateway.core.clock import utcnow
from gateway.core.lifecycle import DeviceStatus, LifecycleEvent
from gateway.core.presence import NOT_OFFLINE, OfflineReason
from gateway.events import Events
from gateway.logs import get_logger
from gateway.store import Store

log = get_logger("gateway.presence")

_CHECK_IN = (
    DeviceStatus.PENDING,
    lifecycle.next_status(DeviceStatus.PENDING, LifecycleEvent.CHECK_IN, checked_in=False),
)


class PresenceService:
    def __init__(self, store: Store, events: Events) -> None:
        self._store = store
        self._events = events

    async def online(self, session: LiveSession) -> None:
        device_id = session.device_id
        if device_id is None:
            return
        change = await self._store.mark_online(
            device_id,
            utcnow(),
            client_ip=session.peer.host,
            serial=session.certificate.serial,
            check_in=_CHECK_IN if session.check_in else None,
        )
        session.epoch = change.epoch
        log.info(
            "presence.online",
            device_id=device_id,
            epoch=change.epoch,
            peer=session.peer.host,
            check_in=session.check_in,
        )
        await self._events.status(change)

    async def offline(self, session: LiveSession, reason: OfflineReason) -> None:
        device_id = session.device_id
        if device_id is None or session.epoch is None:
            return
        if reason in NOT_OFFLINE:
            log.info("presence.handed_over", device_id=device_id, epoch=session.epoch, reason=reason.value)
            return
        change = await self._store.mark_offline(device_id, session.epoch, reason, utcnow())
        if change is None:
            log.info("presence.stale_offline", device_id=device_id, epoch=session.epoch, reason=reason.value)
            return
        log.info("presence.offline", device_id=device_id, epoch=session.epoch, reason=reason.value)
        await self._events.status(change)

    async def recover(self) -> int:
        """At start: devices left ONLINE go offline (``gateway_restart``); republish every status retained."""
        stale = await self._store.mark_all_offline(OfflineReason.GATEWAY_RESTART, utcnow())
        for change in stale:
            log.info("presence.offline", device_id=change.device_id, epoch=change.epoch, reason=change.reason)
        for change in await self._store.presence_snapshot():
            await self._events.status(change)
        return len(stale)

    async def sweep(self, reason: OfflineReason) -> int:
        """At shutdown, after sessions were closed: anything still ONLINE goes offline with `reason`."""
        stale = await self._store.mark_all_offline(reason, utcnow())
        for change in stale:
            await self._events.status(change)
        return len(stale)
