"""The device lifecycle table."""

from __future__ import annotations

import pytest

from gateway.core.lifecycle import (
    CONNECTABLE,
    DeviceStatus,
    LifecycleEvent,
    event_for_requested,
    next_status,
)
from gateway.errors import InvalidTransition

S, E = DeviceStatus, LifecycleEvent


def test_check_in_activates_a_pending_device() -> None:
    """The first accepted connection turns pending into active."""
    assert next_status(S.PENDING, E.CHECK_IN, checked_in=False) is S.ACTIVE


@pytest.mark.parametrize("event", list(LifecycleEvent))
def test_revoked_is_final(event: LifecycleEvent) -> None:
    """No event leads out of revoked."""
    with pytest.raises(InvalidTransition):
        next_status(S.REVOKED, event, checked_in=True)


@pytest.mark.parametrize(("checked_in", "expected"), [(True, S.ACTIVE), (False, S.PENDING)])
def test_activate_resumes_where_the_device_was(checked_in: bool, expected: DeviceStatus) -> None:
    """Re-activating returns to active only for a device that has checked in before."""
    assert next_status(S.INACTIVE, E.ACTIVATE, checked_in=checked_in) is expected
    assert next_status(S.MAINTENANCE, E.ACTIVATE, checked_in=checked_in) is expected


def test_deactivated_devices_cannot_connect() -> None:
    """inactive and revoked are the statuses that refuse sessions."""
    assert set(DeviceStatus) - CONNECTABLE == {S.INACTIVE, S.REVOKED}


def test_check_in_is_not_a_way_out_of_inactive() -> None:
    """A deactivated device cannot check itself back in."""
    with pytest.raises(InvalidTransition):
        next_status(S.INACTIVE, E.CHECK_IN, checked_in=True)


def test_only_three_statuses_can_be_requested() -> None:
    """PATCH may ask for active, inactive or maintenance; pending and revoked are not requestable."""
    assert event_for_requested(S.INACTIVE) is E.DEACTIVATE
    for status in (S.PENDING, S.REVOKED):
        with pytest.raises(InvalidTransition):
            event_for_requested(status)
