"""Shared fixtures: a real gateway on loopback (port 0, tmp dirs) and helpers that act as
operator and devices over real HTTPS and real mutual-TLS MQTT."""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest

import ca
from ca import files as ca_files
from gateway.app import GatewayApp
from gateway.config import ApiSettings, LoggingSettings, MqttSettings, PathsSettings, Settings
from gateway.mqtt_client import MqttClient

HOST = "127.0.0.1"

# Property tests are deterministic by default (the same examples every run, so CI never
# fails on a draw it cannot show again); HYPOTHESIS_PROFILE=explore searches afresh.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis.settings.register_profile("explore", max_examples=1000)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def make_settings(root: Path, **mqtt: Any) -> Settings:
    return Settings(
        paths=PathsSettings(data_dir=root / "data", certs_dir=root / "certs"),
        mqtt=MqttSettings(host=HOST, port=0, **mqtt),
        api=ApiSettings(host=HOST, port=0),
        logging=LoggingSettings(level="warning"),
    )


@dataclass(frozen=True)
class Creds:
    """A device's (or operator's) files, as enrollment wrote them."""

    name: str
    key: Path
    cert: Path
    ca: Path

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class Harness:
    """Drives one running gateway like its users do: HTTPS API as operator, mTLS MQTT as devices."""

    def __init__(self, app: GatewayApp, root: Path) -> None:
        self.app = app
        self.root = root
        self.ca_path = app.settings.paths.certs_dir / "ca.crt"
        token = app.init_report.admin_token if app.init_report else None
        assert token, "a fresh gateway prints its admin token"
        self.admin_token = token
        self.api = httpx.AsyncClient(
            base_url=f"https://{HOST}:{app.api_port}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            verify=ssl.create_default_context(cafile=str(self.ca_path)),
            timeout=10,
        )
        self._clients: list[MqttClient] = []

    @property
    def mqtt_port(self) -> int:
        return self.app.mqtt_port

    async def register(self, name: str = "sensor", device_id: str | None = None) -> tuple[str, str]:
        body: dict[str, Any] = {"name": name}
        if device_id:
            body["id"] = device_id
        response = await self.api.post("/devices", json=body)
        assert response.status_code == 201, response.text
        data = response.json()
        return data["data"]["id"], data["registration_token"]

    async def enroll(self, token: str, name: str = "device") -> Creds:
        key = ca.generate_key()
        csr = ca.make_csr(key, "whoever").decode()
        response = await self.api.post(
            "/devices/provision", json={"token": token, "csr": csr}, headers={"Authorization": ""}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        folder = self.root / "devices" / body["device_id"]
        folder.mkdir(parents=True, exist_ok=True)
        ca_files.write_private_key(folder / "device.key", key, overwrite=True)
        (folder / "device.crt").write_text(body["certificate"])
        (folder / "ca.crt").write_text(body["ca_chain"])
        return Creds(body["device_id"], folder / "device.key", folder / "device.crt", folder / "ca.crt")

    async def device(self, device_id: str | None = None, name: str = "sensor") -> Creds:
        _, token = await self.register(name, device_id)
        return await self.enroll(token)

    async def operator(self, name: str = "ops") -> Creds:
        from gateway.cli.operators import issue_operator

        issued = await issue_operator(self.app.settings, name, self.root / "operators" / name)
        return Creds(name, issued.key_path, issued.cert_path, issued.ca_path)

    def client(self, client_id: str = "", **kwargs: Any) -> MqttClient:
        client = MqttClient(client_id=client_id, **kwargs)
        self._clients.append(client)
        return client

    async def connect(self, creds: Creds, client_id: str | None = None, **kwargs: Any) -> MqttClient:
        client = self.client(creds.name if client_id is None else client_id, **kwargs)
        await client.connect(HOST, self.mqtt_port, ssl=creds.tls(), server_hostname=HOST)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        await self.api.aclose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def gateway(settings: Settings, tmp_path: Path) -> AsyncIterator[Harness]:
    app = GatewayApp(settings)
    await app.start()
    harness = Harness(app, tmp_path)
    try:
        yield harness
    finally:
        await harness.close()
        await app.stop()


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    """Configure logging as the CLI does (amqtt kept to errors); info level so tests can capture events."""
    from gateway import logs

    logs.configure(LoggingSettings(level="info", format="console"), cache=False)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL the tests may empty: ``GATEWAY_TEST_POSTGRES_URL``, or a throwaway server
    (Debian's postgresql package, as `.ci/system-deps` installs it) on 127.0.0.1 and a free port."""
    import glob
    import os
    import shutil
    import subprocess
    import tempfile

    given = os.environ.get("GATEWAY_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail(
            "no PostgreSQL server: run ./.ci/system-deps (apt-get install postgresql) "
            "or set GATEWAY_TEST_POSTGRES_URL"
        )
    bin_dir = Path(found[-1]).parent
    # Not under pytest's tmp_path: its parents are private to us, and the server is another user.
    data = Path(tempfile.mkdtemp(prefix="gateway-test-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=120)
    run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"])
    options = f"-c listen_addresses={HOST} -p {port} -k {data} -c fsync=off"
    pg_ctl = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    run([*pg_ctl, "-o", options, "-w", "-l", str(data / "log"), "start"])
    try:
        yield f"postgresql+asyncpg://postgres@{HOST}:{port}/postgres"
    finally:
        subprocess.run(
            [*pg_ctl, "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(data, ignore_errors=True)
