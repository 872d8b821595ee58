"""Operator actions on sites: create, replace, delete (forced: out of the devices placed there).

Receives specs already parsed by the API (`gateway.core.sites.SiteSpec`); hands on registry
changes (`gateway.store.sites`) and an audit entry per change (``site.created``,
``site.updated``, ``site.deleted`` with the devices a forced delete took it from; target
type ``site``). How devices point to sites is stated in `gateway.core.sites`; that every
added location id names a site is checked by `DeviceService.update_details`.
"""

from __future__ import annotations

from gateway.audit import Audit
from gateway.core.catalog import RecordId
from gateway.core.clock import utcnow
from gateway.core.sites import SiteRecord, SiteSpec
from gateway.logs import get_logger
from gateway.store.sites import SiteStore

log = get_logger("gateway.sites")


def _audited(record: SiteRecord | None) -> dict[str, object] | None:
    if record is None:
        return None
    view = record.as_json()
    view.pop("device_count")
    return view


class SiteService:
    def __init__(self, store: SiteStore, audit: Audit) -> None:
        self._store = store
        self._audit = audit

    async def create(self, site_id: str | None, spec: SiteSpec) -> SiteRecord:
        record = await self._store.create(RecordId.chosen_or_new("site", site_id).value, spec, utcnow())
        await self._changed("created", record.id, None, record)
        return record

    async def get(self, site_id: str) -> SiteRecord:
        return await self._store.get(site_id)

    async def page(self, limit: int, offset: int, search: str | None = None) -> tuple[list[SiteRecord], int]:
        return await self._store.page(limit, offset, search)

    async def replace(self, site_id: str, spec: SiteSpec) -> SiteRecord:
        before = await self._store.get(site_id)
        after = await self._store.replace(site_id, spec, utcnow())
        await self._changed("updated", site_id, before, after)
        return after

    async def delete(self, site_id: str, *, force: bool = False) -> list[str]:
        """Delete a site; the devices it was taken from (a site in use needs `force`)."""
        before = await self._store.get(site_id)
        detached = await self._store.delete(site_id, utcnow(), force=force)
        await self._changed("deleted", site_id, before, None, force=force, detached_device_ids=detached)
        return detached

    async def _changed(
        self,
        action: str,
        site_id: str,
        before: SiteRecord | None = None,
        after: SiteRecord | None = None,
        **detail: object,
    ) -> None:
        log.info(
            f"site.{action}",
            site_id=site_id,
            **{k: v for k, v in detail.items() if k != "detached_device_ids"},
        )
        await self._audit.record(
            f"site.{action}", "site", site_id, before=_audited(before), after=_audited(after), **detail
        )
