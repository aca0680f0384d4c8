"""Rate limits in layers (docs/architecture.md, Flow control): a request is checked against
the limits its layer names, in order, with the values of the flow rules in force; a
refusal is 429 `rate_limited` naming the limit, with Retry-After.

- the edge (gateway/edge.py), before any forwarding: `ip` (the client's address), `buyer`
  (the token's buyer), `region` (every client request of the gateway: a rate, and
  `concurrency_max` at once);
- the business layer, where the request is served: `order_buyer` and `order_sku` (one
  key per SKU: a hot SKU is refused on its own while the others pass), `admin_writes`.

The schedules live in this process (`memory`) or in Redis (`[flow] storage`), shared by
every process of the region. Counters of what each limit admitted, refused and queued are
kept here for /metrics; the request path pays an integer increment for them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence

from unitrade.errors import RateLimited
from unitrade.flow.limiter import Schedules, Shape, retry_after_header
from unitrade.flow.redis_limiter import STATE_FORMAT, RedisSchedules, RedisUnavailable
from unitrade.topology.flow_rules import LIMITS, FlowRules, LimitMode

log = logging.getLogger("unitrade.flow")

Clock = Callable[[], float]


class RateLimits:
    def __init__(
        self,
        region: str,
        rules: Callable[[], FlowRules],
        shared: RedisSchedules | None = None,
        key_prefix: str = "unitrade",
        clock: Clock = time.monotonic,
    ) -> None:
        self.region = region
        self.rules = rules
        self.shared = shared
        self.prefix = f"{key_prefix}:{region}:"
        self.clock = clock
        self.local = {name: Schedules() for name in LIMITS}
        self._shapes: dict[tuple[str, float], Shape] = {}
        self._shapes_version = 0
        # Per limit, a digest of its settings: a changed limit starts afresh (every key
        # gets its burst again, a warm-up limit starts cold), here and in Redis, where the
        # digest is part of the key, so no schedule of the old settings is read.
        self._digests: dict[str, str] = {}
        self._key_prefixes: dict[str, str] = {}  # per limit, its Redis keys' prefix
        self.admitted: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.queued: Counter[str] = Counter()  # admitted after waiting their turn
        self.waiting: Counter[str] = Counter()  # waiting now
        self.storage_errors = 0  # Redis checks that fell back on this process
        self.in_flight = 0  # client requests in the gateway now (the region's concurrency)

    # -- checks ------------------------------------------------------------------------------

    def _shape(self, rules: FlowRules, name: str, rate: float) -> Shape:
        if rules.version != self._shapes_version:
            self._shapes.clear()
            self._shapes_version = rules.version
            for limit_name, limit in rules.limits.items():
                settings = f"{STATE_FORMAT}{limit.model_dump_json()}".encode()
                digest = hashlib.blake2b(settings, digest_size=4).hexdigest()
                if self._digests.get(limit_name, digest) != digest:
                    self.local[limit_name] = Schedules()
                self._digests[limit_name] = digest
                self._key_prefixes[limit_name] = f"{self.prefix}{limit_name}:{digest}:"
        shape = self._shapes.get((name, rate))
        if shape is None:
            if len(self._shapes) > 10_000:  # overrides are bounded; this bounds the rest
                self._shapes.clear()
            shape = self._shapes[(name, rate)] = Shape.of(rules.limits[name], rate)
        return shape

    async def admit(self, wanted: Sequence[tuple[str, str]]) -> None:
        """Take a permit of each (limit, value) in order; RateLimited at the first refusal.
        A queueing limit may make the caller wait (up to its queue_ms_max) first."""
        rules = self.rules()
        checks: list[tuple[str, str, Shape]] = []
        for name, value in wanted:
            limit = rules.limits[name]
            if not limit.enabled:
                continue
            if limit.mode is LimitMode.QUEUE and self.waiting[name] >= limit.queue_max:
                self.refused[name] += 1
                raise self._refusal(name, value, limit.queue_ms_max / 1000, queue_full=True)
            checks.append((name, value, self._shape(rules, name, limit.rate_for(value))))
        if not checks:
            return
        refused, seconds = await self._take(checks)
        for name, _value, _shape in checks[: refused - 1 if refused else len(checks)]:
            self.admitted[name] += 1
        if refused:
            name, value, _shape = checks[refused - 1]
            self.refused[name] += 1
            raise self._refusal(name, value, seconds)
        if seconds > 0:
            await self._wait(seconds, [name for name, _v, s in checks if s.timeout_s > 0])

    async def _take(self, checks: list[tuple[str, str, Shape]]) -> tuple[int, float]:
        if self.shared is not None:
            prefixes = self._key_prefixes
            keys = [(prefixes[name] + value, shape) for name, value, shape in checks]
            try:
                return await self.shared.take(keys)
            except RedisUnavailable as exc:
                self.storage_errors += 1
                if self.storage_errors % 1000 == 1:
                    log.warning("flow: Redis unavailable, limiting in this process: %s", exc)
        now = self.clock()
        longest = 0.0
        for index, (name, value, shape) in enumerate(checks, start=1):
            wait, retry_after = self.local[name].take(value, shape, now)
            if wait is None:
                return index, retry_after
            longest = max(longest, wait)
        return 0, longest

    async def _wait(self, seconds: float, names: list[str]) -> None:
        for name in names:
            self.waiting[name] += 1
            self.queued[name] += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            for name in names:
                self.waiting[name] -= 1

    def _refusal(
        self, name: str, value: str, seconds: float, queue_full: bool = False
    ) -> RateLimited:
        retry = retry_after_header(seconds)
        what = {
            "ip": f"client {value}",
            "buyer": f"buyer {value}",
            "region": f"region {self.region}",
            "order_buyer": f"orders of buyer {value}",
            "order_sku": f"orders of SKU {value}",
            "admin_writes": f"admin writes at region {self.region}",
        }[name]
        why = "its queue is full" if queue_full else "its rate is used up"
        return RateLimited(
            f"rate limit {name} refused {what}: {why}; nothing was done, retry after {retry} s",
            retry_after_s=retry,
            limit=name,
        )

    # -- the region's concurrency -------------------------------------------------------------

    def check_concurrency(self) -> None:
        """RateLimited (limit region) when `concurrency_max` client requests are in the
        gateway already (counted in this process; flow/control.py keeps the count)."""
        limit = self.rules().limits["region"]
        if limit.enabled and limit.concurrency_max and self.in_flight >= limit.concurrency_max:
            self.refused["region"] += 1
            raise RateLimited(
                f"rate limit region refused a request: {self.in_flight} are in region "
                f"{self.region}'s gateway already (concurrency_max {limit.concurrency_max}); "
                "nothing was done, retry after 1 s",
                retry_after_s=1,
                limit="region",
            )

    def status(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "admitted": self.admitted[name],
                "refused": self.refused[name],
                "queued": self.queued[name],
                "waiting": self.waiting[name],
            }
            for name in LIMITS
        }
