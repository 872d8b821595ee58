"""The gateway's exception tree. Foreign exceptions are mapped at the seams.

    GatewayError
    ├── ConfigError            settings unreadable or invalid
    ├── InvalidValue           a value object refused its input (ids, topics, payloads)
    │   ├── ProtocolViolation  an MQTT packet breaks the 3.1.1 rules: the connection is closed
    │   ├── RowsRejected       rows of a bulk request refused, each with its reason (``rows``)
    │   └── FieldRejected      one field of a body refused; ``path`` names it (``settings.interval_s``)
    ├── NotFound               a device / token / certificate does not exist
    ├── Conflict               the request clashes with current state (duplicate id, final status)
    ├── InvalidTransition      a lifecycle change the table does not allow
    ├── ProvisioningRefused    token or CSR not acceptable (carries a code)
    ├── RateLimited            too many attempts from one source; retry after ``retry_after_s``
    ├── Unauthorized           API credential missing or invalid
    ├── Forbidden              API credential lacks the scope
    ├── StoreUnavailable       the database could not be reached or timed out
    └── ApiError               the CLI's view of an error response from the API

Each class carries a stable machine-readable ``code``; the API maps them to HTTP
statuses in one table (`gateway.api.errors`).
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    code = "gateway_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(GatewayError):
    code = "config_error"


class InvalidValue(GatewayError):
    code = "invalid_value"


class ProtocolViolation(InvalidValue):
    code = "protocol_violation"


class RowsRejected(InvalidValue):
    """A bulk request refused as a whole; `rows` says which rows and why (``row``, ``code``, ...)."""

    code = "invalid_rows"

    def __init__(self, message: str, *, rows: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.rows = rows


class FieldRejected(InvalidValue):
    """A value refused at a place in a request body; `path` says where (``settings.interval_s``)."""

    def __init__(self, message: str, *, path: str, code: str | None = None) -> None:
        super().__init__(f"{path}: {message}", code=code)
        self.path = path


class NotFound(GatewayError):
    code = "not_found"


class Conflict(GatewayError):
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class ProvisioningRefused(GatewayError):
    code = "provisioning_refused"


class RateLimited(GatewayError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(GatewayError):
    code = "unauthorized"


class Forbidden(GatewayError):
    code = "forbidden"


class StoreUnavailable(GatewayError):
    code = "store_unavailable"


class ApiError(GatewayError):
    """An error response from the gateway's API, as seen by the CLI."""

    code = "api_error"

    def __init__(
        self, message: str, *, code: str | None = None, status: int = 0, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.detail = detail or {}  # the whole ``error`` object of the response (e.g. its ``rows``)
