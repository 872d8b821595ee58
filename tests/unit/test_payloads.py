"""Device payloads: readings (objects, arrays, SenML), health, info, components and every refusal."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import payloads
from gateway.core.payloads import (
    Channel,
    Component,
    DeviceInfo,
    Health,
    Reading,
    SensorSpec,
    channel_of,
    parse,
)
from gateway.errors import InvalidValue

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
NOW_S = int(NOW.timestamp())
HEALTH = {
    "uptime_s": 3600.5,
    "free_heap_bytes": 123_456,
    "rssi_dbm": -67,
    "connection_type": "wifi",
    "readings_sent": 42,
    "readings_dropped": 0,
}


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def readings(doc: Any) -> list[Reading]:
    result = parse(Channel.READINGS, encode(doc), received_at=NOW)
    assert isinstance(result, list)
    assert all(isinstance(item, Reading) for item in result)
    return result  # type: ignore[return-value]


def refusal(channel: Channel, payload: bytes | Any) -> InvalidValue:
    raw = payload if isinstance(payload, bytes) else encode(payload)
    with pytest.raises(InvalidValue) as info:
        parse(channel, raw, received_at=NOW)
    return info.value


# --- readings: plain objects and arrays ------------------------------------------------------


def test_single_reading_takes_defaults() -> None:
    """A bare reading gets the receive time and no unit or component."""
    assert readings({"sensor": "temp", "value": 21.5}) == [
        Reading(sensor="temp", component=None, value=21.5, value_type="number", unit=None, ts=NOW)
    ]


def test_array_of_readings_keeps_order_and_optional_fields() -> None:
    """Every field of every reading in an array is carried through, in order."""
    result = readings(
        [
            {"sensor": "temp", "value": 21, "unit": "C", "component": "board", "ts": NOW_S - 60},
            {"sensor": "door", "value": False},
            {"sensor": "state", "value": "idle", "unit": None, "ts": None},
        ]
    )
    assert [(r.sensor, r.component, r.value, r.value_type, r.unit) for r in result] == [
        ("temp", "board", 21, "number", "C"),
        ("door", None, False, "boolean", None),
        ("state", None, "idle", "string", None),
    ]
    assert [r.ts for r in result] == [NOW - timedelta(seconds=60), NOW, NOW]


@pytest.mark.parametrize(
    ("value", "value_type"),
    [
        ("21.5", "string"),
        (True, "boolean"),
        (0, "number"),
        (1, "number"),
        (-2.5e-3, "number"),
        ("", "string"),
    ],
)
def test_values_keep_their_json_type(value: object, value_type: str) -> None:
    """Types are strict: a quoted number stays a string and a bool is never 1 or 0."""
    (reading,) = readings({"sensor": "s", "value": value})
    assert reading.value == value
    assert type(reading.value) is type(value)
    assert reading.value_type == value_type


@given(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=200).filter(lambda text: "\x00" not in text),
    )
)
def test_any_valid_value_round_trips_exactly(value: bool | int | float | str) -> None:
    """Property: any finite number, bool or storable string comes back equal and of the same type."""
    (reading,) = readings({"sensor": "s", "value": value})
    assert type(reading.value) is type(value)
    assert reading.value == value


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2025-01-01T11:00:00Z", datetime(2025, 1, 1, 11, tzinfo=UTC)),
        ("2025-01-01T13:30:00+02:00", datetime(2025, 1, 1, 11, 30, tzinfo=UTC)),
        ("2025-01-01T11:00:00.250", datetime(2025, 1, 1, 11, 0, 0, 250_000, tzinfo=UTC)),
        ("2025-01-01 11:00:00-00:30", datetime(2025, 1, 1, 11, 30, tzinfo=UTC)),
        (NOW_S - 3600, datetime(2025, 1, 1, 11, tzinfo=UTC)),
        (NOW_S - 0.5, datetime(2025, 1, 1, 11, 59, 59, 500_000, tzinfo=UTC)),
        ("2000-01-01T00:00:00Z", datetime(2000, 1, 1, tzinfo=UTC)),
        (NOW_S + 86_400, NOW + timedelta(days=1)),
    ],
)
def test_timestamps_are_iso_or_epoch_and_end_up_utc(ts: object, expected: datetime) -> None:
    """ISO 8601 (offset, Z or naive as UTC) and epoch seconds all become UTC datetimes."""
    (reading,) = readings({"sensor": "s", "value": 1, "ts": ts})
    assert reading.ts == expected
    assert reading.ts.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "ts",
    [
        NOW_S + 86_401,
        "2025-01-02T12:00:01Z",
        "1999-12-31T23:59:59Z",
        946_684_799,
        0,
        -1,
        10**400,
        1e308,
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59-23:59",
        "yesterday",
        "2025-13-01T00:00:00Z",
        "2025-01-01T00:00:00Z" + " " * 60,
    ],
)
def test_timestamps_out_of_window_or_unreadable_are_refused(ts: object) -> None:
    """Times over a day ahead, before 2000, extreme or unreadable are bad_timestamp."""
    error = refusal(Channel.READINGS, {"sensor": "s", "value": 1, "ts": ts})
    assert error.code == "bad_timestamp"
    assert '"ts"' in error.message


@pytest.mark.parametrize("ts", [True, [], {}])
def test_timestamp_of_another_type_is_wrong_type(ts: object) -> None:
    """A ts that is neither a string nor a number is wrong_type."""
    assert refusal(Channel.READINGS, {"sensor": "s", "value": 1, "ts": ts}).code == "wrong_type"


def test_record_limit_is_one_thousand() -> None:
    """An array may carry 1,000 records; 1,001 is too_many_records, for both forms."""
    assert len(readings([{"sensor": f"s{i}", "value": i} for i in range(1000)])) == 1000
    assert len(readings([{"n": f"s{i}", "v": i} for i in range(1000)])) == 1000
    assert refusal(Channel.READINGS, [{"sensor": "s", "value": 1}] * 1001).code == "too_many_records"
    assert refusal(Channel.READINGS, [{"n": "s", "v": 1}] * 1001).code == "too_many_records"


# --- readings: SenML --------------------------------------------------------------------------


def test_senml_base_fields_resolve_per_rfc_8428() -> None:
    """bn + n, bt + t, bu and bv + v resolve, carry forward, and yield to u and later bases."""
    pack = [
        {
            "bn": "urn:dev:1:",
            "bt": NOW_S - 100,
            "bu": "Cel",
            "bv": 20,
            "bver": 10,
            "n": "temp",
            "v": 1.5,
            "t": 10,
        },
        {"n": "hum", "u": "%RH", "v": 30},
        {"n": "label", "vs": "ok", "t": 40},
        {"n": "door", "vb": True},
        {"bn": "urn:dev:2:", "bt": NOW_S, "n": "temp", "v": -1},
    ]
    assert [(r.sensor, r.value, r.value_type, r.unit, r.ts) for r in readings(pack)] == [
        ("urn:dev:1:temp", 21.5, "number", "Cel", NOW - timedelta(seconds=90)),
        ("urn:dev:1:hum", 50, "number", "%RH", NOW - timedelta(seconds=100)),
        ("urn:dev:1:label", "ok", "string", "Cel", NOW - timedelta(seconds=60)),
        ("urn:dev:1:door", True, "boolean", "Cel", NOW - timedelta(seconds=100)),
        ("urn:dev:2:temp", 19, "number", "Cel", NOW),
    ]
    assert all(r.component is None for r in readings(pack))


def test_senml_times_below_2_pow_28_are_relative_to_receipt() -> None:
    """No time means now, negative is the past and small positive is the near future."""
    pack = [{"n": "a", "v": 1}, {"n": "b", "v": 1, "t": -30.5}, {"n": "c", "v": 1, "t": 60}]
    pack.append({"bt": 2**28 - 1, "n": "d", "v": 1, "t": -(2**28 - 1) - 5})
    assert [r.ts for r in readings(pack)] == [
        NOW,
        NOW - timedelta(seconds=30.5),
        NOW + timedelta(seconds=60),
        NOW - timedelta(seconds=5),
    ]


def test_senml_name_may_come_from_bn_alone() -> None:
    """A record without n takes the base name as its whole name."""
    assert [r.sensor for r in readings([{"bn": "urn:dev:1:temp", "v": 1}])] == ["urn:dev:1:temp"]


def test_senml_ignores_fields_it_does_not_store() -> None:
    """Sums and update times (s, bs, ut) are accepted and not stored."""
    (reading,) = readings([{"n": "a", "v": 2, "s": 10, "bs": 1, "ut": 60}])
    assert (reading.sensor, reading.value) == ("a", 2)


@pytest.mark.parametrize(
    ("pack", "code", "fragment"),
    [
        ([{"n": "a"}], "bad_senml", "exactly one of v, vs, vb"),
        ([{"n": "a", "v": 1, "vs": "x"}], "bad_senml", "found v, vs"),
        ([{"n": "a", "vd": "aGk"}], "bad_senml", '"vd"'),
        ([{"n": "a", "v": 1, "foo_": 1}], "bad_senml", 'must-understand field "foo_"'),
        ([{"v": 1}], "bad_senml", 'no name: "n" or "bn"'),
        ([{"bver": 11, "n": "a", "v": 1}], "bad_senml", '"bver" 11'),
        (
            [{"bver": 10, "n": "a", "v": 1}, {"bver": 9, "n": "b", "v": 1}],
            "bad_senml",
            '"bver" 9 differs from 10',
        ),
        ([{"n": "a", "v": 1}, {"n": "b", "vs": 5}], "wrong_type", 'record 1: "vs" must be a string'),
        ([{"n": "a", "vb": 1}], "wrong_type", '"vb" must be a boolean'),
        ([{"n": "a", "v": "1"}], "wrong_type", '"v" must be a number'),
        ([{"n": "a", "v": True}], "wrong_type", '"v" must be a number'),
        ([{"n": 7, "v": 1}], "wrong_type", '"n" must be a string'),
        ([{"bt": "now", "n": "a", "v": 1}], "wrong_type", '"bt" must be a number'),
        ([{"bver": "10", "n": "a", "v": 1}], "wrong_type", '"bver"'),
        ([{"bv": 1e308, "n": "a", "v": 1e308}], "bad_value", '"value" must be a finite number'),
        ([{"n": "a\x07", "v": 1}], "bad_value", '"n" must be'),
        ([{"bn": "x" * 100, "n": "y" * 100, "v": 1}], "bad_value", "name (bn + n)"),
        ([{"n": "a", "u": "", "v": 1}], "bad_value", '"u" must be'),
        ([{"n": "a", "v": 1, "t": 100_000}], "bad_timestamp", "bt + t"),
        ([{"n": "a", "v": 1, "bt": 2**28}], "bad_timestamp", "bt + t"),
        ([{"n": "a", "v": 1, "t": -(10**400)}], "bad_value", '"t" must be a finite number'),
    ],
)
def test_senml_refusals_name_the_record_and_rule(
    pack: list[dict[str, Any]], code: str, fragment: str
) -> None:
    """Each broken SenML record is refused with its code and a message naming record and field."""
    error = refusal(Channel.READINGS, pack)
    assert error.code == code
    assert fragment in error.message
    assert error.message.startswith("record ")


# --- telling the forms apart --------------------------------------------------------------------


def test_mixing_readings_and_senml_in_one_array_is_refused() -> None:
    """An array with both forms is mixed_forms, whatever the order, naming both records."""
    error = refusal(Channel.READINGS, [{"n": "a", "v": 1}, {"sensor": "b", "value": 2}])
    assert error.code == "mixed_forms"
    assert "record 1 is a reading and record 0 a SenML record" in error.message
    assert refusal(Channel.READINGS, [{"sensor": "b", "value": 2}, {"bn": "x"}]).code == "mixed_forms"


def test_a_record_with_sensor_and_senml_keys_is_a_reading_with_unknown_fields() -> None:
    """A "sensor" key makes a record a reading, so SenML keys in it are unknown_field."""
    error = refusal(Channel.READINGS, [{"sensor": "a", "value": 1, "v": 2}])
    assert (error.code, error.message) == ("unknown_field", 'record 0: unknown field(s) "v"')


def test_an_object_is_always_a_single_reading() -> None:
    """A lone SenML-looking object is read as a reading and refused as one."""
    error = refusal(Channel.READINGS, {"n": "a", "v": 1})
    assert error.code == "unknown_field"


def test_records_of_neither_form_are_judged_as_readings() -> None:
    """An array with no SenML key is an array of readings, so a missing sensor is reported."""
    error = refusal(Channel.READINGS, [{"sensor": "a", "value": 1}, {"value": 2}])
    assert (error.code, error.message) == ("missing_field", 'record 1: "sensor" required')


# --- every error code, with where ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"\xff\xfe{}", "bad_json", "payload is not UTF-8"),
        (b'{"sensor": "a", "value": }', "bad_json", "payload is not JSON"),
        (b'{"sensor": "a", "value": NaN}', "bad_json", "JSON constant NaN"),
        (b'{"sensor": "a", "value": Infinity}', "bad_json", "JSON constant Infinity"),
        (b'{"sensor": "a", "value": -Infinity}', "bad_json", "JSON constant -Infinity"),
        (b"[" * 100_000 + b"]" * 100_000, "bad_json", "nested too deeply"),
        (b'{"sensor": "a", "value": ' + b"1" * 5000 + b"}", "bad_json", "payload is not JSON"),
        (b"", "bad_json", "payload is not JSON"),
        (b'"text"', "wrong_type", "readings must be a JSON object or array"),
        (b"[1]", "wrong_type", "record 0: must be a JSON object"),
        (
            b'[{"sensor":"a","value":1},{"sensor":"a","value":1},{"sensor":"a","value":1},'
            b'{"sensor":"a","value":null}]',
            "wrong_type",
            'record 3: "value" must be a number, boolean or string',
        ),
        (b'{"sensor": 5, "value": 1}', "wrong_type", '"sensor" must be a string'),
        (b'{"sensor": "a", "value": [1]}', "wrong_type", '"value" must be a number, boolean or string'),
        (b'{"value": 1}', "missing_field", '"sensor" required'),
        (b'{"sensor": "a"}', "missing_field", '"value" required'),
        (b'{"sensor": "a", "value": 1, "untis": "C"}', "unknown_field", 'unknown field(s) "untis"'),
        (b'{"sensor": "", "value": 1}', "bad_value", '"sensor" must be 1-128 printable characters'),
        (b'{"sensor": "a\\nb", "value": 1}', "bad_value", '"sensor" must be 1-128 printable'),
        (b'{"sensor": "a\\ud800", "value": 1}', "bad_value", '"sensor" must be 1-128 printable'),
        (encode({"sensor": "s" * 129, "value": 1}), "bad_value", '"sensor" must be 1-128'),
        (b'{"sensor": "a", "component": "", "value": 1}', "bad_value", '"component" must be 1-128'),
        (encode({"sensor": "a", "value": 1, "unit": "u" * 33}), "bad_value", '"unit" must be 1-32'),
        (encode({"sensor": "a", "value": "x" * 1025}), "bad_value", "at most 1024 characters"),
        (b'{"sensor": "a", "value": "a\\u0000b"}', "bad_value", "without NUL"),
        (b'{"sensor": "a", "value": "\\udc00"}', "bad_value", "lone surrogates"),
        (b'{"sensor": "a", "value": 1e400}', "bad_value", '"value" must be a finite number'),
        (encode({"sensor": "a", "value": 10**400}), "bad_value", '"value" must be a finite number'),
        (b'{"sensor": "a", "value": 1, "ts": "soon"}', "bad_timestamp", "is not ISO 8601"),
        (b"[]", "empty", "readings array is empty"),
    ],
)
def test_each_refusal_has_its_code_and_says_where(payload: bytes, code: str, message: str) -> None:
    """Every way a readings payload can fail maps to one documented code and a precise message."""
    error = refusal(Channel.READINGS, payload)
    assert error.code == code
    assert message in error.message


def test_messages_escape_device_chosen_names() -> None:
    """Unknown keys are shown JSON-escaped and few, so messages stay printable, UTF-8 and short."""
    error = refusal(Channel.READINGS, b'{"sensor": "a", "value": 1, "x\\ud800\\n": 1}')
    assert error.message == 'unknown field(s) "x\\ud800\\n"'
    error = refusal(Channel.INFO, {f"k{i}": "v" for i in range(20)})
    assert error.message.startswith('unknown field(s) "k0", "k1", "k10", "k11", "k12" and 15 more; allowed: ')


def test_documented_codes_are_the_error_codes() -> None:
    """The code table in the module docstring lists exactly ERROR_CODES."""
    doc = payloads.__doc__ or ""
    table = doc[doc.index("whose ``code`` is one of:") : doc.index("Nothing else escapes")]
    assert {line.split()[0] for line in table.splitlines()[1:] if line.strip()} == payloads.ERROR_CODES
    assert len(payloads.ERROR_CODES) == 10


def test_refusals_chain_the_foreign_cause() -> None:
    """Decoding errors are mapped at the seam with the original kept as __cause__."""
    assert isinstance(refusal(Channel.READINGS, b"{").__cause__, json.JSONDecodeError)
    assert isinstance(refusal(Channel.READINGS, b"\xff").__cause__, UnicodeDecodeError)
    assert isinstance(refusal(Channel.READINGS, b"[" * 100_000).__cause__, RecursionError)


# --- value objects --------------------------------------------------------------------------------


def test_value_objects_validate_at_construction() -> None:
    """Built in code, a Reading still refuses a mismatched type or a naive time."""
    with pytest.raises(InvalidValue) as info:
        Reading("s", None, "1", "number", None, NOW)
    assert info.value.code == "bad_value"
    with pytest.raises(InvalidValue) as info:
        Reading("s", None, 1, "number", None, datetime(2025, 1, 1))
    assert info.value.code == "bad_value"
    with pytest.raises(InvalidValue):
        SensorSpec("s", "float")  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        Component("c", None, (SensorSpec("s", "number"), SensorSpec("s", "string")))


def test_values_are_frozen() -> None:
    """Parsed values cannot be changed after the parser checked them."""
    (reading,) = readings({"sensor": "s", "value": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        reading.value = 2  # type: ignore[misc]


def test_naive_receive_time_is_a_caller_bug() -> None:
    """A naive received_at is refused with ValueError: the shell must pass UTC-aware time."""
    with pytest.raises(ValueError, match="timezone-aware"):
        parse(Channel.READINGS, b'{"sensor":"s","value":1}', received_at=datetime(2025, 1, 1))


# --- health -----------------------------------------------------------------------------------------


def test_health_keeps_fields_and_extras() -> None:
    """A full report is parsed field by field, and unknown keys are kept as JSON in extra."""
    report = parse(
        Channel.HEALTH,
        encode(
            {**HEALTH, "battery_pct": 87.5, "ts": "2025-01-01T11:59:00Z", "fw": {"slot": "a", "crc": [1, 2]}}
        ),
        received_at=NOW,
    )
    assert report == Health(
        uptime_s=3600.5,
        free_heap_bytes=123_456,
        rssi_dbm=-67,
        connection_type="wifi",
        readings_sent=42,
        readings_dropped=0,
        battery_pct=87.5,
        ts=datetime(2025, 1, 1, 11, 59, tzinfo=UTC),
        extra={"fw": {"slot": "a", "crc": [1, 2]}},
    )


def test_health_defaults_ts_and_battery() -> None:
    """Without ts and battery_pct the report is stamped with the receive time and no battery."""
    report = parse(Channel.HEALTH, encode(HEALTH), received_at=NOW)
    assert isinstance(report, Health)
    assert (report.ts, report.battery_pct, report.extra) == (NOW, None, {})


def test_health_requires_the_six_contract_fields() -> None:
    """Every missing required field is named in one missing_field refusal."""
    error = refusal(Channel.HEALTH, {"uptime_s": 1, "connection_type": "wifi"})
    assert error.code == "missing_field"
    assert error.message == '"free_heap_bytes", "rssi_dbm", "readings_sent", "readings_dropped" required'


@pytest.mark.parametrize(
    ("change", "code", "fragment"),
    [
        ({"uptime_s": "1"}, "wrong_type", '"uptime_s" must be a number'),
        ({"uptime_s": -1}, "bad_value", '"uptime_s" must be a finite number in [0, '),
        ({"free_heap_bytes": 1.0}, "wrong_type", '"free_heap_bytes" must be an integer'),
        ({"free_heap_bytes": True}, "wrong_type", '"free_heap_bytes" must be an integer'),
        ({"free_heap_bytes": 2**63}, "bad_value", '"free_heap_bytes" must be between 0 and 2**63 - 1'),
        ({"rssi_dbm": 1}, "bad_value", '"rssi_dbm" must be a finite number in [-150, 0]'),
        ({"rssi_dbm": -151}, "bad_value", '"rssi_dbm"'),
        ({"connection_type": ""}, "bad_value", '"connection_type" must be 1-32'),
        ({"connection_type": None}, "wrong_type", '"connection_type" must be a string'),
        ({"readings_sent": -1}, "bad_value", '"readings_sent"'),
        ({"readings_dropped": "0"}, "wrong_type", '"readings_dropped"'),
        ({"battery_pct": 100.5}, "bad_value", '"battery_pct" must be a finite number in [0, 100]'),
        ({"ts": NOW_S + 90_000}, "bad_timestamp", '"ts"'),
        ({"deep": [[[[[[[[[1]]]]]]]]]}, "bad_value", "nested deeper than 8 levels"),
        ({"note": "a\x00"}, "bad_value", '"note" must not contain NUL'),
        ({"": 1}, "bad_value", '"extra key" must be 1-128'),
        ({f"k{i}": i for i in range(51)}, "too_many_records", "51 extra keys; at most 50"),
    ],
)
def test_health_refusals(change: dict[str, Any], code: str, fragment: str) -> None:
    """Each health field is checked for type and range, and extras for size and depth."""
    error = refusal(Channel.HEALTH, {**HEALTH, **change})
    assert error.code == code
    assert fragment in error.message


def test_health_refuses_overflowing_numbers_in_extras() -> None:
    """A JSON number too large for a float (1e400) is refused in extras, not stored as Infinity."""
    error = refusal(Channel.HEALTH, encode(HEALTH)[:-1] + b', "extra": {"x": [1e400]}}')
    assert (error.code, error.message) == (
        "bad_value",
        '"extra.x[0]" must be a finite number within float range',
    )


def test_health_accepts_fifty_extras_nested_eight_deep() -> None:
    """The extra bounds are inclusive: 50 keys, 8 levels."""
    extra: dict[str, Any] = {f"k{i}": i for i in range(49)}
    extra["deep"] = [[[[[[[[1]]]]]]]]
    report = parse(Channel.HEALTH, encode({**HEALTH, **extra}), received_at=NOW)
    assert isinstance(report, Health)
    assert report.extra == extra


def test_health_must_be_an_object() -> None:
    """A health payload that is not an object is wrong_type."""
    assert refusal(Channel.HEALTH, [HEALTH]).code == "wrong_type"


# --- info -------------------------------------------------------------------------------------------


def test_info_is_a_partial_update() -> None:
    """Only the fields a device sends appear in the update."""
    info = parse(Channel.INFO, encode({"firmware_version": "1.4.2", "model": "ESP32-C6"}), received_at=NOW)
    assert info == DeviceInfo({"firmware_version": "1.4.2", "model": "ESP32-C6"})


def test_info_takes_all_seven_fields() -> None:
    """Every contract field is accepted together."""
    fields = {name: f"{name} value" for name in payloads.INFO_FIELDS}
    info = parse(Channel.INFO, encode(fields), received_at=NOW)
    assert isinstance(info, DeviceInfo)
    assert info.fields == fields


@pytest.mark.parametrize(
    ("doc", "code", "fragment"),
    [
        (
            {"os": "zephyr", "serial": "x"},
            "unknown_field",
            'unknown field(s) "serial"; allowed: application,',
        ),
        ({}, "empty", "names none of"),
        ({"os": None}, "wrong_type", '"os" must be a string'),
        ({"os": 3}, "wrong_type", '"os" must be a string'),
        ({"model": "m" * 201}, "bad_value", '"model" must be 0-200 printable'),
        ({"model": "line\nbreak"}, "bad_value", '"model"'),
        (["os"], "wrong_type", "device info must be a JSON object"),
    ],
)
def test_info_refusals(doc: Any, code: str, fragment: str) -> None:
    """Info refuses unknown keys, empty updates and non-string or overlong values."""
    error = refusal(Channel.INFO, doc)
    assert error.code == code
    assert fragment in error.message


# --- components ---------------------------------------------------------------------------------------


def test_components_declare_sensors() -> None:
    """Components carry their profile and sensor specs; optional parts default to None."""
    doc = [
        {
            "id": "board",
            "profile": "esp32",
            "sensors": [{"name": "temp", "value_type": "number", "unit": "C"}],
        },
        {
            "id": "relay-1",
            "sensors": [{"name": "on", "value_type": "boolean"}, {"name": "why", "value_type": "string"}],
        },
        {"id": "spare", "sensors": []},
    ]
    assert parse(Channel.COMPONENTS, encode(doc), received_at=NOW) == [
        Component("board", "esp32", (SensorSpec("temp", "number", "C"),)),
        Component("relay-1", None, (SensorSpec("on", "boolean"), SensorSpec("why", "string"))),
        Component("spare", None, ()),
    ]


@pytest.mark.parametrize(
    ("doc", "code", "fragment"),
    [
        ({"id": "a", "sensors": []}, "wrong_type", "components must be a JSON array"),
        ([], "empty", "components array is empty"),
        ([{"id": "a", "sensors": [], "kind": "x"}], "unknown_field", 'component 0: unknown field(s) "kind"'),
        ([{"id": "a"}], "missing_field", 'component 0: "sensors" required'),
        ([{"sensors": []}], "missing_field", 'component 0: "id" required'),
        ([{"id": "a", "sensors": {}}], "wrong_type", '"sensors" must be a JSON array'),
        (
            [{"id": "a", "sensors": [1]}],
            "wrong_type",
            "component 0: sensor 0: a sensor must be a JSON object",
        ),
        (
            [{"id": "a", "sensors": [{"name": "t", "value_type": "number", "min": 0}]}],
            "unknown_field",
            'component 0: sensor 0: unknown field(s) "min"',
        ),
        ([{"id": "a", "sensors": [{"name": "t"}]}], "missing_field", 'sensor 0: "value_type" required'),
        ([{"id": "a", "sensors": [{"name": "t", "value_type": "int"}]}], "bad_value", '"value_type" must be'),
        (
            [{"id": "a", "sensors": [{"name": "t", "value_type": 1}]}],
            "wrong_type",
            '"value_type" must be a string',
        ),
        ([{"id": "", "sensors": []}], "bad_value", '"id" must be 1-128'),
        ([{"id": "a", "profile": "", "sensors": []}], "bad_value", '"profile" must be 1-128'),
        (
            [{"id": "a", "sensors": []}, {"id": "a", "sensors": []}],
            "bad_value",
            'component 1: duplicate id "a"',
        ),
        ([{"id": f"c{i}", "sensors": []} for i in range(101)], "too_many_records", "101 components"),
        (
            [{"id": "a", "sensors": [{"name": f"s{i}", "value_type": "number"} for i in range(201)]}],
            "too_many_records",
            "201 sensors",
        ),
    ],
)
def test_component_refusals(doc: Any, code: str, fragment: str) -> None:
    """Component declarations refuse unknown keys, duplicates, bad types and oversize lists, saying where."""
    error = refusal(Channel.COMPONENTS, doc)
    assert error.code == code
    assert fragment in error.message


def test_component_limits_are_inclusive() -> None:
    """100 components of 200 sensors each are accepted."""
    sensors = [{"name": f"s{i}", "value_type": "number"} for i in range(200)]
    doc = [{"id": f"c{i}", "sensors": sensors} for i in range(100)]
    result = parse(Channel.COMPONENTS, encode(doc), received_at=NOW)
    assert isinstance(result, list)
    assert len(result) == 100
    assert all(isinstance(c, Component) and len(c.sensors) == 200 for c in result)


# --- channels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "channel"),
    [
        ("devices/dev-1/readings", Channel.READINGS),
        ("devices/dev-1/health", Channel.HEALTH),
        ("devices/dev-1/info", Channel.INFO),
        ("devices/dev-1/components", Channel.COMPONENTS),
        ("devices/dev-1/errors", None),
        ("devices/dev-1/readings/extra", None),
        ("devices//readings", None),
        ("gateway/dev-1/readings", None),
        ("devices/dev-1", None),
        ("devices/dev-1/Readings", None),
    ],
)
def test_channel_of_topic(topic: str, channel: Channel | None) -> None:
    """Only devices/{id}/{channel} with a known channel names a channel."""
    assert channel_of(topic.split("/")) is channel


# --- properties: returns a value of the right type or raises InvalidValue, nothing else ------------------

EXPECTED: dict[Channel, type] = {
    Channel.READINGS: Reading,
    Channel.HEALTH: Health,
    Channel.INFO: DeviceInfo,
    Channel.COMPONENTS: Component,
}
KEYS = sorted(
    {"sensor", "value", "unit", "ts", "component", "id", "profile", "sensors", "name", "value_type"}
    | payloads.SENML_KEYS
    | set(payloads.INFO_FIELDS)
    | set(payloads.HEALTH_REQUIRED)
    | {"battery_pct", "x_", "extra"}
)
INTERESTING = st.sampled_from(
    [
        "number",
        "boolean",
        "string",
        "wifi",
        "a",
        "2025-01-01T11:00:00Z",
        "2025-01-01T11:00:00+05:00",
        NOW_S,
        -60,
    ]
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | INTERESTING
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), children, max_size=8)
    ),
    max_leaves=40,
)


def outcome(channel: Channel, payload: bytes) -> payloads.Parsed | InvalidValue:
    try:
        return parse(channel, payload, received_at=NOW)
    except InvalidValue as exc:
        return exc


def check_outcome(channel: Channel, payload: bytes) -> None:
    result = outcome(channel, payload)
    if isinstance(result, InvalidValue):
        assert result.code in payloads.ERROR_CODES
        assert 0 < len(result.message) < 2000
        result.message.encode("utf-8")  # messages go to logs and MQTT: never a lone surrogate
        return
    items = result if isinstance(result, list) else [result]
    if isinstance(result, list):
        assert result
    assert all(isinstance(item, EXPECTED[channel]) for item in items)
    for item in items:
        if isinstance(item, Reading | Health):
            assert item.ts.tzinfo is not None
            assert datetime(2000, 1, 1, tzinfo=UTC) <= item.ts <= NOW + timedelta(days=1)


@given(st.sampled_from(Channel), st.binary(max_size=300))
def test_any_bytes_give_a_value_or_our_error(channel: Channel, payload: bytes) -> None:
    """Property: arbitrary bytes on any channel parse or raise InvalidValue, nothing else."""
    check_outcome(channel, payload)


@given(st.sampled_from(Channel), JSON)
def test_any_json_gives_a_value_or_our_error(channel: Channel, doc: Any) -> None:
    """Property: arbitrary JSON (biased to contract keys) on any channel parses or raises InvalidValue."""
    check_outcome(channel, json.dumps(doc).encode())


# Near-valid documents: the contract's shape, each field valid seven times in eight and any JSON
# otherwise, so the properties reach the deep checks (SenML bases, times, extras), not only the first refusal.
TIMES = (
    st.integers(NOW_S - 10**6, NOW_S + 10**6)
    | st.floats(-1e10, 1e10)
    | st.datetimes(
        min_value=datetime(1999, 12, 30),
        timezones=st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23))),
    ).map(datetime.isoformat)
    | st.datetimes(min_value=datetime(1999, 12, 30)).map(datetime.isoformat)
)
NAMES = st.text(min_size=1, max_size=12) | st.text(alphabet="ab:/", min_size=120, max_size=130)
UNITS = st.text(min_size=1, max_size=4) | st.text(alphabet="%", min_size=30, max_size=34)
FINITE = st.integers() | st.floats(allow_nan=False, allow_infinity=False)
VALUES = st.booleans() | FINITE | st.text(max_size=12)
ANY = SCALARS | TIMES


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 7).flatmap(lambda pick: ANY if pick == 0 else valid)


READING = st.fixed_dictionaries(
    {"sensor": mostly(NAMES), "value": mostly(VALUES)},
    optional={"unit": mostly(UNITS), "ts": mostly(TIMES), "component": mostly(NAMES)},
)
SENML_VALUE = {"v": FINITE, "vs": st.text(max_size=12), "vb": st.booleans(), "vd": st.text(max_size=4)}
SENML = st.tuples(
    st.fixed_dictionaries(
        {},
        optional={
            **dict.fromkeys(("bn", "n"), mostly(NAMES)),
            **dict.fromkeys(("bu", "u"), mostly(UNITS)),
            "bt": mostly(TIMES),
            "t": mostly(st.integers(-(10**5), 10**5) | st.floats(-1e5, 1e5)),
            "bv": mostly(FINITE),
            "bver": mostly(st.integers(8, 11)),
        },
    ),
    st.sampled_from(["v", "v", "vs", "vb", "vd"]).flatmap(
        lambda key: st.fixed_dictionaries({key: mostly(SENML_VALUE[key])})
    ),
).map(lambda parts: {**parts[0], **parts[1]})
HEALTHY = st.fixed_dictionaries(
    {key: mostly(st.just(value)) for key, value in HEALTH.items()},
    optional={"battery_pct": mostly(st.floats(-1, 101)), "ts": mostly(TIMES), "extra": JSON},
)
INFO = st.fixed_dictionaries({}, optional=dict.fromkeys(payloads.INFO_FIELDS, mostly(st.text(max_size=20))))
SENSOR = st.fixed_dictionaries(
    {"name": mostly(NAMES), "value_type": mostly(st.sampled_from(sorted(payloads.VALUE_TYPES)))},
    optional={"unit": mostly(UNITS)},
)
COMPONENT = st.fixed_dictionaries(
    {"id": mostly(NAMES), "sensors": st.lists(SENSOR, max_size=4)}, optional={"profile": mostly(NAMES)}
)
NEAR_VALID = st.one_of(
    st.tuples(st.just(Channel.READINGS), READING | st.lists(READING, min_size=1, max_size=4)),
    st.tuples(st.just(Channel.READINGS), st.lists(SENML, min_size=1, max_size=4)),
    st.tuples(st.just(Channel.READINGS), st.lists(READING | SENML, min_size=2, max_size=4)),
    st.tuples(st.just(Channel.HEALTH), HEALTHY),
    st.tuples(st.just(Channel.INFO), INFO),
    st.tuples(st.just(Channel.COMPONENTS), st.lists(COMPONENT, max_size=4)),
)


@given(NEAR_VALID)
def test_near_valid_documents_give_a_value_or_our_error(case: tuple[Channel, Any]) -> None:
    """Property: contract-shaped documents with arbitrary field values parse or raise InvalidValue."""
    channel, doc = case
    check_outcome(channel, json.dumps(doc).encode())


@pytest.mark.slow
def test_single_reading_parse_stays_cheap() -> None:
    """10,000 single readings parse in under a second (measured ~7 us each; the bound is 100 us)."""
    payload = b'{"sensor": "temperature", "value": 21.5, "unit": "C", "ts": 1735732000}'
    started = time.perf_counter()
    for _ in range(10_000):
        parse(Channel.READINGS, payload, received_at=NOW)
    assert time.perf_counter() - started < 1.0
