"""Many rows into one table on SQLite, for the device data writer, with few calls into the driver.

Receives a synchronous SQLAlchemy connection inside its transaction, a table and rows
(dicts with the same keys, already validated); hands on nothing. SQLAlchemy still
compiles the INSERT and supplies each column's bind processor, so values are stored
exactly as through SQLAlchemy (tests/integration/test_data_writer.py compares the
bytes), but:

- the processors are looked up once per batch instead of once per row, and equal
  datetimes in a column (a message's receipt, shared by its readings) are converted once;
- rows go in multi-row ``INSERT ... VALUES (...), (...)`` statements of 256, 128, ... 1
  rows: a few statements per batch instead of one step per row. Each step releases and
  re-takes the GIL, and a writer thread that must win the GIL back from a busy event
  loop once per row waits up to the switch interval (5 ms) each time.

Other databases get SQLAlchemy's own executemany (`insert_rows` decides).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Table, insert

from gateway.store.models import UTCDateTime

ROWS_PER_STATEMENT = 256  # the largest multi-row INSERT: 256 x columns parameters, far below SQLite's limit


class BulkInserter:
    """Compiled statements, kept across batches: (table, columns) -> SQL for 1..256 rows."""

    def __init__(self) -> None:
        self._compiled: dict[tuple[str, tuple[str, ...]], tuple[str, str, tuple[str, ...]]] = {}
        self._sql: dict[tuple[str, tuple[str, ...], int], str] = {}

    def insert_rows(self, conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """INSERT `rows` into `table` within `conn`'s transaction."""
        dialect = conn.dialect
        if dialect.name != "sqlite" or dialect.paramstyle != "qmark" or not rows:
            if rows:
                conn.execute(insert(table), list(rows))
            return
        names = tuple(rows[0])
        key = (table.name, names)
        head, values, order = self._compiled.get(key) or self._compile(conn, table, names)
        params = _parameters(conn, table, order, rows)
        done = 0
        full = len(params) // ROWS_PER_STATEMENT
        if full:  # one executemany over every full statement
            sql = self._statement(key, head, values, ROWS_PER_STATEMENT)
            conn.exec_driver_sql(
                sql,
                [
                    tuple(itertools.chain.from_iterable(params[i : i + ROWS_PER_STATEMENT]))
                    for i in range(0, full * ROWS_PER_STATEMENT, ROWS_PER_STATEMENT)
                ],
            )
            done = full * ROWS_PER_STATEMENT
        size = ROWS_PER_STATEMENT // 2
        while done < len(params):  # the rest in halving sizes: at most 8 more statements
            if len(params) - done >= size:
                sql = self._statement(key, head, values, size)
                conn.exec_driver_sql(sql, tuple(itertools.chain.from_iterable(params[done : done + size])))
                done += size
            size //= 2

    def _compile(
        self, conn: Connection, table: Table, names: tuple[str, ...]
    ) -> tuple[str, str, tuple[str, ...]]:
        statement = insert(table).compile(dialect=conn.dialect, column_keys=list(names))
        order = tuple(statement.positiontup or ())
        head, _, values = str(statement).rpartition(" VALUES ")
        if set(order) != set(names) or statement.returning or values != f"({', '.join('?' * len(order))})":
            raise RuntimeError(f"unexpected INSERT for {table.name}: {statement}")
        self._compiled[(table.name, names)] = head, values, order
        return head, values, order

    def _statement(self, key: tuple[str, tuple[str, ...]], head: str, values: str, rows: int) -> str:
        sql = self._sql.get((*key, rows))
        if sql is None:
            sql = self._sql[(*key, rows)] = f"{head} VALUES {', '.join([values] * rows)}"
        return sql


def _parameters(
    conn: Connection, table: Table, order: tuple[str, ...], rows: Sequence[dict[str, Any]]
) -> list[tuple[Any, ...]]:
    """Each row's values in statement order, through the columns' bind processors."""
    dialect = conn.dialect
    converters: list[tuple[int, Callable[[Any], Any]]] = []
    for index, name in enumerate(order):
        column_type = table.c[name].type
        process = column_type.dialect_impl(dialect).bind_processor(dialect)  # as SQLAlchemy does
        if process is not None:
            converters.append(
                (index, _once_per_value(process) if isinstance(column_type, UTCDateTime) else process)
            )
    values_of = operator.itemgetter(*order) if len(order) > 1 else lambda row: (row[order[0]],)
    params: list[tuple[Any, ...]] = []
    for row in rows:
        values = list(values_of(row))
        for index, convert in converters:
            values[index] = convert(values[index])
        params.append(tuple(values))
    return params


def _once_per_value(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`process`, remembering its answer for each value it was given (for one batch)."""
    done: dict[Any, Any] = {}

    def memo(value: Any) -> Any:
        try:
            return done[value]
        except KeyError:
            result = done[value] = process(value)
            return result

    return memo
