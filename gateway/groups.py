"""Operator actions on device groups: create, replace, delete, members; and what a group selects.

Receives specs already parsed by the API (`gateway.core.groups.GroupSpec`) and raw device
ids; hands on registry changes (`gateway.store.groups`), an audit entry per change
(``group.created``, ``group.updated``, ``group.deleted``, ``group.members_added``,
``group.member_removed``; target type ``group``), and the `GroupScope` a device query
narrows to (``GET /devices?group=``, a group's members page), so that both group kinds list
through the device listing itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gateway.audit import Audit
from gateway.core.catalog import RecordId
from gateway.core.clock import utcnow
from gateway.core.groups import MEMBERS_PER_REQUEST, GroupKind, GroupRecord, GroupSpec
from gateway.core.ids import DeviceId
from gateway.core.records import DevicePage, DeviceQuery, GroupScope
from gateway.devices import DeviceService
from gateway.errors import Conflict, FieldRejected, InvalidValue
from gateway.logs import get_logger
from gateway.store.groups import GroupStore

log = get_logger("gateway.groups")


def _audited(record: GroupRecord | None) -> dict[str, object] | None:
    """What the trail keeps of a group: its fields, not its member count of the moment."""
    if record is None:
        return None
    view = record.as_json()
    view.pop("member_count")
    return view


def _device_ids(raw: Sequence[str]) -> list[str]:
    """Device ids to add: at most `MEMBERS_PER_REQUEST`, each of the device id grammar."""
    if len(raw) > MEMBERS_PER_REQUEST:
        raise FieldRejected(
            f"at most {MEMBERS_PER_REQUEST} devices per request", path="device_ids", code="too_many_devices"
        )
    try:
        return sorted({DeviceId(device_id).value for device_id in raw})
    except InvalidValue as exc:
        raise FieldRejected(exc.message, path="device_ids", code="unknown_device") from exc


class GroupService:
    def __init__(self, store: GroupStore, devices: DeviceService, audit: Audit) -> None:
        self._store = store
        self._devices = devices
        self._audit = audit

    async def create(
        self, group_id: str | None, spec: GroupSpec, device_ids: Sequence[str] = ()
    ) -> GroupRecord:
        """A new group; a static one may start with members (devices that exist)."""
        gid = RecordId.chosen_or_new("group", group_id)
        wanted = _device_ids(device_ids)
        if wanted and spec.kind is GroupKind.DYNAMIC:
            raise FieldRejected(
                "a dynamic group's members are the devices its filter matches",
                path="device_ids",
                code="dynamic_group",
            )
        record = await self._store.create(gid.value, spec, utcnow(), wanted)
        await self._changed("created", record.id, None, record, device_ids=wanted)
        return record

    async def get(self, group_id: str) -> GroupRecord:
        return await self._store.get(group_id)

    async def page(self, limit: int, offset: int) -> tuple[list[GroupRecord], int]:
        return await self._store.page(limit, offset)

    async def replace(self, group_id: str, spec: GroupSpec) -> GroupRecord:
        """New name, description and (dynamic) filter; the kind stays what it was."""
        before = await self._store.get(group_id)
        if spec.kind is not before.spec.kind:
            raise Conflict(
                f"group {group_id} is {before.spec.kind.value}; a group's kind never changes "
                "(create a new group instead)",
                code="group_kind_fixed",
            )
        after = await self._store.replace(group_id, spec, utcnow())
        await self._changed("updated", group_id, before, after)
        return after

    async def delete(self, group_id: str) -> None:
        """Remove the group (its member rows go with it; the devices stay)."""
        before = await self._store.get(group_id)
        await self._store.delete(group_id)
        await self._changed("deleted", group_id, before, None)

    async def add_members(self, group_id: str, device_ids: Sequence[str]) -> tuple[GroupRecord, list[str]]:
        """Add devices to a static group; the group after, and the ids that were new members."""
        wanted = _device_ids(device_ids)
        await self._static(group_id)
        added = await self._store.add_members(group_id, wanted, utcnow())
        if added:
            await self._changed("members_added", group_id, device_ids=added)
        return await self._store.get(group_id), added

    async def remove_member(self, group_id: str, device_id: str) -> GroupRecord:
        await self._static(group_id)
        await self._store.remove_member(group_id, device_id, utcnow())
        await self._changed("member_removed", group_id, device_id=device_id)
        return await self._store.get(group_id)

    async def _static(self, group_id: str) -> GroupRecord:
        group = await self._store.get(group_id)
        if group.spec.kind is GroupKind.DYNAMIC:
            raise Conflict(
                f"group {group_id} is dynamic: its members are the devices its filter matches",
                code="dynamic_group",
            )
        return group

    async def scope(self, group_id: str) -> GroupScope:
        """What a device query narrows to for this group (`NotFound` when there is none)."""
        group = await self._store.get(group_id)
        saved = None if group.spec.filter is None else group.spec.filter.query()
        return GroupScope(group.id, saved)

    async def members(self, group_id: str, query: DeviceQuery) -> DevicePage:
        """A page of the group's devices, in the query's order (its filters ANDed)."""
        return await self._devices.find(dataclasses.replace(query, group=await self.scope(group_id)))

    async def _changed(
        self,
        action: str,
        group_id: str,
        before: GroupRecord | None = None,
        after: GroupRecord | None = None,
        **detail: object,
    ) -> None:
        log.info(f"group.{action}", group_id=group_id, **detail)
        await self._audit.record(
            f"group.{action}", "group", group_id, before=_audited(before), after=_audited(after), **detail
        )
