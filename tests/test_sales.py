"""Flash sales (issue 12): tokens issued from segments of the sale's quota in the buyer's
region, at most K per buyer and M in all, every token accounted for; only a token holder
orders the sale's SKU, once per token, within the sale; its stock is never oversold. In
one region's process first (the center's), then on a three-region cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import in_process_region, write_topology
from unitrade.errors import (
    InvalidRequest,
    OrderTimedOut,
    SaleClosed,
    SaleLimitReached,
    SaleNotFound,
    SaleSoldOut,
    SaleTokenRequired,
    SaleTokenUsed,
    SaleWindowInvalid,
    UnitradeError,
)
from unitrade.region import RegionRuntime
from unitrade.services.orders import Offer
from unitrade.services.sale_tokens import sale_account
from unitrade.services.sales import SEGMENT_GRACE_MS, account
from unitrade.storage.store import now_ms
from unitrade.topology.rule import route_buyer

T = TypeVar("T")
SKU = "FLASH-1"


def hz_buyers(runtime: RegionRuntime, n: int, start: int = 1) -> list[int]:
    """Buyers homed in hz (cells u1, u2), the region run in this process."""
    found: list[int] = []
    buyer = start
    while len(found) < n:
        if route_buyer(runtime.fence.rule, buyer).region == "hz":
            found.append(buyer)
        buyer += 1
    return found


def in_hz(tmp_path: Path, scenario: Callable[[RegionRuntime], Awaitable[T]]) -> T:
    """Run `scenario` against hz in this process (the center region, with a lease
    authority of its own: ports and a secret of this test only)."""

    async def run() -> T:
        config, _path = write_topology(tmp_path)
        runtime = in_process_region(config, "hz", tmp_path / "data")
        await runtime.start()
        try:
            await runtime.catalog_service.put(SKU, "a phone at a price", 100)
            return await scenario(runtime)
        finally:
            await runtime.stop()

    return asyncio.run(run())


async def new_sale(
    runtime: RegionRuntime,
    stock: int,
    tokens: int,
    per_buyer: int,
    segment_size: int,
    start_in_ms: int = -1_000,
    length_ms: int = 60_000,
) -> str:
    start = now_ms() + start_in_ms
    sale = await runtime.sales.create(
        SKU, stock, tokens, per_buyer, start, start + length_ms, segment_size
    )
    return str(sale["sale_id"])


async def refused(call: Awaitable[Any]) -> str:
    try:
        await call
    except UnitradeError as exc:
        return exc.code
    raise AssertionError("not refused")


def test_tokens_are_at_most_k_per_buyer_and_m_in_all_and_all_accounted_for(
    tmp_path: Path,
) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        sale_id = await new_sale(runtime, stock=3, tokens=7, per_buyer=2, segment_size=3)
        a, b, c, d = hz_buyers(runtime, 4)
        issued = [await runtime.tokens.issue(a, sale_id) for _ in range(2)]
        with pytest.raises(SaleLimitReached):
            await runtime.tokens.issue(a, sale_id)
        for buyer in (b, b, c, c, d):
            issued.append(await runtime.tokens.issue(buyer, sale_id))
        assert len({t["token"] for t in issued}) == 7
        # All seven issued: the eighth is sold out, for a buyer under the limit too.
        with pytest.raises(SaleSoldOut):
            await runtime.tokens.issue(d, sale_id)
        mine = await runtime.tokens.tokens_of(a, sale_id)
        assert [t["token"] for t in mine] == [t["token"] for t in issued[:2]]
        shown = await sale_account(runtime.sales, runtime.inventory, runtime.copies, sale_id)
        assert (shown["remaining"], shown["issued"], shown["lost"]) == (0, 7, 0)
        assert shown["unissued_in_segments"] == 0 and shown["balanced"], shown
        assert shown["segments"]["open"] == 3  # 3 + 3 + 1, none given back yet
        # The segments this process is done with go back; nothing is left to give.
        runtime.tokens.close_due()
        assert await runtime.tokens.give_back_due() == 3
        shown = await sale_account(runtime.sales, runtime.inventory, runtime.copies, sale_id)
        assert shown["segments"] == {"open": 0, "returned": 3, "expired": 0}
        assert shown["balanced"] and shown["remaining"] == 0

    in_hz(tmp_path, scenario)


def test_a_segment_given_back_returns_its_untaken_tokens_to_the_quota(tmp_path: Path) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        sale_id = await new_sale(runtime, stock=5, tokens=10, per_buyer=1, segment_size=4)
        (a,) = hz_buyers(runtime, 1)
        await runtime.tokens.issue(a, sale_id)
        shown = await sale_account(runtime.sales, runtime.inventory, runtime.copies, sale_id)
        assert (shown["remaining"], shown["unissued_in_segments"]) == (6, 3)
        assert shown["unissued_by_region"] == {"hz": 3}
        # A refused request (the buyer's limit) took no token for good.
        with pytest.raises(SaleLimitReached):
            await runtime.tokens.issue(a, sale_id)
        await runtime.tokens.give_back_all(5.0)
        shown = await sale_account(runtime.sales, runtime.inventory, runtime.copies, sale_id)
        assert (shown["remaining"], shown["issued"], shown["unissued_in_segments"]) == (9, 1, 0)
        assert shown["lost"] == 0 and shown["balanced"]

    in_hz(tmp_path, scenario)


def test_a_holder_that_dies_loses_only_the_untaken_rest_of_its_segment(tmp_path: Path) -> None:
    """The process holding a segment dies (here: it is dropped without giving anything
    back): past the segment's expiry the accounting counts its untaken tokens as lost,
    the tokens it issued stay issued, and the rest of the quota is untouched."""

    async def scenario(runtime: RegionRuntime) -> None:
        sale_id = await new_sale(runtime, stock=5, tokens=20, per_buyer=5, segment_size=6)
        (a,) = hz_buyers(runtime, 1)
        for _ in range(2):
            await runtime.tokens.issue(a, sale_id)
        runtime.tokens._current.clear()  # the holder is gone, its segment never given back
        sale, remaining, segments, _count = await runtime.sales.quota(sale_id)
        issued = {1: {"issued": 2}}
        now = account(sale, remaining, segments, issued)
        assert (now["unissued_in_segments"], now["lost"]) == (4, 0) and now["balanced"]
        later = account(sale, remaining, segments, issued, segments[0]["expires_ms"] + 1)
        assert later["unissued_in_segments"] == 4  # the grace covers a late give-back
        expired = segments[0]["expires_ms"] + SEGMENT_GRACE_MS + 1
        after = account(sale, remaining, segments, issued, expired)
        assert (after["remaining"], after["issued"], after["lost"]) == (14, 2, 4)
        assert after["lost_by_region"] == {"hz": 4} and after["balanced"]
        # A new holder (the restarted process) issues from a new segment.
        await runtime.tokens.issue(a, sale_id)
        _sale, remaining, segments, _count = await runtime.sales.quota(sale_id)
        assert remaining == 8 and [s["segment_id"] for s in segments] == [1, 2]

    in_hz(tmp_path, scenario)


def test_an_order_of_the_sale_sku_needs_a_token_of_its_buyer_and_uses_it_once(
    tmp_path: Path,
) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        sale_id = await new_sale(runtime, stock=2, tokens=10, per_buyer=2, segment_size=5)
        a, b = hz_buyers(runtime, 2)
        token_a = (await runtime.tokens.issue(a, sale_id))["token"]
        orders = runtime.orders
        assert await refused(orders.create(a, [(SKU, 1)], None)) == "sale_token_required"
        assert await refused(orders.create(b, [(SKU, 1)], None, Offer(token_a))) == (
            "sale_token_required"  # another buyer's token
        )
        with pytest.raises(InvalidRequest, match="one unit"):
            await orders.create(a, [(SKU, 2)], None, Offer(token_a))
        levels = await runtime.inventory.levels(SKU)
        assert (levels["available"], levels["reserved"]) == (2, 0)  # none reached stock
        # An order whose write fails after the reserve leaves the token unused.
        orders.write_deadline_s = -1.0
        with pytest.raises(OrderTimedOut):
            await orders.create(a, [(SKU, 1)], None, Offer(token_a))
        orders.write_deadline_s = 30.0
        assert (await runtime.tokens.tokens_of(a, sale_id))[0]["status"] == "issued"
        created = (await orders.create(a, [(SKU, 1)], "k1", Offer(token_a))).order
        assert (created["sale_id"], created["sale_token"]) == (sale_id, token_a)
        assert created["total_cents"] == 100
        with pytest.raises(SaleTokenUsed):
            await orders.create(a, [(SKU, 1)], "k2", Offer(token_a))
        # The same idempotency key is the same order, not a second use.
        again = await orders.create(a, [(SKU, 1)], "k1", Offer(token_a))
        assert again.replayed and again.order["order_id"] == created["order_id"]
        # A closed order does not give its token back; the unit goes back to stock.
        await orders.transition(a, int(created["order_id"]), "close")
        (token,) = await runtime.tokens.tokens_of(a, sale_id)
        assert (token["status"], token["order_id"]) == ("used", created["order_id"])
        assert await runtime.inventory.levels(SKU) == {
            "sku": SKU,
            "available": 2,
            "reserved": 0,
            "sold": 0,
        }
        # A token cannot be spent on an order without the sale's SKU.
        second = (await runtime.tokens.issue(a, sale_id))["token"]
        await runtime.catalog_service.put("PLAIN", "plain", 10)
        await runtime.inventory.set_stock("PLAIN", 5)
        with pytest.raises(InvalidRequest, match="sale's SKU"):
            await orders.create(a, [("PLAIN", 1)], None, Offer(second))

    in_hz(tmp_path, scenario)


def test_the_center_refuses_a_sale_sku_to_an_order_that_names_no_sale(tmp_path: Path) -> None:
    """A region that has not learned of a sale yet (its copy of the center cell lags)
    sends the order on without a token: the center, which has the sale, refuses it in the
    reservation's transaction, and no unit moves."""

    async def scenario(runtime: RegionRuntime) -> None:
        sale_id = await new_sale(runtime, stock=3, tokens=10, per_buyer=1, segment_size=5)
        (a,) = hz_buyers(runtime, 1)
        runtime.sale_book.remove(sale_id)  # as a lagging region would be
        with pytest.raises(SaleTokenRequired) as caught:
            await runtime.orders.create(a, [(SKU, 1)], None)
        assert caught.value.details["sale_id"] == sale_id
        levels = await runtime.inventory.levels(SKU)
        assert (levels["available"], levels["reserved"]) == (3, 0)
        # It learns the sale on demand (a token request) and from the copy.
        await runtime.sale_book.load()
        assert runtime.sale_book.of_sku(SKU) is not None

    in_hz(tmp_path, scenario)


