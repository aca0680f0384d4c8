"""Center inventory (docs/architecture.md): reserve on order creation, commit on payment, release on
close, return on refund. Runs only at the owner of the center cell; other regions reach it
through `center` RPC (services/remote.py).

Each step is keyed by order ID and idempotent: repeating a step that already happened is a
no-op that answers the same, so callers may retry freely. Stock never goes below zero
(every decrement is conditional on `column >= qty` inside the cell's serialised write
transaction) and `available + reserved + sold` changes only through `set_stock`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, select

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
from unitrade.services import coupons
from unitrade.services.sales import check_sale_rows, sale_reads
from unitrade.storage.schema import coupon_claims, inventory, reservations
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


@dataclass(frozen=True)
class Terms:
    """What an order's reservation checks and holds besides stock, in the same center
    transaction: the sale whose token the order carries (services/sales.py) and the
    buyer's coupon (services/coupons.py), priced on the order's subtotal."""

    buyer_id: int = 0
    sale_id: str | None = None
    coupon: str | None = None
    subtotal_cents: int = 0


NO_TERMS = Terms()


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


def _reserve_lines(tx: WriteTx, lines: Lines) -> None:
    """Every line's units from available to reserved, or refused as `_move` refuses, with
    the updates sent together (WriteTx.updates): a line refused rolls the whole
    transaction back, the other lines' updates with it."""
    stamp = now_ms()
    changes = [
        (
            {"sku": sku},
            {"updated_ms": stamp},
            {"available": -qty, "reserved": qty},
            {"available": qty},
        )
        for sku, qty in lines
    ]
    images = tx.updates(inventory, changes)
    for (sku, qty), image in zip(lines, images, strict=True):
        if image is None:
            _short(sku, qty, tx.get(inventory, {"sku": sku}))
            raise AssertionError(f"inventory of {sku} has available >= {qty} yet not moved")


def _short(sku: str, qty: int, row: Any) -> None:
    """Refuse as `_move` would when `row` (a SKU's inventory) cannot give `qty` units."""
    if row is None:
        raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
    if row.available < qty:
        raise InsufficientStock(
            f"only {row.available} of {sku!r} available, {qty} requested",
            sku=sku,
            available=row.available,
            requested=qty,
        )


def _refund_without_reservation(tx: WriteTx, order_id: int, lines: Lines) -> dict[str, Any]:
    """Return a paid order's units whose finished reservation retention deleted: sold back
    to available, and a `refunded` tombstone so that a retried refund moves nothing again
    (while the tombstone lives, reservations_finished_s: far longer than the outbox's
    retries)."""
    normalized = normalize_lines(lines)
    for sku, qty in normalized:
        _move(tx, sku, qty, "sold", "available", refuse=False)
    coupons.follow_step(tx, order_id, "refund")
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


# A reconciled order's reservation (`InventoryService.reinstate`): from the status it has
# now (None: no reservation) to the one the order needs, and the stock moved, as
# (column from, column to, refused when short). Held: the order is created or paid; not
# held: closed or refunded, so none of its units may stay reserved or sold.
_HELD: dict[str | None, tuple[str, tuple[str, str, bool] | None]] = {
    None: ("reserved", ("available", "reserved", True)),
    "released": ("reserved", ("available", "reserved", True)),
    "reserved": ("reserved", None),
    "committed": ("committed", None),
}
_NOT_HELD: dict[str | None, tuple[str, tuple[str, str, bool] | None]] = {
    None: ("none", None),
    "released": ("released", None),
    "refunded": ("refunded", None),
    "reserved": ("released", ("reserved", "available", False)),
    "committed": ("refunded", ("sold", "available", False)),
}


