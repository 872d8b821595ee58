"""API tokens and the audit trail from the operator's side: ``/api/v1/tokens`` over real HTTPS
(create, list, revoke, scopes, expiry, last use, the last admin token) and the `gateway tokens`
and `gateway audit` commands against a real `gateway serve` (in process where the output is
not the point, as a subprocess once per command family)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, update
from structlog.testing import capture_logs

from gateway.core import tokens
from gateway.core.clock import iso, utcnow
from gateway.store.tokens import api_tokens
from tests.conftest import Harness
from tests.integration.processes import Gateway, InProcess, Processes, start_gateway

Json = dict[str, Any]


async def create(gw: Harness, name: str, *scopes: str, status: int = 201, **extra: Any) -> Json:
    response = await gw.api.post("/tokens", json={"name": name, "scopes": list(scopes), **extra})
    assert response.status_code == status, response.text
    body: Json = response.json()
    return body


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def listed(gw: Harness) -> dict[str, Json]:
    response = await gw.api.get("/tokens")
    assert response.status_code == 200, response.text
    return {token["name"]: token for token in response.json()["data"]}


async def test_create_list_revoke(gateway: Harness) -> None:
    """The value comes once with the new record; the list has every token, the caller's marked."""
    created = await create(gateway, "ci-reader", tokens.READ, expires_in="30d")
    value, token = created["token"], created["data"]
    assert value.startswith(tokens.API_PREFIX) and len(value) > 40
    assert token["name"] == "ci-reader" and token["scopes"] == [tokens.READ] and token["state"] == "active"
    expires = token["expires_at"]
    assert iso(utcnow() + timedelta(days=29)) < expires < iso(utcnow() + timedelta(days=31))
    assert token["current"] is False and token["last_used_at"] is None

    response = await gateway.api.get("/tokens")
    assert value not in response.text and tokens.hash_token(value) not in response.text
    by_name = await listed(gateway)
    assert set(by_name) == {"admin", "ci-reader"}
    assert by_name["admin"]["current"] is True and by_name["admin"]["scopes"] == sorted(tokens.ALL_SCOPES)

    assert (await gateway.api.get("/devices", headers=bearer(value))).status_code == 200
    revoked = await gateway.api.delete("/tokens/ci-reader")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["data"]["state"] == "revoked" and revoked.json()["data"]["revoked_at"]
    refused = await gateway.api.get("/devices", headers=bearer(value))
    assert refused.status_code == 401, "revocation applies to the very next request"
    again = await gateway.api.delete(f"/tokens/{token['id']}")  # by id this time
    assert again.status_code == 409 and again.json()["error"]["code"] == "token_revoked"
    assert (await listed(gateway))["ci-reader"]["state"] == "revoked", "revoked tokens stay listed"


async def test_names_and_scopes_are_checked(gateway: Harness) -> None:
    """Names are unique for good (revoked tokens keep theirs); names and scopes follow the rules."""
    await create(gateway, "bot", tokens.WRITE)
    taken = await create(gateway, "bot", tokens.READ, status=409)
    assert taken["error"]["code"] == "token_name_taken"
    assert (await gateway.api.delete("/tokens/bot")).status_code == 200
    assert (await create(gateway, "bot", tokens.READ, status=409))["error"]["code"] == "token_name_taken"
    for bad_name in ("1bot", "with space", "token:x", "a" * 65):
        refused = await create(gateway, bad_name, tokens.READ, status=422)
        assert refused["error"]["code"] in ("invalid_token_name", "invalid_request"), bad_name
    assert (await create(gateway, "x", "devices:delete", status=422))["error"]["code"] == "invalid_scope"
    assert (await create(gateway, "x", status=422))["error"]["code"] == "invalid_request"
    past = iso(utcnow() - timedelta(minutes=1))
    assert (await create(gateway, "x", tokens.READ, expires_at=past, status=422))["error"][
        "code"
    ] == "invalid_expiry"
    both = await create(gateway, "x", tokens.READ, expires_at=iso(utcnow()), expires_in="1d", status=422)
    assert both["error"]["code"] == "invalid_expiry"
    assert (await gateway.api.delete("/tokens/nobody")).status_code == 404


async def test_scopes_are_enforced_with_created_tokens(gateway: Harness) -> None:
    """A read token cannot register; a write token can, but cannot manage tokens or read the audit."""
    reader = (await create(gateway, "reader", tokens.READ))["token"]
    writer = (await create(gateway, "writer", tokens.WRITE))["token"]
    api = gateway.api
    assert (await api.get("/devices", headers=bearer(reader))).status_code == 200
    no = await api.post("/devices", json={"name": "x"}, headers=bearer(reader))
    assert no.status_code == 403 and no.json()["error"]["code"] == "forbidden"
    bulk = await api.post("/devices:bulk", json={"devices": [{"name": "x"}]}, headers=bearer(reader))
    assert bulk.status_code == 403
    assert (await api.post("/devices", json={"name": "x"}, headers=bearer(writer))).status_code == 201
    for request in (
        api.delete("/tokens/reader", headers=bearer(writer)),
        api.get("/tokens", headers=bearer(writer)),
        api.post("/tokens", json={"name": "mine", "scopes": [tokens.ADMIN]}, headers=bearer(writer)),
        api.get("/audit", headers=bearer(writer)),
    ):
        assert (await request).status_code == 403
    assert (await listed(gateway))["reader"]["state"] == "active"


