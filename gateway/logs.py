"""Logging: one `structlog.configure`, events with dotted names and bound context.

JSON lines when stderr is not a terminal (containers, CI), a readable console
otherwise. Standard-library loggers (amqtt, uvicorn) are routed through the same
renderer. Secrets never reach a log call: tokens, keys and passwords are not passed
to loggers anywhere in the gateway, and `redact` guards the few dicts that could
carry them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import structlog

from gateway.config import LoggingSettings

_SECRET_KEYS = frozenset({"token", "registration_token", "password", "authorization", "key", "private_key"})


def redact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `fields` with secret-looking values replaced."""
    return {k: ("[redacted]" if k.lower() in _SECRET_KEYS else v) for k, v in fields.items()}


def _drop_secrets(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in list(event_dict):
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def configure(settings: LoggingSettings, *, cache: bool = True) -> None:
    """Configure structlog and the standard library once, at start-up.

    `cache=False` keeps loggers reconfigurable, which `structlog.testing.capture_logs` needs.
    """
    level = getattr(logging, settings.level.upper())
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # amqtt logs every packet and take-over at INFO/WARNING in its own words; the
    # gateway logs the events that matter itself, so keep amqtt to real problems.
    logging.getLogger("amqtt").setLevel(max(level, logging.ERROR))
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(max(level, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
