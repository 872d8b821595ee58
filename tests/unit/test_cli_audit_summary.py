"""The CHANGE column of `gateway audit` (`change_summary`) and the import's progress line."""

from __future__ import annotations

import io

import pytest

from gateway.cli import bulk
from gateway.cli.audit import change_summary


def test_changed_fields_before_and_after() -> None:
    """Only the fields that differ, as ``field: before -> after``; booleans and lists readable."""
    entry = {
        "before": {"id": "p", "name": "Pump", "blocked": False, "tags": ["a"], "certificate": None},
        "after": {
            "id": "p",
            "name": "Pump A",
            "blocked": True,
            "tags": ["a", "b"],
            "certificate": {"serial": "ab"},
        },
    }
    assert change_summary(entry, width=200) == (
        "name: Pump -> Pump A; blocked: no -> yes; tags: a -> a,b; certificate: - -> ab"
    )
    assert change_summary({"before": {"a": 1}, "after": {"a": 1}}) == "no change"


def test_created_deleted_and_detail_only() -> None:
    """A creation or deletion names the record; an entry without records shows its detail."""
    assert change_summary({"before": None, "after": {"name": "Pump"}}) == "created Pump"
    assert change_summary({"before": {"name": "Pump"}, "after": None}) == "deleted Pump"
    assert change_summary({"detail": {"certificate_serial": "0a1b", "renews": None}}) == (
        "certificate_serial=0a1b renews=-"
    )
    assert change_summary({}) == ""


def test_long_summaries_are_cut() -> None:
    """At most `width` characters, ending in an ellipsis."""
    entry = {"before": {"name": "a" * 100}, "after": {"name": "b" * 100}}
    text = change_summary(entry, width=40)
    assert len(text) == 40 and text.endswith("...")


@pytest.mark.parametrize("tty", [True, False])
def test_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    """``registered 10/25 rows`` rewritten in place on a terminal's stderr; nothing otherwise."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return tty

    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    progress = bulk.RowProgress("registered", 25)
    progress.advance(10)
    progress.advance(15)
    progress.close()
    redraw = "\r\x1b[K"  # back to the line's start, erase it
    expected = f"{redraw}registered 10/25 rows{redraw}registered 25/25 rows\n"
    assert err.getvalue() == (expected if tty else "")
