"""The ``gateway`` command line (DESIGN.md §5); also ``python -m gateway``.

Management commands are clients of the running gateway's HTTPS API, so that a block
or revoke cuts the live session at once. `init`, `serve`, `operators issue` work on
the local CA and database directly.
"""

from gateway.cli.main import app, main

__all__ = ["app", "main"]
