"""Identifiers as frozen value objects, validated once at construction.

Device ids and operator names obey `ca.SUBJECT_ID_PATTERN` (the one place the rule
lives): they appear in MQTT topics and certificates, so `/ + # $`, NUL and control
characters can never get in. Fingerprints are lowercase hex SHA-256 over DER.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

from ca import SUBJECT_ID_PATTERN
from gateway.errors import InvalidValue

_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class DeviceId:
    """A device identifier: ``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``."""

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not SUBJECT_ID_PATTERN.fullmatch(self.value):
            raise InvalidValue(
                f"invalid device id {self.value!r}: 1-64 characters from A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit",
                code="invalid_device_id",
            )

    @classmethod
    def generate(cls) -> DeviceId:
        """A fresh random id: ``dev_`` and 16 base32 characters (80 bits)."""
        raw = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()
        return cls("dev_" + raw)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class OperatorName:
    """The name of an operator certificate's holder; same grammar as device ids."""

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not SUBJECT_ID_PATTERN.fullmatch(self.value):
            raise InvalidValue(f"invalid operator name {self.value!r}", code="invalid_operator_name")

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """SHA-256 of a certificate's DER encoding, lowercase hex."""

    value: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not _FINGERPRINT.fullmatch(self.value):
            raise InvalidValue(f"invalid SHA-256 fingerprint {self.value!r}", code="invalid_fingerprint")

    @classmethod
    def of_der(cls, der: bytes) -> Fingerprint:
        return cls(hashlib.sha256(der).hexdigest())

    def short(self) -> str:
        return self.value[:16]

    def __str__(self) -> str:
        return self.value
