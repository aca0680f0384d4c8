"""The write fence (docs/architecture.md): a write to a cell is admitted only if this
region owns the cell under the current rule, the cell is not banned and the region holds a
write lease (control/lease.py); every admitted write carries the rule version (its epoch).

Installing a new rule waits until every write admitted under an older version has finished,
so that acknowledging version v means "no write admitted under < v can still commit": the
switchover (control/switchover.py) reads a banned cell's final position on that promise.

A region of many processes keeps that promise across them in the database: before the
acknowledgement, `settle` (set by CellCopies) raises the `fence_epoch` of every copy whose
cell changed owner or ban, which waits for every transaction of any process holding the
cell's lock and makes the database refuse any later one under an older rule
(storage/store.py, docs/architecture.md, A region of many processes).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from unitrade.errors import NoWriteLease, WriteBanned, WrongRegion
from unitrade.planted import WRITE_BANNED, planted
from unitrade.topology.rule import Rule

log = logging.getLogger("unitrade.storage")

DRAIN_TIMEOUT_S_DEFAULT = 10.0
SETTLE_BACKOFF_S_MIN = 0.05
SETTLE_BACKOFF_S_MAX = 1.0
# Raise the database fence of these cells to this rule's version (CellCopies.raise_fences).
Settle = Callable[[list[int], int], Awaitable[None]]
# unitrade/planted.py: the fence ignores bans (the verifier's test of its ownership check).
_IGNORE_BANS = planted(WRITE_BANNED)


def _always() -> bool:
    return True


class Fence:
    def __init__(self, region: str, rule: Rule, lease: Callable[[], bool] = _always) -> None:
        self.region = region
        self._rule = rule
        # Whether this region holds a valid write lease (control/lease.py); checked when a
        # write is admitted and again just before it commits. Thread-safe: the commit
        # check runs on a store's writer thread.
        self.lease_valid = lease
        self.component = "dal"
        self.acked = rule.version  # the version in force: older writes have all finished
        self._in_flight: Counter[int] = Counter()  # rule version -> admitted, unfinished
        self._drained = asyncio.Condition()
        self._draining: set[asyncio.Future[None]] = set()  # drains that outlived a timeout
        # The database's half (regions of many processes): None keeps the fence in-process.
        self.settle: Settle | None = None
        self._settled = rule  # the newest rule whose changes the database fence holds
        self._settle_lock = asyncio.Lock()

    @property
    def rule(self) -> Rule:
        return self._rule

    def check(self, cell: int) -> int:
        """Raise the typed refusal for a write to `cell`, or return the epoch to write under."""
        rule = self._rule
        owner = rule.owner_of(cell)
        if rule.is_banned(cell) and not _IGNORE_BANS:
            raise WriteBanned(f"cell {cell} is banned for a switch; retry shortly", cell=cell)
        if owner != self.region:
            raise WrongRegion(
                f"cell {cell} is owned by region {owner}, not {self.region}",
                cell=cell,
                owner=owner,
            )
        if not self.lease_valid():
            raise self.no_lease(cell)
        return rule.version

    def no_lease(self, cell: int) -> NoWriteLease:
        return NoWriteLease(
            f"region {self.region} holds no write lease (it cannot reach the lease authority, "
            f"or a failover is moving its cells); nothing was written to cell {cell}",
            cell=cell,
            region=self.region,
        )

    @asynccontextmanager
    async def admit(self, cell: int) -> AsyncIterator[int]:
        epoch = self.check(cell)
        self._in_flight[epoch] += 1
        try:
            yield epoch
        finally:
            self._in_flight[epoch] -= 1
            if self._in_flight[epoch] == 0:
                del self._in_flight[epoch]
                async with self._drained:
                    self._drained.notify_all()

    def in_flight_below(self, version: int) -> int:
        return sum(n for v, n in self._in_flight.items() if v < version)

    async def install(self, rule: Rule, timeout_s: float = DRAIN_TIMEOUT_S_DEFAULT) -> None:
        """Put `rule` in force; return once no write admitted under an older rule is open.

        On TimeoutError the rule is in force all the same, and the acknowledgement follows
        when the older writes finish (each is bounded in time), so a slow drain delays an
        acknowledgement and never loses it."""
        if rule.version < self._rule.version:
            raise ValueError(f"rule versions only grow: {rule.version} < {self._rule.version}")
        self._rule = rule
        drained = asyncio.ensure_future(self._drain(rule))
        self._draining.add(drained)
        drained.add_done_callback(self._draining.discard)
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(drained)

    async def _drain(self, rule: Rule) -> None:
        version = rule.version
        async with self._drained:
            await self._drained.wait_for(lambda: self.in_flight_below(version) == 0)
        if self.settle is not None and not await self._settle_database(rule):
            return  # a newer rule is in force: its drain acknowledges
        self.acked = max(self.acked, version)

    async def _settle_database(self, rule: Rule) -> bool:
        """Raise the database fence of every cell whose owner or ban changed since the last
        rule settled; tried again (backoff) until it succeeds, or a newer rule is in force
        (False: that rule's drain settles what changed since, and acknowledges). Never
        given up on otherwise: the acknowledgement must not come without it."""
        assert self.settle is not None
        backoff_s = SETTLE_BACKOFF_S_MIN
        while True:
            async with self._settle_lock:
                if self._settled.version >= rule.version:
                    return True
                cells = rule.moved_cells(self._settled)
                try:
                    if cells:
                        await self.settle(cells, rule.version)
                    self._settled = rule
                    return True
                except Exception as exc:  # the database away, or a lock held too long
                    log.warning(
                        "rule version %s: the database fence of cells %s not raised yet: %s",
                        rule.version,
                        cells,
                        exc,
                    )
            if self._rule.version > rule.version:
                return False
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, SETTLE_BACKOFF_S_MAX)
