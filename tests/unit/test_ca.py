"""The certificate authority: issuing, CSR vetting, CRLs and key files, with real crypto."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import ca
from ca import files

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def authority() -> ca.Authority:
    return ca.create_authority(now=NOW)


def test_authority_is_a_p256_ca(authority: ca.Authority) -> None:
    """The root is a CA (critical basic constraints, keyCertSign/cRLSign) with an EC P-256 key."""
    cert = authority.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert isinstance(authority.key, ec.EllipticCurvePrivateKey)
    assert authority.key.curve.name == "secp256r1"
    loaded = serialization.load_pem_private_key(authority.key_pem, None)
    assert loaded.public_key().public_numbers() == authority.key.public_key().public_numbers()  # type: ignore[union-attr]


def test_server_certificate_has_the_configured_sans(authority: ca.Authority) -> None:
    """DNS names and IP addresses land in the SAN; EKU serverAuth; signed by the CA."""
    _, cert = ca.issue_server_certificate(authority, hostnames=["gw.example", "10.0.0.5", "::1"], now=NOW)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "::1"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(authority.certificate)
    with pytest.raises(ca.CAError):
        ca.issue_server_certificate(authority, hostnames=[], now=NOW)


def test_client_certificate_names_only_the_gateways_subject(authority: ca.Authority) -> None:
    """CN and SAN URI carry the subject id the gateway chose, never the CSR's; EKU clientAuth; not a CA."""
    key = ca.generate_key()
    vetted = ca.vet_csr(ca.make_csr(key, "admin"))
    cert = ca.issue_client_certificate(
        authority, vetted.public_key, subject_id="dev-1", kind="device", now=NOW, validity=timedelta(days=30)
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:gateway:device:dev-1"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    assert cert.not_valid_before_utc < NOW
    cert.verify_directly_issued_by(authority.certificate)
    other = ca.issue_client_certificate(
        authority, vetted.public_key, subject_id="dev-1", kind="device", now=NOW, validity=timedelta(days=30)
    )
    assert other.serial_number != cert.serial_number


@pytest.mark.parametrize(
    "bad", ["a/b", "a+b", "#", "$SYS", "", "a\x00b", "é", "x" * 65, "-lead", "a b", "a:b"]
)
def test_identities_with_mqtt_special_characters_can_never_be_issued(
    authority: ca.Authority, bad: str
) -> None:
    """Subject ids outside the grammar are refused before anything is signed."""
    with pytest.raises(ca.InvalidSubject):
        ca.issue_client_certificate(
            authority,
            ca.generate_key().public_key(),
            subject_id=bad,
            kind="device",
            now=NOW,
            validity=timedelta(days=1),
        )


def csr_with(key: object) -> bytes:
    return ca.make_csr(key, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make_key", "description"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "EC secp256r1"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "EC secp384r1"),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA 2048"),
    ],
)
def test_allowed_keys_pass_vetting(make_key: object, description: str) -> None:
    """EC P-256, P-384 and RSA 2048 are accepted, PEM text or DER bytes alike."""
    pem = csr_with(make_key())  # type: ignore[operator]
    assert ca.vet_csr(pem).key_description == description
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    assert ca.vet_csr(der).key_description == description
    assert ca.vet_csr(pem.decode()).key_description == description


@pytest.mark.parametrize(
    ("make_key", "code"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak_key"),
        (lambda: ec.generate_private_key(ec.SECP256K1()), "unsupported_key"),
        (ed25519.Ed25519PrivateKey.generate, "unsupported_key"),
    ],
)
def test_disallowed_keys_are_rejected(make_key: object, code: str) -> None:
    """RSA below 2048, other curves and Ed25519 are refused with a stable code."""
    key = make_key()  # type: ignore[operator]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca.CSRRejected) as rejected:
        ca.vet_csr(pem)
    assert rejected.value.code == code


def test_a_tampered_csr_is_rejected() -> None:
    """A CSR whose signed content was altered after signing fails the signature check."""
    der = bytearray(
        x509.load_pem_x509_csr(csr_with(ca.generate_key())).public_bytes(serialization.Encoding.DER)
    )
    index = der.index(b"x", 20)  # the CN value inside the signed part
    der[index] = ord("y")
    with pytest.raises(ca.CSRRejected) as rejected:
        ca.vet_csr(bytes(der))
    assert rejected.value.code == "bad_signature"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"garbage", "malformed"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "malformed"),
        (b"x" * 20000, "too_large"),
        ("\u00e9", "malformed"),
    ],
)
def test_garbage_is_rejected_with_a_code(data: bytes | str, code: str) -> None:
    """Unparseable or oversize input is refused with malformed / too_large."""
    with pytest.raises(ca.CSRRejected) as rejected:
        ca.vet_csr(data)
    assert rejected.value.code == code


@settings(max_examples=200)
@given(st.one_of(st.binary(max_size=2048), st.text(max_size=2048)))
def test_vet_csr_returns_or_raises_csr_rejected(data: bytes | str) -> None:
    """Property: any input gives a VettedCSR or CSRRejected, nothing else."""
    try:
        assert isinstance(ca.vet_csr(data), ca.VettedCSR)
    except ca.CSRRejected:
        pass


