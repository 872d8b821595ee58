"""Admission: who a verified certificate is, and whether its CONNECT is accepted.

Receives what the TLS layer verified (the certificate record found by fingerprint,
and the device it belongs to) plus the CONNECT's claims (client id, clean session,
will topic); hands on `Admitted` (the principal and the broker session key) or
`Refused` (a reason). The reason -> CONNACK code mapping lives only in `REFUSALS`.

Identity always comes from the certificate; the client id is only checked against it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from gateway.core import lifecycle, topics
from gateway.core.ids import DeviceId, Fingerprint, OperatorName
from gateway.core.lifecycle import DeviceStatus
from gateway.errors import InvalidValue

# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_NOT_AUTHORIZED = 5


class Refusal(enum.StrEnum):
    NO_CERTIFICATE = "no_certificate"
    UNKNOWN_CERTIFICATE = "unknown_certificate"
    CERTIFICATE_REVOKED = "certificate_revoked"
    CERTIFICATE_EXPIRED = "certificate_expired"
    DEVICE_UNKNOWN = "device_unknown"
    DEVICE_BLOCKED = "device_blocked"
    DEVICE_INACTIVE = "device_inactive"
    DEVICE_REVOKED = "device_revoked"
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    WILL_TOPIC_FORBIDDEN = "will_topic_forbidden"
    INTERNAL_ERROR = "internal_error"


# reason -> (CONNACK code, operator-facing explanation)
REFUSALS: dict[Refusal, tuple[int, str]] = {
    Refusal.NO_CERTIFICATE: (CONNACK_NOT_AUTHORIZED, "no client certificate was presented"),
    Refusal.UNKNOWN_CERTIFICATE: (CONNACK_NOT_AUTHORIZED, "certificate is not registered with the gateway"),
    Refusal.CERTIFICATE_REVOKED: (CONNACK_NOT_AUTHORIZED, "certificate has been revoked"),
    Refusal.CERTIFICATE_EXPIRED: (CONNACK_NOT_AUTHORIZED, "certificate is outside its validity period"),
    Refusal.DEVICE_UNKNOWN: (CONNACK_NOT_AUTHORIZED, "certificate's device no longer exists"),
    Refusal.DEVICE_BLOCKED: (CONNACK_NOT_AUTHORIZED, "device is blocked"),
    Refusal.DEVICE_INACTIVE: (CONNACK_NOT_AUTHORIZED, "device is deactivated"),
    Refusal.DEVICE_REVOKED: (CONNACK_NOT_AUTHORIZED, "device is revoked"),
    Refusal.CLIENT_ID_MISMATCH: (CONNACK_IDENTIFIER_REJECTED, "client id is not the certificate's device id"),
    Refusal.WILL_TOPIC_FORBIDDEN: (CONNACK_NOT_AUTHORIZED, "will topic is outside the device's own topics"),
    Refusal.INTERNAL_ERROR: (CONNACK_SERVER_UNAVAILABLE, "the gateway could not decide; try again"),
}


def connack_code(reason: Refusal) -> int:
    return REFUSALS[reason][0]


class CertificateKind(enum.StrEnum):
    DEVICE = "device"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class CertificateIdentity:
    """A certificate record as the registry knows it (looked up by fingerprint)."""

    fingerprint: Fingerprint
    serial: str
    kind: CertificateKind
    subject: str  # device id or operator name
    not_before: datetime
    not_after: datetime
    revoked_at: datetime | None = None
    first_used_at: datetime | None = None  # None until its first admitted session


@dataclass(frozen=True, slots=True)
class DeviceState:
    """The parts of a device record admission looks at."""

    device_id: DeviceId
    status: DeviceStatus
    blocked: bool


@dataclass(frozen=True, slots=True)
class ConnectClaims:
    """What the client says in CONNECT; never trusted for identity."""

    client_id: str
    clean_session: bool
    will_topic: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    principal: topics.Principal
    session_key: str  # the broker's client id for this session
    certificate: CertificateIdentity
    check_in: bool  # this connection is the device's first accepted one


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Refusal

    @property
    def connack(self) -> int:
        return connack_code(self.reason)

    @property
    def message(self) -> str:
        return REFUSALS[self.reason][1]


Decision = Admitted | Refused


def operator_session_key(name: OperatorName, client_id: str, connection_tag: str) -> str:
    """Operators may use any client id; their sessions live in their own namespace.

    ``:`` never occurs in a device id, so an operator can never take over a device's
    session. An empty client id gets the connection's tag (unique per connection).
    """
    return f"op:{name}:{client_id or connection_tag}"


def decide(
    claims: ConnectClaims,
    certificate: CertificateIdentity | None,
    device: DeviceState | None,
    *,
    now: datetime,
    connection_tag: str,
) -> Decision:
    """Admit or refuse one CONNECT. Pure: same inputs, same answer."""
    if certificate is None:
        return Refused(Refusal.UNKNOWN_CERTIFICATE)
    if certificate.revoked_at is not None:
        return Refused(Refusal.CERTIFICATE_REVOKED)
    if not certificate.not_before <= now <= certificate.not_after:
        return Refused(Refusal.CERTIFICATE_EXPIRED)

    if certificate.kind is CertificateKind.OPERATOR:
        name = OperatorName(certificate.subject)
        principal: topics.Principal = topics.OperatorPrincipal(name)
        if claims.will_topic is not None and not topics.check(
            principal, topics.Action.PUBLISH, claims.will_topic
        ):
            return Refused(Refusal.WILL_TOPIC_FORBIDDEN)
        key = operator_session_key(name, claims.client_id, connection_tag)
        return Admitted(principal, key, certificate, check_in=False)

    if device is None or device.device_id.value != certificate.subject:
        return Refused(Refusal.DEVICE_UNKNOWN)
    if device.status is DeviceStatus.REVOKED:
        return Refused(Refusal.DEVICE_REVOKED)
    if device.blocked:
        return Refused(Refusal.DEVICE_BLOCKED)
    if device.status not in lifecycle.CONNECTABLE:
        return Refused(Refusal.DEVICE_INACTIVE)
    client_id = claims.client_id
    if client_id == "" and claims.clean_session:
        client_id = device.device_id.value  # DESIGN §7: empty id with clean session = the device id
    if client_id != device.device_id.value:
        return Refused(Refusal.CLIENT_ID_MISMATCH)
    principal = topics.DevicePrincipal(device.device_id)
    if claims.will_topic is not None and not topics.check(
        principal, topics.Action.PUBLISH, claims.will_topic
    ):
        return Refused(Refusal.WILL_TOPIC_FORBIDDEN)
    return Admitted(principal, client_id, certificate, check_in=device.status is DeviceStatus.PENDING)


def parse_fingerprint(der: bytes | None) -> Fingerprint | None:
    """Fingerprint of the peer certificate, or None when there is none."""
    if not der:
        return None
    try:
        return Fingerprint.of_der(der)
    except InvalidValue:  # pragma: no cover - sha256 hexdigest always matches
        return None
