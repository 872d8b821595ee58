"""``/api/v1/device-groups``: static groups (explicit members) and dynamic ones (a saved filter).

Reads need devices:read, changes devices:write, deleting a group admin (as deleting a
device). A group's members page is the device listing narrowed to the group, in the
``GET /devices`` shape; ``GET /devices?group=ID`` does the same with every other filter.
Receives JSON bodies; hands them to `gateway.groups.GroupService` once
`gateway.core.groups` has parsed them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.api.auth import ADMIN, READ, WRITE, context
from gateway.api.schemas import DeviceList, Offset, RequestBody, Success, device_list, page_query
from gateway.core.groups import FILTER_KEYS, MEMBERS_PER_REQUEST, GroupRecord, GroupSpec
from gateway.core.records import DeviceQuery

_FILTER_DOC = (
    f"dynamic groups only: the device filters to save, any of {', '.join(FILTER_KEYS)} "
    "(tags and location_ids are lists: all must be present); {} matches every device"
)


class GroupBody(RequestBody):
    name: str = Field(description="1-200 printable characters")
    description: str | None = Field(default=None, description="up to 1,000 characters")
    filter: dict[str, Any] | None = Field(default=None, description=_FILTER_DOC)


class GroupIn(GroupBody):
    id: str | None = Field(
        default=None, description="the group's id (device id grammar); generated if absent"
    )
    kind: Literal["static", "dynamic"]
    device_ids: list[str] | None = Field(
        default=None, max_length=MEMBERS_PER_REQUEST, description="static groups only: the first members"
    )


class GroupPut(GroupBody):
    kind: Literal["static", "dynamic"] | None = Field(
        default=None, description="may be given, but never changes (409 group_kind_fixed)"
    )


class GroupOut(BaseModel):
    id: str
    name: str
    description: str | None
    kind: Literal["static", "dynamic"]
    filter: dict[str, Any] | None = Field(
        description="the saved filters (dynamic groups); null for static ones"
    )
    member_count: int = Field(description="static: its members; dynamic: the devices its filter matches now")
    created_at: str
    updated_at: str


class GroupEnvelope(BaseModel):
    data: GroupOut


class GroupList(BaseModel):
    data: list[GroupOut]
    total: int
    limit: int
    offset: int


class MembersIn(RequestBody):
    device_ids: list[str] = Field(min_length=1, max_length=MEMBERS_PER_REQUEST)


class MembersAdded(BaseModel):
    data: GroupOut
    added: list[str] = Field(description="the devices that were not members yet")


def group_out(record: GroupRecord) -> GroupOut:
    return GroupOut(**record.as_json())


def _spec(body: GroupBody, kind: str) -> GroupSpec:
    return GroupSpec.parse(name=body.name, description=body.description, kind=kind, filter=body.filter)


def build_router() -> APIRouter:
    r = APIRouter(tags=["device groups"])

    @r.get("/device-groups", response_model=GroupList, dependencies=[READ])
    async def list_groups(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> GroupList:
        """Every group by name, with its member count."""
        found, total = await context(request).groups.page(limit, offset)
        return GroupList(data=[group_out(g) for g in found], total=total, limit=limit, offset=offset)

    @r.post("/device-groups", status_code=201, response_model=GroupEnvelope, dependencies=[WRITE])
    async def create(body: GroupIn, request: Request) -> GroupEnvelope:
        """Create a static group (optionally with its first members) or a dynamic one (a saved filter)."""
        group = await context(request).groups.create(body.id, _spec(body, body.kind), body.device_ids or ())
        return GroupEnvelope(data=group_out(group))

    @r.get("/device-groups/{group_id}", response_model=GroupEnvelope, dependencies=[READ])
    async def show(group_id: str, request: Request) -> GroupEnvelope:
        return GroupEnvelope(data=group_out(await context(request).groups.get(group_id)))

    @r.put("/device-groups/{group_id}", response_model=GroupEnvelope, dependencies=[WRITE])
    async def replace(group_id: str, body: GroupPut, request: Request) -> GroupEnvelope:
        """Replace name, description and (dynamic) filter; members stay (see /members)."""
        groups = context(request).groups
        kind = body.kind or (await groups.get(group_id)).spec.kind.value
        return GroupEnvelope(data=group_out(await groups.replace(group_id, _spec(body, kind))))

    @r.delete("/device-groups/{group_id}", response_model=Success, dependencies=[ADMIN])
    async def delete(group_id: str, request: Request) -> Success:
        """Delete the group; its devices stay as they are."""
        await context(request).groups.delete(group_id)
        return Success(success=True)

    @r.get("/device-groups/{group_id}/members", response_model=DeviceList, dependencies=[READ])
    async def members(
        group_id: str,
        request: Request,
        sort: Annotated[str | None, Query(description="as GET /devices")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
        cursor: Annotated[
            str | None, Query(max_length=4096, description="`next` of the previous page")
        ] = None,
    ) -> DeviceList:
        """The group's devices, paged and counted like GET /devices (which takes ?group= too)."""
        query = page_query(DeviceQuery(), sort, limit, offset, cursor)
        return device_list(await context(request).groups.members(group_id, query), limit, offset)

    @r.post("/device-groups/{group_id}/members", response_model=MembersAdded, dependencies=[WRITE])
    async def add_members(group_id: str, body: MembersIn, request: Request) -> MembersAdded:
        """Add existing devices to a static group (members already in it are left as they are)."""
        group, added = await context(request).groups.add_members(group_id, body.device_ids)
        return MembersAdded(data=group_out(group), added=added)

    @r.delete(
        "/device-groups/{group_id}/members/{device_id}", response_model=GroupEnvelope, dependencies=[WRITE]
    )
    async def remove_member(group_id: str, device_id: str, request: Request) -> GroupEnvelope:
        """Take a device out of a static group."""
        return GroupEnvelope(data=group_out(await context(request).groups.remove_member(group_id, device_id)))

    return r