def test_crl_lists_serials_and_is_signed(authority: ca.Authority) -> None:
    """The CRL lists each revoked serial, carries a CRL number and verifies with the CA key."""
    crl = ca.build_crl(
        authority, [ca.RevokedEntry(0x1234, NOW), ca.RevokedEntry(0xABCD, NOW)], now=NOW, crl_number=7
    )
    assert {entry.serial_number for entry in crl} == {0x1234, 0xABCD}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert crl.is_signature_valid(authority.key.public_key())
    assert crl.next_update_utc == NOW + timedelta(days=7)


def test_openssl_reads_our_crl(authority: ca.Authority, tmp_path: Path) -> None:
    """`openssl crl` parses the CRL and lists the serial."""
    path = tmp_path / "crl.pem"
    path.write_bytes(
        ca.crl_pem(ca.build_crl(authority, [ca.RevokedEntry(0xBEEF, NOW)], now=NOW, crl_number=1))
    )
    out = subprocess.run(
        ["openssl", "crl", "-in", str(path), "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout
    assert "BEEF" in out.upper()


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """Run a TLS handshake between two in-memory SSL objects; raise the server's SSLError."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", cli), ("s", srv)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_python_ssl_refuses_a_revoked_client_certificate(authority: ca.Authority, tmp_path: Path) -> None:
    """A server context with our CA and CRL (VERIFY_CRL_CHECK_LEAF) refuses the revoked certificate only."""
    server_key, server_cert = ca.issue_server_certificate(
        authority, hostnames=["localhost"], now=datetime.now(UTC)
    )
    (tmp_path / "s.key").write_bytes(ca.private_key_pem(server_key))
    (tmp_path / "s.crt").write_bytes(ca.certificate_pem(server_cert))

    def client_context(name: str) -> tuple[ssl.SSLContext, int]:
        key = ca.generate_key()
        cert = ca.issue_client_certificate(
            authority,
            key.public_key(),
            subject_id=name,
            kind="device",
            now=datetime.now(UTC),
            validity=timedelta(days=1),
        )
        (tmp_path / f"{name}.key").write_bytes(ca.private_key_pem(key))
        (tmp_path / f"{name}.crt").write_bytes(ca.certificate_pem(cert))
        ctx = ssl.create_default_context(cadata=authority.certificate_pem.decode())
        ctx.load_cert_chain(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the server's verdict then comes inside the handshake
        return ctx, cert.serial_number

    good, _ = client_context("good")
    bad, bad_serial = client_context("bad")
    (tmp_path / "crl.pem").write_bytes(
        ca.crl_pem(
            ca.build_crl(
                authority,
                [ca.RevokedEntry(bad_serial, datetime.now(UTC))],
                now=datetime.now(UTC),
                crl_number=1,
            )
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    server.load_verify_locations(cadata=authority.certificate_pem.decode())
    server.load_verify_locations(cafile=tmp_path / "crl.pem")
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    _handshake(server, good)
    with pytest.raises(ssl.SSLError, match="revoked"):
        _handshake(server, bad)


def test_private_keys_are_written_0600_and_never_overwritten(tmp_path: Path) -> None:
    """write_private_key creates 0600 files and refuses to replace one unless asked."""
    path = tmp_path / "k.pem"
    old = os.umask(0)
    try:
        files.write_private_key(path, ca.generate_key())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ca.CAError, match="refusing"):
        files.write_private_key(path, ca.generate_key())
    files.write_private_key(path, ca.generate_key(), overwrite=True)


def test_load_authority_checks_mode_and_pairing(authority: ca.Authority, tmp_path: Path) -> None:
    """The CA key must be 0600 and belong to the certificate."""
    cert, key = tmp_path / "ca.crt", tmp_path / "ca.key"
    files.write_public(cert, authority.certificate_pem)
    files.write_private_key(key, authority.key)
    assert files.load_authority(cert, key).certificate == authority.certificate
    key.chmod(0o644)
    with pytest.raises(ca.CAError, match="0600"):
        files.load_authority(cert, key)
    files.write_private_key(key, ca.generate_key(), overwrite=True)
    with pytest.raises(ca.CAError, match="does not belong"):
        files.load_authority(cert, key)


# --- certificates of an external CA -----------------------------------------------------------


def _client_cert(
    issuer: ca.Authority,
    *,
    key: object | None = None,
    now: datetime = NOW,
    validity: timedelta = timedelta(days=30),
) -> x509.Certificate:
    public = (key or ca.generate_key()).public_key()  # type: ignore[attr-defined]
    return ca.issue_client_certificate(
        issuer, public, subject_id="hw-1", kind="device", now=now, validity=validity
    )


def _built(issuer: ca.Authority, public_key: object, *extensions: x509.ExtensionType) -> x509.Certificate:
    """A certificate built by hand (keys or extensions our CA would never issue)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hw-1")]))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


@pytest.fixture(scope="module")
def vendor() -> ca.Authority:
    return ca.create_authority(now=NOW, common_name="Vendor CA")


def test_an_external_client_certificate_is_accepted_from_pem_or_der(
    vendor: ca.Authority, authority: ca.Authority
) -> None:
    """A client certificate signed directly by one of the anchors is returned as parsed."""
    cert = _client_cert(vendor)
    anchors = [authority.certificate, vendor.certificate]
    assert ca.vet_client_certificate(ca.certificate_pem(cert), anchors, now=NOW) == cert
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ca.vet_client_certificate(der, anchors, now=NOW) == cert
    plain = _built(vendor, ca.generate_key().public_key())  # no EKU, no basic constraints: allowed
    assert ca.vet_client_certificate(ca.certificate_pem(plain), anchors, now=NOW) == plain


def test_external_certificates_that_cannot_identify_a_device_are_rejected(
    vendor: ca.Authority, authority: ca.Authority
) -> None:
    """CA or server certificates, wrong validity, weak keys and other issuers get a stable code."""
    anchors = [vendor.certificate]
    lookalike = ca.create_authority(now=NOW, common_name="Vendor CA")  # same name, other key
    _, server = ca.issue_server_certificate(vendor, hostnames=["gw.example"], now=NOW)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    cases: list[tuple[bytes, str]] = [
        (vendor.certificate_pem, "not_a_client_certificate"),
        (ca.certificate_pem(server), "not_a_client_certificate"),
        (ca.certificate_pem(_client_cert(vendor, now=NOW - timedelta(days=60))), "not_valid_now"),
        (ca.certificate_pem(_client_cert(vendor, now=NOW + timedelta(days=1))), "not_valid_now"),
        (ca.certificate_pem(_built(vendor, weak)), "weak_key"),
        (
            ca.certificate_pem(_built(vendor, ed25519.Ed25519PrivateKey.generate().public_key())),
            "unsupported_key",
        ),
        (ca.certificate_pem(_client_cert(lookalike)), "untrusted_issuer"),
        (ca.certificate_pem(_client_cert(authority)), "untrusted_issuer"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "malformed"),
        (b"\x30\x03\x02\x01\x01", "malformed"),
    ]
    for data, code in cases:
        with pytest.raises(ca.CertificateRejected) as rejected:
            ca.vet_client_certificate(data, anchors, now=NOW)
        assert rejected.value.code == code, (code, str(rejected.value))


def test_only_certificates_issued_directly_by_an_anchor_are_accepted(vendor: ca.Authority) -> None:
    """A certificate of a CA below the anchor (a chain) is not accepted: anchors sign devices directly."""
    sub_key = ca.generate_key()
    sub_cert = _built(vendor, sub_key.public_key(), x509.BasicConstraints(ca=True, path_length=0))
    sub = ca.Authority(key=sub_key, certificate=sub_cert)
    with pytest.raises(ca.CertificateRejected) as rejected:
        ca.vet_client_certificate(ca.certificate_pem(_client_cert(sub)), [vendor.certificate], now=NOW)
    assert rejected.value.code == "untrusted_issuer"


@pytest.fixture(scope="module")
def vendor_der(vendor: ca.Authority) -> bytes:
    return _client_cert(vendor).public_bytes(serialization.Encoding.DER)


def _corrupted(der: bytes, marker: bytes, offset: int, value: int) -> bytes:
    """`der` with the byte at `offset` after the first `marker` set to `value`."""
    changed = bytearray(der)
    changed[der.index(marker) + len(marker) + offset] = value
    return bytes(changed)


def test_certificates_that_parse_but_break_later_are_malformed(
    vendor: ca.Authority, vendor_der: bytes
) -> None:
    """A negative serial, a bad version, a broken extension or an off-curve key: malformed, not a crash."""
    cases = {
        "negative serial": _corrupted(vendor_der, b"\x02\x14", 0, 0x80),  # RFC 5280: serials are positive
        "version 6": _corrupted(vendor_der, b"\xa0\x03\x02\x01", 0, 0x05),
        "broken extension": _corrupted(vendor_der, b"\x55\x1d\x25\x04\x0c\x30\x0a", 0, 0x05),  # EKU OID tag
        "key off the curve": _corrupted(vendor_der, b"\x03\x42\x00\x04", 5, 0x00),
    }
    for what, der in cases.items():
        with pytest.raises(ca.CertificateRejected) as rejected:
            ca.vet_client_certificate(der, [vendor.certificate], now=NOW)
        assert rejected.value.code == "malformed", what


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_vet_client_certificate_returns_or_raises_certificate_rejected(
    vendor: ca.Authority, vendor_der: bytes, data: st.DataObject
) -> None:
    """Property: random bytes, or a good certificate with bytes changed, give a certificate or
    CertificateRejected, nothing else."""
    if data.draw(st.booleans()):
        raw = data.draw(st.binary(max_size=2048))
    else:
        der = bytearray(vendor_der)
        for _ in range(data.draw(st.integers(1, 4))):
            der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(der)
    try:
        assert isinstance(ca.vet_client_certificate(raw, [vendor.certificate], now=NOW), x509.Certificate)
    except ca.CertificateRejected:
        pass
