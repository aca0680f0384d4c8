"""Orders: create (with stock reserved at the center), read, list, pay, close, refund.

An order lives in a unit cell and is written only by that cell's owner region. The state
machine is `created -> paid -> refunded` and `created -> closed`; repeating the transition
an order already made answers the order again (clients retry after timeouts), any other
transition is `illegal_transition`.

Creation never leaves a half-written order: stock is reserved first (idempotent by order ID),
then the whole order (document, lines, the buyer's index, the idempotency key, and for a
checkout the emptied cart) is written in one transaction of the buyer's cell. If that
transaction fails the reservation is released. Center steps that follow a state change
(commit on pay, release on close, return on refund) are written to the cell's outbox in the
same transaction as the change and sent at once; the outbox drainer retries what failed.

A pay claims its payment ID at the center (services/payments.py) before it writes the
payment in the order's cell: a unit cell's `payments` table sees that cell only, and a
payment ID must pay one order across the cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, and_, bindparam, or_, select

from unitrade.errors import (
    AmountMismatch,
    CartEmpty,
    Conflict,
    IllegalTransition,
    InvalidRequest,
    NotFound,
    OrderTimedOut,
    OutcomeUnknown,
    RegionUnavailable,
    UnitradeError,
    UnknownSku,
)
from unitrade.planted import DOUBLE_PAYMENT, planted
from unitrade.services.coupons import CouponHold
from unitrade.services.inventory import LINES_MAX, NO_TERMS, Lines, Terms, normalize_lines
from unitrade.services.remote import CatalogClient, CenterClient
from unitrade.services.sale_tokens import (
    SaleBook,
    consume,
    precheck_token,
    require_token,
    sale_of_lines,
)
from unitrade.services.sales import Sale
from unitrade.storage.copies import CellCopies
from unitrade.storage.schema import (
    buyer_orders,
    carts,
    idempotency_keys,
    order_lines,
    orders,
    outbox,
    payments,
    sale_tokens,
)
from unitrade.storage.sequences import OrderIdAllocator
from unitrade.storage.store import CellStore, WriteTx, by_key, key_params, now_ms
from unitrade.topology.probes import PROBE_SKU, is_probe_buyer
from unitrade.topology.rule import route_buyer, route_order

log = logging.getLogger("unitrade.orders")

LIST_LIMIT_MAX = 100
OUTBOX_ATTEMPTS_MAX = 100
RELEASE_TIMEOUT_S = 10.0
# A region that dies between reserving stock and writing the order leaves a reservation with
# no order. The owner of the order's cell releases such reservations once they are older
# than RESERVATION_GRACE_S (release_abandoned); an order write refuses to commit later than
# half that after its reserve, so a released reservation never has an order.
RESERVATION_GRACE_S = 60.0
ABANDONED_BATCH_MAX = 200
# How long order creation waits for the center's answer to its stock reservation, every
# attempt included: the answer must reach a forwarding gateway before its own timeout
# (rpc/client.py, 10 s), else the buyer is told about the region that forwarded it rather
# than about the center (gateway/resend.py resolves that, but costs a resend).
CENTER_RESERVE_S = 5.0
# How long a pay waits for the center's answer to its payment claim, every attempt
# included, for the same reason.
CENTER_CLAIM_S = 5.0
# How long a state change waits for its center step before leaving it to the outbox
# drainer: the change is committed whatever the center does.
OUTBOX_SEND_S = 2.0
# Reservations given up on (no answer) whose release runs in the background at once;
# past this many, release_abandoned releases the rest.
RELEASES_PENDING_MAX = 1_000

CART_OF = select(carts).where(carts.c.buyer_id == bindparam("buyer_id")).order_by(carts.c.sku)
_ORDERS_IN = select(orders).where(orders.c.order_id.in_(bindparam("ids", expanding=True)))
_PENDING_OUTBOX = (
    select(outbox.c.order_id, outbox.c.step)
    .where(outbox.c.status == "pending")
    .order_by(outbox.c.created_ms)
    .limit(bindparam("n"))
)
_FAILED_OUTBOX = (
    select(outbox)
    .where(outbox.c.status == "failed")
    .order_by(outbox.c.created_ms)
    .limit(bindparam("n"))
)
_FAILED_OF_ORDER = select(outbox.c.step).where(
    outbox.c.order_id == bindparam("order_id"), outbox.c.status == "failed"
)
_BUYER_INDEX = (
    select(buyer_orders.c.created_ms, buyer_orders.c.order_id)
    .where(buyer_orders.c.buyer_id == bindparam("buyer_id"))
    .order_by(buyer_orders.c.created_ms.desc(), buyer_orders.c.order_id.desc())
    .limit(bindparam("n"))
)
# Newest first; the cursor is the (created_ms, order_id) of the last order of a page.
_BUYER_INDEX_AFTER = _BUYER_INDEX.where(
    or_(
        buyer_orders.c.created_ms < bindparam("c_ms"),
        and_(
            buyer_orders.c.created_ms == bindparam("c_ms"),
            buyer_orders.c.order_id < bindparam("c_id"),
        ),
    )
)

# transition -> (status it starts from, status it ends in, outbox step sent to the center)
TRANSITIONS: dict[str, tuple[str, str, str]] = {
    "close": ("created", "closed", "release"),
    "refund": ("paid", "refunded", "refund"),
}


def orderable(sku: str, buyer_id: int) -> bool:
    """The health checker's SKU is for its own probe buyers only (topology/probes.py)."""
    return sku != PROBE_SKU or is_probe_buyer(buyer_id)


