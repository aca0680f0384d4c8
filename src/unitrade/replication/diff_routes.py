"""The internal API of `unitrade diff` (replication/diff.py): every region answers for its
own copy of a cell. Signed calls only, like every `/internal/...` route.

- `trimmed`: this copy's changelog trim point (the changelog is compared above the highest);
- `chunks`: the owner's chunk boundaries and checksums of a table, from a key on;
- `checksums`: this copy's checksums of given key ranges (the owner's chunks);
- `rows`: this copy's rows of a key range, one bounded page;
- `compare`: on a replica, compare (and with `repair`, repair) one page of a key range with
  the owner's rows, which the replica fetches itself: a repair never carries row images in
  a request body (the edge bounds those to 64 KiB), and the replica is the one that can wait
  for its own copy to catch up with the owner's page.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from sqlalchemy import Table
from starlette.routing import Route

from unitrade.errors import InvalidRequest, NotFound, RegionUnavailable
from unitrade.replication.diff import (
    CHECKSUMS_PATH,
    CHUNK_ROWS_MAX,
    CHUNKS_PATH,
    CHUNKS_PER_CALL_MAX,
    COMPARE_PATH,
    PAGE_ROWS_MAX,
    REPLICA_OVERSHOOT,
    ROWS_PATH,
    ROWS_PER_CALL_MAX,
    TRIMMED_PATH,
    Chunk,
    Key,
    Page,
    compare_page,
    compared_tables,
    next_chunk,
    parse_key,
    range_checksum,
    read_page,
    trimmed_position,
)
from unitrade.rpc.client import RegionClient
from unitrade.storage.copies import CellCopies
from unitrade.storage.store import CellStore
from unitrade.topology.rule import Rule
from unitrade.web.signed import internal_endpoint

KeyValue = (
    Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[StrictStr, Field(max_length=256)]
)
WireKey = Annotated[dict[str, KeyValue], Field(min_length=1, max_length=8)] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellCall(_Body):
    cell: int


class TableCall(_Body):
    cell: int
    table: Annotated[str, Field(max_length=64)]


class ChunksCall(TableCall):
    after: WireKey = None
    chunk_rows: Annotated[int, Field(ge=1, le=CHUNK_ROWS_MAX)]
    chunks_max: Annotated[int, Field(ge=1, le=CHUNKS_PER_CALL_MAX)]


class KeyRange(_Body):
    lo: WireKey = None
    hi: WireKey = None


class ChecksumsCall(TableCall):
    ranges: Annotated[list[KeyRange], Field(min_length=1, max_length=CHUNKS_PER_CALL_MAX)]
    rows_max: Annotated[int, Field(ge=1, le=CHUNK_ROWS_MAX * REPLICA_OVERSHOOT)]


class RowsCall(TableCall):
    lo: WireKey = None
    hi: WireKey = None
    limit: Annotated[int, Field(ge=1, le=PAGE_ROWS_MAX)]


class CompareCall(RowsCall):
    repair: bool = False


def diff_routes(copies: CellCopies, rule: Callable[[], Rule], client: RegionClient) -> list[Route]:
    """The routes of this region's copies, mounted by the region's server."""

    def store_and_table(b: TableCall) -> tuple[CellStore, Table]:
        store = copies.stores.get(b.cell)
        if store is None:
            raise NotFound(f"no cell {b.cell}")
        table = compared_tables(store.cell.kind).get(b.table)
        if table is None:
            raise InvalidRequest(f"cell {store.cell.name} has no compared table {b.table!r}")
        return store, table

    async def trimmed(b: CellCall) -> Any:
        store = copies.stores.get(b.cell)
        if store is None:
            raise NotFound(f"no cell {b.cell}")
        return {"cell": b.cell, "trimmed_position": await store.read(trimmed_position)}

    async def chunks(b: ChunksCall) -> Any:
        store, table = store_and_table(b)
        # Fewer chunks of large size per call: every call reads about the same number of rows.
        count = min(b.chunks_max, max(1, ROWS_PER_CALL_MAX // b.chunk_rows))
        lo = key(table, b.after)
        found: list[Chunk] = []
        while len(found) < count and (not found or found[-1].hi is not None):
            # One read transaction per chunk: on SQLite reads run on the event loop, which
            # serves other requests between chunks.
            work = functools.partial(next_chunk, table=table, lo=lo, chunk_rows=b.chunk_rows)
            found.append(await store.read(work))
            lo = found[-1].hi
        return {"chunks": [c.body() for c in found], "done": found[-1].hi is None}

    async def checksums(b: ChecksumsCall) -> Any:
        store, table = store_and_table(b)
        if len(b.ranges) * b.rows_max > ROWS_PER_CALL_MAX * REPLICA_OVERSHOOT:
            raise InvalidRequest("too many rows for one call: fewer ranges or a lower rows_max")
        bounds = [(key(table, r.lo), key(table, r.hi)) for r in b.ranges]
        sums = []
        for lo, hi in bounds:
            work = functools.partial(range_checksum, table=table, lo=lo, hi=hi, rows_max=b.rows_max)
            checksum = await store.read(work)
            sums.append(checksum.body())
        return {"checksums": sums}

    async def rows(b: RowsCall) -> Any:
        store, table = store_and_table(b)
        lo, hi = key(table, b.lo), key(table, b.hi)
        page = await store.read(lambda c: read_page(c, table, lo, hi, b.limit))
        return page.body()

    async def compare(b: CompareCall) -> Any:
        store, table = store_and_table(b)
        owner = rule().owner_of(b.cell)

        async def owner_page(lo: Key | None, hi: Key | None, limit: int) -> Page:
            call = {"cell": b.cell, "table": b.table, "lo": lo, "hi": hi, "limit": limit}
            page = Page.from_body(await client.call(owner, "POST", ROWS_PATH, call))
            columns = {str(c.name) for c in table.columns}
            if any(set(row) != columns for row in page.rows):
                raise RegionUnavailable(f"{owner} answered rows that are not rows of {b.table}")
            return page

        lo, hi = key(table, b.lo), key(table, b.hi)
        result = await compare_page(store, table, lo, hi, b.limit, owner_page, b.repair)
        return result.body()

    routes = [
        (TRIMMED_PATH, internal_endpoint(CellCall, trimmed)),
        (CHUNKS_PATH, internal_endpoint(ChunksCall, chunks)),
        (CHECKSUMS_PATH, internal_endpoint(ChecksumsCall, checksums)),
        (ROWS_PATH, internal_endpoint(RowsCall, rows)),
        (COMPARE_PATH, internal_endpoint(CompareCall, compare)),
    ]
    return [Route(path, handler, methods=["POST"]) for path, handler in routes]


def key(table: Table, raw: dict[str, Any] | None) -> Key | None:
    try:
        return parse_key(table, raw)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
