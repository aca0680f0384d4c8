"""The public API of a running three-region cluster, driven from outside over HTTP."""

from __future__ import annotations

import itertools
import uuid

import pytest

from tests.support import Api
from unitrade.topology.order_id import decode_order_id

pytestmark = pytest.mark.cluster
_buyers = itertools.count(10_000)
_used: set[int] = set()


def new_sku() -> str:
    return f"SKU-{uuid.uuid4().hex[:10]}"


def new_buyer(api: Api, region: str) -> int:
    """A buyer homed in `region` that no other test uses."""
    buyer = api.buyer_in(region, next(_buyers) * 7)
    while buyer in _used:
        buyer = api.buyer_in(region, buyer + 1)
    _used.add(buyer)
    return buyer


def test_health_and_openapi_at_every_region(api: Api) -> None:
    for region in api.config.region_names:
        health = api.http.get(api.url(region, "/healthz"))
        assert health.status_code == 200
        assert health.json()["region"] == region
        assert health.headers["x-unitrade-served-by"] == region
        spec = api.http.get(api.url(region, "/openapi.json")).json()
        assert "/v1/orders" in spec["paths"]
        assert "/v1/orders/{order_id}/pay" in spec["paths"]
        assert not any(path.startswith("/internal") for path in spec["paths"])


@pytest.mark.parametrize("gateway", ["hz", "sh", "bj"])
@pytest.mark.parametrize("home", ["hz", "sh", "bj"])
def test_an_order_through_any_gateway_lands_in_the_buyers_cell(
    api: Api, gateway: str, home: str
) -> None:
    sku = new_sku()
    api.put_product(sku, stock=10, price_cents=199)
    buyer = new_buyer(api, home)
    response = api.order(gateway, buyer, [(sku, 3)])
    assert response.status_code == 201, response.text
    order = response.json()
    assert order["status"] == "created"
    assert order["total_cents"] == 3 * 199
    assert order["region"] == home
    assert response.headers["x-unitrade-region"] == home
    assert response.headers["x-unitrade-served-by"] == home
    assert ("x-unitrade-forwarded-by" in response.headers) == (gateway != home)
    cell = api.rule.bucket_cells[buyer % api.rule.bucket_count]
    assert order["cell"] == cell == decode_order_id(int(order["order_id"])).cell
    assert isinstance(order["order_id"], str) and int(order["order_id"]) < 2**63
    # Readable from every region (forwarded to the owner), and counted at the center.
    for region in api.config.region_names:
        read = api.call(region, "GET", f"/v1/orders/{order['order_id']}", buyer)
        assert read.status_code == 200
        assert read.json() == order
        assert read.headers["x-unitrade-region"] == home
    assert api.levels(sku) == {"sku": sku, "available": 7, "reserved": 3, "sold": 0}


def test_pay_close_refund_state_machine_and_stock(api: Api) -> None:
    sku = new_sku()
    api.put_product(sku, stock=10, price_cents=500)
    buyer = new_buyer(api, "sh")
    order = api.order("bj", buyer, [(sku, 2)]).json()
    oid = order["order_id"]
    wrong = api.call(
        "hz", "POST", f"/v1/orders/{oid}/pay", buyer, {"payment_id": "p-1", "amount_cents": 999}
    )
    assert wrong.status_code == 409 and wrong.json()["error"] == "amount_mismatch"
    pay = {"payment_id": f"p-{oid}", "amount_cents": 1000}
    paid = api.call("hz", "POST", f"/v1/orders/{oid}/pay", buyer, pay)
    assert paid.status_code == 200 and paid.json()["status"] == "paid"
    again = api.call("sh", "POST", f"/v1/orders/{oid}/pay", buyer, pay)
    assert again.status_code == 200 and again.json() == paid.json()  # idempotent
    other = api.call(
        "sh",
        "POST",
        f"/v1/orders/{oid}/pay",
        buyer,
        {"payment_id": "another", "amount_cents": 1000},
    )
    assert other.status_code == 409 and other.json()["error"] == "illegal_transition"
    assert api.levels(sku) == {"sku": sku, "available": 8, "reserved": 0, "sold": 2}
    close = api.call("sh", "POST", f"/v1/orders/{oid}/close", buyer)
    assert close.status_code == 409 and close.json()["error"] == "illegal_transition"
    refund = api.call("bj", "POST", f"/v1/orders/{oid}/refund", buyer)
    assert refund.status_code == 200 and refund.json()["status"] == "refunded"
    assert api.levels(sku) == {"sku": sku, "available": 10, "reserved": 0, "sold": 0}
    late = api.call("sh", "POST", f"/v1/orders/{oid}/pay", buyer, pay)
    assert late.status_code == 200 and late.json()["status"] == "refunded"  # not charged again

    second = api.order("sh", buyer, [(sku, 4)]).json()
    closed = api.call("hz", "POST", f"/v1/orders/{second['order_id']}/close", buyer)
    assert closed.status_code == 200 and closed.json()["status"] == "closed"
    assert api.levels(sku)["available"] == 10
    refund_closed = api.call("hz", "POST", f"/v1/orders/{second['order_id']}/refund", buyer)
    assert refund_closed.status_code == 409
    pay_closed = api.call(
        "hz",
        "POST",
        f"/v1/orders/{second['order_id']}/pay",
        buyer,
        {"payment_id": "late", "amount_cents": second["total_cents"]},
    )
    assert pay_closed.status_code == 409


