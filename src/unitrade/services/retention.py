"""Retention of the business tables that grow with traffic (`[retention]` settings).

Every `sweep_interval_s` a region deletes, in the cells it owns, the rows nobody needs any
more, in batches of `sweep_batch_rows`, through the fenced write path (`CellStore.write`):
the deletes are captured in the changelog like any write, so every replica deletes the
same rows and the copies stay identical. A cell being switched (write_banned,
wrong_region) is skipped; its next owner sweeps it.

- `outbox`: steps sent to the center (`done`) once `outbox_done_s` old. Steps that failed
  for good (`failed`) stay, for an operator (`unitrade outbox failed`).
- `idempotency_keys`: once `idempotency_keys_s` old. A retry with the same key after that
  creates a new order (as with Stripe's 24 h keys).
- `revoked_tokens` (global cell): once the token they name has expired.
- flash sales: `sale_tokens` (unit cells, by the sale's end each token carries),
  `sale_segments` and then `sales` (center cell) once the sale ended `sales_ended_s` ago;
  coupons: `coupon_claims` and then `coupons` once the coupon ended `coupons_ended_s` ago.
  Children go first; a definition goes only when none of its children is left.
- `reservations` (center cell): finished ones (committed, released, refunded) once
  `reservations_finished_s` old AND older than `reserve_window_s` plus a clock margin. The
  center refuses a reserve for an order ID older than `reserve_window_s`, so a very late
  reserve can never recreate a reservation (and hold stock) after its tombstone is gone. A
  late commit, refund or release of a deleted reservation moves no stock: commit and refund
  answer not_found, release leaves a new empty tombstone.
- `payment_claims` (center cell): once `payment_claims_s` old. A payment ID is then unique
  across the cluster within that window only (within its unit cell, whose `payments` rows
  are kept, for ever): a pay of a claim's own order after that is answered from the order.

The sweep also deletes the health checker's synthetic orders and their reservations
(services/probe_data.py), and counts what each owned copy keeps (one COUNT per table and
sweep, never per scrape) and the outbox steps that failed for good, for `/metrics`. The
counts of outbox steps and reservations leave the synthetic ones out: those are counted
under tables `probe_orders` and `probe_reservations`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Table,
    bindparam,
    exists,
    func,
    or_,
    select,
)

from unitrade.errors import WriteBanned, WrongRegion
from unitrade.services.probe_data import (
    BUSINESS_COUNTS,
    COUNT_PARAMS,
    PROBE_COUNTS,
    PROBE_ORDERS,
    PROBE_RESERVATIONS,
    delete_probe_orders,
    delete_probe_reservations,
)
from unitrade.storage.copies import CellCopies
from unitrade.storage.schema import (
    coupon_claims,
    coupons,
    idempotency_keys,
    outbox,
    payment_claims,
    reservations,
    revoked_tokens,
    sale_segments,
    sale_tokens,
    sales,
)
from unitrade.storage.sequences import AHEAD_S_MAX
from unitrade.storage.store import ROWS_PER_WRITE_MAX, CellStore, WriteTx, now_ms
from unitrade.topology.config import CellKind, RetentionConfig

log = logging.getLogger("unitrade.retention")

FINISHED_RESERVATIONS = ("committed", "released", "refunded")
# Clocks of the region that allocated an order ID and of the center may differ by this.
CLOCK_SKEW_S_MAX = 5
# Batches per table and sweep: a sweep that cannot catch up finishes next time, and the
# cell's writers get the lock in between.
BATCHES_PER_SWEEP_MAX = 100


@dataclass(frozen=True)
class Expiry:
    """Which rows of a table may go: `where` reads bind parameters `before_ms` (rows last
    changed before it) and `created_before_ms`."""

    table: Table
    kind: CellKind
    where: Callable[[], list[ColumnElement[bool]]]
    age_column: str


EXPIRIES = (
    Expiry(
        outbox,
        CellKind.UNIT,
        lambda: [outbox.c.status == "done", outbox.c.updated_ms < bindparam("before_ms")],
        "updated_ms",
    ),
    Expiry(
        idempotency_keys,
        CellKind.UNIT,
        lambda: [idempotency_keys.c.created_ms < bindparam("before_ms")],
        "created_ms",
    ),
    Expiry(
        revoked_tokens,
        CellKind.GLOBAL,
        # A revocation outlives its token by nothing: once the token has expired, the
        # token check refuses it anyway.
        lambda: [revoked_tokens.c.expires_s < bindparam("before_s")],
        "expires_s",
    ),
    Expiry(
        reservations,
        CellKind.CENTER,
        lambda: [
            # Equalities, not IN: the inline SQLite write path takes no expanding lists.
            or_(*(reservations.c.status == s for s in FINISHED_RESERVATIONS)),
            reservations.c.updated_ms < bindparam("before_ms"),
            reservations.c.created_ms < bindparam("created_before_ms"),
        ],
        "updated_ms",
    ),
    Expiry(
        payment_claims,
        CellKind.CENTER,
        lambda: [payment_claims.c.created_ms < bindparam("before_ms")],
        "created_ms",
    ),
    Expiry(
        sale_tokens,
        CellKind.UNIT,
        lambda: [sale_tokens.c.sale_end_ms < bindparam("before_ms")],
        "sale_end_ms",
    ),
    # Children before their definitions, within one sweep.
    Expiry(
        sale_segments,
        CellKind.CENTER,
        lambda: [
            sale_segments.c.sale_id.in_(
                select(sales.c.sale_id).where(sales.c.end_ms < bindparam("before_ms"))
            )
        ],
        "granted_ms",
    ),
    Expiry(
        sales,
        CellKind.CENTER,
        lambda: [
            sales.c.end_ms < bindparam("before_ms"),
            ~exists().where(sale_segments.c.sale_id == sales.c.sale_id),
        ],
        "end_ms",
    ),
    Expiry(
        coupon_claims,
        CellKind.CENTER,
        lambda: [
            coupon_claims.c.code.in_(
                select(coupons.c.code).where(coupons.c.end_ms < bindparam("before_ms"))
            )
        ],
        "claimed_ms",
    ),
    Expiry(
        coupons,
        CellKind.CENTER,
        lambda: [
            coupons.c.end_ms < bindparam("before_ms"),
            ~exists().where(coupon_claims.c.code == coupons.c.code),
        ],
        "end_ms",
    ),
)
SWEPT_TABLES = {kind: [e.table.name for e in EXPIRIES if e.kind == kind] for kind in CellKind}
_FAILED_OUTBOX = select(func.count()).select_from(outbox).where(outbox.c.status == "failed")


@functools.cache
def _expired(expiry: Expiry) -> Select[Any]:
    """Primary keys of the oldest expired rows, at most `n` (built once: the inline SQLite
    path caches statements by identity)."""
    keys = list(expiry.table.primary_key.columns)
    return (
        select(*keys)
        .where(*expiry.where())
        .order_by(expiry.table.c[expiry.age_column])
        .limit(bindparam("n"))
    )


_PROBE_TABLES = {CellKind.UNIT: [PROBE_ORDERS], CellKind.CENTER: [PROBE_RESERVATIONS]}
_PLAIN_COUNTS = {e.table.name: select(func.count()).select_from(e.table) for e in EXPIRIES}


def _counting(name: str) -> Select[Any]:
    """What `unitrade_retained_rows` counts for a table: business rows only (the probes'
    are counted under a table name of their own)."""
    for counts in (BUSINESS_COUNTS, PROBE_COUNTS):
        if name in counts:
            return counts[name]
    return _PLAIN_COUNTS[name]


def cutoffs(settings: RetentionConfig, now: int) -> dict[str, dict[str, int]]:
    """Bind parameters of each table's expiry at `now` (ms)."""
    reserve_guard_s = settings.reserve_window_s + AHEAD_S_MAX + CLOCK_SKEW_S_MAX
    return {
        outbox.name: {"before_ms": now - settings.outbox_done_s * 1000},
        idempotency_keys.name: {"before_ms": now - settings.idempotency_keys_s * 1000},
        revoked_tokens.name: {"before_s": now // 1000},
        reservations.name: {
            "before_ms": now - settings.reservations_finished_s * 1000,
            "created_before_ms": now - reserve_guard_s * 1000,
        },
        sale_tokens.name: {"before_ms": now - settings.sales_ended_s * 1000},
        sale_segments.name: {"before_ms": now - settings.sales_ended_s * 1000},
        sales.name: {"before_ms": now - settings.sales_ended_s * 1000},
        coupon_claims.name: {"before_ms": now - settings.coupons_ended_s * 1000},
        coupons.name: {"before_ms": now - settings.coupons_ended_s * 1000},
        payment_claims.name: {"before_ms": now - settings.payment_claims_s * 1000},
        PROBE_ORDERS: {"before_ms": now - settings.probe_orders_s * 1000},
        # A probe reservation is done with at once, but a late reserve could still bring
        # it back until the same guard as every reservation's has passed.
        PROBE_RESERVATIONS: {"created_before_ms": now - reserve_guard_s * 1000},
    }


async def delete_expired(
    store: CellStore, expiry: Expiry, params: dict[str, int], batch_rows: int
) -> int:
    """Delete one batch of expired rows of an owned copy, captured in its changelog; the
    number deleted. Rows are chosen inside the write transaction, so a row that changed
    since (a committed reservation refunded) is judged as it is now."""
    statement = _expired(expiry)
    table = expiry.table
    bound = {**params, "n": min(batch_rows, ROWS_PER_WRITE_MAX)}

    def work(tx: WriteTx) -> int:
        rows = tx.all(statement, bound)
        for row in rows:
            tx.delete(table, dict(row._mapping))
        return len(rows)

    return await store.write(work)


class RetentionSweeper:
    """The sweep of one region: deletes expired rows of the cells it owns and keeps the
    figures `/metrics` shows."""

    def __init__(
        self, copies: CellCopies, settings: RetentionConfig, owned: Callable[[], list[int]]
    ) -> None:
        self.copies = copies
        self.settings = settings
        self.owned = owned
        self.kept_rows: dict[tuple[int, str], int] = {}  # (cell, table) -> rows, owned only
        self.deleted_rows: dict[tuple[int, str], int] = {}  # since the region started
        self.failed_steps: dict[int, int] = {}  # unit cell -> outbox steps failed for good
        self.sweeps = 0

    async def sweep_cell(self, store: CellStore, now: int | None = None) -> dict[str, int]:
        """Delete what has expired in one owned copy, then count what it keeps; rows
        deleted per table."""
        cell = store.cell.id
        bounds = cutoffs(self.settings, now_ms() if now is None else now)
        deleted = await self._sweep_probes(store, bounds)
        for expiry in EXPIRIES:
            if expiry.kind != store.cell.kind:
                continue
            name = expiry.table.name
            deleted[name] = 0
            for _ in range(BATCHES_PER_SWEEP_MAX):
                gone = await delete_expired(
                    store, expiry, bounds[name], self.settings.sweep_batch_rows
                )
                deleted[name] += gone
                self.deleted_rows[(cell, name)] = self.deleted_rows.get((cell, name), 0) + gone
                if gone < min(self.settings.sweep_batch_rows, ROWS_PER_WRITE_MAX):
                    break
                await asyncio.sleep(0)  # requests get the loop between batches
        await self._count(store)
        return deleted

    async def _sweep_probes(
        self, store: CellStore, bounds: dict[str, dict[str, int]]
    ) -> dict[str, int]:
        """Delete the health checker's synthetic orders (unit cell) or reservations
        (center) that are old enough; rows deleted per kind."""
        kind, batch = store.cell.kind, self.settings.sweep_batch_rows
        if kind not in (CellKind.UNIT, CellKind.CENTER):
            return {}
        name = PROBE_ORDERS if kind == CellKind.UNIT else PROBE_RESERVATIONS
        deleted = 0
        for _ in range(BATCHES_PER_SWEEP_MAX):
            if kind == CellKind.UNIT:
                gone, more = await delete_probe_orders(store, bounds[name]["before_ms"], batch)
            else:
                cutoff = bounds[name]["created_before_ms"]
                gone = await delete_probe_reservations(store, cutoff, batch)
                more = gone >= min(batch, ROWS_PER_WRITE_MAX)
            deleted += gone
            if not more:
                break
            await asyncio.sleep(0)
        key = (store.cell.id, name)
        self.deleted_rows[key] = self.deleted_rows.get(key, 0) + deleted
        return {name: deleted}

    async def _count(self, store: CellStore) -> None:
        names = [e.table.name for e in EXPIRIES if e.kind == store.cell.kind]
        names += _PROBE_TABLES.get(store.cell.kind, [])
        unit = store.cell.kind == CellKind.UNIT

        def work(conn: Connection) -> tuple[list[int], int]:
            counts = [int(conn.execute(_counting(n), COUNT_PARAMS).scalar_one()) for n in names]
            failed = int(conn.execute(_FAILED_OUTBOX).scalar_one()) if unit else 0
            return counts, failed

        counts, failed = await store.read(work)
        for name, rows in zip(names, counts, strict=True):
            self.kept_rows[(store.cell.id, name)] = rows
        if unit:
            self.failed_steps[store.cell.id] = failed

    async def sweep(self) -> None:
        """One sweep of every owned cell that has tables to sweep."""
        owned = set(self.owned())
        # The gauges are of owned copies only.
        self.kept_rows = {k: v for k, v in self.kept_rows.items() if k[0] in owned}
        self.failed_steps = {k: v for k, v in self.failed_steps.items() if k in owned}
        for cell in sorted(owned):
            store = self.copies[cell]
            if not SWEPT_TABLES[store.cell.kind]:
                continue
            try:
                deleted = await self.sweep_cell(store)
            except (WriteBanned, WrongRegion) as exc:
                log.info("retention sweep of cell %s paused: %s", cell, exc.code)
                continue
            # The health checker's rows go every sweep: not worth a line each time.
            probes = {k: v for k, v in deleted.items() if k in (PROBE_ORDERS, PROBE_RESERVATIONS)}
            if any(v for k, v in deleted.items() if k not in probes):
                log.info("retention sweep of cell %s deleted %s", cell, deleted)
            elif any(probes.values()):
                log.debug("retention sweep of cell %s deleted %s", cell, probes)
        self.sweeps += 1

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("retention sweep failed")
