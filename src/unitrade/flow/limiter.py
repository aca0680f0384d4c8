"""The rate limiter: one schedule per key, in this process or in Redis.

Why by hand: the `limits` library (moving, sliding and fixed windows, asyncio and Redis
storage) has neither a token bucket with bursts, nor warm-up, nor queueing, and one of its
moving-window checks cost several times one of these (docs/architecture.md, Flow control,
has what was measured). The algorithm is Guava's RateLimiter (SmoothBursty and
SmoothWarmingUp), which Alibaba Sentinel's warm-up and queueing controllers also follow:
each key has `next_free`, the moment the next request may pass, and `stored`, permits saved
up while the key was idle.

- A request is served at `next_free` (or now, if that has passed) and pushes `next_free`
  on by what it costs: nothing for a stored permit of a bursty limit, one interval
  (1 / rate) for a fresh one. So after an idle spell a key passes `burst` requests at once,
  then one per interval.
- reject: admitted only when `next_free` has come; refused otherwise, with the time until
  it comes (Retry-After).
- queue: admitted when `next_free` comes within `queue_ms_max`; the caller waits until
  then. Requests of a burst are spread one interval apart instead of refused.
- warm_up: stored permits above a threshold cost more than an interval (up to
  `cold_factor` intervals): a key idle for `warm_up_s` starts at rate / cold_factor and
  reaches the full rate after about `warm_up_s` of traffic near it.

`schedule` is a pure function of the state, the limit and the time, so the tests run it on
a clock of their own; Redis runs the same arithmetic in Lua (redis_limiter.py), where
every process of a region shares the state.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from unitrade.topology.flow_rules import Limit, LimitMode

KEYS_MAX = 100_000  # per limit and process; the least recently used key is forgotten


@dataclass(frozen=True)
class Shape:
    """A limit's schedule parameters, derived once per (limit, rate)."""

    interval_s: float  # 1 / rate: the cost of a fresh permit
    stored_max: float  # permits a key saves up when idle
    refill_s: float  # time to save up one permit while idle
    threshold: float  # warm-up: stored permits above this cost more than an interval
    slope: float  # warm-up: extra cost per stored permit above the threshold
    timeout_s: float  # how far ahead a request may be served: 0, or queue_ms_max
    warm: bool

    @staticmethod
    def of(limit: Limit, rate_per_s: float) -> Shape:
        interval = 1.0 / rate_per_s
        timeout = limit.queue_ms_max / 1000 if limit.mode is LimitMode.QUEUE else 0.0
        if limit.mode is not LimitMode.WARM_UP:
            stored_max = float(limit.burst_for(rate_per_s) - 1)
            return Shape(interval, stored_max, interval, stored_max, 0.0, timeout, False)
        # Guava's SmoothWarmingUp: the area under the cost curve between the threshold and
        # the maximum is the warm-up period.
        cold = interval * limit.cold_factor
        threshold = 0.5 * limit.warm_up_s / interval
        stored_max = threshold + 2.0 * limit.warm_up_s / (interval + cold)
        slope = (cold - interval) / (stored_max - threshold)
        return Shape(interval, stored_max, limit.warm_up_s / stored_max, threshold, slope, 0, True)

    def cost_of_stored(self, stored: float, taken: float) -> float:
        """What taking `taken` of `stored` permits costs (seconds of schedule)."""
        if not self.warm:
            return 0.0
        above = stored - self.threshold
        cost = 0.0
        if above > 0:
            from_above = min(above, taken)
            first = self.interval_s + above * self.slope
            last = self.interval_s + (above - from_above) * self.slope
            cost = from_above * (first + last) / 2
            taken -= from_above
        return cost + self.interval_s * taken


@dataclass
class State:
    next_free: float  # seconds, on the clock of whoever keeps the state
    stored: float


def fresh_state(shape: Shape, now: float) -> State:
    """A key not seen before, or idle long enough: everything saved up (a warm-up limit
    is therefore cold)."""
    return State(now, shape.stored_max)


def schedule(state: State, shape: Shape, now: float) -> float | None:
    """Take a permit: how long the request waits for its turn (0: now), or None when its
    turn is further off than the shape allows (nothing taken)."""
    if now > state.next_free:
        state.stored += (now - state.next_free) / shape.refill_s
        state.next_free = now
    state.stored = min(shape.stored_max, state.stored)  # the limit may have changed
    wait = state.next_free - now
    if wait > shape.timeout_s:
        return None
    taken = min(1.0, state.stored)
    state.next_free += shape.cost_of_stored(state.stored, taken) + (1.0 - taken) * shape.interval_s
    state.stored -= taken
    return wait


def retry_after_s(state: State, now: float) -> float:
    """How long until a refused request's turn would come."""
    return max(0.0, state.next_free - now)


def idle_s(shape: Shape) -> float:
    """How long a key must be idle to be as good as new (its state can be forgotten)."""
    return shape.stored_max * shape.refill_s + shape.timeout_s + shape.interval_s


class Schedules:
    """The states of one limit's keys in this process, bounded (KEYS_MAX, least recently
    used first out: a forgotten key starts afresh, which at worst lets a burst through)."""

    def __init__(self, keys_max: int = KEYS_MAX) -> None:
        assert keys_max >= 1
        self.keys_max = keys_max
        self._states: OrderedDict[str, State] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def take(self, key: str, shape: Shape, now: float) -> tuple[float | None, float]:
        """(wait, retry_after): the wait before the request's turn, or None when refused,
        with how long until a turn would come."""
        states = self._states
        state = states.get(key)
        if state is None:
            state = fresh_state(shape, now)
            states[key] = state
            if len(states) > self.keys_max:
                states.popitem(last=False)
        else:
            states.move_to_end(key)
        wait = schedule(state, shape, now)
        return wait, (0.0 if wait is not None else retry_after_s(state, now))


def retry_after_header(seconds: float) -> int:
    """Retry-After in whole seconds, at least 1 (0 would invite an immediate retry)."""
    return max(1, math.ceil(seconds))