def order_body(row: Any, region: str) -> dict[str, Any]:
    document = orjson.loads(row["document"])
    return {
        "order_id": str(row["order_id"]),
        "buyer_id": row["buyer_id"],
        "status": row["status"],
        "total_cents": row["total_cents"],
        # Orders written before coupons had no discount: their subtotal is their total.
        "subtotal_cents": document.get("subtotal_cents", row["total_cents"]),
        "discount_cents": document.get("discount_cents", 0),
        "coupon": document.get("coupon"),
        "sale_id": document.get("sale_id"),
        "sale_token": document.get("sale_token"),
        "items": document["items"],
        "payment_id": row["payment_id"],
        "cell": row["cell_id"],
        "region": region,
        "created_ms": row["created_ms"],
        "updated_ms": row["updated_ms"],
    }


def coupon_of(order: Mapping[str, Any]) -> CouponHold | None:
    """The coupon an order's row says it was priced with (reconcile writes it again)."""
    document = orjson.loads(order["document"])
    code = document.get("coupon")
    if code is None:
        return None
    return CouponHold(str(code), int(order["buyer_id"]), int(document.get("discount_cents", 0)))


def _fingerprint(kind: str, lines: Lines, extra: Offer | None = None) -> str:
    # An order without a token or coupon keeps the fingerprint it always had.
    shape: list[Any] = [kind, lines]
    if extra is not None and (extra.sale_token is not None or extra.coupon is not None):
        shape.append([extra.sale_token, extra.coupon])
    return hashlib.sha256(orjson.dumps(shape)).hexdigest()


@dataclass(frozen=True)
class Offer:
    """What an order brings besides its items: a sale token and a coupon code."""

    sale_token: str | None = None
    coupon: str | None = None


NO_OFFER = Offer()


@dataclass(frozen=True)
class _Priced:
    """An order's prices (the catalog it was priced from), its coupon's discount as the
    center held it, and its sale and token."""

    catalog: dict[str, dict[str, Any]]
    discount_cents: int
    coupon: str | None
    sale: Sale | None
    sale_token: str | None


@dataclass(frozen=True)
class Created:
    order: dict[str, Any]
    replayed: bool  # True when an idempotency key returned an existing order


class _Replay(Exception):
    def __init__(self, order_id: int) -> None:
        self.order_id = order_id


