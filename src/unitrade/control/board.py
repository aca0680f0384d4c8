"""The rule board: the newest rule, the regions watching it, and their acknowledgements.

Regions hold a long poll open here (control/agent.py). Publishing a rule answers every open
watch at once; the next watch request of a region carries the versions its components have
put in force, which is how acknowledgements arrive. `wait_acks` is what a switchover waits
on: "every component of these regions acknowledges version v" means no write admitted under
an older version can still commit there (docs/architecture.md).

A region of many processes watches once per process (`worker`). The region has acknowledged
v when every process of it that is connected has; one that is not (dead, frozen past the
grace, cut off) is not waited for: its stale rule cannot commit a write, because the
database refuses a transaction under a rule older than the newest at which any process of
the region saw the cell change (the database fence, storage/store.py), and a failover's
block and lease expiry cover every process (docs/architecture.md, A region of many
processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from unitrade.control.store import ControlStore, StaleRule
from unitrade.topology.rule import RoutingError, Rule

COMPONENTS = ("gateway", "rpc", "dal")
# A region whose watch is closed and that has not watched for this long is not connected.
CONNECTED_GRACE_S = 3.0


WORKERS_SEEN_MAX = 64  # processes of one region the board keeps track of


@dataclass
class WorkerSeen:
    """One process of a region, as its watches show it."""

    acked: dict[str, int] = field(default_factory=dict)
    current: int = 0  # the newest rule version the process holds
    watching: int = 0  # watch requests open now
    last_seen: float = 0.0  # monotonic

    @property
    def version(self) -> int:
        """The version every component of the process has acknowledged."""
        return min((self.acked.get(c, 0) for c in COMPONENTS), default=0)

    def connected(self, now: float) -> bool:
        return self.watching > 0 or now - self.last_seen < CONNECTED_GRACE_S


@dataclass
class RegionSeen:
    workers: dict[int, WorkerSeen] = field(default_factory=dict)

    def worker(self, worker: int) -> WorkerSeen:
        seen = self.workers.get(worker)
        if seen is None:
            if len(self.workers) >= WORKERS_SEEN_MAX:
                # Bounded: forget the process heard from longest ago (not connected).
                oldest = min(self.workers, key=lambda w: self.workers[w].last_seen)
                del self.workers[oldest]
            seen = self.workers[worker] = WorkerSeen()
        return seen

    def counted(self, now: float) -> list[WorkerSeen]:
        """The processes whose acknowledgements count: the connected ones; with none
        connected, every one's last word (a region away keeps what it last said)."""
        connected = [w for w in self.workers.values() if w.connected(now)]
        return connected or list(self.workers.values())

    @property
    def version(self) -> int:
        """The version every counted process of the region has acknowledged."""
        counted = self.counted(time.monotonic())
        return min((w.version for w in counted), default=0)

    @property
    def acked(self) -> dict[str, int]:
        """Per component, the version every counted process has acknowledged."""
        counted = self.counted(time.monotonic())
        return {c: min((w.acked.get(c, 0) for w in counted), default=0) for c in COMPONENTS}

    @property
    def current(self) -> int:
        """The newest rule version any process of the region holds."""
        return max((w.current for w in self.workers.values()), default=0)

    def connected(self, now: float) -> bool:
        return any(w.connected(now) for w in self.workers.values())


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

    def saw(self, region: str, acked: dict[str, int], current: int = 0, worker: int = 0) -> None:
        seen = self.regions[region].worker(worker)
        seen.acked = {c: int(acked.get(c, 0)) for c in COMPONENTS}
        seen.current = current
        seen.last_seen = time.monotonic()
        self._acked.set()
        self._acked = asyncio.Event()

    async def watch(
        self, region: str, after: int, acked: dict[str, int], wait_s: float, worker: int = 0
    ) -> Rule | None:
        """Record a region process's acknowledgements; the newest rule once it is above
        `after` (at once if it already is), or None after `wait_s`."""
        self.saw(region, acked, after, worker)
        seen = self.regions[region].worker(worker)
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
            # A process that stops watching may leave the counted ones, and its region's
            # acknowledgement move (wait_acks looks again).
            self._acked.set()
            self._acked = asyncio.Event()
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
        the regions still missing when `timeout_s` passes (empty: all acknowledged). A
        process of a region that stops being connected stops being waited for: looked at
        again at least every CONNECTED_GRACE_S / 10."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.missing(version, regions):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CONNECTED_GRACE_S / 10):
                            await self._acked.wait()
        except TimeoutError:
            pass
        return self.missing(version, regions)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()

        def ago(at: float) -> int | None:
            return None if not at else int((now - at) * 1000)

        return [
            {
                "region": name,
                "connected": seen.connected(now),
                "acked": seen.acked,
                "version": seen.version,
                "holds": seen.current,
                "seen_ms_ago": ago(max((w.last_seen for w in seen.workers.values()), default=0)),
                "workers": [
                    {
                        "worker": number,
                        "connected": w.connected(now),
                        "acked": w.acked,
                        "version": w.version,
                        "holds": w.current,
                        "seen_ms_ago": ago(w.last_seen),
                    }
                    for number, w in sorted(seen.workers.items())
                ],
            }
            for name, seen in self.regions.items()
        ]
