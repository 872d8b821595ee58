"""Device data payloads: the bytes of a ``devices/{id}/{channel}`` PUBLISH in, frozen values out.

Receives a `Channel`, the raw payload and the moment the gateway received it
(UTC-aware; nothing here reads a clock). Hands on, per DESIGN.md §7:

- ``readings``: ``list[Reading]``, from one reading object, an array of them, or a
  SenML pack (RFC 8428 JSON). The form is told apart once, here: an object is one
  reading; an array whose records carry a SenML key and no ``"sensor"`` is SenML;
  any other array is readings; an array holding both forms is refused.
- ``health``: one `Health` report; keys beyond the contract are kept in ``extra``.
- ``info``: one `DeviceInfo` update naming only the fields the device sent.
- ``components``: ``list[Component]``, each with its `SensorSpec` tuple.

JSON types are taken strictly (``"21.5"`` is a string value, ``true`` never 1). A JSON
``null`` stands for an absent optional field (``unit``, ``ts``, ``component``,
``battery_pct``, ``profile``), except in info, where every field sent must be a string.

Every value object checks its own fields at construction (the rules live in the
``_check_*`` helpers below, one per rule), so code further in never re-validates.
Every refusal is an `InvalidValue` whose message says what and where
(``record 3: "value" must be a number, boolean or string``) and whose ``code`` is one of:

    bad_json          not UTF-8, not JSON, a JSON constant (NaN, Infinity) or nested too deeply
    wrong_type        a JSON value of the wrong type ("21.5" where a number belongs)
    missing_field     a required key is absent
    unknown_field     a key the contract does not define (readings, info, components)
    bad_value         right type, wrong value: range, length, characters, non-finite, duplicate
    bad_timestamp     not ISO 8601 or epoch seconds, before 2000-01-01, or over a day after receipt
    too_many_records  over a limit: 1,000 readings, 100 components, 200 sensors, 50 extra health keys
    empty             nothing to ingest: an empty array, an info update naming no field
    bad_senml         a pack RFC 8428 refuses (no value, two values, bver) or that we do not store (vd)
    mixed_forms       one array holding both readings and SenML records

Nothing else escapes: decoding errors, recursion from deep nesting and overflow
from absurd numbers are mapped at this seam (``raise ... from exc``).
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, NoReturn

from gateway.errors import InvalidValue

ValueType = Literal["number", "boolean", "string"]
# The codes of the module docstring; `InvalidValue.code` is always one of them.
ERROR_CODES: Final = frozenset(
    {"bad_json", "wrong_type", "missing_field", "unknown_field", "bad_value", "bad_timestamp"}
    | {"too_many_records", "empty", "bad_senml", "mixed_forms"}
)

MAX_RECORDS: Final = 1000
MAX_NAME: Final = 128
MAX_UNIT: Final = 32
MAX_STRING_VALUE: Final = 1024
MAX_INFO_VALUE: Final = 200
MAX_CONNECTION_TYPE: Final = 32
MAX_EXTRA_KEYS: Final = 50
MAX_EXTRA_DEPTH: Final = 8
MAX_COMPONENTS: Final = 100
MAX_SENSORS: Final = 200
MAX_TS_TEXT: Final = 64
EARLIEST: Final = datetime(2000, 1, 1, tzinfo=UTC)
MAX_AHEAD: Final = timedelta(days=1)
SENML_RELATIVE: Final = 2**28  # RFC 8428 §4.5.3: smaller times are relative to "now"
SENML_VERSION: Final = 10

_EARLIEST_S: Final = EARLIEST.timestamp()
_INT64_MAX: Final = 2**63 - 1  # health counters land in BIGINT columns
_FLOAT_MAX: Final = sys.float_info.max  # numeric readings are stored as floats

# The one table saying which JSON scalars a reading may carry (bool before int: it is one).
_VALUE_TYPES: Final[dict[type, ValueType]] = {bool: "boolean", int: "number", float: "number", str: "string"}
VALUE_TYPES: Final = frozenset(_VALUE_TYPES.values())
INFO_FIELDS: Final = (
    "application",
    "application_version",
    "os",
    "os_version",
    "manufacturer",
    "model",
    "firmware_version",
)
HEALTH_REQUIRED: Final = (
    "uptime_s",
    "free_heap_bytes",
    "rssi_dbm",
    "connection_type",
    "readings_sent",
    "readings_dropped",
)
_HEALTH_FIELDS: Final = frozenset({*HEALTH_REQUIRED, "battery_pct", "ts"})
_READING_KEYS: Final = frozenset({"sensor", "value", "unit", "ts", "component"})
_COMPONENT_KEYS: Final = frozenset({"id", "profile", "sensors"})
_SENSOR_KEYS: Final = frozenset({"name", "value_type", "unit"})
# Any of these in a record (without "sensor") marks the array as a SenML pack.
SENML_KEYS: Final = frozenset(
    {"bn", "bt", "bu", "bv", "bs", "bver", "n", "u", "v", "vs", "vb", "vd", "s", "t", "ut"}
)
_SENML_VALUES: Final = ("v", "vs", "vb", "vd")


# --- field rules: one function per rule --------------------------------------------------


def _quoted(names: Iterable[str], limit: int = 5) -> str:
    """Device-chosen names for a message: JSON-escaped to ASCII, shortened, at most `limit` of them."""
    items = sorted(map(str, names))
    shown = ", ".join(json.dumps(name if len(name) <= 40 else name[:37] + "...") for name in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_text(name: str, value: object, min_len: int, max_len: int) -> None:
    """Names, units, labels: printable (no control characters, no lone surrogates), bounded."""
    if not isinstance(value, str):
        raise InvalidValue(f'"{name}" must be a string', code="wrong_type")
    if not min_len <= len(value) <= max_len or not value.isprintable():
        raise InvalidValue(f'"{name}" must be {min_len}-{max_len} printable characters', code="bad_value")


def _storable(text: str) -> bool:
    """Free text must survive UTF-8 and PostgreSQL: no NUL, no unpaired surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_number(name: str, value: object, low: float = -_FLOAT_MAX, high: float = _FLOAT_MAX) -> None:
    """A JSON number (never a bool), finite, within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidValue(f'"{name}" must be a number', code="wrong_type")
    if not low <= value <= high:  # also refuses NaN and +-inf
        default = (low, high) == (-_FLOAT_MAX, _FLOAT_MAX)
        bounds = " within float range" if default else f" in [{low:g}, {high:g}]"
        raise InvalidValue(f'"{name}" must be a finite number{bounds}', code="bad_value")


def _check_count(name: str, value: object) -> None:
    """A JSON integer (never a bool or 1.0) in [0, 2**63 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f'"{name}" must be an integer', code="wrong_type")
    if not 0 <= value <= _INT64_MAX:
        raise InvalidValue(f'"{name}" must be between 0 and 2**63 - 1', code="bad_value")


