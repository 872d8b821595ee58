"""Tables of the registry. Times are stored as UTC and handed back timezone-aware."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")  # a bug, never user input
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"unexpected datetime value {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_lower: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    blocked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    checked_in_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # presence
    connection: Mapped[str] = mapped_column(String(8), default="offline")
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    last_connected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_disconnected_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    disconnect_reason: Mapped[str | None] = mapped_column(String(32))
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    last_data_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    client_ip: Mapped[str | None] = mapped_column(String(64))
    connected_serial: Mapped[str | None] = mapped_column(String(64))
    # identification, reported by the device (devices/{id}/info)
    manufacturer: Mapped[str | None] = mapped_column(String(200))  # indexed with the state below
    model: Mapped[str | None] = mapped_column(String(200))  # indexed with the state below
    application: Mapped[str | None] = mapped_column(String(200))  # indexed with the state below
    application_version: Mapped[str | None] = mapped_column(String(100))
    os: Mapped[str | None] = mapped_column(String(100))
    os_version: Mapped[str | None] = mapped_column(String(100))
    firmware_version: Mapped[str | None] = mapped_column(String(100), index=True)
    # operator-managed (gateway.core.device_fields); tags and locations in their own tables
    description: Mapped[str | None] = mapped_column(Text)
    metadata_json: Mapped[str | None] = mapped_column(Text)  # JSON object; NULL is {}
    settings_json: Mapped[str | None] = mapped_column(Text)  # JSON object; NULL is {}
    profile_id: Mapped[str | None] = mapped_column(String(64), index=True)  # gateway.core.profiles
    # The latest end among its unrevoked device certificates (NULL: none), kept by
    # gateway.store.credentials in every transaction that adds or revokes one; the listing's
    # cert_expires_within filter and the summary's expiry counts read it, not the certificates.
    cert_not_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)

    # The listing's indexes (gateway.store.listing): each sort field's own, and covering ones,
    # so that counting by state, by identification and state, and searching names and ids read
    # an index, not the table: state leads with status, presence with connection (a seek on
    # connection = online: ~4x faster than scanning the state index for it); application,
    # manufacturer (with model) and model carry the state columns, which a page with another
    # filter reads from the index instead of looking up every row (100,000 devices: counting
    # one application's active devices 12 -> 1.3 ms, one manufacturer's model 22 -> 0.6 ms).
    # (connection and blocked, two values each, have no index of their own: see REPLACED_INDEXES.)
    __table_args__ = (
        Index("ix_devices_name", "name_lower", "id"),
        Index("ix_devices_state", "status", "connection", "blocked"),
        Index("ix_devices_presence", "connection", "blocked", "status"),
        Index("ix_devices_application_state", "application", "status", "connection", "blocked"),
        Index("ix_devices_manufacturer_model", "manufacturer", "model", "status", "connection", "blocked"),
        Index("ix_devices_model_state", "model", "status", "connection", "blocked"),
    )


# Indexes of earlier releases that newer ones replaced; dropped from existing databases, since
# SQLite's planner would prefer them to the covering ones (a seek on blocked = false or
# connection = offline matches most of a fleet, row by row).
REPLACED_INDEXES = {
    "devices": (
        "ix_devices_name_lower",
        "ix_devices_connection",
        "ix_devices_blocked",
        "ix_devices_application",
        "ix_devices_manufacturer",
        "ix_devices_model",
    ),
}


class DeviceTag(Base):
    """A device's tags, one row each, so that filtering by tag is an index lookup."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index("ix_device_tags_tag", "tag", "device_id"),)


class DeviceLocation(Base):
    """The locations a device is placed in, one row each (filtering is an index lookup)."""

    __tablename__ = "device_locations"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    location_id: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index("ix_device_locations_location", "location_id", "device_id"),)