def test_a_payment_id_pays_one_order_only(api: Api) -> None:
    sku = new_sku()
    api.put_product(sku, stock=10, price_cents=100)
    buyer = new_buyer(api, "hz")
    first = api.order("hz", buyer, [(sku, 1)]).json()
    second = api.order("hz", buyer, [(sku, 1)]).json()
    body = {"payment_id": f"shared-{sku}", "amount_cents": 100}
    assert (
        api.call("hz", "POST", f"/v1/orders/{first['order_id']}/pay", buyer, body).status_code
        == 200
    )
    reused = api.call("hz", "POST", f"/v1/orders/{second['order_id']}/pay", buyer, body)
    assert reused.status_code == 409 and reused.json()["error"] == "conflict"


def test_concurrent_pays_of_one_order_charge_once(api: Api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sku = new_sku()
    api.put_product(sku, stock=5, price_cents=300)
    buyer = new_buyer(api, "bj")
    oid = api.order("bj", buyer, [(sku, 1)]).json()["order_id"]
    regions = ["hz", "sh", "bj"] * 4

    def pay(i: int) -> int:
        body = {"payment_id": f"race-{oid}-{i}", "amount_cents": 300}
        return api.call(regions[i], "POST", f"/v1/orders/{oid}/pay", buyer, body).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(pay, range(12)))
    assert statuses.count(200) == 1
    assert statuses.count(409) == 11
    assert api.levels(sku)["sold"] == 1


def test_idempotency_key_returns_the_same_order(api: Api) -> None:
    sku = new_sku()
    api.put_product(sku, stock=10)
    buyer = new_buyer(api, "sh")
    key = f"k-{sku}"
    first = api.order("hz", buyer, [(sku, 2)], idempotency_key=key)
    second = api.order("bj", buyer, [(sku, 2)], idempotency_key=key)
    assert first.status_code == second.status_code == 201
    assert second.json()["order_id"] == first.json()["order_id"]
    assert second.headers.get("idempotent-replayed") == "true"
    assert api.levels(sku)["reserved"] == 2  # reserved once
    changed = api.order("sh", buyer, [(sku, 3)], idempotency_key=key)
    assert changed.status_code == 409 and changed.json()["error"] == "conflict"
    other_buyer = new_buyer(api, "sh")
    theirs = api.order("sh", other_buyer, [(sku, 2)], idempotency_key=key)
    assert theirs.status_code == 201 and theirs.json()["order_id"] != first.json()["order_id"]


