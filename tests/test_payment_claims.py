"""A payment ID pays one order across the cluster: claimed at the center before the payment
is written in the order's cell (services/payments.py), on real storage and on a real
cluster, with the center dead and frozen."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.storage_support import make_store
from tests.support import Api, in_process_region, write_topology
from tests.switch_support import buyers_of_cell
from tests.test_reconcile import BUYER_IN_U1, lost_order, old_order_id
from unitrade.cluster import LocalCluster
from unitrade.control.reconcile import Change, group
from unitrade.errors import Conflict
from unitrade.region import RegionRuntime
from unitrade.services.payments import PaymentClaims
from unitrade.services.reconcile import Reconciler
from unitrade.storage.quarantine import CONFLICT, REAPPLIED, SUPERSEDED, describe
from unitrade.storage.schema import payment_claims
from unitrade.topology.config import CellKind

CENTER = 1000


def test_a_claim_is_idempotent_for_its_order_and_refused_for_another(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, CENTER)
        await store.open()
        try:
            claims = PaymentClaims(store)
            first = await claims.claim("pay-1", 11, 500)
            assert (first["order_id"], first["amount_cents"]) == ("11", 500)
            again = await claims.claim("pay-1", 11, 500)  # a retried pay: the same answer
            assert again == first
            with pytest.raises(Conflict) as refused:
                await claims.claim("pay-1", 12, 500)
            assert "belongs to another order" in refused.value.message
            assert "11" not in refused.value.message  # another buyer's order stays unnamed
            with pytest.raises(Conflict):
                await claims.claim("pay-1", 12, 500, dry_run=True)
            # A dry run decides without writing.
            assert (await claims.claim("pay-2", 12, 700, dry_run=True))["order_id"] == "12"
            assert await claims.holder("pay-2") is None
            assert (await claims.holder("pay-1") or {}).get("order_id") == "11"
            # Written through the fence and captured: replicas get the one claim.
            changes = await store.changes_since(0, 100)
            claimed = [c for c in changes if c["tbl"] == payment_claims.name]
            assert [(c["op"], orjson.loads(c["pk"])) for c in claimed] == [
                ("i", {"payment_id": "pay-1"})
            ]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_concurrent_claims_of_one_payment_give_it_to_one_order(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, CENTER)
        await store.open()
        try:
            claims = PaymentClaims(store)

            async def claim(order_id: int) -> int | None:
                try:
                    await claims.claim("pay-race", order_id, 100)
                except Conflict:
                    return None
                return order_id

            won = [o for o in await asyncio.gather(*(claim(i) for i in range(1, 9))) if o]
            assert len(won) == 1
            assert (await claims.holder("pay-race") or {}).get("order_id") == str(won[0])
        finally:
            await store.close()

    asyncio.run(scenario())


# -- the orders service, in one region that owns u1, u2 and the center ------------------------


@asynccontextmanager
async def center_region(directory: Path, storage: str) -> AsyncIterator[RegionRuntime]:
    """hz in-process with ports, a secret and storage of its own, writing under a lease."""
    config, _path = write_topology(directory, storage)
    runtime = in_process_region(config, "hz", directory / "data")
    await runtime.copies.open()
    runtime.lease.start()
    assert await runtime.lease.first(5.0)
    try:
        yield runtime
    finally:
        await runtime.lease.stop()
        await runtime.client.aclose()
        await runtime.copies.close()


def test_orders_of_two_cells_cannot_share_a_payment(storage_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with center_region(tmp_path, storage_url) as runtime:
            config = runtime.config
            [one] = buyers_of_cell(config, 1, 1)
            [two] = buyers_of_cell(config, 2, 1)
            await runtime.catalog_service.put("A", "a", 100)
            await runtime.inventory.set_stock("A", 10)
            first = (await runtime.orders.create(one, [("A", 1)], None)).order
            second = (await runtime.orders.create(two, [("A", 2)], None)).order
            assert (first["cell"], second["cell"]) == (1, 2)
            paid = await runtime.orders.pay(one, int(first["order_id"]), "pay-x", 100)
            assert paid["status"] == "paid"
            with pytest.raises(Conflict):
                await runtime.orders.pay(two, int(second["order_id"]), "pay-x", 200)
            assert (await runtime.orders.get(two, int(second["order_id"])))["status"] == "created"
            replay = await runtime.orders.pay(one, int(first["order_id"]), "pay-x", 100)
            assert replay == paid
            # The second order pays with a payment of its own.
            own = await runtime.orders.pay(two, int(second["order_id"]), "pay-y", 200)
            assert (own["status"], own["payment_id"]) == ("paid", "pay-y")
            levels = await runtime.inventory.levels("A")
            assert levels == {"sku": "A", "available": 7, "reserved": 0, "sold": 3}

    asyncio.run(scenario())


# -- a real cluster: buyers of sh (u3) and bj (u5), the center at hz ---------------------------

WAIT_S = 40.0


@pytest.fixture(scope="module")
def pc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Api]]:
    directory = tmp_path_factory.mktemp("payclaim")
    config, path = write_topology(directory)
    with LocalCluster(config, directory / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            yield cluster, api
        finally:
            api.http.close()


@contextmanager
def frozen(cluster: LocalCluster, region: str) -> Iterator[None]:
    """The region's process stopped (SIGSTOP): its sockets accept, nothing answers."""
    pid = cluster.processes[region].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def pay(api: Api, region: str, buyer: int, order_id: str, payment_id: str, cents: int) -> Any:
    body = {"payment_id": payment_id, "amount_cents": cents}
    return api.call(region, "POST", f"/v1/orders/{order_id}/pay", buyer, body)