class DeviceGroup(Base):
    """A group of devices (gateway.core.groups): explicit members (static) or a saved filter (dynamic)."""

    __tablename__ = "device_groups"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_lower: Mapped[str] = mapped_column(String(200), index=True)
    description: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))  # static | dynamic
    filter_json: Mapped[str | None] = mapped_column(Text)  # dynamic: the saved filter (JSON object)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DeviceGroupMember(Base):
    """A static group's members, one row each; a deleted device or group takes its rows along."""

    __tablename__ = "device_group_members"

    group_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("device_groups.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    added_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_device_group_members_device", "device_id", "group_id"),)


class Site(Base):
    """A location as a record (gateway.core.sites); devices name it in their location ids."""

    __tablename__ = "sites"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_lower: Mapped[str] = mapped_column(String(200), index=True)
    description: Mapped[str | None] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(Text)
    latitude: Mapped[float | None] = mapped_column(Float)
    longitude: Mapped[float | None] = mapped_column(Float)
    timezone: Mapped[str | None] = mapped_column(String(64))
    metadata_json: Mapped[str | None] = mapped_column(Text)  # JSON object; NULL is {}
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DeviceProfile(Base):
    """A kind of device (gateway.core.profiles): expected components, settings schema, writable fields."""

    __tablename__ = "device_profiles"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_lower: Mapped[str] = mapped_column(String(200), index=True)
    description: Mapped[str | None] = mapped_column(Text)
    components_json: Mapped[str] = mapped_column(Text)  # JSON array, the announcement's shape
    settings_schema_json: Mapped[str | None] = mapped_column(Text)  # JSON object; NULL: unchecked
    writable_json: Mapped[str] = mapped_column(Text)  # JSON array of field names
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Certificate(Base):
    """Every certificate the CA issued, kept after revocation (the CRL is built from here)."""

    __tablename__ = "certificates"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # device | operator
    subject: Mapped[str] = mapped_column(String(64))  # device id or operator name
    not_before: Mapped[datetime] = mapped_column(UTCDateTime())
    not_after: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    pem: Mapped[str] = mapped_column(Text)
    # Renewal: the serial this certificate replaces; the old one is revoked at first use.
    renews: Mapped[str | None] = mapped_column(String(64))
    first_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(16), default="issued", server_default="issued")

    __table_args__ = (
        Index("ix_certificates_subject", "kind", "subject"),
        Index("ix_certificates_not_after", "not_after"),
        # Covering indexes of the expiry filter: candidates by end, then "no later one" per device.
        Index("ix_certificates_expiry", "not_after", "kind", "revoked_at", "subject"),
        Index("ix_certificates_validity", "kind", "subject", "revoked_at", "not_after"),
    )


class RegistrationToken(Base):
    """One-time enrolment tokens; only the SHA-256 of the token is stored."""

    __tablename__ = "registration_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """Operator API tokens; only the SHA-256 of the token is stored. Never deleted, only revoked."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Unique for good (revoked tokens keep theirs): the audit trail names the actor token:<name>.
    name: Mapped[str] = mapped_column(String(100), unique=True, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(200))  # space separated
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# --- device data (ingest) ------------------------------------------------------------------

BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only


class ReadingRow(Base):
    """One stored reading. Exactly one of value_num / value_bool / value_str is set."""

    __tablename__ = "readings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    component: Mapped[str | None] = mapped_column(String(128))
    sensor: Mapped[str] = mapped_column(String(128))
    value_num: Mapped[float | None] = mapped_column(Float)
    value_bool: Mapped[bool | None] = mapped_column(Boolean)
    value_str: Mapped[str | None] = mapped_column(Text)
    unit: Mapped[str | None] = mapped_column(String(32))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_readings_device_ts", "device_id", "ts"),
        Index("ix_readings_device_sensor_ts", "device_id", "sensor", "ts"),
        Index("ix_readings_ts", "ts"),
    )


