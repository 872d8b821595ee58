"""``/api/v1/sites``: the locations devices are placed in (their ``location_ids`` name sites).

Reads need devices:read, creating and replacing devices:write, deleting admin; a site that
devices name is deleted only with ``force=true``, which takes it out of their location ids
(409 ``site_in_use`` otherwise). The rules are `gateway.core.sites`'.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gateway.api.auth import ADMIN, READ, WRITE, context
from gateway.api.schemas import Offset, RequestBody
from gateway.core.sites import SiteRecord, SiteSpec


class SiteBody(RequestBody):
    name: str = Field(description="1-200 printable characters")
    description: str | None = Field(default=None, description="up to 1,000 characters")
    address: str | None = Field(default=None, description="up to 500 characters, newlines allowed")
    latitude: float | None = Field(default=None, description="WGS 84 degrees, -90..90 (with longitude)")
    longitude: float | None = Field(default=None, description="WGS 84 degrees, -180..180 (with latitude)")
    timezone: str | None = Field(default=None, description="IANA name, e.g. Europe/Berlin")
    metadata: dict[str, Any] | None = Field(default=None, description="free-form JSON object")

    def spec(self) -> SiteSpec:
        return SiteSpec.parse(self.model_dump(exclude={"id"}))


class SiteIn(SiteBody):
    id: str | None = Field(default=None, description="the site's id (device id grammar); generated if absent")


class SiteOut(BaseModel):
    id: str
    name: str
    description: str | None
    address: str | None
    latitude: float | None
    longitude: float | None
    timezone: str | None
    metadata: dict[str, Any]
    device_count: int = Field(description="devices whose location_ids name this site")
    created_at: str
    updated_at: str


class SiteEnvelope(BaseModel):
    data: SiteOut


class SiteList(BaseModel):
    data: list[SiteOut]
    total: int
    limit: int
    offset: int


class SiteDeleted(BaseModel):
    success: bool
    detached_device_ids: list[str] = Field(description="the devices the site was taken from (force)")


def site_out(record: SiteRecord) -> SiteOut:
    return SiteOut(**record.as_json())


def build_router() -> APIRouter:
    r = APIRouter(tags=["sites"])

    @r.get("/sites", response_model=SiteList, dependencies=[READ])
    async def list_sites(
        request: Request,
        search: Annotated[str | None, Query(max_length=200, description="in name or id, any case")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
    ) -> SiteList:
        """Every site by name, with the number of devices placed there."""
        found, total = await context(request).sites.page(limit, offset, search)
        return SiteList(data=[site_out(s) for s in found], total=total, limit=limit, offset=offset)

    @r.post("/sites", status_code=201, response_model=SiteEnvelope, dependencies=[WRITE])
    async def create(body: SiteIn, request: Request) -> SiteEnvelope:
        """Create a site; devices are placed there by naming its id in their location_ids."""
        return SiteEnvelope(data=site_out(await context(request).sites.create(body.id, body.spec())))

    @r.get("/sites/{site_id}", response_model=SiteEnvelope, dependencies=[READ])
    async def show(site_id: str, request: Request) -> SiteEnvelope:
        return SiteEnvelope(data=site_out(await context(request).sites.get(site_id)))

    @r.put("/sites/{site_id}", response_model=SiteEnvelope, dependencies=[WRITE])
    async def replace(site_id: str, body: SiteBody, request: Request) -> SiteEnvelope:
        """Replace every field of the site (those left out are cleared)."""
        return SiteEnvelope(data=site_out(await context(request).sites.replace(site_id, body.spec())))

    @r.delete("/sites/{site_id}", response_model=SiteDeleted, dependencies=[ADMIN])
    async def delete(
        site_id: str,
        request: Request,
        force: Annotated[
            bool, Query(description="also when devices name the site: it leaves their location_ids")
        ] = False,
    ) -> SiteDeleted:
        """Delete a site; one that devices name needs force=true (409 site_in_use otherwise)."""
        detached = await context(request).sites.delete(site_id, force=force)
        return SiteDeleted(success=True, detached_device_ids=detached)

    return r
