"""The gateway's PKI on disk, and the TLS contexts built from it.

Receives the certs directory and the configured server hostnames; hands on the CA
(`ca.Authority`), freshly issued certificate records, the current CRL, the mTLS
`ssl.SSLContext` the MQTT listener uses, and the server-only one of the provisioning
listener. `initialise` never overwrites a CA; it reissues the server certificate
only when the configured hostnames changed.

The listener asks `TlsContexts.current` for every new connection, so a revocation
takes effect at the next handshake by swapping in a context built with the new CRL.
A fresh context also has fresh session caches and ticket keys: TLS sessions made
before the swap cannot be resumed after it.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

import ca
from ca import files as ca_files
from gateway.config import ExternalAnchor
from gateway.core.admission import CertificateKind
from gateway.core.records import NewCertificate
from gateway.errors import ConfigError, InvalidValue
from gateway.logs import get_logger

log = get_logger("gateway.pki")


@dataclass(frozen=True, slots=True)
class PkiPaths:
    certs_dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.certs_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.certs_dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.certs_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.certs_dir / "server.key"

    @property
    def crl(self) -> Path:
        return self.certs_dir / "crl.pem"


def _san_names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(name) for name in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names


def _normalise(hostnames: Iterable[str]) -> set[str]:
    out = set()
    for name in hostnames:
        try:
            out.add(str(ipaddress.ip_address(name)))
        except ValueError:
            out.add(name)
    return out


def initialise(paths: PkiPaths, hostnames: list[str], now: datetime, crl_next_update: timedelta) -> list[str]:
    """Create what is missing; return what was created (for the `init` report)."""
    created: list[str] = []
    paths.certs_dir.mkdir(parents=True, exist_ok=True)
    has_cert, has_key = paths.ca_cert.exists(), paths.ca_key.exists()
    if has_cert != has_key:
        present = paths.ca_cert if has_cert else paths.ca_key
        raise ConfigError(
            f"{present} exists without its pair; restore the missing file or move {present} away "
            "(the gateway never overwrites a CA)"
        )
    if not has_cert:
        authority = ca.create_authority(now=now)
        ca_files.write_private_key(paths.ca_key, authority.key)
        ca_files.write_public(paths.ca_cert, authority.certificate_pem)
        created.append(str(paths.ca_cert))
        log.info("pki.ca_created", path=str(paths.ca_cert))
    authority = ca_files.load_authority(paths.ca_cert, paths.ca_key)

    wanted = _normalise(hostnames)
    current = None
    if paths.server_cert.exists() and paths.server_key.exists():
        current = ca.load_certificate(paths.server_cert.read_bytes())
    if (
        current is None
        or _san_names(current) != wanted
        or current.not_valid_after_utc <= now + timedelta(days=30)
        or current.issuer != authority.certificate.subject
    ):
        key, cert = ca.issue_server_certificate(authority, hostnames=hostnames, now=now)
        ca_files.write_private_key(paths.server_key, key, overwrite=True)
        ca_files.write_public(paths.server_cert, ca.certificate_pem(cert))
        created.append(str(paths.server_cert))
        log.info("pki.server_certificate_issued", hostnames=sorted(wanted))

    if not paths.crl.exists():
        crl = ca.build_crl(authority, [], now=now, next_update=crl_next_update, crl_number=crl_number(now))
        ca_files.write_public(paths.crl, ca.crl_pem(crl))
        created.append(str(paths.crl))
    return created


def _load_anchor(anchor: ExternalAnchor) -> x509.Certificate:
    """An external CA certificate, checked to be a CA and to come with a readable CRL."""
    try:
        cert = ca.load_certificate(anchor.cert.read_bytes())
        crl = x509.load_pem_x509_crl(anchor.crl.read_bytes())
    except (OSError, ValueError, ca.CAError) as exc:
        raise ConfigError(f"external CA {anchor.cert} / CRL {anchor.crl} unreadable: {exc}") from exc
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(f"external anchor {anchor.cert} is not a CA certificate")
    if crl.issuer != cert.subject or not crl.is_signature_valid(cert.public_key()):  # type: ignore[arg-type]
        raise ConfigError(f"CRL {anchor.crl} is not signed by the external CA {anchor.cert}")
    return cert


def crl_number(now: datetime) -> int:
    """Monotonic across restarts and instances without shared state: milliseconds since the epoch."""
    return int(now.timestamp() * 1000)


class Pki:
    """The loaded CA: issues certificates and CRLs, builds TLS contexts."""

    def __init__(
        self, paths: PkiPaths, authority: ca.Authority, anchors: Sequence[ExternalAnchor] = ()
    ) -> None:
        self.paths = paths
        self.authority = authority
        self.anchors = tuple(anchors)
        self._anchor_certs = [_load_anchor(anchor) for anchor in self.anchors]

    @classmethod
    def load(cls, paths: PkiPaths, anchors: Sequence[ExternalAnchor] = ()) -> Pki:
        return cls(paths, ca_files.load_authority(paths.ca_cert, paths.ca_key), anchors)

    def external_certificate(self, data: bytes, *, subject: str, now: datetime) -> NewCertificate:
        """A certificate of an external anchor, vetted, as a record for `subject` (a device)."""
        if not self._anchor_certs:
            raise InvalidValue(
                "no external CA is configured (ca.external_anchors); certificates of the gateway's "
                "own CA are enrolled with a registration token instead",
                code="no_external_ca",
            )
        try:
            cert = ca.vet_client_certificate(data, self._anchor_certs, now=now)
        except ca.CertificateRejected as exc:
            raise InvalidValue(f"certificate rejected: {exc}", code=f"certificate_{exc.code}") from exc
        return NewCertificate(
            serial=ca.serial_hex(cert.serial_number),
            fingerprint_sha256=ca.fingerprint_sha256(cert),
            kind=CertificateKind.DEVICE,
            subject=subject,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=ca.certificate_pem(cert).decode("ascii"),
            source="attached",
        )

    def issued_by_own_ca(self, data: bytes) -> bool:
        """Is this PEM certificate signed by the gateway's own CA?"""
        try:
            cert = ca.load_certificate(data)
            cert.verify_directly_issued_by(self.authority.certificate)
        except (ca.CAError, ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
        return True

    @property
    def ca_pem(self) -> bytes:
        return self.authority.certificate_pem

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        *,
        subject: str,
        kind: CertificateKind,
        now: datetime,
        validity: timedelta,
    ) -> NewCertificate:
        cert = ca.issue_client_certificate(
            self.authority, public_key, subject_id=subject, kind=kind.value, now=now, validity=validity
        )
        return NewCertificate(
            serial=ca.serial_hex(cert.serial_number),
            fingerprint_sha256=ca.fingerprint_sha256(cert),
            kind=kind,
            subject=subject,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            pem=ca.certificate_pem(cert).decode("ascii"),
        )

    def write_crl(
        self, revoked: Iterable[tuple[str, datetime]], now: datetime, next_update: timedelta
    ) -> bytes:
        """Sign a CRL listing `revoked` (serial hex, revoked at), store it, return its PEM."""
        entries = [ca.RevokedEntry(int(serial, 16), at) for serial, at in revoked]
        crl = ca.build_crl(
            self.authority, entries, now=now, next_update=next_update, crl_number=crl_number(now)
        )
        pem = ca.crl_pem(crl)
        ca_files.write_public(self.paths.crl, pem)
        return pem

    def crl_pem(self) -> bytes:
        return self.paths.crl.read_bytes()

    def crl_der(self) -> bytes:
        return x509.load_pem_x509_crl(self.crl_pem()).public_bytes(serialization.Encoding.DER)

    def mqtt_context(self) -> ssl.SSLContext:
        """Server side of mutual TLS: our CA only, the current CRL, TLS 1.2 or newer."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.paths.server_cert, self.paths.server_key)
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        # cadata takes certificates only; a file may also carry CRLs.
        ctx.load_verify_locations(cafile=self.paths.crl)
        for anchor in self.anchors:  # CRL checking needs a CRL for every issuer
            ctx.load_verify_locations(cafile=anchor.cert)
            ctx.load_verify_locations(cafile=anchor.crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        return ctx

    def provisioning_context(self) -> ssl.SSLContext:
        """Server-authenticated TLS for the MQTT provisioning listener: no client certificate asked."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(self.paths.server_cert, self.paths.server_key)
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        return ctx


class TlsContexts:
    """The context the next handshake uses; replaced whole on every CRL change."""

    def __init__(self, pki: Pki) -> None:
        self._pki = pki
        self.current = pki.mqtt_context()

    def reload(self) -> None:
        self.current = self._pki.mqtt_context()
