"""Flash sales (issue 12): tokens issued from segments of the sale's quota in the buyer's
region, at most K per buyer and M in all, every token accounted for; only a token holder
orders the sale's SKU, once per token, within the sale; its stock is never oversold. In
one region's process first (the center's), then on a three-region cluster."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.replication_support import wait_converged
from tests.support import Api, in_process_region, write_topology
from tests.test_switchover import unitrade as unitrade_cli
from unitrade.cluster import LocalCluster
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


def in_hz(
    tmp_path: Path,
    scenario: Callable[[RegionRuntime], Awaitable[T]],
    storage: str | None = None,
) -> T:
    """Run `scenario` against hz in this process (the center region, with a lease
    authority of its own: ports and a secret of this test only), on SQLite or `storage`."""

    async def run() -> T:
        config, _path = write_topology(tmp_path, storage)
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
        assert {t["token"] for t in mine} == {t["token"] for t in issued[:2]}
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
    tmp_path: Path, region_storage: str | None
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

    in_hz(tmp_path, scenario, region_storage)


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


# -- on a cluster -------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # token | order | pay
    buyer: int
    gateway: str
    started: float  # monotonic
    ended: float
    status: int
    error: str | None
    body: dict[str, Any]


RETRIES_MAX = 40
RETRY_PAUSE_S = 0.25


class SaleShoppers:
    """Buyers who each ask for a sale token and order the sale's SKU with every token they
    get, then pay, through random gateways, from `threads` threads; every answer is
    recorded."""

    def __init__(
        self, api: Api, sale_id: str, buyers: list[int], tokens_each: int, threads: int
    ) -> None:
        self.api = api
        self.sale_id = sale_id
        self.queue = list(buyers)
        self.tokens_each = tokens_each
        self.threads = threads
        self.outcomes: list[Outcome] = []
        self.inflight = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.workers: list[threading.Thread] = []

    def call(self, kind: str, buyer: int, method: str, path: str, body: Any = None) -> Outcome:
        gateway = random.choice(self.api.config.region_names)
        with self.lock:
            self.inflight += 1
        started = time.monotonic()
        try:
            answer = self.api.call(gateway, method, path, buyer, body)
            status, got = answer.status_code, answer.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, got = 0, {"error": type(exc).__name__}
        finally:
            with self.lock:
                self.inflight -= 1
        outcome = Outcome(
            kind,
            buyer,
            gateway,
            started,
            time.monotonic(),
            status,
            got.get("error") if status >= 300 or status == 0 else None,
            got,
        )
        with self.lock:
            self.outcomes.append(outcome)
        return outcome

    def patiently(self, kind: str, buyer: int, method: str, path: str, body: Any = None) -> Outcome:
        """A call sent again, as a client would, while it is refused for now (503, or no
        answer: a region down, a breaker open), at most RETRIES_MAX times."""
        for _ in range(RETRIES_MAX):
            outcome = self.call(kind, buyer, method, path, body)
            if (outcome.status not in (0, 503)) or self.stopping.is_set():
                return outcome
            time.sleep(RETRY_PAUSE_S)
        return outcome

    def shop(self, buyer: int) -> None:
        for _ in range(self.tokens_each):
            if self.stopping.is_set():
                return
            path = f"/v1/sales/{self.sale_id}/tokens"
            token = self.patiently("token", buyer, "POST", path)
            if token.status != 201:
                continue
            body = {"items": [{"sku": SKU, "qty": 1}], "sale_token": token.body["token"]}
            # Not sent again: an order whose answer was lost may stand (and its token is
            # used), and a 503 order is simply not placed.
            order = self.call("order", buyer, "POST", "/v1/orders", body)
            if order.status != 201:
                continue
            pay = {"payment_id": f"p-{order.body['order_id']}", "amount_cents": 9_900}
            self.call("pay", buyer, "POST", f"/v1/orders/{order.body['order_id']}/pay", pay)

    def work(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                if not self.queue:
                    return
                buyer = self.queue.pop(0)
            self.shop(buyer)

    def start(self) -> None:
        self.workers = [threading.Thread(target=self.work) for _ in range(self.threads)]
        for worker in self.workers:
            worker.start()

    def join(self, timeout_s: float = 120.0) -> None:
        for worker in self.workers:
            worker.join(timeout=timeout_s)
        assert not any(w.is_alive() for w in self.workers), "shoppers still running"

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def of(self, kind: str, status: int | None = None) -> list[Outcome]:
        with self.lock:
            return [
                o
                for o in self.outcomes
                if o.kind == kind and (status is None or o.status == status)
            ]


def create_sale_via(
    api: Api, gateway: str, stock: int, tokens: int, per_buyer: int, seg: int
) -> str:
    start = now_ms()
    body = {
        "sku": SKU,
        "stock": stock,
        "tokens": tokens,
        "per_buyer": per_buyer,
        "start_ms": start,
        "end_ms": start + 600_000,
        "segment_size": seg,
    }
    created = api.call(gateway, "POST", "/v1/admin/sales", body=body)
    assert created.status_code == 201, created.text
    assert created.headers["x-unitrade-served-by"] == "hz"  # the center cell's owner
    return str(created.json()["sale_id"])


def settled_account(api: Api, sale_id: str, timeout_s: float = 40.0) -> dict[str, Any]:
    """The sale's accounting once no segment is held any more (each is given back within
    its TTL, or counted lost past its expiry) and the copies have caught up."""
    deadline = time.monotonic() + timeout_s
    while True:
        shown = api.call("sh", "GET", f"/v1/admin/sales/{sale_id}")
        assert shown.status_code == 200, shown.text
        body: dict[str, Any] = shown.json()
        if body["segments"]["open"] == 0 and body["balanced"]:
            return body
        assert time.monotonic() < deadline, f"segments still held: {body}"
        time.sleep(0.5)


def buyers_everywhere(api: Api, n: int, start: int) -> list[int]:
    regions = api.config.region_names
    return [api.buyer_in(regions[i % len(regions)], start + i * 977) for i in range(n)]


@pytest.mark.cluster
def test_a_sale_with_more_buyers_than_tokens_and_more_tokens_than_stock(tmp_path: Path) -> None:
    """90 buyers of all three regions, 2 tokens each wanted, through random gateways at
    once; 60 tokens, 20 units. No buyer gets more than 2 tokens, no more than 60 are
    issued, a token buys one order, exactly 20 units are sold, and every token is
    accounted for."""
    stock, tokens, per_buyer, seg = 20, 60, 2, 5
    config, path = write_topology(tmp_path)
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        with Api(config) as api:
            api.put_product(SKU, stock=0, price_cents=9_900)
            sale_id = create_sale_via(api, "bj", stock, tokens, per_buyer, seg)
            buyers = buyers_everywhere(api, 90, 11_000)
            shoppers = SaleShoppers(api, sale_id, buyers, per_buyer + 1, threads=12)
            shoppers.start()
            shoppers.join()

            issued = shoppers.of("token", 201)
            assert len(issued) <= tokens
            per_buyer_seen = Counter(o.buyer for o in issued)
            assert max(per_buyer_seen.values()) <= per_buyer
            refusals = Counter(o.error for o in shoppers.of("token") if o.status != 201)
            assert set(refusals) <= {"sale_limit_reached", "sale_sold_out"}, refusals
            assert refusals["sale_limit_reached"] > 0 and refusals["sale_sold_out"] > 0
            # Tokens come from the buyer's own region: the center is asked per segment.
            assert {o.body["sale_id"] for o in issued} == {sale_id}
            created = shoppers.of("order", 201)
            assert len(created) == stock
            assert len({o.body["sale_token"] for o in created}) == stock  # once per token
            others = Counter(o.error for o in shoppers.of("order") if o.status != 201)
            assert set(others) == {"insufficient_stock"}, others
            assert len(shoppers.of("pay", 200)) == stock
            levels = api.levels(SKU)
            assert levels == {"sku": SKU, "available": 0, "reserved": 0, "sold": stock}
            for buyer in per_buyer_seen:
                listed = api.call("hz", "GET", f"/v1/sales/{sale_id}/tokens", buyer)
                assert listed.status_code == 200, listed.text
                assert len(listed.json()["tokens"]) == per_buyer_seen[buyer]

            wait_converged(config)
            shown = settled_account(api, sale_id)
            # A token whose order found no stock left stays unused.
            assert (shown["issued"], shown["used"]) == (len(issued), stock)
            assert shown["lost"] == 0 and shown["issued_unknown_segments"] == 0
            assert shown["remaining"] + shown["issued"] == tokens
            listed = unitrade_cli(path, "sale", "show", sale_id)
            assert listed.returncode == 0, listed.stdout + listed.stderr
            assert "every token accounted for" in listed.stdout
            listed = unitrade_cli(path, "sale", "list")
            assert listed.returncode == 0 and sale_id in listed.stdout, listed.stdout
            again = unitrade_cli(
                path,
                "sale",
                "create",
                "--sku",
                SKU,
                "--stock",
                "1",
                "--tokens",
                "1",
                "--end",
                "+1h",
            )
            assert again.returncode == 1 and "conflict" in again.stderr, again.stderr


@pytest.mark.cluster
def test_the_center_killed_during_a_sale_sells_no_more_than_its_stock(tmp_path: Path) -> None:
    """kill -9 of the center region while buyers of every region take tokens and order:
    while it is down no order of the sale is acknowledged (its stock is at the center);
    when it is back, the sale goes on to sell out, and no more than its units are ever
    sold. The killed process's segment is all the sale loses of its tokens."""
    stock, tokens, per_buyer, seg = 30, 400, 1, 10
    config, path = write_topology(tmp_path)
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        with Api(config) as api:
            api.put_product(SKU, stock=0, price_cents=9_900)
            sale_id = create_sale_via(api, "sh", stock, tokens, per_buyer, seg)
            shoppers = SaleShoppers(
                api, sale_id, buyers_everywhere(api, 300, 21_000), per_buyer, threads=8
            )
            shoppers.start()
            deadline = time.monotonic() + 30
            while len(shoppers.of("order", 201)) < 8:
                assert time.monotonic() < deadline, "no orders before the kill"
                time.sleep(0.01)
            in_flight = shoppers.inflight
            cluster.kill_region("hz")
            killed = time.monotonic()
            assert in_flight > 0, "the kill did not strike mid-flight"
            time.sleep(2.0)
            back_at = time.monotonic()
            cluster.start(["hz"])
            back = time.monotonic()
            shoppers.join(timeout_s=180)

            # The fault struck mid-flight: requests failed while the center was down.
            failed = [o for o in shoppers.outcomes if killed <= o.started and o.ended <= back_at]
            assert any(o.status >= 500 or o.status == 0 for o in failed), "nothing failed"
            # No order that was started after the kill and answered before the restart
            # began was acknowledged: stock is reserved at the center.
            assert not [
                o for o in shoppers.of("order", 201) if o.started > killed and o.ended < back_at
            ]
            created = shoppers.of("order", 201)
            assert len(created) <= stock
            assert len({o.body["order_id"] for o in created}) == len(created)
            # After it returned the sale sold out.
            assert any(o.error == "insufficient_stock" for o in shoppers.of("order"))
            assert any(o.started > back for o in created), "no order after the center returned"
            levels = api.levels(SKU)
            assert levels["available"] + levels["reserved"] + levels["sold"] == stock
            assert levels["available"] >= 0 and levels["reserved"] + levels["sold"] <= stock
            assert levels["reserved"] + levels["sold"] >= len(created)

            wait_converged(config)
            shown = settled_account(api, sale_id)
            # Every token is issued, back at the center, or lost with the killed process:
            # at most its current segment and one closed but not yet given back.
            # A token request whose answer the kill cut off may have been issued.
            answered = len(shoppers.of("token", 201))
            unknown = [o for o in shoppers.of("token") if o.status in (0, 504)]
            assert answered <= shown["issued"] <= answered + len(unknown)
            assert set(shown["lost_by_region"]) <= {"hz"}
            assert shown["lost"] <= 2 * seg, shown
            assert shown["remaining"] + shown["issued"] + shown["lost"] == tokens