def test_tokens_and_orders_only_within_the_sale(tmp_path: Path) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        later = await new_sale(
            runtime, stock=3, tokens=10, per_buyer=1, segment_size=5, start_in_ms=60_000
        )
        (a,) = hz_buyers(runtime, 1)
        with pytest.raises(SaleClosed) as caught:
            await runtime.tokens.issue(a, later)
        assert caught.value.details["start_ms"] > now_ms()
        # The SKU is the sale's from its creation: no order without a token before it.
        assert await refused(runtime.orders.create(a, [(SKU, 1)], None)) == "sale_token_required"
        with pytest.raises(SaleNotFound):
            await runtime.tokens.issue(a, "0" * 12)
        with pytest.raises(SaleWindowInvalid):
            await runtime.sales.create("OTHER", 1, 1, 1, now_ms() - 10_000, now_ms() - 5_000)
        with pytest.raises(UnitradeError, match="one sale of a SKU at a time"):
            await runtime.sales.create(SKU, 1, 1, 1, now_ms(), now_ms() + 1_000)

    in_hz(tmp_path, scenario)


def test_a_token_used_after_the_sale_ended_is_refused(tmp_path: Path) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        sale_id = await new_sale(
            runtime, stock=3, tokens=10, per_buyer=1, segment_size=5, length_ms=1_500
        )
        (a,) = hz_buyers(runtime, 1)
        token = (await runtime.tokens.issue(a, sale_id))["token"]
        sale = runtime.sale_book.known(sale_id)
        assert sale is not None
        await asyncio.sleep(max(0.0, (sale.end_ms - now_ms()) / 1000) + 0.01)  # until it ends
        assert now_ms() >= sale.end_ms
        with pytest.raises(SaleClosed):
            await runtime.orders.create(a, [(SKU, 1)], None, Offer(token))
        assert await runtime.inventory.levels(SKU) == {
            "sku": SKU,
            "available": 3,
            "reserved": 0,
            "sold": 0,
        }
        # The ended sale's segment is closed and given back by the background round.
        runtime.tokens.close_due()
        assert await runtime.tokens.give_back_due() == 1
        shown = await sale_account(runtime.sales, runtime.inventory, runtime.copies, sale_id)
        assert shown["remaining"] == 9 and shown["balanced"]

    in_hz(tmp_path, scenario)


def test_sale_definitions_refuse_what_cannot_be(tmp_path: Path) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        start = now_ms()
        with pytest.raises(SaleWindowInvalid):
            await runtime.sales.create(SKU, 1, 1, 1, start, start)
        with pytest.raises(SaleWindowInvalid):
            await runtime.sales.create(SKU, 1, 1, 1, start, start + 31 * 86_400_000)
        with pytest.raises(InvalidRequest):
            await runtime.sales.create(SKU, 1, 0, 1, start, start + 1_000)

    in_hz(tmp_path, scenario)
