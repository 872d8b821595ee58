"""The device lifecycle as one transition table.

    pending ──check-in──▶ active ◀──▶ inactive / maintenance
        └──────────────── any ──revoke──▶ revoked (final)

`pending` lasts from registration until the first accepted connection with an
enrolled certificate (the check-in). Everything that changes a device's status goes
through `next_status`; nothing else compares statuses to decide a move.
"""

from __future__ import annotations

import enum

from gateway.errors import InvalidTransition


class DeviceStatus(enum.StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    INACTIVE = "inactive"
    MAINTENANCE = "maintenance"
    REVOKED = "revoked"


class LifecycleEvent(enum.StrEnum):
    CHECK_IN = "check_in"  # first accepted connection
    ACTIVATE = "activate"  # operator: back to service
    DEACTIVATE = "deactivate"  # operator: take out of service (kicks, refuses)
    MAINTAIN = "maintain"  # operator: in maintenance (may still connect)
    REVOKE = "revoke"  # operator: final, certificates on the CRL


S, E = DeviceStatus, LifecycleEvent
# Resolved by `next_status`: active when the device has checked in before, pending otherwise.
_RESUME = "resume"

TRANSITIONS: dict[tuple[DeviceStatus, LifecycleEvent], DeviceStatus | str] = {
    (S.PENDING, E.CHECK_IN): S.ACTIVE,
    (S.ACTIVE, E.CHECK_IN): S.ACTIVE,
    (S.MAINTENANCE, E.CHECK_IN): S.MAINTENANCE,
    (S.PENDING, E.ACTIVATE): S.PENDING,
    (S.ACTIVE, E.ACTIVATE): S.ACTIVE,
    (S.INACTIVE, E.ACTIVATE): _RESUME,
    (S.MAINTENANCE, E.ACTIVATE): _RESUME,
    (S.PENDING, E.DEACTIVATE): S.INACTIVE,
    (S.ACTIVE, E.DEACTIVATE): S.INACTIVE,
    (S.INACTIVE, E.DEACTIVATE): S.INACTIVE,
    (S.MAINTENANCE, E.DEACTIVATE): S.INACTIVE,
    (S.PENDING, E.MAINTAIN): S.MAINTENANCE,
    (S.ACTIVE, E.MAINTAIN): S.MAINTENANCE,
    (S.INACTIVE, E.MAINTAIN): S.MAINTENANCE,
    (S.MAINTENANCE, E.MAINTAIN): S.MAINTENANCE,
    (S.PENDING, E.REVOKE): S.REVOKED,
    (S.ACTIVE, E.REVOKE): S.REVOKED,
    (S.INACTIVE, E.REVOKE): S.REVOKED,
    (S.MAINTENANCE, E.REVOKE): S.REVOKED,
}

# Statuses whose devices may hold a session (with their own certificate, unblocked).
CONNECTABLE = frozenset({S.PENDING, S.ACTIVE, S.MAINTENANCE})

# The status an operator asks for in PATCH, as a lifecycle event.
REQUESTABLE = {
    S.ACTIVE: E.ACTIVATE,
    S.INACTIVE: E.DEACTIVATE,
    S.MAINTENANCE: E.MAINTAIN,
}


def next_status(current: DeviceStatus, event: LifecycleEvent, *, checked_in: bool) -> DeviceStatus:
    """The status after `event`, or InvalidTransition when the table has no such move."""
    target = TRANSITIONS.get((current, event))
    if target is None:
        raise InvalidTransition(
            f"a {current} device cannot {event.value.replace('_', ' ')}",
            code="invalid_transition",
        )
    if target == _RESUME:
        return S.ACTIVE if checked_in else S.PENDING
    return DeviceStatus(target)


def event_for_requested(status: DeviceStatus) -> LifecycleEvent:
    """Map an operator's requested status (PATCH) to its event; only active/inactive/maintenance."""
    event = REQUESTABLE.get(status)
    if event is None:
        raise InvalidTransition(
            f"status {status} cannot be requested; use one of {', '.join(sorted(REQUESTABLE))}",
            code="invalid_transition",
        )
    return event
