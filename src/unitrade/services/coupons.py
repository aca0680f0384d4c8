"""Coupons, in the center cell: strongly consistent, as promotions and coupons must be (000),
written only by the center cell's owner in its serialised write transactions.

A coupon code allows `count` (N) claims in all, one per buyer (the primary key of the claim
is (code, buyer)). A buyer's claim serves one order at a time: the order's stock
reservation holds it (`held`, in the same center transaction, idempotent by order ID:
services/inventory.py), the payment's commit uses it (`used`), and the order's close or
refund gives it back (`claimed` again), through the order's outbox exactly as the order's
stock goes back. So a claim is used by at most one order, and an order that was never
written (its creation failed after the reservation) releases it with its stock.

The discount is fixed cents off (never more than the order's subtotal) or a whole percent
of the subtotal (rounded down), from orders of at least `min_total_cents`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, select

from unitrade.errors import (
    Conflict,
    CouponExpired,
    CouponNotApplicable,
    CouponNotClaimed,
    CouponNotFound,
    CouponSoldOut,
    CouponUsed,
    InvalidRequest,
)
from unitrade.storage.schema import coupon_claims, coupons
from unitrade.storage.store import CellStore, WriteTx, by_key, key_params, now_ms

CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
COUNT_MAX = 10**8
CENTS_MAX = 10**12
COUPON_LENGTH_S_MAX = 366 * 86_400
COUPONS_KEPT_MAX = 100_000
LIST_LIMIT_MAX = 500
KINDS = ("cents", "percent")

_CLAIM_OF_ORDER = select(coupon_claims).where(coupon_claims.c.order_id == bindparam("order_id"))
_COUPON_COUNT = select(func.count()).select_from(coupons)
_BY_STATUS = (
    select(coupon_claims.c.status, func.count())
    .where(coupon_claims.c.code == bindparam("code"))
    .group_by(coupon_claims.c.status)
)
_PAGE = select(coupons).order_by(coupons.c.created_ms.desc(), coupons.c.code).limit(bindparam("n"))

# step of the order's reservation -> (claim status it moves from, status it ends in)
_STEPS = {"commit": ("held", "used"), "release": ("held", "claimed"), "refund": ("used", "claimed")}


@dataclass(frozen=True)
class Discount:
    kind: str  # cents | percent
    value: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequest(f"a discount is {' or '.join(KINDS)}, not {self.kind!r}")
        high = 100 if self.kind == "percent" else CENTS_MAX
        if not 1 <= self.value <= high:
            raise InvalidRequest(f"a {self.kind} discount is 1 to {high}, not {self.value}")

    def off(self, subtotal_cents: int) -> int:
        """Cents off an order of `subtotal_cents`: never more than the subtotal."""
        if self.kind == "percent":
            return subtotal_cents * self.value // 100
        return min(self.value, subtotal_cents)

    def text(self) -> str:
        return f"{self.value}%" if self.kind == "percent" else f"{self.value} cents"


def parse_discount(text: str) -> Discount:
    """`500` (cents off) or `10%` (percent off)."""
    found = re.fullmatch(r"\s*([0-9]{1,13})\s*(%?)\s*", text)
    if found is None:
        raise InvalidRequest(f"a discount is cents (500) or a percent (10%), not {text!r}")
    return Discount("percent" if found.group(2) else "cents", int(found.group(1)))


def coupon_body(row: Any) -> dict[str, Any]:
    discount = Discount(str(row["discount_kind"]), int(row["discount_value"]))
    return {
        "code": row["code"],
        "count": int(row["count"]),
        "claimed": int(row["claimed"]),
        "discount": discount.text(),
        "discount_kind": discount.kind,
        "discount_value": discount.value,
        "min_total_cents": int(row["min_total_cents"]),
        "end_ms": int(row["end_ms"]),
        "created_ms": int(row["created_ms"]),
    }


def claim_body(row: Any) -> dict[str, Any]:
    return {
        "code": row["code"],
        "buyer_id": int(row["buyer_id"]),
        "status": row["status"],
        "order_id": None if row["order_id"] is None else str(row["order_id"]),
        "claimed_ms": int(row["claimed_ms"]),
    }


def _expired(code: str, row: Any, stamp: int) -> None:
    if stamp >= row.end_ms:
        raise CouponExpired(f"coupon {code} ended at {row.end_ms}", code=code, end_ms=row.end_ms)


class CouponService:
    """The center's coupons; every write goes through the center cell's fence."""

    def __init__(self, store: CellStore) -> None:
        self.store = store

    async def create(
        self, code: str, count: int, discount: Discount, min_total_cents: int, valid_s: int
    ) -> tuple[dict[str, Any], bool]:
        """A new coupon code, valid for `valid_s` from now. The same definition again
        answers the coupon as it is (a create whose answer was lost: its end stays the
        first one's), a different one is a conflict. True if created now."""
        if not 1 <= count <= COUNT_MAX:
            raise InvalidRequest(f"count must be 1 to {COUNT_MAX}")
        if not 0 <= min_total_cents <= CENTS_MAX:
            raise InvalidRequest(f"min_total_cents must be 0 to {CENTS_MAX}")
        if not 1 <= valid_s <= COUPON_LENGTH_S_MAX:
            raise InvalidRequest(f"a coupon is valid 1 s to {COUPON_LENGTH_S_MAX // 86_400} days")
        wanted = {
            "count": count,
            "discount_kind": discount.kind,
            "discount_value": discount.value,
            "min_total_cents": min_total_cents,
        }

        def work(tx: WriteTx) -> tuple[dict[str, Any], bool]:
            row = tx.get(coupons, {"code": code})
            if row is not None:
                if {k: row._mapping[k] for k in wanted} != wanted:
                    raise Conflict(f"coupon {code} exists with another definition", code=code)
                return coupon_body(row._mapping), False
            ((kept,),) = tx.all(_COUPON_COUNT)
            if int(kept) >= COUPONS_KEPT_MAX:
                raise Conflict(
                    f"{COUPONS_KEPT_MAX} coupons are kept already: wait for retention to "
                    "delete ended ones ([retention] coupons_ended_s)"
                )
            stamp = now_ms()
            values = {
                "code": code,
                **wanted,
                "end_ms": stamp + valid_s * 1000,
                "claimed": 0,
                "created_ms": stamp,
                "updated_ms": stamp,
            }
            tx.insert(coupons, values)
            return coupon_body(values), True

        result: tuple[dict[str, Any], bool] = await self.store.write(work)
        return result

    async def claim(self, code: str, buyer_id: int) -> tuple[dict[str, Any], bool]:
        """The buyer's claim of a coupon: once per buyer (claiming again answers the same
        claim), at most `count` in all. True if claimed now."""

        def work(tx: WriteTx) -> tuple[dict[str, Any], bool]:
            coupon = tx.get(coupons, {"code": code})
            if coupon is None:
                raise CouponNotFound(f"no coupon {code}", code=code)
            existing = tx.get(coupon_claims, {"code": code, "buyer_id": buyer_id})
            if existing is not None:
                return claim_body(existing._mapping), False
            stamp = now_ms()
            _expired(code, coupon, stamp)
            if coupon.claimed >= coupon.count:
                raise CouponSoldOut(
                    f"all {coupon.count} coupons {code} are claimed", code=code, count=coupon.count
                )
            tx.update(coupons, {"code": code}, {"updated_ms": stamp}, add={"claimed": 1})
            row = {
                "code": code,
                "buyer_id": buyer_id,
                "status": "claimed",
                "order_id": None,
                "discount_cents": 0,
                "claimed_ms": stamp,
                "updated_ms": stamp,
            }
            tx.insert(coupon_claims, row)
            return claim_body(row), True

        result: tuple[dict[str, Any], bool] = await self.store.write(work)
        return result

    async def show(self, code: str, buyer_id: int | None = None) -> dict[str, Any]:
        """The coupon with its claims by status, and the buyer's own claim if asked."""

        def work(conn: Connection) -> tuple[Any, list[Any], Any]:
            row = conn.execute(by_key(coupons), key_params({"code": code})).first()
            counts = list(conn.execute(_BY_STATUS, {"code": code}).all())
            mine = None
            if buyer_id is not None:
                key = key_params({"code": code, "buyer_id": buyer_id})
                mine = conn.execute(by_key(coupon_claims), key).first()
            return row, counts, mine

        row, counts, mine = await self.store.read(work)
        if row is None:
            raise CouponNotFound(f"no coupon {code}", code=code)
        by_status = dict.fromkeys(("claimed", "held", "used"), 0)
        by_status.update({str(status): int(n) for status, n in counts})
        body = {**coupon_body(row._mapping), "claims": by_status}
        if buyer_id is not None:
            body["mine"] = None if mine is None else claim_body(mine._mapping)
        return body

    async def page(self, limit: int) -> list[dict[str, Any]]:
        assert 1 <= limit <= LIST_LIMIT_MAX
        rows = await self.store.read(lambda conn: conn.execute(_PAGE, {"n": limit}).all())
        return [coupon_body(r._mapping) for r in rows]


# -- inside the center's reservation transaction (services/inventory.py) -------------------


def hold(tx: WriteTx, code: str, buyer_id: int, order_id: int, subtotal_cents: int) -> int:
    """The buyer's claim of `code` is held by the order; the cents it takes off."""
    coupon = tx.get(coupons, {"code": code})
    if coupon is None:
        raise CouponNotFound(f"no coupon {code}", code=code)
    _expired(code, coupon, now_ms())
    claim = tx.get(coupon_claims, {"code": code, "buyer_id": buyer_id})
    if claim is None:
        raise CouponNotClaimed(
            f"coupon {code} is not claimed by this buyer (POST /v1/coupons/{code}/claim)",
            code=code,
        )
    if claim.status != "claimed":
        raise CouponUsed(
            f"coupon {code} of this buyer is {claim.status} by order {claim.order_id}",
            code=code,
            order_id=None if claim.order_id is None else str(claim.order_id),
        )
    if subtotal_cents < coupon.min_total_cents:
        raise CouponNotApplicable(
            f"coupon {code} applies from {coupon.min_total_cents} cents, the order has "
            f"{subtotal_cents}",
            code=code,
            min_total_cents=coupon.min_total_cents,
        )
    discount = Discount(str(coupon.discount_kind), int(coupon.discount_value)).off(subtotal_cents)
    tx.update(
        coupon_claims,
        {"code": code, "buyer_id": buyer_id},
        {
            "status": "held",
            "order_id": order_id,
            "discount_cents": discount,
            "updated_ms": now_ms(),
        },
        where={"status": "claimed"},
    )
    return discount


def held_discount(tx: WriteTx, order_id: int) -> tuple[str | None, int]:
    """The coupon an order holds or used, and its discount (a repeated reserve answers it)."""
    claim = tx.one(_CLAIM_OF_ORDER, {"order_id": order_id})
    if claim is None:
        return None, 0
    return str(claim.code), int(claim.discount_cents)


def follow_step(tx: WriteTx, order_id: int, step: str) -> None:
    """The order's reservation moved (commit, release, refund): its coupon claim follows,
    in the same transaction."""
    start, end = _STEPS[step]
    claim = tx.one(_CLAIM_OF_ORDER, {"order_id": order_id})
    if claim is None or claim.status != start:
        return
    values: dict[str, Any] = {"status": end, "updated_ms": now_ms()}
    if end == "claimed":
        values.update(order_id=None, discount_cents=0)
    tx.update(coupon_claims, {"code": claim.code, "buyer_id": claim.buyer_id}, values)


@dataclass(frozen=True)
class CouponHold:
    """The coupon a reconciled order carries: its code, the buyer's claim of it and the
    discount the order was priced with (services/inventory.py `reinstate`)."""

    code: str
    buyer_id: int
    discount_cents: int


# The claim of a reconciled order, by its reservation's status: held while reserved, used
# once committed, free (claimed) when the order holds no stock (closed, refunded).
_REINSTATED = {"reserved": "held", "committed": "used"}


def reinstate_claim(tx: WriteTx, hold: CouponHold, order_id: int, reservation: str) -> None:
    """Make the buyer's claim follow the order that reconcile writes again, as its
    reservation does (`reservation`: the status `reinstate` gave it): a lost region's order
    whose reservation was released as abandoned meanwhile gave its claim back, and would
    otherwise be written with its discount while the buyer uses the coupon again.
    Conflict (nothing changes) if another order holds or used the claim."""
    key = {"code": hold.code, "buyer_id": hold.buyer_id}
    claim = check_reinstate(tx.get(coupon_claims, key), hold, order_id)
    wanted = _REINSTATED.get(reservation)
    if wanted is None:
        if claim.order_id == order_id and claim.status != "claimed":
            values: dict[str, Any] = {"status": "claimed", "order_id": None, "discount_cents": 0}
            tx.update(coupon_claims, key, {**values, "updated_ms": now_ms()})
        return
    if (claim.status, claim.order_id) == (wanted, order_id):
        return
    values = {"status": wanted, "order_id": order_id, "discount_cents": hold.discount_cents}
    tx.update(coupon_claims, key, {**values, "updated_ms": now_ms()})


def check_reinstate(claim: Any, hold: CouponHold, order_id: int) -> Any:
    """The buyer's claim, if the reconciled order may take it (`reinstate_claim`); a dry
    run checks the same on a read."""
    if claim is None:
        raise Conflict(
            f"order {order_id} used coupon {hold.code}, which buyer {hold.buyer_id} has no "
            "claim of here"
        )
    if claim.status != "claimed" and claim.order_id != order_id:
        raise Conflict(
            f"order {order_id} used coupon {hold.code}, which buyer {hold.buyer_id} has "
            f"{claim.status} by order {claim.order_id} here"
        )
    return claim