async def test_an_expired_token_is_refused(gateway: Harness) -> None:
    """Past its expiry a token is refused (401) and listed as expired."""
    value = tokens.new_token(tokens.API_PREFIX)
    await gateway.app.store.tokens.add(
        "stale",
        tokens.hash_token(value),
        frozenset({tokens.ADMIN}),
        utcnow(),
        utcnow() - timedelta(seconds=1),
    )
    response = await gateway.api.get("/devices", headers=bearer(value))
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]
    assert (await listed(gateway))["stale"]["state"] == "expired"


async def test_last_used_at_is_written_at_most_once_a_minute(gateway: Harness) -> None:
    """The first use sets last_used_at; later uses within a minute write nothing; after it, again."""
    value = (await create(gateway, "poller", tokens.READ))["token"]
    engine = gateway.app.store.engine.sync_engine
    writes: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_TOKENS"):
            writes.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(20):
            assert (await gateway.api.get("/devices", headers=bearer(value))).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(writes) == 1, writes
    first = (await listed(gateway))["poller"]["last_used_at"]
    assert first is not None

    long_ago = utcnow() - timedelta(minutes=2)
    async with gateway.app.store.engine.begin() as conn:
        await conn.execute(
            update(api_tokens).where(api_tokens.c.name == "poller").values(last_used_at=long_ago)
        )
    assert (await gateway.api.get("/devices", headers=bearer(value))).status_code == 200
    assert (await listed(gateway))["poller"]["last_used_at"] > iso(long_ago)


async def test_the_last_admin_token_is_kept_unless_forced(gateway: Harness) -> None:
    """Revoking the only usable admin token is refused; one's own token may go; force goes anyway."""
    refused = await gateway.api.delete("/tokens/admin")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "last_admin_token"
    await create(gateway, "reader", tokens.READ)
    assert (await gateway.api.delete("/tokens/admin")).status_code == 409, "a read token is no admin"
    ops = (await create(gateway, "ops", tokens.ADMIN))["token"]
    own = await gateway.api.delete("/tokens/admin")  # the caller's own token, with another admin left
    assert own.status_code == 200 and own.json()["data"]["current"] is True
    assert (await gateway.api.get("/tokens")).status_code == 401
    last = await gateway.api.delete("/tokens/ops", headers=bearer(ops))
    assert last.status_code == 409 and last.json()["error"]["code"] == "last_admin_token"
    forced = await gateway.api.delete("/tokens/ops", params={"force": "true"}, headers=bearer(ops))
    assert forced.status_code == 200
    assert (await gateway.api.get("/devices", headers=bearer(ops))).status_code == 401


async def test_token_changes_are_audited_without_the_secret(gateway: Harness) -> None:
    """token.created (init's admin token too) and token.revoked, by whom; never the value or hash."""
    with capture_logs() as logs:
        value = (await create(gateway, "audited", tokens.WRITE, expires_in="1d"))["token"]
        assert (await gateway.api.delete("/tokens/audited")).status_code == 200
    response = await gateway.api.get("/audit", params={"target_type": "token"})
    entries = response.json()["data"]
    assert [(e["action"], e["target_id"], e["actor"]) for e in reversed(entries)] == [
        ("token.created", "admin", "system"),
        ("token.created", "audited", "token:admin"),
        ("token.revoked", "audited", "token:admin"),
    ]
    created, revoked = entries[1], entries[0]
    assert created["after"]["scopes"] == [tokens.WRITE] and created["after"]["expires_at"]
    assert revoked["before"]["revoked_at"] is None and revoked["after"]["revoked_at"]
    for secret in (value, tokens.hash_token(value), gateway.admin_token):
        assert secret not in response.text
        assert secret not in str(logs)
    assert {"token.created", "token.revoked"} <= {entry["event"] for entry in logs}


# --- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    processes = Processes()
    try:
        yield start_gateway(processes, tmp_path_factory.mktemp("tokens"))
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def fast(gw: Gateway) -> InProcess:
    return InProcess.beside(gw)


def as_token(fast: InProcess, value: str) -> InProcess:
    return InProcess({**fast.env, "GATEWAY_TOKEN": value})