class OrderService:
    def __init__(
        self,
        copies: CellCopies,
        center: CenterClient,
        catalog: CatalogClient,
        allocators: dict[int, OrderIdAllocator],
        sales: SaleBook | None = None,
    ) -> None:
        self.copies = copies
        self.center = center
        self.catalog = catalog
        self.allocators = allocators
        self.sales = sales
        self.write_deadline_s = RESERVATION_GRACE_S / 2
        self.reserve_timeout_s = CENTER_RESERVE_S
        self.claim_timeout_s = CENTER_CLAIM_S
        self._releasing: set[asyncio.Task[None]] = set()
        # The business rate limits (flow/control.py admit_order): buyer and SKUs of an
        # order about to be created; raises RateLimited. Checked after an idempotent
        # replay, which is never limited (a resend of a lost answer must learn it).
        self.admit: Callable[[int, list[str]], Awaitable[None]] | None = None

    @property
    def region(self) -> str:
        return self.copies.region

    def _buyer_store(self, buyer_id: int) -> CellStore:
        route = route_buyer(self.copies.fence.rule, buyer_id)
        self.copies.fence.check(route.cell)  # wrong_region / write_banned before any work
        return self.copies[route.cell]

    def _order_store(self, order_id: int) -> CellStore:
        return self.copies[route_order(self.copies.fence.rule, order_id).cell]

    # -- create ----------------------------------------------------------------------------

    async def create(
        self,
        buyer_id: int,
        items: Lines,
        idempotency_key: str | None,
        offer: Offer = NO_OFFER,
    ) -> Created:
        if not 1 <= len(items) <= LINES_MAX:
            raise InvalidRequest(f"an order has 1 to {LINES_MAX} items")
        lines = normalize_lines(items)
        store = self._buyer_store(buyer_id)
        fingerprint = _fingerprint("order", lines, offer)
        replay = await self._replay(store, buyer_id, idempotency_key, fingerprint)
        if replay is not None:
            return replay
        if self.admit is not None:
            await self.admit(buyer_id, [sku for sku, _ in lines])
        return await self._create(store, buyer_id, lines, idempotency_key, fingerprint, {}, offer)

    async def checkout(
        self, buyer_id: int, idempotency_key: str | None, offer: Offer = NO_OFFER
    ) -> Created:
        store = self._buyer_store(buyer_id)
        fingerprint = _fingerprint("checkout", [], offer)
        replay = await self._replay(store, buyer_id, idempotency_key, fingerprint)
        if replay is not None:
            return replay
        rows = await store.read(lambda conn: conn.execute(CART_OF, {"buyer_id": buyer_id}).all())
        if not rows:
            raise CartEmpty("the cart is empty")
        cart = {r.sku: r.qty for r in rows}
        if self.admit is not None:
            await self.admit(buyer_id, list(cart))
        lines = normalize_lines(list(cart.items()))
        return await self._create(store, buyer_id, lines, idempotency_key, fingerprint, cart, offer)

    async def _replay(
        self, store: CellStore, buyer_id: int, key: str | None, fingerprint: str
    ) -> Created | None:
        if key is None:
            return None
        statement = by_key(idempotency_keys)
        params = key_params({"buyer_id": buyer_id, "idempotency_key": key})
        row = await store.read(lambda conn: conn.execute(statement, params).first())
        if row is None:
            return None
        if row.fingerprint != fingerprint:
            raise Conflict(
                "this idempotency_key was used for a different request", idempotency_key=key
            )
        return Created(await self.get(buyer_id, row.order_id), replayed=True)

    async def _create(
        self,
        store: CellStore,
        buyer_id: int,
        lines: Lines,
        key: str | None,
        fingerprint: str,
        cart: dict[str, int],
        offer: Offer = NO_OFFER,
    ) -> Created:
        catalog = await self.catalog.get_cached([sku for sku, _ in lines])
        missing = [sku for sku, _ in lines if sku not in catalog or not orderable(sku, buyer_id)]
        if missing:
            raise UnknownSku(f"unknown SKU {missing[0]!r}", sku=missing[0])
        sale = sale_of_lines(self.sales, lines) if self.sales is not None else None
        if sale is not None:
            # Before anything reaches the center: a buyer without a valid token of the sale
            # costs the stock service nothing (what the tokens are for).
            token = require_token(sale, offer.sale_token)
            await precheck_token(store, buyer_id, sale, token)
        elif offer.sale_token is not None:
            raise InvalidRequest("`sale_token` is for an order of a sale's SKU; this has none")
        subtotal = sum(qty * int(catalog[sku]["price_cents"]) for sku, qty in lines)
        terms = NO_TERMS
        if sale is not None or offer.coupon is not None:
            sale_id = None if sale is None else sale.sale_id
            terms = Terms(buyer_id, sale_id, offer.coupon, subtotal)
        cell = store.cell.id
        order_id = await self.allocators[cell].next_id()
        try:
            held = await self.center.reserve(order_id, cell, lines, self.reserve_timeout_s, terms)
        except OutcomeUnknown as lost:
            # The reservation may stand at the center, but this order ID is written by
            # this request only, which ends here: the order is not written and never will
            # be, and the buyer may be told so. The reservation is released (now, else by
            # release_abandoned).
            self._release_later(order_id)
            center = lost.details.get("region", "?")
            raise RegionUnavailable(
                f"center stock call (stock reservation) to center region {center}: no "
                "answer; the order was not written (any stock the reservation took is "
                "released): retry",
                **lost.details,
            ) from lost
        deadline = time.monotonic() + self.write_deadline_s
        priced = _Priced(
            catalog, int(held.get("discount_cents", 0)), offer.coupon, sale, offer.sale_token
        )
        try:
            row = await self._write_order(
                store, order_id, buyer_id, lines, priced, key, fingerprint, cart, deadline
            )
        except _Replay as replay:
            await self._release_quietly(order_id)
            return Created(await self.get(buyer_id, replay.order_id), replayed=True)
        except (OutcomeUnknown, asyncio.CancelledError):
            # The order may have committed (its write's answer was lost, or this request
            # was cancelled while it ran): releasing now could sell its units twice. The
            # reservation stays; release_abandoned releases it after RESERVATION_GRACE_S if
            # the order is not in the cell by then.
            log.warning("order %s: write outcome unknown; reservation kept for now", order_id)
            raise
        except BaseException:
            await self._release_quietly(order_id)
            raise
        return Created(order_body(row, self.region), replayed=False)

    async def _write_order(
        self,
        store: CellStore,
        order_id: int,
        buyer_id: int,
        lines: Lines,
        priced: _Priced,
        key: str | None,
        fingerprint: str,
        cart: dict[str, int],
        deadline: float,
    ) -> dict[str, Any]:
        catalog = priced.catalog
        items = [
            {
                "sku": sku,
                "title": catalog[sku]["title"],
                "qty": qty,
                "price_cents": catalog[sku]["price_cents"],
                "line_cents": qty * catalog[sku]["price_cents"],
            }
            for sku, qty in lines
        ]
        stamp = now_ms()
        subtotal = sum(item["line_cents"] for item in items)
        assert 0 <= priced.discount_cents <= subtotal, "a discount never exceeds the subtotal"
        document: dict[str, Any] = {"items": items}
        if priced.coupon is not None or priced.sale is not None:
            document.update(
                subtotal_cents=subtotal,
                discount_cents=priced.discount_cents,
                coupon=priced.coupon,
                sale_id=None if priced.sale is None else priced.sale.sale_id,
                sale_token=priced.sale_token,
            )
        row = {
            "order_id": order_id,
            "buyer_id": buyer_id,
            "cell_id": store.cell.id,
            "status": "created",
            "total_cents": subtotal - priced.discount_cents,
            "document": orjson.dumps(document).decode(),
            "payment_id": None,
            "idempotency_key": key,
            "created_ms": stamp,
            "updated_ms": stamp,
            "version": 1,
        }

        def work(tx: WriteTx) -> None:
            if time.monotonic() > deadline:
                raise OrderTimedOut(f"order {order_id} was not written in time; retry")
            if key is not None:
                existing = tx.get(idempotency_keys, {"buyer_id": buyer_id, "idempotency_key": key})
                if existing is not None:
                    raise _Replay(existing.order_id)  # a concurrent twin won the race
                tx.insert(
                    idempotency_keys,
                    {
                        "buyer_id": buyer_id,
                        "idempotency_key": key,
                        "order_id": order_id,
                        "fingerprint": fingerprint,
                        "created_ms": stamp,
                    },
                )
            if priced.sale is not None:
                assert priced.sale_token is not None
                consume(tx, buyer_id, priced.sale, priced.sale_token, order_id)
            tx.insert(orders, row)
            for line_no, item in enumerate(items, start=1):
                tx.insert(
                    order_lines,
                    {
                        "order_id": order_id,
                        "line_no": line_no,
                        "sku": item["sku"],
                        "qty": item["qty"],
                        "price_cents": item["price_cents"],
                    },
                )
            tx.insert(
                buyer_orders, {"buyer_id": buyer_id, "created_ms": stamp, "order_id": order_id}
            )
            for sku in cart:
                tx.delete(carts, {"buyer_id": buyer_id, "sku": sku})

        await store.write(work)
        return row

    def _release_later(self, order_id: int) -> None:
        """Release a reservation whose answer was lost, in the background (bounded)."""
        if len(self._releasing) >= RELEASES_PENDING_MAX:
            log.warning("reservation of order %s left to the abandoned sweep", order_id)
            return
        task = asyncio.create_task(self._release_quietly(order_id))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_quietly(self, order_id: int) -> None:
        """Compensate a reservation whose order was not written; bounded, never raises."""
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await asyncio.shield(self.center.step(order_id, "release"))
        except (UnitradeError, TimeoutError, OSError) as exc:
            log.error("reservation of order %s not released: %s", order_id, exc)

    async def release_abandoned(
        self, store: CellStore, grace_s: float = RESERVATION_GRACE_S
    ) -> int:
        """Release the center's reservations for orders of this owned cell that were never
        written (their region died between reserve and write); the number released."""
        stale = await self.center.stale(store.cell.id, int(grace_s * 1000), ABANDONED_BATCH_MAX)
        released = 0
        for order_id in stale:
            if not await self._exists(store, order_id):
                await self.center.step(order_id, "release")
                log.warning("released the reservation of order %s, never written", order_id)
                released += 1
        return released

    async def _exists(self, store: CellStore, order_id: int) -> bool:
        params = key_params({"order_id": order_id})
        row = await store.read(lambda conn: conn.execute(by_key(orders), params).first())
        return row is not None

    # -- re-create (reconcile) -------------------------------------------------------------

    async def recreate(
        self,
        order: Mapping[str, Any],
        lines: Sequence[Mapping[str, Any]],
        payment: Mapping[str, Any] | None,
        key: Mapping[str, Any] | None,
        token: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Write again an order that only a lost region had (its quarantine; reconcile,
        control/reconcile.py) at this owner of its cell, with its original ID and state: the
        orders row, its lines, the buyer's index entry, its idempotency key, its payment
        and the sale token it bought its unit with (written as used if this cell lacks it:
        the buyer's count of tokens includes it again, even past the sale's limit).

        As `pay` claims first, its payment ID is claimed again at the center first
        (`conflict` if another order holds it); as `create` reserves first, the stock is
        held again at the center next (`reinstate`, idempotent by order ID;
        insufficient_stock if the units are gone); a paid order's commit goes through the
        outbox as a payment's does; if the write fails, the reservation is released. The
        order's row, None if it exists here already (nothing is written: re-creating is
        idempotent by order ID)."""
        order_id = int(order["order_id"])
        store = self._order_store(order_id)
        cell = store.cell.id
        self.copies.fence.check(cell)
        status = str(order["status"])
        items = [(str(line["sku"]), int(line["qty"])) for line in lines]
        hold = status in ("created", "paid")
        if order["payment_id"]:
            amount = payment["amount_cents"] if payment is not None else order["total_cents"]
            await self.center.claim(str(order["payment_id"]), order_id, int(amount))
        coupon = coupon_of(order)
        held = await self.center.reinstate(order_id, cell, items, hold, coupon=coupon)
        commit = status == "paid" and held["status"] == "reserved"
        deadline = time.monotonic() + self.write_deadline_s

        def work(tx: WriteTx) -> bool:
            if time.monotonic() > deadline:
                raise OrderTimedOut(f"order {order_id} was not written in time; retry")
            if tx.get(orders, {"order_id": order_id}) is not None:
                return False
            buyer = int(order["buyer_id"])
            if key is not None:
                found = {"buyer_id": buyer, "idempotency_key": key["idempotency_key"]}
                existing = tx.get(idempotency_keys, found)
                if existing is not None and existing.order_id != order_id:
                    raise Conflict(
                        f"idempotency key {key['idempotency_key']!r} of buyer {buyer} names "
                        f"order {existing.order_id} here"
                    )
                if existing is None:
                    tx.insert(idempotency_keys, key)
            if payment is not None:
                paid = tx.get(payments, {"payment_id": payment["payment_id"]})
                if paid is not None and paid.order_id != order_id:
                    raise Conflict(
                        f"payment {payment['payment_id']!r} belongs to order {paid.order_id} here"
                    )
                if paid is None:
                    tx.insert(payments, payment)
            if token is not None and tx.get(sale_tokens, {"token_id": token["token_id"]}) is None:
                tx.insert(sale_tokens, token)
            tx.insert(orders, order)
            for line in lines:
                tx.insert(order_lines, line)
            index = {"buyer_id": buyer, "created_ms": order["created_ms"], "order_id": order_id}
            if tx.get(buyer_orders, index) is None:
                tx.insert(buyer_orders, index)
            if commit:
                _enqueue(tx, order_id, "commit", now_ms())
            return True

        try:
            written = await store.write(work)
        except (OutcomeUnknown, asyncio.CancelledError):
            raise  # it may be written: kept for release_abandoned, as in create
        except BaseException:
            if hold:
                await self._release_quietly(order_id)
            raise
        if not written:
            return None
        if commit:
            await self.send_outbox(store, order_id, "commit")
        return dict(order)

    async def find(self, order_id: int) -> dict[str, Any] | None:
        """An order's row in this region's copy of its cell, whoever the buyer (reconcile)."""
        store = self._order_store(order_id)
        params = key_params({"order_id": order_id})
        row = await store.read(lambda conn: conn.execute(by_key(orders), params).first())
        return None if row is None else dict(row._mapping)

    # -- read ------------------------------------------------------------------------------

    async def get(self, buyer_id: int, order_id: int) -> dict[str, Any]:
        store = self._order_store(order_id)
        statement, params = by_key(orders), key_params({"order_id": order_id})
        row = await store.read(lambda conn: conn.execute(statement, params).first())
        if row is None or row.buyer_id != buyer_id:
            # Another buyer's order is indistinguishable from a missing one (docs/architecture.md).
            raise NotFound(f"no order {order_id}")
        return order_body(row._mapping, self.copies.fence.rule.owner_of(store.cell.id))

    async def list(
        self, buyer_id: int, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        assert 1 <= limit <= LIST_LIMIT_MAX
        store = self.copies[route_buyer(self.copies.fence.rule, buyer_id).cell]
        params: dict[str, Any] = {"buyer_id": buyer_id, "n": limit + 1}
        statement = _BUYER_INDEX
        if cursor is not None:
            params["c_ms"], params["c_id"] = _parse_cursor(cursor)
            statement = _BUYER_INDEX_AFTER

        def work(conn: Connection) -> tuple[Sequence[Any], Sequence[Any]]:
            index = conn.execute(statement, params).all()
            ids = [r.order_id for r in index[:limit]]
            return index, conn.execute(_ORDERS_IN, {"ids": ids}).all()

        index, rows = await store.read(work)
        page = index[:limit]
        ids = [r.order_id for r in page]
        by_id = {r.order_id: r._mapping for r in rows}
        region = self.copies.fence.rule.owner_of(store.cell.id)
        result = [order_body(by_id[i], region) for i in ids if i in by_id]
        next_cursor = f"{page[-1].created_ms}.{page[-1].order_id}" if len(index) > limit else None
        return result, next_cursor

    # -- state changes ---------------------------------------------------------------------

    async def pay(
        self, buyer_id: int, order_id: int, payment_id: str, amount_cents: int
    ) -> dict[str, Any]:
        """Pay an order with a payment ID that pays no other order anywhere: the order is
        read and judged here first (the same payment again is answered without a center
        call; a wrong state or amount is refused before any claim), then the payment ID is
        claimed at the center (services/payments.py), then the payment is written in the
        order's cell, which judges everything again."""
        store = self._order_store(order_id)
        self.copies.fence.check(store.cell.id)  # wrong_region / write_banned before any work
        found = await self.find(order_id)
        if found is None or found["buyer_id"] != buyer_id:
            raise NotFound(f"no order {order_id}")  # another buyer's order looks missing
        if found["payment_id"] == payment_id:
            return order_body(found, self.region)  # the same payment, again
        if not (found["status"] == "paid" and _PAY_TWICE):
            _check_payable(found, amount_cents)
        await self._claim(payment_id, order_id, amount_cents)

        def work(tx: WriteTx) -> tuple[dict[str, Any], bool]:
            row = _owned_order(tx, buyer_id, order_id)
            paid = tx.get(payments, {"payment_id": payment_id})
            if paid is not None:
                if paid.order_id != order_id:
                    raise Conflict(f"payment {payment_id!r} belongs to another order")
                return dict(row._mapping), False  # the same payment, again
            if row.status == "paid" and _PAY_TWICE:
                return _pay_again(tx, row, payment_id, amount_cents)
            _check_payable(row._mapping, amount_cents)
            stamp = now_ms()
            image = tx.update(
                orders,
                {"order_id": order_id},
                {
                    "status": "paid",
                    "payment_id": payment_id,
                    "updated_ms": stamp,
                    "version": row.version + 1,
                },
            )
            tx.insert(
                payments,
                {
                    "payment_id": payment_id,
                    "order_id": order_id,
                    "amount_cents": amount_cents,
                    "created_ms": stamp,
                },
            )
            _enqueue(tx, order_id, "commit", stamp)
            assert image is not None
            return image, True

        image, changed = await store.write(work)
        if changed:
            await self.send_outbox(store, order_id, "commit", OUTBOX_SEND_S)
        return order_body(image, self.region)

    async def _claim(self, payment_id: str, order_id: int, amount_cents: int) -> None:
        """Claim the payment ID at the center within `claim_timeout_s`. A claim that got no
        answer may stand at the center, but the payment is not written (that comes after):
        the buyer may be told so, and a retry with the same payment ID finds the claim
        (idempotent for the same order)."""
        try:
            await self.center.claim(payment_id, order_id, amount_cents, self.claim_timeout_s)
        except (OutcomeUnknown, RegionUnavailable) as lost:
            center = lost.details.get("region", "?")
            how = "unreachable" if isinstance(lost, RegionUnavailable) else "no answer"
            raise RegionUnavailable(
                f"center call (payment claim) to center region {center}: {how}; payment "
                f"{payment_id!r} was not applied to order {order_id}: retry with the same "
                "payment ID",
                **lost.details,
            ) from lost

    async def transition(self, buyer_id: int, order_id: int, name: str) -> dict[str, Any]:
        start, end, step = TRANSITIONS[name]
        store = self._order_store(order_id)

        def work(tx: WriteTx) -> tuple[dict[str, Any], bool]:
            row = _owned_order(tx, buyer_id, order_id)
            if row.status == end:
                return dict(row._mapping), False
            if row.status != start:
                raise IllegalTransition(f"order {order_id} is {row.status}; cannot {name}")
            stamp = now_ms()
            image = tx.update(
                orders,
                {"order_id": order_id},
                {"status": end, "updated_ms": stamp, "version": row.version + 1},
            )
            _enqueue(tx, order_id, step, stamp)
            assert image is not None
            return image, True

        image, changed = await store.write(work)
        if changed:
            await self.send_outbox(store, order_id, step, OUTBOX_SEND_S)
        return order_body(image, self.region)

    # -- outbox ----------------------------------------------------------------------------

    async def send_outbox(
        self, store: CellStore, order_id: int, step: str, timeout_s: float | None = None
    ) -> bool:
        """Send one outbox step to the center (within `timeout_s` when given) and mark it
        done; False if it must wait."""
        try:
            lines = await _lines_of(store, order_id) if step == "refund" else None
            await self.center.step(order_id, step, lines, timeout_s)
        except UnitradeError as exc:
            await self._outbox_failed(store, order_id, step, f"{exc.code}: {exc.message}")
            return False
        key = {"order_id": order_id, "step": step}
        done = {"status": "done", "updated_ms": now_ms()}
        try:
            await store.write(lambda tx: tx.update(outbox, key, done, where={"status": "pending"}))
        except UnitradeError as exc:
            # The step reached the center (idempotent by order ID); the change it follows is
            # committed. The owner's drainer marks it done later (e.g. after a switch).
            log.info("outbox %s of order %s sent, not yet marked: %s", step, order_id, exc.code)
            return False
        return True

    async def _outbox_failed(self, store: CellStore, order_id: int, step: str, error: str) -> None:
        log.warning("outbox %s of order %s failed: %s", step, order_id, error)
        try:
            await self._count_outbox_failure(store, order_id, step, error)
        except UnitradeError as exc:
            log.info("outbox %s of order %s: failure not recorded: %s", step, order_id, exc.code)

    async def _count_outbox_failure(
        self, store: CellStore, order_id: int, step: str, error: str
    ) -> None:
        def work(tx: WriteTx) -> None:
            row = tx.get(outbox, {"order_id": order_id, "step": step})
            if row is None or row.status != "pending":
                return
            attempts = row.attempts + 1
            tx.update(
                outbox,
                {"order_id": order_id, "step": step},
                {
                    "attempts": attempts,
                    "last_error": error[:256],
                    "status": "failed" if attempts >= OUTBOX_ATTEMPTS_MAX else "pending",
                    "updated_ms": now_ms(),
                },
            )

        await store.write(work)

    async def drain_outbox(self, store: CellStore, batch_max: int = 100) -> int:
        """Retry pending outbox steps of one owned cell, oldest first; the number sent."""
        params = {"n": batch_max}
        rows = await store.read(lambda conn: conn.execute(_PENDING_OUTBOX, params).all())
        blocked: set[int] = set()
        sent = 0
        for row in rows:
            if row.order_id in blocked:
                continue  # steps of one order go in order: commit before refund
            if await self.send_outbox(store, row.order_id, row.step):
                sent += 1
            else:
                blocked.add(row.order_id)
        return sent


