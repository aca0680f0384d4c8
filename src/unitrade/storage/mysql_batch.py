"""MySQL/MariaDB writes on the driver's cursor: statements bound by the driver and sent
several to a round trip.

A write transaction on MySQL was a dozen round trips on one connection, each a turn of the
event loop (the asyncio driver), and the cell's writes are serial: at the center, whose
every order reserves stock, the writer held the cell's lock ~8 ms per write, 70 % of it
waiting for answers (docs/benchmarks.md, MariaDB writes in batches). MySQL has no pipeline
like PostgreSQL's, but a connection with MULTI_STATEMENTS (asyncmy's default, as PyMySQL's)
runs several `;`-separated statements sent as one query and answers each in turn. So a
statement whose result nobody reads (an insert, a changelog row, a savepoint) waits in a
batch and goes with the next statement whose result is read, or with the COMMIT.

Values are bound by the driver's own escaping (`mogrify`, what its `execute` does for
every query anyway): no SQL is ever built from a value by hand here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table

# One statement's text at most, and the batch's before it is sent: a few hundred KB keeps
# well inside MySQL's max_allowed_packet (16 MiB by default in MariaDB 10.11, 64 MiB in
# MySQL 8), as the driver's own executemany does (its max_stmt_length is 1,024,000).
STATEMENT_BYTES_MAX = 1_000_000
BATCH_STATEMENTS_MAX = 256

Mogrify = Callable[[str, Any], str]


def insert_rows_sql(mogrify: Mogrify, sql: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """`sql` (an `INSERT ... VALUES (%(a)s, ...)` of one row) for every row of `rows`, as
    few multi-row INSERTs as fit STATEMENT_BYTES_MAX each."""
    head, found, values = sql.partition(" VALUES ")
    assert found and values.startswith("("), f"not a one-row INSERT: {sql[:80]}"
    texts: list[str] = []
    part: list[str] = []
    size = len(head) + len(found)
    for row in rows:
        value = mogrify(values, row)
        if part and size + len(value) + 1 > STATEMENT_BYTES_MAX:
            texts.append(head + found + ",".join(part))
            part, size = [], len(head) + len(found)
        part.append(value)
        size += len(value) + 1
    if part:
        texts.append(head + found + ",".join(part))
    return texts


def delete_keys_sql(
    mogrify: Mogrify, quote: Callable[[str], str], table: Table, keys: Sequence[Mapping[str, Any]]
) -> list[str]:
    """DELETEs of the rows with these primary keys, `key IN (...)`: a range scan of the
    primary key, where one DELETE per key cost a statement each (a replica's apply)."""
    columns = [str(c.name) for c in table.primary_key.columns]
    marks = ", ".join(["%s"] * len(columns))
    target = quote(columns[0]) if len(columns) == 1 else f"({', '.join(map(quote, columns))})"
    head = f"DELETE FROM {quote(table.name)} WHERE {target} IN ("
    texts: list[str] = []
    part: list[str] = []
    size = len(head)
    for key in keys:
        value = mogrify(marks if len(columns) == 1 else f"({marks})", [key[c] for c in columns])
        if part and size + len(value) + 1 > STATEMENT_BYTES_MAX:
            texts.append(head + ",".join(part) + ")")
            part, size = [], len(head)
        part.append(value)
        size += len(value) + 1
    if part:
        texts.append(head + ",".join(part) + ")")
    return texts
