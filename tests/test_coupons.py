"""Coupons (issue 12): claimed once per buyer and at most N in all, held by one order at a
time with its stock reservation, used on payment, given back when the order is closed or
refunded, or when the order was never written; strongly consistent in the center cell.
In the center's process first, then claimed and used concurrently through every region."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.support import Api, write_topology
from tests.test_sales import hz_buyers, in_hz, refused
from tests.test_switchover import unitrade as unitrade_cli
from unitrade.cluster import LocalCluster
from unitrade.errors import (
    Conflict,
    CouponNotApplicable,
    CouponNotFound,
    CouponSoldOut,
    CouponUsed,
    InvalidRequest,
    OrderTimedOut,
)
from unitrade.region import RegionRuntime
from unitrade.services.coupons import Discount, parse_discount
from unitrade.services.inventory import Terms
from unitrade.services.orders import Offer
from unitrade.storage.schema import order_lines

PLAIN = "MUG"  # 1,000 cents


async def shop(runtime: RegionRuntime) -> None:
    await runtime.catalog_service.put(PLAIN, "a mug", 1_000)
    await runtime.inventory.set_stock(PLAIN, 100)


def test_discounts_are_cents_or_a_percent_never_more_than_the_order() -> None:
    assert parse_discount("500") == Discount("cents", 500)
    assert parse_discount("15%") == Discount("percent", 15)
    assert Discount("cents", 500).off(300) == 300
    assert Discount("percent", 15).off(999) == 149  # rounded down
    assert Discount("percent", 100).off(999) == 999
    for bad in ("0", "101%", "-5", "5.5", "ten", "0%"):
        with pytest.raises(InvalidRequest):
            parse_discount(bad)


def test_a_coupon_is_claimed_once_per_buyer_and_at_most_count_times(tmp_path: Path) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        coupons = runtime.coupons
        created, new = await coupons.create("TWO", 2, Discount("cents", 100), 0, 3600)
        assert new and created["count"] == 2
        again, new = await coupons.create("TWO", 2, Discount("cents", 100), 0, 7200)
        assert not new and again["end_ms"] == created["end_ms"]
        assert await refused(coupons.create("TWO", 3, Discount("cents", 100), 0, 3600)) == (
            "conflict"
        )
        a, b, c = hz_buyers(runtime, 3)
        first, new = await coupons.claim("TWO", a)
        assert new and first["status"] == "claimed"
        repeat, new = await coupons.claim("TWO", a)
        assert not new and repeat == first
        await coupons.claim("TWO", b)
        with pytest.raises(CouponSoldOut):
            await coupons.claim("TWO", c)
        with pytest.raises(CouponNotFound):
            await coupons.claim("NOPE", c)
        shown = await coupons.show("TWO", a)
        assert shown["claimed"] == 2 and shown["claims"] == {"claimed": 2, "held": 0, "used": 0}
        assert shown["mine"]["buyer_id"] == a

    in_hz(tmp_path, scenario)


def test_a_claim_serves_one_order_at_a_time_and_comes_back_on_close_and_refund(
    tmp_path: Path, region_storage: str | None
) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        await shop(runtime)
        coupons, orders = runtime.coupons, runtime.orders
        await coupons.create("OFF300", 10, Discount("cents", 300), 2_000, 3600)
        await coupons.create("PCT", 10, Discount("percent", 15), 0, 3600)
        a, b = hz_buyers(runtime, 2)
        offer = Offer(coupon="OFF300")
        assert await refused(orders.create(a, [(PLAIN, 2)], None, offer)) == "coupon_not_claimed"
        await coupons.claim("OFF300", a)
        with pytest.raises(CouponNotApplicable):  # 1,000 cents, below the 2,000 minimum
            await orders.create(a, [(PLAIN, 1)], None, offer)
        assert (await runtime.inventory.levels(PLAIN))["available"] == 100  # all or nothing
        first = (await orders.create(a, [(PLAIN, 2)], None, offer)).order
        assert (first["subtotal_cents"], first["discount_cents"], first["total_cents"]) == (
            2_000,
            300,
            1_700,
        )
        assert first["coupon"] == "OFF300"
        with pytest.raises(CouponUsed) as held:
            await orders.create(a, [(PLAIN, 3)], None, offer)
        assert held.value.details["order_id"] == first["order_id"]
        assert (await runtime.inventory.levels(PLAIN))["reserved"] == 2
        # Closed: the claim serves the next order.
        await orders.transition(a, int(first["order_id"]), "close")
        second = (await orders.create(a, [(PLAIN, 3)], None, offer)).order
        assert second["total_cents"] == 2_700
        shown = await coupons.show("OFF300", a)
        assert shown["mine"]["status"] == "held" and shown["mine"]["order_id"] == second["order_id"]
        # Paid (the amount is the discounted total): used.
        paid = await orders.pay(a, int(second["order_id"]), "pay-2", 2_700)
        assert paid["status"] == "paid"
        assert (await coupons.show("OFF300", a))["mine"]["status"] == "used"
        with pytest.raises(CouponUsed):
            await orders.create(a, [(PLAIN, 2)], None, offer)
        # Refunded: claimed again.
        await orders.transition(a, int(second["order_id"]), "refund")
        assert (await coupons.show("OFF300", a))["mine"]["status"] == "claimed"
        # A percent off, on another buyer's order.
        await coupons.claim("PCT", b)
        pct = (await orders.create(b, [(PLAIN, 1)], None, Offer(coupon="PCT"))).order
        assert (pct["discount_cents"], pct["total_cents"]) == (150, 850)
        levels = await runtime.inventory.levels(PLAIN)
        assert levels == {"sku": PLAIN, "available": 99, "reserved": 1, "sold": 0}

    in_hz(tmp_path, scenario, region_storage)


def test_an_order_never_written_gives_its_coupon_back(tmp_path: Path) -> None:
    async def scenario(runtime: RegionRuntime) -> None:
        await shop(runtime)
        await runtime.coupons.create("ONCE", 5, Discount("cents", 100), 0, 3600)
        (a,) = hz_buyers(runtime, 1)
        await runtime.coupons.claim("ONCE", a)
        runtime.orders.write_deadline_s = -1.0
        with pytest.raises(OrderTimedOut):
            await runtime.orders.create(a, [(PLAIN, 1)], None, Offer(coupon="ONCE"))
        runtime.orders.write_deadline_s = 30.0
        shown = await runtime.coupons.show("ONCE", a)
        assert shown["mine"]["status"] == "claimed" and shown["mine"]["order_id"] is None
        assert (await runtime.inventory.levels(PLAIN))["available"] == 100
        done = await runtime.orders.create(a, [(PLAIN, 1)], None, Offer(coupon="ONCE"))
        assert done.order["total_cents"] == 900

    in_hz(tmp_path, scenario)


def test_an_abandoned_reservation_gives_its_coupon_back(tmp_path: Path) -> None:
    """A region that died between the reservation (which held the coupon) and the order's
    write: the release of abandoned reservations gives the claim back with the stock."""

    async def scenario(runtime: RegionRuntime) -> None:
        await shop(runtime)
        await runtime.coupons.create("LOST", 5, Discount("percent", 10), 0, 3600)
        (a,) = hz_buyers(runtime, 1)
        await runtime.coupons.claim("LOST", a)
        cell = runtime.fence.rule.cells[1].id
        order_id = await runtime.allocators[cell].next_id()
        terms = Terms(a, None, "LOST", 1_000)
        held = await runtime.center.reserve(order_id, cell, [(PLAIN, 1)], None, terms)
        assert held["discount_cents"] == 100
        again = await runtime.center.reserve(order_id, cell, [(PLAIN, 1)], None, terms)
        assert again == held  # idempotent by order ID, with its discount
        assert (await runtime.coupons.show("LOST", a))["mine"]["status"] == "held"
        assert await runtime.orders.release_abandoned(runtime.copies[cell], grace_s=0) == 1
        assert (await runtime.coupons.show("LOST", a))["mine"]["status"] == "claimed"
        assert (await runtime.inventory.levels(PLAIN))["available"] == 100

    in_hz(tmp_path, scenario)


def test_a_reconciled_order_takes_its_coupon_claim_again(tmp_path: Path) -> None:
    """A lost region's order comes back through reconcile after its reservation was
    released as abandoned (the claim came back with the stock): written again with its
    discount, it holds the claim again, so the buyer cannot use the coupon twice; if the
    buyer used it on another order meanwhile, the re-creation is refused as a conflict and
    moves no stock."""

    async def scenario(runtime: RegionRuntime) -> None:
        await shop(runtime)
        coupons, orders = runtime.coupons, runtime.orders
        await coupons.create("AGAIN", 5, Discount("cents", 200), 0, 3600)
        (a,) = hz_buyers(runtime, 1)
        await coupons.claim("AGAIN", a)
        offer = Offer(coupon="AGAIN")
        lost = (await orders.create(a, [(PLAIN, 2)], None, offer)).order
        order_id = int(lost["order_id"])
        row = await orders.find(order_id)
        assert row is not None
        store = runtime.copies[int(lost["cell"])]
        wanted = select(order_lines).where(order_lines.c.order_id == order_id)
        lines = await store.read(lambda conn: [r._mapping for r in conn.execute(wanted)])
        # What the abandoned-reservation sweep of the new owner did to the lost order.
        await runtime.inventory.step(order_id, "release")
        assert (await coupons.show("AGAIN", a))["mine"]["status"] == "claimed"

        await orders.recreate(row, lines, None, None)
        mine = (await coupons.show("AGAIN", a))["mine"]
        assert (mine["status"], mine["order_id"]) == ("held", str(order_id))
        assert (await runtime.inventory.levels(PLAIN))["reserved"] == 2
        with pytest.raises(CouponUsed):
            await orders.create(a, [(PLAIN, 1)], None, offer)

        # The buyer used the coupon on another order before the reconcile came.
        await runtime.inventory.step(order_id, "release")
        other = (await orders.create(a, [(PLAIN, 1)], None, offer)).order
        with pytest.raises(Conflict) as refused_again:
            await orders.recreate(row, lines, None, None)
        assert f"by order {other['order_id']}" in refused_again.value.message
        mine = (await coupons.show("AGAIN", a))["mine"]
        assert (mine["status"], mine["order_id"]) == ("held", other["order_id"])
        assert (await runtime.inventory.levels(PLAIN))["reserved"] == 1  # the other's only

    in_hz(tmp_path, scenario)


# -- on a cluster: from every region at once ----------------------------------------------


@pytest.mark.cluster
def test_coupons_claimed_and_used_concurrently_from_all_regions(tmp_path: Path) -> None:
    """40 buyers homed in all three regions claim a coupon of 15 through random gateways
    at once: exactly 15 claims, never more. Each claimer then places two orders with it
    at once through two different gateways: one holds the coupon, the other is refused."""
    config, path = write_topology(tmp_path)
    regions = config.region_names
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        with Api(config) as api:
            api.put_product(PLAIN, stock=10_000, price_cents=1_000)
            made = unitrade_cli(path, "coupon", "create", "--code", "RUSH", "--count", "15")
            assert made.returncode == 2 and "--discount" in made.stderr  # required
            made = unitrade_cli(
                path, "coupon", "create", "--code", "RUSH", "--count", "15", "--discount", "200"
            )
            assert made.returncode == 0, made.stdout + made.stderr
            assert "coupon RUSH: 200 cents off, 15 claims" in made.stdout
            buyers = [api.buyer_in(regions[i % 3], 7_000 + i * 1_000) for i in range(40)]
            claims: dict[int, Any] = {}

            # Each thread its own client, closed when done: one httpx client shared by the
            # rush's threads once saw a connection closed under another thread's read (the
            # test's own socket: ReadError, Bad file descriptor).
            def claim(i: int, buyer: int) -> None:
                with Api(config) as own:
                    claims[buyer] = own.call(
                        regions[(i + 1) % 3], "POST", "/v1/coupons/RUSH/claim", buyer
                    )

            run_all([lambda i=i, b=b: claim(i, b) for i, b in enumerate(buyers)])
            outcomes = Counter(
                r.json().get("error", "claimed") if r.status_code != 200 else "claimed"
                for r in claims.values()
            )
            assert outcomes == {"claimed": 15, "coupon_sold_out": 25}, outcomes
            assert {r.headers["x-unitrade-served-by"] for r in claims.values()} == {"hz"}
            winners = [b for b, r in claims.items() if r.status_code == 200]
            placed: dict[tuple[int, str], Any] = {}

            def order(buyer: int, gateway: str) -> None:
                body = {"items": [{"sku": PLAIN, "qty": 1}], "coupon": "RUSH"}
                with Api(config) as own:
                    placed[(buyer, gateway)] = own.call(gateway, "POST", "/v1/orders", buyer, body)

            run_all([lambda b=b, g=g: order(b, g) for b in winners for g in ("sh", "bj")])
            for buyer in winners:
                answers = [placed[(buyer, g)] for g in ("sh", "bj")]
                statuses = sorted(r.status_code for r in answers)
                assert statuses == [201, 409], [r.text for r in answers]
                refusal = next(r for r in answers if r.status_code == 409)
                assert refusal.json()["error"] == "coupon_used"
                ordered = next(r for r in answers if r.status_code == 201).json()
                assert ordered["total_cents"] == 800 and ordered["coupon"] == "RUSH"
            shown = api.call("bj", "GET", "/v1/admin/coupons/RUSH").json()
            assert shown["claimed"] == 15
            assert shown["claims"] == {"claimed": 0, "held": 15, "used": 0}
            assert api.levels(PLAIN)["reserved"] == 15
            shown_cli = unitrade_cli(path, "coupon", "show", "RUSH")
            assert shown_cli.returncode == 0, shown_cli.stdout + shown_cli.stderr
            assert "15 of 15 claimed (free 0, held by an order 15, used 0)" in shown_cli.stdout
            listed = unitrade_cli(path, "coupon", "list")
            assert listed.returncode == 0 and "RUSH" in listed.stdout
            missing = unitrade_cli(path, "coupon", "show", "NOPE")
            assert missing.returncode == 1 and "coupon_not_found" in missing.stderr


def run_all(calls: list[Any]) -> None:
    """Run the calls at once, each in a thread of its own, and wait for all."""
    barrier = threading.Barrier(len(calls))
    failures: list[BaseException] = []

    def one(call: Any) -> None:
        barrier.wait(timeout=30)
        try:
            call()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)
