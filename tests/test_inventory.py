"""Center inventory: reserve / commit / release / refund, idempotent, never below zero."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.storage_support import make_store
from unitrade.errors import (
    Conflict,
    IllegalTransition,
    InsufficientStock,
    StockBelowCommitted,
    UnitradeError,
    UnknownSku,
)
from unitrade.services.inventory import InventoryService

CENTER = 1000


def run(storage_url: str, body: Callable[[InventoryService], Awaitable[None]]) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, CENTER)
        await store.open()
        try:
            await body(InventoryService(store))
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_life_of_a_reservation(storage_url: str) -> None:
    async def body(inv: InventoryService) -> None:
        await inv.set_stock("A", 10)
        await inv.set_stock("B", 5)
        for _ in range(2):  # a retried reserve changes nothing
            await inv.reserve(1, 1, [("A", 2), ("B", 1), ("A", 1)])
        assert await inv.levels("A") == {"sku": "A", "available": 7, "reserved": 3, "sold": 0}
        for _ in range(2):
            assert (await inv.step(1, "commit"))["status"] == "committed"
        assert await inv.levels("A") == {"sku": "A", "available": 7, "reserved": 0, "sold": 3}
        for _ in range(2):
            assert (await inv.step(1, "refund"))["status"] == "refunded"
        assert await inv.levels("A") == {"sku": "A", "available": 10, "reserved": 0, "sold": 0}
        with pytest.raises(IllegalTransition):
            await inv.step(1, "release")
        await inv.reserve(2, 1, [("B", 5)])
        await inv.step(2, "release")
        await inv.step(2, "release")
        assert await inv.levels("B") == {"sku": "B", "available": 5, "reserved": 0, "sold": 0}
        with pytest.raises(IllegalTransition):
            await inv.step(2, "commit")
        with pytest.raises(Conflict):
            await inv.reserve(1, 1, [("A", 9)])  # the same order ID with other lines

    run(storage_url, body)


def test_insufficient_stock_reserves_nothing(storage_url: str) -> None:
    async def body(inv: InventoryService) -> None:
        await inv.set_stock("A", 10)
        await inv.set_stock("B", 1)
        with pytest.raises(InsufficientStock) as refused:
            await inv.reserve(1, 1, [("A", 4), ("B", 2)])
        assert refused.value.details["sku"] == "B"
        assert await inv.levels("A") == {"sku": "A", "available": 10, "reserved": 0, "sold": 0}
        with pytest.raises(UnknownSku):
            await inv.reserve(2, 1, [("A", 1), ("NOPE", 1)])
        assert (await inv.levels("A"))["available"] == 10
        # The first line refused: the lines' updates go to the database together
        # (WriteTx.updates), and B's, sent with A's, is rolled back with it.
        with pytest.raises(InsufficientStock) as refused:
            await inv.reserve(3, 1, [("A", 11), ("B", 1)])
        assert refused.value.details["sku"] == "A"
        assert await inv.levels("B") == {"sku": "B", "available": 1, "reserved": 0, "sold": 0}
        await inv.reserve(1, 1, [("A", 4), ("B", 1)])  # the refused order ID can still reserve

    run(storage_url, body)


def test_concurrent_reserves_never_oversell(storage_url: str) -> None:
    async def body(inv: InventoryService) -> None:
        await inv.set_stock("HOT", 50)

        async def attempt(order_id: int) -> bool:
            try:
                await inv.reserve(order_id, 1, [("HOT", 1)])
                return True
            except InsufficientStock:
                return False

        results = await asyncio.gather(*(attempt(i) for i in range(1, 121)))
        assert sum(results) == 50
        assert await inv.levels("HOT") == {"sku": "HOT", "available": 0, "reserved": 50, "sold": 0}

    run(storage_url, body)


def test_stock_cannot_be_set_below_reserved_plus_sold(storage_url: str) -> None:
    async def body(inv: InventoryService) -> None:
        await inv.set_stock("A", 10)
        await inv.reserve(1, 1, [("A", 3)])
        await inv.reserve(2, 1, [("A", 2)])
        await inv.step(2, "commit")
        with pytest.raises(StockBelowCommitted):
            await inv.set_stock("A", 4)
        assert await inv.set_stock("A", 5) == {
            "sku": "A",
            "available": 0,
            "reserved": 3,
            "sold": 2,
        }
        assert (await inv.set_stock("A", 20))["available"] == 15

    run(storage_url, body)


def test_a_release_that_overtook_its_reserve_blocks_the_late_reserve(storage_url: str) -> None:
    async def body(inv: InventoryService) -> None:
        await inv.set_stock("A", 10)
        assert (await inv.step(9, "release"))["status"] == "released"
        with pytest.raises(UnitradeError):
            await inv.reserve(9, 1, [("A", 1)])
        assert (await inv.levels("A"))["available"] == 10

    run(storage_url, body)