def value_type_of(value: object) -> ValueType:
    """The reading type of a JSON scalar: ``"21.5"`` is a string, ``true`` a boolean."""
    kind = _VALUE_TYPES.get(type(value))
    if kind is None:
        raise InvalidValue('"value" must be a number, boolean or string', code="wrong_type")
    return kind


def _check_value(value: object, value_type: str) -> None:
    kind = value_type_of(value)
    if kind != value_type:
        raise InvalidValue(f'"value_type" {value_type!r} does not match a {kind} value', code="bad_value")
    if isinstance(value, str):
        if len(value) > MAX_STRING_VALUE or not _storable(value):
            raise InvalidValue(
                f'"value" must be at most {MAX_STRING_VALUE} characters, without NUL or lone surrogates',
                code="bad_value",
            )
    elif kind == "number":
        _check_number("value", value)


def _check_moment(name: str, value: object) -> None:
    if not isinstance(value, datetime):
        raise InvalidValue(f'"{name}" must be a datetime', code="wrong_type")
    if value.utcoffset() is None:
        raise InvalidValue(f'"{name}" must be timezone-aware', code="bad_value")


def _check_json(where: str, value: object, depth: int) -> None:
    """Extra health data: JSON-able (finite numbers, storable strings), at most MAX_EXTRA_DEPTH deep."""
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        _check_number(where, value)
    elif isinstance(value, str):
        if not _storable(value):
            raise InvalidValue(f'"{where}" must not contain NUL or lone surrogates', code="bad_value")
    elif isinstance(value, list | dict):
        if depth >= MAX_EXTRA_DEPTH:
            raise InvalidValue(f'"{where}" is nested deeper than {MAX_EXTRA_DEPTH} levels', code="bad_value")
        if isinstance(value, list):
            for index, item in enumerate(value):
                _check_json(f"{where}[{index}]", item, depth + 1)
        else:
            for key, item in value.items():
                _check_text(f"key in {where}", key, 0, MAX_NAME)  # keys end up in messages
                _check_json(f"{where}.{key}", item, depth + 1)
    else:
        raise InvalidValue(f'"{where}" is not a JSON value', code="wrong_type")