def test_concurrent_requests_with_one_idempotency_key_make_one_order(api: Api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sku = new_sku()
    api.put_product(sku, stock=100)
    buyer = new_buyer(api, "hz")
    regions = ["hz", "sh", "bj"] * 3

    def create(i: int) -> str:
        response = api.order(regions[i], buyer, [(sku, 1)], idempotency_key="same")
        assert response.status_code == 201, response.text
        return str(response.json()["order_id"])

    with ThreadPoolExecutor(9) as pool:
        ids = set(pool.map(create, range(9)))
    assert len(ids) == 1
    assert api.levels(sku) == {"sku": sku, "available": 99, "reserved": 1, "sold": 0}


def test_list_orders_newest_first_with_cursor(api: Api) -> None:
    sku = new_sku()
    api.put_product(sku, stock=100)
    buyer = new_buyer(api, "bj")
    created = [api.order("hz", buyer, [(sku, 1)]).json()["order_id"] for _ in range(7)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        path = "/v1/orders?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = api.call("sh", "GET", path, buyer)
        assert page.status_code == 200, page.text
        seen += [o["order_id"] for o in page.json()["orders"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))


def test_a_buyer_never_sees_another_buyers_order_or_cart(api: Api) -> None:
    sku = new_sku()
    api.put_product(sku, stock=10)
    alice, bob = new_buyer(api, "hz"), new_buyer(api, "hz")
    order = api.order("hz", alice, [(sku, 1)]).json()
    oid = order["order_id"]
    for method, path, body in [
        ("GET", f"/v1/orders/{oid}", None),
        ("POST", f"/v1/orders/{oid}/pay", {"payment_id": "bob", "amount_cents": 250}),
        ("POST", f"/v1/orders/{oid}/close", None),
    ]:
        response = api.call("sh", method, path, bob, body)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "not_found"
    assert api.call("hz", "GET", "/v1/orders", bob).json()["orders"] == []
    api.call("hz", "PUT", f"/v1/cart/items/{sku}", alice, {"qty": 2})
    assert api.call("hz", "GET", "/v1/cart", bob).json()["items"] == []
    assert api.call("hz", "GET", f"/v1/orders/{oid}", alice).json()["status"] == "created"


def test_cart_and_checkout(api: Api) -> None:
    a, b = new_sku(), new_sku()
    api.put_product(a, stock=10, price_cents=100)
    api.put_product(b, stock=10, price_cents=250)
    buyer = new_buyer(api, "sh")
    assert api.call("hz", "PUT", f"/v1/cart/items/{a}", buyer, {"qty": 2}).status_code == 200
    assert api.call("bj", "PUT", f"/v1/cart/items/{b}", buyer, {"qty": 1}).status_code == 200
    cart = api.call("sh", "PUT", f"/v1/cart/items/{a}", buyer, {"qty": 3}).json()
    assert [(i["sku"], i["qty"]) for i in cart["items"]] == sorted([(a, 3), (b, 1)])
    assert cart["total_cents"] == 3 * 100 + 250
    removed = api.call("hz", "DELETE", f"/v1/cart/items/{b}", buyer)
    assert removed.status_code == 200 and len(removed.json()["items"]) == 1
    api.call("hz", "PUT", f"/v1/cart/items/{b}", buyer, {"qty": 2})
    checkout = api.call("bj", "POST", "/v1/cart/checkout", buyer, {"idempotency_key": "co"})
    assert checkout.status_code == 201, checkout.text
    order = checkout.json()
    assert sorted((i["sku"], i["qty"]) for i in order["items"]) == sorted([(a, 3), (b, 2)])
    assert order["total_cents"] == 800
    assert api.call("sh", "GET", "/v1/cart", buyer).json()["items"] == []
    replay = api.call("hz", "POST", "/v1/cart/checkout", buyer, {"idempotency_key": "co"})
    assert replay.status_code == 201 and replay.json()["order_id"] == order["order_id"]
    empty = api.call("hz", "POST", "/v1/cart/checkout", buyer)
    assert empty.status_code == 409 and empty.json()["error"] == "cart_empty"
    assert api.levels(a)["reserved"] == 3 and api.levels(b)["reserved"] == 2


def test_forwarded_orders_without_a_key_get_one_from_the_gateway(api: Api) -> None:
    sku = new_sku()
    api.put_product(sku, stock=10)
    buyer = new_buyer(api, "sh")

    def added() -> int:
        count: int = api.http.get(api.url("bj", "/healthz")).json()["lost_answers"]["keys_added"]
        return count

    before = added()
    order = api.order("bj", buyer, [(sku, 1)])
    assert order.status_code == 201 and order.headers["x-unitrade-forwarded-by"] == "bj"
    assert "idempotent-replayed" not in order.headers
    api.call("sh", "PUT", f"/v1/cart/items/{sku}", buyer, {"qty": 2})
    checkout = api.call("bj", "POST", "/v1/cart/checkout", buyer)  # no body at all
    assert checkout.status_code == 201, checkout.text
    assert [i["qty"] for i in checkout.json()["items"]] == [2]
    own_key = api.order("bj", buyer, [(sku, 1)], idempotency_key="mine")
    assert own_key.status_code == 201
    assert added() == before + 2  # the client's own key is kept, never replaced
    assert api.levels(sku) == {"sku": sku, "available": 6, "reserved": 4, "sold": 0}


def test_checkout_with_insufficient_stock_keeps_the_cart(api: Api) -> None:
    sku = new_sku()
    api.put_product(sku, stock=1)
    buyer = new_buyer(api, "bj")
    api.call("bj", "PUT", f"/v1/cart/items/{sku}", buyer, {"qty": 2})
    refused = api.call("hz", "POST", "/v1/cart/checkout", buyer)
    assert refused.status_code == 409 and refused.json()["error"] == "insufficient_stock"
    assert api.call("bj", "GET", "/v1/cart", buyer).json()["items"][0]["qty"] == 2
    assert api.call("bj", "GET", "/v1/orders", buyer).json()["orders"] == []


def test_catalog_admin_and_inventory(api: Api) -> None:
    sku = new_sku()
    for region in ("sh", "bj"):  # written at the global/center owner whichever region gets it
        put = api.call(
            region,
            "PUT",
            f"/v1/admin/products/{sku}",
            body={"title": "Tea", "price_cents": 1200, "stock": 4},
        )
        assert put.status_code == 200, put.text
        assert put.headers["x-unitrade-served-by"] == "hz"
    api.wait_product(sku, 1200)  # read from each region's own copy of the global cell
    buyer = new_buyer(api, "sh")
    for region in api.config.region_names:
        product = api.call(region, "GET", f"/v1/products/{sku}", buyer)
        assert product.status_code == 200
        assert (product.json()["title"], product.json()["price_cents"]) == ("Tea", 1200)
        assert product.headers["x-unitrade-region"] == "sh"
    listing = api.call("bj", "GET", "/v1/products?limit=500", buyer).json()
    assert sku in [p["sku"] for p in listing["products"]]
    api.order("sh", buyer, [(sku, 3)])
    below = api.call(
        "hz",
        "PUT",
        f"/v1/admin/products/{sku}",
        body={"title": "Tea", "price_cents": 1200, "stock": 2},
    )
    assert below.status_code == 409 and below.json()["error"] == "stock_below_committed"
    grown = api.call(
        "hz",
        "PUT",
        f"/v1/admin/products/{sku}",
        body={"title": "Tea", "price_cents": 1300, "stock": 10},
    )
    api.wait_product(sku, 1300)
    assert grown.json()["available"] == 7 and grown.json()["reserved"] == 3
    forbidden = api.call(
        "hz",
        "PUT",
        f"/v1/admin/products/{sku}",
        buyer,
        {"title": "x", "price_cents": 1, "stock": 1},
    )
    assert forbidden.status_code == 403
    assert api.call("hz", "GET", f"/v1/products/{new_sku()}", buyer).status_code == 404
    assert api.call("hz", "GET", f"/v1/inventory/{new_sku()}", buyer).status_code == 404


def test_concurrent_orders_for_one_sku_through_all_gateways_never_oversell(api: Api) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sku = new_sku()
    stock = 40
    api.put_product(sku, stock=stock)
    regions = ["hz", "sh", "bj"]
    attempts = [(regions[i % 3], new_buyer(api, regions[(i // 3) % 3])) for i in range(120)]

    def create(attempt: tuple[str, int]) -> int:
        gateway, buyer = attempt
        return api.order(gateway, buyer, [(sku, 1)]).status_code

    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(create, attempts))
    assert statuses.count(201) == stock
    assert statuses.count(409) == len(attempts) - stock
    assert api.levels(sku) == {"sku": sku, "available": 0, "reserved": stock, "sold": 0}


def test_a_replicated_price_change_invalidates_every_regions_catalog_cache(api: Api) -> None:
    import time

    from unitrade.services.catalog_cache import TTL_S_DEFAULT

    sku = new_sku()
    api.put_product(sku, stock=1_000, price_cents=100)
    buyers = {region: new_buyer(api, region) for region in ("hz", "sh", "bj")}
    price = 100
    # Only a round that ends inside the cache's lifetime proves invalidation (after it, the
    # entries could have expired): a round slowed past it by a loaded machine is run again.
    for _round in range(5):
        for region, buyer in buyers.items():  # every region's cache now holds `price`
            assert api.order(region, buyer, [(sku, 1)]).json()["total_cents"] == price
        changed = time.monotonic()
        price += 50
        api.put_product(sku, stock=1_000, price_cents=price)  # returns once every copy has it
        for region, buyer in buyers.items():
            assert api.order(region, buyer, [(sku, 1)]).json()["total_cents"] == price
        if time.monotonic() - changed < TTL_S_DEFAULT * 0.9:
            return
    raise AssertionError("no round finished inside the cache's lifetime; nothing was proved")


def test_replica_reads_are_served_by_the_region_called(api: Api) -> None:
    from tests.replication_support import wait_converged

    sku = new_sku()
    api.put_product(sku, stock=10)
    buyer = new_buyer(api, "sh")
    order = api.order("sh", buyer, [(sku, 1)]).json()
    wait_converged(api.config)
    for region in api.config.region_names:
        path = f"/v1/orders/{order['order_id']}?consistency=replica"
        read = api.call(region, "GET", path, buyer)
        assert read.status_code == 200, read.text
        assert read.json() == order
        assert read.headers["x-unitrade-served-by"] == region
        assert read.headers["x-unitrade-region"] == "sh"
        assert "x-unitrade-forwarded-by" not in read.headers
    other = api.call(
        "hz", "GET", f"/v1/orders/{order['order_id']}?consistency=replica", new_buyer(api, "sh")
    )
    assert other.status_code == 404  # another buyer's order, on a replica too
    bad = api.call("hz", "GET", f"/v1/orders/{order['order_id']}?consistency=eventual", buyer)
    assert bad.status_code == 422