def status_of(api: Api, buyer: int, order_id: str) -> str:
    response = api.call(api.home(buyer), "GET", f"/v1/orders/{order_id}", buyer)
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


def until(what: str, probe: Callable[[], httpx.Response | None]) -> httpx.Response:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = probe()
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.2)


def paid_eventually(api: Api, buyer: int, order_id: str, payment_id: str, cents: int) -> Any:
    """Pay until the center writes again (it may have no write lease for a moment after it
    comes back); only a 503 (nothing applied) is tried again."""

    def attempt() -> httpx.Response | None:
        response = pay(api, api.home(buyer), buyer, order_id, payment_id, cents)
        return None if response.status_code == 503 else response

    response = until(f"order {order_id} paid", attempt)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.cluster
def test_a_payment_of_an_order_in_another_cell_and_region_is_refused(
    pc: tuple[LocalCluster, Api],
) -> None:
    _cluster, api = pc
    api.put_product("PC-A", stock=20, price_cents=100)
    [in_sh] = buyers_of_cell(api.config, 3, 1, 30_000)
    [in_bj] = buyers_of_cell(api.config, 5, 1, 30_000)
    assert (api.home(in_sh), api.home(in_bj)) == ("sh", "bj")
    first = api.order("sh", in_sh, [("PC-A", 1)]).json()
    second = api.order("bj", in_bj, [("PC-A", 2)]).json()
    payment = f"pay-{first['order_id']}"

    paid = pay(api, "sh", in_sh, first["order_id"], payment, 100)
    assert paid.status_code == 200 and paid.json()["status"] == "paid", paid.text
    for region in ("bj", "sh"):  # served by the owner, and forwarded to it
        reused = pay(api, region, in_bj, second["order_id"], payment, 200)
        assert reused.status_code == 409, reused.text
        assert reused.json()["error"] == "conflict"
        assert "belongs to another order" in reused.json()["message"]
    assert status_of(api, in_bj, second["order_id"]) == "created"
    # The first order's pay again: the same answer (a replay, from any region).
    again = pay(api, "bj", in_sh, first["order_id"], payment, 100)
    assert again.status_code == 200 and again.json() == paid.json()
    own = pay(api, "bj", in_bj, second["order_id"], f"pay-{second['order_id']}", 200)
    assert own.status_code == 200 and own.json()["status"] == "paid", own.text


@pytest.mark.cluster
def test_a_pay_the_center_cannot_claim_is_503_and_nothing_is_written(
    pc: tuple[LocalCluster, Api],
) -> None:
    cluster, api = pc
    api.put_product("PC-B", stock=20, price_cents=100)
    [in_bj] = buyers_of_cell(api.config, 5, 1, 31_000)
    [in_sh] = buyers_of_cell(api.config, 3, 1, 31_000)
    dead = api.order("bj", in_bj, [("PC-B", 1)]).json()
    stuck = api.order("sh", in_sh, [("PC-B", 3)]).json()

    # The center region dead: the claim reaches nobody.
    cluster.kill_region("hz")
    try:
        refused = pay(api, "bj", in_bj, dead["order_id"], "pay-dead", 100)
        assert refused.status_code == 503, refused.text
        body = refused.json()
        assert (body["error"], body["region"], body["call"]) == (
            "region_unavailable",
            "hz",
            "center",
        )
        assert "was not applied" in body["message"] and "same payment ID" in body["message"]
        assert "retry-after" in refused.headers
        assert status_of(api, in_bj, dead["order_id"]) == "created"
    finally:
        cluster.start(["hz"])
    done = paid_eventually(api, in_bj, dead["order_id"], "pay-dead", 100)
    assert (done["status"], done["payment_id"]) == ("paid", "pay-dead")

    # The center region frozen: the claim leaves and gets no answer within the pay's bound.
    with frozen(cluster, "hz"):
        lost = pay(api, "sh", in_sh, stuck["order_id"], "pay-stuck", 300)
        assert lost.status_code == 503, lost.text
        body = lost.json()
        assert (body["error"], body["region"]) == ("region_unavailable", "hz")
        assert "no answer" in body["message"] and "was not applied" in body["message"]
        assert status_of(api, in_sh, stuck["order_id"]) == "created"
    # The claim may have stood meanwhile: for this order it is answered again.
    done = paid_eventually(api, in_sh, stuck["order_id"], "pay-stuck", 300)
    assert (done["status"], done["payment_id"]) == ("paid", "pay-stuck")
    wait = time.monotonic() + WAIT_S
    while api.levels("PC-B")["sold"] != 4:
        assert time.monotonic() < wait, api.levels("PC-B")
        time.sleep(0.2)
    assert api.levels("PC-B") == {"sku": "PC-B", "available": 16, "reserved": 0, "sold": 4}