def test_cli_create_list_revoke(gw: Gateway, fast: InProcess) -> None:
    """`tokens create` shows the value once; `list` never; the token's scopes hold; `revoke` ends it."""
    created = gw.cli.json("tokens", "create", "cli-reader", "--scope", "devices:read", "--expires", "30d")
    value = created["token"]
    assert created["name"] == "cli-reader" and created["scopes"] == ["devices:read"] and created["expires_at"]
    table = fast("tokens", "list")
    assert table.exit_code == 0, table.output
    assert value not in table.output
    assert "cli-reader" in table.stdout and "devices:read" in table.stdout
    admin_line = next(line for line in table.stdout.splitlines() if " admin " in line)
    assert admin_line.rstrip().endswith("*"), "the token in use is marked"
    listed = fast.json("tokens", "list")
    assert value not in str(listed) and {t["name"] for t in listed["data"]} >= {"admin", "cli-reader"}

    reader = as_token(fast, value)
    assert reader.json("devices", "list")["total"] >= 0
    error = reader.fails("devices", "register", "nope")
    assert "lacks the 'devices:write' scope" in error
    text = fast("tokens", "create", "cli-writer", "-s", "devices:read,devices:write")
    assert text.exit_code == 0, text.output
    assert "shown once" in text.stdout and "devices:read devices:write, never expires" in text.stdout

    revoked = fast.json("tokens", "revoke", "cli-reader")
    assert revoked["state"] == "revoked"
    assert "invalid, expired or revoked token" in reader.fails("devices", "list")
    assert "already revoked" in fast.fails("tokens", "revoke", "cli-reader")


def test_cli_revoking_ones_own_token_asks_first(fast: InProcess) -> None:
    """The token in use: a warning, and without a terminal only with --yes; afterwards it is refused."""
    value = fast.json("tokens", "create", "cli-ops", "--scope", "admin")["token"]
    ops = as_token(fast, value)
    refused = ops("tokens", "revoke", "cli-ops")
    assert refused.exit_code == 1
    assert "is the token this command runs with" in refused.stderr
    assert "without --yes" in refused.stderr
    assert fast.json("tokens", "list")["data"][-1]["state"] == "active"
    done = ops("tokens", "revoke", "cli-ops", "--yes")
    assert done.exit_code == 0, done.output
    assert "revoked token" in done.stdout and "warning:" in done.stderr
    assert "invalid, expired or revoked token" in ops.fails("tokens", "list")


def test_cli_the_last_admin_token_needs_force(fast: InProcess) -> None:
    """`tokens revoke admin` while it is the only admin token: refused, pointing at --force."""
    admins = [
        t for t in fast.json("tokens", "list")["data"] if "admin" in t["scopes"] and t["state"] == "active"
    ]
    assert [t["name"] for t in admins] == ["admin"]
    error = fast.fails("tokens", "revoke", "admin", "--yes")
    assert "last usable admin token" in error and "--force" in error


def test_cli_audit_filters(gw: Gateway, fast: InProcess) -> None:
    """`gateway audit`: by device, action (prefix), actor, token and time; a table with what changed."""
    fast.json("devices", "register", "Pump", "--id", "audit-pump")
    fast.json("devices", "rename", "audit-pump", "Pump A")
    fast.json("devices", "block", "audit-pump")
    value = fast.json("tokens", "create", "audit-writer", "--scope", "devices:write")["token"]
    as_token(fast, value).json("devices", "register", "By writer", "--id", "audit-by-writer")

    entries = gw.cli.json("audit", "--device", "audit-pump")
    assert [e["action"] for e in entries["data"]] == ["device.blocked", "device.renamed", "device.registered"]
    assert entries["total"] == 3
    by_writer = fast.json("audit", "--actor", "token:audit-writer")["data"]
    assert [(e["action"], e["target_id"]) for e in by_writer] == [("device.registered", "audit-by-writer")]
    token_entries = fast.json("audit", "--action", "token.", "--token", "audit-writer")["data"]
    assert [e["action"] for e in token_entries] == ["token.created"]
    assert value not in str(fast.json("audit", "--limit", "1000"))
    assert fast.json("audit", "--device", "audit-pump", "--since", "1h")["total"] == 3
    assert fast.json("audit", "--device", "audit-pump", "--until", "1h")["total"] == 0
    later = iso(utcnow() + timedelta(hours=1)) or ""
    assert fast.json("audit", "--device", "audit-pump", "--since", later)["data"] == []
    assert len(fast.json("audit", "--limit", "2")["data"]) == 2

    table = fast("audit", "--device", "audit-pump")
    assert table.exit_code == 0, table.output
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["TIME", "ACTOR", "ACTION", "TARGET", "CHANGE"]
    renamed = next(row for row in rows if "device.renamed" in row)
    assert "token:admin" in renamed and "device:audit-pump" in renamed and "name: Pump -> Pump A" in renamed
    assert "created Pump" in next(row for row in rows if "device.registered" in row)
    assert "blocked: no -> yes" in next(row for row in rows if "device.blocked" in row)
    assert rows[-1] == "3 of 3 entries"
    assert "invalid --since" in fast.fails("audit", "--since", "yesterday")
