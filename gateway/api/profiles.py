"""``/api/v1/device-profiles``: kinds of device, with expected components, a settings schema
and the settings operators may change; and how the devices of a profile conform to it.

Reads need devices:read, creating and replacing devices:write, deleting admin; a profile
that devices have is deleted only with ``force=true``, which clears their ``profile_id``
(409 ``profile_in_use`` otherwise). A device takes a profile through ``PATCH
/devices/{id}`` ``{"profile_id"}``; the rules are `gateway.core.profiles`' and
`gateway.core.settings_schema`'.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.api.auth import ADMIN, READ, WRITE, context
from gateway.api.schemas import Offset, RequestBody
from gateway.core.profiles import ProfileRecord, ProfileSpec
from gateway.profiles import DeviceConformance


class ProfileBody(RequestBody):
    name: str = Field(description="1-200 printable characters")
    description: str | None = Field(default=None, description="up to 1,000 characters")
    components: list[Any] | None = Field(
        default=None,
        description='expected, in the shape devices announce: [{"id", "profile"?, '
        '"sensors": [{"name", "value_type": number|boolean|string, "unit"?}]}]',
    )
    settings_schema: dict[str, Any] | None = Field(
        default=None,
        description='field -> {"type": string|number|integer|boolean, "required"?, "enum"?, "min"?, '
        '"max"?, "max_length"?, "description"?}; null: settings unchecked',
    )
    writable: list[Any] | None = Field(
        default=None, description="the settings_schema fields operators may change; absent: all of them"
    )

    def spec(self) -> ProfileSpec:
        return ProfileSpec.parse(
            name=self.name,
            description=self.description,
            components=self.components,
            settings_schema=self.settings_schema,
            writable=self.writable,
        )


class ProfileIn(ProfileBody):
    id: str | None = Field(
        default=None, description="the profile's id (device id grammar); generated if absent"
    )


class ProfileOut(BaseModel):
    id: str
    name: str
    description: str | None
    components: list[dict[str, Any]]
    settings_schema: dict[str, Any] | None
    writable: list[str]
    device_count: int = Field(description="devices that have this profile")
    created_at: str
    updated_at: str


class ProfileEnvelope(BaseModel):
    data: ProfileOut


class ProfileList(BaseModel):
    data: list[ProfileOut]
    total: int
    limit: int
    offset: int


class ProfileDeleted(BaseModel):
    success: bool
    released_device_ids: list[str] = Field(description="the devices whose profile_id was cleared (force)")


class DifferenceOut(BaseModel):
    kind: str = Field(description="missing_component | missing_sensor | value_type | unit")
    component: str
    sensor: str | None
    expected: str | None
    announced: str | None


class ConformanceOut(BaseModel):
    device_id: str
    conforms: bool = Field(description="it announced every expected component and sensor, as declared")
    components_announced: int
    differences: list[DifferenceOut]


class ConformancePage(BaseModel):
    data: list[ConformanceOut]
    total: int = Field(description="devices that have the profile")
    limit: int
    offset: int


def profile_out(record: ProfileRecord) -> ProfileOut:
    return ProfileOut(**record.as_json())


def conformance_out(found: DeviceConformance) -> ConformanceOut:
    return ConformanceOut(
        device_id=found.device_id,
        conforms=not found.differences,
        components_announced=found.components_announced,
        differences=[
            DifferenceOut(
                kind=d.kind,
                component=d.component,
                sensor=d.sensor,
                expected=d.expected,
                announced=d.announced,
            )
            for d in found.differences
        ],
    )


def build_router() -> APIRouter:
    r = APIRouter(tags=["device profiles"])

    @r.get("/device-profiles", response_model=ProfileList, dependencies=[READ])
    async def list_profiles(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> ProfileList:
        """Every profile by name, with the number of devices that have it."""
        found, total = await context(request).profiles.page(limit, offset)
        return ProfileList(data=[profile_out(p) for p in found], total=total, limit=limit, offset=offset)

    @r.post("/device-profiles", status_code=201, response_model=ProfileEnvelope, dependencies=[WRITE])
    async def create(body: ProfileIn, request: Request) -> ProfileEnvelope:
        """Declare a profile: expected components, a settings schema, the writable settings."""
        return ProfileEnvelope(data=profile_out(await context(request).profiles.create(body.id, body.spec())))

    @r.get("/device-profiles/{profile_id}", response_model=ProfileEnvelope, dependencies=[READ])
    async def show(profile_id: str, request: Request) -> ProfileEnvelope:
        return ProfileEnvelope(data=profile_out(await context(request).profiles.get(profile_id)))

    @r.put("/device-profiles/{profile_id}", response_model=ProfileEnvelope, dependencies=[WRITE])
    async def replace(profile_id: str, body: ProfileBody, request: Request) -> ProfileEnvelope:
        """Replace the declaration; refused (409 settings_nonconforming) while a device that has
        the profile holds settings the new schema refuses."""
        return ProfileEnvelope(
            data=profile_out(await context(request).profiles.replace(profile_id, body.spec()))
        )

    @r.delete("/device-profiles/{profile_id}", response_model=ProfileDeleted, dependencies=[ADMIN])
    async def delete(
        profile_id: str,
        request: Request,
        force: Annotated[
            bool, Query(description="also when devices have it: their profile_id is cleared")
        ] = False,
    ) -> ProfileDeleted:
        """Delete a profile; one that devices have needs force=true (409 profile_in_use otherwise)."""
        released = await context(request).profiles.delete(profile_id, force=force)
        return ProfileDeleted(success=True, released_device_ids=released)

    @r.get("/device-profiles/{profile_id}/conformance", response_model=ConformancePage, dependencies=[READ])
    async def conformance(
        profile_id: str,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> ConformancePage:
        """The devices that have the profile (by id), each with how the components it announced
        differ from the expected ones (extra components and sensors are fine)."""
        found, total = await context(request).profiles.conformance(profile_id, limit, offset)
        return ConformancePage(
            data=[conformance_out(c) for c in found], total=total, limit=limit, offset=offset
        )

    return r
