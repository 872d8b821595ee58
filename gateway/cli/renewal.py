"""Certificate renewal over MQTT, done as the device does it (``gateway devices enroll --renew``).

Receives a credentials directory as `enroll` wrote it (``device.key``, ``device.crt``,
``ca.crt``) and where the gateway's MQTT listener is. Makes a new EC P-256 key locally,
connects with the current certificate (mutual TLS, client id = device id), subscribes to
``devices/{id}/certificate/+``, publishes ``{"csr": PEM}`` to ``.../certificate/renew``
(QoS 1) and waits for ``.../accepted`` or ``.../rejected`` (DESIGN.md §7).

Hands on the new pair written into the directory and a `Renewed` summary. The directory
always holds a working pair: the current one is copied to ``device.key.previous`` /
``device.crt.previous`` before the new one replaces it (each file written atomically),
and the copies are removed only once a connection with the new certificate is admitted.
The gateway keeps the old certificate valid until that first connection, so a failure
at any step leaves a pair that connects.

Errors are `ConfigError` (files, network, TLS, timeouts) and `ProvisioningRefused` (the
gateway's ``rejected`` answer, with its code).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import ca
from ca import files as ca_files
from ca.authority import SAN_URI_PREFIX
from gateway.errors import ConfigError, ProvisioningRefused
from gateway.mqtt_client import ConnectionClosed, ConnectRefused, MqttClient, MqttError

SUBACK_FAILURE = 0x80
_DEVICE_URI = f"{SAN_URI_PREFIX}device:"


@dataclass(frozen=True)
class DeviceFiles:
    """The files of one enrolled device in `directory`."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "device.key"

    @property
    def cert(self) -> Path:
        return self.directory / "device.crt"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def previous_key(self) -> Path:
        return self.directory / "device.key.previous"

    @property
    def previous_cert(self) -> Path:
        return self.directory / "device.crt.previous"

    def check(self) -> None:
        missing = [p.name for p in (self.key, self.cert, self.ca) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"{self.directory} lacks {', '.join(missing)}: renew needs the files of an enrolled "
                "device (run `gateway devices enroll --token T --out DIR` first)"
            )


@dataclass(frozen=True)
class Target:
    """Where the gateway's MQTT listener is, and the CA that signs its server certificate."""

    host: str
    port: int
    cacert: Path
    timeout: float


@dataclass(frozen=True)
class Renewed:
    device_id: str
    certificate_serial: str
    not_after: str


def device_id_of(cert_pem: bytes) -> str:
    """The device id a certificate of the gateway's CA names (SAN URI, else the CN)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from exc
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(_DEVICE_URI):
                return uri.removeprefix(_DEVICE_URI)
            if uri.startswith(SAN_URI_PREFIX):
                raise ConfigError(f"not a device certificate ({uri})")
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not names:
        raise ConfigError("the certificate names no device (no SAN URI, no common name)")
    return str(names[0].value)


def _tls(target: Target, cert: Path, key: Path) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(target.cacert))
        context.load_cert_chain(str(cert), str(key))
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(f"cannot load the TLS files ({cert}, {key}, {target.cacert}): {exc}") from exc
    return context


async def _connect(target: Target, device_id: str, cert: Path, key: Path, what: str) -> MqttClient:
    """An admitted MQTT session of the device with this pair; errors say what failed and where."""
    client = MqttClient(client_id=device_id, keepalive=30)
    where = f"{target.host}:{target.port}"
    try:
        await client.connect(
            target.host,
            target.port,
            ssl=_tls(target, cert, key),
            server_hostname=target.host,
            timeout=target.timeout,
        )
    except ConnectRefused as exc:
        raise ConfigError(
            f"the gateway refused {what} (CONNACK {exc.return_code}): the device may be blocked, "
            "deactivated or unknown"
        ) from exc
    except ConnectionClosed as exc:
        raise ConfigError(
            f"the gateway at {where} closed the connection with {what} ({exc.__cause__ or exc}): "
            "the certificate may be revoked or expired, or ca.crt is not the gateway's CA"
        ) from exc
    except TimeoutError as exc:
        raise ConfigError(f"no MQTT session with the gateway at {where} within {target.timeout:g} s") from exc
    except OSError as exc:  # TCP itself failed
        raise ConfigError(
            f"cannot reach the gateway's MQTT listener at {where} ({exc or type(exc).__name__}); "
            "is `gateway serve` running? (--host, --port)"
        ) from exc
    return client


def _answer(body: bytes, topic: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ConfigError(f"the gateway's answer on {topic} is not JSON") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"the gateway's answer on {topic} is not a JSON object")
    return document


async def request_certificate(target: Target, files: DeviceFiles, device_id: str, csr: str) -> dict[str, Any]:
    """Ask for a certificate for `csr` over the current pair's session; the ``accepted`` body."""
    base = f"devices/{device_id}/certificate"
    client = await _connect(target, device_id, files.cert, files.key, "the current certificate")
    try:
        async with asyncio.timeout(target.timeout):
            codes = await client.subscribe((f"{base}/+", 1))
            if codes[0] == SUBACK_FAILURE:
                raise ConfigError(f"the gateway refused the subscription to {base}/+")
            await client.publish(f"{base}/renew", json.dumps({"csr": csr}), qos=1)
            while True:
                message = await client.next_message(target.timeout)
                if message.topic == f"{base}/accepted":
                    return _answer(message.payload, message.topic)
                if message.topic == f"{base}/rejected":
                    refusal = _answer(message.payload, message.topic)
                    code = str(refusal.get("code", "rejected"))
                    raise ProvisioningRefused(
                        f"the gateway refused the renewal: {refusal.get('message', '')} [{code}]", code=code
                    )
                # Anything else (the retained certificate/expiring hint) is not the answer.
    except TimeoutError as exc:
        raise ConfigError(
            f"no answer to the renewal request from {target.host}:{target.port} within {target.timeout:g} s"
        ) from exc
    except MqttError as exc:  # ConnectionClosed included
        raise ConfigError(f"lost the MQTT connection while renewing: {exc}") from exc
    finally:
        await client.disconnect()


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    der = serialization.Encoding.DER
    info = serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, info) == key.public_key().public_bytes(der, info)


