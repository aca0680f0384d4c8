"""The owner's side of a replication stream: one long-lived response per (follower, owner)
pair that carries every cell the follower follows from this owner, a frame as soon as rows
commit.

Why a stream and not a pull per batch: a pull costs a request at both ends whatever it
carries, so pulls were held to one per 25 ms window, and that window was most of the lag
(p50 ~15 ms, docs/benchmarks.md, Replication). A stream costs one request per few seconds;
a frame is a write on a connection that is already open, so it can go out at once.

The follower opens it (POST /internal/replication/stream, signed like every internal call)
with each cell's position, its region and its rule version: the same acknowledgement a pull
carries (`Followers.saw`: retention and the switchover read it). The stream ends after at
most STREAM_MS_MAX (replicator.py; or the follower's shorter `duration_ms`), when this
region's rule changes, or when a cell's changelog is trimmed past what the stream needs;
the follower then opens it again from its checkpoints, which acknowledges what it applied.

Frames are length-prefixed JSON (`<bytes>\\n<json>`; the follower refuses one announced
over FRAME_BYTES_MAX), each shaped like a pull_many reply: `now_ms`, `cells` (every cell of
the stream with its head, and the rows after what the stream sent so far: at most `limit`
per cell and PULL_ROWS_MAX in all), `errors`. Every cell is in every frame, as in a pull
reply, so that each stream's head, lag and "heard" stay what a pull left them. With nothing
to send, a frame without rows goes out every HEARTBEAT_S: the follower tells a quiet owner
from a dead one by it (STALE_AFTER_S). Backpressure: the next frame is built only once the
last one is handed to the transport, which waits for the socket to drain, so a slow
follower sets its own pace and the owner holds at most one frame per stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson

from unitrade.errors import NotFound, UnitradeError
from unitrade.replication import replicator as pull
from unitrade.replication.replicator import Followers, fair_shares, refuse_trimmed
from unitrade.storage.copies import CellCopies
from unitrade.storage.store import CellStore, now_ms
from unitrade.storage.tail import encoded_array
from unitrade.topology.rule import RoutingError

HEARTBEAT_S = 1.0  # a frame without rows after this long without one (well under STALE_AFTER_S)
# After a frame, the next one waits this long at most for rows to gather. A frame per commit
# costs the owner a write and its followers an apply transaction per cell each time: at
# 1,000 orders/s hz commits ~2,000 times a second (docs/benchmarks.md, Replication). Only
# while rows keep coming: a commit after a quiet moment goes out in the next loop turn.
FRAME_INTERVAL_S = 0.002


def encode_frame(frame: dict[str, Any]) -> bytes:
    body = orjson.dumps(frame)
    return b"%d\n" % len(body) + body


class _Wake:
    """An event set by any commit in the copies of a stream (CellStore.watch)."""

    def __init__(self, stores: Sequence[CellStore]) -> None:
        self.event = asyncio.Event()
        self.stores = list(stores)
        for store in self.stores:
            store.watch(self.event.set)

    def close(self) -> None:
        for store in self.stores:
            store.unwatch(self.event.set)

    async def wait(self, timeout_s: float) -> None:
        if timeout_s > 0 and not self.event.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await self.event.wait()
            except TimeoutError:
                return


async def open_cells(
    copies: CellCopies,
    cells: Sequence[tuple[int, int]],
    followers: Followers | None,
    follower: tuple[str, int] | None,
) -> tuple[dict[int, tuple[CellStore, int]], list[dict[str, Any]]]:
    """The cells this region serves in a stream, each (copy, after), and the refusals of
    the others (not owned, unknown, trimmed past `after`). Records the follower's
    positions, as a pull does."""
    owned: list[tuple[int, CellStore, int]] = []
    errors: list[dict[str, Any]] = []
    for cell, after in cells:
        try:
            owned.append((cell, pull._owned_store(copies, cell), after))
        except (UnitradeError, RoutingError) as exc:
            body = exc.body() if isinstance(exc, UnitradeError) else NotFound(str(exc)).body()
            errors.append({"cell": cell, **body})
    if copies.shared:  # other processes of this region commit and trim these copies too
        await asyncio.gather(*(s.refresh(pull.SHARED_REFRESH_AGE_S) for _, s, _ in owned))
    stores: dict[int, tuple[CellStore, int]] = {}
    for cell, store, after in owned:
        try:
            if followers is not None and follower is not None:
                followers.saw(cell, *follower, after=after)
            refuse_trimmed(store, after)
            stores[cell] = (store, after)
        except UnitradeError as exc:
            errors.append({"cell": cell, **exc.body()})
    return stores, errors


async def build_frame(
    stores: dict[int, tuple[CellStore, int]], limit: int, errors: list[dict[str, Any]]
) -> dict[str, Any]:
    """The next frame: every cell's head and rows after what was sent; moves each cell's
    sent position. A cell trimmed past it leaves the stream with an error."""
    for cell, (store, sent) in list(stores.items()):
        try:
            refuse_trimmed(store, sent)
        except UnitradeError as exc:
            errors.append({"cell": cell, **exc.body()})
            del stores[cell]
    wanted = {c: min(limit, max(0, s.position - sent)) for c, (s, sent) in stores.items()}
    shares = fair_shares(wanted, pull.PULL_ROWS_MAX)
    entries = []
    for cell, (store, sent) in stores.items():
        rows = await store.encoded_changes_since(sent, shares[cell]) if shares[cell] else []
        stores[cell] = (store, sent + len(rows))  # positions are gapless
        head = max(store.position, sent + len(rows))
        entries.append({"cell": cell, "head": head, "changes": encoded_array(rows)})
    return {"now_ms": now_ms(), "cells": entries, "errors": errors}


def _waiting(stores: dict[int, tuple[CellStore, int]]) -> bool:
    return any(store.position > sent for store, sent in stores.values())


async def serve_stream(
    copies: CellCopies,
    cells: Sequence[tuple[int, int]],
    limit: int,
    duration_ms: int,
    followers: Followers | None = None,
    follower: tuple[str, int] | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> AsyncIterator[bytes]:
    """The frames of one stream (module docstring), encoded, until it ends; or, once
    `stopping` (the server stops), at the next commit or heartbeat."""
    assert 1 <= len(cells) <= pull.PULL_CELLS_MAX
    assert 1 <= limit <= pull.BATCH_ROWS_MAX and 0 <= duration_ms <= pull.STREAM_MS_MAX
    stores, errors = await open_cells(copies, cells, followers, follower)
    version = copies.fence.rule.version
    deadline = time.monotonic() + duration_ms / 1000
    # The first frame at once: the follower learns every head (and the refusals) now.
    yield encode_frame(await build_frame(stores, limit, errors))
    if errors:
        return  # the follower holds those streams back and opens the stream again
    wake = _Wake([store for store, _ in stores.values()])
    try:
        sent_at = time.monotonic()
        while stores:
            wake.event.clear()
            if not _waiting(stores):
                await wake.wait(min(deadline, sent_at + HEARTBEAT_S) - time.monotonic())
            if _waiting(stores):
                # At least one loop turn: what commits in the same tick goes in this frame.
                await asyncio.sleep(max(0.0, sent_at + FRAME_INTERVAL_S - time.monotonic()))
            now = time.monotonic()
            if now >= deadline or copies.fence.rule.version != version or stopping():
                return  # re-opened under the rule in force, with the follower's positions
            if not _waiting(stores) and now < sent_at + HEARTBEAT_S:
                continue
            frame = await build_frame(stores, limit, [])
            yield encode_frame(frame)
            sent_at = time.monotonic()
            if frame["errors"]:
                return
    finally:
        wake.close()
