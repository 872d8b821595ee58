"""Value objects, presence payloads, tokens and settings."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import load_settings
from gateway.core import tokens
from gateway.core.ids import DeviceId, Fingerprint, OperatorName
from gateway.core.presence import Connection, StatusChange, supersedes
from gateway.errors import ConfigError, InvalidValue


@pytest.mark.parametrize("raw", ["a/b", "a+b", "a#", "$SYS", "", "a\x00", "é", "-x", "x" * 65, "a b", "a:b"])
def test_device_ids_never_carry_topic_or_control_characters(raw: str) -> None:
    """Ids appear in topics: the grammar excludes / + # $ : NUL, spaces and non-ASCII."""
    with pytest.raises(InvalidValue):
        DeviceId(raw)
    with pytest.raises(InvalidValue):
        OperatorName(raw)


def test_generated_ids_are_valid_and_distinct() -> None:
    """Generated ids follow the grammar and do not repeat."""
    ids = {DeviceId.generate().value for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("dev_") and DeviceId(i) for i in ids)


@given(st.text(max_size=70))
def test_device_id_accepts_or_refuses_with_our_error(raw: str) -> None:
    """Property: any text gives a DeviceId or InvalidValue."""
    try:
        DeviceId(raw)
    except InvalidValue:
        pass


def test_fingerprint_of_der() -> None:
    """Fingerprints are lowercase SHA-256 hex of the DER bytes."""
    assert Fingerprint.of_der(b"").value == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    with pytest.raises(InvalidValue):
        Fingerprint("AB" * 32)


def test_status_payload_has_the_contract_fields() -> None:
    """The retained status carries device_id, status, reason, epoch, ts and optional ip/serial."""
    at = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    body = json.loads(StatusChange("d1", Connection.ONLINE, "connected", 3, at, "127.0.0.1", "0a").payload())
    assert body == {
        "device_id": "d1",
        "status": "online",
        "reason": "connected",
        "epoch": 3,
        "ts": "2026-11-22T12:00:00Z",
        "client_ip": "127.0.0.1",
        "certificate_serial": "0a",
    }
    offline = json.loads(StatusChange("d1", Connection.OFFLINE, "blocked", 3, at).payload())
    assert "client_ip" not in offline and offline["status"] == "offline"


def test_consumers_drop_older_epochs() -> None:
    """A status with a lower epoch than one already seen is dropped."""
    assert supersedes(None, 1)
    assert supersedes(3, 3)
    assert not supersedes(4, 3)


def test_scopes_imply_narrower_ones() -> None:
    """admin implies write and read; write implies read; read implies only read."""
    assert tokens.allows(frozenset({tokens.ADMIN}), tokens.WRITE)
    assert tokens.allows(frozenset({tokens.WRITE}), tokens.READ)
    assert not tokens.allows(frozenset({tokens.READ}), tokens.WRITE)
    assert not tokens.allows(frozenset({tokens.WRITE}), tokens.ADMIN)
    assert not tokens.allows(frozenset({"bogus"}), tokens.READ)


def test_tokens_are_random_and_hashed() -> None:
    """Tokens are long, prefixed and distinct; the stored hash is not the token."""
    a, b = tokens.new_token(tokens.API_PREFIX), tokens.new_token(tokens.API_PREFIX)
    assert a != b and a.startswith("gat_") and len(a) > 40
    assert tokens.hash_token(a) != a and len(tokens.hash_token(a)) == 64


def test_settings_layer_env_over_toml_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TOML sets values, GATEWAY_<SECTION>__<KEY> overrides them, the rest keeps its default."""
    config = tmp_path / "g.toml"
    config.write_text('[mqtt]\nhost = "0.0.0.0"\nport = 1884\n[paths]\ndata_dir = "d"\n')
    monkeypatch.setenv("GATEWAY_MQTT__PORT", "1999")
    settings = load_settings(config)
    assert settings.mqtt.host == "0.0.0.0"
    assert settings.mqtt.port == 1999
    assert settings.api.port == 8443
    assert settings.paths.data_dir.is_absolute()
    assert settings.database_url.endswith("/d/gateway.db")


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    """A typo in the config file is an error, not silently ignored."""
    config = tmp_path / "g.toml"
    config.write_text("[mqtt]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"mqtt\.prot"):
        load_settings(config)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    """--config pointing nowhere says so."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_the_example_config_documents_every_key_with_its_default() -> None:
    """config/gateway.example.toml names every setting (optional ones commented out) with its default."""
    import re
    import tomllib

    from gateway.config import Settings

    example = Path(__file__).parents[2] / "config" / "gateway.example.toml"
    text = re.sub(r"(?m)^# (\w+ = )", r"\1", example.read_text(encoding="utf-8"))  # optional keys
    documented = tomllib.loads(text)
    defaults = Settings().model_dump(mode="json")
    assert set(documented) == set(defaults), "sections"
    for section, values in defaults.items():
        assert set(documented[section]) == set(values), f"keys of [{section}]"
        for key, default in values.items():
            if default is None or section == "paths":  # optional, or resolved against the cwd
                continue
            assert documented[section][key] == default, f"{section}.{key}"
