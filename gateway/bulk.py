"""Registering many devices at once (``POST /api/v1/devices:bulk``, ``gateway devices import``).

Receives up to `MAX_ROWS` rows, each a JSON object with ``name``, an optional ``id`` and
the detail fields of `gateway.core.device_fields` (``description``, ``tags``,
``location_ids``, ``metadata``, ``settings``, ``profile_id``). Every row is checked first,
by the rules of a single registration and of a change of its details (sites and profile
exist, settings conform), plus two of its own: no id twice in one request, no id already
registered. Then the good rows are registered in order, all in one transaction
(`DeviceService.register_many`: a commit per request, not several per device), and every
device gets its audit entry and its ``device`` event as if registered alone. Hands back
each row's one-time registration token, or its error (row number, id, code, reason).

All or nothing against bad input: unless `continue_on_error`, one bad row means nothing is
registered and every bad row is reported (`RowsRejected`). What the checks cannot foresee
(the same id registered by someone else in between) undoes the transaction; the rows are
then registered one by one, so that only that row fails while the others carry on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.core import device_fields
from gateway.core.ids import DeviceId
from gateway.devices import DeviceService, Registration, clean_name
from gateway.errors import Conflict, GatewayError, InvalidValue, RowsRejected
from gateway.logs import get_logger

log = get_logger("gateway.bulk")

MAX_ROWS = 1000
ROW_FIELDS = ("name", "id", *device_fields.DETAIL_FIELDS)


@dataclass(frozen=True, slots=True)
class DeviceRow:
    row: int  # 1-based position in the request
    name: str
    device_id: str | None  # None: the gateway makes one
    details: dict[str, object]


@dataclass(frozen=True, slots=True)
class RowError:
    row: int
    device_id: str | None
    code: str
    message: str

    def as_dict(self) -> dict[str, object]:
        return {"row": self.row, "id": self.device_id, "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class RowRegistered:
    row: int
    registration: Registration


@dataclass(frozen=True, slots=True)
class BulkResult:
    registered: list[RowRegistered]
    errors: list[RowError]
    dry_run: bool


def parse_row(raw: object, row: int) -> DeviceRow:
    """One row as a registration would take it; `InvalidValue` names the first problem."""
    if not isinstance(raw, Mapping):
        raise InvalidValue("not a JSON object", code="invalid_row")
    unknown = sorted(str(key) for key in raw if key not in ROW_FIELDS)
    if unknown:
        raise InvalidValue(
            f"unknown field(s) {', '.join(unknown)}; known: {', '.join(ROW_FIELDS)}", code="invalid_field"
        )
    if raw.get("name") is None:
        raise InvalidValue("name is required", code="invalid_name")
    name = clean_name(raw["name"])
    given_id = raw.get("id")
    device_id = None if given_id is None or given_id == "" else DeviceId(given_id).value
    details = device_fields.parse_details(
        {key: raw[key] for key in device_fields.DETAIL_FIELDS if key in raw}
    )
    return DeviceRow(row, name, device_id, details)


def _given_id(raw: object) -> str | None:
    value = raw.get("id") if isinstance(raw, Mapping) else None
    return value if isinstance(value, str) and value else None


async def check(devices: DeviceService, rows: Sequence[object]) -> tuple[list[DeviceRow], list[RowError]]:
    """The rows that can be registered and the errors of the others, by row number."""
    if len(rows) > MAX_ROWS:
        raise InvalidValue(
            f"{len(rows)} rows: at most {MAX_ROWS} per request (split the file; the CLI does)",
            code="too_many_rows",
        )
    good: list[DeviceRow] = []
    errors: list[RowError] = []
    first_row: dict[str, int] = {}
    for number, raw in enumerate(rows, start=1):
        try:
            parsed = parse_row(raw, number)
        except InvalidValue as exc:
            errors.append(RowError(number, _given_id(raw), exc.code, exc.message))
            continue
        try:
            details = await devices.check_new_details(parsed.device_id, parsed.name, parsed.details)
        except GatewayError as exc:
            errors.append(RowError(number, parsed.device_id, exc.code, exc.message))
            continue
        parsed = dataclasses.replace(parsed, details=details)
        if parsed.device_id is not None:
            if parsed.device_id in first_row:
                errors.append(
                    RowError(
                        number,
                        parsed.device_id,
                        "duplicate_id",
                        f"id {parsed.device_id} is also in row {first_row[parsed.device_id]}",
                    )
                )
                continue
            first_row[parsed.device_id] = number
        good.append(parsed)
    existing = await devices.existing([row.device_id for row in good if row.device_id is not None])
    for row in good:
        if row.device_id in existing:
            errors.append(
                RowError(row.row, row.device_id, "device_exists", f"device {row.device_id} already exists")
            )
    good = [row for row in good if row.device_id not in existing]
    return good, sorted(errors, key=lambda error: error.row)


async def register_many(
    devices: DeviceService, rows: Sequence[object], *, continue_on_error: bool = False, dry_run: bool = False
) -> BulkResult:
    """Check every row, then (unless `dry_run`) register the good ones: see the module docstring."""
    good, errors = await check(devices, rows)
    if errors and not continue_on_error:
        raise RowsRejected(
            f"{len(errors)} of {len(rows)} row(s) invalid; nothing was registered",
            rows=[error.as_dict() for error in errors],
        )
    if dry_run:
        return BulkResult([], errors, dry_run=True)
    registered: list[RowRegistered] = []
    try:
        batch = await devices.register_many([(row.name, row.device_id, row.details) for row in good])
    except Conflict:  # an id registered meanwhile: nothing was; one at a time finds which
        for row in good:
            try:
                [registration] = await devices.register_many([(row.name, row.device_id, row.details)])
            except GatewayError as exc:
                errors.append(RowError(row.row, row.device_id, exc.code, exc.message))
            else:
                registered.append(RowRegistered(row.row, registration))
    else:
        registered = [RowRegistered(row.row, r) for row, r in zip(good, batch, strict=True)]
    errors.sort(key=lambda error: error.row)
    log.info("device.bulk_registered", rows=len(rows), registered=len(registered), failed=len(errors))
    return BulkResult(registered, errors, dry_run=False)
