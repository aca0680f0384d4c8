"""Retention: the sweep deletes exactly the expired rows of the owned copies through the
fenced write path (replicas follow), late reserves are refused, finished operations go,
and outbox steps that failed for good are kept and listed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.storage_support import RULE, make_store
from tests.support import in_process_region
from unitrade.control.store import SqlControlStore, operations
from unitrade.errors import NotFound, OrderTimedOut
from unitrade.services.inventory import InventoryService
from unitrade.services.orders import OUTBOX_ATTEMPTS_MAX, failed_outbox, retry_outbox
from unitrade.services.retention import RetentionSweeper
from unitrade.storage.schema import (
    changelog,
    idempotency_keys,
    outbox,
    payment_claims,
    reservations,
)
from unitrade.storage.store import CellStore, WriteTx, now_ms
from unitrade.topology.config import RetentionConfig, default_config
from unitrade.topology.order_id import encode_order_id, unix_to_id_time
from unitrade.topology.rule import initial_rule

CENTER = RULE.center_cell
SALE_AND_COUPON_TABLES = ("sale_segments", "sales", "coupon_claims", "coupons")
SETTINGS = RetentionConfig(
    outbox_done_s=10,
    idempotency_keys_s=60,
    reservations_finished_s=10,
    reserve_window_s=5,
    payment_claims_s=3_600,
    sweep_batch_rows=10,
)


def outbox_row(order_id: int, status: str, age_s: int) -> dict[str, Any]:
    stamp = now_ms() - age_s * 1000
    return {
        "order_id": order_id,
        "step": "commit",
        "status": status,
        "attempts": 0,
        "last_error": None,
        "created_ms": stamp,
        "updated_ms": stamp,
    }


def key_row(buyer: int, age_s: int) -> dict[str, Any]:
    return {
        "buyer_id": buyer,
        "idempotency_key": f"k{buyer}",
        "order_id": buyer,
        "fingerprint": "f",
        "created_ms": now_ms() - age_s * 1000,
    }


def reservation_row(order_id: int, status: str, age_s: int, created_age_s: int) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "cell_id": 1,
        "status": status,
        "lines": "[]",
        "created_ms": now_ms() - created_age_s * 1000,
        "updated_ms": now_ms() - age_s * 1000,
    }


async def insert(store: CellStore, table: Any, rows: list[dict[str, Any]]) -> None:
    def work(tx: WriteTx) -> None:
        for row in rows:
            tx.insert(table, row)

    await store.write(work)


async def keys_of(store: CellStore, column: Any) -> set[Any]:
    return set(await store.read(lambda conn: conn.execute(select(column)).scalars().all()))


async def replicate(owner: CellStore, replica: CellStore) -> None:
    while changes := await owner.changes_since(replica.position, 1_000):
        await replica.apply(changes)


def sweeper(store: CellStore) -> RetentionSweeper:
    copies: Any = {store.cell.id: store}
    return RetentionSweeper(copies, SETTINGS, lambda: [store.cell.id])


def test_unit_sweep_deletes_exactly_the_expired_rows(storage_url: str) -> None:
    async def run() -> None:
        owner = make_store(storage_url.replace("{cell}", "hz-{cell}"), 1, region="hz")
        replica = make_store(storage_url.replace("{cell}", "sh-{cell}"), 1, region="sh")
        await owner.open()
        await replica.open()
        try:
            # 25 expired done steps: three batches of 10.
            old_done = [outbox_row(i, "done", 30) for i in range(1, 26)]
            kept_steps = [
                outbox_row(101, "done", 1),  # done, too young
                outbox_row(102, "pending", 30),  # never a pending step
                outbox_row(103, "failed", 30),  # failed for good: for an operator
            ]
            await insert(owner, outbox, old_done + kept_steps)
            await insert(owner, idempotency_keys, [key_row(1, 90), key_row(2, 30)])
            await replicate(owner, replica)
            sweep = sweeper(owner)
            deleted = await sweep.sweep_cell(owner)
            assert deleted == {
                "probe_orders": 0,
                "outbox": 25,
                "idempotency_keys": 1,
                "sale_tokens": 0,
            }
            assert await keys_of(owner, outbox.c.order_id) == {101, 102, 103}
            assert await keys_of(owner, idempotency_keys.c.buyer_id) == {2}
            assert sweep.kept_rows == {
                (1, "outbox"): 3,
                (1, "idempotency_keys"): 1,
                (1, "sale_tokens"): 0,
                (1, "probe_orders"): 0,
            }
            assert sweep.failed_steps == {1: 1}
            # The deletes are in the changelog: the replica follows them.
            ops = await owner.read(
                lambda conn: (
                    conn.execute(select(changelog.c.op).where(changelog.c.op == "d"))
                    .scalars()
                    .all()
                )
            )
            assert len(ops) == 26
            await replicate(owner, replica)
            assert await keys_of(replica, outbox.c.order_id) == {101, 102, 103}
            assert await keys_of(replica, idempotency_keys.c.buyer_id) == {2}
            again = await sweep.sweep_cell(owner)
            assert again == {
                "probe_orders": 0,
                "outbox": 0,
                "idempotency_keys": 0,
                "sale_tokens": 0,
            }
        finally:
            await owner.close()
            await replica.close()

    asyncio.run(run())


def test_center_sweep_keeps_live_and_recent_reservations(storage_url: str) -> None:
    async def run() -> None:
        store = make_store(storage_url, CENTER, region="hz")
        await store.open()
        try:
            rows = [
                reservation_row(1, "committed", 60, 60),  # finished and old: goes
                reservation_row(2, "released", 60, 60),  # goes
                reservation_row(3, "refunded", 60, 60),  # goes
                reservation_row(4, "reserved", 600, 600),  # live: never
                reservation_row(5, "committed", 1, 60),  # finished a moment ago
                # Finished long enough, but a reserve for it might still be accepted
                # (created within reserve_window_s + margins): kept.
                reservation_row(6, "released", 11, 11),
            ]
            await insert(store, reservations, rows)
            # Payment claims go once payment_claims_s old, whatever their order did.
            claims = [
                {
                    "payment_id": f"p{age_s}",
                    "order_id": age_s,
                    "amount_cents": 1,
                    "created_ms": now_ms() - age_s * 1000,
                }
                for age_s in (3_590, 3_610, 7_200)
            ]
            await insert(store, payment_claims, claims)
            sweep = sweeper(store)
            deleted = await sweep.sweep_cell(store)
            assert deleted == {
                "probe_reservations": 0,
                "reservations": 3,
                "payment_claims": 2,
                **dict.fromkeys(SALE_AND_COUPON_TABLES, 0),
            }
            assert await keys_of(store, reservations.c.order_id) == {4, 5, 6}
            assert await keys_of(store, payment_claims.c.payment_id) == {"p3590"}
            assert sweep.kept_rows[(CENTER, "payment_claims")] == 1
        finally:
            await store.close()

    asyncio.run(run())


def test_a_late_reserve_is_refused_so_a_deleted_reservation_cannot_come_back(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        store = make_store(f"sqlite:///{tmp_path}/{{cell}}.db", CENTER, region="hz")
        await store.open()
        try:
            inventory = InventoryService(store, reserve_window_s=5)
            await inventory.set_stock("A", 10)
            now_s = unix_to_id_time(time.time())
            fresh, late = encode_order_id(1, now_s, 1), encode_order_id(1, now_s - 60, 2)
            await inventory.reserve(fresh, 1, [("A", 1)])
            # A release that overtook its reserve leaves a tombstone; once the sweep has
            # deleted it, the late reserve still cannot hold stock.
            await inventory.step(late, "release")
            await store.write(lambda tx: tx.delete(reservations, {"order_id": late}))
            with pytest.raises(OrderTimedOut):
                await inventory.reserve(late, 1, [("A", 1)])
            assert (await inventory.levels("A"))["reserved"] == 1
            # A late refund of a deleted reservation moves nothing.
            with pytest.raises(NotFound):
                await inventory.step(late, "refund")
            assert (await inventory.levels("A"))["available"] == 9
        finally:
            await store.close()

    asyncio.run(run())


def test_a_refund_after_retention_deleted_the_reservation_returns_the_stock_once(
    tmp_path: Path,
) -> None:
    """Found by the soak benchmark: refunds of orders paid longer ago than
    reservations_finished_s failed for good and never returned their units. A refund
    carries the order's lines, so the center returns them without the reservation."""

    async def run() -> None:
        store = make_store(f"sqlite:///{tmp_path}/{{cell}}.db", CENTER, region="hz")
        await store.open()
        try:
            inventory = InventoryService(store, reserve_window_s=60)
            await inventory.set_stock("A", 10)
            await inventory.set_stock("B", 10)
            order = encode_order_id(1, unix_to_id_time(time.time()), 3)
            await inventory.reserve(order, 1, [("A", 2), ("B", 1)])
            await inventory.step(order, "commit")
            assert (await inventory.levels("A"))["sold"] == 2
            # The sweep deletes the committed reservation once it is old enough.
            await store.write(lambda tx: tx.delete(reservations, {"order_id": order}))
            lines = [("B", 1), ("A", 2)]
            for _ in range(2):  # the outbox may send the same refund twice
                done = await inventory.step(order, "refund", lines)
                assert done["status"] == "refunded"
            a, b = await inventory.levels("A"), await inventory.levels("B")
            assert (a["available"], a["sold"]) == (10, 0)
            assert (b["available"], b["sold"]) == (10, 0)
        finally:
            await store.close()

    asyncio.run(run())


