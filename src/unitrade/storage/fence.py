"""The write fence (docs/architecture.md): a write to a cell is admitted only if this
region owns the cell under the current rule, the cell is not banned and the region holds a
write lease (control/lease.py); every admitted write carries the rule version (its epoch).

Installing a new rule waits until every write admitted under an older version has finished,
so that acknowledging version v means "no write admitted under < v can still commit": the
switchover (control/switchover.py) reads a banned cell's final position on that promise.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from unitrade.errors import NoWriteLease, WriteBanned, WrongRegion
from unitrade.planted import WRITE_BANNED, planted
from unitrade.topology.rule import Rule

DRAIN_TIMEOUT_S_DEFAULT = 10.0
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
        drained = asyncio.ensure_future(self._drain(rule.version))
        self._draining.add(drained)
        drained.add_done_callback(self._draining.discard)
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(drained)

    async def _drain(self, version: int) -> None:
        async with self._drained:
            await self._drained.wait_for(lambda: self.in_flight_below(version) == 0)
        self.acked = max(self.acked, version)
