"""The CA's only I/O: PEM files, private keys created 0600 and never world-readable.

Receives paths and keys; writes atomically (temporary file in the same directory,
fsync, rename). Refuses to overwrite a private key unless asked, and refuses to load
a CA key that others can read.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from ca.authority import Authority
from ca.errors import CAError
from ca.keys import load_certificate, private_key_pem


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen beyond `mode`
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.replace(tmp, path)


def write_private_key(path: Path, key: PrivateKeyTypes, *, overwrite: bool = False) -> None:
    """Write `key` as unencrypted PKCS#8 PEM with mode 0600."""
    if path.exists() and not overwrite:
        raise CAError(f"{path} already exists; refusing to overwrite a private key")
    _atomic_write(path, private_key_pem(key), 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Write public material (certificates, CRLs) with mode 0644."""
    _atomic_write(path, data, 0o644)


def load_private_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read private key {path}: {exc.strerror}") from exc
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{path} is not an unencrypted PEM private key") from exc


def load_authority(cert_path: Path, key_path: Path) -> Authority:
    """The CA from its files; the key must be private to its owner and match the certificate."""
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        cert_data = cert_path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read the CA ({cert_path}, {key_path}): {exc.strerror}") from exc
    if mode & 0o077:
        raise CAError(
            f"{key_path.name} must be mode 0600 (it is {mode:04o}); fix it with: chmod 600 {key_path}"
        )
    certificate = load_certificate(cert_data)
    key = load_private_key(key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{key_path} is not an EC private key")
    if key.public_key().public_numbers() != certificate.public_key().public_numbers():  # type: ignore[union-attr]
        raise CAError(f"{key_path} does not belong to {cert_path}")
    return Authority(key, certificate)