def test_control_plane_deletes_finished_operations_past_the_newest_kept(tmp_path: Path) -> None:
    async def run() -> None:
        config = default_config()
        store = SqlControlStore(f"sqlite:///{tmp_path}/control.db")
        await store.open(config, initial_rule(config))
        try:
            ids = []
            for n in range(6):
                op = await store.create_operation("switch", [1], {1: "hz"}, "sh")
                ids.append(op.id)
                state = "running" if n == 0 else "done"
                await store.record(op, "done", "done", state=state)
                await store.record(op, "done", "note")

            def age(conn: Any) -> None:
                for n, op_id in enumerate(ids):
                    stamp = now_ms() - (100 - n) * 1000
                    conn.execute(
                        update(operations)
                        .where(operations.c.id == op_id)
                        .values(created_ms=stamp, updated_ms=stamp)
                    )

            await store._run(age)
            # Keep the newest 2; of the older four, the running one stays.
            assert await store.sweep_operations(2, now_ms() - 10_000, 2) == 2
            assert await store.sweep_operations(2, now_ms() - 10_000, 2) == 1
            assert await store.sweep_operations(2, now_ms() - 10_000, 2) == 0
            left = {op.id for op in await store.operations(10)}
            assert left == {ids[0], ids[4], ids[5]}
            assert await store.log(ids[1]) == []
            assert len(await store.log(ids[5])) == 2
        finally:
            await store.close()

    asyncio.run(run())


