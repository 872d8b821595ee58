"""Issuing: the root CA, the server certificate, client certificates and the CRL.

Receives keys, names and the current time as values; hands on `cryptography` objects.
No I/O and no clock reads: every function is given ``now``. Identity in a client
certificate comes only from the ``subject_id`` the gateway decided, never from a CSR.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.errors import CAError, InvalidSubject
from ca.keys import check_key_policy

# The one place this rule lives: device ids and operator names appear in MQTT topics
# and certificates, so / + # $ NUL, spaces and control characters can never get in.
SUBJECT_ID_PATTERN: re.Pattern[str] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Certificates start a little in the past so that devices with a slow clock accept them.
BACKDATE = timedelta(minutes=5)
SAN_URI_PREFIX = "urn:gateway:"


def validate_subject_id(value: str) -> str:
    if not isinstance(value, str) or not SUBJECT_ID_PATTERN.fullmatch(value):
        raise InvalidSubject(
            f"invalid subject id {value!r}: 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Authority:
    """The CA: its private key and self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _key_usage(*, signature: bool = True, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def create_authority(
    *, now: datetime, common_name: str = "Device Gateway Root CA", validity_days: int = 3650
) -> Authority:
    """A new self-signed root CA with an EC P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Device Gateway"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def _issued_by(
    authority: Authority,
    public_key: CertificatePublicKeyTypes,
    subject: x509.Name,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(authority.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False
        )
    )


def issue_server_certificate(
    authority: Authority, *, hostnames: Sequence[str], now: datetime, validity_days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and server certificate whose SANs are `hostnames` (DNS names or IP addresses)."""
    if not hostnames:
        raise CAError("the server certificate needs at least one hostname")
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    cert = (
        _issued_by(authority, key.public_key(), subject, now - BACKDATE, now + timedelta(days=validity_days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    return key, cert


def issue_client_certificate(
    authority: Authority,
    public_key: CertificatePublicKeyTypes,
    *,
    subject_id: str,
    kind: Literal["device", "operator"],
    now: datetime,
    validity: timedelta,
) -> x509.Certificate:
    """A client certificate for `subject_id`: CN and SAN URI name it, O says its kind."""
    validate_subject_id(subject_id)
    if kind not in ("device", "operator"):
        raise CAError(f"unknown certificate kind {kind!r}")
    check_key_policy(public_key)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, subject_id),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, kind),
        ]
    )
    return (
        _issued_by(authority, public_key, subject, now - BACKDATE, now + validity)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{SAN_URI_PREFIX}{kind}:{subject_id}")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(authority.key, hashes.SHA256())
    )


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime


def build_crl(
    authority: Authority,
    revoked: Iterable[RevokedEntry],
    *,
    now: datetime,
    next_update: timedelta = timedelta(days=7),
    crl_number: int,
) -> x509.CertificateRevocationList:
    """A CRL signed by the CA listing `revoked`; ``now`` is its last update."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.certificate.subject)
        .last_update(now - BACKDATE)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), critical=False
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    return builder.sign(authority.key, hashes.SHA256())
