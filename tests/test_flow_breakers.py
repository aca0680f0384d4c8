"""Circuit breakers and overload protection, in-process, on a clock of the test's own:
every breaker state and transition, and when a region sheds."""

from __future__ import annotations

import asyncio
import time

import pytest

from unitrade.errors import CircuitOpen, Overloaded, RegionUnavailable
from unitrade.flow.breaker import Breaker, BreakerState
from unitrade.flow.overload import IN_FLIGHT_FLOOR, LoopMonitor, OverloadGuard
from unitrade.topology.flow_rules import Breakers, FlowRules, Overload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **settings: object) -> Breaker:
    rules = Breakers.model_validate(
        {"window_ms": 1000, "calls_min": 4, "open_ms": 5000, **settings}
    )
    return Breaker("hz", "center", lambda: rules, clock)


def calls(b: Breaker, clock: Clock, outcomes: str, seconds_each: float = 0.01) -> None:
    """Run calls through `b`: `g` good, `f` failed, `s` slow (2 s)."""
    for outcome in outcomes:
        ticket = b.admit()
        clock.now += 2.0 if outcome == "s" else seconds_each
        b.record(ticket, failed=outcome == "f")


def test_a_breaker_opens_on_the_error_ratio_over_its_window_with_enough_calls() -> None:
    clock = Clock()
    b = breaker(clock, error_ratio_max=0.5)
    calls(b, clock, "fff")  # three failures, below calls_min: still closed
    assert b.state is BreakerState.CLOSED
    calls(b, clock, "g")  # four calls, 3/4 failed
    assert b.state is BreakerState.OPEN and b.opened_total == 1
    with pytest.raises(CircuitOpen) as refused:
        b.admit()
    error = refused.value
    assert error.status == 503 and error.code == "circuit_open"
    assert error.details == {"region": "hz", "call": "center"}
    assert error.retry_after_s == 5 and "nothing was sent" in error.message
    assert b.rejected_total == 1


def test_failures_outside_the_window_do_not_count() -> None:
    clock = Clock()
    b = breaker(clock, error_ratio_max=0.5)
    calls(b, clock, "fff")
    clock.now += 2.0  # the window is 1 s: they are gone
    calls(b, clock, "fggg")
    assert b.state is BreakerState.CLOSED


def test_a_breaker_opens_on_the_slow_call_ratio() -> None:
    clock = Clock()
    b = breaker(clock, window_ms=20_000, slow_ms=1000, slow_ratio_max=0.5)
    calls(b, clock, "gsgs")
    assert b.state is BreakerState.OPEN


def test_half_open_lets_one_probe_through_which_closes_or_opens_it_again() -> None:
    clock = Clock()
    b = breaker(clock, error_ratio_max=0.5, probes=1)
    calls(b, clock, "ffff")
    assert b.state is BreakerState.OPEN
    clock.now += 4.9
    with pytest.raises(CircuitOpen):
        b.admit()
    clock.now += 0.2  # open_ms has passed: half-open, one probe
    assert b.status()["state"] == "half_open"
    probe = b.admit()
    assert b.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):  # the probe is out: the others still fail fast
        b.admit()
    b.record(probe, failed=True)  # a failed probe opens it again
    assert b.state is BreakerState.OPEN and b.opened_total == 2
    clock.now += 5.1
    probe = b.admit()
    b.record(probe, failed=False)  # a good probe closes it, with a fresh window
    assert b.state is BreakerState.CLOSED
    calls(b, clock, "f")
    assert b.state is BreakerState.CLOSED


def test_a_slow_probe_opens_it_again_and_a_cancelled_one_is_not_judged() -> None:
    clock = Clock()
    b = breaker(clock, error_ratio_max=0.5, slow_ms=1000)
    calls(b, clock, "ffff")
    clock.now += 5.1
    probe = b.admit()
    b.release(probe)  # cancelled: the probe slot is free again
    probe = b.admit()
    clock.now += 2.0
    b.record(probe, failed=False)
    assert b.state is BreakerState.OPEN