def test_an_outbox_step_that_fails_for_good_is_kept_counted_and_can_be_retried(
    tmp_path: Path,
) -> None:
    """hz owns u1 and the center: a refund of an order with no reservation fails at the
    center every time, for real, until the drainer gives up."""

    async def run() -> None:
        runtime = in_process_region(default_config(), "hz", tmp_path)
        await runtime.copies.open()
        runtime.lease.start()
        assert await runtime.lease.first(5.0)
        try:
            store = runtime.copies[1]
            row = outbox_row(encode_order_id(1, unix_to_id_time(time.time()), 7), "pending", 0)
            order_id = row["order_id"]
            await insert(store, outbox, [{**row, "step": "refund"}])
            for _ in range(OUTBOX_ATTEMPTS_MAX):
                assert await runtime.orders.drain_outbox(store) == 0
            assert await runtime.orders.drain_outbox(store) == 0  # given up: not sent again
            (failed,) = await failed_outbox(store, 10)
            assert failed["status"] == "failed"
            assert failed["attempts"] == OUTBOX_ATTEMPTS_MAX
            assert failed["last_error"].startswith("not_found")
            await runtime.retention.sweep()
            assert runtime.retention.failed_steps[1] == 1
            assert await retry_outbox(store, order_id) == ["refund"]
            assert await failed_outbox(store, 10) == []
            await runtime.retention.sweep()
            assert runtime.retention.failed_steps[1] == 0
        finally:
            await runtime.lease.stop()
            await runtime.client.aclose()
            await runtime.copies.close()

    asyncio.run(run())


RETENTION_TOML = """
[retention]
outbox_done_s = 1
idempotency_keys_s = 600
reservations_finished_s = 1
reserve_window_s = 5
sweep_batch_rows = 10
sweep_interval_s = 0.3
"""


