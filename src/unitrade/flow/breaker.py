"""Circuit breakers on calls to other regions: center and catalog RPC (services/remote.py)
and forwarding (gateway/forward.py), one per (region, call) in each serving process.

    closed     calls pass; each is recorded in a sliding window of window_ms (ten buckets)
    open       when, with at least calls_min calls in the window, failed / calls reaches
               error_ratio_max or slow / calls reaches slow_ratio_max: every call fails at
               once with 503 `circuit_open` for open_ms
    half_open  then up to `probes` calls go through; all of them good closes the breaker
               (with a fresh window), one failed or slow opens it again

Failing fast happens before anything leaves this region, so `circuit_open` always means
nothing was sent and nothing applied: a breaker never turns a call whose outcome is
unknown into a claimed failure. A call that was sent and got no answer is recorded as a
failure and answered as before (504 outcome_unknown where it may have written).

Why not a library: purgatory (asyncio, Redis state) keeps no slow-call ratio and counts
consecutive failures rather than a ratio over a window; pybreaker has no asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from unitrade.errors import CircuitOpen
from unitrade.flow.limiter import retry_after_header
from unitrade.topology.flow_rules import Breakers

BUCKETS = 10
Clock = Callable[[], float]
T = TypeVar("T")


def _never(_result: Any) -> bool:
    return False


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.OPEN: 1, BreakerState.HALF_OPEN: 2}


@dataclass
class Ticket:
    """A call the breaker let through; `probe` if it is a half-open probe."""

    started: float
    probe: bool
    counted: bool = True  # False: the breakers are off, nothing is recorded


class Breaker:
    def __init__(
        self, region: str, call: str, rules: Callable[[], Breakers], clock: Clock = time.monotonic
    ) -> None:
        self.region = region
        self.call = call
        self.rules = rules
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.opened_at = 0.0
        self.probes_out = 0
        self.probes_good = 0
        self._ids = [-1] * BUCKETS
        self._calls = [0] * BUCKETS
        self._failed = [0] * BUCKETS
        self._slow = [0] * BUCKETS
        # Since the process started: for /metrics.
        self.calls_total = 0
        self.failed_total = 0
        self.slow_total = 0
        self.rejected_total = 0
        self.opened_total = 0

    @property
    def name(self) -> str:
        return f"{self.call}@{self.region}"

    # -- the window ---------------------------------------------------------------------------

    def _slot(self, now: float, window_s: float) -> int:
        bucket = int(now / (window_s / BUCKETS))
        slot = bucket % BUCKETS
        if self._ids[slot] != bucket:
            self._ids[slot] = bucket
            self._calls[slot] = self._failed[slot] = self._slow[slot] = 0
        return slot

    def _window(self, now: float, window_s: float) -> tuple[int, int, int]:
        fresh = int(now / (window_s / BUCKETS)) - BUCKETS
        live = [i for i in range(BUCKETS) if self._ids[i] > fresh]
        return (
            sum(self._calls[i] for i in live),
            sum(self._failed[i] for i in live),
            sum(self._slow[i] for i in live),
        )

    def _reset_window(self) -> None:
        self._ids = [-1] * BUCKETS

    # -- calls --------------------------------------------------------------------------------

    def admit(self) -> Ticket:
        """Let a call through, or CircuitOpen (nothing was sent) while the breaker is open
        or its half-open probes are all out."""
        rules = self.rules()
        now = self.clock()
        if not rules.enabled:
            return Ticket(now, probe=False, counted=False)
        if self.state is BreakerState.OPEN:
            if now - self.opened_at < rules.open_ms / 1000:
                raise self._refusal(rules, now)
            self.state = BreakerState.HALF_OPEN
            self.probes_out = self.probes_good = 0
        if self.state is BreakerState.HALF_OPEN:
            if self.probes_out >= rules.probes:
                raise self._refusal(rules, now)
            self.probes_out += 1
            return Ticket(now, probe=True)
        return Ticket(now, probe=False)

    def record(self, ticket: Ticket, failed: bool) -> None:
        """The outcome of a call `admit` let through: failed (no answer, or an answer that
        says the region could not serve it) or not; slow is measured here."""
        if not ticket.counted:
            return
        rules = self.rules()
        now = self.clock()
        slow = (now - ticket.started) * 1000 > rules.slow_ms
        self.calls_total += 1
        self.failed_total += failed
        self.slow_total += slow
        if ticket.probe:
            if self.state is not BreakerState.HALF_OPEN:
                return  # another probe decided already
            if failed or slow:
                self._open(now)
                return
            self.probes_good += 1
            if self.probes_good >= rules.probes:
                self.state = BreakerState.CLOSED
                self._reset_window()
            return
        window_s = rules.window_ms / 1000
        slot = self._slot(now, window_s)
        self._calls[slot] += 1
        self._failed[slot] += failed
        self._slow[slot] += slow
        if self.state is not BreakerState.CLOSED:
            return
        calls, failures, slows = self._window(now, window_s)
        if calls < rules.calls_min:
            return
        if failures / calls >= rules.error_ratio_max or slows / calls >= rules.slow_ratio_max:
            self._open(now)

    async def run(
        self,
        make: Callable[[], Awaitable[T]],
        failed: Callable[[BaseException], bool],
        failed_result: Callable[[T], bool] = _never,
    ) -> T:
        """Run `make()` through the breaker: CircuitOpen before it runs while the breaker
        is open; its error or result recorded as failed or not (`failed`, `failed_result`);
        a cancelled call is not judged."""
        ticket = self.admit()
        try:
            result = await make()
        except asyncio.CancelledError:
            self.release(ticket)
            raise
        except BaseException as exc:
            self.record(ticket, failed(exc))
            raise
        self.record(ticket, failed_result(result))
        return result

    def release(self, ticket: Ticket) -> None:
        """A call let through that ended without an outcome to judge (cancelled)."""
        if ticket.probe and self.state is BreakerState.HALF_OPEN:
            self.probes_out = max(0, self.probes_out - 1)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.opened_total += 1

    def _refusal(self, rules: Breakers, now: float) -> CircuitOpen:
        self.rejected_total += 1
        left_s = max(0.0, rules.open_ms / 1000 - (now - self.opened_at))
        return CircuitOpen(
            f"the circuit breaker of {self.call} calls to region {self.region} is open (too "
            "many of them failed or were slow): failed fast, nothing was sent; retry after "
            f"{retry_after_header(left_s)} s",
            retry_after_s=retry_after_header(left_s),
            region=self.region,
            call=self.call,
        )

    def status(self) -> dict[str, Any]:
        rules = self.rules()
        now = self.clock()
        state = self.state
        if state is BreakerState.OPEN and now - self.opened_at >= rules.open_ms / 1000:
            state = BreakerState.HALF_OPEN  # the next call is a probe
        calls, failures, slows = self._window(now, rules.window_ms / 1000)
        return {
            "region": self.region,
            "call": self.call,
            "state": state.value,
            "window": {"calls": calls, "failed": failures, "slow": slows},
            "rejected": self.rejected_total,
            "opened": self.opened_total,
        }


class BreakerBoard:
    """This process's breakers, one per (region, call), made on first use."""

    def __init__(self, rules: Callable[[], Breakers], clock: Clock = time.monotonic) -> None:
        self.rules = rules
        self.clock = clock
        self._breakers: dict[tuple[str, str], Breaker] = {}

    def get(self, region: str, call: str) -> Breaker:
        breaker = self._breakers.get((region, call))
        if breaker is None:
            breaker = Breaker(region, call, self.rules, self.clock)
            self._breakers[(region, call)] = breaker
        return breaker

    def all(self) -> list[Breaker]:
        return [self._breakers[k] for k in sorted(self._breakers)]
