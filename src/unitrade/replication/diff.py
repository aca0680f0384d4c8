"""Row-by-row comparison of a replica copy of a cell with its owner's copy, and repair.

A table is compared in chunks: ranges of its primary key of at most `chunk_rows` rows of the
owner's copy, each summarised by a checksum (row count and the sum of a 64-bit digest per
row). The owner defines the ranges, every replica checksums the same ranges of its own copy,
and only the chunks whose checksums differ are fetched row by row. Every read is a bounded
keyset page over the primary key order, so no table is ever loaded whole and no call runs
for long, however large the table (vitess#18227 timed out on large tables). The result is
the list of mismatched primary keys (vitess#14323): missing on the replica, extra on it, or
different.

Copies move while they are compared. A page of the owner's rows is read between two
positions of its changelog (`since`, `until`); the replica compares it only once it has
applied everything up to `until`, and leaves aside every key its own changelog (a verbatim
copy of the owner's) changed after `since`: those rows may differ only because one copy is
further ahead. The rest must be equal, whatever the lag, and a repair rewrites only them.

Each copy trims its own changelog (storage/retention.py), each as far as its own rules and
followers allow. The changelog is compared only above the highest trim point of the copies
compared (the `diff` command starts its chunks there, from `/internal/diff/trimmed`), and a
position either copy trimmed during the comparison is never a difference.

No statement depends on the database engine: SQLAlchemy Core only, on SQLite, PostgreSQL and
MySQL/MariaDB (composite keys compared as storage/keys.py spells them for each).
Range bounds always come from the database's own key order, never from a comparison in
Python, so string keys page correctly whatever the collation, as long as all copies of a cell
order keys the same way.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from sqlalchemy import Connection, Table, bindparam, select
from sqlalchemy.sql import ColumnElement, Select

from unitrade.errors import RegionUnavailable, WrongRegion
from unitrade.storage.keys import key_after, key_up_to
from unitrade.storage.schema import cell_meta, changelog, tables_of
from unitrade.storage.store import ROWS_PER_WRITE_MAX, CellStore, WriteTx, to_json
from unitrade.topology.config import CellKind

Key = dict[str, Any]  # primary key column -> value
RowImage = dict[str, Any]
Kind = Literal["missing", "extra", "different"]
# Reads a statement in the current transaction: Connection.execute or WriteTx.all.
Fetch = Callable[[Select[Any], Mapping[str, Any]], Sequence[Any]]

CHUNK_ROWS_DEFAULT = 1_000
CHUNK_ROWS_MAX = 10_000
# A replica's range is read at most this many times the owner's chunk size: more rows than
# that is a mismatch already, and the row comparison pages through them.
REPLICA_OVERSHOOT = 4
PAGE_ROWS_MAX = ROWS_PER_WRITE_MAX  # rows compared (and repaired) in one transaction
# Changes applied to the replica after the owner's page was read, looked at to set aside the
# keys in flux: more than this and the call fails (the replica was far behind; retry later).
TOUCHED_MAX = 50_000
CATCH_UP_WAIT_S = 5.0  # how long a replica waits to reach the owner's page position
# When the replica holds more than a page of rows before the owner's page ends, the owner's
# page is read again up to the replica's last row; at most this many reads per page.
PAGE_ATTEMPTS = 4
DIGEST_MODULUS = 2**64
# One call computes at most this many chunks, and checksums at most this many rows (bounded
# time per call: a table of any size is many short calls, not one long one).
CHUNKS_PER_CALL_MAX = 64
ROWS_PER_CALL_MAX = 100_000

# The internal API (replication/diff_routes.py), which the `diff` command calls.
CHUNKS_PATH = "/internal/diff/chunks"
TRIMMED_PATH = "/internal/diff/trimmed"
CHECKSUMS_PATH = "/internal/diff/checksums"
ROWS_PATH = "/internal/diff/rows"
COMPARE_PATH = "/internal/diff/compare"


# -- which tables ---------------------------------------------------------------------------


def compared_tables(kind: CellKind) -> dict[str, Table]:
    """Every table of a cell copy except `cell_meta` (each copy's own position); the
    changelog is compared too: a replica holds the owner's rows verbatim."""
    tables = {name: t for name, t in tables_of(kind).items() if name != cell_meta.name}
    return dict(sorted(tables.items(), key=lambda item: (item[0] == changelog.name, item[0])))


def parse_key(table: Table, raw: Mapping[str, Any] | None) -> Key | None:
    """A primary key from the wire, checked against the table: its columns, and ints and
    strings where the columns hold them (SQLite would compare 1 and "1" as different)."""
    if raw is None:
        return None
    columns = list(table.primary_key.columns)
    if set(raw) != {c.name for c in columns}:
        raise ValueError(f"a key of {table.name} has the columns {[c.name for c in columns]}")
    key: Key = {}
    for column in columns:
        value = raw[column.name]
        expected = column.type.python_type
        if type(value) is not expected:
            raise ValueError(f"{table.name}.{column.name} must be {expected.__name__}")
        key[str(column.name)] = value
    return key


def key_of(table: Table, row: Mapping[str, Any]) -> Key:
    return {str(c.name): row[c.name] for c in table.primary_key.columns}


def key_text(key: Mapping[str, Any]) -> str:
    """The canonical text of a key: how the changelog's `pk` column spells it."""
    return to_json(dict(key))


# -- checksums ------------------------------------------------------------------------------


def row_digest(row: Mapping[str, Any]) -> int:
    """64 bits of a row: canonical JSON (sorted keys), so every engine gives the same."""
    return int.from_bytes(hashlib.blake2b(to_json(dict(row)).encode(), digest_size=8).digest())


@dataclass(frozen=True)
class Checksum:
    """Rows of a range: how many, and the sum of their digests. A sum rather than a running
    hash: it does not depend on the order rows arrive in."""

    count: int = 0
    total: int = 0

    def add(self, row: Mapping[str, Any]) -> Checksum:
        return Checksum(self.count + 1, (self.total + row_digest(row)) % DIGEST_MODULUS)

    def body(self) -> dict[str, Any]:
        return {"count": self.count, "sum": f"{self.total:016x}"}

    @classmethod
    def of(cls, rows: Sequence[Mapping[str, Any]]) -> Checksum:
        checksum = cls()
        for row in rows:
            checksum = checksum.add(row)
        return checksum

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Checksum:
        return cls(int(body["count"]), int(str(body["sum"]), 16))


@dataclass(frozen=True)
class Chunk:
    """The owner's rows in (lo, hi]; None is the start or the end of the table."""

    lo: Key | None
    hi: Key | None
    checksum: Checksum

    def body(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, **self.checksum.body()}


# -- statements -----------------------------------------------------------------------------


def _key_bound(table: Table, prefix: str) -> list[ColumnElement[Any]]:
    return [bindparam(f"{prefix}{c.name}", type_=c.type) for c in table.primary_key.columns]


@functools.cache  # one statement per shape: the inline SQLite path caches its SQL by statement
def _range_statement(table: Table, lower: bool, upper: bool) -> Select[Any]:
    """Rows with lo < key <= hi in key order, at most :n (keyset pagination)."""
    key = list(table.primary_key.columns)
    statement = select(table)
    if lower:
        statement = statement.where(key_after(key, _key_bound(table, "lo_")))
    if upper:
        statement = statement.where(key_up_to(key, _key_bound(table, "hi_")))
    return statement.order_by(*table.primary_key.columns).limit(bindparam("n"))


_POSITION = select(cell_meta.c.last_position)
_TRIMMED = select(cell_meta.c.trimmed_position)
_TOUCHED = (
    select(changelog.c.pk)
    .where(
        changelog.c.tbl == bindparam("tbl"),
        changelog.c.position > bindparam("after"),
        changelog.c.position <= bindparam("upto"),
    )
    .limit(bindparam("n"))
)


def _range_rows(fetch: Fetch, table: Table, lo: Key | None, hi: Key | None, n: int) -> list[Any]:
    params: dict[str, Any] = {"n": n}
    params.update({f"lo_{name}": value for name, value in (lo or {}).items()})
    params.update({f"hi_{name}": value for name, value in (hi or {}).items()})
    statement = _range_statement(table, lo is not None, hi is not None)
    return [dict(row._mapping) for row in fetch(statement, params)]


def _on(conn: Connection) -> Fetch:
    return lambda statement, params: conn.execute(statement, params).all()


def _position(fetch: Fetch) -> int:
    (row,) = fetch(_POSITION, {})
    return int(row[0])


def trimmed_position(conn: Connection) -> int:
    """This copy's changelog trim point: it holds only the positions after it."""
    return _trimmed(_on(conn))


def _trimmed(fetch: Fetch) -> int:
    (row,) = fetch(_TRIMMED, {})
    return int(row[0])


# -- work functions for CellStore.read --------------------------------------------------------


def next_chunk(conn: Connection, table: Table, lo: Key | None, chunk_rows: int) -> Chunk:
    """The owner's chunk after `lo`: its next `chunk_rows` rows, or all the rest (then open
    ended, so that a replica's rows past the owner's last key are counted too)."""
    assert 1 <= chunk_rows <= CHUNK_ROWS_MAX
    rows = _range_rows(_on(conn), table, lo, None, chunk_rows)
    hi = key_of(table, rows[-1]) if len(rows) == chunk_rows else None
    return Chunk(lo, hi, Checksum.of(rows))


def range_checksum(
    conn: Connection, table: Table, lo: Key | None, hi: Key | None, rows_max: int
) -> Checksum:
    """The checksum of this copy's rows in (lo, hi], reading at most `rows_max` + 1 rows: a
    count above `rows_max` is a mismatch already."""
    assert 1 <= rows_max <= CHUNK_ROWS_MAX * REPLICA_OVERSHOOT
    return Checksum.of(_range_rows(_on(conn), table, lo, hi, rows_max + 1))


@dataclass(frozen=True)
class Page:
    """A copy's rows in (lo, hi], at most `limit`; read while the copy's position went from
    `since` to `until` (equal where the transaction is a snapshot)."""

    rows: list[RowImage]
    complete: bool  # every row of (lo, hi] is here
    since: int
    until: int
    trimmed: int = 0  # the copy's changelog trim point, read after the rows

    def body(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "complete": self.complete,
            "since": self.since,
            "until": self.until,
            "trimmed": self.trimmed,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Page:
        rows, complete = list(body["rows"]), bool(body["complete"])
        return cls(rows, complete, body["since"], body["until"], int(body.get("trimmed", 0)))

    def end(self, table: Table, hi: Key | None) -> Key | None:
        """The upper bound of what this page covers."""
        return hi if self.complete else key_of(table, self.rows[-1])


def read_page(conn: Connection, table: Table, lo: Key | None, hi: Key | None, limit: int) -> Page:
    """This copy's rows in (lo, hi], at most `limit`. The position is read before and after:
    under PostgreSQL's READ COMMITTED each statement sees its own snapshot."""
    assert 1 <= limit <= PAGE_ROWS_MAX
    fetch = _on(conn)
    since = _position(fetch)
    rows = _range_rows(fetch, table, lo, hi, limit + 1)
    until = _position(fetch)
    return Page(rows[:limit], len(rows) <= limit, since, until, _trimmed(fetch))


# -- comparison and repair, on the replica ----------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    table: str
    key: Key
    kind: Kind
    columns: tuple[str, ...] = ()  # the columns that differ (kind "different")

    def body(self) -> dict[str, Any]:
        return {"table": self.table, "key": self.key, "kind": self.kind, "columns": self.columns}


@dataclass(frozen=True)
class Outcome:
    """What one page of a replica's comparison found (and repaired)."""

    mismatches: list[Mismatch] = field(default_factory=list)
    in_flux: int = 0  # differing rows left aside: changed by replication meanwhile
    truncated_at: Key | None = None  # the replica has more rows: compare up to here first
    repaired: bool = False


def compare_rows(
    table: Table, owner_rows: Sequence[Mapping[str, Any]], replica_rows: Sequence[Mapping[str, Any]]
) -> list[Mismatch]:
    """The keys of one range whose rows differ; owner order first, then extras."""
    replica = {key_text(key_of(table, row)): row for row in replica_rows}
    found: list[Mismatch] = []
    for row in owner_rows:
        key = key_of(table, row)
        theirs = replica.pop(key_text(key), None)
        if theirs is None:
            found.append(Mismatch(table.name, key, "missing"))
        elif to_json(dict(theirs)) != to_json(dict(row)):
            columns = tuple(sorted(c for c in row if row.get(c) != theirs.get(c)))
            found.append(Mismatch(table.name, key, "different", columns))
    found += [Mismatch(table.name, key_of(table, row), "extra") for row in replica.values()]
    return found


def _touched(fetch: Fetch, table: Table, after: int, upto: int) -> set[str]:
    """Keys of `table` this copy's changelog changed in (after, upto]."""
    if upto <= after:
        return set()
    if upto - after > TOUCHED_MAX:
        raise RegionUnavailable(f"the copy moved {upto - after} positions during the check")
    if table.name == changelog.name:  # its rows are the positions themselves
        return {key_text({"position": p}) for p in range(after + 1, upto + 1)}
    params = {"tbl": table.name, "after": after, "upto": upto, "n": TOUCHED_MAX}
    return {key_text(_parse_pk(row[0])) for row in fetch(_TOUCHED, params)}


def _parse_pk(text: str) -> Key:
    parsed: Key = orjson.loads(text)
    return parsed


def reconcile(
    fetch: Fetch, table: Table, lo: Key | None, end: Key | None, owner: Page, limit: int
) -> Outcome:
    """Compare the owner's page (its rows in (lo, end]) with this copy's rows of the range,
    in one transaction of this copy, which must have applied at least up to `owner.until`."""
    before = _position(fetch)
    if before < owner.until:
        raise RegionUnavailable(f"this copy is at {before}, behind the owner's {owner.until}")
    rows = _range_rows(fetch, table, lo, end, limit + 1)
    if len(rows) > limit:
        return Outcome(truncated_at=key_of(table, rows[limit - 1]))
    touched = _touched(fetch, table, owner.since, _position(fetch))
    found = compare_rows(table, owner.rows, rows)
    if table.name == changelog.name:
        # A position either copy trimmed is not a difference: each copy trims on its own.
        trimmed = max(owner.trimmed, _trimmed(fetch))
        found = [m for m in found if int(m.key["position"]) > trimmed]
    settled = [m for m in found if key_text(m.key) not in touched]
    return Outcome(settled, len(found) - len(settled))


def fix(tx: WriteTx, table: Table, mismatches: Sequence[Mismatch], owner: Page) -> None:
    """Make this copy's rows equal to the owner's, key by key, without capturing anything:
    the changelog is the owner's, and a replica must not add to it."""
    images = {key_text(key_of(table, row)): row for row in owner.rows}
    for mismatch in mismatches:
        if mismatch.kind != "missing":
            tx.delete_row(table, mismatch.key)
        if mismatch.kind != "extra":
            tx.put_row(table, images[key_text(mismatch.key)])


def repair_page(
    tx: WriteTx, table: Table, lo: Key | None, end: Key | None, owner: Page, limit: int
) -> Outcome:
    """`reconcile`, then `fix` in the same transaction: what is repaired is what was found."""
    outcome = reconcile(tx.all, table, lo, end, owner, limit)
    if outcome.truncated_at is not None:
        return outcome
    fix(tx, table, outcome.mismatches, owner)
    return Outcome(outcome.mismatches, outcome.in_flux, repaired=True)


def refuse_owner(store: CellStore) -> None:
    """The owner's copy is the reference: it is never compared with itself, nor repaired."""
    owner = store.fence.rule.owner_of(store.cell.id)
    if owner == store.region:
        raise WrongRegion(
            f"cell {store.cell.id} is owned by {store.region}; its copy here is not a replica",
            owner=owner,
        )


OwnerPages = Callable[[Key | None, Key | None, int], Awaitable[Page]]


@dataclass(frozen=True)
class PageResult:
    """One compared page of a range: what it found, and where the range goes on."""

    outcome: Outcome
    next_lo: Key | None
    done: bool  # the whole range (lo, hi] is compared

    def body(self) -> dict[str, Any]:
        return {
            "mismatches": [m.body() for m in self.outcome.mismatches],
            "in_flux": self.outcome.in_flux,
            "repaired": self.outcome.repaired,
            "next_lo": self.next_lo,
            "done": self.done,
        }


async def compare_page(
    store: CellStore,
    table: Table,
    lo: Key | None,
    hi: Key | None,
    limit: int,
    owner_page: OwnerPages,
    repair: bool,
) -> PageResult:
    """Compare (and repair) the first page of (lo, hi] of this replica copy with the owner's.

    The page ends where the owner's page ends; when this copy holds more rows than `limit`
    before that, it ends at this copy's last row instead, and the owner's page is read again
    up to there: bounds always come from a database, never from ordering keys in Python.
    """
    assert 1 <= limit <= PAGE_ROWS_MAX
    refuse_owner(store)
    end = hi
    for _ in range(PAGE_ATTEMPTS):
        owner = await owner_page(lo, end, limit)
        page_end = owner.end(table, end)
        if store.position < owner.until:
            await store.wait_beyond(owner.until - 1, CATCH_UP_WAIT_S)

        def work(tx: WriteTx, owner: Page = owner, page_end: Key | None = page_end) -> Outcome:
            return repair_page(tx, table, lo, page_end, owner, limit)

        def look(conn: Connection, owner: Page = owner, page_end: Key | None = page_end) -> Outcome:
            return reconcile(_on(conn), table, lo, page_end, owner, limit)

        outcome = await store.write_replica(work) if repair else await store.read(look)
        if outcome.truncated_at is None:
            done = owner.complete and end == hi
            return PageResult(outcome, None if done else page_end, done)
        end = outcome.truncated_at
    raise RegionUnavailable(f"rows of {table.name} kept moving; compare again later")
