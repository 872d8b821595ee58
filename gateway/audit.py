"""Who did what: the acting principal of the current request, and the audit trail.

Receives the actor from the API's authentication (``token:<name>``) or from a device
redeeming its registration token (``device:<id>``); anything else acts as ``system``.
The actor lives in a context variable for the duration of one request (and is bound
into the log context), so services record it without passing it through every call.
`Audit.record` appends an entry per operator action, with the record before and after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, is_dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import structlog

from gateway.core.clock import iso, utcnow
from gateway.core.records import AuditEntry
from gateway.logs import get_logger
from gateway.store.audit import AuditStore

log = get_logger("gateway.audit")

SYSTEM = "system"
_actor: ContextVar[str] = ContextVar("gateway_actor", default=SYSTEM)


def current_actor() -> str:
    return _actor.get()


def set_actor(actor: str) -> None:
    """Act as `actor` for the rest of this task (an API request); bound into its logs too."""
    _actor.set(actor)
    structlog.contextvars.bind_contextvars(actor=actor)


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    token = _actor.set(actor)
    try:
        with structlog.contextvars.bound_contextvars(actor=actor):
            yield
    finally:
        _actor.reset(token)


def snapshot(record: object, fields: tuple[str, ...] | None = None) -> dict[str, object] | None:
    """A JSON-able view of a record (a dataclass) for the audit trail: times as ISO, enums as values."""
    if record is None:
        return None
    if not is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"cannot snapshot {type(record).__name__}")
    raw = asdict(record)
    chosen = raw if fields is None else {key: raw[key] for key in fields if key in raw}
    return {key: _plain(value) for key, value in chosen.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return value


class Audit:
    def __init__(self, store: AuditStore) -> None:
        self._store = store

    async def record(
        self,
        action: str,
        target_type: str,
        target_id: str,
        *,
        before: dict[str, object] | None = None,
        after: dict[str, object] | None = None,
        **detail: object,
    ) -> None:
        """Append one entry. A failure is logged, never raised: the action already happened."""
        await self.record_many([entry(action, target_type, target_id, before=before, after=after, **detail)])

    async def record_many(self, entries: list[AuditEntry]) -> None:
        """Append entries (made by `entry`) in one transaction, as `record` appends one."""
        try:
            await self._store.append_many(entries, utcnow())
        except Exception:
            log.exception(
                "audit.append_failed",
                action=entries[0].action if entries else None,
                target_ids=[e.target_id for e in entries[:10]],
                entries=len(entries),
            )


def entry(
    action: str,
    target_type: str,
    target_id: str,
    *,
    before: dict[str, object] | None = None,
    after: dict[str, object] | None = None,
    **detail: object,
) -> AuditEntry:
    """An entry by the current actor (`current_actor`), detail values made JSON-able."""
    return AuditEntry(
        actor=current_actor(),
        action=action,
        target_type=target_type,
        target_id=target_id,
        before=before,
        after=after,
        detail={key: _plain(value) for key, value in detail.items()} or None,
    )
