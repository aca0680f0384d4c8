"""A region's copy of one cell, and the unit of work that writes it.

`CellStore.write(work)` is the only way to change a cell copy on behalf of a client: it
admits the write through the fence and runs `work(tx)` in one transaction which, before it
commits, appends one changelog row per changed row: epoch, origin region, table, primary
key, operation and the row image after the change; replication streams these rows
(docs/architecture.md).

Where transactions run depends on the engine: on SQLite inline on the event loop (the
writer thread when another process holds the lock), on PostgreSQL on threads owned by the
store (all writes of a cell copy on one writer thread, reads on a small pool: one thread hop
per transaction, whatever its statement count), on MySQL/MariaDB on the event loop through
an asyncio driver (one writer connection, a small reader pool). On PostgreSQL and MySQL the
cell_meta row lock, taken first, serialises the writes of every process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import operator
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Table,
    UniqueConstraint,
    bindparam,
    case,
    delete,
    func,
    insert,
    inspect,
    null,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.mysql.asyncmy import dialect as asyncmy_dialect
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import ClauseElement, Delete, Executable, Insert, Select, Update
from sqlalchemy.util import await_only, greenlet_spawn

from unitrade.errors import (
    Overloaded,
    ReadTimeout,
    RegionUnavailable,
    WriteBanned,
    WriteOutcomeUnknown,
    WrongRegion,
)
from unitrade.planted import DROP_ACKED_ORDERS, planted
from unitrade.storage.engine import (
    READ_POOL_SIZE,
    backend_of,
    create_async_cell_engine,
    create_cell_engine,
    create_inline_engine,
    is_async,
)
from unitrade.storage.fence import Fence
from unitrade.storage.mysql_batch import (
    BATCH_STATEMENTS_MAX,
    STATEMENT_BYTES_MAX,
    delete_keys_sql,
    insert_rows_sql,
)
from unitrade.storage.schema import (
    METADATA_BY_KIND,
    cell_meta,
    changelog,
    common,
    local,
    tables_of,
)
from unitrade.storage.tail import ChangelogTail, encode_change
from unitrade.topology.rule import CellInfo

T = TypeVar("T")
log = logging.getLogger("unitrade.storage")
ROWS_PER_WRITE_MAX = 1_000  # a single transaction never changes more rows than this
# PostgreSQL and MySQL: the writes of one cell copy queued while its writer was busy commit
# together, at most this many in one transaction (group commit, `_commit_group`).
GROUP_WRITES_MAX = 64
PENDING_WRITES_MAX = 1_024  # writes queued for one cell copy before callers are refused
QUEUE_WAIT_S_MAX = 10.0
# Reads get the same two bounds as writes: how many may wait for a reader thread (beyond the
# READ_POOL_SIZE running), and how long one may wait before it would run. Past the first the
# read is refused at once (`overloaded`), past the second it is dropped from the queue
# (`read_timeout`): both 503 with Retry-After, never an unbounded queue of threads' work.
PENDING_READS_MAX = 1_024
READ_QUEUE_WAIT_S_MAX = QUEUE_WAIT_S_MAX


def now_ms() -> int:
    return int(time.time() * 1000)


def to_json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


def primary_key_of(table: Table, row: Mapping[str, Any]) -> dict[str, Any]:
    return {str(c.name): row[c.name] for c in table.primary_key.columns}


# Statements are built once per shape and executed with bind parameters: building them per
# call made a transaction 2.7-2.8x slower, in SQLAlchemy's coercion and cache-key code
# (benchmarks/bench_micro.py, docs/benchmarks.md).
@functools.cache
def _insert_statement(table: Table) -> Insert:
    return insert(table)


@functools.cache
def _replace_statement(table: Table) -> Insert:
    """SQLite's INSERT OR REPLACE: a row in the way is deleted first. Only a row with the same
    primary key may be in the way: no table of the schema has another unique constraint."""
    assert not any(index.unique for index in table.indexes), table.name
    assert not any(isinstance(c, UniqueConstraint) for c in table.constraints), table.name
    return insert(table).prefix_with("OR REPLACE")


@functools.cache
def _update_statement(
    table: Table,
    set_columns: tuple[str, ...],
    add_columns: tuple[str, ...],
    at_least_columns: tuple[str, ...],
    equal_columns: tuple[str, ...],
    returning: bool = True,
) -> Update:
    values: dict[str, Any] = {c: bindparam(f"s_{c}") for c in set_columns}
    values.update({c: table.c[c] + bindparam(f"a_{c}") for c in add_columns})
    conditions = [c == bindparam(f"k_{c.name}") for c in table.primary_key.columns]
    conditions += [table.c[c] >= bindparam(f"m_{c}") for c in at_least_columns]
    conditions += [table.c[c] == bindparam(f"w_{c}") for c in equal_columns]
    statement = update(table).where(*conditions).values(values)
    return statement.returning(*table.columns) if returning else statement


@functools.cache
def _delete_statement(table: Table) -> Delete:
    return delete(table).where(*(c == bindparam(f"k_{c.name}") for c in table.primary_key.columns))


@functools.cache
def _delete_in_statement(table: Table) -> Delete:
    columns = list(table.primary_key.columns)
    key = columns[0] if len(columns) == 1 else tuple_(*columns)
    return delete(table).where(key.in_(bindparam("keys", expanding=True)))


@functools.cache
def by_key(table: Table) -> Select[Any]:
    """`SELECT * FROM table WHERE <primary key> = :k_<column>...`, built once."""
    return select(table).where(*(c == bindparam(f"k_{c.name}") for c in table.primary_key.columns))


def key_params(key: Mapping[str, Any]) -> dict[str, Any]:
    return {f"k_{name}": value for name, value in key.items()}


# Taken first in every write transaction on engines with row locks: writes to one cell copy
# are then serialised as on SQLite (BEGIN IMMEDIATE), so a transaction's reads stay true
# until it commits. Without it, two PostgreSQL transactions under READ COMMITTED read the
# same sequence row and handed out the same order IDs (tests/test_sequences.py). It also
# reads the database's half of the fence (`fence_epoch`, schema.py) under that lock.
_LOCK_CELL = (
    select(cell_meta.c.last_position, cell_meta.c.fence_epoch)
    .where(cell_meta.c.cell_id == bindparam("k_cell_id"))
    .with_for_update()
)
_RAISE_FENCE = (
    update(cell_meta)
    .where(
        cell_meta.c.cell_id == bindparam("k_cell_id"),
        cell_meta.c.fence_epoch < bindparam("version"),
    )
    .values(fence_epoch=bindparam("version"))
)
_META = select(cell_meta.c.last_position, cell_meta.c.trimmed_position).where(
    cell_meta.c.cell_id == bindparam("k_cell_id")
)
SCHEMA_LOCK_KEY = 0x756E6974736368  # PostgreSQL advisory lock: creating a copy's schema
# How often a process polls a shared copy's position while a pull or wait is held: at
# first, and right after it moved; doubling to the second while it stands still.
POLL_S_MIN = 0.005
POLL_S_MAX = 0.05
# How long raising the database fence waits for the cell's lock (PostgreSQL; MySQL's
# innodb_lock_wait_timeout is the same 10 s for every transaction): a process frozen
# inside a write holds the lock, and the raise is tried again until it gets it.
FENCE_LOCK_WAIT_MS = 10_000

# The write paths of SQLite (inline), PostgreSQL (the writer thread) and MySQL/MariaDB (the
# loop, storage/mysql_batch.py) execute these statements on the driver's cursor: SQLAlchemy
# renders each statement shape once (named parameters), and its per-call execution
# machinery is skipped. On SQLite that machinery
# was ~0.35 ms of a 0.45 ms transaction: the same transaction then takes 0.10-0.12 ms, as
# fast as hand-written SQL (benchmarks/bench_micro.py); on PostgreSQL it was 85-100 us of
# CPU per statement against psycopg's own 31-47 (docs/benchmarks.md, Writes on the driver's
# cursor). SQLAlchemy stays the dialect layer, and the reads go through it in full. Every
# column type of the schema is an integer or a string, so there are no bind or result
# conversions to lose.
_DIALECTS = {
    "sqlite": sqlite_dialect(paramstyle="named"),
    # pyformat (%(name)s), with the casts psycopg's server-side binding needs
    "postgresql": psycopg_dialect(),  # type: ignore[no-untyped-call]
    # pyformat, bound by the driver's own escaping (`mogrify`) into a batch of statements
    "mysql": asyncmy_dialect(paramstyle="pyformat"),
}


@functools.lru_cache(maxsize=1024)  # bounded: an ad-hoc statement is a new key each time
def _driver_sql(statement: Executable, backend: str) -> tuple[str, dict[str, Any]]:
    """The SQL of a statement for `backend`'s driver and the values of the literals it
    binds."""
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(dialect=_DIALECTS[backend])
    sql = str(compiled)
    assert "POSTCOMPILE" not in sql, "expanding IN lists are not for the driver write path"
    return sql, dict(compiled.params)


# SQLite's driver binds `?` parameters from a tuple: no name to look up per value, and no
# dict to build per row. Replication's bulk statements (a replica's apply, a snapshot) use
# it, where the rows cost most (docs/benchmarks.md, A cheaper apply).
_SQLITE_QMARK = sqlite_dialect(paramstyle="qmark")


@functools.cache
def _qmark_sql(statement: Executable) -> tuple[str, tuple[str, ...]]:
    """SQLite: an INSERT or DELETE of one row with `?` parameters, and the row's keys in
    their order (a delete's key columns without their `k_` prefix)."""
    assert isinstance(statement, (Insert, Delete))
    compiled = statement.compile(dialect=_SQLITE_QMARK)
    names = tuple(compiled.positiontup or ())
    assert all(value is None for value in compiled.params.values()), "no literals bound"
    if isinstance(statement, Delete):
        assert all(name.startswith("k_") for name in names)
        names = tuple(name[2:] for name in names)
    return str(compiled), names


def _bound(
    statement: Executable, params: Mapping[str, Any] | None, backend: str = "sqlite"
) -> tuple[str, Any]:
    sql, literals = _driver_sql(statement, backend)
    return sql, {**literals, **params} if params else literals


@functools.cache
def _row_class(names: tuple[str, ...]) -> type[tuple[Any, ...]]:
    """A namedtuple with `_mapping`, so driver rows read like SQLAlchemy rows."""
    base = collections.namedtuple("DriverRow", names, rename=True)  # type: ignore[misc]
    return type("DriverRow", (base,), {"__slots__": (), "_mapping": property(base._asdict)})


def _driver_row(cursor: Any, values: tuple[Any, ...]) -> Any:
    names = tuple(d[0] for d in cursor.description)
    return _row_class(names)(*values)


_BUMP = (
    update(cell_meta)
    .where(cell_meta.c.cell_id == bindparam("k_cell_id"))
    .values(last_position=cell_meta.c.last_position + bindparam("n"))
)
_BUMP_POSITION = _BUMP.returning(cell_meta.c.last_position)
# MySQL's way to read back what an update wrote without RETURNING or a second statement:
# LAST_INSERT_ID(expr) sets the connection's insert ID, which comes back in the update's OK
# packet (the cursor's lastrowid). The row stays locked by the update until commit.
_BUMP_LAST_INSERT_ID = (
    update(cell_meta)
    .where(cell_meta.c.cell_id == bindparam("k_cell_id"))
    .values(last_position=func.last_insert_id(cell_meta.c.last_position + bindparam("n")))
)


# The driver paths' bump: the position read with the cell's lock, moved by what the
# transaction appended, without waiting for an answer (PostgreSQL's pipeline, MySQL's
# batch): one round trip less per write. Should the row not be where the transaction left
# it (a statement of the same transaction moved it: an apply, a snapshot's start), it is
# set to NULL, which the NOT NULL column refuses: the transaction fails rather than hand
# out a position twice.
_MOVE_POSITION = (
    update(cell_meta)
    .where(cell_meta.c.cell_id == bindparam("k_cell_id"))
    .values(
        last_position=case(
            (
                cell_meta.c.last_position == bindparam("w_from", type_=BigInteger),
                bindparam("s_to", type_=BigInteger),
            ),
            else_=null(),
        )
    )
)

_CHANGES_AFTER = (
    select(changelog)
    .where(changelog.c.position > bindparam("after"))
    .order_by(changelog.c.position)
    .limit(bindparam("n"))
)
_POSITION = select(cell_meta.c.last_position).where(cell_meta.c.cell_id == bindparam("k_cell_id"))
_MOVE_CHECKPOINT = (
    update(cell_meta)
    .where(
        cell_meta.c.cell_id == bindparam("k_cell_id"),
        cell_meta.c.last_position == bindparam("w_from"),
    )
    .values(last_position=bindparam("s_to"))
)
CHANGE_FIELDS = ("position", "epoch", "origin", "tbl", "pk", "op", "row_image", "created_ms")


def _position_of(change: Mapping[str, Any]) -> int:
    return int(change["position"])


def _contiguous_after(
    checkpoint: int, changes: Sequence[Mapping[str, Any]]
) -> Sequence[Mapping[str, Any]]:
    """The changes at checkpoint + 1, + 2, ... in order: rows at or below the checkpoint are
    duplicates, and the first after a gap ends them (the rest comes again, in order)."""
    positions = [c["position"] for c in changes]
    first = positions[0] if positions else None
    if type(first) is int and positions == list(range(first, first + len(positions))):
        # What a pull brings, in order without gaps: a slice (0.13 us per change with the
        # dict of final changes, against 0.30 for the loop below).
        skipped = checkpoint + 1 - first
        return changes[skipped:] if skipped >= 0 else []
    applied: list[Mapping[str, Any]] = []
    for change in sorted(changes, key=_position_of):
        position = int(change["position"])
        if position <= checkpoint + len(applied):
            continue  # applied before: a duplicate
        if position != checkpoint + len(applied) + 1:
            break  # a gap: the rest comes again, in order
        applied.append(change)
    return applied


def apply_changes(
    tx: WriteTx, cell_id: int, tables: Mapping[str, Table], changes: Sequence[Mapping[str, Any]]
) -> int:
    """Apply the contiguous changelog rows after this copy's checkpoint; the new checkpoint."""
    (row,) = tx.all(_POSITION, {"k_cell_id": cell_id})
    checkpoint = int(row[0])
    applied = _contiguous_after(checkpoint, changes)
    # Every change is a whole row image or a delete, so a batch comes down to the last change
    # of each (table, key), applied with a statement or two per table: two statements per
    # row cost most of a replica's catch-up (docs/benchmarks.md, Replication).
    final_change = {(c["tbl"], c["pk"]): c for c in applied}
    by_table: dict[str, list[Mapping[str, Any]]] = {}
    for (name, _), change in final_change.items():
        by_table.setdefault(name, []).append(change)
    for name, final in by_table.items():
        images = [orjson.loads(c["row_image"]) for c in final if c["op"] != "d"]
        gone = [orjson.loads(c["pk"]) for c in final if c["op"] == "d"]
        tx.replace_rows(tables[name], images, gone)
    if not applied:
        return checkpoint
    tx.append_verbatim(applied)
    last = checkpoint + len(applied)
    moved = tx.count(_MOVE_CHECKPOINT, {"k_cell_id": cell_id, "w_from": checkpoint, "s_to": last})
    assert moved == 1, "the checkpoint moved under this transaction"
    return last


# One update of `WriteTx.updates`: key, values to set, amounts to add, lower bounds.
Update1 = tuple[
    Mapping[str, Any], Mapping[str, Any] | None, Mapping[str, int] | None, Mapping[str, int] | None
]


class WriteTx:
    """One admitted write transaction on one cell copy."""

    def __init__(
        self,
        conn: Connection | None,
        epoch: int,
        origin: str,
        cursor: Any = None,
        backend: str = "sqlite",
    ) -> None:
        assert (conn is None) != (cursor is None), "a transaction runs on one of the two"
        # SQLAlchemy: MySQL/MariaDB, SQLite on the writer thread, and the quarantine's
        # transactions on any engine.
        self.conn = conn
        # The driver's cursor: SQLite inline on the event loop, PostgreSQL on the writer
        # thread, MySQL/MariaDB on the loop through the asyncio driver's adapter (`backend`
        # says which).
        self.cursor = cursor
        self.backend = backend
        # PostgreSQL: the driver's pipeline the transaction runs in. A statement whose result
        # nobody reads is sent without waiting for its answer; the next statement whose
        # result is read, or the COMMIT, collects it (and raises its error, if any).
        self.pipeline: Any = None
        # MySQL on the driver's cursor: statements whose results nobody reads, bound, waiting
        # to go with the next round trip (`_send`; storage/mysql_batch.py). Shared, as the
        # pipeline is, by the writes of a group.
        self.deferred: list[str] | None = None
        self.driver_error: type[BaseException] | tuple[()] = ()  # what the driver raises
        self.locked_fence_epoch = 0  # the fence read under the cell's lock (driver paths)
        # Driver paths: the cell's last position as this transaction (and the writes of its
        # group before this one) left it, read with the lock; `append_changelog` moves it.
        self.position_at: list[int] | None = None
        self.epoch = epoch
        self.origin = origin
        self.captured: list[dict[str, Any]] = []
        self.appended: list[dict[str, Any]] = []  # the changelog rows, once appended
        self.logged = 0  # changelog rows this transaction appended, captured or verbatim
        # MySQL and MariaDB have no UPDATE ... RETURNING: there an update is followed by a
        # read of the row by key, in the same transaction, which holds the row's lock.
        if conn is None:
            self.mysql = backend == "mysql"
            self.returning = not self.mysql
        else:
            self.mysql = conn.dialect.name in ("mysql", "mariadb")
            self.returning = bool(conn.dialect.update_returning)

    def sibling(self, epoch: int) -> WriteTx:
        """Another write of this transaction's group (group commit): the same cursor,
        pipeline and batch, its own captured changes."""
        assert self.cursor is not None
        own = WriteTx(None, epoch, self.origin, cursor=self.cursor, backend=self.backend)
        own.pipeline, own.deferred = self.pipeline, self.deferred
        own.driver_error, own.position_at = self.driver_error, self.position_at
        own.locked_fence_epoch = self.locked_fence_epoch
        return own

    def statement(self, sql: str) -> None:
        """A statement without parameters or result (a savepoint), sent with the next
        round trip where the driver allows (PostgreSQL's pipeline, MySQL's batch)."""
        if self.deferred is not None:
            self._defer(sql)
        elif self.pipeline is not None:
            self.cursor.execute(sql)
        else:
            self._count(text(sql), {})

    def _sql(self, statement: Executable, params: Mapping[str, Any] | None) -> str:
        """MySQL: the statement with its values bound by the driver (one query's text)."""
        sql, literals = _driver_sql(statement, "mysql")
        return str(self.cursor._cursor.mogrify(sql, {**literals, **params} if params else literals))

    def _defer(self, sql: str) -> None:
        deferred = self.deferred
        assert deferred is not None
        deferred.append(sql)
        if len(deferred) >= BATCH_STATEMENTS_MAX or sum(map(len, deferred)) > STATEMENT_BYTES_MAX:
            self._send([])

    def _send(self, texts: Sequence[str]) -> list[tuple[int, list[Any], int]]:
        """MySQL: the deferred statements and `texts` in one round trip (one query of
        several statements); the row count, rows and insert ID of each of `texts`. The
        server stops at the first statement it refuses, whose error is raised here: those
        after it, a COMMIT among them, did not run."""
        deferred = self.deferred
        assert deferred is not None
        skip = len(deferred)
        query = ";".join([*deferred, *texts])
        deferred.clear()
        if not query:
            return []
        cursor = self.cursor
        cursor.execute(query)
        results: list[tuple[int, list[Any], int]] = []
        for i in range(skip + len(texts)):
            if i:
                cursor.nextset()
            if i >= skip:
                values = cursor.fetchall() if cursor.description else []
                found = [_driver_row(cursor, v) for v in values]
                results.append((int(cursor.rowcount), found, int(cursor.lastrowid or 0)))
        return results

    def _rows(self, statement: Executable, params: Mapping[str, Any] | None) -> list[Any]:
        """Execute and return every result row (for RETURNING and SELECT)."""
        if self.cursor is None:
            assert self.conn is not None
            return list(self.conn.execute(statement, params))
        if self.deferred is not None:
            return self._send([self._sql(statement, params)])[0][1]
        cursor = self.cursor
        cursor.execute(*_bound(statement, params, self.backend))
        values = cursor.fetchall()
        return [_driver_row(cursor, v) for v in values]

    def _count(self, statement: Executable, params: Mapping[str, Any]) -> int:
        """Execute a statement without results; the number of rows it changed."""
        if self.cursor is None:
            assert self.conn is not None
            return int(self.conn.execute(statement, params).rowcount)
        if self.deferred is not None:
            return self._send([self._sql(statement, params)])[0][0]
        cursor = self.cursor
        cursor.execute(*_bound(statement, params, self.backend))
        if self.pipeline is not None:
            self.pipeline.sync()  # the count is in the answer: wait for it
        return int(cursor.rowcount)

    def _execute(self, statement: Executable, params: Mapping[str, Any]) -> None:
        """Execute a statement whose result nobody reads (in the pipeline, on PostgreSQL;
        with the next round trip, on MySQL)."""
        if self.deferred is not None:
            self._defer(self._sql(statement, params))
            return
        if self.pipeline is None:
            self._count(statement, params)
            return
        self.cursor.execute(*_bound(statement, params, self.backend))

    def _many(self, statement: Executable, rows: list[dict[str, Any]]) -> None:
        if self.cursor is None:
            assert self.conn is not None
            self.conn.execute(statement, rows)
        elif self.deferred is not None:
            sql, literals = _driver_sql(statement, "mysql")
            batch = [{**literals, **r} for r in rows] if literals else rows
            mogrify = self.cursor._cursor.mogrify
            if isinstance(statement, Insert):
                texts = insert_rows_sql(mogrify, sql, batch)
            else:
                texts = [mogrify(sql, row) for row in batch]
            for one in texts:
                self._defer(one)
        else:
            sql, literals = _driver_sql(statement, self.backend)
            batch = [{**literals, **r} for r in rows] if literals else rows
            if self.pipeline is None:
                self.cursor.executemany(sql, batch)
                return
            # In the pipeline, one by one: the driver's executemany ends in a sync of its
            # own, a round trip this statement does not need.
            for row in batch:
                self.cursor.execute(sql, row)

    def _capture(
        self, table: Table, op: str, key: Mapping[str, Any], image: Mapping[str, Any] | None
    ) -> None:
        assert len(self.captured) < ROWS_PER_WRITE_MAX, "one transaction changes too many rows"
        self.captured.append(
            {
                "epoch": self.epoch,
                "origin": self.origin,
                "tbl": table.name,
                "pk": to_json(dict(key)),
                "op": op,
                "row_image": None if image is None else to_json(dict(image)),
            }
        )

    def insert(self, table: Table, values: Mapping[str, Any]) -> None:
        row = {str(c.name): values.get(c.name) for c in table.columns}
        assert set(values) <= set(row), f"unknown columns for {table.name}: {set(values)}"
        self._execute(_insert_statement(table), row)
        self._capture(table, "i", primary_key_of(table, row), row)

    def update(
        self,
        table: Table,
        key: Mapping[str, Any],
        values: Mapping[str, Any] | None = None,
        *,
        add: Mapping[str, int] | None = None,
        at_least: Mapping[str, int] | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Update one row by primary key: set `values`, add `add` to columns, only if the
        columns in `at_least` are >= their value and those in `where` equal theirs.
        Returns the row image after the change, or None if no row matched."""
        statement, params = self._update_call(table, key, values, add, at_least, where)
        if self.deferred is not None:
            # The update and the read of its row in one round trip.
            (matched, _, _), (_, found, _) = self._send(
                [self._sql(statement, params), self._sql(by_key(table), key_params(key))]
            )
            return self._updated(table, key, found if matched else [])
        if self.returning:
            rows = self._rows(statement, params)
        else:
            # Matched rows, not changed ones: SQLAlchemy connects with CLIENT_FOUND_ROWS.
            matched = self._count(statement, params)
            rows = self._rows(by_key(table), key_params(key)) if matched else []
        return self._updated(table, key, rows)

    def updates(self, table: Table, changes: Sequence[Update1]) -> list[dict[str, Any] | None]:
        """`update` for each of `changes` (key, values, add, at_least), in order; on
        PostgreSQL all are sent before any answer is read (`each`)."""
        if self.deferred is not None:
            # Each update and the read of its row, all in one round trip.
            texts: list[str] = []
            for k, v, a, m in changes:
                texts.append(self._sql(*self._update_call(table, k, v, a, m, None)))
                texts.append(self._sql(by_key(table), key_params(k)))
            sent = self._send(texts)
            return [
                self._updated(table, change[0], sent[2 * i + 1][1] if sent[2 * i][0] else [])
                for i, change in enumerate(changes)
            ]
        if not self.returning:
            return [self.update(table, k, v, add=a, at_least=m) for k, v, a, m in changes]
        calls = [self._update_call(table, k, v, a, m, None) for k, v, a, m in changes]
        found = self.each(calls)
        return [self._updated(table, c[0], rows) for c, rows in zip(changes, found, strict=True)]

    def _update_call(
        self,
        table: Table,
        key: Mapping[str, Any],
        values: Mapping[str, Any] | None,
        add: Mapping[str, int] | None,
        at_least: Mapping[str, int] | None,
        where: Mapping[str, Any] | None,
    ) -> tuple[Executable, dict[str, Any]]:
        values, add, at_least, where = values or {}, add or {}, at_least or {}, where or {}
        statement = _update_statement(
            table, tuple(values), tuple(add), tuple(at_least), tuple(where), self.returning
        )
        params = key_params(key)
        params.update({f"s_{c}": v for c, v in values.items()})
        params.update({f"a_{c}": v for c, v in add.items()})
        params.update({f"m_{c}": v for c, v in at_least.items()})
        params.update({f"w_{c}": v for c, v in where.items()})
        return statement, params

    def _updated(
        self, table: Table, key: Mapping[str, Any], rows: Sequence[Any]
    ) -> dict[str, Any] | None:
        if not rows:
            return None
        assert len(rows) == 1, "an update by primary key changes one row"
        image = dict(rows[0]._mapping)
        self._capture(table, "u", key, image)
        return image

    def each(self, calls: Sequence[tuple[Executable, Mapping[str, Any] | None]]) -> list[list[Any]]:
        """The rows of each statement (RETURNING or SELECT), in order. On PostgreSQL all
        are sent before any answer is read: one round trip for them all, where one after
        another took one each (each round trip of the center's serial writer counts:
        docs/benchmarks.md, Writes on the driver's cursor)."""
        assert len(calls) <= ROWS_PER_WRITE_MAX
        if self.deferred is not None:
            return [found for _, found, _ in self._send([self._sql(s, p) for s, p in calls])]
        if self.pipeline is None or len(calls) < 2:
            return [list(self._rows(statement, params)) for statement, params in calls]
        connection = self.cursor.connection
        cursors = []
        try:
            for statement, params in calls:
                cursor = connection.cursor()
                cursors.append(cursor)
                cursor.execute(*_bound(statement, params, self.backend))
            return [[_driver_row(c, v) for v in c.fetchall()] for c in cursors]
        finally:
            for cursor in cursors:
                cursor.close()

    def delete(self, table: Table, key: Mapping[str, Any]) -> bool:
        if self._count(_delete_statement(table), key_params(key)) == 0:
            return False
        self._capture(table, "d", key, None)
        return True

    def put_row(self, table: Table, image: Mapping[str, Any]) -> None:
        """Insert a row image as it is, without capturing it (replication)."""
        self._execute(_insert_statement(table), dict(image))

    def delete_row(self, table: Table, key: Mapping[str, Any]) -> None:
        """Delete by primary key without capturing it (replication)."""
        self._execute(_delete_statement(table), key_params(key))

    def put_rows(self, table: Table, images: list[dict[str, Any]]) -> None:
        """Insert row images as they are, in one statement, without capturing them (a column
        an image lacks is NULL)."""
        if self._positional():
            sql, columns = _qmark_sql(_insert_statement(table))
            self.cursor.executemany(sql, [tuple(map(i.get, columns)) for i in images])
            return
        names = [str(c.name) for c in table.columns]
        self._many(_insert_statement(table), [{c: i.get(c) for c in names} for i in images])

    def replace_rows(
        self, table: Table, images: list[dict[str, Any]], gone: list[dict[str, Any]]
    ) -> None:
        """Make `images` the rows with their keys (inserted, or in place of the rows there)
        and delete the rows with the keys `gone`, without capturing anything (replication:
        one statement per table and kind, not one per row)."""
        if gone:
            self.delete_rows(table, gone)
        if not images:
            return
        if self._positional():
            # SQLite: INSERT OR REPLACE, one statement instead of a delete and an insert
            # (a delete of a key not there cost ~0.5 us per row of the ~8 a replica spends:
            # docs/benchmarks.md, A cheaper apply).
            sql, columns = _qmark_sql(_replace_statement(table))
            self.cursor.executemany(sql, [tuple(map(i.get, columns)) for i in images])
            return
        self.delete_rows(table, [primary_key_of(table, i) for i in images])
        self.put_rows(table, images)

    def _positional(self) -> bool:
        """SQLite on the driver's cursor: bulk statements bind tuples (`_qmark_sql`)."""
        return self.cursor is not None and self.backend == "sqlite"

    def delete_rows(self, table: Table, keys: list[dict[str, Any]]) -> None:
        """Delete by primary keys in one statement, without capturing it."""
        if self._positional():
            sql, columns = _qmark_sql(_delete_statement(table))
            self.cursor.executemany(sql, [tuple(map(k.__getitem__, columns)) for k in keys])
            return
        if self.deferred is not None:
            quote = _DIALECTS["mysql"].identifier_preparer.quote
            for one in delete_keys_sql(self.cursor._cursor.mogrify, quote, table, keys):
                self._defer(one)
            return
        if self.conn is not None and self.mysql and keys:
            # MySQL's drivers run an executemany of a DELETE as one round trip per key (only
            # INSERTs are batched): a replica's apply of 1,000 rows took 1,000 of them. One
            # `key IN (...)` instead, a range scan of the primary key.
            key_columns = [str(c.name) for c in table.primary_key.columns]
            values = [
                k[key_columns[0]] if len(key_columns) == 1 else tuple(k[c] for c in key_columns)
                for k in keys
            ]
            self.conn.execute(_delete_in_statement(table), {"keys": values})
            return
        self._many(_delete_statement(table), [key_params(k) for k in keys])

    def append_verbatim(self, changes: Sequence[Mapping[str, Any]]) -> None:
        """Append another copy's changelog rows unchanged (replication); any other field of
        a change is left out."""
        self.logged += len(changes)
        if self._positional():
            sql, fields = _qmark_sql(_insert_statement(changelog))
            self.cursor.executemany(sql, map(operator.itemgetter(*fields), changes))
            return
        self._many(
            _insert_statement(changelog), [{f: c[f] for f in CHANGE_FIELDS} for c in changes]
        )

    def count(self, statement: Executable, params: Mapping[str, Any]) -> int:
        return self._count(statement, params)

    @staticmethod
    def get_call(table: Table, key: Mapping[str, Any]) -> tuple[Executable, dict[str, Any]]:
        """The read of `get`, for `each`."""
        return by_key(table), key_params(key)

    def get(self, table: Table, key: Mapping[str, Any]) -> Row[Any] | None:
        """The row with this primary key, read inside the transaction."""
        rows = self._rows(by_key(table), key_params(key))
        return rows[0] if rows else None

    def one(
        self, statement: Select[Any], params: Mapping[str, Any] | None = None
    ) -> Row[Any] | None:
        rows = self._rows(statement, params)
        return rows[0] if rows else None

    def all(
        self, statement: Select[Any], params: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        return self._rows(statement, params)

    def append_changelog(self, cell_id: int) -> int:
        """Give the captured changes their positions and append them; the last position.

        The cell_meta row is locked (or the database is, on SQLite) until commit, so
        positions are gapless and a later position never commits before an earlier one.
        """
        n = len(self.captured)
        if n == 0:
            return 0
        params = {"k_cell_id": cell_id, "n": n}
        if self.position_at is not None:
            before = self.position_at[0]
            last = before + n
            self._execute(_MOVE_POSITION, {"k_cell_id": cell_id, "w_from": before, "s_to": last})
            self.position_at[0] = last
        elif self.returning:
            (bumped,) = self._rows(_BUMP_POSITION, params)
            last = bumped[0]
        elif self.deferred is not None:
            ((matched, _, last),) = self._send([self._sql(_BUMP_LAST_INSERT_ID, params)])
            assert matched == 1, "a cell copy has one cell_meta row"
        else:
            assert self.conn is not None
            result = self.conn.execute(_BUMP_LAST_INSERT_ID, params)
            assert result.rowcount == 1, "a cell copy has one cell_meta row"
            last = result.lastrowid
        stamp = now_ms()
        rows = [
            {**change, "position": last - n + i + 1, "created_ms": stamp}
            for i, change in enumerate(self.captured)
        ]
        self._many(_insert_statement(changelog), rows)
        self.appended = rows
        self.logged += n
        return int(last)


# A planted bug (unitrade/planted.py), for the verifier's own test only: one order
# creation in ten is rolled back and answered as if it had committed.
_DROP_ACKED_ORDERS = planted(DROP_ACKED_ORDERS)
_planted = random.Random(1)


@dataclasses.dataclass
class _Pending:
    """A write waiting for its copy's writer (group commit): PostgreSQL's writer thread
    (`done` a thread's Future) or MySQL's writer connection (an asyncio future)."""

    body: Callable[[WriteTx], tuple[Any, int]]
    epoch: int
    fence_version: int
    leased: bool  # a write of an owned cell (`write`): it may commit only inside the lease
    done: Any = dataclasses.field(default_factory=Future)


# One write transaction on a driver path (PostgreSQL's writer thread, MySQL's batches):
# (body, epoch, fence_version) -> body's result.
_Transact = Callable[[Callable[[WriteTx], tuple[Any, int]], int, int], tuple[Any, int]]


class _GroupRefused(Exception):
    """The database refused a statement of a group's write: the group runs write by write."""


class _Dropped(Exception):
    def __init__(self, result: Any) -> None:
        super().__init__("planted bug: an acknowledged order rolled back")
        self.result = result


def _creates_order(tx: WriteTx) -> bool:
    return any(c["tbl"] == "orders" and c["op"] == "i" for c in tx.captured)


class _Busy:
    """The inline SQLite connection found the database locked by another process."""


BUSY = _Busy()
# The WAL is checkpointed after this many inline write transactions or changelog rows,
# whichever comes first: a checkpoint's work is the pages written since the last one. An
# order writes a few rows (the writes bound it), a replica's apply up to BATCH_ROWS_MAX
# (the rows do): counted in transactions alone, a catch-up's WAL grew to tens of MB
# before a checkpoint, which then held the cell's writes while it copied them
# (docs/benchmarks.md, Replication).
CHECKPOINT_EVERY_WRITES = 256
CHECKPOINT_EVERY_ROWS = 8_192


def _is_busy(error: Exception) -> bool:
    text = str(getattr(error, "orig", error)).lower()
    return "locked" in text or "busy" in text


class CellStore:
    """This region's copy of one cell: its database and the fenced write path.

    On SQLite, transactions run inline on the event loop: a WAL transaction without fsync
    takes ~0.1 ms, a thread hop alone 165-192 us (benchmarks/bench_micro.py), and under
    load the hand-off took 21 % of the region's CPU (docs/benchmarks.md). The writer thread
    takes over only when another process holds the database's write lock, and runs the WAL
    checkpoints. On PostgreSQL every transaction runs on the store's threads. On MySQL and
    MariaDB every transaction runs on the event loop through the asyncio driver (SQLAlchemy
    runs the same sync work functions in a greenlet, `run_sync`): one writer connection,
    `readers` reader connections.
    """

    def __init__(
        self,
        cell: CellInfo,
        region: str,
        url: str,
        fence: Fence,
        *,
        inline: bool = True,
        readers: int = READ_POOL_SIZE,
        shared: bool = False,
    ) -> None:
        self.cell = cell
        self.region = region
        self.url = url
        self.fence = fence
        self.backend = backend_of(url)
        self.readers = readers  # reader threads or connections: the reads that run at once
        self._writer: Engine | None = None
        self._reader: Engine | None = None
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix=f"w-{cell.name}")
        self._read_threads = ThreadPoolExecutor(readers, thread_name_prefix=f"r-{cell.name}")
        # MySQL/MariaDB through an asyncio driver: the engines, the one writer connection's
        # turn (FIFO) and the readers' slots.
        self._async = is_async(url)
        self._async_writer: AsyncEngine | None = None
        self._async_reader: AsyncEngine | None = None
        self._writer_turn = asyncio.Lock()
        self._writer_connection: AsyncConnection | None = None  # held: no checkout per write
        self._reader_slots = asyncio.Semaphore(readers)
        self._write_slots = asyncio.Semaphore(PENDING_WRITES_MAX)
        self.pending_reads_max = PENDING_READS_MAX
        self.read_queue_wait_s_max = READ_QUEUE_WAIT_S_MAX
        self._reads_lock = threading.Lock()  # the count changes on reader threads too
        self._reads_open = 0  # reads handed to the reader threads and not finished
        # False: every transaction on the store's threads, SQLite too (as on PostgreSQL).
        self._inline_enabled = inline
        self._inline: Connection | None = None  # SQLite only: reads
        self._cursor: Any = None  # SQLite only: its driver cursor, for writes
        self._pg: Any = None  # PostgreSQL: the writer thread's held connection (_held_pg)
        # PostgreSQL: writes waiting for the writer thread, and whether a drain of them is
        # queued on it (both under `_group_lock`: the loop adds, the writer thread takes).
        self._group: collections.deque[_Pending] = collections.deque()
        self._group_lock = threading.Lock()
        self._draining = False
        self._drainer: asyncio.Future[None] | None = None  # MySQL: the task draining `_group`
        self.grouped_writes = 0  # writes committed with others in one transaction
        self._writes_since_checkpoint = self._rows_since_checkpoint = 0
        self._checkpoint: asyncio.Future[None] | None = None
        self.position = 0  # last changelog position committed in this copy
        self.trimmed_position = 0  # this copy's changelog holds the positions after this
        self._moved = asyncio.Event()
        self._tail = ChangelogTail()  # this copy's newest own writes, for the pulls
        # Other processes of the region write this copy too (`workers` > 1): `position` and
        # `trimmed_position` then move by this process's own writes and by reading them
        # back from the database (`refresh`), which a wait for a position polls.
        self.shared = shared
        self._waiters = 0
        self._poller: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Future[None] | None = None
        self._refreshed_at = 0.0  # monotonic: when the last refresh began

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if self._async:
            # Creating the database is a blocking call (PyMySQL): off the loop.
            writer, reader = await loop.run_in_executor(self._write_thread, self._async_engines)
            self._async_writer, self._async_reader = writer, reader
            async with writer.begin() as conn:
                await conn.run_sync(self._create_schema)
        else:
            await loop.run_in_executor(self._write_thread, self._open_sync)
        self.position = await self.last_position()
        self.trimmed_position = await self.read(
            lambda conn: int(conn.execute(select(cell_meta.c.trimmed_position)).scalar_one())
        )
        if self.backend == "sqlite" and self._inline_enabled:
            self._inline = create_inline_engine(self.url).connect()
            self._cursor = self._inline.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def _async_engines(self) -> tuple[AsyncEngine, AsyncEngine]:
        return (
            create_async_cell_engine(self.url, writer=True),
            create_async_cell_engine(self.url, writer=False, readers=self.readers),
        )

    def _open_sync(self) -> None:
        self._writer = create_cell_engine(self.url, writer=True)
        self._reader = create_cell_engine(self.url, writer=False, readers=self.readers)
        with self._writer.begin() as conn:
            self._create_schema(conn)

    def _create_schema(self, conn: Connection) -> None:
        """The tables of this cell's kind and its cell_meta row, if they are not there.
        The processes of a region of many start together: the first creates the schema
        while the others wait for it, under a lock of the database (a table's existence is
        checked, then it is created: two at once fail on the second CREATE)."""
        if self.backend == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            self._create_tables(conn)
        elif self.backend == "mysql":
            # DDL commits on its own in MySQL: a session lock, given back at the end.
            name = f"unitrade-schema:{conn.engine.url.database}"[:64]
            got = conn.execute(text("SELECT GET_LOCK(:n, :s)"), {"n": name, "s": 30}).scalar()
            if got != 1:
                raise RuntimeError(f"{name}: another process holds the schema lock for 30 s")
            try:
                self._create_tables(conn)
            finally:
                conn.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": name})
        else:
            self._create_tables(conn)

    def _create_tables(self, conn: Connection) -> None:
        common.create_all(conn)
        local.create_all(conn)
        METADATA_BY_KIND[self.cell.kind].create_all(conn)
        _add_meta_columns(conn)
        exists = conn.execute(select(cell_meta.c.cell_id)).first()
        if exists is None:
            conn.execute(
                insert(cell_meta).values(
                    cell_id=self.cell.id,
                    kind=self.cell.kind.value,
                    last_position=0,
                    created_ms=now_ms(),
                    trimmed_position=0,
                )
            )
        elif exists.cell_id != self.cell.id:
            raise RuntimeError(f"{self.url} holds cell {exists.cell_id}, not {self.cell.id}")

    async def close(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            # MySQL's queued writes: let them finish (each is bounded by the lock wait)
            await asyncio.wait([self._drainer], timeout=QUEUE_WAIT_S_MAX)
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._inline is not None:
            self._cursor.close()
            self._cursor = None
            inline, self._inline = self._inline, None
            inline.close()
            inline.engine.dispose()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._write_thread, self._checkpoint_sync)
        await loop.run_in_executor(self._write_thread, self._close_sync)
        if self._writer_connection is not None:
            await self._writer_connection.close()
            self._writer_connection = None
        for engine in (self._async_writer, self._async_reader):
            if engine is not None:
                await engine.dispose()
        self._async_writer = self._async_reader = None
        self._write_thread.shutdown(wait=True)
        self._read_threads.shutdown(wait=True)

    def _close_sync(self) -> None:
        self._release_pg()
        for engine in (self._writer, self._reader):
            if engine is not None:
                engine.dispose()
        self._writer = self._reader = None

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Run `work` in a read-only transaction of this copy (a replica may lag its owner)."""
        if self._async:
            return await self._read_async(work)
        assert self._reader is not None, "CellStore.open() first"
        reader = self._reader
        if self._inline is not None:
            result = self._run_inline(self._inline, "BEGIN", work)
            if not isinstance(result, _Busy):
                return result

        def run() -> T:
            for attempt in range(2):
                try:
                    with reader.begin() as conn:
                        return work(conn)
                except DBAPIError as error:
                    # A pooled connection found dead (the server restarted; PostgreSQL's
                    # readers are not pinged before use): the pool drops it, and a read is
                    # safe to run once more.
                    if not error.connection_invalidated or attempt > 0:
                        raise
            raise AssertionError("unreachable")

        return await self._on_reader(run)

    @property
    def reads_open(self) -> int:
        """Reads waiting for or running on the reader threads."""
        return self._reads_open

    def _open_read(self) -> None:
        """Count a read in, or refuse it past the bound (PENDING_READS_MAX)."""
        with self._reads_lock:
            if self._reads_open >= self.readers + self.pending_reads_max:
                raise Overloaded(
                    f"cell {self.cell.id} has {self._reads_open} reads open here; retry shortly"
                )
            self._reads_open += 1

    def _read_timeout(self) -> ReadTimeout:
        return ReadTimeout(
            f"a read of cell {self.cell.id} waited over "
            f"{self.read_queue_wait_s_max:g} s for a reader; retry shortly"
        )

    async def _read_async(self, work: Callable[[Connection], T]) -> T:
        """A read on a reader connection through the asyncio driver, within the read bounds:
        the same as on the reader threads, with connection slots for threads."""
        reader = self._async_reader
        assert reader is not None, "CellStore.open() first"
        self._open_read()
        try:
            async with asyncio.timeout(self.read_queue_wait_s_max):
                await self._reader_slots.acquire()
        except TimeoutError:
            self._read_done(None)
            raise self._read_timeout() from None
        except BaseException:
            self._read_done(None)
            raise

        async def run() -> T:
            try:
                for attempt in range(2):
                    try:
                        async with reader.begin() as conn:
                            return await conn.run_sync(work)
                    except DBAPIError as error:
                        # A pooled connection found dead (the server restarted): the pool
                        # drops it, and a read is safe to run once more.
                        if not error.connection_invalidated or attempt > 0:
                            raise
                raise AssertionError("unreachable")
            finally:
                self._reader_slots.release()
                self._read_done(None)

        # Its own task: a caller cancelled mid-read leaves the read to finish, rather than
        # the driver's connection cut off mid-reply.
        job = asyncio.ensure_future(run())
        job.add_done_callback(_retrieve)
        return await asyncio.shield(job)

    async def _on_reader(self, run: Callable[[], T]) -> T:
        """Run `run` on a reader thread, within the read bounds (PENDING_READS_MAX)."""
        with self._reads_lock:
            if self._reads_open >= self.readers + self.pending_reads_max:
                raise Overloaded(
                    f"cell {self.cell.id} has {self._reads_open} reads open here; retry shortly"
                )
            self._reads_open += 1
        try:
            job = self._read_threads.submit(run)
        except BaseException:
            self._read_done(None)
            raise
        job.add_done_callback(self._read_done)
        result = asyncio.wrap_future(job)
        try:
            return await asyncio.wait_for(asyncio.shield(result), self.read_queue_wait_s_max)
        except TimeoutError:
            if job.cancel():  # still queued: it never runs
                raise self._read_timeout() from None
            return await result  # it runs already: a read started is a read answered
        except asyncio.CancelledError:
            job.cancel()  # nobody waits for it any more; a read that runs just finishes
            raise

    def _read_done(self, _job: Future[Any] | None) -> None:
        with self._reads_lock:
            self._reads_open -= 1

    async def write(self, work: Callable[[WriteTx], T]) -> T:
        """Admit a write through the fence and run `work` in one transaction; its changes
        and their changelog rows commit together, or nothing does."""
        cell_id = self.cell.id

        appended: list[dict[str, Any]] = []

        lease_valid = self.fence.lease_valid

        def body(tx: WriteTx) -> tuple[T, int]:
            result = work(tx)
            if not lease_valid():
                # The lease ended while the transaction ran: it must not commit, since a
                # failover may now make another region the owner (control/lease.py).
                raise self.fence.no_lease(cell_id)
            if _DROP_ACKED_ORDERS and _creates_order(tx) and _planted.random() < 0.1:
                raise _Dropped(result)
            position = tx.append_changelog(cell_id)
            appended[:] = tx.appended  # the last attempt's: only it can have committed
            return result, position

        async with self._write_slot(), self.fence.admit(cell_id) as epoch:
            try:
                result, position = await self._transact(
                    body, epoch, fence_version=epoch, leased=True
                )
            except _Dropped as dropped:
                return dropped.result  # type: ignore[no-any-return]  # the planted bug
            except (DBAPIError, sqlite3.Error) as error:
                if not may_have_committed(error):
                    raise
                self._lost_commit()
                raise WriteOutcomeUnknown(
                    f"cell {cell_id}: the database connection failed during the write "
                    f"({type(error).__name__}); it may have committed: repeat the request as "
                    "it was (the same idempotency key or payment ID) to learn its outcome",
                    region=self.region,
                    call=DATABASE_CALL,
                    cell=cell_id,
                ) from error
            self._tail.add(appended)
            # Inside the fence: once a rule change is acknowledged, `position` is final
            # (the switchover reads a banned cell's final position from it).
            self._advance(position)
        return result

    def _lost_commit(self) -> None:
        """A write whose commit may or may not have reached the database: the tail and the
        position may now be behind the changelog. Start the tail again and read the position
        back (in the background: the database may still be away; the next write or pull
        reads it anyway)."""
        self._tail.clear()
        job = asyncio.ensure_future(self.refresh())
        job.add_done_callback(_log_failed_refresh)

    async def apply(self, changes: Sequence[Mapping[str, Any]]) -> int:
        """Apply the owner's changelog rows to this replica copy; the new checkpoint.

        One transaction applies the row images, appends the rows to this copy's changelog
        verbatim (same positions, epochs, origins: nothing is captured again, so nothing
        loops back) and moves the checkpoint, which is this copy's `last_position`. Rows at
        or below the checkpoint are skipped (a duplicated batch is harmless); the first row
        after a gap ends the batch (a reordered batch applies what is contiguous, the rest
        comes again).
        """
        tables = tables_of(self.cell.kind)
        cell_id = self.cell.id
        position = await self.write_replica(lambda tx: apply_changes(tx, cell_id, tables, changes))
        self._advance(position)
        return self.position

    async def write_replica(self, work: Callable[[WriteTx], T], inline: bool = True) -> T:
        """A transaction on this replica copy outside the fence, never captured: for
        replication (apply, snapshot) and repair. A region never does this to a cell it owns:
        the owner's copy changes only through `write`."""
        owner = self.fence.rule.owner_of(self.cell.id)
        if owner == self.region:
            raise WrongRegion(
                f"cell {self.cell.id} is owned by {self.region}; its copy here is not a replica",
                owner=owner,
            )

        def body(tx: WriteTx) -> tuple[T, int]:
            return work(tx), 0

        self._tail.clear()  # the changelog may change other than by this copy's writes
        # Under the rule this process holds: an applier that has not yet learnt that the
        # cell changed owner (a stale process of the region) is refused by the database.
        version = self.fence.rule.version
        async with self._write_slot():
            result, _ = await self._transact(body, epoch=0, inline=inline, fence_version=version)
        return result

    @asynccontextmanager
    async def _write_slot(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(QUEUE_WAIT_S_MAX):
                await self._write_slots.acquire()
        except TimeoutError:
            raise RegionUnavailable(f"cell {self.cell.id} has too many writes queued") from None
        try:
            yield
        finally:
            self._write_slots.release()

    async def _transact(
        self,
        body: Callable[[WriteTx], tuple[T, int]],
        epoch: int,
        inline: bool = True,
        fence_version: int = 0,
        lock_wait_ms: int | None = None,
        leased: bool = False,
    ) -> tuple[T, int]:
        """Run `body` in one write transaction: inline on SQLite (on the writer thread when
        another process holds the lock, or when `inline` is False: `body` then gets a
        SQLAlchemy connection), on the writer thread on PostgreSQL, on the loop through the
        asyncio driver on MySQL/MariaDB. On PostgreSQL and MySQL a `fence_version` (the rule
        version the transaction runs under; 0: local bookkeeping, not fenced) below the
        copy's `fence_epoch` is refused once the cell's lock is held (`_fenced`)."""
        if self._async and inline and lock_wait_ms is None:
            pending = _Pending(body, epoch, fence_version, leased, done=self._loop_future())
            self._group.append(pending)
            if not self._draining:
                self._draining = True
                self._drainer = asyncio.ensure_future(self._drain_mysql())
                self._drainer.add_done_callback(_retrieve)
            # Awaited as the writer thread's is: a cancelled caller still waits for the
            # transaction to end (`_finish`).
            return await _finish(pending.done)
        if self._async:
            # Its own task, awaited as above.
            job = asyncio.ensure_future(self._transact_async(body, epoch, fence_version))
            job.add_done_callback(_retrieve)
            return await _finish(job)
        assert self._writer is not None, "CellStore.open() first"
        writer, cell_id = self._writer, self.cell.id
        lock_cell = self.backend != "sqlite"  # SQLite's BEGIN IMMEDIATE already serialises
        fenced = self._fenced
        if self._checkpoint is not None and not self._checkpoint.done():
            # Our own checkpoint holds the lock for a few ms: wait for it rather than find
            # the lock taken and queue every writer on the thread.
            await asyncio.wait([self._checkpoint])
        if self._cursor is not None and inline:
            done = self._write_inline(self._cursor, body, epoch)
            if not isinstance(done, _Busy):
                return done

        loop = asyncio.get_running_loop()
        if self.backend == "postgresql" and inline and lock_wait_ms is None:
            pending = _Pending(body, epoch, fence_version, leased)
            with self._group_lock:
                self._group.append(pending)
                start = not self._draining
                self._draining = True
            if start:
                self._queue_drain()
            return await _finish(asyncio.wrap_future(pending.done))
        if self.backend == "postgresql" and inline:
            on_pg = functools.partial(self._transact_pg, body, epoch, fence_version, lock_wait_ms)
            return await _finish(loop.run_in_executor(self._write_thread, on_pg))

        def run() -> tuple[T, int]:
            self._release_pg()  # the pool's one connection, for SQLAlchemy
            with _lock_busy(cell_id), writer.begin() as conn:
                if lock_cell and lock_wait_ms is not None and self.backend == "postgresql":
                    conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(lock_wait_ms)}")
                if lock_cell:
                    fenced(conn.execute(_LOCK_CELL, {"k_cell_id": cell_id}).one(), fence_version)
                return body(WriteTx(conn, epoch=epoch, origin=self.region))

        return await _finish(loop.run_in_executor(self._write_thread, run))

    def _transact_pg(
        self,
        body: Callable[[WriteTx], tuple[T, int]],
        epoch: int,
        fence_version: int,
        lock_wait_ms: int | None,
    ) -> tuple[T, int]:
        """One write transaction on PostgreSQL, on the writer thread, on the driver's
        cursor of the connection the thread holds (`_held_pg`): BEGIN, the lock timeout
        and the cell's lock go in one round trip, then `body`'s statements, then COMMIT.
        A connection found dead at that first round trip (the server restarted, an idle
        connection was cut) had done nothing: once more on a new one."""
        import psycopg

        cell_id = self.cell.id
        # Simple query protocol (no parameters: the values are integers of ours), so the
        # statements share one round trip.
        setup = "BEGIN; "
        if lock_wait_ms is not None:
            setup += f"SET LOCAL lock_timeout = {int(lock_wait_ms)}; "
        setup += (
            "SELECT last_position, fence_epoch FROM cell_meta "
            f"WHERE cell_id = {int(cell_id)} FOR UPDATE"
        )
        for attempt in range(2):
            # The pool's checkout raises the driver's own errors (no SQLAlchemy wrapping).
            with _connecting(cell_id, psycopg.Error):
                held = self._held_pg()
            cursor = held.driver_connection.cursor()
            begun = False
            try:
                with _lock_busy(cell_id), _as_dbapi_error(self, held):
                    try:
                        cursor.execute(setup, prepare=False)
                        begun = True
                        while cursor.nextset():
                            pass  # to the SELECT's result, the last
                        locked = _driver_row(cursor, cursor.fetchone())
                        self._fenced(locked, fence_version)
                        tx = WriteTx(None, epoch, self.region, cursor=cursor, backend="postgresql")
                        tx.locked_fence_epoch = int(locked.fence_epoch)
                        tx.position_at = [int(locked.last_position)]
                        tx.driver_error = psycopg.Error
                        # The body's statements whose results nobody reads, the changelog
                        # rows and the COMMIT share the round trips of the statements
                        # that are read (docs/benchmarks.md, Writes on the driver's cursor).
                        with held.driver_connection.pipeline() as pipeline:
                            tx.pipeline = pipeline
                            done = body(tx)
                            cursor.execute("COMMIT")
                        return done
                    except BaseException:
                        _rollback_pg(held)
                        raise
            except DBAPIError as error:
                if not error.connection_invalidated or begun or attempt > 0:
                    raise
            finally:
                cursor.close()
        raise AssertionError("unreachable")

    def _drain_group(self) -> None:
        """On the writer thread: commit one group of the queued writes, then queue the
        next drain behind whatever else waits for the thread (a fence being raised, a
        quarantine), so a steady stream of writes never starves it."""
        with self._group_lock:
            taken = [self._group.popleft() for _ in range(min(GROUP_WRITES_MAX, len(self._group)))]
        # A waiter cancelled before its write began is dropped (never run).
        group = [p for p in taken if p.done.set_running_or_notify_cancel()]
        try:
            if group:
                self._commit_group(group, self._transact_pg_grouped)
        except BaseException as error:  # every waiter must hear of it
            for pending in group:
                if not pending.done.done():
                    pending.done.set_exception(error)
        finally:
            with self._group_lock:
                more = bool(self._group)
                self._draining = more
            if more:
                self._queue_drain()

    def _queue_drain(self) -> None:
        try:
            self._write_thread.submit(self._drain_group)
        except RuntimeError:  # the store is closing: nothing more will run
            with self._group_lock:
                left = list(self._group)
                self._group.clear()
                self._draining = False
            for pending in left:
                if pending.done.set_running_or_notify_cancel():
                    pending.done.set_exception(
                        RegionUnavailable(f"cell {self.cell.id}: the copy is closing")
                    )

    def _transact_pg_grouped(
        self, body: Callable[[WriteTx], tuple[T, int]], epoch: int, fence_version: int
    ) -> tuple[T, int]:
        return self._transact_pg(body, epoch, fence_version, None)

    def _commit_group(self, group: list[_Pending], transact: _Transact) -> None:
        """Several writes in one transaction (group commit): one BEGIN, one lock of the
        cell and one COMMIT (the WAL's fsync) for them all, which the center's serial
        writer paid per write. Each write runs under a savepoint of its own, sent with its
        first round trip (PostgreSQL's pipeline, MySQL's batch): one that fails (a
        refusal, a fence) is rolled back to it alone and answered with its error, the
        others commit. A statement the database refuses may surface in another write's
        round trip or at the COMMIT, so it cannot be pinned on one write: then nothing
        of the group is kept and each write runs again in a transaction of its own (a
        write's work may run more than once; only its last run can commit). `transact`
        is the engine's one-transaction runner (`_transact_pg_grouped`,
        `_transact_mysql`)."""
        if len(group) == 1:
            self._run_alone(group[0], transact)
            return
        results: list[tuple[bool, Any]] = []
        try:
            transact(functools.partial(self._group_body, group, results), 0, 0)
        except BaseException as error:
            if isinstance(error, _GroupRefused) or (
                isinstance(error, DBAPIError) and not may_have_committed(error)
            ):
                # A statement of the group refused by the database (its error may surface
                # only at the COMMIT, in the pipeline): the group was rolled back; each
                # write runs again on its own.
                for pending in group:
                    self._run_alone(pending, transact)
                return
            # The group did not commit, or its COMMIT's answer was lost (the error says
            # which: outcome unknown for a dead connection). A write refused on its own
            # was rolled back to its savepoint either way: it keeps its own answer.
            for i, pending in enumerate(group):
                own = results[i] if i < len(results) else (True, None)
                pending.done.set_exception(error if own[0] else own[1])
            return
        self.grouped_writes += sum(1 for ok, _ in results if ok)
        for pending, (ok, value) in zip(group, results, strict=True):
            if ok:
                pending.done.set_result(value)
            else:
                pending.done.set_exception(value)

    def _group_body(
        self, group: list[_Pending], results: list[tuple[bool, Any]], tx: WriteTx
    ) -> tuple[None, int]:
        results.clear()
        fence_epoch = tx.locked_fence_epoch
        for pending in group:
            if pending.fence_version and pending.fence_version < fence_epoch:
                results.append((False, self._banned(fence_epoch, pending.fence_version)))
                continue
            own = tx.sibling(pending.epoch)
            assert tx.position_at is not None
            position_before = tx.position_at[0]
            # Sent with the write's first round trip (the pipeline, MySQL's batch). MySQL
            # replaces a savepoint of the same name: no RELEASE needed there.
            tx.statement("SAVEPOINT unitrade_write")
            try:
                value = pending.body(own)
            except tx.driver_error as refused:
                raise _GroupRefused() from refused
            except Exception as error:  # a refusal of the work itself: this write alone
                tx.statement("ROLLBACK TO SAVEPOINT unitrade_write")
                tx.position_at[0] = position_before
                results.append((False, error))
                continue
            if tx.deferred is None:
                tx.statement("RELEASE SAVEPOINT unitrade_write")
            results.append((True, value))
        leased = any(p.leased for p, (ok, _) in zip(group, results, strict=True) if ok)
        if leased and not self.fence.lease_valid():
            # Each write checked the lease at its own end, but the group commits after the
            # last: the lease's margin covers one write's commit, not a group's (the lease
            # must hold at the COMMIT, control/lease.py). Nothing of the group commits.
            raise self.fence.no_lease(self.cell.id)
        return None, 0

    def _run_alone(self, pending: _Pending, transact: _Transact) -> None:
        try:
            value = transact(pending.body, pending.epoch, pending.fence_version)
        except BaseException as error:  # handed to the waiter
            pending.done.set_exception(error)
            return
        pending.done.set_result(value)

    def _held_pg(self) -> Any:
        """The writer thread's PostgreSQL connection, checked out of the writer engine's
        pool once and held (a checkout per write pinged the server: one more round trip),
        in autocommit mode so that BEGIN goes with the first statement."""
        if self._pg is None:
            assert self._writer is not None
            held = self._writer.raw_connection()
            held.driver_connection.autocommit = True  # type: ignore[union-attr]
            self._pg = held
        driver = self._pg.driver_connection
        if driver.info.transaction_status != _PG_IDLE:
            # A transaction left open by a rollback that failed: end it before BEGIN, or
            # the next write would run inside it (read locally, no round trip when idle).
            # A connection that cannot is let go: the next one from the pool is fresh.
            try:
                driver.execute("ROLLBACK")
            except Exception:
                held, self._pg = self._pg, None
                held.invalidate()
                return self._held_pg()
        return self._pg

    def _release_pg(self) -> None:
        """Give the held connection back to the pool (for a transaction through
        SQLAlchemy, or at close); a dead one is discarded."""
        held, self._pg = self._pg, None
        if held is None:
            return
        driver = held.driver_connection
        if driver is None or driver.closed or driver.broken:
            held.invalidate()
            return
        driver.autocommit = False  # as SQLAlchemy expects its connections
        held.close()

    @staticmethod
    def _loop_future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _drain_mysql(self) -> None:
        """MySQL/MariaDB: commit the queued writes, a group of at most GROUP_WRITES_MAX per
        turn at the writer connection (group commit, as on PostgreSQL's writer thread);
        between groups the turn goes to whoever else waits for it (a fence being raised, a
        quarantine), so a steady stream of writes never starves them."""
        try:
            while self._group:
                async with self._writer_turn:
                    count = min(GROUP_WRITES_MAX, len(self._group))
                    group = [self._group.popleft() for _ in range(count)]
                    try:
                        await greenlet_spawn(self._commit_group, group, self._transact_mysql)
                    finally:
                        for pending in group:  # cut off (closing): every waiter hears of it
                            if not pending.done.done():
                                pending.done.set_exception(self._cut_off())
        finally:
            self._draining = False
            while self._group:  # closing: nothing more will run
                pending = self._group.popleft()
                pending.done.set_exception(
                    RegionUnavailable(f"cell {self.cell.id}: the copy is closing")
                )

    def _cut_off(self) -> WriteOutcomeUnknown:
        return WriteOutcomeUnknown(
            f"cell {self.cell.id}: the write was cut off as the copy closed; it may have "
            "committed: repeat the request as it was to learn its outcome",
            region=self.region,
            call=DATABASE_CALL,
            cell=self.cell.id,
        )

    def _transact_mysql(
        self, body: Callable[[WriteTx], tuple[T, int]], epoch: int, fence_version: int
    ) -> tuple[T, int]:
        """One write transaction on MySQL/MariaDB, in a greenlet of the loop, on the driver's
        cursor of the writer connection: the cell's lock (the transaction begins with it),
        then `body`'s statements in batches (storage/mysql_batch.py), the last batch ending
        in the COMMIT. A connection found dead at the lock had done nothing: once more on a
        new one."""
        lock = (
            "SELECT last_position, fence_epoch FROM cell_meta "
            f"WHERE cell_id = {int(self.cell.id)} FOR UPDATE"
        )
        for attempt in range(2):
            with _connecting(self.cell.id):
                dbapi = await_only(self._mysql_writer())
            cursor = dbapi.cursor()
            begun = False
            try:
                with _lock_busy(self.cell.id), self._as_mysql_error(dbapi):
                    try:
                        tx = WriteTx(None, epoch, self.region, cursor=cursor, backend="mysql")
                        tx.deferred = []
                        tx.driver_error = self._async_writer.dialect.dbapi.Error  # type: ignore[union-attr]
                        ((_, (locked,), _),) = tx._send([lock])
                        begun = True
                        self._fenced(locked, fence_version)
                        tx.locked_fence_epoch = int(locked.fence_epoch)
                        tx.position_at = [int(locked.last_position)]
                        done = body(tx)
                        tx._send(["COMMIT"])  # with the last batch: its refusal stops it
                        return done
                    except BaseException:
                        self._rollback_mysql(dbapi)
                        raise
            except DBAPIError as error:
                if not error.connection_invalidated or begun or attempt > 0:
                    raise
            finally:
                cursor.close()
        raise AssertionError("unreachable")

    async def _mysql_writer(self) -> Any:
        """The writer connection's driver connection (SQLAlchemy's adapter of asyncmy),
        connected on first use and after it was found dead."""
        if self._writer_connection is None:
            assert self._async_writer is not None, "CellStore.open() first"
            self._writer_connection = await self._async_writer.connect()
        raw = await self._writer_connection.get_raw_connection()
        return raw.dbapi_connection

    async def _drop_writer(self) -> None:
        conn, self._writer_connection = self._writer_connection, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    def _rollback_mysql(self, dbapi: Any) -> None:
        """End a failed transaction; a connection that cannot (dead, or cut off mid-answer)
        is let go: the server ends its transaction, and the next write connects anew."""
        try:
            dbapi.rollback()
        except BaseException:
            await_only(self._drop_writer())

    @contextmanager
    def _as_mysql_error(self, dbapi: Any) -> Iterator[None]:
        """Raise the driver's errors as SQLAlchemy raises them on its own path (DBAPIError,
        `connection_invalidated` when the connection is dead), for `_lock_busy` and
        `may_have_committed`; a dead connection is let go."""
        assert self._async_writer is not None
        dialect = self._async_writer.dialect
        try:
            yield
        except dialect.dbapi.Error as error:  # type: ignore[union-attr]
            dead = dialect.is_disconnect(error, dbapi, None)
            if dead:
                await_only(self._drop_writer())
            raise DBAPIError.instance(
                None,
                None,
                error,
                dialect.dbapi.Error,  # type: ignore[union-attr]
                connection_invalidated=dead,
                dialect=dialect,
            ) from error

    async def _transact_async(
        self, body: Callable[[WriteTx], tuple[T, int]], epoch: int, fence_version: int = 0
    ) -> tuple[T, int]:
        """One write transaction through SQLAlchemy on the writer connection (a fence being
        raised, a quarantine: `body` gets a SQLAlchemy connection): it takes its turn at
        the connection (FIFO) with the groups of writes, and the cell_meta row lock, taken
        first, serialises it with every other process's writes."""
        writer, cell_id = self._async_writer, self.cell.id
        assert writer is not None, "CellStore.open() first"
        locked = False

        def run(conn: Connection) -> tuple[T, int]:
            nonlocal locked
            row = conn.execute(_LOCK_CELL, {"k_cell_id": cell_id}).one()
            locked = True
            self._fenced(row, fence_version)
            return body(WriteTx(conn, epoch=epoch, origin=self.region))

        async with self._writer_turn:
            for attempt in range(2):
                if self._writer_connection is None:
                    with _connecting(cell_id):
                        self._writer_connection = await writer.connect()
                conn = self._writer_connection
                try:
                    with _lock_busy(cell_id):
                        async with conn.begin():
                            return await conn.run_sync(run)
                except DBAPIError as error:
                    if not (error.connection_invalidated or conn.invalidated):
                        raise
                    self._writer_connection = None
                    await conn.close()
                    # Dead before its first statement (the server restarted, an idle
                    # connection was cut): nothing was done, so once more on a new one.
                    if locked or attempt > 0:
                        raise
        raise AssertionError("unreachable")

    def _fenced(self, locked: Any, fence_version: int) -> None:
        """Refuse, holding the cell's lock, a transaction under a rule older than the
        newest at which some process of this region saw the cell's owner or ban change:
        that process has acknowledged the change, so nothing admitted before it may commit
        (docs/architecture.md, A region of many processes)."""
        fence_epoch = int(locked.fence_epoch)
        if fence_version and fence_version < fence_epoch:
            raise self._banned(fence_epoch, fence_version)

    def _banned(self, fence_epoch: int, fence_version: int) -> WriteBanned:
        return WriteBanned(
            f"cell {self.cell.id} changed owner or ban at rule version {fence_epoch}; "
            f"this process still holds version {fence_version}: retry shortly",
            cell=self.cell.id,
        )

    async def raise_fence(self, version: int) -> None:
        """Raise this copy's database fence to rule `version` (never lowers it): once this
        returns, every transaction of any process that held the cell's lock has ended, and
        none under an older rule can take it and commit. Waits at most FENCE_LOCK_WAIT_MS
        for the lock (then Overloaded: the caller tries again)."""
        if self.backend == "sqlite":
            return  # one process per copy: the in-process fence is the whole fence
        cell_id = self.cell.id

        def body(tx: WriteTx) -> tuple[None, int]:
            tx.count(_RAISE_FENCE, {"k_cell_id": cell_id, "version": version})
            return None, 0

        async with self._write_slot():
            await self._transact(body, epoch=0, lock_wait_ms=FENCE_LOCK_WAIT_MS)

    def restored(self, position: int, trimmed_position: int = 0) -> None:
        """Note the position a snapshot brought this copy to, and the changelog it copied
        (replication/snapshot.py)."""
        self._tail.clear()
        self.trimmed_position = trimmed_position
        self._advance(position)

    def wiped(self) -> None:
        """Note that a bootstrap emptied this copy: position and trim point are 0 again
        (the only way this copy's position goes back)."""
        self._tail.clear()
        self.position = 0
        self.trimmed_position = 0

    async def write_local(self, work: Callable[[WriteTx], int]) -> int:
        """A transaction that trims this copy's changelog, owner or replica, outside the
        fence and never captured: the trim is this copy's own business (each copy keeps what
        it needs) and changes no position. `work` returns the new trim point."""

        def body(tx: WriteTx) -> tuple[int, int]:
            return work(tx), 0

        async with self._write_slot():
            trimmed, _ = await self._transact(body, epoch=0)
        if trimmed > self.trimmed_position:
            self.trimmed_position = trimmed
            self._tail.drop_through(trimmed)
        return trimmed

    async def write_own(self, work: Callable[[WriteTx], T]) -> T:
        """A transaction on this copy's own tables (`schema.local`: the quarantine), owner or
        replica, outside the fence and never captured: they are this copy's bookkeeping,
        never replicated, and change no position. `work` must touch no other table."""

        def body(tx: WriteTx) -> tuple[T, int]:
            return work(tx), 0

        async with self._write_slot():
            result, _ = await self._transact(body, epoch=0)
        return result

    def _advance(self, position: int) -> None:
        """Note a committed position and wake whoever waits for it (replication pulls)."""
        if position > self.position:
            self.position = position
            self._moved.set()
            self._moved = asyncio.Event()

    async def wait_beyond(self, position: int, timeout_s: float) -> int:
        """Wait until this copy has a position above `position`, at most `timeout_s`.
        Shared with other processes, their commits are seen by polling the database
        (`_poll_position`) while anyone waits."""
        self._waiters += 1
        try:
            if self.shared and (self._poller is None or self._poller.done()):
                self._poller = asyncio.create_task(self._poll_position(), name="position-poll")
            async with asyncio.timeout(timeout_s):
                while self.position <= position:
                    await self._moved.wait()
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1
        return self.position

    async def _poll_position(self) -> None:
        """Read the position back from the database while someone waits for it: every
        POLL_S_MIN after it moved, backing off to POLL_S_MAX while it stands still (an
        idle copy costs a few reads a second, a busy one is seen within a few ms)."""
        interval_s = POLL_S_MIN
        while self._waiters > 0:
            await asyncio.sleep(interval_s)
            before = self.position
            try:
                await self.refresh()
            except Exception as exc:  # the database away: the waits time out on their own
                log.warning("cell %s: position not read back: %s", self.cell.name, exc)
                interval_s = POLL_S_MAX
                continue
            moved = self.position > before
            interval_s = POLL_S_MIN if moved else min(interval_s * 2, POLL_S_MAX)

    async def refresh(self, max_age_s: float = 0.0) -> int:
        """Read this copy's position and trim point back from the database (other
        processes of the region write and trim it too); the position. A refresh that began
        within `max_age_s` is shared (0: one that begins now)."""
        now = time.monotonic()
        running = self._refreshing
        if max_age_s > 0 and now - self._refreshed_at <= max_age_s and running is not None:
            await asyncio.shield(running)
            return self.position
        self._refreshed_at = now
        job = asyncio.ensure_future(self._refresh_now())
        job.add_done_callback(_retrieve)
        self._refreshing = job
        await asyncio.shield(job)
        return self.position

    async def _refresh_now(self) -> None:
        last, trimmed = await self.read_meta()
        if trimmed > self.trimmed_position:
            self.trimmed_position = trimmed
            self._tail.drop_through(trimmed)
        self._advance(last)

    async def read_meta(self) -> tuple[int, int]:
        """(last_position, trimmed_position) as the database has them now."""
        params = {"k_cell_id": self.cell.id}

        def work(conn: Connection) -> tuple[int, int]:
            row = conn.execute(_META, params).one()
            return int(row.last_position), int(row.trimmed_position)

        return await self.read(work)

    @staticmethod
    def _run_inline(conn: Connection, begin: str, work: Callable[[Connection], T]) -> T | _Busy:
        """One transaction on the loop's own SQLite connection; BUSY if it cannot begin."""
        try:
            conn.exec_driver_sql(begin)
        except OperationalError as error:
            conn.commit()  # end SQLAlchemy's autobegun marker; nothing was begun
            if _is_busy(error):
                return BUSY
            raise
        try:
            result = work(conn)
            conn.exec_driver_sql("COMMIT")
            return result
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        finally:
            conn.commit()  # no-op at the driver (AUTOCOMMIT); resets SQLAlchemy's marker

    def _write_inline(
        self, cursor: Any, body: Callable[[WriteTx], tuple[T, int]], epoch: int
    ) -> tuple[T, int] | _Busy:
        """One write transaction on the loop's own SQLite connection, on its driver cursor;
        BUSY if another process holds the write lock (nothing was done)."""
        try:
            cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if _is_busy(error):
                return BUSY
            raise
        tx = WriteTx(None, epoch=epoch, origin=self.region, cursor=cursor)
        try:
            result = body(tx)
            cursor.execute("COMMIT")
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        self._after_inline_write(tx.logged)
        return result

    def _after_inline_write(self, rows: int) -> None:
        """Checkpoint the WAL on the writer thread every so many inline writes or rows."""
        self._writes_since_checkpoint += 1
        self._rows_since_checkpoint += rows
        if (
            self._writes_since_checkpoint < CHECKPOINT_EVERY_WRITES
            and self._rows_since_checkpoint < CHECKPOINT_EVERY_ROWS
        ):
            return
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._writes_since_checkpoint = self._rows_since_checkpoint = 0
        loop = asyncio.get_running_loop()
        self._checkpoint = loop.run_in_executor(self._write_thread, self._checkpoint_sync)

    def _checkpoint_sync(self) -> None:
        if self.backend != "sqlite" or self._writer is None:
            return
        # On the driver connection: a checkpoint cannot run inside the transaction that
        # SQLAlchemy would begin. RESTART, not PASSIVE: under continuous writes a PASSIVE
        # checkpoint never catches up with the frames appended meanwhile, the WAL is never
        # reset and grew to 1.4 GB in a benchmark. RESTART holds writers off for the few
        # milliseconds it takes (their inline BEGIN finds the lock taken and they queue on
        # this thread), so the next write starts the WAL from the beginning.
        raw = self._writer.raw_connection()
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(RESTART)")
        except Exception:
            log.exception("WAL checkpoint of cell %s failed", self.cell.name)
        finally:
            raw.close()

    async def last_position(self) -> int:
        return await self.read(
            lambda conn: int(conn.execute(select(cell_meta.c.last_position)).scalar_one())
        )

    async def encoded_changes_since(self, position: int, limit: int) -> list[bytes]:
        """Changelog rows after `position`, oldest first, each encoded as JSON: what a
        pull sends. From the tail of this copy's own writes when it reaches back that far."""
        assert 1 <= limit <= ROWS_PER_WRITE_MAX
        held = self._tail.since(position, limit, self.position)
        if held is not None:
            return held
        return [encode_change(row) for row in await self.changes_since(position, limit)]

    async def changes_since(self, position: int, limit: int) -> list[dict[str, Any]]:
        """Changelog rows after `position`, oldest first (what replication streams)."""
        assert 1 <= limit <= ROWS_PER_WRITE_MAX
        params = {"after": position, "n": limit}
        if self._cursor is not None:
            # One statement on the loop's driver cursor (an implicit read transaction): the
            # owner serves every replica's pulls, and this is most of what a pull costs.
            cursor = self._cursor.execute(*_bound(_CHANGES_AFTER, params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]

        def work(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(_CHANGES_AFTER, params)
            return [{str(k): v for k, v in r.items()} for r in rows.mappings()]

        return await self.read(work)


def _add_meta_columns(conn: Connection) -> None:
    """Databases created before changelog retention have no trim point, and those created
    before regions of many processes no database fence: add them (0: the whole changelog
    is there; no rule change recorded yet)."""
    columns = {c["name"] for c in inspect(conn).get_columns(cell_meta.name)}
    for column in ("trimmed_position", "fence_epoch"):
        if column not in columns:
            conn.execute(
                text(f"ALTER TABLE cell_meta ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0")
            )


# MySQL/MariaDB: a lock wait timeout and a deadlock. Every writer takes the cell_meta lock
# first, so these come from another process holding a cell's write lock too long (or from
# an operator's own statement): the transaction was rolled back, nothing was written.
_MYSQL_LOCK_ERRORS = (1205, 1213)
_PG_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout (raising the fence sets one)
_PG_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE: no transaction open on the connection


@contextmanager
def _connecting(cell_id: int, *driver_errors: type[Exception]) -> Iterator[None]:
    """Getting the writer's connection: a failure there sent nothing, so the write is
    refused as unavailable (503, retry), never answered as outcome unknown."""
    errors: tuple[type[Exception], ...] = (DBAPIError, PoolTimeout, *driver_errors)
    try:
        yield
    except errors as error:
        cause = getattr(error, "orig", None) or error
        raise RegionUnavailable(
            f"cell {cell_id}: its database cannot be reached ({type(cause).__name__}); "
            "nothing was written, retry shortly"
        ) from error


@contextmanager
def _lock_busy(cell_id: int) -> Iterator[None]:
    try:
        yield
    except DBAPIError as error:
        args = getattr(error.orig, "args", ())
        lock_timeout = getattr(error.orig, "sqlstate", None) == _PG_LOCK_NOT_AVAILABLE
        if lock_timeout or (args and args[0] in _MYSQL_LOCK_ERRORS):
            raise Overloaded(
                f"cell {cell_id}: a write waited too long for the cell's lock; "
                "nothing was written, retry shortly"
            ) from error
        raise


@contextmanager
def _as_dbapi_error(store: CellStore, held: Any) -> Iterator[None]:
    """Raise the driver's errors as SQLAlchemy raises them on the other paths (DBAPIError,
    `connection_invalidated` when the connection is dead), so that `_lock_busy` and
    `may_have_committed` read them alike; a dead connection is let go."""
    import psycopg

    try:
        yield
    except psycopg.Error as error:
        driver = held.driver_connection
        dead = driver is None or driver.closed or driver.broken
        if dead:
            store._pg = None
            held.invalidate()
        dialect = store._writer.dialect if store._writer is not None else None
        raise DBAPIError.instance(
            None, None, error, psycopg.Error, connection_invalidated=dead, dialect=dialect
        ) from error


def _rollback_pg(held: Any) -> None:
    """End a failed transaction on the held connection; if the connection is dead the
    server has ended it already (and `_as_dbapi_error` lets the connection go)."""
    driver = held.driver_connection
    if driver is None or driver.closed or driver.broken:
        return
    with contextlib.suppress(Exception):
        driver.execute("ROLLBACK")


def _retrieve(job: asyncio.Future[Any]) -> None:
    """Mark a background task's failure as seen: its caller, if cancelled, is gone."""
    if not job.cancelled():
        job.exception()


# The `call` of a 504 outcome_unknown when the owner's own database connection failed.
DATABASE_CALL = "database"


def may_have_committed(error: DBAPIError | sqlite3.Error) -> bool:
    """Whether a database error in a write transaction leaves its commit in doubt: the
    connection failed (the server went away, the link was cut, an I/O error), so the COMMIT
    may have reached the database before its answer was lost. A statement the database
    refused (a constraint, a syntax error) ended a transaction that never committed. Lock
    waits and deadlocks are answered as `overloaded` before they get here (_lock_busy)."""
    cause = error.orig if isinstance(error, DBAPIError) else error
    if isinstance(cause, sqlite3.Error):
        # SQLite's BUSY leaves the transaction open and it is rolled back: never committed.
        return isinstance(cause, sqlite3.OperationalError) and not _is_busy(cause)
    assert isinstance(error, DBAPIError)
    return error.connection_invalidated or isinstance(error, OperationalError | InterfaceError)


def _log_failed_refresh(job: asyncio.Future[Any]) -> None:
    if not job.cancelled() and job.exception() is not None:
        log.warning("position not read back after a lost commit: %s", job.exception())


async def _finish(future: asyncio.Future[T]) -> T:
    """Await a thread's transaction; if the caller is cancelled, still wait for the thread
    to finish, so that nobody believes a write is over while it can still commit (the
    fence's promise rests on it)."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise
