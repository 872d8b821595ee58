"""The HTTPS API (DESIGN.md §6): the only package that imports the web framework.

Receives an `ApiContext` (services built by the composition root); hands on a
FastAPI application served by uvicorn in the gateway's event loop.
"""

from gateway.api.app import create_app
from gateway.api.auth import ApiContext

__all__ = ["ApiContext", "create_app"]
