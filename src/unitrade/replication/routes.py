"""The replication endpoints a region serves for its copies: the stream (stream.py), pull
(one cell or many, long poll), snapshot pages, and waiting for a position. Signed calls
only.

Fault injection for tests: `UNITRADE_FAULTS=refuse_pulls` in a region's environment makes
it answer every pull and snapshot `503 region_unavailable`, so that what it writes reaches
no other region (the divergent tail a failover leaves; tests/test_reconcile.py). Read once
at start; logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.routing import Route

from unitrade.errors import NotFound, RegionUnavailable
from unitrade.replication.replicator import (
    PULL_TARGET,
    STREAM_TARGET,
    Replicator,
    serve_pull,
    serve_pull_many,
)
from unitrade.replication.snapshot import SNAPSHOT_TARGET, serve_snapshot, snapshot_tables
from unitrade.replication.stream import serve_stream
from unitrade.replication.wire import PullCall, PullManyCall, SnapshotCall, StreamCall, WaitCall
from unitrade.storage.copies import CellCopies
from unitrade.web.signed import internal_endpoint, internal_stream_endpoint

log = logging.getLogger("unitrade.replication")

PULL_PATH = "/internal/replication/pull"
WAIT_PATH = "/internal/replication/wait"
FAULTS_ENV = "UNITRADE_FAULTS"
REFUSE_PULLS = "refuse_pulls"


def _refusing_pulls() -> bool:
    faults = {f.strip() for f in os.environ.get(FAULTS_ENV, "").split(",")}
    return REFUSE_PULLS in faults


def replication_routes(copies: CellCopies, replicator: Replicator) -> list[Route]:
    refuse = _refusing_pulls()
    if refuse:
        log.warning("%s=%s: every pull and snapshot is refused", FAULTS_ENV, REFUSE_PULLS)

    def served() -> None:
        if refuse:
            raise RegionUnavailable(f"pulls refused ({FAULTS_ENV}={REFUSE_PULLS})")

    def known(cell: int) -> None:
        if cell not in copies.stores:
            raise NotFound(f"no cell {cell}")

    async def pull(b: PullCall) -> Any:
        served()
        known(b.cell)
        follower = (b.region, b.rule_version) if b.region else None
        return await serve_pull(
            copies, b.cell, b.after, b.limit, b.wait_ms, replicator.followers, follower
        )

    async def pull_many(b: PullManyCall) -> Any:
        served()
        # Cells this region does not own or does not know are answered one by one in the
        # reply's `errors`: the follower holds back only those streams.
        follower = (b.region, b.rule_version) if b.region else None
        cells = [(c.cell, c.after) for c in b.cells]
        return await serve_pull_many(
            copies, cells, b.limit, b.wait_ms, replicator.followers, follower
        )

    def stream(b: StreamCall) -> AsyncIterator[bytes]:
        served()  # before the answer starts: a refusal is a status, not a broken stream
        follower = (b.region, b.rule_version)
        cells = [(c.cell, c.after) for c in b.cells]
        return serve_stream(
            copies,
            cells,
            b.limit,
            b.duration_ms,
            replicator.followers,
            follower,
            lambda: replicator.stopping,
        )

    async def snapshot(b: SnapshotCall) -> Any:
        served()
        known(b.cell)
        if b.table is not None and b.table not in snapshot_tables(copies[b.cell]):
            raise NotFound(f"no table {b.table} in cell {b.cell}")
        return await serve_snapshot(copies, b.cell, b.table, b.after, b.limit, b.upto)

    async def wait(b: WaitCall) -> Any:
        known(b.cell)
        store = copies[b.cell]
        if copies.shared:
            await store.refresh()  # another process of this region may be the one applying
        position = await store.wait_beyond(b.position - 1, b.timeout_ms / 1000)
        return {"cell": b.cell, "position": position, "reached": position >= b.position}

    calls = [
        (WAIT_PATH, internal_endpoint(WaitCall, wait)),
        (SNAPSHOT_TARGET, internal_endpoint(SnapshotCall, snapshot)),
        (PULL_PATH, internal_endpoint(PullCall, pull)),
        (PULL_TARGET, internal_endpoint(PullManyCall, pull_many)),
    ]
    calls.append((STREAM_TARGET, internal_stream_endpoint(StreamCall, stream)))
    return [Route(path, handler, methods=["POST"]) for path, handler in calls]
