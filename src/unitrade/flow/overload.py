"""Overload protection: shed new requests early rather than let every request slow down.

A region watches two things (Alibaba Sentinel's adaptive system protection, after TCP BBR):

- **its event loop's delay**: a task sleeps LOOP_INTERVAL_S and measures how late it
  wakes up; everything the region does runs on that loop, so the delay is how long any
  ready request waits for the CPU;
- **its work in flight** against what it completes: the most requests completed in a
  COMPLETION_BUCKET_S bucket over the last second (max_qps) times the shortest latency of
  the last ten seconds (min_rt) is how many requests it keeps in flight when it runs
  best (Little's law).

A new client request (or one forwarded from another region) is shed with 503
`overloaded` and Retry-After when the loop has kept being late by more than
`loop_delay_ms_max` (SUSTAINED_SAMPLES wake-ups in a row), at least IN_FLIGHT_FLOOR are in
flight, and
more than IN_FLIGHT_HEADROOM times that many requests are in flight, or when
`in_flight_max` (a hard bound, 0: none) are. So a region at capacity keeps serving what it
admitted at the latency it serves best, and what it cannot serve is told at once.
Replication, rule pushes, leases, health probes and the rest of the internal API are
never shed: they do not pass through here (gateway/edge.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from collections.abc import Callable

from unitrade.errors import Overloaded
from unitrade.topology.flow_rules import FlowRules

LOOP_INTERVAL_S = 0.025
LOOP_SAMPLES = 8  # the worst of the last 200 ms is shown in /healthz
# Shedding looks at the delay the loop kept for this many wake-ups in a row: a saturated
# loop is late on every one, while a single stall (a garbage collection, a slow first
# connection) makes one wake-up late and is over before shedding could help. Shedding on
# the worst sample turned such a stall at 5 requests in flight into refused orders. (A
# saturated loop wakes the monitor rarely, once per pass over its backlog: two wake-ups
# are already a sustained delay.)
SUSTAINED_SAMPLES = 2
COMPLETION_BUCKET_S = 0.1
QPS_BUCKETS = 10  # max_qps over the last second
RT_BUCKET_S = 1.0
RT_BUCKETS = 10  # min_rt over the last ten seconds
IN_FLIGHT_HEADROOM = 2.0
# Never shed below this many in flight on the loop's delay: a region with a few requests
# in flight is not overloaded, whatever its loop did a moment ago.
IN_FLIGHT_FLOOR = 32

Clock = Callable[[], float]


class LoopMonitor:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._samples: deque[float] = deque(maxlen=LOOP_SAMPLES)
        self._due: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self._due = self.clock() + LOOP_INTERVAL_S
            await asyncio.sleep(LOOP_INTERVAL_S)
            self._samples.append(max(0.0, self.clock() - self._due))

    def _overdue_s(self) -> float:
        return 0.0 if self._due is None else max(0.0, self.clock() - self._due)

    def delay_s(self) -> float:
        """How late the loop is at worst: the worst recent sample, or, when the monitor's
        own wake-up is overdue right now, by how much (for /healthz)."""
        return max(max(self._samples, default=0.0), self._overdue_s())

    def sustained_s(self) -> float:
        """How late the loop has kept being: the least of its last SUSTAINED_SAMPLES
        wake-ups and of how overdue the next one is now (0 until there are that many)."""
        recent = list(self._samples)[-SUSTAINED_SAMPLES:]
        if len(recent) < SUSTAINED_SAMPLES:
            return 0.0
        return min(*recent, max(self._overdue_s(), recent[-1]))


class OverloadGuard:
    def __init__(
        self,
        region: str,
        rules: Callable[[], FlowRules],
        clock: Clock = time.monotonic,
        loop: LoopMonitor | None = None,
    ) -> None:
        self.region = region
        self.rules = rules
        self.clock = clock
        self.loop = loop or LoopMonitor(clock)
        self.in_flight = 0
        self.shed: Counter[str] = Counter()  # by reason: loop_delay, in_flight_max
        self._qps = [0] * QPS_BUCKETS
        self._qps_ids = [-1] * QPS_BUCKETS
        self._rt = [math.inf] * RT_BUCKETS
        self._rt_ids = [-1] * RT_BUCKETS

    # -- the estimate -----------------------------------------------------------------------

    def completed(self, started: float) -> None:
        """A request that began at `started` (the clock's) has been answered."""
        now = self.clock()
        rt = now - started
        bucket = int(now / COMPLETION_BUCKET_S)
        slot = bucket % QPS_BUCKETS
        if self._qps_ids[slot] != bucket:
            self._qps_ids[slot], self._qps[slot] = bucket, 0
        self._qps[slot] += 1
        bucket = int(now / RT_BUCKET_S)
        slot = bucket % RT_BUCKETS
        if self._rt_ids[slot] != bucket:
            self._rt_ids[slot], self._rt[slot] = bucket, math.inf
        self._rt[slot] = min(self._rt[slot], rt)

    def capacity(self) -> float:
        """max_qps x min_rt: the requests in flight when the region runs best."""
        now = self.clock()
        fresh = int(now / COMPLETION_BUCKET_S) - QPS_BUCKETS
        best = max(
            (n for n, i in zip(self._qps, self._qps_ids, strict=True) if i > fresh), default=0
        )
        fresh_rt = int(now / RT_BUCKET_S) - RT_BUCKETS
        rt = min(
            (r for r, i in zip(self._rt, self._rt_ids, strict=True) if i > fresh_rt), default=0
        )
        return best / COMPLETION_BUCKET_S * (0.0 if math.isinf(rt) else rt)

    # -- admission --------------------------------------------------------------------------

    def check(self) -> None:
        """Overloaded (503) when a new request is to be shed (module docstring)."""
        settings = self.rules().overload
        if not settings.enabled:
            return
        if settings.in_flight_max and self.in_flight >= settings.in_flight_max:
            self.shed["in_flight_max"] += 1
            raise self._refusal(f"{self.in_flight} requests in flight (in_flight_max)")
        if self.in_flight < IN_FLIGHT_FLOOR:
            return
        delay_ms = self.loop.sustained_s() * 1000
        if delay_ms <= settings.loop_delay_ms_max:
            return
        if self.in_flight > max(IN_FLIGHT_FLOOR, IN_FLIGHT_HEADROOM * self.capacity()):
            self.shed["loop_delay"] += 1
            raise self._refusal(
                f"its event loop is {delay_ms:.0f} ms late with {self.in_flight} requests in flight"
            )

    def _refusal(self, why: str) -> Overloaded:
        return Overloaded(
            f"region {self.region} is overloaded ({why}): the request was shed before "
            "anything was done; retry after 1 s"
        )

    def status(self) -> dict[str, float | int | dict[str, int]]:
        return {
            "in_flight": self.in_flight,
            "loop_delay_ms": round(self.loop.delay_s() * 1000, 1),
            "capacity": round(self.capacity(), 1),
            "shed": dict(self.shed),
        }
