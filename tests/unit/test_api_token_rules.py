"""The rules of API tokens (`gateway.core.tokens`): names, scopes, references and state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import tokens
from gateway.errors import InvalidValue

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("name", ["admin", "ci-reader", "a", "Bot_2.prod", "x" * 64])
def test_good_names(name: str) -> None:
    """Letters first, then letters, digits, dot, dash, underscore; up to 64."""
    assert tokens.parse_name(name) == name


@pytest.mark.parametrize("name", ["", "1bot", "-x", "with space", "token:x", "x" * 65, "é", None, 5])
def test_bad_names(name: object) -> None:
    """Digits first (ids), spaces, colons (``token:<name>``), too long, not text: refused."""
    with pytest.raises(InvalidValue) as caught:
        tokens.parse_name(name)
    assert caught.value.code == "invalid_token_name"


@given(st.text(max_size=80))
def test_parse_name_returns_the_name_or_raises_ours(raw: str) -> None:
    """Any text: the name itself, or InvalidValue; never anything else."""
    try:
        assert tokens.parse_name(raw) == raw
    except InvalidValue:
        pass


def test_scopes() -> None:
    """Known scopes only, at least one; duplicates collapse."""
    assert tokens.parse_scopes([tokens.READ, tokens.READ]) == frozenset({tokens.READ})
    assert tokens.parse_scopes(["admin", "devices:write"]) == frozenset({tokens.ADMIN, tokens.WRITE})
    for bad in ([], ["devices:delete"], ["admin", "root"]):
        with pytest.raises(InvalidValue) as caught:
            tokens.parse_scopes(bad)
        assert caught.value.code == "invalid_scope"


def test_references_are_ids_or_names() -> None:
    """Digits are an id (a name never starts with one); anything else must be a name."""
    assert tokens.parse_ref("42") == 42
    assert tokens.parse_ref(" ci ") == "ci"
    with pytest.raises(InvalidValue):
        tokens.parse_ref("no such/name")
    for other_digits in ("\u00b2", "\u0661"):  # superscript two, Arabic-Indic one: not ids, not names
        with pytest.raises(InvalidValue):
            tokens.parse_ref(other_digits)


def test_state() -> None:
    """Revoked wins over expired; expiry is exclusive of the moment itself."""
    assert tokens.state(None, None, NOW) == "active"
    assert tokens.state(NOW + timedelta(seconds=1), None, NOW) == "active"
    assert tokens.state(NOW, None, NOW) == "expired"
    assert tokens.state(NOW - timedelta(days=1), NOW, NOW) == "revoked"


def test_scopes_imply() -> None:
    """admin implies write and read; write implies read; read only itself."""
    assert tokens.allows(frozenset({tokens.ADMIN}), tokens.READ)
    assert tokens.allows(frozenset({tokens.WRITE}), tokens.READ)
    assert not tokens.allows(frozenset({tokens.WRITE}), tokens.ADMIN)
    assert not tokens.allows(frozenset({tokens.READ}), tokens.WRITE)
    assert not tokens.allows(frozenset(), tokens.READ)
