"""The owner's tail of encoded changelog rows: a pull served from it gets exactly what the
database holds, and whatever the tail cannot vouch for goes to the database."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from tests.storage_support import make_store
from unitrade.storage.schema import carts
from unitrade.storage.store import CellStore
from unitrade.storage.tail import ChangelogTail, encoded_array


def change(position: int, image: str = "{}") -> dict[str, Any]:
    return {"position": position, "tbl": "carts", "op": "u", "row_image": image}


def positions(rows: list[bytes] | None) -> list[int] | None:
    return None if rows is None else [orjson.loads(r)["position"] for r in rows]


def test_the_tail_answers_only_what_it_holds_up_to_the_position() -> None:
    tail = ChangelogTail(rows_max=4)  # holds 4 rows, 5 before it trims
    tail.add([change(1), change(2)])
    tail.add([change(3)])
    assert (tail.first, tail.last) == (1, 3)
    assert positions(tail.since(0, 10, position=3)) == [1, 2, 3]
    assert positions(tail.since(1, 1, position=3)) == [2]
    assert tail.since(3, 10, position=3) == []  # caught up
    assert tail.since(3, 10, position=4) is None  # a commit the tail has not seen
    tail.add([change(4), change(5), change(6)])  # over the bound: the oldest go
    assert (tail.first, tail.last, len(tail)) == (3, 6, 4)
    assert tail.since(1, 10, position=6) is None  # position 2 is gone: the database answers
    assert positions(tail.since(2, 10, position=6)) == [3, 4, 5, 6]
    assert positions(tail.since(4, 10, position=6)) == [5, 6]


def test_a_gap_starts_the_tail_again_and_bytes_are_bounded() -> None:
    tail = ChangelogTail(rows_max=100)
    tail.add([change(1), change(2)])
    tail.add([change(5)])  # rows 3-4 committed elsewhere: never serve across the gap
    assert (tail.first, tail.last) == (5, 5)
    assert tail.since(2, 10, position=5) is None
    big = ChangelogTail(rows_max=100, bytes_max=350)  # ~150 bytes a row
    big.add([change(1, "x" * 90), change(2, "y" * 90), change(3, "z" * 90)])
    assert (big.first, big.last) == (2, 3)
    assert orjson.loads(orjson.dumps(encoded_array(big.since(1, 10, position=3) or []))) == [
        orjson.loads(orjson.dumps(change(2, "y" * 90))),
        orjson.loads(orjson.dumps(change(3, "z" * 90))),
    ]


async def _both(store: CellStore, after: int) -> tuple[Any, Any]:
    """What a pull sends from `after`, and the database's rows, both as decoded JSON."""
    sent = orjson.loads(
        orjson.dumps(encoded_array(await store.encoded_changes_since(after, 1_000)))
    )
    held = orjson.loads(orjson.dumps(await store.changes_since(after, 1_000)))
    return sent, held


def test_pulls_get_exactly_the_database_rows(storage_url: str) -> None:
    async def scenario() -> None:
        owner = make_store(storage_url, 1)
        await owner.open()
        try:
            for qty in range(1, 6):
                key = {"buyer_id": qty, "sku": "A"}
                await owner.write(
                    lambda tx, key=key, qty=qty: tx.insert(
                        carts, {**key, "qty": qty, "updated_ms": qty}
                    )
                )
                await owner.write(lambda tx, key=key: tx.update(carts, key, {"qty": 9}))
            assert owner.position == 10
            assert owner._tail.last == 10  # served from the tail, not the database
            for after in range(0, 11):
                sent, held = await _both(owner, after)
                assert sent == held and len(sent) == 10 - after
        finally:
            await owner.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["apply", "restored"])
def test_a_copy_changed_other_than_by_its_own_writes_reads_from_the_database(
    storage_url: str, how: str
) -> None:
    async def scenario() -> None:
        owner = make_store(storage_url, 1)
        await owner.open()
        try:
            await owner.write(
                lambda tx: tx.insert(carts, {"buyer_id": 1, "sku": "A", "qty": 1, "updated_ms": 0})
            )
            assert owner._tail.last == 1
            if how == "apply":
                # A store that was an owner and became a replica: its changelog now grows by
                # applying another copy's rows, which the tail never saw.
                owner.region = "sh"
                await owner.apply([{**(await owner.changes_since(0, 1))[0], "position": 2}])
            else:
                owner.restored(1)
            assert len(owner._tail) == 0
            sent, held = await _both(owner, 0)
            assert sent == held
        finally:
            await owner.close()

    asyncio.run(scenario())