# -- reconcile: a lost region's payments and a lost center's claims ----------------------------


def test_held_payment_claims_are_objects_an_operator_can_read() -> None:
    kinds = {"center": CellKind.CENTER}
    image = {"payment_id": "P", "order_id": 7, "amount_cents": 100, "created_ms": 1}
    changes = [
        Change("center", 5, 1, "payment_claims", "insert", {"payment_id": "P"}, image, 1),
        Change("center", 5, 2, "payment_claims", "delete", {"payment_id": "Q"}, None, 2),
    ]
    claimed, swept = group(changes, kinds)
    assert (claimed.kind, claimed.name) == ("payment_claim", "payment claim P of order 7")
    assert (swept.kind, swept.name) == ("local", "payment claim Q (retention)")
    assert describe("payment_claims", "i", {"payment_id": "P"}, image) == (
        "payment claim P of order 7"
    )
    assert describe("payment_claims", "d", {"payment_id": "Q"}, None) == "payment claim Q deleted"


def test_reconcile_claims_payments_again_and_refuses_a_payment_another_order_holds(
    storage_url: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with center_region(tmp_path, storage_url) as runtime:
            rec = Reconciler(
                runtime.copies,
                runtime.orders,
                runtime.cart,
                runtime.inventory,
                runtime.catalog_service,
                runtime.revocations,
                runtime.payment_claims,
            )
            claims = runtime.payment_claims
            await runtime.catalog_service.put("A", "a", 100)
            await runtime.inventory.set_stock("A", 10)

            # A lost center's claim: claimed again for its order; another order's: conflict.
            would = await rec.payment_claim("pay-l", 41, 200, True)
            assert would.state == REAPPLIED and await claims.holder("pay-l") is None
            assert (await rec.payment_claim("pay-l", 41, 200, False)).state == REAPPLIED
            assert (await claims.holder("pay-l") or {}).get("order_id") == "41"
            assert (await rec.payment_claim("pay-l", 41, 200, False)).state == SUPERSEDED
            taken = await rec.payment_claim("pay-l", 42, 200, False)
            assert taken.state == CONFLICT and "to order 41" in taken.note, taken

            # A lost region's paid order (cell u1) whose payment ID an order of cell u2
            # holds now: not re-created, in a dry run or not.
            [buyer] = buyers_of_cell(runtime.config, 2, 1)
            mine = (await runtime.orders.create(buyer, [("A", 1)], None)).order
            await runtime.orders.pay(buyer, int(mine["order_id"]), "pay-taken", 100)
            lost = lost_order(old_order_id(1, 1), "paid", version=2, payment_id="pay-taken")
            parts = [lost[k] for k in ("order", "lines", "payment", "key")]
            for dry_run in (True, False):
                refused = await rec.order(*parts, 0, dry_run)
                assert refused.state == CONFLICT and "belongs to another order" in refused.note
            assert await runtime.orders.find(lost["order"]["order_id"]) is None
            assert (await runtime.inventory.levels("A"))["available"] == 9
            # One whose payment ID is free: re-created, and its payment ID claimed for it.
            free = lost_order(old_order_id(1, 2), "paid", version=2, payment_id="pay-free")
            parts = [free[k] for k in ("order", "lines", "payment", "key")]
            assert (await rec.order(*parts, 0, False)).state == REAPPLIED
            holder = await claims.holder("pay-free")
            assert (holder or {}).get("order_id") == str(free["order"]["order_id"])
            # A pay made again at the owner (the order is there, created) with a payment ID
            # another order holds: a conflict, the order stays created.
            other = (await runtime.orders.create(BUYER_IN_U1, [("A", 1)], None)).order
            oid = int(other["order_id"])
            paid = lost_order(oid, "paid", 1, version=2, payment_id="pay-taken")
            paid["order"]["created_ms"] = other["created_ms"]
            parts = [paid[k] for k in ("order", "lines", "payment", "key")]
            for dry_run in (True, False):
                clash = await rec.order(*parts, 1, dry_run)
                assert clash.state == CONFLICT and "belongs to another order" in clash.note
            assert (await runtime.orders.find(oid) or {})["status"] == "created"

    asyncio.run(scenario())
