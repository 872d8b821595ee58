"""Settings: TOML file, then ``GATEWAY_<SECTION>__<KEY>`` environment overrides, then defaults.

Receives an optional config path (``--config``; default ``config/gateway.toml`` when it
exists); hands on a frozen `Settings`, one section per component. Every CLI command
reads the same settings, so a CLI started beside a running gateway finds it.
`config/gateway.example.toml` documents every key; the defaults live only here.
"""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError

DEFAULT_CONFIG = Path("config/gateway.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsSettings(_Section):
    data_dir: Path = Path("data")
    certs_dir: Path = Path("certs")


class DatabaseSettings(_Section):
    url: str | None = None  # default: sqlite+aiosqlite:///<data_dir>/gateway.db
    busy_timeout_s: float = Field(default=30.0, gt=0)


class MqttSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8883, ge=0, le=65535)
    tls_handshake_timeout_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)  # from TLS done to CONNECT received
    max_packet_bytes: int = Field(default=1024 * 1024, ge=1024, le=268_435_455)
    keepalive_factor: float = Field(default=1.5, ge=1.0)  # MQTT-3.1.2-24: 1.5 x keep-alive
    max_keepalive_s: int = Field(default=0, ge=0)  # 0: accept what clients ask for


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    url: str | None = None  # what the CLI calls; default https://<host>:<port>


class ServerSettings(_Section):
    hostnames: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1"], min_length=1)


class ExternalAnchor(_Section):
    """A CA the operator brings: its certificates may be attached to devices one by one."""

    cert: Path  # the external CA's certificate (PEM)
    crl: Path  # its current CRL (PEM), reread at every CRL refresh; required, checked at TLS


class CaSettings(_Section):
    device_validity_days: int = Field(default=365, ge=1, le=3650)
    device_validity_hours: float = Field(default=0, ge=0, le=24 * 3650)  # > 0: short-lived, overrides days
    operator_validity_days: int = Field(default=365, ge=1, le=3650)
    crl_next_update_days: int = Field(default=7, ge=1, le=365)
    renew_when_remaining: float = Field(default=0.2, gt=0, lt=1)  # share of validity left: hint renewal
    renew_min_interval_s: float = Field(default=60, ge=0)  # between two renewals of one device
    expiry_warning_days: int = Field(default=30, ge=1, le=3650)  # certificate_expiring event horizon
    external_anchors: list[ExternalAnchor] = Field(default_factory=list)

    @property
    def device_validity(self) -> timedelta:
        if self.device_validity_hours > 0:
            return timedelta(hours=self.device_validity_hours)
        return timedelta(days=self.device_validity_days)


class ProvisioningSettings(_Section):
    token_ttl_hours: float = Field(default=72.0, gt=0)
    # The MQTT provisioning listener: server-authenticated TLS, no client certificate.
    mqtt_enabled: bool = False
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(default=8884, ge=0, le=65535)
    mqtt_attempts_per_minute: int = Field(default=10, ge=1)  # per source address
    # POST /api/v1/devices/provision: attempts per source address per minute (a factory line or
    # `gateway simulate` behind one address enrolls in bursts: 600, then ten a second).
    https_attempts_per_minute: int = Field(default=600, ge=1)


class IngestSettings(_Section):
    queue_size: int = Field(default=10_000, ge=1)  # messages waiting for the writer
    max_batch_rows: int = Field(default=500, ge=1, le=100_000)  # rows per commit
    max_batch_delay_ms: float = Field(default=5.0, ge=0, le=10_000)  # wait for more before committing
    max_payload_bytes: int = Field(default=256 * 1024, ge=16)  # larger payloads are rejected, not stored
    ack_after_commit: bool = True  # false: acknowledge on receipt, as stock amqtt did (loses data on a crash)
    last_seen_flush_s: float = Field(default=2.0, gt=0)


class RetentionSettings(_Section):
    readings_days: float = Field(default=90, gt=0)
    health_days: float = Field(default=30, gt=0)
    interval_s: float = Field(default=600, gt=0)  # how often the purge runs
    batch_size: int = Field(default=5_000, ge=1)  # rows deleted per transaction


class HistorySettings(_Section):
    """Connection history and connect failures (`gateway.history`, `gateway.failures`)."""

    connections_days: float = Field(default=30, gt=0)  # sessions that ended longer ago are deleted
    connections_per_device: int = Field(default=100, ge=1)  # newest sessions kept per device
    failures_days: float = Field(default=30, gt=0)  # failure keys not seen for longer are deleted
    failures_max_rows: int = Field(default=10_000, ge=1)  # failure keys kept (least recently seen go)
    max_pending: int = Field(default=5_000, ge=1)  # held in memory between flushes (each kind)
    flush_s: float = Field(default=1.0, gt=0)  # how often both are written, in batches


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a terminal, JSON otherwise


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    paths: PathsSettings = Field(default_factory=PathsSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    ca: CaSettings = Field(default_factory=CaSettings)
    provisioning: ProvisioningSettings = Field(default_factory=ProvisioningSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("paths")
    @classmethod
    def _absolute_paths(cls, paths: PathsSettings) -> PathsSettings:
        return PathsSettings(data_dir=paths.data_dir.resolve(), certs_dir=paths.certs_dir.resolve())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the TOML file's content, passed in by load_settings) < environment
        return (env_settings, init_settings)

    # Derived values: computed here once so that every component agrees.
    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.paths.data_dir / 'gateway.db'}"

    @property
    def api_url(self) -> str:
        if self.api.url:
            return self.api.url.rstrip("/")
        host = self.api.host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a bind-all address is not a place to call
            host = "127.0.0.1"
        return f"https://{host}:{self.api.port}"

    @property
    def admin_token_path(self) -> Path:
        return self.paths.data_dir / "admin.token"


def load_settings(config: Path | None = None) -> Settings:
    """Settings from `config` (or the default file when present), env overrides on top."""
    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid settings ({path or 'defaults'} + environment): {problems}") from exc
