"""Operator actions on device profiles: create, replace, delete; and how devices conform to one.

Receives specs already parsed by the API (`gateway.core.profiles.ProfileSpec`); hands on
registry changes (`gateway.store.profiles`), an audit entry per change (``profile.created``,
``profile.updated``, ``profile.deleted`` with the devices a forced delete took it from;
target type ``profile``), and conformance pages: each device with the profile, and how
what it announced on ``devices/{id}/components`` differs from what the profile expects.

A device with a profile always has settings that conform to it: assigning a profile and
changing settings are checked by `DeviceService.update_details`, and a new schema is taken
only if every device that has the profile conforms to it (409 ``settings_nonconforming``,
naming the first few, otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.audit import Audit
from gateway.core.catalog import RecordId
from gateway.core.clock import utcnow
from gateway.core.profiles import Difference, ProfileRecord, ProfileSpec, conformance
from gateway.errors import Conflict
from gateway.logs import get_logger
from gateway.store.profiles import ProfileStore

log = get_logger("gateway.profiles")

NONCONFORMING_SHOWN = 5


@dataclass(frozen=True, slots=True)
class DeviceConformance:
    device_id: str
    differences: list[Difference]
    components_announced: int


def _audited(record: ProfileRecord | None) -> dict[str, object] | None:
    if record is None:
        return None
    view = record.as_json()
    view.pop("device_count")
    return view


class ProfileService:
    def __init__(self, store: ProfileStore, audit: Audit) -> None:
        self._store = store
        self._audit = audit

    async def create(self, profile_id: str | None, spec: ProfileSpec) -> ProfileRecord:
        record = await self._store.create(RecordId.chosen_or_new("profile", profile_id).value, spec, utcnow())
        await self._changed("created", record.id, None, record)
        return record

    async def get(self, profile_id: str) -> ProfileRecord:
        return await self._store.get(profile_id)

    async def page(self, limit: int, offset: int) -> tuple[list[ProfileRecord], int]:
        return await self._store.page(limit, offset)

    async def replace(self, profile_id: str, spec: ProfileSpec) -> ProfileRecord:
        """The new declaration, if every device that has the profile conforms to its schema."""
        before = await self._store.get(profile_id)
        if spec.settings_schema is not None:
            failing = []
            for device_id, settings in await self._store.settings_of_devices(profile_id):
                problems = spec.settings_schema.problems(settings)
                if problems:
                    failing.append(f"{device_id} ({problems[0][0]} {problems[0][1]})")
            if failing:
                shown = "; ".join(failing[:NONCONFORMING_SHOWN])
                more = (
                    f" and {len(failing) - NONCONFORMING_SHOWN} more"
                    if len(failing) > NONCONFORMING_SHOWN
                    else ""
                )
                raise Conflict(
                    f"{len(failing)} device(s) with profile {profile_id} have settings the new schema "
                    f"refuses: {shown}{more}; change their settings first",
                    code="settings_nonconforming",
                )
        after = await self._store.replace(profile_id, spec, utcnow())
        await self._changed("updated", profile_id, before, after)
        return after

    async def delete(self, profile_id: str, *, force: bool = False) -> list[str]:
        """Delete a profile; the devices that lost it (a profile in use needs `force`)."""
        before = await self._store.get(profile_id)
        released = await self._store.delete(profile_id, utcnow(), force=force)
        await self._changed("deleted", profile_id, before, None, force=force, released_device_ids=released)
        return released

    async def conformance(
        self, profile_id: str, limit: int, offset: int
    ) -> tuple[list[DeviceConformance], int]:
        """A page of the devices with the profile (by id), each with how its announced components
        differ from the expected ones; and how many devices have the profile."""
        profile = await self._store.get(profile_id)
        announced, total = await self._store.announced(profile_id, limit, offset)
        return [
            DeviceConformance(device_id, conformance(profile.spec.components, found), len(found))
            for device_id, found in announced
        ], total

    async def _changed(
        self,
        action: str,
        profile_id: str,
        before: ProfileRecord | None = None,
        after: ProfileRecord | None = None,
        **detail: object,
    ) -> None:
        log.info(
            f"profile.{action}", profile_id=profile_id, **{k: v for k, v in detail.items() if k == "force"}
        )
        await self._audit.record(
            f"profile.{action}",
            "profile",
            profile_id,
            before=_audited(before),
            after=_audited(after),
            **detail,
        )
