"""Every route of the OpenAPI document enforces its scope (DESIGN.md §6), over real HTTPS.

`SCOPES` below is the expected scope of every route; a route in the document without an
entry (a new one) fails the test, and so does an entry for a route that is gone. For each
protected route: no token and an unknown token get 401, a token without the scope gets 403
(before the request's own values are judged), and a token with it gets past the check. A
public route answers without a token.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.conftest import Harness

PUBLIC, READ, WRITE, ADMIN = None, "devices:read", "devices:write", "admin"
RANK = [READ, WRITE, ADMIN]  # each grants those before it (gateway.core.tokens)

SCOPES: dict[tuple[str, str], str | None] = {
    # public: the container's health check, the CA's public material, and provisioning (the
    # one-time registration token in the body is the credential)
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/api/v1/ca/certificate"): PUBLIC,
    ("GET", "/api/v1/ca/crl"): PUBLIC,
    ("POST", "/api/v1/devices/provision"): PUBLIC,
    # devices:read: looking
    ("GET", "/api/v1/devices"): READ,
    ("GET", "/api/v1/devices/summary"): READ,
    ("GET", "/api/v1/devices/{device_id}"): READ,
    ("GET", "/api/v1/devices/{device_id}/certificates"): READ,
    ("GET", "/api/v1/devices/{device_id}/connections"): READ,
    ("GET", "/api/v1/devices/{device_id}/readings"): READ,
    ("GET", "/api/v1/devices/{device_id}/health"): READ,
    ("GET", "/api/v1/devices/{device_id}/health/latest"): READ,
    ("GET", "/api/v1/devices/{device_id}/health/summary"): READ,
    ("GET", "/api/v1/devices/{device_id}/components"): READ,
    ("GET", "/api/v1/sensors"): READ,
    ("GET", "/api/v1/connect-failures"): READ,
    ("GET", "/api/v1/device-groups"): READ,
    ("GET", "/api/v1/device-groups/{group_id}"): READ,
    ("GET", "/api/v1/device-groups/{group_id}/members"): READ,
    ("GET", "/api/v1/sites"): READ,
    ("GET", "/api/v1/sites/{site_id}"): READ,
    ("GET", "/api/v1/device-profiles"): READ,
    ("GET", "/api/v1/device-profiles/{profile_id}"): READ,
    ("GET", "/api/v1/device-profiles/{profile_id}/conformance"): READ,
    # devices:write: registering and managing devices, short of taking credentials away for good
    ("POST", "/api/v1/devices"): WRITE,
    ("POST", "/api/v1/devices:bulk"): WRITE,
    ("PATCH", "/api/v1/devices/{device_id}"): WRITE,
    ("POST", "/api/v1/devices/{device_id}/block"): WRITE,
    ("POST", "/api/v1/devices/{device_id}/unblock"): WRITE,
    ("POST", "/api/v1/device-groups"): WRITE,
    ("PUT", "/api/v1/device-groups/{group_id}"): WRITE,
    ("POST", "/api/v1/device-groups/{group_id}/members"): WRITE,
    ("DELETE", "/api/v1/device-groups/{group_id}/members/{device_id}"): WRITE,
    ("POST", "/api/v1/sites"): WRITE,
    ("PUT", "/api/v1/sites/{site_id}"): WRITE,
    ("POST", "/api/v1/device-profiles"): WRITE,
    ("PUT", "/api/v1/device-profiles/{profile_id}"): WRITE,
    # admin: revocation and deletion, credentials, API tokens, the audit trail
    ("POST", "/api/v1/devices/{device_id}/revoke"): ADMIN,
    ("DELETE", "/api/v1/devices/{device_id}"): ADMIN,
    ("POST", "/api/v1/devices/{device_id}/certificates"): ADMIN,
    ("POST", "/api/v1/devices/{device_id}/credentials/reset"): ADMIN,
    ("POST", "/api/v1/connect-failures/{fingerprint}/approve"): ADMIN,
    ("DELETE", "/api/v1/device-groups/{group_id}"): ADMIN,
    ("DELETE", "/api/v1/sites/{site_id}"): ADMIN,
    ("DELETE", "/api/v1/device-profiles/{profile_id}"): ADMIN,
    ("GET", "/api/v1/tokens"): ADMIN,
    ("POST", "/api/v1/tokens"): ADMIN,
    ("DELETE", "/api/v1/tokens/{ref}"): ADMIN,
    ("GET", "/api/v1/audit"): ADMIN,
}


def routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def concrete(path: str) -> str:
    """A path with every parameter filled by a value that names nothing."""
    return re.sub(r"\{[^}]+\}", "no-such-thing", path)


async def call(gateway: Harness, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}" if token else ""}
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}  # wrong bodies: judged after auth
    url = f"https://127.0.0.1:{gateway.app.api_port}{concrete(path)}"
    return await gateway.api.request(method, url, headers=headers, **body)


async def test_every_route_has_an_expected_scope(gateway: Harness) -> None:
    """The table names exactly the document's routes, and the document marks as secured exactly
    the routes that need a scope."""
    doc = (await gateway.api.get("/openapi.json")).json()
    found = routes(doc)
    assert sorted(found - set(SCOPES)) == [], "new routes: add each to SCOPES with its scope"
    assert sorted(set(SCOPES) - found) == [], "routes gone: drop them from SCOPES"
    secured = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if operation.get("security")
    }
    assert secured == {route for route, scope in SCOPES.items() if scope is not PUBLIC}


def outcome(response: httpx.Response) -> str:
    """What the scope check made of a request: refused for want of a token, or of a scope, or let through."""
    if response.status_code == 401:
        return "unauthorized"
    if response.status_code == 403 and response.json()["error"]["code"] == "forbidden":
        return "forbidden"
    return "admitted"


async def test_every_route_enforces_its_scope(gateway: Harness) -> None:
    """No token or an unknown one: 401; a token without the scope: 403; with it: past the check."""
    tokens: dict[str, str] = {ADMIN: gateway.admin_token}
    for scope in (READ, WRITE):
        created = await gateway.api.post("/tokens", json={"name": scope.replace(":", "-"), "scopes": [scope]})
        assert created.status_code == 201, created.text
        tokens[scope] = created.json()["token"]
    expected: dict[str, dict[str, str]] = {}
    seen: dict[str, dict[str, str]] = {}
    # Admin routes last: whatever they do to things that do not exist, they do it after the rest.
    for (method, path), scope in sorted(SCOPES.items(), key=lambda item: RANK.index(item[1] or READ)):
        route = f"{method} {path}"
        if scope is PUBLIC:
            callers: dict[str, str | None] = {"no token": None}
            expected[route] = {"no token": "admitted"}
        else:
            callers = {
                "no token": None,
                "unknown token": "gat_unknown",
                **{held: tokens[held] for held in RANK},
            }
            expected[route] = {"no token": "unauthorized", "unknown token": "unauthorized"} | {
                held: "admitted" if RANK.index(held) >= RANK.index(scope) else "forbidden" for held in RANK
            }
        seen[route] = {}
        for who, token in callers.items():
            seen[route][who] = outcome(await call(gateway, method, path, token))
    assert {r: s for r, s in seen.items() if s != expected[r]} == {
        r: e for r, e in expected.items() if seen[r] != e
    }
