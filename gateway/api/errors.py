"""Errors on the wire: ``{"error": {"code", "message"}}`` with a fitting HTTP status.

The one table mapping the gateway's exceptions to HTTP statuses (`STATUS`). Unknown
exceptions become 500 with a generic message; their details go to the log only. A refused
bulk request (`RowsRejected`) adds ``rows`` to the error: each row's number, code and reason; a
refused field (`FieldRejected`) adds its ``path`` (``settings.interval_s``).

The OpenAPI document says so too (`document`): every operation lists the statuses of that
table with the ``Error`` body (401 only where a bearer token is asked for; a status the route
documents itself is kept), in place of FastAPI's own 422 body, which this API never sends.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.errors import (
    Conflict,
    FieldRejected,
    Forbidden,
    GatewayError,
    InvalidTransition,
    InvalidValue,
    NotFound,
    ProvisioningRefused,
    RateLimited,
    RowsRejected,
    StoreUnavailable,
    Unauthorized,
)
from gateway.logs import get_logger

log = get_logger("gateway.api")

# Most specific first: the first matching class decides.
STATUS: list[tuple[type[GatewayError], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (ProvisioningRefused, 403),
    (RateLimited, 429),
    (NotFound, 404),
    (InvalidTransition, 409),
    (Conflict, 409),
    (InvalidValue, 422),
    (StoreUnavailable, 503),
    (GatewayError, 400),
]


def status_of(exc: GatewayError) -> int:
    return next(status for cls, status in STATUS if isinstance(exc, cls))


def error_body(code: str, message: str, **extra: Any) -> dict[str, dict[str, Any]]:
    return {"error": {"code": code, "message": message, **extra}}


# The body of every error response, as the OpenAPI document states it.
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            "additionalProperties": True,  # rows (bulk), path (a refused field)
        }
    },
}
ERROR_DESCRIPTIONS = {
    400: "Bad request (e.g. a body that is not JSON)",
    401: "Missing, invalid, expired or revoked bearer token",
    403: "The token lacks the scope, or the request was refused",
    404: "Not found",
    409: "Conflicts with the current state",
    422: "Invalid value",
    429: "Too many attempts from this address: retry after the Retry-After header's seconds",
    503: "The database is unavailable",
}


def document(app: FastAPI) -> None:
    """Make `app`'s OpenAPI document list the error responses of every operation."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Error"] = ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, never sent
            schemas.pop(name, None)
        body = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's, with its own body
            for status in sorted({status for _, status in STATUS}):
                if status == 401 and not operation.get("security"):
                    continue
                documented = {"description": ERROR_DESCRIPTIONS[status], "content": body}
                responses.setdefault(str(status), documented)
            operation["responses"] = dict(sorted(responses.items()))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def install(app: FastAPI) -> None:
    document(app)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        extra: dict[str, Any] = {"rows": exc.rows} if isinstance(exc, RowsRejected) else {}
        if isinstance(exc, FieldRejected):
            extra["path"] = exc.path
        return JSONResponse(
            error_body(exc.code, exc.message, **extra), status_code=status_of(exc), headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body')}: {err.get('msg')}"
            for err in exc.errors()
        )
        return JSONResponse(error_body("invalid_request", problems or "invalid request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("api.unhandled_error", path=request.url.path, error=type(exc).__name__, exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "internal error; see the gateway log"), status_code=500
        )
