"""Faults between the center and the unit cells lose no acknowledged data and leak no stock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.support import Api, in_process_region, write_topology
from unitrade.cluster import LocalCluster
from unitrade.errors import OrderTimedOut
from unitrade.region import RegionRuntime
from unitrade.topology.rule import route_buyer

BUYER_IN_U1 = 100  # bucket 0 -> cell u1, owned by hz with the center


def _runtime(directory: Path) -> RegionRuntime:
    """The center region in-process, with ports and a secret of its own: it calls the other
    regions (outbox, catalog), and on the default ports and secret it would reach whatever
    cluster runs on this machine."""
    config, _path = write_topology(directory)
    return in_process_region(config, "hz", directory / "data")


def test_a_reservation_whose_order_was_never_written_is_released(tmp_path: Path) -> None:
    async def scenario() -> None:
        runtime = _runtime(tmp_path)
        await runtime.start()
        try:
            assert route_buyer(runtime.fence.rule, BUYER_IN_U1).cell == 1
            await runtime.catalog_service.put("A", "a", 100)
            await runtime.inventory.set_stock("A", 10)
            # A region that died after reserving and before writing its order:
            lost = await runtime.allocators[1].next_id()
            await runtime.center.reserve(lost, 1, [("A", 3)])
            kept = (await runtime.orders.create(BUYER_IN_U1, [("A", 2)], None)).order
            store = runtime.copies[1]
            assert await runtime.orders.release_abandoned(store, grace_s=60) == 0  # too young
            assert await runtime.orders.release_abandoned(store, grace_s=0) == 1
            levels = await runtime.inventory.levels("A")
            assert levels == {"sku": "A", "available": 8, "reserved": 2, "sold": 0}
            assert (await runtime.orders.get(BUYER_IN_U1, int(kept["order_id"])))["status"] == (
                "created"
            )
            assert await runtime.orders.release_abandoned(store, grace_s=0) == 0
        finally:
            await runtime.stop()

    asyncio.run(scenario())


def test_an_order_written_too_late_is_not_written_and_its_stock_returns(tmp_path: Path) -> None:
    async def scenario() -> None:
        runtime = _runtime(tmp_path)
        await runtime.start()
        try:
            await runtime.catalog_service.put("A", "a", 100)
            await runtime.inventory.set_stock("A", 10)
            runtime.orders.write_deadline_s = -1.0
            with pytest.raises(OrderTimedOut):
                await runtime.orders.create(BUYER_IN_U1, [("A", 4)], "key-1")
            levels = await runtime.inventory.levels("A")
            assert levels == {"sku": "A", "available": 10, "reserved": 0, "sold": 0}
            orders, _ = await runtime.orders.list(BUYER_IN_U1, 10, None)
            assert orders == []
            runtime.orders.write_deadline_s = 30.0
            retried = await runtime.orders.create(BUYER_IN_U1, [("A", 4)], "key-1")
            assert retried.replayed is False and retried.order["status"] == "created"
        finally:
            await runtime.stop()

    asyncio.run(scenario())


@pytest.mark.cluster
def test_center_killed_then_restarted_loses_no_acknowledged_change(tmp_path: Path) -> None:
    config, path = write_topology(tmp_path)
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            api.put_product("K", stock=10, price_cents=100)
            buyer = api.buyer_in("sh", 5000)
            order = api.order("sh", buyer, [("K", 2)]).json()
            before = api.order("sh", buyer, [("K", 1)]).json()

            cluster.kill_region("hz")  # kill -9 of the center region
            refused = api.order("sh", buyer, [("K", 1)])
            assert refused.status_code == 503
            assert refused.json()["error"] == "region_unavailable"
            assert "retry-after" in refused.headers
            pay = {"payment_id": "pay-k", "amount_cents": 200}
            target = f"/v1/orders/{order['order_id']}/pay"
            # A payment needs its claim at the center (services/payments.py): refused,
            # nothing written.
            unpaid = api.call("sh", "POST", target, buyer, pay)
            assert unpaid.status_code == 503, unpaid.text
            assert unpaid.json()["error"] == "region_unavailable"
            assert "was not applied" in unpaid.json()["message"]
            read = api.call("sh", "GET", f"/v1/orders/{order['order_id']}", buyer)
            assert read.json()["status"] == "created"
            # A close is acknowledged: its release waits in the outbox.
            closed = api.call("bj", "POST", f"/v1/orders/{before['order_id']}/close", buyer)
            assert closed.status_code == 200 and closed.json()["status"] == "closed"

            cluster.start(["hz"])
            deadline = time.monotonic() + 30
            while (paid := api.call("sh", "POST", target, buyer, pay)).status_code == 503:
                assert time.monotonic() < deadline, paid.text  # the center's lease, say
                time.sleep(0.2)
            assert paid.status_code == 200 and paid.json()["status"] == "paid", paid.text
            while time.monotonic() < deadline:
                if api.levels("K") == {"sku": "K", "available": 8, "reserved": 0, "sold": 2}:
                    break
                time.sleep(0.5)
            assert api.levels("K") == {"sku": "K", "available": 8, "reserved": 0, "sold": 2}
            listed = api.call("hz", "GET", "/v1/orders", buyer).json()["orders"]
            assert [o["status"] for o in listed] == ["closed", "paid"]
        finally:
            api.http.close()
