"""The health checker's synthetic orders at a region (topology/probes.py): deleted soon at
their owner, and left out of the counts of business rows.

A probe order is created and closed at once, so its stock is already back; what stays is
its rows in the unit cell (order, lines, the buyer's index, outbox) and its finished
reservation at the center. The retention sweep (services/retention.py) deletes them,
through the fenced write path like any sweep so every replica follows:

- in a unit cell, probe orders once `[retention] probe_orders_s` old, with all their rows.
  One still `created` (its close failed) leaves a reservation that the owner's release of
  abandoned reservations gives back (services/orders.py), since its order no longer exists;
- at the center, released probe reservations once no late reserve can bring them back (the
  same age guard as every finished reservation, services/retention.py). Only those created
  in the last PROBE_RESERVATION_WINDOW_S before that guard are looked at, so the sweep reads
  a short range of the status index, never every released reservation; one it missed (the
  center was being switched that long) goes with the ordinary reservations' retention.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, bindparam, func, select

from unitrade.storage.schema import (
    buyer_orders,
    idempotency_keys,
    order_lines,
    orders,
    outbox,
    reservations,
)
from unitrade.storage.store import ROWS_PER_WRITE_MAX, CellStore, WriteTx
from unitrade.topology.probes import PROBE_BUYER_MIN, PROBE_LINES

PROBE_ORDERS = "probe_orders"  # the `table` label of probe rows in retention metrics
PROBE_RESERVATIONS = "probe_reservations"
PROBE_RESERVATION_WINDOW_S = 900
# Rows one probe order may have at most: the order, 100 lines, 3 outbox steps, the buyer's
# index, an idempotency key. A batch stops before it could pass ROWS_PER_WRITE_MAX.
_ROWS_PER_ORDER_MAX = 106

# Built once: the inline SQLite write path caches statements by identity.
_PROBE_ORDERS = (
    select(buyer_orders.c.buyer_id, buyer_orders.c.created_ms, buyer_orders.c.order_id)
    .where(
        buyer_orders.c.buyer_id >= bindparam("probe_min"),
        buyer_orders.c.created_ms < bindparam("before_ms"),
    )
    .limit(bindparam("n"))
)
_LINES = select(order_lines.c.line_no).where(order_lines.c.order_id == bindparam("order_id"))
_STEPS = select(outbox.c.step).where(outbox.c.order_id == bindparam("order_id"))
_PROBE_RESERVATIONS = (
    select(reservations.c.order_id)
    .where(
        reservations.c.status == "released",
        reservations.c.created_ms < bindparam("created_before_ms"),
        reservations.c.created_ms >= bindparam("created_after_ms"),
        reservations.c.lines == bindparam("probe_lines"),
    )
    .limit(bindparam("n"))
)

# Counts for /metrics: business rows without the probes', and the probes' on their own.
_PROBE_ORDER_IDS = select(buyer_orders.c.order_id).where(
    buyer_orders.c.buyer_id >= bindparam("probe_min")
)
BUSINESS_COUNTS: dict[str, Select[Any]] = {
    outbox.name: select(func.count())
    .select_from(outbox)
    .where(outbox.c.order_id.not_in(_PROBE_ORDER_IDS.scalar_subquery())),
    reservations.name: select(func.count())
    .select_from(reservations)
    .where(reservations.c.lines != bindparam("probe_lines")),
}
PROBE_COUNTS: dict[str, Select[Any]] = {
    PROBE_ORDERS: select(func.count())
    .select_from(buyer_orders)
    .where(buyer_orders.c.buyer_id >= bindparam("probe_min")),
    PROBE_RESERVATIONS: select(func.count())
    .select_from(reservations)
    .where(reservations.c.lines == bindparam("probe_lines")),
}
COUNT_PARAMS = {"probe_min": PROBE_BUYER_MIN, "probe_lines": PROBE_LINES}


async def delete_probe_orders(
    store: CellStore, before_ms: int, batch_rows: int
) -> tuple[int, bool]:
    """Delete one batch of probe orders of an owned unit cell created before `before_ms`,
    with every row they have; (orders deleted, whether more may be left)."""
    rows_max = max(_ROWS_PER_ORDER_MAX, min(batch_rows, ROWS_PER_WRITE_MAX))
    limit = max(1, rows_max // 4)  # a probe order has 4 rows; the loop stops early if not
    params = {"probe_min": PROBE_BUYER_MIN, "before_ms": before_ms, "n": limit}

    def work(tx: WriteTx) -> tuple[int, bool]:
        found = tx.all(_PROBE_ORDERS, params)
        rows = 0
        for done, index in enumerate(found):
            if rows + _ROWS_PER_ORDER_MAX > rows_max:
                return done, True
            order_id = index.order_id
            for line in tx.all(_LINES, {"order_id": order_id}):
                tx.delete(order_lines, {"order_id": order_id, "line_no": line.line_no})
                rows += 1
            for step in tx.all(_STEPS, {"order_id": order_id}):
                tx.delete(outbox, {"order_id": order_id, "step": step.step})
                rows += 1
            row = tx.get(orders, {"order_id": order_id})
            if row is not None:
                if row.idempotency_key is not None:
                    key = {"buyer_id": row.buyer_id, "idempotency_key": row.idempotency_key}
                    rows += tx.delete(idempotency_keys, key)
                tx.delete(orders, {"order_id": order_id})
                rows += 1
            tx.delete(buyer_orders, dict(index._mapping))
            rows += 1
        return len(found), len(found) == limit

    return await store.write(work)


async def delete_probe_reservations(
    store: CellStore, created_before_ms: int, batch_rows: int
) -> int:
    """Delete one batch of released probe reservations of the center created before
    `created_before_ms` (and within the window before it); the number deleted."""
    params = {
        "created_before_ms": created_before_ms,
        "created_after_ms": created_before_ms - PROBE_RESERVATION_WINDOW_S * 1000,
        "probe_lines": PROBE_LINES,
        "n": min(batch_rows, ROWS_PER_WRITE_MAX),
    }

    def work(tx: WriteTx) -> int:
        found = tx.all(_PROBE_RESERVATIONS, params)
        for row in found:
            tx.delete(reservations, {"order_id": row.order_id})
        return len(found)

    return await store.write(work)
