"""Applying an owner's changelog to a replica copy: exactly once, in order, never re-captured."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from tests.storage_support import make_store
from unitrade.errors import WrongRegion
from unitrade.storage.schema import carts, changelog, orders
from unitrade.storage.store import CellStore


async def rows(store: CellStore, table: Any) -> list[dict[str, Any]]:
    statement = select(table).order_by(*table.primary_key.columns)
    return await store.read(lambda conn: [dict(r) for r in conn.execute(statement).mappings()])


async def owner_and_replica(url: str) -> tuple[CellStore, CellStore]:
    owner = make_store(url.replace("{cell}", "hz-{cell}"), 1, region="hz")  # hz owns u1
    replica = make_store(url.replace("{cell}", "sh-{cell}"), 1, region="sh")
    await owner.open()
    await replica.open()
    for i in range(1, 6):
        row = {"buyer_id": i, "sku": "A", "qty": i, "updated_ms": 0}
        await owner.write(lambda tx, row=row: tx.insert(carts, row))
    await owner.write(lambda tx: tx.update(carts, {"buyer_id": 2, "sku": "A"}, {"qty": 20}))
    await owner.write(lambda tx: tx.delete(carts, {"buyer_id": 3, "sku": "A"}))
    return owner, replica


def test_apply_makes_the_replica_equal_and_is_exactly_once(storage_url: str) -> None:
    async def scenario() -> None:
        owner, replica = await owner_and_replica(storage_url)
        try:
            changes = await owner.changes_since(0, 100)
            assert [c["position"] for c in changes] == list(range(1, 8))
            assert await replica.apply(changes) == 7
            assert await rows(replica, carts) == await rows(owner, carts)
            # The replica holds the same changelog, not a new capture of its own.
            assert await rows(replica, changelog) == await rows(owner, changelog)
            assert await replica.last_position() == 7
            # Duplicated batches change nothing.
            assert await replica.apply(changes) == 7
            assert await replica.apply(changes[2:4]) == 7
            assert await rows(replica, changelog) == await rows(owner, changelog)
        finally:
            await owner.close()
            await replica.close()

    asyncio.run(scenario())


def test_a_reordered_batch_applies_only_what_is_contiguous(storage_url: str) -> None:
    async def scenario() -> None:
        owner, replica = await owner_and_replica(storage_url)
        try:
            changes = await owner.changes_since(0, 100)
            assert await replica.apply(changes[3:]) == 0  # starts after a gap: nothing
            assert await replica.apply([changes[1], changes[0], changes[4]]) == 2
            assert await replica.apply(list(reversed(changes))) == 7
            assert await rows(replica, carts) == await rows(owner, carts)
        finally:
            await owner.close()
            await replica.close()

    asyncio.run(scenario())


def test_a_region_never_applies_to_a_cell_it_owns(storage_url: str) -> None:
    async def scenario() -> None:
        owner, replica = await owner_and_replica(storage_url)
        try:
            with pytest.raises(WrongRegion):
                await owner.apply(await owner.changes_since(0, 10))
            assert await rows(owner, orders) == []
        finally:
            await owner.close()
            await replica.close()

    asyncio.run(scenario())


def test_waiting_for_a_position(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        owner, replica = await owner_and_replica(f"sqlite:///{tmp_path}/{{cell}}.db")
        try:
            assert await owner.wait_beyond(7, 0.05) == 7  # nothing new: times out
            row = {"buyer_id": 9, "sku": "B", "qty": 1, "updated_ms": 0}
            later = asyncio.get_running_loop().call_later(
                0.1, lambda: asyncio.ensure_future(owner.write(lambda tx: tx.insert(carts, row)))
            )
            assert await owner.wait_beyond(7, 5.0) == 8
            later.cancel()
        finally:
            await owner.close()
            await replica.close()

    asyncio.run(scenario())


def test_the_contiguous_changes_after_a_checkpoint() -> None:
    from unitrade.storage.store import _contiguous_after

    def batch(*positions: int) -> list[dict[str, int]]:
        return [{"position": p} for p in positions]

    def after(checkpoint: int, changes: list[dict[str, int]]) -> list[int]:
        return [c["position"] for c in _contiguous_after(checkpoint, changes)]

    assert after(0, batch(1, 2, 3)) == [1, 2, 3]
    assert after(2, batch(1, 2, 3, 4)) == [3, 4]  # duplicates skipped
    assert after(4, batch(1, 2, 3, 4)) == []  # all applied before
    assert after(0, batch(2, 3)) == []  # a gap before the first
    assert after(0, batch()) == []
    assert after(0, batch(3, 1, 2)) == [1, 2, 3]  # reordered
    assert after(0, batch(1, 2, 4, 5)) == [1, 2]  # a gap ends the batch
    assert after(1, batch(2, 2, 3)) == [2, 3]  # a duplicate within
    as_text = [{"position": "1"}, {"position": "2"}]
    assert [c["position"] for c in _contiguous_after(0, as_text)] == ["1", "2"]