def install(files: DeviceFiles, key: ec.EllipticCurvePrivateKey, cert_pem: bytes, ca_pem: bytes) -> None:
    """Keep the current pair as ``*.previous``, then write the new one (each file atomically)."""
    ca_files.write_private_key(files.previous_key, ca_files.load_private_key(files.key), overwrite=True)
    ca_files.write_public(files.previous_cert, files.cert.read_bytes())
    ca_files.write_private_key(files.key, key, overwrite=True)
    ca_files.write_public(files.cert, cert_pem)
    if ca_pem.strip() != files.ca.read_bytes().strip():
        ca_files.write_public(files.ca, ca_pem)


async def renew(files: DeviceFiles, target: Target) -> Renewed:
    """Renew the device's certificate and install it; confirm it with one admitted connection."""
    files.check()
    device_id = device_id_of(files.cert.read_bytes())
    key = ca.generate_key()
    csr = ca.make_csr(key, device_id).decode("ascii")
    accepted = await request_certificate(target, files, device_id, csr)
    try:
        cert_pem = str(accepted["certificate"]).encode("ascii")
        ca_pem = str(accepted["ca_chain"]).encode("ascii")
        renewed = Renewed(
            device_id=str(accepted.get("device_id", device_id)),
            certificate_serial=str(accepted["certificate_serial"]),
            not_after=str(accepted["not_after"]),
        )
        cert = ca.load_certificate(cert_pem)
    except (KeyError, UnicodeEncodeError, ca.CAError) as exc:
        raise ConfigError(f"the gateway's renewal answer is incomplete or malformed: {exc}") from exc
    if not _same_key(cert, key):
        raise ConfigError("the renewed certificate is not for the key made here; nothing was changed")
    try:
        install(files, key, cert_pem, ca_pem)
    except (OSError, ca.CAError) as exc:
        raise ConfigError(
            f"cannot write the renewed pair into {files.directory} ({exc}); the pair in use before is "
            f"{files.previous_key.name} / {files.previous_cert.name} if those exist, else unchanged"
        ) from exc
    await _confirm(target, files, renewed)
    files.previous_key.unlink(missing_ok=True)
    files.previous_cert.unlink(missing_ok=True)
    return renewed


async def _confirm(target: Target, files: DeviceFiles, renewed: Renewed) -> None:
    """One admitted session with the new pair: its first use, after which the old one is revoked."""
    kept = f"{files.previous_key.name} / {files.previous_cert.name}"
    try:
        client = await _connect(target, renewed.device_id, files.cert, files.key, "the renewed certificate")
    except ConfigError as exc:
        raise ConfigError(
            f"renewed certificate {renewed.certificate_serial} is in {files.cert}, but {exc.message}; "
            f"the previous pair is kept as {kept} (valid until the renewed certificate is first used)"
        ) from exc
    try:
        # The gateway answers packets of a session only once it has started it (first use
        # recorded, the superseded certificate revoked): a SUBACK means the swap is done.
        await client.subscribe((f"devices/{renewed.device_id}/errors", 0), timeout=target.timeout)
    except (MqttError, TimeoutError) as exc:
        raise ConfigError(
            f"renewed certificate {renewed.certificate_serial} connected, but the session ended early "
            f"({exc}); the previous pair is kept as {kept}"
        ) from exc
    finally:
        await client.disconnect()