# unitrade/planted.py: a second payment of a paid order is applied (the verifier's test).
_PAY_TWICE = planted(DOUBLE_PAYMENT)


def _pay_again(
    tx: WriteTx, row: Any, payment_id: str, amount_cents: int
) -> tuple[dict[str, Any], bool]:
    """The planted bug: record a second payment of a paid order and answer it as paid."""
    stamp = now_ms()
    image = tx.update(
        orders,
        {"order_id": row.order_id},
        {"payment_id": payment_id, "updated_ms": stamp, "version": row.version + 1},
    )
    tx.insert(
        payments,
        {
            "payment_id": payment_id,
            "order_id": row.order_id,
            "amount_cents": amount_cents,
            "created_ms": stamp,
        },
    )
    assert image is not None
    return image, False


def _check_payable(order: Mapping[str, Any], amount_cents: int) -> None:
    """Refuse to pay an order that is not `created`, or with an amount not its total."""
    if order["status"] != "created":
        raise IllegalTransition(f"order {order['order_id']} is {order['status']}; cannot pay")
    if amount_cents != order["total_cents"]:
        raise AmountMismatch(
            f"amount {amount_cents} does not match the order total {order['total_cents']}",
            total_cents=order["total_cents"],
        )


def _owned_order(tx: WriteTx, buyer_id: int, order_id: int) -> Any:
    row = tx.get(orders, {"order_id": order_id})
    if row is None or row.buyer_id != buyer_id:
        raise NotFound(f"no order {order_id}")  # another buyer's order looks missing
    return row


