"""Order IDs from per-cell segments: unique across processes, restarts and clock jumps."""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.storage_support import make_store
from unitrade.errors import ClockBehind
from unitrade.storage.sequences import OrderIdAllocator, allocate_segment
from unitrade.topology.order_id import EPOCH_UNIX_S, SEQUENCE_MAX, decode_order_id

NOW = EPOCH_UNIX_S + 10_000_000.0


async def _allocate(
    url: str,
    n: int,
    clock: Callable[[], float] = time.time,
    segment_size: int = 16,
    segment_age_s_max: float = 2.0,
) -> list[int]:
    store = make_store(url, 1)
    await store.open()
    try:
        allocator = OrderIdAllocator(store, segment_size, clock, segment_age_s_max)
        return [await allocator.next_id() for _ in range(n)]
    finally:
        await store.close()


def _worker(url: str, n: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(asyncio.run(_allocate(url, n, segment_size=7)))


def test_unique_under_concurrent_allocation_in_several_processes(storage_url: str) -> None:
    asyncio.run(_allocate(storage_url, 1))  # create the schema once, before the race
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(storage_url, 400, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    ids = [i for result in results for i in result]
    assert len(ids) == 1600
    assert len(set(ids)) == 1600
    assert {decode_order_id(i).cell for i in ids} == {1}


def test_unique_after_a_restart_with_the_clock_standing_still(storage_url: str) -> None:
    frozen = lambda: NOW  # noqa: E731 - the same second before and after the restart
    first = asyncio.run(_allocate(storage_url, 300, frozen))
    second = asyncio.run(_allocate(storage_url, 300, frozen))
    assert len(set(first) | set(second)) == 600


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(min_value=-3600, max_value=3600), min_size=1, max_size=40))
def test_unique_when_the_clock_goes_backwards(jumps: list[float]) -> None:
    clock_values = iter([NOW + j for j in jumps])
    last = [NOW]

    def clock() -> float:
        last[0] = next(clock_values, last[0])
        return last[0]

    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{directory}/cell-{{cell}}.db"
        # A segment per ID (age limit < 0), so every ID consults the jumping clock, and a
        # restart half-way.
        half = len(jumps) // 2
        ids = asyncio.run(_allocate(url, half, clock, segment_age_s_max=-1))
        ids += asyncio.run(_allocate(url, len(jumps) - half, clock, segment_age_s_max=-1))
    assert len(set(ids)) == len(ids)
    times = [decode_order_id(i).time_s for i in ids]
    assert times == sorted(times)  # the stored time never goes backwards


def test_a_used_up_second_borrows_ahead_then_refuses(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        store = make_store(f"sqlite:///{tmp_path}/cell-{{cell}}.db", 1)
        await store.open()
        try:
            whole = SEQUENCE_MAX + 1
            frozen = lambda: NOW  # noqa: E731
            first = await allocate_segment(store, whole, frozen, ahead_s_max=2)
            second = await allocate_segment(store, whole, frozen, ahead_s_max=2)
            third = await allocate_segment(store, whole, frozen, ahead_s_max=2)
            assert (second.time_s, third.time_s) == (first.time_s + 1, first.time_s + 2)
            with pytest.raises(ClockBehind):
                await allocate_segment(store, whole, frozen, ahead_s_max=2)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_segment_is_void_after_the_cell_changes_owner(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Switched away and back (issue 4 item 6): the rest of the old segment is never used,
    so the IDs of this region never collide with those the other owner issued meanwhile."""
    from tests.storage_support import RULE, sqlite_template

    template = sqlite_template(tmp_path)

    async def scenario() -> None:
        here = make_store(template, 1, "hz")
        there = make_store(template, 1, "sh")  # the same database: the replicated copy
        await here.open()
        await there.open()
        try:
            allocator = OrderIdAllocator(here, 64, lambda: NOW)
            before = [await allocator.next_id() for _ in range(3)]
            banned = RULE.derive(2, banned={1})
            moved = banned.derive(3, owners={1: "sh"}, banned=set())
            back = moved.derive(4, banned={1}).derive(5, owners={1: "hz"}, banned=set())
            for rule in (banned, moved):
                await here.fence.install(rule)
                await there.fence.install(rule)
            allocator.drop_segment(moved.version)
            other = OrderIdAllocator(there, 64, lambda: NOW)
            theirs = [await other.next_id() for _ in range(5)]
            await there.fence.install(back)
            await here.fence.install(back)
            allocator.drop_segment(back.version)
            after = [await allocator.next_id() for _ in range(3)]
        finally:
            await here.close()
            await there.close()
        ids = before + theirs + after
        assert len(set(ids)) == len(ids)
        assert min(theirs) > max(before) and min(after) > max(theirs)

    asyncio.run(scenario())
