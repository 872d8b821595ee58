"""FastAPI application: routes over the device service, bearer tokens with scopes."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response

import gateway
from gateway.api import (
    audit,
    bulk,
    credentials,
    data,
    errors,
    failures,
    groups,
    history,
    profiles,
    sites,
    tokens,
)
from gateway.api.auth import ADMIN, READ, WRITE, ApiContext, context
from gateway.api.schemas import (
    DeviceEnvelope,
    DeviceList,
    Health,
    Offset,
    PatchIn,
    ProvisionIn,
    ProvisionOut,
    Registered,
    RegisterIn,
    Success,
    SummaryEnvelope,
    device_list,
    device_out,
    page_query,
    summary_out,
    when,
)
from gateway.core import device_fields
from gateway.core.clock import as_utc, parse_duration, utcnow
from gateway.core.lifecycle import DeviceStatus
from gateway.core.presence import Connection
from gateway.core.records import DeviceQuery
from gateway.errors import RateLimited, StoreUnavailable
from gateway.logs import get_logger

log = get_logger("gateway.api")

ShortText = Annotated[str | None, Query(max_length=200)]


async def device_filters(
    request: Request,
    search: Annotated[str | None, Query(max_length=200, description="in name or id, any case")] = None,
    blocked: Literal["all", "hide", "only"] = "all",
    status: Literal["pending", "active", "inactive", "maintenance", "revoked"] | None = None,
    connection: Literal["online", "offline"] | None = None,
    tag: Annotated[list[str] | None, Query(description="has this tag; repeat: has them all")] = None,
    location_id: Annotated[
        list[str] | None, Query(description="placed in this location; repeat: in them all")
    ] = None,
    application: ShortText = None,
    manufacturer: ShortText = None,
    model: ShortText = None,
    cert_expires_within: Annotated[
        str | None, Query(description="newest valid certificate ends within, e.g. 30d, 12h")
    ] = None,
    last_seen_before: Annotated[
        datetime | None, Query(description="ISO 8601; last packet before then (never seen: not listed)")
    ] = None,
    group: Annotated[
        str | None,
        Query(
            max_length=64,
            description="in this device group: a static group's members, or the devices a dynamic "
            "group's saved filter matches (ANDed with these filters)",
        ),
    ] = None,
) -> DeviceQuery:
    """The filters shared by the listing and the summary, parsed once."""
    expires_before = utcnow() + parse_duration(cert_expires_within) if cert_expires_within else None
    return DeviceQuery(
        search=search,
        blocked=blocked,
        status=DeviceStatus(status) if status else None,
        connection=Connection(connection) if connection else None,
        tags=tuple(device_fields.parse_label(t, "tag") for t in tag or ()),
        location_ids=tuple(device_fields.parse_label(loc, "location_id") for loc in location_id or ()),
        application=application,
        manufacturer=manufacturer,
        model=model,
        cert_expires_before=expires_before,
        last_seen_before=as_utc(last_seen_before),
        group=await context(request).groups.scope(group) if group else None,
    )


Filters = Annotated[DeviceQuery, Depends(device_filters)]


def build_router() -> APIRouter:
    r = APIRouter()

    @r.post("/devices", status_code=201, response_model=Registered, dependencies=[WRITE], tags=["devices"])
    async def register(body: RegisterIn, request: Request) -> Registered:
        """Register a device (status ``pending``) and make its one-time registration token."""
        reg = await context(request).devices.register(body.name, body.id)
        return Registered(
            data=device_out(reg.device), registration_token=reg.token, token_expires_at=when(reg.expires_at)
        )

    @r.get("/devices", response_model=DeviceList, dependencies=[READ], tags=["devices"])
    async def list_devices(
        request: Request,
        filters: Filters,
        sort: Annotated[
            str | None,
            Query(description="fields, '-' for descending, e.g. -last_seen_at,name; empty values last"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Offset = 0,
        cursor: Annotated[
            str | None, Query(max_length=4096, description="`next` of the previous page (same sort)")
        ] = None,
    ) -> DeviceList:
        """List devices with filters, sorting and paging (by offset, or by cursor: stable under inserts)."""
        query = page_query(filters, sort, limit, offset, cursor)
        return device_list(await context(request).devices.find(query), limit, offset)

    @r.get("/devices/summary", response_model=SummaryEnvelope, dependencies=[READ], tags=["devices"])
    async def summary(request: Request, filters: Filters) -> SummaryEnvelope:
        """Counts by status, connection, blocked, application, model, firmware; expiring certificates."""
        return SummaryEnvelope(data=summary_out(await context(request).devices.summary(filters)))

    @r.post("/devices/provision", response_model=ProvisionOut, tags=["provisioning"])
    async def provision(body: ProvisionIn, request: Request) -> ProvisionOut:
        """Exchange a one-time registration token and a CSR for a device certificate (no bearer token).

        Attempts per source address are limited (``provisioning.https_attempts_per_minute``).
        """
        ctx = context(request)
        limit = ctx.provisioning_limit
        address = request.client.host if request.client else "unknown"
        if limit is not None and not (verdict := limit.allow(address, time.monotonic())).allowed:
            wait_s = round(verdict.retry_after_s, 1)
            log.warning("provision.rate_limited", client_ip=address, retry_after_s=wait_s)
            raise RateLimited(
                "too many provisioning attempts from this address", retry_after_s=verdict.retry_after_s
            )
        result = await ctx.devices.provision(body.token, body.csr)
        return ProvisionOut(
            device_id=result.device_id,
            certificate=result.certificate_pem,
            ca_chain=result.ca_chain_pem,
            certificate_serial=result.serial,
            not_after=when(result.not_after),
        )

    @r.get("/devices/{device_id}", response_model=DeviceEnvelope, dependencies=[READ], tags=["devices"])
    async def show(device_id: str, request: Request) -> DeviceEnvelope:
        return DeviceEnvelope(data=device_out(await context(request).devices.get(device_id)))

    @r.patch("/devices/{device_id}", response_model=DeviceEnvelope, dependencies=[WRITE], tags=["devices"])
    async def patch(device_id: str, body: PatchIn, request: Request) -> DeviceEnvelope:
        """Change name, status (``inactive`` cuts a live session at once) and the detail fields."""
        device = await context(request).devices.patch(
            device_id,
            name=body.name,
            status=DeviceStatus(body.status) if body.status else None,
            details=body.details(),
        )
        return DeviceEnvelope(data=device_out(device))

    @r.post(
        "/devices/{device_id}/block", response_model=DeviceEnvelope, dependencies=[WRITE], tags=["devices"]
    )
    async def block(device_id: str, request: Request) -> DeviceEnvelope:
        """Refuse the device and cut its live session at once; certificates stay valid."""
        return DeviceEnvelope(data=device_out(await context(request).devices.block(device_id)))

    @r.post(
        "/devices/{device_id}/unblock", response_model=DeviceEnvelope, dependencies=[WRITE], tags=["devices"]
    )
    async def unblock(device_id: str, request: Request) -> DeviceEnvelope:
        return DeviceEnvelope(data=device_out(await context(request).devices.unblock(device_id)))

    @r.post(
        "/devices/{device_id}/revoke", response_model=DeviceEnvelope, dependencies=[ADMIN], tags=["devices"]
    )
    async def revoke(device_id: str, request: Request) -> DeviceEnvelope:
        """Final: status ``revoked``, every certificate on the CRL, live session cut."""
        return DeviceEnvelope(data=device_out(await context(request).devices.revoke(device_id)))

    @r.delete("/devices/{device_id}", response_model=Success, dependencies=[ADMIN], tags=["devices"])
    async def delete(device_id: str, request: Request) -> Success:
        """Revoke, cut the session, then remove the record (certificates stay on the CRL)."""
        await context(request).devices.delete(device_id)
        return Success(success=True)

    return r


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="Device gateway API",
        version=gateway.__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    app.state.ctx = ctx
    errors.install(app)
    app.include_router(build_router(), prefix="/api/v1")
    app.include_router(credentials.build_router(), prefix="/api/v1")
    app.include_router(audit.build_router(), prefix="/api/v1")
    app.include_router(data.build_router(), prefix="/api/v1")
    app.include_router(tokens.build_router(), prefix="/api/v1")
    app.include_router(bulk.build_router(), prefix="/api/v1")
    app.include_router(history.build_router(), prefix="/api/v1")
    app.include_router(failures.build_router(), prefix="/api/v1")
    app.include_router(groups.build_router(), prefix="/api/v1")
    app.include_router(sites.build_router(), prefix="/api/v1")
    app.include_router(profiles.build_router(), prefix="/api/v1")

    @app.get(
        "/healthz",
        response_model=Health,
        tags=["health"],
        responses={503: {"model": Health, "description": "degraded: the database is unavailable"}},
    )
    async def healthz(request: Request, response: Response) -> Health:
        """Liveness and readiness for the container's health check (no auth)."""
        ctx = context(request)
        database: Literal["ok", "unavailable"] = "ok"
        try:
            await ctx.store.ping()
        except StoreUnavailable:
            database = "unavailable"
            response.status_code = 503
        count = ctx.session_count()
        return Health(
            status="ok" if database == "ok" else "degraded",
            database=database,
            mqtt_sessions=int(count),
            version=gateway.__version__,
        )

    return app
