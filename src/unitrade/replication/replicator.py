"""Cross-region replication of every cell, by pull.

Each region follows every cell it does not own: it asks the cell's owner for the changelog
rows after its own checkpoint and applies them (CellStore.apply: rows and checkpoint in one
transaction). Pull rather than push because the replica holds the only state the stream
needs, its checkpoint: the owner keeps nothing per replica, either side can be killed at any
point and the stream resumes from the checkpoint, a new replica needs no registration, and
backpressure is the replica's own pace. The owner answers with a long poll (it waits up to
`wait_ms` for a new commit), so a quiet stream costs one open request and a busy one a
request per batch, with lag bounded by one round trip.

Lag is reported per stream in positions (owner's head minus the checkpoint) and in
milliseconds: the delay of the last batch applied, from the commit of its oldest change at
the owner to its apply here, measured on the owner's clock so that clock skew between
regions never shows up as lag (otter#876); 0 once a pull finds nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from unitrade.errors import UnitradeError, WrongRegion
from unitrade.replication.snapshot import bootstrap, owner_position
from unitrade.rpc.client import RegionClient
from unitrade.storage.copies import CellCopies
from unitrade.storage.store import now_ms

log = logging.getLogger("unitrade.replication")

BATCH_ROWS_MAX = 500
WAIT_MS_MAX = 2_000  # how long an owner holds a pull with nothing new
# A pull that was caught up and is woken by a commit waits this much longer to collect a
# batch: at most one pull per stream per window instead of one per commit. Every pull costs
# a request at both ends whatever it carries, and at 10 ms the pulls took about a quarter of
# the owner's CPU under load (docs/benchmarks.md, Replication); 25 ms, for ~15 ms more lag.
BATCH_WINDOW_S = 0.025
# A copy at position 0 (new, or wiped) whose owner is further ahead than this is rebuilt from
# a snapshot rather than from the whole changelog (replication/snapshot.py).
BOOTSTRAP_AFTER_POSITIONS = 100
BACKOFF_S_MIN = 0.05
BACKOFF_S_MAX = 2.0


@dataclass
class StreamState:
    """One stream: a cell's owner to this region's copy."""

    cell: int
    source: str = ""
    applied: int = 0  # this copy's checkpoint
    head: int = 0  # the owner's last position, as of the last pull
    lag_ms: int = 0
    applied_rows: int = 0
    errors: int = 0
    bootstraps: int = 0
    last_error: str = ""

    @property
    def lag_positions(self) -> int:
        return max(0, self.head - self.applied)

    def body(self) -> dict[str, Any]:
        return {
            "cell": self.cell,
            "source": self.source,
            "applied": self.applied,
            "head": self.head,
            "lag_positions": self.lag_positions,
            "lag_ms": self.lag_ms,
            "applied_rows": self.applied_rows,
            "errors": self.errors,
            "bootstraps": self.bootstraps,
            "last_error": self.last_error,
        }


class Followers:
    """Which regions pull which cells from this region, and under which rule version: the
    switchover checks here that every other region follows a cell's new owner (DESIGN §8
    step 4), by rule version rather than by clock."""

    def __init__(self) -> None:
        self._seen: dict[int, dict[str, int]] = {}  # cell -> region -> rule version

    def saw(self, cell: int, region: str, rule_version: int) -> None:
        regions = self._seen.setdefault(cell, {})
        regions[region] = max(regions.get(region, 0), rule_version)

    def body(self, names: dict[int, str]) -> dict[str, dict[str, int]]:
        return {names[c]: dict(sorted(r.items())) for c, r in sorted(self._seen.items())}


async def serve_pull(
    copies: CellCopies,
    cell: int,
    after: int,
    limit: int,
    wait_ms: int,
    followers: Followers | None = None,
    follower: tuple[str, int] | None = None,
) -> Any:
    """The owner's side of a pull: changelog rows after `after`, waiting for one if none."""
    assert 1 <= limit <= BATCH_ROWS_MAX and 0 <= wait_ms <= WAIT_MS_MAX
    owner = copies.fence.rule.owner_of(cell)
    if owner != copies.region:
        raise WrongRegion(f"cell {cell} is owned by {owner}", owner=owner, cell=cell)
    if followers is not None and follower is not None:
        followers.saw(cell, *follower)
    store = copies[cell]
    if wait_ms and store.position <= after:
        if await store.wait_beyond(after, wait_ms / 1000) > after:
            await asyncio.sleep(BATCH_WINDOW_S)
    changes = await store.changes_since(after, limit)
    head = max(store.position, changes[-1]["position"] if changes else 0)
    return {"cell": cell, "head": head, "now_ms": now_ms(), "changes": changes}


