"""A region of many processes (`[regions.X] workers = N`): what each process runs beside
the requests it serves, and what it learns from the others through the region's databases
(docs/architecture.md, A region of many processes).

- `Leadership`: one process leads, the one holding the leader lock in the region's copy of
  the global cell (storage/leader.py); it alone does the region's background work
  (following the other regions' cells, trimming changelogs, the outbox, abandoned
  reservations, retention). The lock dies with its holder, so a killed leader's work moves
  to another process at that one's next try (LEAD_TRY_S).
- `ChangeFeed`: every process reads the changes of its region's copy of the global cell
  back from the database, whoever wrote them (the leader's applies, another process's
  revocation), to keep its revoked tokens and catalog cache current.
- `StatusReporter`: every process writes what it holds (rule, acknowledgements, lease,
  watch; the leader its replication streams) to the `workers` table every STATUS_S, for
  `/healthz` of any of them (storage/workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from unitrade.storage import workers as workers_table
from unitrade.storage.leader import LeaderLock
from unitrade.storage.store import CellStore, now_ms

log = logging.getLogger("unitrade.workers")

LEAD_TRY_S = 1.0  # how often a process tries the lock, and the leader checks it holds it
STATUS_S = 1.0
CHANGES_POLL_S = 0.2
CHANGES_BATCH_ROWS = 1_000
CHANGES_BATCHES_MAX = 20  # per poll: a feed far behind catches up over a few polls


class Leadership:
    """Take the leader lock when it is free, and run `lead` / `unlead` as it is won and
    lost. A process that cannot reach the database is not the leader."""

    def __init__(
        self,
        lock: LeaderLock,
        lead: Callable[[], Awaitable[None]],
        unlead: Callable[[], Awaitable[None]],
        try_s: float = LEAD_TRY_S,
    ) -> None:
        self.lock = lock
        self._lead = lead
        self._unlead = unlead
        self.try_s = try_s
        self.leader = False
        self.changes = 0  # times this process became the leader
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.leader:
            self.leader = False
            await self._unlead()
        await self.lock.release()  # the lock goes with the connection

    async def _run(self) -> None:
        while True:
            try:
                held = await self.lock.try_acquire()
                self.last_error = ""
            except Exception as exc:  # the database away: not the leader meanwhile
                held = False
                message = f"{type(exc).__name__}: {exc}"[:200]
                if message != self.last_error:
                    log.warning("leader lock not taken: %s", message)
                self.last_error = message
            if held and not self.leader:
                try:
                    await self._lead()
                except Exception as exc:  # nothing was started: let another process lead
                    log.warning("leading the region failed, the lock is given up: %s", exc)
                    await self.lock.drop()
                else:
                    self.leader = True
                    self.changes += 1
                    log.info("this process leads the region: background work starts here")
            elif not held and self.leader:
                self.leader = False
                log.warning("this process lost the leader lock: its background work stops")
                await self._unlead()
            await asyncio.sleep(self.try_s)


class ChangeFeed:
    """The changes of one copy (the region's copy of the global cell) read back from its
    changelog, for a process that did not make them: `listener(changes)` per batch in
    position order. A copy trimmed past the feed, or rebuilt (its position went back), is
    read afresh instead (`reload`)."""

    def __init__(
        self,
        store: CellStore,
        listener: Callable[[list[dict[str, Any]]], None],
        reload: Callable[[], Awaitable[None]],
        poll_s: float = CHANGES_POLL_S,
    ) -> None:
        self.store = store
        self.listener = listener
        self.reload = reload
        self.poll_s = poll_s
        self.position = 0
        self.reloads = 0
        self._task: asyncio.Task[None] | None = None

    def start(self, position: int) -> None:
        """Feed the changes after `position` (read before the state `listener` keeps)."""
        self.position = position
        self._task = asyncio.create_task(self._run(), name="change-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except Exception as exc:  # tried again at the next poll
                log.warning("changes of cell %s not read back: %s", self.store.cell.name, exc)

    async def poll_once(self) -> None:
        last, trimmed = await self.store.read_meta()
        if last < self.position or trimmed > self.position:
            # Rebuilt from a snapshot, or trimmed past what this process read: whatever it
            # missed is in the tables, not the changelog.
            await self.reload()
            self.reloads += 1
            self.position = last
            return
        for _ in range(CHANGES_BATCHES_MAX):
            if self.position >= last:
                return
            rows = await self.store.changes_since(self.position, CHANGES_BATCH_ROWS)
            taken = contiguous(rows, self.position)
            if not taken:
                return  # the next row is not visible yet (MariaDB, an instant): next poll
            self.listener(taken)
            self.position = int(taken[-1]["position"])


def contiguous(rows: Sequence[dict[str, Any]], after: int) -> list[dict[str, Any]]:
    """The rows that follow `after` without a gap."""
    taken: list[dict[str, Any]] = []
    for row in rows:
        if int(row["position"]) != after + len(taken) + 1:
            break
        taken.append(row)
    return taken


class StatusReporter:
    """Write this process's row of the `workers` table every STATUS_S: `status()` is
    what it holds now."""

    def __init__(
        self,
        store: CellStore,
        worker: int,
        leader: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        every_s: float = STATUS_S,
    ) -> None:
        self.store = store
        self.worker = worker
        self.leader = leader
        self.status = status
        self.every_s = every_s
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.started_ms = now_ms()
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="worker-status")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def report_once(self) -> None:
        await workers_table.report(
            self.store,
            self.worker,
            self.pid,
            self.host,
            self.leader(),
            self.started_ms,
            self.status(),
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.report_once()
                self.last_error = ""
            except Exception as exc:  # reported again next time
                message = f"{type(exc).__name__}: {exc}"[:200]
                if message != self.last_error:
                    log.warning("this process's status not reported: %s", message)
                self.last_error = message
            await asyncio.sleep(self.every_s)