def _enqueue(tx: WriteTx, order_id: int, step: str, stamp: int) -> None:
    tx.insert(
        outbox,
        {
            "order_id": order_id,
            "step": step,
            "status": "pending",
            "attempts": 0,
            "last_error": None,
            "created_ms": stamp,
            "updated_ms": stamp,
        },
    )


CURSOR_PATTERN = r"^[0-9]{1,19}\.[0-9]{1,19}$"
_CURSOR_PART_MAX = 2**63 - 1  # the largest value the database columns hold


_LINES_OF = select(order_lines.c.sku, order_lines.c.qty).where(
    order_lines.c.order_id == bindparam("order_id")
)


async def _lines_of(store: CellStore, order_id: int) -> Lines:
    rows = await store.read(lambda conn: conn.execute(_LINES_OF, {"order_id": order_id}).all())
    return [(row.sku, row.qty) for row in rows]


def _parse_cursor(cursor: str) -> tuple[int, int]:
    created, _, order = cursor.partition(".")
    if not all(part.isascii() and part.isdigit() for part in (created, order)):
        raise InvalidRequest(f"bad cursor {cursor[:40]!r}")
    # A cursor past every stored value lists from the newest order on; clamped, it stays a
    # value the database can compare with.
    return min(int(created), _CURSOR_PART_MAX), min(int(order), _CURSOR_PART_MAX)


async def failed_outbox(store: CellStore, limit: int) -> list[dict[str, Any]]:
    """Outbox steps of a cell that failed for good (OUTBOX_ATTEMPTS_MAX), oldest first."""
    rows = await store.read(lambda conn: conn.execute(_FAILED_OUTBOX, {"n": limit}).all())
    return [dict(r._mapping) for r in rows]


async def retry_outbox(store: CellStore, order_id: int) -> list[str]:
    """Make the failed steps of an order pending again with no attempts counted, so the
    drainer sends them again; the steps reset (none if the order has no failed step)."""

    def work(tx: WriteTx) -> list[str]:
        steps = [r.step for r in tx.all(_FAILED_OF_ORDER, {"order_id": order_id})]
        for step in steps:
            key = {"order_id": order_id, "step": step}
            tx.update(outbox, key, {"status": "pending", "attempts": 0, "updated_ms": now_ms()})
        return steps

    return await store.write(work)