class Replicator:
    """Follows every cell this region does not own."""

    def __init__(
        self,
        copies: CellCopies,
        client: RegionClient,
        on_applied: list[Any] | None = None,
    ) -> None:
        self.copies = copies
        self.client = client
        self.streams = {cell: StreamState(cell) for cell in copies.stores}
        self.on_applied = on_applied or []  # called with (cell, changes) after each batch
        self.bootstrap_after_positions = BOOTSTRAP_AFTER_POSITIONS
        self.followers = Followers()  # who pulls the cells this region owns
        self._tasks: list[asyncio.Task[None]] = []
        self._rule_changed = asyncio.Event()

    @property
    def region(self) -> str:
        return self.copies.region

    def start(self) -> None:
        for cell in self.copies.stores:
            self._tasks.append(asyncio.create_task(self._follow(cell), name=f"follow-{cell}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def wake(self) -> None:
        """A new rule is in force: streams of cells that changed owner move at once."""
        self._rule_changed.set()
        self._rule_changed = asyncio.Event()

    async def _rule_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._rule_changed.wait()

    def status(self) -> list[dict[str, Any]]:
        rule = self.copies.fence.rule
        return [
            {**s.body(), "cell_name": rule.cells[s.cell].name}
            for s in self.streams.values()
            if rule.owner_of(s.cell) != self.region
        ]

    async def _follow(self, cell: int) -> None:
        store = self.copies[cell]
        state = self.streams[cell]
        backoff = BACKOFF_S_MIN
        while True:
            owner = self.copies.fence.rule.owner_of(cell)
            state.applied = store.position
            if owner == self.region:
                state.source, state.head, state.lag_ms = "", store.position, 0
                await self._rule_change(0.5)  # a cell we own has nothing to pull
                continue
            state.source = owner
            try:
                await self._pull_once(cell, owner, state)
                backoff = BACKOFF_S_MIN
            except (UnitradeError, OSError, TimeoutError, ValueError, KeyError) as exc:
                state.errors += 1
                state.last_error = f"{type(exc).__name__}: {exc}"[:200]
                log.warning("replication of cell %s from %s: %s", cell, owner, state.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S_MAX)

    async def _fetch(self, owner: str, payload: dict[str, Any]) -> Any:
        """One pull request; None if a new rule arrives first. A long poll held by the old
        owner of a cell that just switched would otherwise delay following the new owner
        by up to WAIT_MS_MAX (the switchover checks that every region follows it)."""
        changed = asyncio.ensure_future(self._rule_changed.wait())
        request = asyncio.ensure_future(
            self.client.call(owner, "POST", "/internal/replication/pull", payload)
        )
        try:
            await asyncio.wait({request, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            if not request.done():
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
        return request.result() if not request.cancelled() else None

    async def _pull_once(self, cell: int, owner: str, state: StreamState) -> None:
        store = self.copies[cell]
        after = store.position
        if after == 0 and await owner_position(self.client, owner, cell) > (
            self.bootstrap_after_positions
        ):
            log.info("cell %s: rebuilding this copy from a snapshot of %s", cell, owner)
            after = await bootstrap(store, self.client, owner)
            state.bootstraps += 1
        reply = await self._fetch(
            owner,
            {
                "cell": cell,
                "after": after,
                "limit": BATCH_ROWS_MAX,
                "wait_ms": WAIT_MS_MAX,
                "region": self.region,
                "rule_version": self.copies.fence.rule.version,
            },
        )
        if reply is None:
            return  # a new rule came during the long poll: pull again under it
        if self.copies.fence.rule.owner_of(cell) == self.region:
            return  # this region became the owner during the pull: nothing to apply
        changes = reply["changes"]
        state.source = owner
        state.head = int(reply["head"])
        if changes:
            pulled = time.monotonic()
            applied = await store.apply(changes)
            state.applied_rows += applied - after
            for listener in self.on_applied:
                listener(cell, changes)
            # The delay of this batch: from the commit of its oldest change at the owner to
            # now that it is applied here, on the owner's clock (its `now_ms` at the pull,
            # plus the time the apply took).
            apply_ms = int((time.monotonic() - pulled) * 1000)
            state.lag_ms = max(0, int(reply["now_ms"]) - int(changes[0]["created_ms"]) + apply_ms)
        else:
            state.lag_ms = 0  # nothing new within the long poll: caught up
        state.applied = store.position
