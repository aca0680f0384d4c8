"""Reconcile, the owner's side: one business object of a lost region's quarantine
(storage/quarantine.py) at a time, decided against this region's copy, the current owner's,
and re-applied through the services' normal write paths (fenced, captured, replicated).
`unitrade quarantine reconcile` (control/reconcile.py) reduces the quarantined rows to the
final images of each object and calls the owner of its cell; this module decides:

- **reapplied**: written here now (an order re-created, a transition made again, a cart
  line, a product, a revocation, a reservation's stock held again, a payment ID claimed
  again);
- **conflict**: the owner changed the object too, or the stock ran out: left for an
  operator, with a note naming why;
- **superseded**: nothing to do (the owner has it already, or it is bookkeeping the owner
  keeps by itself).

Every decision is made again at each call, from what this copy holds, so calling twice is
safe: a re-created order is found the second time, and identical is `superseded`. A
`dry_run` decides the same through reads only and writes nothing anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from unitrade.errors import (
    AmountMismatch,
    Conflict,
    IllegalTransition,
    InsufficientStock,
    NotFound,
    StockBelowCommitted,
    UnitradeError,
    UnknownSku,
    WriteBanned,
    WrongRegion,
)
from unitrade.services.cart import CartService
from unitrade.services.catalog import CatalogService
from unitrade.services.inventory import InventoryService, reinstate_plan
from unitrade.services.orders import OrderService, coupon_of
from unitrade.services.payments import PaymentClaims
from unitrade.services.revocations import Revocations
from unitrade.storage.copies import CellCopies
from unitrade.storage.quarantine import CONFLICT, REAPPLIED, SUPERSEDED
from unitrade.storage.schema import (
    carts,
    idempotency_keys,
    inventory,
    payments,
    products,
    reservations,
    revoked_tokens,
)
from unitrade.storage.store import CellStore, by_key, key_params, now_ms
from unitrade.topology.order_id import decode_order_id
from unitrade.topology.rule import route_order

# Refusals that are about the business object (the stock ran out, the payment belongs to
# another order): a conflict to report. Anything else (a fence refusal, a region that does
# not answer) is raised: the entries stay held and the next reconcile tries again.
BUSINESS_REFUSALS: tuple[type[UnitradeError], ...] = (
    InsufficientStock,
    Conflict,
    IllegalTransition,
    AmountMismatch,
    UnknownSku,
    StockBelowCommitted,
    NotFound,
)

# An order the owner has at the version the lost region's change started from: the
# transitions that take it from the owner's status to the lost region's final one.
PATHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("created", "paid"): ("pay",),
    ("created", "closed"): ("close",),
    ("paid", "refunded"): ("refund",),
    ("created", "refunded"): ("pay", "refund"),
}
HELD_BY = {"created": "reserved", "paid": "committed"}  # order status -> its reservation's


@dataclass(frozen=True)
class Outcome:
    state: str  # reapplied | conflict | superseded
    note: str
    status: str | None = None  # an order's status at its owner after this (in a dry run: would be)

    def body(self) -> dict[str, Any]:
        return {"state": self.state, "note": self.note, "status": self.status}


def _conflict(note: str, status: str | None = None) -> Outcome:
    return Outcome(CONFLICT, note, status)


def _refused(what: str, exc: UnitradeError) -> str:
    return f"{what}: {exc.code}: {exc.message}"


class Reconciler:
    """The owner's side of reconcile, over this region's services."""

    def __init__(
        self,
        copies: CellCopies,
        orders: OrderService,
        cart: CartService,
        inventory: InventoryService,
        catalog: CatalogService,
        revocations: Revocations,
        claims: PaymentClaims | None = None,
    ) -> None:
        self.copies = copies
        self.orders = orders
        self.cart = cart
        self.inventory = inventory
        self.catalog = catalog
        self.revocations = revocations
        # The center's payment claims live in the same copy as its inventory.
        self.claims = claims or PaymentClaims(inventory.store)

    def owned(self, cell: int) -> CellStore:
        """This region's copy of `cell`, which it must own: reconcile decides at the owner."""
        rule = self.copies.fence.rule
        if cell not in rule.cells:
            raise NotFound(f"no cell {cell}")
        owner = rule.owner_of(cell)
        if owner != self.copies.region:
            raise WrongRegion(f"cell {cell} is owned by {owner}", owner=owner, cell=cell)
        if rule.is_banned(cell):
            raise WriteBanned(f"cell {cell} is banned for a switch; retry shortly", cell=cell)
        return self.copies[cell]

    @staticmethod
    async def _row(store: CellStore, table: Any, key: Mapping[str, Any]) -> dict[str, Any] | None:
        statement, params = by_key(table), key_params(key)

        def work(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(statement, params).first()
            return None if row is None else dict(row._mapping)

        return await store.read(work)

    # -- orders (unit cells) -----------------------------------------------------------------

    async def order_status(self, order_id: int) -> str | None:
        """The status of an order at this owner of its cell; None if it has no such order."""
        self.owned(route_order(self.copies.fence.rule, order_id).cell)
        found = await self.orders.find(order_id)
        return None if found is None else str(found["status"])

    async def order(
        self,
        order: Mapping[str, Any],
        lines: Sequence[Mapping[str, Any]],
        payment: Mapping[str, Any] | None,
        key: Mapping[str, Any] | None,
        base_version: int,
        dry_run: bool,
        token: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """An order the lost region created or changed: `order` its final row, `lines`,
        `payment`, `key` and `token` the final rows of its lines, payment, idempotency key
        and sale token that the lost region wrote, `base_version` the version its first
        change started from (0: it created the order)."""
        order_id = int(order["order_id"])
        store = self.owned(route_order(self.copies.fence.rule, order_id).cell)
        final = str(order["status"])
        have = await self.orders.find(order_id)
        if have is None:
            if base_version > 0:
                return _conflict(
                    f"order {order_id}: the lost region changed it from version "
                    f"{base_version}, but the new owner does not have it"
                )
            return await self._recreate(store, order, lines, payment, key, dry_run, token)
        now = str(have["status"])
        if (now, have["payment_id"], have["version"]) == (
            final,
            order["payment_id"],
            order["version"],
        ):
            return Outcome(SUPERSEDED, f"order {order_id} is {final} at the new owner already", now)
        if int(have["version"]) == base_version:
            return await self._transition(store, have, order, payment, dry_run)
        return _conflict(
            f"order {order_id} changed at the new owner too: {now} there (version "
            f"{have['version']}), {final} at the lost region (version {order['version']})",
            now,
        )

    async def _recreate(
        self,
        store: CellStore,
        order: Mapping[str, Any],
        lines: Sequence[Mapping[str, Any]],
        payment: Mapping[str, Any] | None,
        key: Mapping[str, Any] | None,
        dry_run: bool,
        token: Mapping[str, Any] | None = None,
    ) -> Outcome:
        order_id, status = int(order["order_id"]), str(order["status"])
        if not lines:
            return _conflict(f"order {order_id}: its lines are not in the quarantine")
        if key is not None:
            existing = await self._row(
                store,
                idempotency_keys,
                {"buyer_id": key["buyer_id"], "idempotency_key": key["idempotency_key"]},
            )
            if existing is not None and existing["order_id"] != order_id:
                return Outcome(
                    SUPERSEDED,
                    f"order {order_id}: the buyer's retry with idempotency key "
                    f"{key['idempotency_key']!r} made order {existing['order_id']} at the new "
                    "owner",
                )
        if payment is not None:
            paid = await self._row(store, payments, {"payment_id": payment["payment_id"]})
            if paid is not None and paid["order_id"] != order_id:
                return _conflict(
                    f"order {order_id}: payment {payment['payment_id']!r} belongs to order "
                    f"{paid['order_id']} at the new owner"
                )
        try:
            if dry_run:
                items = [(str(line["sku"]), int(line["qty"])) for line in lines]
                hold = status in HELD_BY
                if order["payment_id"]:
                    amount = int(order["total_cents"])
                    await self.orders.center.claim(
                        str(order["payment_id"]), order_id, amount, None, True
                    )
                coupon = coupon_of(order)
                await self.orders.center.reinstate(
                    order_id, store.cell.id, items, hold, True, coupon
                )
                return Outcome(REAPPLIED, f"order {order_id} would be re-created {status}", status)
            written = await self.orders.recreate(order, lines, payment, key, token)
        except InsufficientStock as exc:
            return _conflict(f"insufficient stock for order {order_id}: {exc.message}")
        except BUSINESS_REFUSALS as exc:
            return _conflict(_refused(f"order {order_id} not re-created", exc))
        if written is None:
            return Outcome(SUPERSEDED, f"order {order_id} exists at the new owner", status)
        return Outcome(REAPPLIED, f"order {order_id} re-created {status}", status)

    async def _transition(
        self,
        store: CellStore,
        have: Mapping[str, Any],
        order: Mapping[str, Any],
        payment: Mapping[str, Any] | None,
        dry_run: bool,
    ) -> Outcome:
        order_id, buyer = int(order["order_id"]), int(order["buyer_id"])
        now, final = str(have["status"]), str(order["status"])
        path = PATHS.get((now, final))
        if path is None:
            return _conflict(f"order {order_id}: no transition takes it from {now} to {final}", now)
        payment_id = order["payment_id"]
        amount = int(payment["amount_cents"] if payment else order["total_cents"])
        if "pay" in path:
            if not payment_id:
                return _conflict(f"order {order_id} is {final} without a payment ID", now)
            paid = await self._row(store, payments, {"payment_id": payment_id})
            if paid is not None and paid["order_id"] != order_id:
                return _conflict(
                    f"order {order_id}: payment {payment_id!r} belongs to order "
                    f"{paid['order_id']} at the new owner",
                    now,
                )
        steps = " then ".join(path)
        if dry_run:
            if "pay" in path:
                try:
                    await self.orders.center.claim(str(payment_id), order_id, amount, None, True)
                except BUSINESS_REFUSALS as exc:
                    return _conflict(_refused(f"order {order_id}: pay would be refused", exc), now)
            return Outcome(REAPPLIED, f"order {order_id}: {steps} would make it {final}", final)
        for step in path:
            try:
                if step == "pay":
                    await self.orders.pay(buyer, order_id, str(payment_id), amount)
                else:
                    await self.orders.transition(buyer, order_id, step)
            except BUSINESS_REFUSALS as exc:
                return _conflict(_refused(f"order {order_id}: {step} refused", exc), now)
        return Outcome(REAPPLIED, f"order {order_id}: {steps} applied again, now {final}", final)

    # -- carts (unit cells) ------------------------------------------------------------------

    async def cart_line(
        self, cell: int, buyer_id: int, sku: str, qty: int | None, changed_ms: int, dry_run: bool
    ) -> Outcome:
        """A cart line the lost region set (`qty`) or removed (None) at `changed_ms`: the
        newer of its change and the owner's line wins (updated_ms, the clocks of two
        regions); a line the owner changed at or after that time is a conflict."""
        store = self.owned(cell)
        what = f"cart of buyer {buyer_id}: {sku}"
        have = await self._row(store, carts, {"buyer_id": buyer_id, "sku": sku})
        theirs = "removed" if qty is None else f"x {qty}"
        if (have["qty"] if have else None) == qty:
            return Outcome(SUPERSEDED, f"{what} {theirs} at the new owner already")
        if have is not None and int(have["updated_ms"]) >= changed_ms:
            return _conflict(
                f"{what} changed at the new owner too (x {have['qty']} there, {theirs} at the "
                "lost region)"
            )
        if dry_run:
            return Outcome(REAPPLIED, f"{what} would be {theirs}")
        try:
            done = await self.cart.put_if_older(buyer_id, sku, qty, changed_ms)
        except BUSINESS_REFUSALS as exc:
            return _conflict(_refused(f"{what} not {theirs}", exc))
        if not done["changed"] and done["qty"] != qty:
            return _conflict(f"{what} changed at the new owner too (x {done['qty']} there)")
        return Outcome(REAPPLIED, f"{what} {theirs}")

    # -- the center cell ---------------------------------------------------------------------

    async def reservation(
        self,
        order_id: int,
        lines: list[tuple[str, int]],
        order_status: str | None,
        dry_run: bool,
    ) -> Outcome:
        """A reservation the lost center wrote: the new center's reservation is brought to
        what the order's status at its cell's owner (`order_status`; None: no such order)
        needs: held (reserved, or committed if paid) or not. The tail's own status is not
        trusted: the order is the truth about what stock it needs."""
        self.owned(self.copies.fence.rule.center_cell)
        if not lines:
            return Outcome(SUPERSEDED, f"reservation of order {order_id}: a release tombstone")
        if order_status is None:
            return Outcome(SUPERSEDED, f"order {order_id} exists nowhere: no stock to hold for it")
        have = await self._row(self.inventory.store, reservations, {"order_id": order_id})
        status = None if have is None else str(have["status"])
        hold = order_status in HELD_BY
        if (hold and status == HELD_BY[order_status]) or (
            not hold and status in (None, "released", "refunded")
        ):
            return Outcome(
                SUPERSEDED,
                f"order {order_id} is {order_status}: the new center has its reservation "
                f"{status or 'not at all'}, as it should",
                order_status,
            )
        try:
            reinstate_plan(order_id, status, hold)  # refused before anything is written
            cell = decode_order_id(order_id).cell
            held = await self.inventory.reinstate(order_id, cell, lines, hold, dry_run)
            if order_status == "paid" and held["status"] == "reserved" and not dry_run:
                held = await self.inventory.step(order_id, "commit")
        except InsufficientStock as exc:
            return _conflict(f"insufficient stock for order {order_id}: {exc.message}")
        except BUSINESS_REFUSALS as exc:
            return _conflict(_refused(f"reservation of order {order_id}", exc))
        end = HELD_BY.get(order_status, "returned")
        would = " would be" if dry_run else ""
        return Outcome(
            REAPPLIED,
            f"stock of order {order_id} ({order_status}){would} {end} at the new center "
            f"(was {status or 'missing'})",
            order_status,
        )

    async def payment_claim(
        self, payment_id: str, order_id: int, amount_cents: int, dry_run: bool
    ) -> Outcome:
        """A payment claim the lost center wrote: claimed again at the new center for the
        same order. Whether the order is paid with it is the unit cells' business (their
        pass comes first and claims for every payment it re-applies); the claim only keeps
        the payment ID from paying another order, which is what the lost center promised.
        Another order holding it at the new center is a conflict: both may have been paid
        with it while the center was lost."""
        self.owned(self.copies.fence.rule.center_cell)
        what = f"payment claim {payment_id!r} of order {order_id}"
        have = await self.claims.holder(payment_id)
        if have is not None and int(have["order_id"]) == order_id:
            return Outcome(SUPERSEDED, f"{what}: the new center has it already")
        if have is not None:
            return _conflict(
                f"{what}: the new center gives payment {payment_id!r} to order "
                f"{have['order_id']}; if both orders were paid with it, refund one"
            )
        if dry_run:
            return Outcome(REAPPLIED, f"{what} would be claimed again at the new center")
        try:
            await self.claims.claim(payment_id, order_id, amount_cents)
        except Conflict as exc:  # claimed meanwhile
            return _conflict(_refused(what, exc))
        return Outcome(REAPPLIED, f"{what} claimed again at the new center")

    async def stock(self, sku: str, totals: Sequence[int]) -> Outcome:
        """The lost center's inventory rows of one SKU, as the total (available + reserved +
        sold) of each, oldest first. They are never copied over: levels follow from the
        reservations, reconciled one by one. But a change of the total is an admin's
        `set_stock`, which only the operator can judge: a conflict, to be set again by hand.
        The total before the first row is taken from the new center's (only set_stock
        changes it, so they agree unless someone set the stock there since)."""
        self.owned(self.copies.fence.rule.center_cell)
        have = await self._row(self.inventory.store, inventory, {"sku": sku})
        before = None if have is None else _total(have)
        set_to: int | None = None
        for total in totals:
            if before is None or total != before:
                set_to = total
            before = total
        if set_to is None:
            return Outcome(
                SUPERSEDED, f"stock of {sku}: levels follow the reservations, reconciled apart"
            )
        return _conflict(
            f"stock of {sku} was set to {set_to} at the lost center: set it again if still "
            f"wanted (PUT /v1/admin/products/{sku}; the new center has "
            f"{'none' if have is None else _total(have)})"
        )

    # -- the global cell ---------------------------------------------------------------------

    async def product(
        self, sku: str, image: Mapping[str, Any] | None, base_version: int, dry_run: bool
    ) -> Outcome:
        """A product the lost region wrote (`image` its final row, `base_version` the
        version its first write started from): written again unless the owner has changed
        it since (a newer version than the base: conflict)."""
        self.owned(self.copies.fence.rule.global_cell)
        if image is None:
            return _conflict(f"product {sku} was deleted at the lost region: redo it by hand")
        have = await self._row(self.catalog.store, products, {"sku": sku})
        theirs = f"{image['title']!r} at {image['price_cents']} cents"
        if have is not None and (have["title"], have["price_cents"]) == (
            image["title"],
            image["price_cents"],
        ):
            return Outcome(SUPERSEDED, f"product {sku} is {theirs} at the new owner already")
        if have is not None and int(have["version"]) > base_version:
            return _conflict(
                f"product {sku} changed at the new owner too ({have['title']!r} at "
                f"{have['price_cents']} cents there, {theirs} at the lost region)"
            )
        if dry_run:
            return Outcome(REAPPLIED, f"product {sku} would be {theirs}")
        written = await self.catalog.put_unless_newer(
            sku, str(image["title"]), int(image["price_cents"]), base_version
        )
        if written is None:
            return _conflict(f"product {sku} changed at the new owner too")
        return Outcome(REAPPLIED, f"product {sku} is {theirs} again")

    async def revocation(self, token_id: str, expires_s: int | None, dry_run: bool) -> Outcome:
        """A token the lost region revoked (`expires_s` None: its row was deleted by
        retention once the token expired): revoked again, idempotent."""
        store = self.owned(self.copies.fence.rule.global_cell)
        if expires_s is None or expires_s < now_ms() // 1000:
            return Outcome(SUPERSEDED, f"token {token_id} has expired: nothing to revoke")
        if await self._row(store, revoked_tokens, {"token_id": token_id}) is not None:
            return Outcome(SUPERSEDED, f"token {token_id} is revoked at the new owner already")
        if dry_run:
            return Outcome(REAPPLIED, f"token {token_id} would be revoked again")
        await self.revocations.revoke(token_id, expires_s)
        return Outcome(REAPPLIED, f"token {token_id} revoked again")


def _total(row: Mapping[str, Any]) -> int:
    return int(row["available"]) + int(row["reserved"]) + int(row["sold"])
