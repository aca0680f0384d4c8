"""Cross-region replication of every cell, asked for by the follower.

Each region follows every cell it does not own: it asks the cell's owner for the changelog
rows after its own checkpoint and applies them (CellStore.apply: rows and checkpoint in one
transaction). The follower asks, rather than the owner pushes, because the replica holds the
only state the stream needs, its checkpoint: the owner keeps nothing per replica beyond an
open request, either side can be killed at any point and the stream resumes from the
checkpoint, a new replica needs no registration, and backpressure is the replica's own pace.

A follower opens one replication stream per owner (stream.py, POST
/internal/replication/stream): one long-lived request for every cell it follows from that
owner, answered with a frame as soon as rows commit, ended by the owner after a few seconds
and opened again from the checkpoints. An owner that has no stream (404: an older version)
is pulled from instead (`serve_pull_many`, POST /internal/replication/pull_many): a long
poll for the same cells, at most one per batching window while the follower keeps up. A
request costs the owner about the same whatever it carries, so one per pair of regions, and
with the stream one per few seconds, costs the owner least (docs/benchmarks.md,
Replication). Each cell is still its own stream: its own checkpoint, applied in its own
transaction, with its own lag, errors and backoff.

Retention: the owner remembers where each follower's last stream or pull started
(`Followers`) only
to know how far it may trim its changelog (storage/retention.py); the Replicator runs the
trim of every copy of this region every `sweep_interval_s`. A pull after a trimmed position
is answered `changelog_trimmed`, and the follower rebuilds that copy from a snapshot.

Lag is reported per stream in positions (owner's head minus the checkpoint) and in
milliseconds: the delay of the last batch applied, from the commit of its oldest change at
the owner to its apply here, measured on the owner's clock so that clock skew between
regions never shows up as lag (otter#876); 0 once a frame or pull brings nothing new. Both
are as of the owner's last frame or answer, so a stream also reports how long ago it last
heard from its owner (`heard_ms_ago`) and is `stale` past STALE_AFTER_S: a dead or frozen
owner's stream then shows as stale, not as a stream with lag 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from unitrade.errors import (
    ChangelogTrimmed,
    NotFound,
    UnitradeError,
    WrongRegion,
    error_from_body,
)
from unitrade.replication.snapshot import bootstrap, owner_position
from unitrade.rpc.client import RegionClient
from unitrade.storage import followers as followers_table
from unitrade.storage import quarantine
from unitrade.storage.copies import CellCopies
from unitrade.storage.retention import trim_batch
from unitrade.storage.store import CellStore, now_ms
from unitrade.storage.tail import encoded_array
from unitrade.topology.rule import RoutingError

log = logging.getLogger("unitrade.replication")

PULL_TARGET = "/internal/replication/pull_many"
STREAM_TARGET = "/internal/replication/stream"
# Changelog rows of one cell in one reply (one apply transaction at the follower), and of all
# the cells of a pull. A pull costs the owner about the same whatever it carries, and a
# follower that falls behind catches up only by pulling more per round trip: with one pull
# for several cells, a cap of 500 per cell held the center cell (3 of an order's 7 rows)
# back whenever the owner's loop was saturated and a round trip took ~170 ms or more.
BATCH_ROWS_MAX = 1_000
PULL_ROWS_MAX = 4_000
PULL_CELLS_MAX = 64  # cells in one pull; a region following more from one owner pulls in groups
WAIT_MS_MAX = 2_000  # how long an owner holds a pull with nothing new
# A pull that was caught up and is woken by a commit waits this much longer to collect a
# batch: a follower that keeps up pulls once per window, not once per commit (a pull that
# finds changes waiting is answered at once). Every pull costs a request at both ends
# whatever it carries, and at 10 ms, one pull per cell, the pulls took about a quarter of
# the owner's CPU under load (docs/benchmarks.md, Replication); 25 ms, for ~15 ms more lag.
BATCH_WINDOW_S = 0.025
# A copy at position 0 (new, or wiped) whose owner is further ahead than this is rebuilt from
# a snapshot rather than from the whole changelog (replication/snapshot.py).
BOOTSTRAP_AFTER_POSITIONS = 100
BACKOFF_S_MIN = 0.05
BACKOFF_S_MAX = 2.0
IDLE_S = 0.5  # how often a pull loop with nothing to pull looks at the rule again
# Batches one sweep deletes from one copy at most: a copy far over its bound catches up over
# a few sweeps rather than in one long run of the loop.
SWEEP_BATCHES_MAX = 100
PULL_ERRORS = (UnitradeError, OSError, TimeoutError, ValueError, KeyError, TypeError)
# A region of many processes: pulls that arrive this close together share one read of a
# copy's position from the database (storage/store.py, CellStore.refresh).
SHARED_REFRESH_AGE_S = 0.005
# ... and each process records the followers it saw in the copies this often, at once
# when a follower pulls under a newer rule version (the switchover waits for that).
FOLLOWERS_RECORD_S = 1.0
# A stream whose owner has not answered a pull of it for this long is stale. A caught-up
# stream hears at least once per long poll (WAIT_MS_MAX, plus the batching window), or once
# per heartbeat of a replication stream (stream.py, HEARTBEAT_S).
STALE_AFTER_S = 5.0
# Replication streams (stream.py): how long one lasts at most (the owner ends it then, and
# the follower's re-open acknowledges its positions), the time it is given beyond that
# before the follower gives up on it, and how long a follower waits for bytes at most (a
# heartbeat comes every second).
STREAM_MS_MAX = 5_000
STREAM_SLACK_S = 2.0
STREAM_IDLE_S = 3.0
# A stream that ended this soon is not opened again before this: never a loop of opens.
STREAM_REOPEN_S_MIN = 0.01
# An owner that answers 404 to a stream runs an older version (a cluster being upgraded):
# its cells are pulled, and a stream is tried again after this.
PULLS_AFTER_404_S = 60.0
FRAME_BYTES_MAX = 64 * 1024 * 1024  # a frame announced larger ends the stream


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
    rebootstraps: int = 0  # of them, after the owner answered changelog_trimmed
    last_error: str = ""
    # Not reported: when this stream may be pulled again after an error, and the next wait.
    retry_at: float = field(default=0.0, repr=False)
    backoff_s: float = field(default=BACKOFF_S_MIN, repr=False)
    bootstrap_checked: str = field(default="", repr=False)  # the owner asked at position 0
    trimmed_by: str = field(default="", repr=False)  # the owner that answered changelog_trimmed
    # Monotonic: when the owner last answered a pull of this cell (or, before any answer,
    # when this region began to follow it from `source`).
    heard_at: float = field(default_factory=time.monotonic, repr=False)

    @property
    def lag_positions(self) -> int:
        return max(0, self.head - self.applied)

    @property
    def heard_ms_ago(self) -> int:
        return max(0, int((time.monotonic() - self.heard_at) * 1000))

    @property
    def stale(self) -> bool:
        return self.heard_ms_ago > STALE_AFTER_S * 1000

    def follow(self, source: str) -> None:
        """Pull this cell from `source` (its owner under the rule in force)."""
        if source != self.source:
            self.source = source
            self.heard_at = time.monotonic()  # a new owner: its silence counts from now

    def heard(self, at: float) -> None:
        self.heard_at = max(self.heard_at, at)

    def body(self) -> dict[str, Any]:
        return {
            "cell": self.cell,
            "source": self.source,
            "applied": self.applied,
            "head": self.head,
            "lag_positions": self.lag_positions,
            "lag_ms": self.lag_ms,
            "heard_ms_ago": self.heard_ms_ago,
            "stale": self.stale,
            "applied_rows": self.applied_rows,
            "errors": self.errors,
            "bootstraps": self.bootstraps,
            "rebootstraps": self.rebootstraps,
            "last_error": self.last_error,
        }

    def failed(self, exc: BaseException) -> None:
        """Count an error and hold this stream back, doubling the wait each time."""
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        self.retry_at = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, BACKOFF_S_MAX)

    def succeeded(self) -> None:
        self.backoff_s = BACKOFF_S_MIN


class Followers:
    """Which regions pull which cells from this region, and under which rule version: the
    switchover checks here that every other region follows a cell's new owner (docs/architecture.md
    step 4), by rule version rather than by clock.

    In a region of many processes each sees only the pulls that reach it; what it saw is
    also recorded in the cell's copy (`shared`: storage/followers.py, by
    `Replicator.record_followers`), and read back from there."""

    def __init__(self, shared: bool = False) -> None:
        self._seen: dict[int, dict[str, int]] = {}  # cell -> region -> rule version
        # cell -> region -> the position its last pull started after: what it has applied
        # (or, for a pipelined pull, is applying: if that apply fails, its next pull sets
        # it back), which bounds how far the owner trims its changelog
        # (storage/retention.py).
        self._applied: dict[int, dict[str, int]] = {}
        self.shared = shared
        self.unrecorded: set[int] = set()  # cells seen since they were last recorded
        self.newer_version = asyncio.Event()  # a rule version to record at once

    def saw(self, cell: int, region: str, rule_version: int, after: int | None = None) -> None:
        regions = self._seen.setdefault(cell, {})
        if self.shared:
            self.unrecorded.add(cell)
            if rule_version > regions.get(region, 0):
                self.newer_version.set()
        regions[region] = max(regions.get(region, 0), rule_version)
        if after is not None:
            self._applied.setdefault(cell, {})[region] = after

    def seen(self, cell: int) -> dict[str, tuple[int, int]]:
        """region -> (rule version, applied) of `cell`, as this process saw them."""
        applied = self._applied.get(cell, {})
        return {r: (v, applied.get(r, 0)) for r, v in self._seen.get(cell, {}).items()}

    def applied_min(self, cell: int, regions: Sequence[str]) -> int | None:
        """The lowest position any of `regions` has applied of `cell`; 0 while one of them
        has not pulled it since this region started (its position is unknown); None if
        there are no other regions."""
        applied = self._applied.get(cell, {})
        return min((applied.get(region, 0) for region in regions), default=None)

    def body(self, names: dict[int, str]) -> dict[str, dict[str, int]]:
        return {names[c]: dict(sorted(r.items())) for c, r in sorted(self._seen.items())}

    async def shared_body(self, copies: CellCopies, names: dict[int, str]) -> dict[str, Any]:
        """`body`, with what every process of the region recorded (`shared`); only the
        cells this region owns are read (nobody pulls the others from it)."""
        if not self.shared:
            return self.body(names)
        merged = {c: dict(r) for c, r in self._seen.items()}
        for cell in copies.fence.rule.cells_owned_by(copies.region):
            recorded = await followers_table.read(copies[cell])
            regions = merged.setdefault(cell, {})
            for region, (version, _applied) in recorded.items():
                regions[region] = max(regions.get(region, 0), version)
        return {names[c]: dict(sorted(r.items())) for c, r in sorted(merged.items()) if r}


# -- the owner's side ------------------------------------------------------------------------


def _owned_store(copies: CellCopies, cell: int) -> CellStore:
    """This region's copy of `cell` if this region owns it, else the error to answer."""
    if cell not in copies.stores:
        raise NotFound(f"no cell {cell}")
    owner = copies.fence.rule.owner_of(cell)
    if owner != copies.region:
        raise WrongRegion(f"cell {cell} is owned by {owner}", owner=owner, cell=cell)
    return copies[cell]


