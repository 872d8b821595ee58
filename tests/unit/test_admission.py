"""Admission: a verified certificate plus CONNECT claims in, a decision out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.core.admission import (
    REFUSALS,
    Admitted,
    CertificateIdentity,
    CertificateKind,
    ConnectClaims,
    DeviceState,
    Refusal,
    Refused,
    decide,
)
from gateway.core.ids import DeviceId, Fingerprint
from gateway.core.lifecycle import DeviceStatus
from gateway.core.topics import DevicePrincipal, OperatorPrincipal

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
FP = Fingerprint("ab" * 32)


def cert(
    subject: str = "dev-1", kind: CertificateKind = CertificateKind.DEVICE, **over: object
) -> CertificateIdentity:
    fields: dict[str, object] = {
        "fingerprint": FP,
        "serial": "0a1b",
        "kind": kind,
        "subject": subject,
        "not_before": NOW - timedelta(days=1),
        "not_after": NOW + timedelta(days=1),
    }
    fields.update(over)
    return CertificateIdentity(**fields)  # type: ignore[arg-type]


def device(
    status: DeviceStatus = DeviceStatus.ACTIVE, blocked: bool = False, id_: str = "dev-1"
) -> DeviceState:
    return DeviceState(DeviceId(id_), status, blocked)


def run(claims: ConnectClaims, c: CertificateIdentity | None, d: DeviceState | None) -> Admitted | Refused:
    return decide(claims, c, d, now=NOW, connection_tag="c1")


def test_device_with_its_own_client_id_is_admitted() -> None:
    """The happy path: device id as client id."""
    decision = run(ConnectClaims("dev-1", True), cert(), device())
    assert isinstance(decision, Admitted)
    assert decision.session_key == "dev-1"
    assert decision.principal == DevicePrincipal(DeviceId("dev-1"))
    assert not decision.check_in


def test_empty_client_id_with_clean_session_means_the_device_id() -> None:
    """DESIGN §7: an empty client id with clean session is taken as the device id."""
    decision = run(ConnectClaims("", True), cert(), device())
    assert isinstance(decision, Admitted) and decision.session_key == "dev-1"


def test_empty_client_id_without_clean_session_is_a_mismatch() -> None:
    """A persistent session needs the real device id."""
    decision = run(ConnectClaims("", False), cert(), device())
    assert isinstance(decision, Refused) and decision.reason is Refusal.CLIENT_ID_MISMATCH


@pytest.mark.parametrize(
    ("claims", "certificate", "state", "reason", "code"),
    [
        (ConnectClaims("dev-1", True), None, None, Refusal.UNKNOWN_CERTIFICATE, 5),
        (ConnectClaims("dev-1", True), cert(revoked_at=NOW), device(), Refusal.CERTIFICATE_REVOKED, 5),
        (
            ConnectClaims("dev-1", True),
            cert(not_after=NOW - timedelta(seconds=1)),
            device(),
            Refusal.CERTIFICATE_EXPIRED,
            5,
        ),
        (ConnectClaims("dev-1", True), cert(), None, Refusal.DEVICE_UNKNOWN, 5),
        (ConnectClaims("dev-1", True), cert(), device(blocked=True), Refusal.DEVICE_BLOCKED, 5),
        (ConnectClaims("dev-1", True), cert(), device(DeviceStatus.INACTIVE), Refusal.DEVICE_INACTIVE, 5),
        (ConnectClaims("dev-1", True), cert(), device(DeviceStatus.REVOKED), Refusal.DEVICE_REVOKED, 5),
        (ConnectClaims("dev-2", True), cert(), device(), Refusal.CLIENT_ID_MISMATCH, 2),
        (
            ConnectClaims("dev-1", True, "gateway/status/dev-1"),
            cert(),
            device(),
            Refusal.WILL_TOPIC_FORBIDDEN,
            5,
        ),
        (
            ConnectClaims("dev-1", True, "devices/dev-2/readings"),
            cert(),
            device(),
            Refusal.WILL_TOPIC_FORBIDDEN,
            5,
        ),
    ],
)
def test_refusals_and_their_connack_codes(
    claims: ConnectClaims,
    certificate: CertificateIdentity | None,
    state: DeviceState | None,
    reason: Refusal,
    code: int,
) -> None:
    """Each refusal has its reason and the CONNACK code DESIGN §7 fixes."""
    decision = run(claims, certificate, state)
    assert isinstance(decision, Refused)
    assert decision.reason is reason
    assert decision.connack == code


def test_blocked_wins_over_client_id_mismatch() -> None:
    """A blocked device learns it is not authorized, not that its id is wrong."""
    decision = run(ConnectClaims("someone-else", True), cert(), device(blocked=True))
    assert isinstance(decision, Refused) and decision.connack == 5


def test_certificate_of_another_device_never_admits_as_that_device() -> None:
    """Identity comes from the certificate: a record for a different device id is refused."""
    decision = run(ConnectClaims("dev-2", True), cert(subject="dev-1"), device(id_="dev-2"))
    assert isinstance(decision, Refused) and decision.reason is Refusal.DEVICE_UNKNOWN


def test_pending_device_checks_in() -> None:
    """A pending device's first accepted connection is its check-in."""
    decision = run(ConnectClaims("dev-1", True), cert(), device(DeviceStatus.PENDING))
    assert isinstance(decision, Admitted) and decision.check_in


def test_maintenance_devices_may_connect() -> None:
    """Maintenance is not a refusal."""
    assert isinstance(run(ConnectClaims("dev-1", True), cert(), device(DeviceStatus.MAINTENANCE)), Admitted)


def test_own_will_topic_is_fine() -> None:
    """A will under the device's own prefix is allowed."""
    assert isinstance(run(ConnectClaims("dev-1", True, "devices/dev-1/health"), cert(), device()), Admitted)


def test_operators_live_in_their_own_session_namespace() -> None:
    """An operator using a device's id as client id can never take over that device's session."""
    decision = run(ConnectClaims("dev-1", True), cert("alice", CertificateKind.OPERATOR), None)
    assert isinstance(decision, Admitted)
    assert decision.session_key == "op:alice:dev-1"
    assert isinstance(decision.principal, OperatorPrincipal)
    anonymous = run(ConnectClaims("", True), cert("alice", CertificateKind.OPERATOR), None)
    assert isinstance(anonymous, Admitted) and anonymous.session_key == "op:alice:c1"


def test_every_refusal_has_a_code_and_a_message() -> None:
    """The refusal table is complete."""
    assert set(REFUSALS) == set(Refusal)
    assert all(code in (2, 3, 5) and message for code, message in REFUSALS.values())
