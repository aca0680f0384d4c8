"""`unitrade quarantine reconcile`: a lost region's divergent tail re-applied at the new
owners through the services, conflicts reported, on real storage and on a real cluster."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.replication_support import current_owners, region_positions, wait_converged
from tests.storage_support import make_store
from tests.support import Api, in_process_region, write_topology
from tests.switch_support import Control, buyers_of_cell
from tests.test_failover import failover
from tests.test_switchover import start_cluster, unitrade
from unitrade.cluster import LocalCluster
from unitrade.control.reconcile import Change, _chunks, cart_call, group, order_call
from unitrade.errors import Conflict, InsufficientStock, OrderTimedOut
from unitrade.gateway.quarantine_routes import LIST_PATH, MARK_PATH
from unitrade.gateway.reconcile_routes import ORDER_PATH, ORDER_STATUS_PATH, STOCK_PATH
from unitrade.region import RegionRuntime
from unitrade.replication.diff_cli import DiffError, cluster_regions
from unitrade.services.inventory import InventoryService
from unitrade.services.orders import _fingerprint
from unitrade.services.reconcile import Reconciler
from unitrade.storage.quarantine import CONFLICT, REAPPLIED, SUPERSEDED
from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.topology.order_id import encode_order_id, unix_to_id_time
from unitrade.topology.rule import route_buyer

CENTER = 1000
BUYER_IN_U1 = 100  # bucket 0 -> cell u1, owned by hz with the center and the global cell


def old_order_id(cell: int, sequence: int, age_s: int = 3_600) -> int:
    """An order ID a lost region allocated `age_s` ago: far past the reserve window."""
    return encode_order_id(cell, unix_to_id_time(time.time()) - age_s, sequence)


# -- the CLI's reduction of held entries to business objects ----------------------------------


def change(position: int, table: str, op: str, key: dict[str, Any], image: Any = None) -> Change:
    return Change("u3", 5, position, table, op, key, image, 1_000 + position)


def test_held_entries_reduce_to_business_objects_with_their_final_images() -> None:
    kinds = {"u3": CellKind.UNIT}
    order = {"order_id": 7, "status": "created", "version": 1, "payment_id": None}
    order["idempotency_key"] = None
    paid = {**order, "status": "paid", "version": 2, "payment_id": "p"}
    changes = [
        change(1, "id_sequences", "update", {"cell_id": 3}, {"cell_id": 3}),
        change(2, "orders", "insert", {"order_id": 7}, order),
        change(3, "order_lines", "insert", {"order_id": 7, "line_no": 1}, {"line_no": 1}),
        change(4, "carts", "update", {"buyer_id": 2, "sku": "A"}, {"qty": 1, "updated_ms": 9}),
        change(5, "orders", "update", {"order_id": 7}, paid),
        change(6, "payments", "insert", {"payment_id": "p"}, {"payment_id": "p", "order_id": 7}),
        change(7, "outbox", "insert", {"order_id": 8, "step": "commit"}, {"order_id": 8}),
        change(8, "carts", "delete", {"buyer_id": 2, "sku": "A"}),
    ]
    items = group(list(reversed(changes)), kinds)
    assert [(i.kind, i.name, len(i.changes)) for i in items] == [
        ("local", "order-ID allocation", 1),
        ("order", "order 7", 4),
        ("cart", "cart of buyer 2: A", 2),
        ("order", "order 8", 1),
    ]
    body = order_call(items[1], dry_run=False)
    assert body is not None
    assert (body["order"], body["base_version"], body["payment"]["payment_id"]) == (paid, 0, "p")
    cart = cart_call(items[2], 3, dry_run=False)
    assert (cart["qty"], cart["changed_ms"]) == (None, 1_008)  # removed: the delete's time
    assert order_call(items[3], dry_run=False) is None  # only its outbox: decided here
    assert items[3].state == SUPERSEDED
    marks = [{"note": "n" * 400, "position": p} for p in range(500)]
    chunks = _chunks(marks)
    assert [m for c in chunks for m in c] == marks and len(chunks) > 1
    assert all(len(orjson.dumps({"cell": 3, "marks": c})) < 64 * 1024 for c in chunks)


# -- the center: a reconciled order's reservation ---------------------------------------------


def run_inventory(storage_url: str, body: Callable[[InventoryService], Awaitable[None]]) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, CENTER)
        await store.open()
        try:
            await body(InventoryService(store, reserve_window_s=60))
        finally:
            await store.close()

    asyncio.run(scenario())


def test_reinstate_holds_what_the_order_needs_whatever_the_reservation_is_now(
    storage_url: str,
) -> None:
    async def body(inv: InventoryService) -> None:
        await inv.set_stock("A", 10)
        old = old_order_id(1, 1)
        with pytest.raises(OrderTimedOut):  # the normal reserve refuses an old order ID
            await inv.reserve(old, 1, [("A", 2)])
        # No reservation (retention deleted it, or the lost center had it): reserved now.
        dry = await inv.reinstate(old, 1, [("A", 2)], hold=True, dry_run=True)
        assert dry["status"] == "reserved"
        assert await inv.levels("A") == {"sku": "A", "available": 10, "reserved": 0, "sold": 0}
        for _ in range(2):  # idempotent by order ID
            assert (await inv.reinstate(old, 1, [("A", 2)], hold=True))["status"] == "reserved"
        assert await inv.levels("A") == {"sku": "A", "available": 8, "reserved": 2, "sold": 0}
        with pytest.raises(Conflict):
            await inv.reinstate(old, 1, [("A", 3)], hold=True)  # other lines, same order
        # Released as abandoned meanwhile: reserved again.
        await inv.step(old, "release")
        assert (await inv.reinstate(old, 1, [("A", 2)], hold=True))["status"] == "reserved"
        assert await inv.levels("A") == {"sku": "A", "available": 8, "reserved": 2, "sold": 0}
        # Committed: held already, nothing moves; not held (the order was refunded): returned.
        await inv.step(old, "commit")
        assert (await inv.reinstate(old, 1, [("A", 2)], hold=True))["status"] == "committed"
        assert await inv.levels("A") == {"sku": "A", "available": 8, "reserved": 0, "sold": 2}
        assert (await inv.reinstate(old, 1, [("A", 2)], hold=False))["status"] == "refunded"
        assert await inv.levels("A") == {"sku": "A", "available": 10, "reserved": 0, "sold": 0}
        with pytest.raises(Conflict):  # a refunded order's units cannot be held again
            await inv.reinstate(old, 1, [("A", 2)], hold=True)
        # A reserved one of a closed order is released; no reservation stays none.
        other = old_order_id(1, 2)
        await inv.reinstate(other, 1, [("A", 4)], hold=True)
        assert (await inv.reinstate(other, 1, [("A", 4)], hold=False))["status"] == "released"
        assert (await inv.reinstate(old_order_id(1, 3), 1, [("A", 1)], hold=False))[
            "status"
        ] == "none"
        # Not enough units: refused, in a dry run too, and nothing moved.
        short = old_order_id(1, 4)
        for dry_run in (True, False):
            with pytest.raises(InsufficientStock):
                await inv.reinstate(short, 1, [("A", 11)], hold=True, dry_run=dry_run)
        assert await inv.levels("A") == {"sku": "A", "available": 10, "reserved": 0, "sold": 0}

    run_inventory(storage_url, body)


# -- the owner's side, in one region that owns u1, the center and the global cell --------------


@asynccontextmanager
async def center_region(directory: Path) -> AsyncIterator[tuple[RegionRuntime, Reconciler]]:
    """hz in-process with ports and a secret of its own, writing under a lease."""
    config, _path = write_topology(directory)
    runtime = in_process_region(config, "hz", directory / "data")
    await runtime.copies.open()
    runtime.lease.start()
    assert await runtime.lease.first(5.0)
    reconciler = Reconciler(
        runtime.copies,
        runtime.orders,
        runtime.cart,
        runtime.inventory,
        runtime.catalog_service,
        runtime.revocations,
    )
    try:
        yield runtime, reconciler
    finally:
        await runtime.lease.stop()
        await runtime.client.aclose()
        await runtime.copies.close()


def lost_order(
    order_id: int, status: str, qty: int = 2, version: int = 1, payment_id: str | None = None
) -> dict[str, Any]:
    """The final images of an order of BUYER_IN_U1 as a lost region wrote them."""
    stamp = int(time.time() * 1000) - 60_000
    items = [{"sku": "A", "title": "a", "qty": qty, "price_cents": 100, "line_cents": 100 * qty}]
    order = {
        "order_id": order_id,
        "buyer_id": BUYER_IN_U1,
        "cell_id": 1,
        "status": status,
        "total_cents": 100 * qty,
        "document": orjson.dumps({"items": items}).decode(),
        "payment_id": payment_id,
        "idempotency_key": f"key-{order_id}",
        "created_ms": stamp,
        "updated_ms": stamp,
        "version": version,
    }
    line = {"order_id": order_id, "line_no": 1, "sku": "A", "qty": qty, "price_cents": 100}
    payment = None
    if payment_id is not None:
        payment = {
            "payment_id": payment_id,
            "order_id": order_id,
            "amount_cents": 100 * qty,
            "created_ms": stamp,
        }
    key = {
        "buyer_id": BUYER_IN_U1,
        "idempotency_key": f"key-{order_id}",
        "order_id": order_id,
        "fingerprint": _fingerprint("order", [("A", qty)]),  # as the lost region computed it
        "created_ms": stamp,
    }
    return {"order": order, "lines": [line], "payment": payment, "key": key}


def test_the_owner_recreates_orders_it_lacks_and_reports_what_conflicts(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with center_region(tmp_path) as (runtime, rec):
            assert route_buyer(runtime.fence.rule, BUYER_IN_U1).cell == 1
            await runtime.catalog_service.put("A", "a", 100)
            await runtime.inventory.set_stock("A", 10)

            async def order(images: dict[str, Any], base: int, dry_run: bool) -> Any:
                parts = (images[k] for k in ("order", "lines", "payment", "key"))
                return await rec.order(*parts, base, dry_run)

            created = lost_order(old_order_id(1, 1), "created")
            paid = lost_order(old_order_id(1, 2), "paid", version=2, payment_id="pay-2")
            # A dry run decides and writes nothing.
            would = await order(created, 0, True)
            assert (would.state, would.status) == (REAPPLIED, "created"), would
            assert await runtime.orders.find(created["order"]["order_id"]) is None
            assert (await runtime.inventory.levels("A"))["available"] == 10
            # Re-created with the original ID and state; stock held (committed when paid).
            for images in (created, paid):
                done = await order(images, 0, False)
                assert done.state == REAPPLIED, done
                again = await order(images, 0, False)  # idempotent by order ID
                assert again.state == SUPERSEDED, again
            got = await runtime.orders.get(BUYER_IN_U1, created["order"]["order_id"])
            assert got["status"] == "created"
            got = await runtime.orders.get(BUYER_IN_U1, paid["order"]["order_id"])
            assert (got["status"], got["payment_id"]) == ("paid", "pay-2")
            levels = await runtime.inventory.levels("A")
            assert levels == {"sku": "A", "available": 6, "reserved": 2, "sold": 2}
            # The buyer's idempotency key finds the re-created order.
            key = f"key-{created['order']['order_id']}"
            replay = await runtime.orders.create(BUYER_IN_U1, [("A", 2)], key)
            assert replay.replayed and replay.order["order_id"] == str(created["order"]["order_id"])
            # Out of stock: a conflict, nothing written.
            short = lost_order(old_order_id(1, 3), "created", qty=7)
            for dry_run in (True, False):
                refused = await order(short, 0, dry_run)
                assert refused.state == CONFLICT, refused
                assert "insufficient stock for order" in refused.note
            assert await runtime.orders.find(short["order"]["order_id"]) is None
            assert (await runtime.inventory.levels("A"))["available"] == 6

            # An order the owner has at the version the lost region's change began from:
            # the same transition (pay), through the service.
            mine = (await runtime.orders.create(BUYER_IN_U1, [("A", 1)], None)).order
            images = lost_order(int(mine["order_id"]), "paid", 1, version=2, payment_id="p-9")
            images["order"]["created_ms"] = mine["created_ms"]
            paid_again = await order(images, 1, False)
            assert (paid_again.state, paid_again.status) == (REAPPLIED, "paid"), paid_again
            assert (await runtime.orders.find(int(mine["order_id"])) or {})["status"] == "paid"
            assert (await order(images, 1, False)).state == SUPERSEDED
            # Changed at the owner too (another payment): a conflict.
            other = (await runtime.orders.create(BUYER_IN_U1, [("A", 1)], None)).order
            oid = int(other["order_id"])
            await runtime.orders.pay(BUYER_IN_U1, oid, "mine", 100)
            theirs = lost_order(oid, "paid", 1, version=2, payment_id="theirs")
            clash = await order(theirs, 1, False)
            assert clash.state == CONFLICT and "changed at the new owner too" in clash.note

    asyncio.run(scenario())


def test_the_owner_reconciles_carts_reservations_stock_products_and_revocations(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with center_region(tmp_path) as (runtime, rec):
            await runtime.catalog_service.put("A", "a", 100)
            await runtime.inventory.set_stock("A", 10)
            now = int(time.time() * 1000)
            # Cart lines: the newer change wins; one the owner changed later is a conflict.
            await runtime.cart.put(BUYER_IN_U1, "A", 3)
            late = await rec.cart_line(1, BUYER_IN_U1, "A", 5, now - 60_000, False)
            assert late.state == CONFLICT and "changed at the new owner too" in late.note
            newer = await rec.cart_line(1, BUYER_IN_U1, "A", 5, now + 60_000, False)
            assert newer.state == REAPPLIED, newer
            assert (await rec.cart_line(1, BUYER_IN_U1, "A", 5, now, False)).state == SUPERSEDED
            gone = await rec.cart_line(1, BUYER_IN_U1, "A", None, now + 120_000, False)
            assert gone.state == REAPPLIED and (await runtime.cart.get(BUYER_IN_U1))["items"] == []

            # A lost center's reservation: the order's status at its owner decides.
            nowhere = await rec.reservation(old_order_id(1, 1), [("A", 2)], None, False)
            assert nowhere.state == SUPERSEDED and "exists nowhere" in nowhere.note
            order = (await runtime.orders.create(BUYER_IN_U1, [("A", 2)], None)).order
            oid = int(order["order_id"])
            held = await rec.reservation(oid, [("A", 2)], "created", False)
            assert held.state == SUPERSEDED, held  # the new center has it reserved
            await runtime.inventory.step(oid, "release")  # as if the new center lacked it
            dry = await rec.reservation(oid, [("A", 2)], "paid", True)
            assert dry.state == REAPPLIED and (await runtime.inventory.levels("A"))["reserved"] == 0
            again = await rec.reservation(oid, [("A", 2)], "paid", False)
            assert again.state == REAPPLIED, again
            levels = await runtime.inventory.levels("A")
            assert levels == {"sku": "A", "available": 8, "reserved": 0, "sold": 2}
            short = await rec.reservation(old_order_id(1, 2), [("A", 9)], "created", False)
            assert short.state == CONFLICT and "insufficient stock" in short.note

            # Stock: levels that only follow reservations are superseded; a changed total
            # (set_stock at the lost center) is a conflict for the operator.
            assert (await rec.stock("A", [10, 10])).state == SUPERSEDED
            set_stock = await rec.stock("A", [10, 50])
            assert set_stock.state == CONFLICT and "set to 50" in set_stock.note

            # Products: written again unless the owner has a newer version.
            product = {"sku": "B", "title": "b", "price_cents": 7, "updated_ms": now, "version": 1}
            assert (await rec.product("B", product, 0, False)).state == REAPPLIED
            assert (await runtime.catalog_service.get_many(["B"]))["B"]["price_cents"] == 7
            assert (await rec.product("B", product, 0, False)).state == SUPERSEDED
            await runtime.catalog_service.put("B", "b", 8)  # the owner's own change: version 2
            stale = {**product, "price_cents": 6, "version": 2}
            clash = await rec.product("B", stale, 1, False)
            assert clash.state == CONFLICT and "changed at the new owner too" in clash.note

            # Revocations: made again, idempotent; an expired one is superseded.
            token = "0123456789abcdef"
            expires = now // 1000 + 3_600
            assert (await rec.revocation(token, expires, True)).state == REAPPLIED
            assert token not in runtime.revocations
            assert (await rec.revocation(token, expires, False)).state == REAPPLIED
            assert token in runtime.revocations
            assert (await rec.revocation(token, expires, False)).state == SUPERSEDED
            expired = await rec.revocation("fedcba9876543210", now // 1000 - 10, False)
            assert expired.state == SUPERSEDED

    asyncio.run(scenario())


# -- a real cluster: sh loses its divergent tail in a failover, then it is reconciled ----------

SKU, CART_SKU, LOW = "RC-A", "RC-B", "RC-LOW"
STOCK, LOW_STOCK = 1_000, 10


@pytest.fixture(params=["sqlite", "postgresql"])
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    yield from start_cluster(tmp_path, request.param)


def until(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Poll `check` until it returns something true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def create(api: Api, region: str, buyer: int, items: list[tuple[str, int]], key: str) -> str:
    """An order, retried with its idempotency key while the region has no lease yet."""

    def attempt() -> str | None:
        answer = api.order(region, buyer, items, idempotency_key=key)
        if answer.status_code == 503:
            return None
        assert answer.status_code in (200, 201), answer.text
        return str(answer.json()["order_id"])

    order_id: str = until(f"order {key} at {region}", attempt)
    return order_id


def pay(api: Api, region: str, buyer: int, order_id: str, payment_id: str) -> None:
    order = api.call(region, "GET", f"/v1/orders/{order_id}", buyer).json()
    body = {"payment_id": payment_id, "amount_cents": order["total_cents"]}
    answer = api.call(region, "POST", f"/v1/orders/{order_id}/pay", buyer, body)
    assert answer.status_code == 200, answer.text


def put_cart(api: Api, region: str, buyer: int, sku: str, qty: int) -> None:
    answer = api.call(region, "PUT", f"/v1/cart/items/{sku}", buyer, {"qty": qty})
    assert answer.status_code == 200, answer.text


def order_at(api: Api, buyer: int, order_id: str) -> dict[str, Any] | None:
    answer = api.call("hz", "GET", f"/v1/orders/{order_id}", buyer)
    if answer.status_code == 404:
        return None
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def levels(api: Api, sku: str) -> dict[str, int]:
    answer = api.call("hz", "GET", f"/v1/inventory/{sku}")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return {k: int(body[k]) for k in ("available", "reserved", "sold")}


def reconcile(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return unitrade(path, "quarantine", "reconcile", "--region", "sh", *extra)


def test_a_lost_regions_quarantine_is_reconciled_at_the_new_owners(
    running: tuple[LocalCluster, Path],
) -> None:
    cluster, path = running
    config = cluster.config
    with Api(config) as api, Control(config) as control:
        control.wait_connected()
        for sku, stock in ((SKU, STOCK), (CART_SKU, STOCK), (LOW, LOW_STOCK)):
            api.put_product(sku, stock)
        b1, b2, b3, b4 = buyers_of_cell(config, 3, 4)  # u3, owned by sh
        pre1 = create(api, "sh", b1, [(SKU, 1)], "pre1")
        pre2 = create(api, "sh", b2, [(SKU, 1)], "pre2")
        put_cart(api, "sh", b3, SKU, 1)
        wait_converged(config)

        # sh again, serving no pulls: what it acknowledges from now on reaches nobody.
        cluster.kill_region("sh")
        cluster.start_region("sh", env={"UNITRADE_FAULTS": "refuse_pulls"})
        cluster.wait_healthy(["sh"])
        before = {r: region_positions(config, r)["u3"] for r in ("hz", "bj")}
        o1 = create(api, "sh", b1, [(SKU, 2)], "o1")
        o2 = create(api, "sh", b2, [(SKU, 1)], "o2")
        pay(api, "sh", b2, o2, "pay-o2")
        o3 = create(api, "sh", b4, [(LOW, 5)], "o3")
        pay(api, "sh", b1, pre1, "pay-pre1")
        pay(api, "sh", b2, pre2, "pay-pre2-sh")
        put_cart(api, "sh", b3, CART_SKU, 3)
        put_cart(api, "sh", b3, SKU, 5)
        # The fault struck: sh acknowledged all of it, no other copy of u3 has any of it.
        time.sleep(0.5)
        assert {r: region_positions(config, r)["u3"] for r in ("hz", "bj")} == before
        assert region_positions(config, "sh")["u3"] > max(before.values())

        cluster.kill_region("sh")
        # To bj, not hz: the new owner of u3 is then not the center region, so reconciling
        # an order reserves its stock by a center call across regions (`reinstate` was
        # missing from the center calls and every such order failed with a 500).
        answer = failover(control, "sh", to=["bj"])
        assert answer.status_code == 202, answer.text
        op = control.operation(answer.json()["id"], wait_s=45)
        assert op["state"] == "done", op
        cluster.start_region("sh")
        cluster.wait_healthy(["sh"])
        wait_converged(config)
        entries = quarantined(config)
        held = {str(e["key"]["order_id"]) for e in entries if e["table"] == "orders"}
        assert held == {o1, o2, o3, pre1, pre2}
        assert all(e["state"] == "held" for e in entries)

        # The new owner moves on: the buyer pays pre2 again with another payment ID and
        # changes a cart line; the abandoned-reservation sweep releases o1's and o3's
        # stock (their orders are nowhere there), and the admin sets LOW's stock so low
        # that o3 cannot be reserved again.
        assert current_owners(config)["u3"] == "bj"
        pay(api, "hz", b2, pre2, "pay-pre2-new")
        put_cart(api, "hz", b3, SKU, 7)
        until("o1's and o3's reservations released", lambda: levels(api, LOW)["reserved"] == 0, 120)
        body = {"title": f"title of {LOW}", "price_cents": 250, "stock": 2}
        assert api.call("hz", "PUT", f"/v1/admin/products/{LOW}", body=body).status_code == 200
        stock_before = {sku: levels(api, sku) for sku in (SKU, LOW)}

        dry = reconcile(path, "--dry-run")
        assert dry.returncode == 1, dry.stdout + dry.stderr
        out = " ".join(dry.stdout.split())  # the table wraps its notes
        assert f"insufficient stock for order {o3}" in out, out
        assert "dry run" in out
        # Nothing changed anywhere.
        assert all(e["state"] == "held" for e in quarantined(config))
        assert order_at(api, b1, o1) is None
        assert {sku: levels(api, sku) for sku in (SKU, LOW)} == stock_before

        done = reconcile(path)
        assert done.returncode == 1, done.stdout + done.stderr  # conflicts remain
        out = " ".join(done.stdout.split())
        assert f"insufficient stock for order {o3}" in out, out
        assert f"order {pre2} changed at the new owner too" in out, out
        assert f"cart of buyer {b3}: {SKU} changed at the new owner too" in out, out

        # Every order that does not conflict is at the new owner with its ID and state.
        expected = {o1: ("created", None), o2: ("paid", "pay-o2"), pre1: ("paid", "pay-pre1")}
        for order_id, (status, payment_id) in expected.items():
            buyer = {o1: b1, o2: b2, pre1: b1}[order_id]
            got = order_at(api, buyer, order_id)
            assert got is not None and (got["status"], got["payment_id"]) == (status, payment_id)
        assert order_at(api, b4, o3) is None
        assert (order_at(api, b2, pre2) or {}).get("payment_id") == "pay-pre2-new"
        replay = api.order("hz", b1, [(SKU, 2)], idempotency_key="o1")
        assert replay.status_code in (200, 201) and replay.json()["order_id"] == o1
        cart = api.call("hz", "GET", "/v1/cart", b3).json()
        assert {i["sku"]: i["qty"] for i in cart["items"]} == {SKU: 7, CART_SKU: 3}
        # Stock conserved; o1's 2 units reserved again, o2, pre1 and pre2 sold once each.
        assert levels(api, SKU) == {"available": STOCK - 5, "reserved": 2, "sold": 3}
        assert levels(api, LOW) == {"available": 2, "reserved": 0, "sold": 0}

        after = quarantined(config)
        assert not [e for e in after if e["state"] == "held"]
        states = {str(e["key"]["order_id"]): e["state"] for e in after if e["table"] == "orders"}
        assert states == {
            o1: "reapplied",
            o2: "reapplied",
            pre1: "reapplied",
            o3: "conflict",
            pre2: "conflict",
        }
        listed = unitrade(path, "quarantine", "list", "--region", "sh")
        assert listed.returncode == 0, listed.stdout
        diff = unitrade(path, "diff")
        assert diff.returncode == 0, diff.stdout + diff.stderr

        # Again: nothing held, nothing done; the conflicts stay for the operator.
        again = reconcile(path)
        assert again.returncode == 1, again.stdout + again.stderr
        assert "0 objects (0 entries)" in " ".join(again.stdout.split()), again.stdout
        assert quarantined(config) == after
        assert levels(api, SKU) == {"available": STOCK - 5, "reserved": 2, "sold": 3}

        refused_bad_input(config, o1)


def refused_bad_input(config: TopologyConfig, order_id: str) -> None:
    """The new internal endpoints answer bad input with typed errors, never a 500."""
    owner = current_owners(config)["u3"]
    other = next(r for r in ("hz", "bj") if r != owner)
    images = lost_order(int(order_id), "created")
    images["order"]["cell_id"] = 3
    images["lines"][0]["order_id"] = int(order_id) + 1
    cases = [
        (owner, ORDER_STATUS_PATH, {"order_id": "12"}, 422),  # not an order ID
        (other, ORDER_STATUS_PATH, {"order_id": order_id}, 421),  # not the owner
        (owner, ORDER_PATH, {**images, "base_version": 0}, 422),  # another order's line
        (owner, ORDER_PATH, {"order": images["order"]}, 422),  # no base_version
        ("hz", STOCK_PATH, {"sku": SKU, "totals": []}, 422),
        ("sh", LIST_PATH, {"after": [0, 0]}, 422),  # paging needs the cell
        ("sh", MARK_PATH, {"cell": 3, "marks": []}, 422),
        (
            "sh",
            MARK_PATH,
            {"cell": 3, "marks": [{"promotion_version": 1, "position": 1, "state": "held"}]},
            422,
        ),
        ("sh", MARK_PATH, {"cell": 77, "marks": [MARK]}, 404),
    ]
    with cluster_regions(config) as regions:
        for region, target, body, status in cases:
            with pytest.raises(DiffError, match=f"answered {status}"):
                regions.call(region, target, body, region)


MARK = {"promotion_version": 1, "position": 1, "state": "conflict", "note": "x"}


def quarantined(config: TopologyConfig) -> list[dict[str, Any]]:
    """sh's quarantine through its signed internal API, as the CLI reads it."""
    with cluster_regions(config) as regions:
        answer = regions.call("sh", LIST_PATH, {"limit": 1000}, "sh")
    entries: list[dict[str, Any]] = answer["entries"]
    return entries
