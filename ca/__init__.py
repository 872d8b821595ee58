"""The gateway's certificate authority, as pure functions over values.

Receives keys, names, CSRs and the current time; hands on certificates, CRLs and
vetted public keys (`cryptography` objects). `ca.files` is the only module doing
I/O. This package imports nothing from `gateway`.

Errors (see `ca.errors`)::

    CAError
    ├── InvalidSubject
    ├── CSRRejected (code: malformed | bad_signature | weak_key | unsupported_key | too_large)
    └── CertificateRejected (an external certificate that cannot identify a device)
"""

from ca.authority import (
    SUBJECT_ID_PATTERN,
    Authority,
    RevokedEntry,
    build_crl,
    create_authority,
    issue_client_certificate,
    issue_server_certificate,
    validate_subject_id,
)
from ca.errors import CAError, CertificateRejected, CSRRejected, InvalidSubject
from ca.keys import (
    VettedCSR,
    certificate_pem,
    check_key_policy,
    crl_pem,
    fingerprint_sha256,
    generate_key,
    load_certificate,
    make_csr,
    private_key_pem,
    serial_hex,
    vet_client_certificate,
    vet_csr,
)

__all__ = [
    "SUBJECT_ID_PATTERN",
    "Authority",
    "CAError",
    "CSRRejected",
    "CertificateRejected",
    "InvalidSubject",
    "RevokedEntry",
    "VettedCSR",
    "build_crl",
    "certificate_pem",
    "check_key_policy",
    "create_authority",
    "crl_pem",
    "fingerprint_sha256",
    "generate_key",
    "issue_client_certificate",
    "issue_server_certificate",
    "load_certificate",
    "make_csr",
    "private_key_pem",
    "serial_hex",
    "validate_subject_id",
    "vet_client_certificate",
    "vet_csr",
]