def metric(api: Any, region: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples at a region whose labels include `labels`."""
    total = 0.0
    for line in api.http.get(api.url(region, "/metrics")).text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_a_cluster_keeps_its_tables_bounded_under_a_steady_workload(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tests.replication_support import differences, wait_converged
    from tests.support import Api, free_ports, topology_toml
    from unitrade.cluster import LocalCluster
    from unitrade.outbox_cli import outbox as outbox_command
    from unitrade.topology.config import parse_config

    path = tmp_path / "topology.toml"
    path.write_text(topology_toml(free_ports(4)) + RETENTION_TOML)
    import tomllib

    config = parse_config(tomllib.loads(path.read_text()))
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            api.put_product("TEA", 1_000_000, price_cents=100)
            buyer = api.buyer_in("sh")  # u3 or u4, owned by sh; the center is at hz
            first = api.order("sh", buyer, [("TEA", 1)], idempotency_key="first-order")
            assert first.status_code == 201, first.text
            orders = 0
            # Until the center has deleted finished reservations (they are kept
            # reserve_window_s + margins), while orders keep being made and paid.
            deadline = time.monotonic() + 90
            swept = "unitrade_retention_deleted_rows_total"
            while metric(api, "hz", swept, table="reservations") < 5:
                assert time.monotonic() < deadline, "no reservation was ever deleted"
                made = api.order("bj", buyer, [("TEA", 1)])
                assert made.status_code == 201, made.text
                order = made.json()
                pay = {"payment_id": f"p-{order['order_id']}", "amount_cents": 100}
                paid = api.call("sh", "POST", f"/v1/orders/{order['order_id']}/pay", buyer, pay)
                assert paid.status_code == 200, paid.text
                orders += 1
            # A retry within idempotency_keys_s still answers the first order.
            again = api.order("hz", buyer, [("TEA", 1)], idempotency_key="first-order")
            assert again.status_code in (200, 201), again.text
            assert again.json()["order_id"] == first.json()["order_id"]
            # Done steps went while orders were being made: fewer kept than made.
            assert metric(api, "sh", "unitrade_retention_deleted_rows_total", table="outbox") > 0
            kept_steps = metric(api, "sh", "unitrade_retained_rows", table="outbox")
            assert kept_steps < orders, (kept_steps, orders)
            kept_reservations = metric(api, "hz", "unitrade_retained_rows", table="reservations")
            assert kept_reservations < orders + 1, (kept_reservations, orders)
            assert metric(api, "sh", "unitrade_outbox_failed_steps") == 0
            # Once the workload stops, the sweep deletes until only what must stay is left:
            # no done step, and the first order's live reservation. Then nothing changes
            # and every replica must have followed the deletes.
            deadline = time.monotonic() + 60
            while (
                metric(api, "sh", "unitrade_retained_rows", table="outbox") > 0
                or metric(api, "hz", "unitrade_retained_rows", table="reservations") > 1
            ):
                assert time.monotonic() < deadline, "the sweep did not catch up"
                time.sleep(0.2)
            wait_converged(config)
            assert differences(config, tmp_path / "data") == []
            runner = CliRunner()
            listed = runner.invoke(outbox_command, ["failed", "--config", str(path)])
            assert listed.exit_code == 0, listed.output
            assert "failed for good" in listed.output
            order_id = first.json()["order_id"]
            retry = ["retry", "--config", str(path), "--order", order_id]
            retried = runner.invoke(outbox_command, retry)
            assert retried.exit_code == 2, retried.output
            assert "no failed outbox step" in retried.output
        finally:
            api.http.close()


def test_revocations_go_once_their_tokens_have_expired(tmp_path: Path) -> None:
    """The global cell's owner deletes a revocation when its token has expired (the row
    goes through the changelog to every replica), and the in-memory set forgets it too."""
    from unitrade.services.revocations import Revocations
    from unitrade.storage.schema import revoked_tokens

    async def run() -> None:
        store = make_store(f"sqlite:///{tmp_path}/{{cell}}.db", RULE.global_cell, region="hz")
        await store.open()
        try:
            revocations = Revocations(store)
            now_s = int(time.time())
            await revocations.revoke("1" * 16, now_s + 3600)
            await revocations.revoke("0" * 16, now_s - 10)  # its token expired already
            deleted = await sweeper(store).sweep_cell(store)
            assert deleted == {"revoked_tokens": 1}
            assert await keys_of(store, revoked_tokens.c.token_id) == {"1" * 16}
            assert revocations.forget_expired() == 1
            assert "1" * 16 in revocations and "0" * 16 not in revocations
            await revocations.load()  # a restarted region reads the same
            assert len(revocations) == 1
        finally:
            await store.close()

    asyncio.run(run())


def sale_row(sale_id: str, ended_s_ago: int) -> dict[str, Any]:
    end = now_ms() - ended_s_ago * 1000
    return {
        "sale_id": sale_id,
        "sku": f"SKU-{sale_id}",
        "stock": 1,
        "tokens": 10,
        "per_buyer": 1,
        "segment_size": 5,
        "start_ms": end - 60_000,
        "end_ms": end,
        "remaining": 5,
        "segments": 1,
        "created_ms": end - 60_000,
        "updated_ms": end,
    }


def segment_row(sale_id: str) -> dict[str, Any]:
    stamp = now_ms() - 3_600_000
    return {
        "sale_id": sale_id,
        "segment_id": 1,
        "grant_id": "g" * 16,
        "region": "hz",
        "holder": "hz-1",
        "size": 5,
        "status": "returned",
        "used": 5,
        "returned": 0,
        "granted_ms": stamp,
        "expires_ms": stamp + 10_000,
        "updated_ms": stamp,
    }


def coupon_row(code: str, ended_s_ago: int) -> dict[str, Any]:
    end = now_ms() - ended_s_ago * 1000
    return {
        "code": code,
        "count": 10,
        "claimed": 1,
        "discount_kind": "cents",
        "discount_value": 100,
        "min_total_cents": 0,
        "end_ms": end,
        "created_ms": end - 60_000,
        "updated_ms": end,
    }


def claim_row(code: str, buyer: int) -> dict[str, Any]:
    return {
        "code": code,
        "buyer_id": buyer,
        "status": "claimed",
        "order_id": None,
        "discount_cents": 0,
        "claimed_ms": now_ms() - 120_000,
        "updated_ms": now_ms() - 120_000,
    }


def test_ended_sales_and_coupons_go_with_their_segments_claims_and_tokens(
    storage_url: str,
) -> None:
    """A sale's segments, then the sale, and its tokens in the buyers' cells go once it
    ended `sales_ended_s` ago; a coupon's claims, then the coupon, `coupons_ended_s` after
    its end. Running and recently ended ones stay, with everything they hold."""
    from unitrade.storage.schema import coupon_claims, coupons, sale_segments, sale_tokens, sales

    settings = RetentionConfig(sales_ended_s=10, coupons_ended_s=20, sweep_batch_rows=10)

    async def run() -> None:
        center = make_store(storage_url, CENTER, region="hz")
        unit = make_store(storage_url, 1, region="hz")
        await center.open()
        await unit.open()
        try:
            await insert(center, sales, [sale_row("a" * 12, 60), sale_row("b" * 12, 5)])
            await insert(center, sale_segments, [segment_row("a" * 12), segment_row("b" * 12)])
            await insert(center, coupons, [coupon_row("OLD", 60), coupon_row("NEW", 10)])
            # 15 claims of the old coupon: two batches.
            old_claims = [claim_row("OLD", buyer) for buyer in range(1, 16)]
            await insert(center, coupon_claims, [*old_claims, claim_row("NEW", 1)])
            tokens = []
            for i, (sale_id, ended_s_ago) in enumerate((("a" * 12, 60), ("b" * 12, 5))):
                tokens.append(
                    {
                        "token_id": f"{i:016x}",
                        "sale_id": sale_id,
                        "buyer_id": 100,
                        "segment_id": 1,
                        "status": "used",
                        "order_id": 5,
                        "sale_end_ms": now_ms() - ended_s_ago * 1000,
                        "created_ms": now_ms() - 120_000,
                        "updated_ms": now_ms() - 120_000,
                    }
                )
            await insert(unit, sale_tokens, tokens)
            copies: Any = {CENTER: center, 1: unit}
            sweep = RetentionSweeper(copies, settings, lambda: [CENTER, 1])
            deleted = await sweep.sweep_cell(center)
            assert deleted == {
                "probe_reservations": 0,
                "reservations": 0,
                "payment_claims": 0,
                "sale_segments": 1,
                "sales": 1,
                "coupon_claims": 15,
                "coupons": 1,
            }
            assert await keys_of(center, sales.c.sale_id) == {"b" * 12}
            assert await keys_of(center, sale_segments.c.sale_id) == {"b" * 12}
            assert await keys_of(center, coupons.c.code) == {"NEW"}
            assert await keys_of(center, coupon_claims.c.code) == {"NEW"}
            unit_deleted = await sweep.sweep_cell(unit)
            assert unit_deleted["sale_tokens"] == 1
            assert await keys_of(unit, sale_tokens.c.sale_id) == {"b" * 12}
            assert sweep.kept_rows[(CENTER, "sales")] == 1
            assert sweep.kept_rows[(1, "sale_tokens")] == 1
        finally:
            await center.close()
            await unit.close()

    asyncio.run(run())