def fair_shares(wanted: dict[int, int], total: int) -> dict[int, int]:
    """Split `total` rows between cells that have `wanted[cell]` rows to send: none gets more
    than it has, and the rest is shared equally, so a busy cell never starves a quiet one."""
    shares: dict[int, int] = {}
    left = total
    ordered = sorted(wanted.items(), key=lambda item: item[1])
    for index, (cell, rows) in enumerate(ordered):
        share = min(rows, left // (len(ordered) - index))
        shares[cell] = share
        left -= share
    return shares


async def _wait_any(stores: dict[int, tuple[CellStore, int]], timeout_s: float) -> bool:
    """Wait until one of the copies moves beyond its position, at most `timeout_s`."""
    waits = [
        asyncio.ensure_future(store.wait_beyond(after, timeout_s))
        for store, after in stores.values()
    ]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return any(store.position > after for store, after in stores.values())


async def serve_pull_many(
    copies: CellCopies,
    cells: Sequence[tuple[int, int]],
    limit: int,
    wait_ms: int,
    followers: Followers | None = None,
    follower: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The owner's side of a pull of several cells, each as (cell, after): the changelog rows
    of each after its `after`, at most `limit` per cell and PULL_ROWS_MAX in all (each
    cell's `changes` already encoded, an orjson.Fragment). If none
    has any, it waits up to `wait_ms` for a commit in any of them, then BATCH_WINDOW_S more
    to collect a batch. A cell this region does not own gets an error of its own in
    `errors` (and the pull is answered at once); the others are answered, each with its
    head, changes or none."""
    assert 1 <= len(cells) <= PULL_CELLS_MAX
    assert 1 <= limit <= BATCH_ROWS_MAX and 0 <= wait_ms <= WAIT_MS_MAX
    stores: dict[int, tuple[CellStore, int]] = {}
    errors: list[dict[str, Any]] = []
    owned: list[tuple[int, CellStore, int]] = []
    for cell, after in cells:
        try:
            owned.append((cell, _owned_store(copies, cell), after))
        except (UnitradeError, RoutingError) as exc:
            body = exc.body() if isinstance(exc, UnitradeError) else NotFound(str(exc)).body()
            errors.append({"cell": cell, **body})
    if copies.shared:
        # Other processes of this region commit and trim these copies too: their position
        # and trim point as the database has them (a read shared by pulls a moment apart).
        await asyncio.gather(*(store.refresh(SHARED_REFRESH_AGE_S) for _, store, _ in owned))
    for cell, store, after in owned:
        try:
            if followers is not None and follower is not None:
                followers.saw(cell, *follower, after=after)
            refuse_trimmed(store, after)
            stores[cell] = (store, after)
        except UnitradeError as exc:
            errors.append({"cell": cell, **exc.body()})
    # No long poll with a refusal to tell: the follower holds that stream back at once.
    if wait_ms and stores and not errors and all(s.position <= a for s, a in stores.values()):
        if await _wait_any(stores, wait_ms / 1000):
            await asyncio.sleep(BATCH_WINDOW_S)
    wanted = {c: min(limit, max(0, s.position - after)) for c, (s, after) in stores.items()}
    shares = fair_shares(wanted, PULL_ROWS_MAX)
    replies = []
    for cell, (store, after) in stores.items():
        # One cell after the other: on SQLite a read runs inline and never yields, so the
        # pull takes no extra turns of a loop that is busy with orders. The rows come
        # encoded (most often from the tail of the owner's own writes, storage/tail.py)
        # and go into the reply as they are.
        rows = await store.encoded_changes_since(after, shares[cell]) if shares[cell] else []
        head = max(store.position, after + len(rows))  # positions are gapless
        replies.append({"cell": cell, "head": head, "changes": encoded_array(rows)})
    return {"now_ms": now_ms(), "cells": replies, "errors": errors}


def refuse_trimmed(store: CellStore, after: int) -> None:
    """A pull after `after` needs the row at after + 1: gone if the copy trimmed past it."""
    if after < store.trimmed_position:
        raise ChangelogTrimmed(
            f"cell {store.cell.id}: positions up to {store.trimmed_position} are trimmed, "
            f"the pull asked for {after + 1}; rebuild the copy from a snapshot",
            cell=store.cell.id,
            trimmed_position=store.trimmed_position,
        )


async def serve_pull(
    copies: CellCopies,
    cell: int,
    after: int,
    limit: int,
    wait_ms: int,
    followers: Followers | None = None,
    follower: tuple[str, int] | None = None,
) -> Any:
    """The pull of one cell (POST /internal/replication/pull), as regions did before
    `serve_pull_many`; kept for them."""
    refuse_trimmed(_owned_store(copies, cell), after)
    reply = await serve_pull_many(copies, [(cell, after)], limit, wait_ms, followers, follower)
    for error in reply["errors"]:  # nothing ran in between: cannot happen, but never a 500
        raise error_from_body(ChangelogTrimmed.status, error)
    (served,) = reply["cells"]
    return {**served, "now_ms": reply["now_ms"]}


# -- the follower's side ---------------------------------------------------------------------


@dataclass
class _Applying:
    """Whether a stream's consumer is applying a frame (a new rule then lets it finish)."""

    now: bool = False


def merged_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive frames of a stream as fewer, each cell's rows in one apply transaction
    (at most BATCH_ROWS_MAX): a follower that fell behind by a few frames catches up in
    one transaction per cell instead of one per frame. A frame with refusals is the last
    of its stream."""
    merged: list[dict[str, Any]] = []
    rows: dict[int, int] = {}
    for frame in frames:
        fits = merged and all(
            rows.get(int(e["cell"]), 0) + len(e["changes"]) <= BATCH_ROWS_MAX
            for e in frame["cells"]
        )
        if not fits:
            merged.append({"now_ms": 0, "cells": [], "errors": []})
            rows = {}
        last = merged[-1]
        last["now_ms"] = frame["now_ms"]
        last["errors"] = last["errors"] + frame["errors"]
        entries = {int(e["cell"]): e for e in last["cells"]}
        for entry in frame["cells"]:
            cell = int(entry["cell"])
            before = entries.get(cell)
            changes = entry["changes"] if before is None else before["changes"] + entry["changes"]
            entries[cell] = {"cell": cell, "head": entry["head"], "changes": changes}
            rows[cell] = len(changes)
        last["cells"] = list(entries.values())
    return merged


class Replicator:
    """Follows every cell this region does not own: one pull loop per other region (and per
    group of PULL_CELLS_MAX cells) for the cells that region owns under the rule in force."""

    def __init__(
        self,
        copies: CellCopies,
        client: RegionClient,
        on_applied: list[Any] | None = None,
    ) -> None:
        self.copies = copies
        self.client = client
        # A client that cannot open streams (one standing in for the network in a test)
        # pulls; a region streams, and pulls from an owner that has no stream (404).
        self.streaming = callable(getattr(client, "stream", None))
        self._pulls_until: dict[str, float] = {}  # owner -> monotonic: pull, do not stream
        self.stopping = False  # the server stops: streams served from here end (serve.py)
        self.streams = {cell: StreamState(cell) for cell in copies.stores}
        self.on_applied = on_applied or []  # called with (cell, changes) after each batch
        self.bootstrap_after_positions = BOOTSTRAP_AFTER_POSITIONS
        self.followers = Followers(copies.shared)  # who pulls the cells this region owns
        self._tasks: list[asyncio.Task[None]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._rule_changed = asyncio.Event()
        # One apply at a time per cell: when a cell changes owner, the pull from its old
        # owner may still be applying when the pull from the new one comes back.
        self._applying = {cell: asyncio.Lock() for cell in copies.stores}
        self.trimmed_rows = dict.fromkeys(copies.stores, 0)  # changelog rows this region trimmed
        # The newest promotion (failover) each copy has been checked against, and the rows
        # of each copy held in its quarantine (storage/quarantine.py).
        self._lineage_checked: dict[int, int] = {}
        self.quarantined: dict[int, dict[str, int]] = {cell: {} for cell in copies.stores}

    @property
    def region(self) -> str:
        return self.copies.region

    def start(self) -> None:
        """Follow every other region's cells and trim the changelogs: in a region of many
        processes, only the one leading does (unitrade/workers.py)."""
        assert not self._tasks, "following already"
        self._note_owned()
        self._tasks.append(asyncio.create_task(self._sweep_forever(), name="changelog-sweep"))
        cells = sorted(self.copies.stores)
        groups = [cells[i : i + PULL_CELLS_MAX] for i in range(0, len(cells), PULL_CELLS_MAX)]
        for peer in self.client.config.region_names:
            if peer == self.region:
                continue
            for index, group in enumerate(groups):
                self._tasks.append(
                    asyncio.create_task(self._follow(peer, group), name=f"follow-{peer}-{index}")
                )

    async def stop(self) -> None:
        """Stop following (and trimming); `close` stops the recorder of followers too."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def close(self) -> None:
        await self.stop()
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
            self._recorder = None

    def start_recording(self) -> None:
        """A region of many processes: record the followers this process sees in the
        copies (storage/followers.py), whether or not it follows anything itself."""
        if self.followers.shared and self._recorder is None:
            self._recorder = asyncio.create_task(self._record_forever(), name="followers")

    async def _record_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FOLLOWERS_RECORD_S):
                    await self.followers.newer_version.wait()
            self.followers.newer_version.clear()
            await self.record_followers()

    async def record_followers(self) -> None:
        cells, self.followers.unrecorded = self.followers.unrecorded, set()
        for cell in sorted(cells):
            try:
                await followers_table.record(self.copies[cell], self.followers.seen(cell))
            except Exception as exc:  # recorded again next time
                self.followers.unrecorded.add(cell)
                log.warning("followers of cell %s not recorded: %s", cell, exc)

    def wake(self) -> None:
        """A new rule is in force: streams of cells that changed owner move at once (pulls
        in flight are dropped and sent again under it), and streams held back by an error,
        which may have been the old rule's, are tried again."""
        self._note_owned()
        for state in self.streams.values():
            state.retry_at = 0.0
        self._rule_changed.set()
        self._rule_changed = asyncio.Event()

    async def quiesce(self, cells: list[int]) -> None:
        """Return once no apply is in flight for `cells` (which this region now owns: the
        apply checks ownership under the same lock, so none starts after this)."""
        for cell in cells:
            async with self._applying[cell]:
                pass

    # -- changelog retention (storage/retention.py) -------------------------------------------

    async def _sweep_forever(self) -> None:
        interval_s = self.client.config.retention.sweep_interval_s
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception:  # a failed sweep is tried again at the next interval
                log.exception("changelog sweep failed")

    async def sweep(self) -> int:
        """Trim every copy's changelog as far as its retention allows; the rows trimmed."""
        trimmed = 0
        for cell in self.copies.stores:
            trimmed += await self.sweep_cell(cell)
        return trimmed

    async def sweep_cell(self, cell: int) -> int:
        """Trim this region's copy of `cell`, a batch per transaction, at most
        SWEEP_BATCHES_MAX batches; the rows trimmed."""
        config = self.client.config
        policy = config.changelog_policy(cell)
        store, rows = self.copies[cell], config.retention.sweep_batch_rows
        trimmed = 0
        for _ in range(SWEEP_BATCHES_MAX):
            # Not while the copy applies or is rebuilt: the batch reads its position.
            async with self._applying[cell]:
                before = store.trimmed_position
                cutoff_ms = now_ms() - policy.age_s * 1000
                work = functools.partial(
                    trim_batch,
                    policy=policy,
                    followers_min=await self._followers_min(cell),
                    cutoff_ms=cutoff_ms,
                    rows=rows,
                )
                after = await store.write_local(work)
            if after <= before:
                break
            trimmed += after - before  # the changelog is gapless: positions are rows
            await asyncio.sleep(0)  # let the loop serve others between batches
        self.trimmed_rows[cell] += trimmed
        await self._sweep_quarantine(cell)
        return trimmed

    async def _sweep_quarantine(self, cell: int) -> None:
        """Delete the quarantine's decided entries past `quarantine_decided_s`; only a copy
        that has some asks its database."""
        if not set(self.quarantined[cell]) - {quarantine.HELD}:
            return
        settings = self.client.config.retention
        store = self.copies[cell]
        before_ms = now_ms() - settings.quarantine_decided_s * 1000
        deleted = 0
        for _ in range(SWEEP_BATCHES_MAX):
            batch = await quarantine.sweep(store, before_ms, settings.sweep_batch_rows)
            deleted += batch
            if batch < settings.sweep_batch_rows:
                break
        if deleted:
            self.quarantined[cell] = await quarantine.counts(store)
            log.info("cell %s: %d decided quarantine entries deleted (retention)", cell, deleted)

    async def _followers_min(self, cell: int) -> int | None:
        """At the owner, the lowest position every other region has applied; None at a
        replica (nobody pulls from it). In a region of many processes, from what all of
        them recorded too (the newest of what each saw)."""
        if self.copies.fence.rule.owner_of(cell) != self.region:
            return None
        others = [r for r in self.client.config.region_names if r != self.region]
        if not self.followers.shared:
            return self.followers.applied_min(cell, others)
        seen = {r: applied for r, (_v, applied) in self.followers.seen(cell).items()}
        for region, (_v, applied) in (await followers_table.read(self.copies[cell])).items():
            seen[region] = max(seen.get(region, 0), applied)
        return min((seen.get(region, 0) for region in others), default=None)

    def _note_owned(self) -> None:
        rule = self.copies.fence.rule
        for cell, state in self.streams.items():
            if rule.owner_of(cell) == self.region:
                position = self.copies[cell].position
                state.source, state.applied, state.head, state.lag_ms = "", position, position, 0

    def status(self) -> list[dict[str, Any]]:
        rule = self.copies.fence.rule
        return [
            {**s.body(), "cell_name": rule.cells[s.cell].name}
            for s in self.streams.values()
            if rule.owner_of(s.cell) != self.region
        ]

    async def _follow(self, peer: str, group: list[int]) -> None:
        """Follow the cells of `group` that `peer` owns, as long as the region runs: by
        stream (`_stream`), or by pull from an owner without streams.

        Pulls start at most once per BATCH_WINDOW_S while the owner has nothing more than
        what the last reply brought: under a steady stream of commits a pull always finds
        something new at once, and without this a follower would pull again as soon as it
        had applied, a request per round trip whatever it carries. A follower that is
        behind (the owner had more than a reply holds) pulls again at once."""
        next_pull = 0.0
        while True:
            changed = self._rule_changed  # before reading the rule: a new one ends the pull
            rule = self.copies.fence.rule
            cells = [c for c in group if rule.owner_of(c) == peer]
            now = time.monotonic()
            ready = [c for c in cells if self.streams[c].retry_at <= now]
            if not ready:
                # Nothing to pull from this region now: wait for a new rule or the end of
                # the earliest backoff.
                retry = min((self.streams[c].retry_at for c in cells), default=now + IDLE_S)
                await self._until_rule_change(changed, min(IDLE_S, retry - now))
                continue
            if self._streams_to(peer, now):
                await self._stream(peer, cells, ready, changed)
                continue
            if next_pull > now:
                await self._until_rule_change(changed, next_pull - now)
                if changed.is_set():
                    next_pull = 0.0  # a new rule: follow it at once
                continue
            next_pull = now + BATCH_WINDOW_S
            for cell in cells:
                self.streams[cell].follow(peer)
            try:
                if await self._pull_once(peer, cells, ready, changed):
                    next_pull = 0.0
            except PULL_ERRORS as exc:  # a malformed reply: hold back every stream in it
                for cell in ready:
                    self.streams[cell].failed(exc)
                log.warning("replication from %s (cells %s): %r", peer, ready, exc)

    def _streams_to(self, peer: str, now: float) -> bool:
        return self.streaming and self._pulls_until.get(peer, 0.0) <= now

    async def _stream(
        self, peer: str, cells: list[int], ready: list[int], changed: asyncio.Event
    ) -> None:
        """One replication stream from `peer` of the `ready` ones of the `cells` it owns,
        applied frame by frame until it ends; then it is opened again at once (the caller),
        from the checkpoints."""
        opened = time.monotonic()
        for cell in cells:
            self.streams[cell].follow(peer)
        try:
            await self._stream_once(peer, cells, ready, changed)
        except NotFound as exc:
            # An owner of an older version, without streams: pull from it for a while.
            self._pulls_until[peer] = time.monotonic() + PULLS_AFTER_404_S
            log.info("replication from %s: no stream there (%s); pulling", peer, exc)
        except PULL_ERRORS as exc:  # the stream broke: hold back every stream in it
            for cell in ready:
                self.streams[cell].failed(exc)
            log.warning("replication stream from %s (cells %s): %s", peer, ready, exc)
        left = opened + STREAM_REOPEN_S_MIN - time.monotonic()
        if left > 0:
            await self._until_rule_change(changed, left)

    async def _stream_once(
        self, peer: str, cells: list[int], ready: list[int], changed: asyncio.Event
    ) -> None:
        afters = await self._start_positions(peer, ready)
        if not afters:
            return
        # The stream ends when the first stream held back may be tried again, as a long
        # poll does (_pull_once).
        duration_ms = STREAM_MS_MAX
        held = [self.streams[c].retry_at for c in cells if c not in afters]
        if held:
            left_ms = (min(held) - time.monotonic()) * 1000
            duration_ms = int(min(STREAM_MS_MAX, max(0.0, left_ms)))
        payload = {
            "cells": [{"cell": cell, "after": after} for cell, after in afters.items()],
            "limit": BATCH_ROWS_MAX,
            "duration_ms": duration_ms,
            "region": self.region,
            "rule_version": self.copies.fence.rule.version,
        }
        timeout_s = duration_ms / 1000 + STREAM_SLACK_S
        opening = self.client.stream(
            peer, STREAM_TARGET, payload, timeout_s, STREAM_IDLE_S, FRAME_BYTES_MAX
        )
        applying = _Applying()
        async with opening as frames:
            consuming = self._apply_frames(peer, frames, afters, changed, applying)
            await self._until_changed(consuming, changed, applying)

    @staticmethod
    async def _until_changed(
        consuming: Coroutine[Any, Any, None], changed: asyncio.Event, applying: _Applying
    ) -> None:
        """Run `consuming` (a stream's frames applied) until it ends or a new rule comes:
        a stream waiting for its next frame is dropped at once (the switchover waits for
        every region to follow a cell's new owner), one applying a frame ends after it."""
        consumer = asyncio.ensure_future(consuming)
        waiting = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait({consumer, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if not consumer.done() and not applying.now:
                consumer.cancel()
            await asyncio.wait({consumer})
        finally:
            waiting.cancel()
            if not consumer.done():  # this task is cancelled (stop): the stream with it
                consumer.cancel()
                await asyncio.wait({consumer})
        if not consumer.cancelled():
            consumer.result()

    async def _apply_frames(
        self,
        peer: str,
        frames: AsyncIterator[list[bytes]],
        afters: dict[int, int],
        changed: asyncio.Event,
        applying: _Applying,
    ) -> None:
        """Apply a stream's frames in order until it ends, a new rule comes, or a frame
        does not continue where the copies are (then the stream is opened again from the
        checkpoints: nothing is applied twice or skipped)."""
        async for arrived_whole in frames:
            arrived = time.monotonic()
            for frame in merged_frames([orjson.loads(raw) for raw in arrived_whole]):
                applying.now = True
                try:
                    going = await self._apply_frame(peer, frame, arrived, afters)
                finally:
                    applying.now = False
                if not going or changed.is_set():
                    return

    async def _apply_frame(
        self, peer: str, frame: dict[str, Any], arrived: float, afters: dict[int, int]
    ) -> bool:
        """One frame: each cell's rows in its own transaction, as a pull reply's. True if
        the stream goes on: no refusal, and every copy where the stream's positions say."""
        refused = self._refusals(peer, frame["errors"], afters)
        for cell in refused:
            afters.pop(cell, None)
        answered = [entry for entry in frame["cells"] if int(entry["cell"]) in afters]
        owner_clock = (int(frame["now_ms"]), arrived)
        await asyncio.gather(*(self._apply(peer, e, owner_clock) for e in answered))
        going = not refused
        for entry in answered:
            cell = int(entry["cell"])
            afters[cell] += len(entry["changes"])  # positions are gapless
            going = going and self.copies[cell].position == afters[cell]
        return going

    def _refusals(
        self, peer: str, errors: list[dict[str, Any]], afters: dict[int, int]
    ) -> list[int]:
        """Hold back the streams the owner refused (a trimmed one is rebuilt at the next
        pull or stream); the cells refused."""
        refused = []
        for error in errors:
            cell = int(error["cell"])
            if cell not in afters:
                continue
            refused.append(cell)
            exc = error_from_body(421, error)
            if isinstance(exc, ChangelogTrimmed):
                self._trimmed(peer, cell, exc)
                continue
            self.streams[cell].failed(exc)
            log.warning("replication of cell %s from %s: %s", cell, peer, exc)
        return refused

    @staticmethod
    async def _until_rule_change(changed: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await changed.wait()

    async def _fetch(self, peer: str, payload: dict[str, Any], changed: asyncio.Event) -> Any:
        """One pull request; None if a new rule arrives first. A long poll held by the old
        owner of a cell that just switched would otherwise delay following the new owner
        by up to WAIT_MS_MAX (the switchover checks that every region follows it)."""
        if changed.is_set():
            return None
        waiting = asyncio.ensure_future(changed.wait())
        request = asyncio.ensure_future(self.client.call(peer, "POST", PULL_TARGET, payload))
        try:
            await asyncio.wait({request, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            if not request.done():
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
        return request.result() if not request.cancelled() else None

    async def load_quarantine(self) -> None:
        for cell, store in self.copies.stores.items():
            self.quarantined[cell] = await quarantine.counts(store)

    async def settle_lineage(self, cell: int) -> None:
        """Check this replica copy of `cell` against the cell's failovers before it pulls
        from the owner: a copy holding changes the promoted owner never had moves them to
        its quarantine and is rebuilt (storage/quarantine.py). Once per new failover."""
        rule = self.copies.fence.rule
        promotions = rule.promotions_of(cell)
        newest = promotions[-1].version if promotions else 0
        if self._lineage_checked.get(cell, 0) >= newest or rule.owner_of(cell) == self.region:
            return
        store = self.copies[cell]
        async with self._applying[cell]:
            moved = await quarantine.settle(store, promotions)
        self._lineage_checked[cell] = newest
        if moved:
            state = self.streams[cell]
            state.bootstrap_checked = ""
            state.applied = state.head = 0
            self.quarantined[cell] = await quarantine.counts(store)
            log.warning(
                "cell %s: %d changelog rows this copy held beyond the failover to %s "
                "(position %d, rule version %d) moved to the quarantine; the copy is rebuilt "
                "from its owner",
                cell,
                moved,
                promotions[-1].to,
                promotions[-1].position,
                newest,
            )

    async def _start_positions(self, peer: str, cells: list[int]) -> dict[int, int]:
        """Each cell's position to pull after; a copy at position 0 far behind its owner is
        first rebuilt from a snapshot (asked once per owner: a cell that stays empty is not
        asked about at every pull). A cell whose bootstrap failed is left out. A copy is
        first checked against the cell's failovers (`settle_lineage`)."""
        unsettled = set()
        for cell in cells:
            try:
                await self.settle_lineage(cell)
            except Exception as exc:  # the copy is not pulled into until it is checked
                log.exception("cell %s: checking the copy against its failovers failed", cell)
                self.streams[cell].failed(exc)
                unsettled.add(cell)
        cells = [c for c in cells if c not in unsettled]
        trimmed = [c for c in cells if self.streams[c].trimmed_by == peer]
        unknown = [
            c
            for c in cells
            if self.copies[c].position == 0
            and self.streams[c].bootstrap_checked != peer
            and c not in trimmed
        ]
        failed = set()
        if unknown or trimmed:
            jobs = [self._bootstrap(peer, c) for c in unknown]
            jobs += [self._rebootstrap(peer, c) for c in trimmed]
            done = await asyncio.gather(*jobs)
            failed = {cell for cell, ok in zip(unknown + trimmed, done, strict=True) if not ok}
        return {cell: self.copies[cell].position for cell in cells if cell not in failed}

    async def _bootstrap(self, peer: str, cell: int) -> bool:
        """Rebuild this copy from a snapshot if its owner is far ahead; False on an error."""
        store, state = self.copies[cell], self.streams[cell]
        try:
            if await owner_position(self.client, peer, cell) > self.bootstrap_after_positions:
                log.info("cell %s: rebuilding this copy from a snapshot of %s", cell, peer)
                await bootstrap(store, self.client, peer)
                state.bootstraps += 1
            state.bootstrap_checked = peer
            state.heard(time.monotonic())
            return True
        except PULL_ERRORS as exc:
            state.failed(exc)
            log.warning("bootstrap of cell %s from %s: %s", cell, peer, state.last_error)
            return False

    async def _rebootstrap(self, peer: str, cell: int) -> bool:
        """Rebuild this copy from a snapshot of `peer`, which trimmed its changelog past
        this copy's position; False on an error (tried again after the stream's backoff)."""
        store, state = self.copies[cell], self.streams[cell]
        try:
            async with self._applying[cell]:
                log.warning(
                    "cell %s: %s trimmed its changelog past this copy (at %s): rebuilding "
                    "the copy from a snapshot",
                    cell,
                    peer,
                    store.position,
                )
                await bootstrap(store, self.client, peer)
            state.bootstraps += 1
            state.rebootstraps += 1
            state.trimmed_by = ""
            state.bootstrap_checked = peer
            state.heard(time.monotonic())
            state.applied = store.position
            log.info("cell %s: rebuilt from %s at position %s", cell, peer, store.position)
            return True
        except PULL_ERRORS as exc:
            state.failed(exc)
            log.warning("rebuild of cell %s from %s: %s", cell, peer, state.last_error)
            return False

    def _trimmed(self, peer: str, cell: int, refused: UnitradeError) -> None:
        """The owner no longer has the rows this copy needs: rebuild it at the next pull,
        without waiting for a backoff (the stream is not failing, it is too far behind)."""
        state = self.streams[cell]
        state.trimmed_by = peer
        state.last_error = f"{type(refused).__name__}: {refused}"[:200]
        state.retry_at = 0.0
        log.warning("replication of cell %s from %s: %s", cell, peer, refused)

    async def _pull_once(
        self, peer: str, cells: list[int], ready: list[int], changed: asyncio.Event
    ) -> bool:
        """One pull from `peer` of the `ready` ones of the `cells` it owns (the others are
        held back after an error), applied; True if the owner has more already.

        A follower that is behind asks for the next batch as soon as a reply shows that the
        owner has more, and applies the reply while the owner serves the next one, as if
        that request had been sent once this one was applied: the owner's serving and the
        follower's applying overlap instead of taking turns. Each copy's checkpoint still
        decides what is applied: a cell whose batch did not apply is left out of the
        reply that assumed it had."""
        afters = await self._start_positions(peer, ready)
        if not afters:
            return False
        # The long poll ends when the first stream held back may be tried again: a stream
        # held back only by an owner that was a moment late with a new rule would otherwise
        # wait for the other cells' long poll, up to WAIT_MS_MAX.
        wait_ms = WAIT_MS_MAX
        held = [self.streams[c].retry_at for c in cells if c not in afters]
        if held:
            wait_ms = int(min(WAIT_MS_MAX, max(0.0, (min(held) - time.monotonic()) * 1000)))
        try:
            got = await self._request(peer, afters, wait_ms, changed)
        except PULL_ERRORS as exc:
            for cell in afters:
                self.streams[cell].failed(exc)
            log.warning("replication from %s (cells %s): %s", peer, list(afters), exc)
            return False
        pipelined_until = time.monotonic() + IDLE_S  # then look at the rule and errors again
        while got is not None:
            reply, arrived = got
            self._refusals(peer, reply["errors"], afters)
            answered = [entry for entry in reply["cells"] if int(entry["cell"]) in afters]
            # Positions are gapless: where each copy is once this reply is applied, and
            # whether the owner has more already.
            reached = {int(e["cell"]): afters[int(e["cell"])] + len(e["changes"]) for e in answered}
            more = any(int(e["head"]) > reached[int(e["cell"])] for e in answered)
            following: asyncio.Future[tuple[Any, float] | None] | None = None
            if more and not changed.is_set() and time.monotonic() < pipelined_until:
                following = asyncio.ensure_future(self._request(peer, reached, 0, changed))
                for _ in range(2):  # let the request go out before an apply holds the loop
                    await asyncio.sleep(0)
            owner_clock = (int(reply["now_ms"]), arrived)
            try:
                await asyncio.gather(*(self._apply(peer, e, owner_clock) for e in answered))
            except BaseException:
                if following is not None:
                    following.cancel()
                raise
            if following is None:
                return more
            try:
                got = await following
            except PULL_ERRORS:
                return True  # pull again, the ordinary way
            afters = {c: p for c, p in reached.items() if self.copies[c].position == p}
        return True  # a new rule came during the pull: pull again under it

    async def _request(
        self, peer: str, afters: dict[int, int], wait_ms: int, changed: asyncio.Event
    ) -> tuple[Any, float] | None:
        """A pull of the cells in `afters`: the reply and when it arrived (monotonic), or
        None if a new rule came first."""
        payload = {
            "cells": [{"cell": cell, "after": after} for cell, after in afters.items()],
            "limit": BATCH_ROWS_MAX,
            "wait_ms": wait_ms,
            "region": self.region,
            "rule_version": self.copies.fence.rule.version,
        }
        reply = await self._fetch(peer, payload, changed)
        return None if reply is None else (reply, time.monotonic())

    async def _apply(
        self, peer: str, entry: dict[str, Any], owner_clock: tuple[int, float]
    ) -> None:
        """Apply one cell's part of a pull reply: its own transaction, checkpoint, lag.
        `owner_clock` is the owner's `now_ms` in the reply and the local monotonic time at
        which the reply arrived."""
        cell = int(entry["cell"])
        store, state = self.copies[cell], self.streams[cell]
        changes = entry["changes"]
        state.heard(owner_clock[1])
        try:
            async with self._applying[cell]:
                if self.copies.fence.rule.owner_of(cell) == self.region:
                    return  # this region became the owner during the pull: nothing to apply
                state.head = int(entry["head"])
                if changes:
                    before = store.position
                    applied = await store.apply(changes)
                    state.applied_rows += applied - before
            if changes:
                for listener in self.on_applied:
                    listener(cell, changes)
                # The delay of this batch: from the commit of its oldest change at the
                # owner to now that it is applied here, on the owner's clock (its `now_ms`
                # in the reply, plus the time since the reply arrived).
                owner_now_ms, arrived = owner_clock
                since_ms = int((time.monotonic() - arrived) * 1000)
                state.lag_ms = max(0, owner_now_ms - int(changes[0]["created_ms"]) + since_ms)
            else:
                state.lag_ms = 0  # nothing new within the long poll: caught up
            state.succeeded()
        except PULL_ERRORS as exc:
            state.failed(exc)
            log.warning("replication of cell %s from %s: %s", cell, peer, state.last_error)
        state.applied = store.position