class HealthRow(Base):
    __tablename__ = "health"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    uptime_s: Mapped[float] = mapped_column(Float)
    free_heap_bytes: Mapped[int] = mapped_column(BigInteger)
    rssi_dbm: Mapped[float] = mapped_column(Float)
    connection_type: Mapped[str] = mapped_column(String(32))
    readings_sent: Mapped[int] = mapped_column(BigInteger)
    readings_dropped: Mapped[int] = mapped_column(BigInteger)
    battery_pct: Mapped[float | None] = mapped_column(Float)
    extra: Mapped[str | None] = mapped_column(Text)  # JSON object of the keys beyond the contract

    __table_args__ = (
        Index("ix_health_device_ts", "device_id", "ts"),
        Index("ix_health_ts", "ts"),
    )


class HealthLatestRow(Base):
    """The newest health report per device, for quick reads."""

    __tablename__ = "health_latest"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    ts: Mapped[datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    uptime_s: Mapped[float] = mapped_column(Float)
    free_heap_bytes: Mapped[int] = mapped_column(BigInteger)
    rssi_dbm: Mapped[float] = mapped_column(Float)
    connection_type: Mapped[str] = mapped_column(String(32))
    readings_sent: Mapped[int] = mapped_column(BigInteger)
    readings_dropped: Mapped[int] = mapped_column(BigInteger)
    battery_pct: Mapped[float | None] = mapped_column(Float)
    extra: Mapped[str | None] = mapped_column(Text)


class ComponentRow(Base):
    __tablename__ = "components"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    profile: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class SensorRow(Base):
    """A typed data channel of a device; component "" when the sensor belongs to none."""

    __tablename__ = "sensors"

    device_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    component: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value_type: Mapped[str] = mapped_column(String(16))
    unit: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_sensors_value_type", "value_type"),)


# --- operator actions ----------------------------------------------------------------------


class AuditRow(Base):
    """One operator action, append-only: who, when, what, and the record before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    actor: Mapped[str] = mapped_column(String(120), index=True)  # token:<name>, device:<id>, system
    action: Mapped[str] = mapped_column(String(64), index=True)  # e.g. device.blocked
    target_type: Mapped[str] = mapped_column(String(32))  # device | token | group | ...
    target_id: Mapped[str] = mapped_column(String(128))
    before: Mapped[str | None] = mapped_column(Text)  # JSON
    after: Mapped[str | None] = mapped_column(Text)  # JSON
    detail: Mapped[str | None] = mapped_column(Text)  # JSON: what the action adds (serials, reason)

    __table_args__ = (Index("ix_audit_target", "target_type", "target_id", "at"),)


# --- connection history and connect failures (gateway.history, gateway.failures) ------------


class SessionRow(Base):
    """One session of a device: written at its start, completed at its end (counters, reason)."""

    __tablename__ = "connection_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), ForeignKey("devices.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)  # the session's presence epoch: (device_id, epoch) is unique
    connected_at: Mapped[datetime] = mapped_column(UTCDateTime())
    disconnected_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    reason: Mapped[str | None] = mapped_column(String(32))
    client_ip: Mapped[str] = mapped_column(String(64))
    client_port: Mapped[int] = mapped_column(Integer)
    certificate_serial: Mapped[str] = mapped_column(String(64))
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_in: Mapped[int] = mapped_column(BigInteger, default=0)
    messages_out: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (Index("ix_connection_sessions_device_epoch", "device_id", "epoch", unique=True),)


class ConnectFailureRow(Base):
    """Refused CONNECTs of one key (certificate fingerprint, or ``ip:<address>``) and reason."""

    __tablename__ = "connect_failures"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(80))
    reason: Mapped[str] = mapped_column(String(32))
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    attempts: Mapped[int] = mapped_column(BigInteger)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_client_id: Mapped[str] = mapped_column(String(128))
    last_client_ip: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str | None] = mapped_column(String(64))  # the certificate's device, when known
    certificate_pem: Mapped[str | None] = mapped_column(Text)  # only for unknown certificates
    approved_device_id: Mapped[str | None] = mapped_column(String(64))
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_connect_failures_key_reason", "key", "reason", unique=True),)