def test_run_fails_fast_before_the_call_and_records_what_it_did() -> None:
    clock = Clock()
    b = breaker(clock, error_ratio_max=0.5, calls_min=2)
    started: list[int] = []

    async def unanswered() -> None:
        started.append(1)
        raise RegionUnavailable("no answer")

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(RegionUnavailable):
                await b.run(unanswered, lambda exc: True)
        assert b.state is BreakerState.OPEN
        with pytest.raises(CircuitOpen):
            await b.run(unanswered, lambda exc: True)

    asyncio.run(scenario())
    assert len(started) == 2  # the third call never ran: nothing was sent


def test_disabled_breakers_never_open() -> None:
    clock = Clock()
    b = breaker(clock, enabled=False)
    calls(b, clock, "ffffffff")
    assert b.state is BreakerState.CLOSED and b.calls_total == 0


# -- overload ---------------------------------------------------------------------------------


def guard(clock: Clock, **settings: object) -> OverloadGuard:
    rules = FlowRules(overload=Overload.model_validate(settings))
    monitor = LoopMonitor(clock)
    return OverloadGuard("hz", lambda: rules, clock, monitor)


def test_overload_sheds_past_in_flight_max_always() -> None:
    clock = Clock()
    g = guard(clock, in_flight_max=3)
    g.in_flight = 3
    with pytest.raises(Overloaded) as shed:
        g.check()
    assert shed.value.status == 503 and shed.value.code == "overloaded"
    assert g.shed == {"in_flight_max": 1}


def test_overload_sheds_on_a_late_loop_only_past_what_the_region_completes() -> None:
    clock = Clock()
    g = guard(clock, loop_delay_ms_max=50)
    # The region completed 20 requests in 100 ms (200/s), the fastest in 10 ms: it keeps
    # 2 in flight when it runs best.
    for _ in range(20):
        g.completed(clock.now - 0.01)
    assert g.capacity() == pytest.approx(2.0)
    g.in_flight = IN_FLIGHT_FLOOR + 1
    g.check()  # the loop is on time: nothing is shed whatever is in flight
    g.loop._samples.append(0.2)  # one stall of 200 ms: not an overload, nothing shed
    g.check()
    g.loop._samples.append(0.2)  # late on every wake-up now: saturated
    with pytest.raises(Overloaded) as shed:
        g.check()
    assert "200 ms late" in shed.value.message and g.shed == {"loop_delay": 1}
    g.in_flight = IN_FLIGHT_FLOOR  # few in flight: admitted, late loop or not
    g.check()
    # A region that completes much more keeps more in flight before it sheds.
    for _ in range(200):
        g.completed(clock.now - 0.01)
    g.in_flight = 40
    g.check()
    g.in_flight = 50  # past twice what it keeps in flight at best (22)
    with pytest.raises(Overloaded):
        g.check()


def test_the_loop_monitor_measures_a_blocked_loop_and_tells_a_stall_from_saturation() -> None:
    async def busy(until: float) -> None:
        while time.monotonic() < until:
            time.sleep(0.04)  # noqa: ASYNC251 (the point: work that keeps the loop late)
            await asyncio.sleep(0)

    async def scenario() -> tuple[float, float, float]:
        monitor = LoopMonitor()
        monitor.start()
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # noqa: ASYNC251 (one stall: the loop is blocked, its monitor late)
        late_now = monitor.delay_s()
        await asyncio.sleep(0.1)
        stall = (max(late_now, monitor.delay_s()), monitor.sustained_s())
        # Saturated: six tasks each blocking 40 ms between yields, for 2 s: every wake-up
        # of the monitor waits at least 240 ms behind them.
        until = time.monotonic() + 2.0
        workers = [asyncio.create_task(busy(until)) for _ in range(6)]
        await asyncio.sleep(1.7)
        saturated = monitor.sustained_s()
        await asyncio.gather(*workers)
        await monitor.stop()
        return (*stall, saturated)

    worst, after_stall, saturated = asyncio.run(scenario())
    assert worst >= 0.2  # what /healthz shows
    assert after_stall < 0.1  # one stall is not an overload
    assert saturated >= 0.15  # six 40 ms slices ahead of every wake-up


def test_overload_protection_can_be_turned_off() -> None:
    clock = Clock()
    g = guard(clock, enabled=False, in_flight_max=1)
    g.in_flight = 100
    g.loop._samples.append(5.0)
    g.check()
