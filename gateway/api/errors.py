"""Errors on the wire: ``{"error": {"code", "message"}}`` with a fitting HTTP status.

The one table mapping the gateway's exceptions to HTTP statuses (`STATUS`). Unknown
exceptions become 500 with a generic message; their details go to the log only. A refused
bulk request (`RowsRejected`) adds ``rows`` to the error: each row's number, code and reason; a
refused field (`FieldRejected`) adds its ``path`` (``settings.interval_s``).
"""

from __future__ import annotations

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


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
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
