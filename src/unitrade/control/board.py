"""The rule board: the newest rule, the regions watching it, and their acknowledgements.

Regions hold a long poll open here (control/agent.py). Publishing a rule answers every open
watch at once; the next watch request of a region carries the versions its components have
put in force, which is how acknowledgements arrive. `wait_acks` is what a switchover waits
on: "every component of these regions acknowledges version v" means no write admitted under
an older version can still commit there (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from unitrade.control.store import ControlStore, StaleRule
from unitrade.topology.rule import RoutingError, Rule

COMPONENTS = ("gateway", "rpc", "dal")
# A region whose watch is closed and that has not watched for this long is not connected.
CONNECTED_GRACE_S = 3.0


@dataclass
class RegionSeen:
    acked: dict[str, int] = field(default_factory=dict)
    current: int = 0  # the newest rule version the region holds
    watching: int = 0  # watch requests open now
    last_seen: float = 0.0  # monotonic

    @property
    def version(self) -> int:
        """The version every component of the region has acknowledged."""
        return min((self.acked.get(c, 0) for c in COMPONENTS), default=0)

    def connected(self, now: float) -> bool:
        return self.watching > 0 or now - self.last_seen < CONNECTED_GRACE_S


class RuleBoard:
    def __init__(self, store: ControlStore, rule: Rule, regions: list[str]) -> None:
        self.store = store
        self._rule = rule
        self.regions = {name: RegionSeen() for name in regions}
        self._published = asyncio.Event()
        self._acked = asyncio.Event()
        self._publish_lock = asyncio.Lock()

    @property
    def rule(self) -> Rule:
        return self._rule

    async def publish(self, rule: Rule, reason: str, operation_id: str | None) -> Rule:
        """Record `rule` in the history (versions only grow), then push it to every watch."""
        async with self._publish_lock:
            self._check(rule)
            await self.store.publish(rule, reason, operation_id)
            self._rule = rule
            self._published.set()
            self._published = asyncio.Event()
        return rule

    def _check(self, rule: Rule) -> None:
        """Refuse a rule the regions could not install: checked here, not asserted, since
        an assert vanishes under `python -O` and the rule would reach every region."""
        if rule.version != self._rule.version + 1:
            raise StaleRule(
                f"rule version {rule.version} after {self._rule.version}: "
                "versions grow one at a time"
            )
        if set(rule.cells) != set(self._rule.cells) or rule.bucket_count != self._rule.bucket_count:
            raise RoutingError(f"rule version {rule.version} changes the cells or buckets")
        unknown = sorted(set(rule.owners.values()) - set(self.regions))
        if unknown:
            raise RoutingError(f"rule version {rule.version} names unknown regions {unknown}")

    def saw(self, region: str, acked: dict[str, int], current: int = 0) -> None:
        seen = self.regions[region]
        seen.acked = {c: int(acked.get(c, 0)) for c in COMPONENTS}
        seen.current = current
        seen.last_seen = time.monotonic()
        self._acked.set()
        self._acked = asyncio.Event()

    async def watch(
        self, region: str, after: int, acked: dict[str, int], wait_s: float
    ) -> Rule | None:
        """Record a region's acknowledgements; the newest rule once it is above `after`
        (at once if it already is), or None after `wait_s`."""
        self.saw(region, acked, after)
        seen = self.regions[region]
        seen.watching += 1
        try:
            async with asyncio.timeout(wait_s):
                while self._rule.version <= after:
                    await self._published.wait()
        except TimeoutError:
            return None
        finally:
            seen.watching -= 1
            seen.last_seen = time.monotonic()
        return self._rule

    def ahead(self) -> dict[str, int]:
        """Regions that hold a newer rule than this control plane: its store was lost or
        restored from an old backup. Publishing on top of it would build on stale owners,
        so operations are refused until the store is restored (docs/operations.md)."""
        return {n: s.current for n, s in self.regions.items() if s.current > self._rule.version}

    def connected(self) -> list[str]:
        now = time.monotonic()
        return [name for name, seen in self.regions.items() if seen.connected(now)]

    def missing(self, version: int, regions: list[str]) -> list[str]:
        return [r for r in regions if self.regions[r].version < version]

    async def wait_acks(self, version: int, regions: list[str], timeout_s: float) -> list[str]:
        """Wait until every component of every region in `regions` acknowledges `version`;
        the regions still missing when `timeout_s` passes (empty: all acknowledged)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.missing(version, regions):
                    await self._acked.wait()
        except TimeoutError:
            pass
        return self.missing(version, regions)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "region": name,
                "connected": seen.connected(now),
                "acked": seen.acked,
                "version": seen.version,
                "holds": seen.current,
                "seen_ms_ago": None if not seen.last_seen else int((now - seen.last_seen) * 1000),
            }
            for name, seen in self.regions.items()
        ]
