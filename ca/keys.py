"""Key policy, CSR vetting and encodings.

Receives untrusted CSR bytes (PEM or DER) or public keys; hands on a `VettedCSR`
(the public key and a description) or raises `CSRRejected` with a stable code. The
CSR's subject and extensions are deliberately ignored: the gateway decides identity.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca.errors import CAError, CertificateRejected, CSRRejected

MAX_CSR_BYTES = 16 * 1024
ALLOWED_CURVES = {"secp256r1", "secp384r1"}
MIN_RSA_BITS = 2048


def check_key_policy(public_key: object) -> str:
    """Describe an acceptable key (EC P-256/P-384, RSA >= 2048) or raise CSRRejected."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise CSRRejected(
                "unsupported_key", f"EC curve {public_key.curve.name} is not allowed (P-256, P-384)"
            )
        return f"EC {public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CSRRejected(
                "weak_key", f"RSA {public_key.key_size} is too weak (at least {MIN_RSA_BITS} bits)"
            )
        return f"RSA {public_key.key_size}"
    raise CSRRejected(
        "unsupported_key", f"{type(public_key).__name__} keys are not allowed (EC P-256/P-384, RSA)"
    )


@dataclass(frozen=True)
class VettedCSR:
    public_key: CertificatePublicKeyTypes
    key_description: str


def vet_csr(data: bytes | str) -> VettedCSR:
    """Parse and check a CSR: size, syntax, signature, key policy. Nothing else leaks out."""
    if isinstance(data, str):
        try:
            raw = data.encode("ascii")
        except UnicodeEncodeError as exc:
            raise CSRRejected("malformed", "a PEM CSR must be ASCII") from exc
    elif isinstance(data, bytes | bytearray):
        raw = bytes(data)
    else:
        raise CSRRejected("malformed", "a CSR must be PEM text or DER bytes")
    if len(raw) > MAX_CSR_BYTES:
        raise CSRRejected("too_large", f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(raw) if b"-----BEGIN" in raw else x509.load_der_x509_csr(raw)
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CSRRejected("malformed", "not a parseable certificate signing request") from exc
    description = check_key_policy(public_key)
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CSRRejected("bad_signature", "the CSR signature cannot be checked") from exc
    if not valid:
        raise CSRRejected("bad_signature", "the CSR signature does not match its key")
    return VettedCSR(public_key, description)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-256 key, as devices make locally."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKeyTypes, common_name: str) -> bytes:
    """A PEM CSR signed with `key` (the CN is informational; the CA ignores it)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def fingerprint_sha256(cert: x509.Certificate | bytes) -> str:
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_certificate(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CAError("not a PEM certificate") from exc


def vet_client_certificate(
    data: bytes, anchors: Sequence[x509.Certificate], *, now: datetime
) -> x509.Certificate:
    """Check a certificate from an external CA before it may identify a device.

    It must parse, be an end-entity certificate usable for TLS client authentication,
    be valid at `now`, carry an allowed key, and be signed directly by one of `anchors`.
    """
    try:
        with warnings.catch_warnings():
            # cryptography only warns about what RFC 5280 forbids (a serial <= 0) and will
            # refuse it in a later release; refuse it now, whatever the warning filters say.
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            pem = b"-----BEGIN" in data
            cert = x509.load_pem_x509_certificate(data) if pem else x509.load_der_x509_certificate(data)
        extensions = cert.extensions  # parsed lazily: a malformed extension raises only here
    except (
        ValueError,
        x509.InvalidVersion,
        x509.DuplicateExtension,  # RFC 5280 4.2: an extension appears at most once
        x509.UnsupportedGeneralNameType,
        CryptographyDeprecationWarning,
    ) as exc:
        raise CertificateRejected("malformed", "not a parseable X.509 certificate") from exc
    try:
        public_key = cert.public_key()
    except ValueError as exc:
        raise CertificateRejected("malformed", "the certificate's public key cannot be parsed") from exc
    except UnsupportedAlgorithm as exc:
        raise CertificateRejected("unsupported_key", "the certificate's key type is not supported") from exc
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CertificateRejected("not_a_client_certificate", "a CA certificate cannot identify a device")
    except x509.ExtensionNotFound:
        pass
    try:
        usages = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise CertificateRejected(
                "not_a_client_certificate", "the certificate's extended key usage lacks clientAuth"
            )
    except x509.ExtensionNotFound:
        pass
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateRejected("not_valid_now", "the certificate is expired or not yet valid")
    try:
        check_key_policy(public_key)
    except CSRRejected as exc:
        raise CertificateRejected(exc.code, str(exc)) from exc
    for anchor in anchors:
        try:
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature):
            continue
        return cert
    raise CertificateRejected("untrusted_issuer", "the certificate is not issued by a configured external CA")