def reinstate_plan(
    order_id: int, current: str | None, hold: bool
) -> tuple[str, tuple[str, str, bool] | None]:
    """The status a reconciled order's reservation ends in and the stock it moves."""
    plan = (_HELD if hold else _NOT_HELD).get(current)
    if plan is None:
        raise Conflict(
            f"the reservation of order {order_id} is {current} at the center: "
            f"it cannot {'hold' if hold else 'return'} the order's stock"
        )
    return plan


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

    async def reserve(
        self, order_id: int, cell: int, lines: Lines, terms: Terms = NO_TERMS
    ) -> dict[str, Any]:
        """Reserve the order's stock, check its sale and hold its coupon, all or nothing;
        the answer carries the coupon's `discount_cents`. Repeating it answers the same."""
        lines = normalize_lines(lines)
        encoded = orjson.dumps(lines).decode()

        def work(tx: WriteTx) -> dict[str, Any]:
            # The reservation and the lines' sales, read together (WriteTx.each).
            found = tx.each([tx.get_call(reservations, {"order_id": order_id}), *sale_reads(lines)])
            existing = found[0][0] if found[0] else None
            if existing is not None:
                if existing.lines != encoded:
                    raise Conflict(f"order {order_id} already has a different reservation")
                code, discount = coupons.held_discount(tx, order_id)
                if terms.coupon is not None and code not in (None, terms.coupon):
                    raise Conflict(f"order {order_id} holds coupon {code}, not {terms.coupon}")
                return {
                    "order_id": str(order_id),
                    "status": existing.status,
                    "discount_cents": discount,
                }
            self._refuse_late(order_id)
            check_sale_rows(lines, found[1:], terms.sale_id)
            _reserve_lines(tx, lines)
            discount = 0
            if terms.coupon is not None:
                discount = coupons.hold(
                    tx, terms.coupon, terms.buyer_id, order_id, terms.subtotal_cents
                )
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
            return {"order_id": str(order_id), "status": "reserved", "discount_cents": discount}

        return await self.store.write(work)

    async def reinstate(
        self,
        order_id: int,
        cell: int,
        lines: Lines,
        hold: bool,
        dry_run: bool = False,
        coupon: coupons.CouponHold | None = None,
    ) -> dict[str, Any]:
        """Make the reservation of an order that reconcile writes again (control/reconcile.py)
        hold the order's stock (`hold`: the order is created or paid) or none of it
        (closed, refunded), whatever the reservation is now; idempotent by order ID.

        Unlike `reserve` it takes an order ID of any age: a quarantined order comes back
        long after the reserve window, and meanwhile the owner of its cell may have
        released its reservation as abandoned (it is reserved again, refused with
        insufficient_stock if the units are gone) or retention deleted it. A reservation
        held already gets a new `created_ms`, so that the abandoned-reservation sweep
        leaves it alone while the order is written (as for a new reserve). The order's
        `coupon` claim follows its reservation in the same transaction (coupons.py
        `reinstate_claim`). `dry_run` decides the same in a read and changes nothing."""
        lines = normalize_lines(lines)
        encoded = orjson.dumps(lines).decode()

        def check_lines(existing: Any) -> None:
            if existing.status in ("reserved", "committed") and existing.lines != encoded:
                raise Conflict(f"order {order_id} already has a different reservation")

        if dry_run:

            def look(conn: Connection) -> dict[str, Any]:
                existing = conn.execute(
                    by_key(reservations), key_params({"order_id": order_id})
                ).first()
                if existing is not None:
                    check_lines(existing)
                status, move = reinstate_plan(
                    order_id, None if existing is None else existing.status, hold
                )
                if move is not None and move[2]:
                    for sku, qty in lines:
                        row = conn.execute(by_key(inventory), key_params({"sku": sku})).first()
                        _short(sku, qty, row)
                if coupon is not None:
                    claim_key = {"code": coupon.code, "buyer_id": coupon.buyer_id}
                    claim = conn.execute(by_key(coupon_claims), key_params(claim_key)).first()
                    coupons.check_reinstate(claim, coupon, order_id)
                return {"order_id": str(order_id), "status": status}

            return await self.store.read(look)

        def work(tx: WriteTx) -> dict[str, Any]:
            # The reservation and the lines' sales, read together (WriteTx.each).
            found = tx.each([tx.get_call(reservations, {"order_id": order_id}), *sale_reads(lines)])
            existing = found[0][0] if found[0] else None
            if existing is not None:
                check_lines(existing)
            current = None if existing is None else existing.status
            status, move = reinstate_plan(order_id, current, hold)
            if move is not None:
                source, target, refuse = move
                for sku, qty in lines:
                    _move(tx, sku, qty, source, target, refuse=refuse)
            stamp = now_ms()
            if existing is None:
                if status != "none":
                    tx.insert(
                        reservations,
                        {
                            "order_id": order_id,
                            "cell_id": cell,
                            "status": status,
                            "lines": encoded,
                            "created_ms": stamp,
                            "updated_ms": stamp,
                        },
                    )
            elif move is not None or status == "reserved":
                values = {"status": status, "lines": encoded, "updated_ms": stamp}
                if status == "reserved":
                    values.update(cell_id=cell, created_ms=stamp)
                tx.update(reservations, {"order_id": order_id}, values)
            if coupon is not None:
                coupons.reinstate_claim(tx, coupon, order_id, status)
            return {"order_id": str(order_id), "status": status}

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
            coupons.follow_step(tx, order_id, step)
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
