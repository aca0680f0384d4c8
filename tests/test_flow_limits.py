"""Rate limits, in-process: each mode on a clock of the test's own (no wall time asserted),
the layers and their order, hot-parameter limits, bounds; and the same schedules in a real
Redis shared by two limiters (two processes of one region)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.support import require_redis
from unitrade.errors import RateLimited
from unitrade.flow.control import ClientAddress, FlowControl
from unitrade.flow.limiter import Schedules, Shape, fresh_state, schedule
from unitrade.flow.limits import RateLimits
from unitrade.flow.redis_limiter import RedisSchedules
from unitrade.topology.flow_rules import FlowConfig, FlowRules, Limit, LimitMode
from unitrade.topology.probes import PROBE_BUYER_MIN


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rules_with(**limits: Limit) -> FlowRules:
    rules = FlowRules()
    return rules.model_copy(update={"limits": {**rules.limits, **limits}})


def admitted_in(schedules: Schedules, shape: Shape, clock: Clock, seconds: float, rps: int) -> int:
    """Requests offered at `rps` for `seconds` on the test clock; how many were admitted."""
    admitted = 0
    for _ in range(int(seconds * rps)):
        clock.now += 1 / rps
        wait, _retry = schedules.take("k", shape, clock.now)
        admitted += wait is not None
    return admitted


def test_reject_admits_the_burst_then_the_rate_and_says_when_to_retry() -> None:
    shape = Shape.of(Limit(rate_per_s=10, burst=5), 10)
    state = fresh_state(shape, 0.0)
    assert [schedule(state, shape, 0.0) for _ in range(6)] == [0.0] * 5 + [None]
    wait = schedule(state, shape, 0.05)
    assert wait is None  # the next permit comes at 0.1 s
    assert abs(state.next_free - 0.1) < 1e-9
    assert schedule(state, shape, 0.1) == 0.0
    # Over a long run the rate holds: 10 per second plus the burst.
    clock = Clock()
    schedules = Schedules()
    assert admitted_in(schedules, shape, clock, 10.0, 100) in range(100, 106)


def test_warm_up_starts_at_a_third_and_reaches_the_full_rate() -> None:
    limit = Limit(rate_per_s=30, mode=LimitMode.WARM_UP, warm_up_s=10, cold_factor=3)
    shape = Shape.of(limit, 30)
    clock = Clock()
    schedules = Schedules()
    first = admitted_in(schedules, shape, clock, 1.0, 300)  # cold: about 10 in the first s
    assert 8 <= first <= 13, first
    for _ in range(15):
        admitted_in(schedules, shape, clock, 1.0, 300)
    warm = admitted_in(schedules, shape, clock, 1.0, 300)  # warm: the full 30
    assert 29 <= warm <= 31, warm
    # Idle for the warm-up period: cold again.
    clock.now += 20
    cold_again = admitted_in(schedules, shape, clock, 1.0, 300)
    assert cold_again <= 13, cold_again


def test_queue_spreads_a_burst_within_the_wait_bound_and_refuses_past_it() -> None:
    limit = Limit(rate_per_s=10, burst=1, mode=LimitMode.QUEUE, queue_ms_max=500)
    shape = Shape.of(limit, 10)
    state = fresh_state(shape, 0.0)
    waits = [schedule(state, shape, 0.0) for _ in range(8)]
    # One at once, then one per 100 ms, up to 500 ms of waiting; the rest refused.
    assert waits[:6] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert waits[6:] == [None, None]


def test_schedules_are_bounded_least_recently_used_first() -> None:
    shape = Shape.of(Limit(rate_per_s=1, burst=1), 1)
    schedules = Schedules(keys_max=3)
    for key in ("a", "b", "c"):
        assert schedules.take(key, shape, 0.0)[0] == 0.0
    assert schedules.take("a", shape, 0.0)[0] is None  # a is used, and now the newest
    schedules.take("d", shape, 0.0)  # b, the oldest, is forgotten
    assert len(schedules) == 3
    assert schedules.take("a", shape, 0.0)[0] is None
    assert schedules.take("b", shape, 0.0)[0] == 0.0  # starts afresh


def test_a_hot_sku_is_limited_on_its_own() -> None:
    asyncio.run(_a_hot_sku_is_limited_on_its_own())


async def _a_hot_sku_is_limited_on_its_own() -> None:
    clock = Clock()
    rules = rules_with(order_sku=Limit(rate_per_s=100, burst=100, overrides={"hot": 2}))
    limits = RateLimits("hz", lambda: rules, clock=clock)
    flow = FlowControl("hz", FlowConfig(), lambda: rules, clock)
    flow.limits = limits
    await flow.admit_order(1, ["hot"])
    await flow.admit_order(2, ["hot", "cold"])
    with pytest.raises(RateLimited) as refused:
        await flow.admit_order(3, ["hot"])
    assert refused.value.details == {"limit": "order_sku"}
    assert refused.value.status == 429 and refused.value.retry_after_s == 1
    assert "SKU hot" in refused.value.message
    for buyer in range(4, 54):  # the others pass while hot is refused
        await flow.admit_order(buyer, ["cold", "warm"])
    assert limits.refused["order_sku"] == 1
    assert limits.admitted["order_sku"] == 1 + 2 + 50 * 2  # one permit per SKU of an order
    # The health checker's probe orders are not limited at all.
    await flow.admit_order(PROBE_BUYER_MIN, ["hot"])
    assert limits.refused["order_sku"] == 1


def test_edge_layers_in_order_and_the_region_concurrency() -> None:
    asyncio.run(_edge_layers_in_order_and_the_region_concurrency())


async def _edge_layers_in_order_and_the_region_concurrency() -> None:
    clock = Clock()
    rules = rules_with(
        ip=Limit(rate_per_s=1, burst=3),
        buyer=Limit(rate_per_s=1, burst=2),
        region=Limit(rate_per_s=1000, concurrency_max=2),
    )
    flow = FlowControl("hz", FlowConfig(), lambda: rules, clock)
    first = await flow.admit_client("10.0.0.1", 7)
    second = await flow.admit_client("10.0.0.1", 7)
    with pytest.raises(RateLimited) as refused:  # the region holds two at once
        await flow.admit_client("10.0.0.2", 8)
    assert refused.value.details["limit"] == "region"
    first.done()
    with pytest.raises(RateLimited) as refused:  # buyer 7 has used its burst of 2
        await flow.admit_client("10.0.0.3", 7)
    assert refused.value.details["limit"] == "buyer"
    third = await flow.admit_client("10.0.0.1", None)  # the third of ip's burst of 3
    second.done()
    with pytest.raises(RateLimited) as refused:
        await flow.admit_client("10.0.0.1", 9)
    assert refused.value.details["limit"] == "ip"
    # The ip check comes first: the refused request took nothing of buyer 9 or the region.
    assert flow.limits.admitted["buyer"] == 2 and flow.limits.refused["ip"] == 1
    third.done()
    assert flow.limits.in_flight == 0 and flow.overload.in_flight == 0


def test_queueing_lets_a_burst_through_in_order_and_bounds_the_queue() -> None:
    asyncio.run(_queueing_lets_a_burst_through_in_order_and_bounds_the_queue())


async def _queueing_lets_a_burst_through_in_order_and_bounds_the_queue() -> None:
    rules = rules_with(
        order_buyer=Limit(
            rate_per_s=20, burst=1, mode=LimitMode.QUEUE, queue_ms_max=1000, queue_max=5
        )
    )
    limits = RateLimits("hz", lambda: rules)
    order: list[int] = []

    async def submit(index: int) -> str:
        try:
            await limits.admit([("order_buyer", "42")])
        except RateLimited as exc:
            return "refused:" + ("queue" if "queue is full" in exc.message else "rate")
        order.append(index)
        return "admitted"

    tasks = []
    for index in range(10):
        tasks.append(asyncio.create_task(submit(index)))
        await asyncio.sleep(0)  # each takes its turn in the order it came
    async with asyncio.timeout(10):
        outcomes = await asyncio.gather(*tasks)
    # One at once and five waiting (queue_max); the rest refused as the queue is full.
    assert outcomes.count("admitted") == 6, outcomes
    assert outcomes.count("refused:queue") == 4, outcomes
    assert order == sorted(order)  # served in the order they came
    assert limits.queued["order_buyer"] == 5 and limits.waiting["order_buyer"] == 0


def test_a_disabled_limit_admits_and_counts_nothing() -> None:
    asyncio.run(_a_disabled_limit_admits_and_counts_nothing())


async def _a_disabled_limit_admits_and_counts_nothing() -> None:
    rules = rules_with(buyer=Limit(enabled=False, rate_per_s=1, burst=1))
    limits = RateLimits("hz", lambda: rules)
    for _ in range(5):
        await limits.admit([("buyer", "1")])
    assert limits.admitted["buyer"] == 0 and limits.refused["buyer"] == 0


def test_client_address_believes_the_header_from_trusted_proxies_only() -> None:
    address = ClientAddress("x-forwarded-for", ["10.0.0.0/8"])
    header = {"x-forwarded-for": "203.0.113.9, 10.1.1.1"}
    assert address.of("10.2.2.2", header) == "203.0.113.9"
    assert address.of("198.51.100.7", header) == "198.51.100.7"  # not a proxy: its own
    assert address.of("10.2.2.2", {"x-forwarded-for": "junk"}) == "10.2.2.2"
    assert ClientAddress(None, []).of("127.0.0.1", header) == "127.0.0.1"
    assert ClientAddress(None, []).of(None, {}) == "unknown"


def test_flow_rules_are_validated_with_real_errors() -> None:
    rules = FlowRules()
    changed = rules.with_limit("buyer", {"rate_per_s": 5}, version=7)
    assert changed.version == 7 and changed.limits["buyer"].burst_size == 5
    with pytest.raises(ValueError, match="unknown limit"):
        rules.with_limit("nope", {"rate_per_s": 5}, 2)
    with pytest.raises(ValueError, match="rate_per_s"):
        rules.with_limit("ip", {"rate_per_s": -1}, 2)
    with pytest.raises(ValueError, match="concurrency_max is a setting of the region"):
        rules.with_limit("ip", {"concurrency_max": 5}, 2)
    with pytest.raises(ValueError, match="overrides"):
        rules.with_limit("buyer", {"overrides": {"x": 1.0}}, 2)
    with pytest.raises(ValueError, match="not a SKU"):
        rules.with_limit("order_sku", {"overrides": {"bad sku": 1.0}}, 2)
    with pytest.raises(ValueError, match="unknown switch"):
        rules.with_switch("nope", True, 2)
    with pytest.raises(ValueError, match="client_ip_header needs trusted_proxies"):
        FlowConfig(client_ip_header="x-forwarded-for")
    with pytest.raises(ValueError, match="unknown limit"):
        FlowConfig(limits={"nope": {"rate_per_s": 1}})
    with pytest.raises(ValueError, match="memory or a redis"):
        FlowConfig(storage="memcached://x")


# -- Redis ----------------------------------------------------------------------------------


def test_redis_limits_are_shared_by_every_process_of_a_region() -> None:
    asyncio.run(_redis_limits_are_shared_by_every_process_of_a_region())


async def _redis_limits_are_shared_by_every_process_of_a_region() -> None:
    url = require_redis()
    prefix = f"ut-test-{uuid.uuid4().hex[:8]}"
    rules = rules_with(
        buyer=Limit(rate_per_s=0.5, burst=4),
        order_sku=Limit(rate_per_s=100, burst=100, overrides={"hot": 0.5}),
    )
    one = RedisSchedules(url, 1.0)
    two = RedisSchedules(url, 1.0)
    first = RateLimits("hz", lambda: rules, one, prefix)
    second = RateLimits("hz", lambda: rules, two, prefix)  # another process of hz
    other = RateLimits("sh", lambda: rules, RedisSchedules(url, 1.0), prefix)
    try:
        outcomes = []
        for limits in (first, second, first, second, first, second):
            try:
                await limits.admit([("buyer", "7")])
                outcomes.append("ok")
            except RateLimited as exc:
                assert exc.details["limit"] == "buyer" and exc.retry_after_s >= 1
                outcomes.append("refused")
        assert outcomes == ["ok"] * 4 + ["refused"] * 2  # one burst of 4 between the two
        await other.admit([("buyer", "7")])  # another region counts on its own
        # A hot SKU: refused on its own, its neighbour passes.
        await first.admit([("order_sku", "hot")])
        with pytest.raises(RateLimited):
            await second.admit([("order_sku", "hot")])
        await second.admit([("order_sku", "cold")])
        assert first.storage_errors == second.storage_errors == 0
    finally:
        for limits in (first, second, other):
            assert limits.shared is not None
            keys = await limits.shared.client.keys(f"{prefix}:*")
            if keys:
                await limits.shared.client.delete(*keys)
            await limits.shared.aclose()


def test_a_high_redis_limit_admits_requests_that_come_microseconds_apart() -> None:
    asyncio.run(_a_high_redis_limit_admits_requests_that_come_microseconds_apart())


async def _a_high_redis_limit_admits_requests_that_come_microseconds_apart() -> None:
    """The schedule's times are unix seconds: kept to a tenth of a millisecond (Lua's
    tostring), a key's next-free time rounded up refused a request that came within 50 us
    of the one before, with thousands of permits stored (a benchmark of 500 orders/s met
    the default 20,000/s `ip` limit)."""
    url = require_redis()
    prefix = f"ut-test-{uuid.uuid4().hex[:8]}"
    rules = rules_with(ip=Limit(rate_per_s=20_000, burst=40_000))
    shared = RedisSchedules(url, 1.0)
    limits = RateLimits("hz", lambda: rules, shared, prefix)
    try:
        refused = 0
        for _ in range(20):
            answers = await asyncio.gather(
                *(limits.admit([("ip", "127.0.0.1")]) for _ in range(50)),
                return_exceptions=True,
            )
            refused += sum(isinstance(a, RateLimited) for a in answers)
        assert refused == 0, f"{refused} of 1,000 refused under a 20,000/s limit"
        assert limits.storage_errors == 0  # Redis answered every check: none fell back
        assert await shared.client.keys(f"{prefix}:hz:ip:*")
        # The checks of requests that came together went in shared calls.
        assert shared.calls < 1_000, shared.calls
    finally:
        keys = await shared.client.keys(f"{prefix}:*")
        if keys:
            await shared.client.delete(*keys)
        await shared.aclose()


def test_requests_checked_together_in_redis_get_what_they_would_one_by_one() -> None:
    asyncio.run(_requests_checked_together_in_redis_get_what_they_would_one_by_one())


async def _requests_checked_together_in_redis_get_what_they_would_one_by_one() -> None:
    """Ten requests at once against a burst of 4 share one script call: the first four (in
    the order they came) are admitted, the rest refused by the limit that ran out; a
    request refused by its first check takes nothing from its second."""
    url = require_redis()
    prefix = f"ut-test-{uuid.uuid4().hex[:8]}"
    rules = rules_with(buyer=Limit(rate_per_s=0.5, burst=4), ip=Limit(rate_per_s=0.5, burst=6))
    shared = RedisSchedules(url, 1.0)
    limits = RateLimits("hz", lambda: rules, shared, prefix)
    try:
        answers = await asyncio.gather(
            *(limits.admit([("buyer", "7"), ("ip", "10.0.0.1")]) for _ in range(10)),
            return_exceptions=True,
        )
        assert shared.calls == 1
        outcomes = [
            "ok" if a is None else a.details["limit"]  # type: ignore[union-attr]
            for a in answers
        ]
        assert outcomes == ["ok"] * 4 + ["buyer"] * 6
        # The ip limit gave 4 of its 6: two are left for another buyer.
        await limits.admit([("buyer", "8"), ("ip", "10.0.0.1")])
        await limits.admit([("buyer", "9"), ("ip", "10.0.0.1")])
        with pytest.raises(RateLimited) as refused:
            await limits.admit([("buyer", "10"), ("ip", "10.0.0.1")])
        assert refused.value.details["limit"] == "ip"
    finally:
        keys = await shared.client.keys(f"{prefix}:*")
        if keys:
            await shared.client.delete(*keys)
        await shared.aclose()


def test_redis_warm_up_and_queue_run_the_same_arithmetic() -> None:
    asyncio.run(_redis_warm_up_and_queue_run_the_same_arithmetic())


async def _redis_warm_up_and_queue_run_the_same_arithmetic() -> None:
    url = require_redis()
    prefix = f"ut-test-{uuid.uuid4().hex[:8]}"
    queue = Limit(rate_per_s=20, burst=1, mode=LimitMode.QUEUE, queue_ms_max=200)
    warm = Limit(rate_per_s=30, mode=LimitMode.WARM_UP, warm_up_s=10)
    rules = rules_with(order_buyer=queue, region=warm)
    shared = RedisSchedules(url, 1.0)
    limits = RateLimits("hz", lambda: rules, shared, prefix)
    try:
        # Queue: the schedule spaces a burst 50 ms apart; past 200 ms it refuses.
        waits = []
        for _ in range(7):
            refused, seconds = await shared.take(
                [(f"{prefix}:q", Shape.of(queue, queue.rate_per_s))]
            )
            waits.append(None if refused else round(seconds, 2))
        assert waits[:5] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2], abs=0.02)
        assert waits[5:] == [None, None]
        # Warm-up: a cold key admits a burst of one, then about rate / 3.
        admitted = 0
        for _ in range(20):
            try:
                await limits.admit([("region", "all")])
                admitted += 1
            except RateLimited:
                pass
        assert 1 <= admitted <= 3, admitted  # 20 at once: far fewer than 30 pass cold
    finally:
        keys = await shared.client.keys(f"{prefix}:*")
        if keys:
            await shared.client.delete(*keys)
        await shared.aclose()


def test_a_redis_that_does_not_answer_falls_back_on_the_process() -> None:
    asyncio.run(_a_redis_that_does_not_answer_falls_back_on_the_process())


async def _a_redis_that_does_not_answer_falls_back_on_the_process() -> None:
    rules = rules_with(buyer=Limit(rate_per_s=1, burst=2))
    # Nothing listens on port 1: every check fails at once and is made in-process.
    limits = RateLimits("hz", lambda: rules, RedisSchedules("redis://127.0.0.1:1/0", 0.2))
    try:
        await limits.admit([("buyer", "1")])
        await limits.admit([("buyer", "1")])
        with pytest.raises(RateLimited):
            await limits.admit([("buyer", "1")])
        assert limits.storage_errors == 3
    finally:
        assert limits.shared is not None
        await limits.shared.aclose()
