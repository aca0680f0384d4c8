"""The internal API of `unitrade quarantine reconcile` at the current owner of a cell: one
business object of a lost region's quarantine per call, decided and re-applied through the
services (services/reconcile.py). Signed calls only, like every `/internal/...` route; a
region that does not own the object's cell answers `wrong_region`.

Every body carries the final row images the lost region wrote, as the CLI reduced them
(control/reconcile.py); each is checked like any input (unknown fields, types, bounds,
rows that do not belong to the object: 422).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.routing import Route

from unitrade.errors import InvalidRequest
from unitrade.gateway.models import (
    ITEMS_MAX,
    KEY_PATTERN,
    PAYMENT_ID_PATTERN,
    SALE_ID_PATTERN,
    SALE_TOKEN_PATTERN,
    Qty,
    Sku,
)
from unitrade.region import RegionRuntime
from unitrade.services.reconcile import Reconciler
from unitrade.topology.order_id import decode_order_id, parse_order_id
from unitrade.web.signed import internal_endpoint

ORDER_PATH = "/internal/reconcile/order"
ORDER_STATUS_PATH = "/internal/reconcile/order_status"
CART_PATH = "/internal/reconcile/cart"
RESERVATION_PATH = "/internal/reconcile/reservation"
PAYMENT_CLAIM_PATH = "/internal/reconcile/payment_claim"
STOCK_PATH = "/internal/reconcile/stock"
PRODUCT_PATH = "/internal/reconcile/product"
REVOCATION_PATH = "/internal/reconcile/revocation"
TOTALS_MAX = 1_000
ORDER_STATUSES = Literal["created", "paid", "closed", "refunded"]

Id = Annotated[int, Field(ge=0, le=2**63 - 1)]
Ms = Annotated[int, Field(ge=0, le=2**63 - 1)]
Cents = Annotated[int, Field(ge=0, le=2**63 - 1)]
OrderIdText = Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrderImage(_Body):
    """An `orders` row (storage/schema.py)."""

    order_id: Id
    buyer_id: Id
    cell_id: int
    status: ORDER_STATUSES
    total_cents: Cents
    document: Annotated[str, Field(max_length=1_000_000)]
    payment_id: Annotated[str | None, Field(pattern=PAYMENT_ID_PATTERN)]
    idempotency_key: Annotated[str | None, Field(pattern=KEY_PATTERN)]
    created_ms: Ms
    updated_ms: Ms
    version: Annotated[int, Field(ge=1)]


class LineImage(_Body):
    order_id: Id
    line_no: Annotated[int, Field(ge=1, le=ITEMS_MAX)]
    sku: Sku
    qty: Qty
    price_cents: Cents


class PaymentImage(_Body):
    payment_id: Annotated[str, Field(pattern=PAYMENT_ID_PATTERN)]
    order_id: Id
    amount_cents: Cents
    created_ms: Ms


class KeyImage(_Body):
    buyer_id: Id
    idempotency_key: Annotated[str, Field(pattern=KEY_PATTERN)]
    order_id: Id
    fingerprint: Annotated[str, Field(max_length=64)]
    created_ms: Ms


class TokenImage(_Body):
    """A `sale_tokens` row: the sale token the order bought its unit with."""

    token_id: Annotated[str, Field(pattern=SALE_TOKEN_PATTERN)]
    sale_id: Annotated[str, Field(pattern=SALE_ID_PATTERN)]
    buyer_id: Id
    segment_id: Annotated[int, Field(ge=1)]
    status: Literal["used"]
    order_id: Id
    sale_end_ms: Ms
    created_ms: Ms
    updated_ms: Ms


class OrderCall(_Body):
    order: OrderImage
    lines: Annotated[list[LineImage], Field(max_length=ITEMS_MAX)] = []
    payment: PaymentImage | None = None
    key: KeyImage | None = None
    token: TokenImage | None = None
    base_version: Annotated[int, Field(ge=0)]  # the version the lost region's change began at
    dry_run: bool = False

    @model_validator(mode="after")
    def _one_order(self) -> OrderCall:
        order_id = self.order.order_id
        try:
            cell = decode_order_id(order_id).cell
        except ValueError as exc:
            raise ValueError(str(exc)) from exc
        if self.order.cell_id != cell:
            raise ValueError(f"order {order_id} is of cell {cell}, not {self.order.cell_id}")
        owners = [line.order_id for line in self.lines]
        if self.payment is not None:
            owners.append(self.payment.order_id)
        if self.key is not None:
            owners.append(self.key.order_id)
            if self.key.buyer_id != self.order.buyer_id:
                raise ValueError("the idempotency key is another buyer's")
        if self.token is not None:
            owners.append(self.token.order_id)
            if self.token.buyer_id != self.order.buyer_id:
                raise ValueError("the sale token is another buyer's")
        if any(owner != order_id for owner in owners):
            raise ValueError(f"rows of another order than {order_id}")
        if len({line.line_no for line in self.lines}) != len(self.lines):
            raise ValueError("repeated line numbers")
        return self


class OrderStatusCall(_Body):
    order_id: OrderIdText


class CartCall(_Body):
    cell: int
    buyer_id: Id
    sku: Sku
    qty: Qty | None  # None: the lost region removed the line
    changed_ms: Ms  # when the lost region changed it (its updated_ms, or its delete's time)
    dry_run: bool = False


class ReservationCall(_Body):
    order_id: OrderIdText
    lines: Annotated[list[tuple[Sku, Qty]], Field(max_length=ITEMS_MAX)]  # [] a tombstone
    order_status: ORDER_STATUSES | None  # at the owner of the order's cell; None: no order
    dry_run: bool = False


class PaymentClaimCall(_Body):
    """A `payment_claims` row of a lost center (storage/schema.py)."""

    payment_id: Annotated[str, Field(pattern=PAYMENT_ID_PATTERN)]
    order_id: OrderIdText
    amount_cents: Cents
    dry_run: bool = False


class StockCall(_Body):
    sku: Sku
    totals: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=TOTALS_MAX)]


class ProductImage(_Body):
    sku: Sku
    title: Annotated[str, Field(min_length=1, max_length=200)]
    price_cents: Cents
    updated_ms: Ms
    version: Annotated[int, Field(ge=1)]


class ProductCall(_Body):
    sku: Sku
    image: ProductImage | None  # None: the lost region deleted it
    base_version: Annotated[int, Field(ge=0)]
    dry_run: bool = False

    @model_validator(mode="after")
    def _one_product(self) -> ProductCall:
        if self.image is not None and self.image.sku != self.sku:
            raise ValueError(f"the image is of product {self.image.sku}, not {self.sku}")
        return self


class RevocationCall(_Body):
    token_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    expires_s: Annotated[int | None, Field(ge=0)]  # None: deleted by retention
    dry_run: bool = False


def _order_id(text: str) -> int:
    try:
        return parse_order_id(text)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc


def reconcile_routes(runtime: RegionRuntime) -> list[Route]:
    """The routes of the reconcile API, mounted by gateway/app.py."""
    reconciler = Reconciler(
        runtime.copies,
        runtime.orders,
        runtime.cart,
        runtime.inventory,
        runtime.catalog_service,
        runtime.revocations,
        runtime.payment_claims,
    )

    async def order(b: OrderCall) -> Any:
        outcome = await reconciler.order(
            b.order.model_dump(),
            [line.model_dump() for line in sorted(b.lines, key=lambda line: line.line_no)],
            None if b.payment is None else b.payment.model_dump(),
            None if b.key is None else b.key.model_dump(),
            b.base_version,
            b.dry_run,
            None if b.token is None else b.token.model_dump(),
        )
        return outcome.body()

    async def order_status(b: OrderStatusCall) -> Any:
        status = await reconciler.order_status(_order_id(b.order_id))
        return {"order_id": b.order_id, "status": status}

    async def cart(b: CartCall) -> Any:
        outcome = await reconciler.cart_line(
            b.cell, b.buyer_id, b.sku, b.qty, b.changed_ms, b.dry_run
        )
        return outcome.body()

    async def reservation(b: ReservationCall) -> Any:
        lines = [(sku, qty) for sku, qty in b.lines]
        order_id = _order_id(b.order_id)
        outcome = await reconciler.reservation(order_id, lines, b.order_status, b.dry_run)
        return outcome.body()

    async def payment_claim(b: PaymentClaimCall) -> Any:
        order_id = _order_id(b.order_id)
        outcome = await reconciler.payment_claim(b.payment_id, order_id, b.amount_cents, b.dry_run)
        return outcome.body()

    async def stock(b: StockCall) -> Any:
        return (await reconciler.stock(b.sku, b.totals)).body()

    async def product(b: ProductCall) -> Any:
        image = None if b.image is None else b.image.model_dump()
        return (await reconciler.product(b.sku, image, b.base_version, b.dry_run)).body()

    async def revocation(b: RevocationCall) -> Any:
        return (await reconciler.revocation(b.token_id, b.expires_s, b.dry_run)).body()

    calls = [
        (ORDER_PATH, internal_endpoint(OrderCall, order)),
        (ORDER_STATUS_PATH, internal_endpoint(OrderStatusCall, order_status)),
        (CART_PATH, internal_endpoint(CartCall, cart)),
        (RESERVATION_PATH, internal_endpoint(ReservationCall, reservation)),
        (PAYMENT_CLAIM_PATH, internal_endpoint(PaymentClaimCall, payment_claim)),
        (STOCK_PATH, internal_endpoint(StockCall, stock)),
        (PRODUCT_PATH, internal_endpoint(ProductCall, product)),
        (REVOCATION_PATH, internal_endpoint(RevocationCall, revocation)),
    ]
    return [Route(path, handler, methods=["POST"]) for path, handler in calls]
