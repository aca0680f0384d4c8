"""The replication endpoints a region serves for its copies: pull (one cell or many, long
poll), snapshot pages, and waiting for a position. Signed calls only."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from unitrade.errors import NotFound
from unitrade.replication.replicator import PULL_TARGET, Replicator, serve_pull, serve_pull_many
from unitrade.replication.snapshot import SNAPSHOT_TARGET, serve_snapshot, snapshot_tables
from unitrade.replication.wire import PullCall, PullManyCall, SnapshotCall, WaitCall
from unitrade.storage.copies import CellCopies
from unitrade.web.signed import internal_endpoint

PULL_PATH = "/internal/replication/pull"
WAIT_PATH = "/internal/replication/wait"


def replication_routes(copies: CellCopies, replicator: Replicator) -> list[Route]:
    def known(cell: int) -> None:
        if cell not in copies.stores:
            raise NotFound(f"no cell {cell}")

    async def pull(b: PullCall) -> Any:
        known(b.cell)
        follower = (b.region, b.rule_version) if b.region else None
        return await serve_pull(
            copies, b.cell, b.after, b.limit, b.wait_ms, replicator.followers, follower
        )

    async def pull_many(b: PullManyCall) -> Any:
        # Cells this region does not own or does not know are answered one by one in the
        # reply's `errors`: the follower holds back only those streams.
        follower = (b.region, b.rule_version) if b.region else None
        cells = [(c.cell, c.after) for c in b.cells]
        return await serve_pull_many(
            copies, cells, b.limit, b.wait_ms, replicator.followers, follower
        )

    async def snapshot(b: SnapshotCall) -> Any:
        known(b.cell)
        if b.table is not None and b.table not in snapshot_tables(copies[b.cell]):
            raise NotFound(f"no table {b.table} in cell {b.cell}")
        return await serve_snapshot(copies, b.cell, b.table, b.after, b.limit, b.upto)

    async def wait(b: WaitCall) -> Any:
        known(b.cell)
        position = await copies[b.cell].wait_beyond(b.position - 1, b.timeout_ms / 1000)
        return {"cell": b.cell, "position": position, "reached": position >= b.position}

    calls = [
        (WAIT_PATH, internal_endpoint(WaitCall, wait)),
        (SNAPSHOT_TARGET, internal_endpoint(SnapshotCall, snapshot)),
        (PULL_PATH, internal_endpoint(PullCall, pull)),
        (PULL_TARGET, internal_endpoint(PullManyCall, pull_many)),
    ]
    return [Route(path, handler, methods=["POST"]) for path, handler in calls]
