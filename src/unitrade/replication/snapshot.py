"""Bootstrap of a new or wiped cell copy: a snapshot plus the stream (docs/architecture.md).

The replica first asks the owner for its current position P, then copies every table in
chunks of primary-key order, each chunk its own read at the owner: a fuzzy snapshot, so the
owner never pauses writes. It then sets its checkpoint to P and streams from there. Replaying
the changes after P over rows copied at or after P converges to the owner's state, since
every change carries the whole row image (or is a delete) and is applied in order; the
changelog itself is copied up to P only, so every copy keeps the same changelog rows.

The owner may trim its changelog while it is copied (storage/retention.py): the copy keeps
the last gapless run of positions it received, ending at P, and sets its trim point below
it; with nothing of that run, its trim point is P.

The wipe sets the copy's position and trim point back to 0 in the same transaction, so a
bootstrap that dies half-way leaves the copy at position 0, and the next one starts by
wiping what the last one copied (rows the owner may have deleted since would otherwise stay).
A copy that was streaming (a follower told `changelog_trimmed`) is rebuilt the same way.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Connection, Table, bindparam, delete, select, update
from sqlalchemy.sql import Select

from unitrade.errors import WrongRegion
from unitrade.rpc.client import RegionClient
from unitrade.storage.copies import CellCopies
from unitrade.storage.keys import key_after
from unitrade.storage.schema import cell_meta, changelog, tables_of
from unitrade.storage.store import CellStore, WriteTx

CHUNK_ROWS_MAX = 1_000
SNAPSHOT_TARGET = "/internal/replication/snapshot"


def snapshot_tables(store: CellStore) -> dict[str, Table]:
    """Every table a snapshot copies: all but the copy's own metadata."""
    return {n: t for n, t in tables_of(store.cell.kind).items() if n != "cell_meta"}


@functools.cache
def _chunk_statement(table: Table, after: bool) -> Select[Any]:
    key = list(table.primary_key.columns)
    statement = select(table).order_by(*key).limit(bindparam("n"))
    if after:
        statement = statement.where(key_after(key, [bindparam(f"a_{c.name}") for c in key]))
    if table is changelog:
        statement = statement.where(changelog.c.position <= bindparam("upto"))
    return statement


async def serve_snapshot(
    copies: CellCopies,
    cell: int,
    table_name: str | None,
    after: list[Any] | None,
    limit: int,
    upto: int,
) -> dict[str, Any]:
    """The owner's side: its position (no table), or a chunk of a table after a key."""
    assert 1 <= limit <= CHUNK_ROWS_MAX
    owner = copies.fence.rule.owner_of(cell)
    if owner != copies.region:
        raise WrongRegion(f"cell {cell} is owned by {owner}", owner=owner, cell=cell)
    store = copies[cell]
    if table_name is None:
        return {"cell": cell, "position": await store.last_position()}
    table = snapshot_tables(store)[table_name]
    key = [str(c.name) for c in table.primary_key.columns]
    params: dict[str, Any] = {"n": limit, "upto": upto}
    if after is not None:
        params.update({f"a_{name}": value for name, value in zip(key, after, strict=True)})
    statement = _chunk_statement(table, after is not None)

    def work(conn: Connection) -> list[dict[str, Any]]:
        rows = conn.execute(statement, params).mappings()
        return [{str(k): v for k, v in r.items()} for r in rows]

    rows = await store.read(work)
    last = [rows[-1][name] for name in key] if rows else None
    return {"cell": cell, "table": table_name, "rows": rows, "last_key": last}


_SET_START = (
    update(cell_meta)
    .where(cell_meta.c.cell_id == bindparam("k_cell_id"), cell_meta.c.last_position == 0)
    .values(last_position=bindparam("s_position"), trimmed_position=bindparam("s_trimmed"))
)
_WIPE_META = update(cell_meta).values(last_position=0, trimmed_position=0)
_DROP_THROUGH = delete(changelog).where(changelog.c.position <= bindparam("upto"))


class ChangelogRun:
    """The positions of the owner's changelog as the chunks bring them: where the last
    gapless run starts (the owner trimmed past what an earlier chunk brought if a chunk
    does not follow it)."""

    def __init__(self) -> None:
        self.first = 0
        self.last = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            position = int(row["position"])
            if position != self.last + 1 or not self.first:
                self.first = position
            self.last = position

    def trim_point(self, start: int) -> int:
        """The copy's trim point once it holds these rows: below the run if it ends at the
        snapshot's position `start`, else `start` (the copy has no usable changelog)."""
        if self.first and self.last == start:
            return self.first - 1
        return start


def _load(table: Table, rows: list[dict[str, Any]], tx: WriteTx) -> None:
    # One statement for the chunk (an executemany; a multi-row INSERT on MySQL), not one
    # round trip per row.
    tx.put_rows(table, rows)


async def owner_position(client: RegionClient, owner: str, cell: int) -> int:
    reply = await client.call(owner, "POST", SNAPSHOT_TARGET, {"cell": cell})
    return int(reply["position"])


async def bootstrap(store: CellStore, client: RegionClient, owner: str) -> int:
    """Rebuild this replica copy from the owner's snapshot; the position to stream from."""
    cell = store.cell.id
    target = SNAPSHOT_TARGET
    start = await owner_position(client, owner, cell)
    tables = snapshot_tables(store)

    def wipe(tx: WriteTx) -> None:
        for table in tables.values():
            tx.count(delete(table), {})
        tx.count(_WIPE_META, {})

    await store.write_replica(wipe)
    store.wiped()
    run = ChangelogRun()
    for name, table in tables.items():
        after: list[Any] | None = None
        while True:
            chunk = await client.call(
                owner,
                "POST",
                target,
                {
                    "cell": cell,
                    "table": name,
                    "after": after,
                    "limit": CHUNK_ROWS_MAX,
                    "upto": start,
                },
            )
            rows = chunk["rows"]
            if table is changelog:
                run.add(rows)
            if rows:
                await store.write_replica(functools.partial(_load, table, rows))
            if len(rows) < CHUNK_ROWS_MAX:
                break
            after = chunk["last_key"]
    trimmed = run.trim_point(start)
    params = {"k_cell_id": cell, "s_position": start, "s_trimmed": trimmed}

    def finish(tx: WriteTx) -> int:
        tx.count(_DROP_THROUGH, {"upto": trimmed})  # what came before a gap, if any
        return tx.count(_SET_START, params)

    moved = await store.write_replica(finish)
    assert moved == 1, "the copy's position moved during its bootstrap"
    store.restored(start, trimmed)
    return start
