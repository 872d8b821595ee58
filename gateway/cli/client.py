"""The CLI's HTTPS client of the running gateway's API.

Receives the settings (API URL, data and certs directories) and a token from
``GATEWAY_TOKEN`` or ``<data_dir>/admin.token``; hands on decoded JSON bodies, or
raises `ApiError` carrying the API's error code and message.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import httpx

from gateway.config import Settings
from gateway.errors import ApiError, ConfigError


def read_token(settings: Settings) -> str:
    token = os.environ.get("GATEWAY_TOKEN", "").strip()
    if token:
        return token
    path = settings.admin_token_path
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no API token: set GATEWAY_TOKEN or run `gateway init` (it writes {path})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the API token from {path}: {exc}") from exc


def ca_bundle(settings: Settings, cacert: Path | None = None) -> Path:
    path = cacert or settings.paths.certs_dir / "ca.crt"
    if not path.exists():
        raise ConfigError(
            f"CA certificate {path} not found: pass --cacert with the gateway's CA certificate "
            "(served at GET /api/v1/ca/certificate)"
        )
    return path


def trust_context(cacert: Path) -> ssl.SSLContext:
    """A client TLS context that trusts `cacert` (httpx takes a context, not a path)."""
    try:
        return ssl.create_default_context(cafile=str(cacert))
    except OSError as exc:  # ssl.SSLError included: not a PEM certificate
        raise ConfigError(f"cannot load the CA certificate {cacert}: {exc}") from exc


class ApiClient:
    def __init__(
        self, base_url: str, *, token: str | None, trust: ssl.SSLContext, timeout: float = 15.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.base_url + "/api/v1", headers=headers, verify=trust, timeout=timeout
        )

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        *,
        api: str | None = None,
        authenticated: bool = True,
        cacert: Path | None = None,
    ) -> ApiClient:
        return cls(
            api or settings.api_url,
            token=read_token(settings) if authenticated else None,
            trust=trust_context(ca_bundle(settings, cacert)),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ApiError(
                f"cannot reach the gateway API at {self.base_url} ({exc}); is `gateway serve` running?",
                code="unreachable",
            ) from exc
        except httpx.HTTPError as exc:
            raise ApiError(f"request to {self.base_url} failed: {exc}", code="transport_error") from exc
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                code, message = str(error["code"]), str(error["message"])
            except (ValueError, KeyError, TypeError):
                error, code, message = {}, "http_error", f"HTTP {response.status_code}: {response.text[:200]}"
            raise ApiError(message, code=code, status=response.status_code, detail=error)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text
