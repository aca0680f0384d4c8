"""The quarantine of a copy after a failover (storage/quarantine.py), on SQLite and
PostgreSQL: which rows diverge, that they move out in one transaction with the copy emptied,
and the retention of decided entries."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tests.storage_support import RULE, make_store
from unitrade.storage import quarantine
from unitrade.storage.store import now_ms
from unitrade.topology.rule import Promotion

CELL = 1  # u1, owned by hz in RULE: its copy at sh is a replica


def cart_change(position: int, epoch: int, sku: str, qty: int) -> dict[str, Any]:
    row = {"buyer_id": 7, "sku": sku, "qty": qty, "updated_ms": 1_000 + position}
    return {
        "position": position,
        "epoch": epoch,
        "origin": "hz",
        "tbl": "carts",
        "pk": orjson.dumps({"buyer_id": 7, "sku": sku}).decode(),
        "op": "i",
        "row_image": orjson.dumps(row).decode(),
        "created_ms": 1_000 + position,
    }


def promotion(position: int, version: int) -> Promotion:
    return Promotion(version=version, position=position, source="hz", to="bj", id_time_s=1)


def test_a_copy_beyond_the_promotion_moves_its_tail_out_and_is_emptied(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, CELL, region="sh")
        await store.open()
        try:
            # Positions 1-5: what the promoted copy had; 6-8: the lost owner's tail, written
            # under the epoch before the failover (rule version 1 < 3).
            await store.apply([cart_change(p, 1, f"S{p}", p) for p in range(1, 9)])
            assert store.position == 8
            assert await quarantine.settle(store, [promotion(5, 3)]) == 3
            assert store.position == 0  # emptied: rebuilt from the owner next
            entries = await quarantine.entries(store, 100)
            assert [e["position"] for e in entries] == [6, 7, 8]
            assert entries[0]["what"] == "cart of buyer 7: S6 x 6"
            assert {e["state"] for e in entries} == {"held"}
            assert await quarantine.counts(store) == {"held": 3}
            rows = await store.read(lambda conn: conn.exec_driver_sql("SELECT * FROM carts").all())
            assert rows == []
            # Checked again (a restart): nothing more moves, nothing is lost.
            assert await quarantine.settle(store, [promotion(5, 3)]) == 0
            assert await quarantine.counts(store) == {"held": 3}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_copy_that_followed_the_new_owner_has_not_diverged(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, CELL, region="sh")
        await store.open()
        try:
            # 1-5 from the old owner, 6-8 from the new one under its epochs (>= 3).
            await store.apply([cart_change(p, 1, f"S{p}", p) for p in range(1, 6)])
            await store.apply([cart_change(p, 4, f"S{p}", p) for p in range(6, 9)])
            assert await quarantine.settle(store, [promotion(5, 3)]) == 0
            assert store.position == 8
            # A second failover later: only rows past its own position and under older
            # epochs diverge.
            await store.apply([cart_change(p, 4, f"S{p}", p) for p in range(9, 11)])
            history = [promotion(5, 3), promotion(8, 6)]
            assert await quarantine.settle(store, history) == 2
            assert [e["position"] for e in await quarantine.entries(store, 10)] == [9, 10]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_decided_entries_are_swept_and_held_ones_kept(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, CELL, region="sh")
        await store.open()
        try:
            await store.apply([cart_change(p, 1, f"S{p}", p) for p in range(1, 5)])
            assert await quarantine.settle(store, [promotion(0, 3)]) == 4
            marks = [
                {"promotion_version": 3, "position": p, "state": "reapplied", "note": ""}
                for p in (1, 2)
            ]
            assert await quarantine.mark(store, marks) == 2
            # Not old enough yet: nothing goes.
            assert await quarantine.sweep(store, now_ms() - 60_000, 10) == 0
            assert await quarantine.sweep(store, now_ms() + 1, 1) == 1  # a batch of one
            assert await quarantine.sweep(store, now_ms() + 1, 10) == 1
            assert await quarantine.counts(store) == {"held": 2}
        finally:
            await store.close()

    asyncio.run(scenario())


assert RULE.owner_of(CELL) == "hz"
