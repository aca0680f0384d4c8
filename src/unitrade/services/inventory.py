"""Center inventory (docs/architecture.md): reserve on order creation, commit on payment, release on
close, return on refund. Runs only at the owner of the center cell; other regions reach it
through `center` RPC (services/remote.py).

Each step is keyed by order ID and idempotent: repeating a step that already happened is a
no-op that answers the same, so callers may retry freely. Stock never goes below zero
(every decrement is conditional on `column >= qty` inside the cell's serialised write
transaction) and `available + reserved + sold` changes only through `set_stock`.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import bindparam, select

from unitrade.errors import (
    Conflict,
    IllegalTransition,
    InsufficientStock,
    InvalidRequest,
    NotFound,
    OrderTimedOut,
    StockBelowCommitted,
    UnknownSku,
)
from unitrade.storage.schema import inventory, reservations
from unitrade.storage.store import CellStore, WriteTx, by_key, key_params, now_ms
from unitrade.topology.order_id import decode_order_id, unix_to_id_time

Lines = list[tuple[str, int]]
LINES_MAX = 100

# step -> (status it starts from, status it ends in, column moved from, column moved to)
_STEPS: dict[str, tuple[str, str, str, str]] = {
    "commit": ("reserved", "committed", "reserved", "sold"),
    "release": ("reserved", "released", "reserved", "available"),
    "refund": ("committed", "refunded", "sold", "available"),
}


_STALE = (
    select(reservations.c.order_id)
    .where(
        reservations.c.status == "reserved",
        reservations.c.created_ms < bindparam("before"),
        reservations.c.cell_id == bindparam("cell"),
    )
    .order_by(reservations.c.created_ms)
    .limit(bindparam("n"))
)


def normalize_lines(lines: Lines) -> Lines:
    """Merge repeated SKUs and sort by SKU (a stable key for idempotency checks)."""
    merged: dict[str, int] = {}
    for sku, qty in lines:
        assert qty > 0, "quantities are positive"
        merged[sku] = merged.get(sku, 0) + qty
    assert 1 <= len(merged) <= LINES_MAX
    return sorted(merged.items())


def _move(tx: WriteTx, sku: str, qty: int, source: str, target: str, refuse: bool) -> None:
    image = tx.update(
        inventory,
        {"sku": sku},
        {"updated_ms": now_ms()},
        add={source: -qty, target: qty},
        at_least={source: qty},
    )
    if image is not None:
        return
    row = tx.get(inventory, {"sku": sku})
    if row is None:
        raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
    if refuse:
        raise InsufficientStock(
            f"only {row.available} of {sku!r} available, {qty} requested",
            sku=sku,
            available=row.available,
            requested=qty,
        )
    raise AssertionError(f"inventory of {sku} has {source}={row._mapping[source]} < {qty}")


def _refund_without_reservation(tx: WriteTx, order_id: int, lines: Lines) -> dict[str, Any]:
    """Return a paid order's units whose finished reservation retention deleted: sold back
    to available, and a `refunded` tombstone so that a retried refund moves nothing again
    (while the tombstone lives, reservations_finished_s: far longer than the outbox's
    retries)."""
    normalized = normalize_lines(lines)
    for sku, qty in normalized:
        _move(tx, sku, qty, "sold", "available", refuse=False)
    stamp = now_ms()
    tombstone = {
        "order_id": order_id,
        "cell_id": 0,
        "status": "refunded",
        "lines": orjson.dumps(normalized).decode(),
        "created_ms": stamp,
        "updated_ms": stamp,
    }
    tx.insert(reservations, tombstone)
    return {"order_id": str(order_id), "status": "refunded"}


def _levels(row: Any) -> dict[str, int]:
    return {"available": row["available"], "reserved": row["reserved"], "sold": row["sold"]}


class InventoryService:
    """`reserve_window_s`: a reserve for an order whose ID is older than this is refused
    (None: not checked, for tests with made-up order IDs). The retention sweep deletes
    finished reservations only once no reserve for them can be accepted any more, so a
    late reserve never resurrects a deleted one (services/retention.py)."""

    def __init__(self, store: CellStore, reserve_window_s: float | None = None) -> None:
        self.store = store
        self.reserve_window_s = reserve_window_s

    def _refuse_late(self, order_id: int) -> None:
        if self.reserve_window_s is None:
            return
        try:
            id_time_s = decode_order_id(order_id).time_s
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        age_s = unix_to_id_time(now_ms() / 1000) - id_time_s
        if age_s > self.reserve_window_s:
            raise OrderTimedOut(
                f"order {order_id} is {age_s} s old: a reserve later than "
                f"{self.reserve_window_s:g} s after the order ID is refused; retry the order"
            )

    async def reserve(self, order_id: int, cell: int, lines: Lines) -> dict[str, Any]:
        lines = normalize_lines(lines)
        encoded = orjson.dumps(lines).decode()

        def work(tx: WriteTx) -> dict[str, Any]:
            existing = tx.get(reservations, {"order_id": order_id})
            if existing is not None:
                if existing.lines != encoded:
                    raise Conflict(f"order {order_id} already has a different reservation")
                return {"order_id": str(order_id), "status": existing.status}
            self._refuse_late(order_id)
            for sku, qty in lines:
                _move(tx, sku, qty, "available", "reserved", refuse=True)
            stamp = now_ms()
            tx.insert(
                reservations,
                {
                    "order_id": order_id,
                    "cell_id": cell,
                    "status": "reserved",
                    "lines": encoded,
                    "created_ms": stamp,
                    "updated_ms": stamp,
                },
            )
            return {"order_id": str(order_id), "status": "reserved"}

        return await self.store.write(work)

    async def step(self, order_id: int, step: str, lines: Lines | None = None) -> dict[str, Any]:
        """commit, release or refund the reservation of an order (idempotent). A refund
        carries the order's lines: the reservation it returns stock from may have been
        deleted by retention (reservations_finished_s after the order was paid)."""
        start, end, source, target = _STEPS[step]

        def work(tx: WriteTx) -> dict[str, Any]:
            row = tx.get(reservations, {"order_id": order_id})
            if row is None and step == "refund" and lines:
                return _refund_without_reservation(tx, order_id, lines)
            if row is None:
                if step != "release":
                    raise NotFound(f"no reservation for order {order_id}")
                # A release that overtook its reserve (a timed-out create): leave a tombstone
                # so that the late reserve is refused instead of holding stock forever.
                stamp = now_ms()
                tx.insert(
                    reservations,
                    {
                        "order_id": order_id,
                        "cell_id": 0,
                        "status": "released",
                        "lines": "[]",
                        "created_ms": stamp,
                        "updated_ms": stamp,
                    },
                )
                return {"order_id": str(order_id), "status": "released"}
            if row.status == end:
                return {"order_id": str(order_id), "status": end}
            if row.status != start:
                raise IllegalTransition(
                    f"reservation of order {order_id} is {row.status}; cannot {step}"
                )
            for sku, qty in orjson.loads(row.lines):
                _move(tx, sku, qty, source, target, refuse=False)
            tx.update(reservations, {"order_id": order_id}, {"status": end, "updated_ms": now_ms()})
            return {"order_id": str(order_id), "status": end}

        return await self.store.write(work)

    async def set_stock(self, sku: str, total: int) -> dict[str, Any]:
        """Set the total number of units (available + reserved + sold) of a SKU."""
        assert total >= 0

        def work(tx: WriteTx) -> dict[str, Any]:
            row = tx.get(inventory, {"sku": sku})
            if row is None:
                values = {"available": total, "reserved": 0, "sold": 0, "updated_ms": now_ms()}
                tx.insert(inventory, {"sku": sku, **values})
                return {"sku": sku, **_levels(values)}
            committed = row.reserved + row.sold
            if total < committed:
                raise StockBelowCommitted(
                    f"stock {total} of {sku!r} is below reserved + sold = {committed}",
                    sku=sku,
                    reserved=row.reserved,
                    sold=row.sold,
                )
            image = tx.update(
                inventory, {"sku": sku}, {"available": total - committed, "updated_ms": now_ms()}
            )
            assert image is not None
            return {"sku": sku, **_levels(image)}

        return await self.store.write(work)

    async def stale(self, cell: int, older_than_ms: int, limit: int) -> list[int]:
        """Order IDs of `cell` whose stock is still only reserved after `older_than_ms`."""
        params = {"cell": cell, "before": now_ms() - older_than_ms, "n": limit}
        rows = await self.store.read(lambda conn: conn.execute(_STALE, params).all())
        return [r.order_id for r in rows]

    async def levels(self, sku: str) -> dict[str, Any]:
        statement, params = by_key(inventory), key_params({"sku": sku})
        row = await self.store.read(lambda conn: conn.execute(statement, params).first())
        if row is None:
            raise NotFound(f"no inventory for SKU {sku!r}")
        return {"sku": sku, **_levels(row._mapping)}