# -- reconcile: a lost region's sale rows --------------------------------------------------


def test_reconcile_keeps_a_used_token_with_its_order_and_reports_a_lost_centers_sale() -> None:
    from unitrade.control.reconcile import SALE_KINDS, Change, group, order_call
    from unitrade.storage.quarantine import CONFLICT, SUPERSEDED, describe
    from unitrade.topology.config import CellKind

    def change(cell: str, position: int, table: str, key: Any, image: Any) -> Change:
        return Change(cell, 5, position, table, "insert", key, image, 1_000 + position)

    order = {
        "order_id": 7,
        "buyer_id": 42,
        "status": "created",
        "version": 1,
        "payment_id": None,
        "idempotency_key": None,
    }
    used = {"token_id": "a" * 16, "sale_id": "b" * 12, "buyer_id": 42, "order_id": 7}
    unused = {"token_id": "c" * 16, "sale_id": "b" * 12, "buyer_id": 43, "order_id": None}
    segment = {"sale_id": "b" * 12, "segment_id": 3, "size": 100, "region": "sh"}
    changes = [
        change("u3", 1, "sale_tokens", {"token_id": "c" * 16}, {**unused, "status": "issued"}),
        change("u3", 2, "orders", {"order_id": 7}, order),
        change("u3", 3, "sale_tokens", {"token_id": "a" * 16}, {**used, "status": "used"}),
        change("center", 4, "sale_segments", {"sale_id": "b" * 12, "segment_id": 3}, segment),
        change("center", 5, "coupon_claims", {"code": "C", "buyer_id": 42}, {"status": "held"}),
    ]
    kinds = {"u3": CellKind.UNIT, "center": CellKind.CENTER}
    items = {item.name: item for item in group(changes, kinds)}
    assert set(items) == {"sale token " + "c" * 16, "order 7", "sale " + "b" * 12, "coupon C"}
    body = order_call(items["order 7"], dry_run=True)
    assert body is not None and body["token"]["token_id"] == "a" * 16
    state, note = SALE_KINDS["token"](items["sale token " + "c" * 16])
    assert state == SUPERSEDED and "not issued again" in note
    state, note = SALE_KINDS["sale"](items["sale " + "b" * 12])
    assert state == CONFLICT and "1 segments (100 tokens)" in note
    state, note = SALE_KINDS["coupon"](items["coupon C"])
    assert state == CONFLICT and "1 claims" in note
    assert describe("sale_tokens", "i", {"token_id": "a" * 16}, {**used, "status": "used"}) == (
        f"sale token {'a' * 16} of sale {'b' * 12} for buyer 42: used by order 7"
    )
