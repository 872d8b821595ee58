"""`--since`/`--until` of `gateway readings` and `gateway health`: ISO 8601 or a duration back from now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.cli.data import moment
from gateway.errors import InvalidValue

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2025-05-01T10:00:00Z", datetime(2025, 5, 1, 10, tzinfo=UTC), id="zulu"),
        pytest.param("2025-05-01T12:00+02:00", datetime(2025, 5, 1, 10, tzinfo=UTC), id="offset"),
        pytest.param("2025-05-01T10:00:00", datetime(2025, 5, 1, 10, tzinfo=UTC), id="naive-is-utc"),
        pytest.param("2025-05-01", datetime(2025, 5, 1, tzinfo=UTC), id="date"),
        pytest.param("1h", NOW - timedelta(hours=1), id="hour"),
        pytest.param("30m", NOW - timedelta(minutes=30), id="minutes"),
        pytest.param("7d", NOW - timedelta(days=7), id="days"),
        pytest.param(" 90s ", NOW - timedelta(seconds=90), id="seconds-padded"),
    ],
)
def test_moment_accepts_iso_and_durations(text: str, expected: datetime) -> None:
    """ISO 8601 (any offset, naive as UTC) and durations before now all become the same UTC instant."""
    found = moment(text, NOW)
    assert found == expected
    assert found.utcoffset() == UTC.utcoffset(None)


@pytest.mark.parametrize("text", ["yesterday", "", "1y", "-1h", "2025-13-01", "h"])
def test_moment_refuses_anything_else_naming_the_option(text: str) -> None:
    """Neither ISO 8601 nor a duration: an InvalidValue that names the option and shows both forms."""
    with pytest.raises(InvalidValue) as info:
        moment(text, NOW, "--until")
    assert info.value.code == "invalid_time"
    assert "--until" in info.value.message
    assert "ISO 8601" in info.value.message
    assert "1h" in info.value.message
