"""The registry store: the only package that imports SQLAlchemy.

Receives records and values from services; hands back frozen records
(`gateway.core.records`). SQLite (aiosqlite, WAL) by default, PostgreSQL (asyncpg)
for several gateway instances.
"""

from gateway.store.store import Store

__all__ = ["Store"]
