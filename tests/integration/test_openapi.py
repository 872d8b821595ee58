"""The API against its own OpenAPI document (schemathesis, over real HTTPS): every operation,
with schema-valid and schema-violating requests, answers no 5xx, and each answer conforms to
the document (a documented status, its content type, its body schema).

Bounded and deterministic: a few examples per operation and mode, Hypothesis derandomized,
no example database, no shrinking (the first failing example is reported as it came).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from gateway.core import tokens
from gateway.errors import InvalidValue
from tests.conftest import Harness

EXAMPLES = 12  # per operation and mode: ~100 runs of each, about 30 s in all on this machine
DESTRUCTIVE = ("DELETE", "/revoke", "/credentials/reset")  # run after everything that reads

# Checks left out, each for its reason:
# - positive_data_acceptance: the API refuses values the schema cannot state (a device name of
#   printable characters, the id grammar, a CSR that parses), with 422 and our error body;
# - negative_data_rejection: query parameters the API does not know are ignored, as HTTP APIs
#   commonly do (and pydantic reads a number as a date-time); the check counts both as accepted
#   schema violations.
EXCLUDED = [positive_data_acceptance, negative_data_rejection]


def make_token_checks(token: str) -> list[Any]:
    """Our own checks: the test's token never stops working, and a page agrees with its total."""

    def token_kept_working(ctx: Any, response: Any, case: Any) -> None:
        if response.status_code == 401:
            sent = response.request.headers.get("Authorization")
            assert sent != f"Bearer {token}", "the test's admin token was refused: later answers mean nothing"

    def page_matches_total(ctx: Any, response: Any, case: Any) -> None:
        if response.status_code != 200 or "json" not in response.headers.get("content-type", [""])[0]:
            return
        body = json.loads(response.content)
        if not (isinstance(body, dict) and isinstance(body.get("data"), list)):
            return
        shown, total, limit = len(body["data"]), body.get("total"), body.get("limit")
        if isinstance(limit, int):
            assert shown <= limit, f"{shown} rows on a page of {limit}"
        first_page = not body.get("offset") and not (case.query or {}).get("cursor")
        if isinstance(total, int) and isinstance(limit, int) and first_page and shown < limit:
            assert total == shown, f"a whole first page of {shown} rows, but total {total}"

    return [token_kept_working, page_matches_total]


def is_our_token(case: Any, token_id: int, token_name: str) -> bool:
    """Would this request revoke the test's own token (by id or name)?"""
    if case.method.upper() != "DELETE" or "ref" not in (case.path_parameters or {}):
        return False
    try:
        ref = tokens.parse_ref(str(case.path_parameters["ref"]))
    except InvalidValue:
        return False
    return ref in (token_id, token_name)


def fuzz(doc: dict[str, Any], base_url: str, ca: str, token: dict[str, Any], device_id: str) -> list[str]:
    """Every operation in both modes; one line of findings per operation and mode that failed."""
    schema = schemathesis.openapi.from_dict(doc)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token['token']}"
    extra = make_token_checks(token["token"])
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda op: any(mark in op.method.upper() + op.path for mark in DESTRUCTIVE))
    findings: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies = [operation.as_strategy(mode)]
            if "{device_id}" in operation.path:  # also a device that exists, with data
                strategies.append(operation.as_strategy(mode, path_parameters={"device_id": device_id}))

            @given(case=st.one_of(strategies))
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                if is_our_token(case, token["data"]["id"], token["data"]["name"]):
                    reject()
                case.call_and_validate(
                    base_url=base_url,
                    session=session,
                    verify=ca,
                    timeout=10,
                    excluded_checks=EXCLUDED,
                    additional_checks=extra,
                )

            try:
                run()
            except Unsatisfiable:  # nothing to negate: the operation takes no parameters
                continue
            except Exception as exc:  # noqa: BLE001 - each finding is reported, the run goes on
                findings.append(f"{operation.label} [{mode.value}]: {exc}")
    session.close()
    return findings


async def test_every_operation_conforms_to_the_openapi_document(gateway: Harness) -> None:
    """No operation answers 5xx, and every answer matches the OpenAPI document, for fuzzed requests."""
    started = time.monotonic()
    created = await gateway.api.post(
        "/tokens", json={"name": "schemathesis", "scopes": ["admin"]}
    )  # its own token, which the run takes care never to revoke (the init token it may)
    assert created.status_code == 201, created.text
    creds = await gateway.device("SN-FUZZ", name="fuzzed")
    client = await gateway.connect(creds)
    await client.publish("devices/SN-FUZZ/readings", '{"sensor":"t","value":21.5,"unit":"C"}', qos=1)
    await client.publish(
        "devices/SN-FUZZ/health",
        json.dumps({"uptime_s": 5, "free_heap_bytes": 1, "rssi_dbm": -60, "connection_type": "wifi",
                    "readings_sent": 1, "readings_dropped": 0}),
        qos=1,
    )  # fmt: skip
    doc = (await gateway.api.get("/openapi.json")).json()
    base_url = f"https://127.0.0.1:{gateway.app.api_port}"
    findings = await asyncio.to_thread(fuzz, doc, base_url, str(gateway.ca_path), created.json(), creds.name)
    assert not findings, "\n\n".join(findings)
    assert time.monotonic() - started < 120, "keep the run bounded: fewer EXAMPLES"


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


NO_UTC_DATE = ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00")  # before year 1, after 9999
LISTING_CURSOR = _cursor(json.dumps({"s": ["created_at"], "v": [NO_UTC_DATE[0]], "id": "x"}))
EDGES: list[tuple[str, str, dict[str, Any]]] = [
    # (method, path, request options): each once answered 500
    ("GET", "/audit", {"params": {"offset": 10**20}}),
    ("GET", "/devices", {"params": {"offset": 10**20}}),
    ("GET", "/sensors", {"params": {"offset": 10**20}}),
    ("GET", "/devices", {"params": {"last_seen_before": NO_UTC_DATE[0]}}),
    ("GET", "/devices/summary", {"params": {"last_seen_before": NO_UTC_DATE[1]}}),
    ("GET", "/audit", {"params": {"since": NO_UTC_DATE[0]}}),
    ("GET", "/audit", {"params": {"until": NO_UTC_DATE[1]}}),
    ("GET", "/devices", {"params": {"cursor": LISTING_CURSOR}}),
    ("GET", "/devices/SN-EDGE/readings", {"params": {"since": NO_UTC_DATE[0]}}),
    ("GET", "/devices/SN-EDGE/readings", {"params": {"cursor": _cursor(f"2024-01-01T00:00:00Z|{10**20}")}}),
    ("GET", "/devices/SN-EDGE/health", {"params": {"cursor": _cursor(f"{NO_UTC_DATE[0]}|1")}}),
    ("POST", "/tokens", {"json": {"name": "edge", "scopes": ["admin"], "expires_at": NO_UTC_DATE[1]}}),
    ("DELETE", "/tokens/\u00b2", {}),  # superscript two: str.isdigit, but no int
]


async def test_edge_values_are_refused_never_a_server_error(gateway: Harness) -> None:
    """Values at the edge of a type (a huge offset, a time with no UTC date, a forged cursor) get 422."""
    await gateway.register("edge", "SN-EDGE")
    answers = {}
    for method, path, options in EDGES:
        response = await gateway.api.request(method, path, **options)
        answers[f"{method} {path} {options}"] = (response.status_code, response.json()["error"]["code"])
    assert {key: status for key, (status, _) in answers.items() if status != 422} == {}, answers
