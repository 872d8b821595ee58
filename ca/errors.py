"""The CA's exception tree.

CAError
├── InvalidSubject   a device id / operator name outside SUBJECT_ID_PATTERN
├── CSRRejected      a CSR (or public key) the CA will not sign; ``code`` says why:
│                    malformed | bad_signature | weak_key | unsupported_key | too_large
└── CertificateRejected  an external certificate that cannot be bound to a device; ``code``:
                     malformed | not_a_client_certificate | untrusted_issuer | not_valid_now |
                     weak_key | unsupported_key
"""

from __future__ import annotations


class CAError(Exception):
    """Base of every error the CA raises on purpose."""


class InvalidSubject(CAError):
    """The subject id is not allowed in a certificate (it appears in MQTT topics)."""


class CSRRejected(CAError):
    """A certificate signing request, or the key in it, is not acceptable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class CertificateRejected(CAError):
    """An externally issued certificate is not acceptable as a device identity."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