# --- the values handed on ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """One measurement: sensor (and component) name, typed value, unit, UTC-aware time."""

    sensor: str
    component: str | None
    value: float | int | bool | str
    value_type: ValueType
    unit: str | None
    ts: datetime

    def __post_init__(self) -> None:
        _check_text("sensor", self.sensor, 1, MAX_NAME)
        if self.component is not None:
            _check_text("component", self.component, 1, MAX_NAME)
        _check_value(self.value, self.value_type)
        if self.unit is not None:
            _check_text("unit", self.unit, 1, MAX_UNIT)
        _check_moment("ts", self.ts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """A device's health report; keys beyond the contract are kept, checked, in ``extra``."""

    uptime_s: float
    free_heap_bytes: int
    rssi_dbm: float
    connection_type: str
    readings_sent: int
    readings_dropped: int
    battery_pct: float | None = None
    ts: datetime
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_number("uptime_s", self.uptime_s, 0)
        _check_count("free_heap_bytes", self.free_heap_bytes)
        _check_number("rssi_dbm", self.rssi_dbm, -150, 0)
        _check_text("connection_type", self.connection_type, 1, MAX_CONNECTION_TYPE)
        _check_count("readings_sent", self.readings_sent)
        _check_count("readings_dropped", self.readings_dropped)
        if self.battery_pct is not None:
            _check_number("battery_pct", self.battery_pct, 0, 100)
        _check_moment("ts", self.ts)
        if not isinstance(self.extra, dict):
            raise InvalidValue('"extra" must be a dict', code="wrong_type")
        if len(self.extra) > MAX_EXTRA_KEYS:
            raise InvalidValue(
                f"{len(self.extra)} extra keys; at most {MAX_EXTRA_KEYS} are kept", code="too_many_records"
            )
        for key, item in self.extra.items():
            _check_text("extra key", key, 1, MAX_NAME)
            if key in _HEALTH_FIELDS:
                raise InvalidValue(f'extra key "{key}" is a contract field', code="bad_value")
            _check_json(key, item, 0)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A partial update of the device record: only the fields the device sent."""

    fields: dict[str, str] = field(hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.fields, dict):
            raise InvalidValue("device info must be a JSON object", code="wrong_type")
        if not self.fields.keys() <= set(INFO_FIELDS):
            unknown = _quoted(self.fields.keys() - set(INFO_FIELDS))
            raise InvalidValue(
                f"unknown field(s) {unknown}; allowed: {', '.join(INFO_FIELDS)}", code="unknown_field"
            )
        if not self.fields:
            raise InvalidValue(f"device info names none of {', '.join(INFO_FIELDS)}", code="empty")
        for key, value in self.fields.items():
            _check_text(key, value, 0, MAX_INFO_VALUE)


@dataclass(frozen=True, slots=True)
class SensorSpec:
    """A sensor a component declares: name, value type and optional unit."""

    name: str
    value_type: ValueType
    unit: str | None = None

    def __post_init__(self) -> None:
        _check_text("name", self.name, 1, MAX_NAME)
        if not isinstance(self.value_type, str):
            raise InvalidValue('"value_type" must be a string', code="wrong_type")
        if self.value_type not in VALUE_TYPES:
            raise InvalidValue('"value_type" must be "number", "boolean" or "string"', code="bad_value")
        if self.unit is not None:
            _check_text("unit", self.unit, 1, MAX_UNIT)


@dataclass(frozen=True, slots=True)
class Component:
    """A part of a device (a board, a port) and the sensors it carries, names unique."""

    id: str
    profile: str | None
    sensors: tuple[SensorSpec, ...]

    def __post_init__(self) -> None:
        _check_text("id", self.id, 1, MAX_NAME)
        if self.profile is not None:
            _check_text("profile", self.profile, 1, MAX_NAME)
        if not isinstance(self.sensors, tuple) or not all(isinstance(s, SensorSpec) for s in self.sensors):
            raise InvalidValue('"sensors" must be a tuple of SensorSpec', code="wrong_type")
        if len(self.sensors) > MAX_SENSORS:
            raise InvalidValue(
                f"{len(self.sensors)} sensors; at most {MAX_SENSORS} per component", code="too_many_records"
            )
        seen: set[str] = set()
        for spec in self.sensors:
            if spec.name in seen:
                raise InvalidValue(f'duplicate sensor name "{spec.name}"', code="bad_value")
            seen.add(spec.name)


Parsed = list[Reading] | Health | DeviceInfo | list[Component]


class Channel(enum.Enum):
    """The device-published channels under ``devices/{id}/``."""

    READINGS = "readings"
    HEALTH = "health"
    INFO = "info"
    COMPONENTS = "components"


_CHANNELS: Final = {channel.value: channel for channel in Channel}


def channel_of(topic_levels: list[str]) -> Channel | None:
    """The channel of ``devices/{id}/{channel}``, or None for any other topic."""
    if len(topic_levels) != 3 or topic_levels[0] != "devices" or not topic_levels[1]:
        return None
    return _CHANNELS.get(topic_levels[2])


# --- decoding --------------------------------------------------------------------------------


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"JSON constant {name} is not allowed")


# Built once: json.loads with any keyword argument builds a new decoder per call (~1 us).
_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def _load(payload: bytes) -> Any:
    try:
        return _DECODER.decode(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidValue(
            f"payload is not UTF-8: {exc.reason} at byte {exc.start}", code="bad_json"
        ) from exc
    except RecursionError as exc:
        raise InvalidValue("payload JSON is nested too deeply", code="bad_json") from exc
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers over 4300 digits
        raise InvalidValue(f"payload is not JSON: {exc}", code="bad_json") from exc


def _located(where: str, exc: InvalidValue) -> InvalidValue:
    return InvalidValue(f"{where}: {exc.message}", code=exc.code)


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidValue(f"{what} must be a JSON object", code="wrong_type")
    return value


def _check_keys(record: dict[str, Any], allowed: frozenset[str] | None, required: tuple[str, ...]) -> None:
    """Unknown keys (unless `allowed` is None: all are welcome) first, then missing ones."""
    if allowed is not None and not record.keys() <= allowed:
        unknown = _quoted(record.keys() - allowed)
        raise InvalidValue(f"unknown field(s) {unknown}", code="unknown_field")
    missing = [key for key in required if key not in record]
    if missing:
        raise InvalidValue(", ".join(f'"{key}"' for key in missing) + " required", code="missing_field")


class _Window:
    """The receive time and the accepted span of device times: [2000-01-01, received + 1 day]."""

    __slots__ = ("_bounds", "now")

    def __init__(self, received_at: datetime) -> None:
        if received_at.utcoffset() is None:
            raise ValueError("received_at must be timezone-aware")  # a caller bug, not device input
        self.now = received_at
        self._bounds: tuple[float, datetime, float] | None = None

    def bounds(self) -> tuple[float, datetime, float]:
        """(receipt, latest accepted moment, its epoch seconds), computed once, when a time is given."""
        if self._bounds is None:
            now_s = self.now.timestamp()
            self._bounds = (now_s, self.now + MAX_AHEAD, now_s + MAX_AHEAD.total_seconds())
        return self._bounds

    def _outside(self, name: str, raw: object, relative: str = "") -> InvalidValue:
        shown = repr(raw) if len(repr(raw)) <= 32 else repr(raw)[:29] + "..."  # ints may be huge
        return InvalidValue(
            f'"{name}" {shown}{relative} is outside 2000-01-01 .. receipt + 1 day',
            code="bad_timestamp",
        )

    def moment(self, name: str, raw: object) -> datetime:
        """An ISO 8601 string (naive means UTC) or epoch seconds, as a UTC datetime."""
        if isinstance(raw, str):
            if len(raw) > MAX_TS_TEXT:
                raise InvalidValue(f'"{name}" is longer than {MAX_TS_TEXT} characters', code="bad_timestamp")
            try:
                parsed = datetime.fromisoformat(raw)
            except ValueError as exc:
                raise InvalidValue(f'"{name}" {raw!r} is not ISO 8601', code="bad_timestamp") from exc
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            # Compared before converting: astimezone overflows near years 1 and 9999.
            if not EARLIEST <= parsed <= self.bounds()[1]:
                raise self._outside(name, raw)
            return parsed.astimezone(UTC)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise InvalidValue(f'"{name}" must be an ISO 8601 string or epoch seconds', code="wrong_type")
        return self.epoch(name, raw)

    def epoch(self, name: str, seconds: float) -> datetime:
        if not _EARLIEST_S <= seconds <= self.bounds()[2]:  # also refuses NaN, inf and huge ints
            raise self._outside(name, seconds)
        return datetime.fromtimestamp(seconds, UTC)

    def senml(self, seconds: float) -> datetime:
        """RFC 8428 §4.5.3: below 2**28 the time is relative to receipt, else epoch seconds."""
        if seconds >= SENML_RELATIVE:
            return self.epoch("bt + t", seconds)
        if seconds == 0:
            return self.now
        # Bounds moved to the relative scale: adding a huge int to a float would overflow.
        if not _EARLIEST_S - self.bounds()[0] <= seconds <= MAX_AHEAD.total_seconds():
            raise self._outside("bt + t", seconds, " s after receipt")
        return self.now + timedelta(seconds=seconds)


# --- readings ---------------------------------------------------------------------------------


def _reading(record: dict[str, Any], window: _Window) -> Reading:
    _check_keys(record, _READING_KEYS, ("sensor", "value"))
    value = record["value"]
    ts = record.get("ts")
    return Reading(
        sensor=record["sensor"],
        component=record.get("component"),
        value=value,
        value_type=value_type_of(value),
        unit=record.get("unit"),
        ts=window.now if ts is None else window.moment("ts", ts),
    )


class _SenmlBase:
    """The base fields in force while resolving a pack (RFC 8428 §4.6): they carry forward."""

    __slots__ = ("name", "time", "unit", "value", "version")

    def __init__(self) -> None:
        self.name = ""
        self.time: float = 0
        self.unit: str | None = None
        self.value: float | None = None
        self.version: int | None = None

    def resolve(self, record: dict[str, Any], window: _Window) -> Reading:
        for key in record:
            if key.endswith("_"):  # RFC 8428 §4.4: must-understand fields we do not understand
                raise InvalidValue(f'must-understand field "{key}" is not supported', code="bad_senml")
        if "bver" in record:
            self._version(record["bver"])
        if "bn" in record:
            _check_text("bn", record["bn"], 0, MAX_NAME)
            self.name = record["bn"]
        if "bt" in record:
            _check_number("bt", record["bt"])
            self.time = record["bt"]
        if "bu" in record:
            _check_text("bu", record["bu"], 1, MAX_UNIT)
            self.unit = record["bu"]
        if "bv" in record:
            _check_number("bv", record["bv"])
            self.value = record["bv"]
        name = self.name
        if "n" in record:
            _check_text("n", record["n"], 0, MAX_NAME)
            name += record["n"]
        if not name:
            raise InvalidValue('no name: "n" or "bn" is required', code="bad_senml")
        _check_text("name (bn + n)", name, 1, MAX_NAME)
        unit = self.unit
        if "u" in record:
            _check_text("u", record["u"], 1, MAX_UNIT)
            unit = record["u"]
        time = self.time
        if "t" in record:
            _check_number("t", record["t"])
            time += record["t"]
        value = self._value(record)
        return Reading(name, None, value, value_type_of(value), unit, window.senml(time))

    def _version(self, bver: object) -> None:
        if isinstance(bver, bool) or not isinstance(bver, int):
            raise InvalidValue('"bver" must be an integer', code="wrong_type")
        if not 1 <= bver <= SENML_VERSION:
            raise InvalidValue(f'"bver" {bver} is not supported (at most {SENML_VERSION})', code="bad_senml")
        if self.version is not None and bver != self.version:
            raise InvalidValue(
                f'"bver" {bver} differs from {self.version} earlier in the pack', code="bad_senml"
            )
        self.version = bver

    def _value(self, record: dict[str, Any]) -> float | int | bool | str:
        present = [key for key in _SENML_VALUES if key in record]
        if len(present) != 1:
            found = ", ".join(present) or "none"
            raise InvalidValue(f"exactly one of v, vs, vb is required (found {found})", code="bad_senml")
        key = present[0]
        raw = record[key]
        if key == "v":
            _check_number("v", raw)
            number: float = raw if self.value is None else self.value + raw
            return number
        if key == "vs":
            if not isinstance(raw, str):
                raise InvalidValue('"vs" must be a string', code="wrong_type")
            return raw
        if key == "vb":
            if not isinstance(raw, bool):
                raise InvalidValue('"vb" must be a boolean', code="wrong_type")
            return raw
        raise InvalidValue('data values ("vd") are not stored', code="bad_senml")


def _senml(pack: list[dict[str, Any]], window: _Window) -> list[Reading]:
    base = _SenmlBase()
    readings = []
    for index, record in enumerate(pack):
        try:
            readings.append(base.resolve(record, window))
        except InvalidValue as exc:
            raise _located(f"record {index}", exc) from exc
    return readings


def _readings(doc: Any, window: _Window) -> list[Reading]:
    if isinstance(doc, dict):  # the common case: one reading, kept cheap
        return [_reading(doc, window)]
    if not isinstance(doc, list):
        raise InvalidValue("readings must be a JSON object or array", code="wrong_type")
    if not doc:
        raise InvalidValue("readings array is empty", code="empty")
    if len(doc) > MAX_RECORDS:
        raise InvalidValue(f"{len(doc)} records; at most {MAX_RECORDS} per message", code="too_many_records")
    first_reading = first_senml = None
    for index, record in enumerate(doc):
        if not isinstance(record, dict):
            raise InvalidValue(f"record {index}: must be a JSON object", code="wrong_type")
        if "sensor" in record:
            first_reading = index if first_reading is None else first_reading
        elif first_senml is None and not SENML_KEYS.isdisjoint(record):
            first_senml = index
    if first_senml is not None:
        if first_reading is not None:
            raise InvalidValue(
                f"record {first_reading} is a reading and record {first_senml} a SenML record; "
                "one array holds one form",
                code="mixed_forms",
            )
        return _senml(doc, window)
    readings = []
    for index, record in enumerate(doc):
        try:
            readings.append(_reading(record, window))
        except InvalidValue as exc:
            raise _located(f"record {index}", exc) from exc
    return readings


# --- health, info, components -------------------------------------------------------------------


def _health(doc: Any, window: _Window) -> Health:
    record = _object(doc, "a health report")
    _check_keys(record, None, HEALTH_REQUIRED)
    ts = record.get("ts")
    return Health(
        uptime_s=record["uptime_s"],
        free_heap_bytes=record["free_heap_bytes"],
        rssi_dbm=record["rssi_dbm"],
        connection_type=record["connection_type"],
        readings_sent=record["readings_sent"],
        readings_dropped=record["readings_dropped"],
        battery_pct=record.get("battery_pct"),
        ts=window.now if ts is None else window.moment("ts", ts),
        extra={key: item for key, item in record.items() if key not in _HEALTH_FIELDS},
    )


def _info(doc: Any, _window: _Window) -> DeviceInfo:
    return DeviceInfo(dict(_object(doc, "device info")))


def _sensor_spec(raw: object) -> SensorSpec:
    record = _object(raw, "a sensor")
    _check_keys(record, _SENSOR_KEYS, ("name", "value_type"))
    return SensorSpec(record["name"], record["value_type"], record.get("unit"))


def _component(raw: object) -> Component:
    record = _object(raw, "a component")
    _check_keys(record, _COMPONENT_KEYS, ("id", "sensors"))
    sensors = record["sensors"]
    if not isinstance(sensors, list):
        raise InvalidValue('"sensors" must be a JSON array', code="wrong_type")
    if len(sensors) > MAX_SENSORS:
        raise InvalidValue(
            f"{len(sensors)} sensors; at most {MAX_SENSORS} per component", code="too_many_records"
        )
    specs = []
    for index, spec in enumerate(sensors):
        try:
            specs.append(_sensor_spec(spec))
        except InvalidValue as exc:
            raise _located(f"sensor {index}", exc) from exc
    return Component(record["id"], record.get("profile"), tuple(specs))


def _components(doc: Any, _window: _Window) -> list[Component]:
    if not isinstance(doc, list):
        raise InvalidValue("components must be a JSON array", code="wrong_type")
    if not doc:
        raise InvalidValue("components array is empty", code="empty")
    if len(doc) > MAX_COMPONENTS:
        raise InvalidValue(f"{len(doc)} components; at most {MAX_COMPONENTS}", code="too_many_records")
    components: list[Component] = []
    seen: set[str] = set()
    for index, raw in enumerate(doc):
        try:
            component = _component(raw)
        except InvalidValue as exc:
            raise _located(f"component {index}", exc) from exc
        if component.id in seen:
            raise InvalidValue(f'component {index}: duplicate id "{component.id}"', code="bad_value")
        seen.add(component.id)
        components.append(component)
    return components


_PARSERS: Final[dict[Channel, Callable[[Any, _Window], Parsed]]] = {
    Channel.READINGS: _readings,
    Channel.HEALTH: _health,
    Channel.INFO: _info,
    Channel.COMPONENTS: _components,
}


def parse(channel: Channel, payload: bytes, *, received_at: datetime) -> Parsed:
    """Decode and check one payload of `channel`; times default to and are bounded by `received_at`.

    Returns ``list[Reading]`` (readings), `Health`, `DeviceInfo` or ``list[Component]``;
    raises `InvalidValue` with a code from the module docstring, nothing else.
    A naive `received_at` is a caller bug and raises ValueError.
    """
    window = _Window(received_at)
    return _PARSERS[channel](_load(payload), window)
