"""Request bodies of the public and internal API. Unknown fields are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
KEY_PATTERN = r"^[\x21-\x7e]{1,128}$"  # printable ASCII, no spaces
PAYMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
QTY_MAX = 10_000
PRICE_CENTS_MAX = 10**12
STOCK_MAX = 10**9
ITEMS_MAX = 100


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 3.0 as an integer, so the document promises it is accepted; strict
    # mode still refuses "3" and true.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# With Field(strict=True) in the same Annotated (so the bounds stay minimum/maximum in the
# document): an integer in JSON is 3 or 3.0, never "3" or true.
WHOLE = BeforeValidator(_whole_number)
Sku = Annotated[str, Field(pattern=SKU_PATTERN, description="product SKU")]
Qty = Annotated[int, Field(ge=1, le=QTY_MAX, strict=True), WHOLE]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrderItem(_Body):
    sku: Sku
    qty: Qty


class CreateOrder(_Body):
    items: Annotated[list[OrderItem], Field(min_length=1, max_length=ITEMS_MAX)]
    idempotency_key: Annotated[str | None, Field(pattern=KEY_PATTERN)] = None


class Checkout(_Body):
    idempotency_key: Annotated[str | None, Field(pattern=KEY_PATTERN)] = None


class Pay(_Body):
    payment_id: Annotated[str, Field(pattern=PAYMENT_ID_PATTERN)]
    amount_cents: Annotated[int, Field(ge=0, le=PRICE_CENTS_MAX, strict=True), WHOLE]


class CartQty(_Body):
    qty: Qty


class PutProduct(_Body):
    title: Annotated[str, Field(min_length=1, max_length=200)]
    price_cents: Annotated[int, Field(ge=0, le=PRICE_CENTS_MAX, strict=True), WHOLE]
    stock: Annotated[
        int,
        Field(ge=0, le=STOCK_MAX, strict=True, description="available + reserved + sold"),
        WHOLE,
    ]


class RevokeToken(_Body):
    token: Annotated[str, Field(min_length=1, max_length=200)]


class TokenRevoked(BaseModel):
    token_id: str
    expires_s: int = Field(description="unix seconds; the revocation is kept until then")
    expired: bool = Field(description="the token had expired already: nothing to revoke")


# Internal API (region to region) -------------------------------------------------------


class ReserveCall(_Body):
    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]
    cell: int
    lines: Annotated[list[tuple[Sku, Qty]], Field(min_length=1, max_length=ITEMS_MAX)]


class ReinstateCall(_Body):
    """A reconciled order's reservation (services/inventory.py `reinstate`)."""

    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]
    cell: int
    lines: Annotated[list[tuple[Sku, Qty]], Field(min_length=1, max_length=ITEMS_MAX)]
    hold: bool
    dry_run: bool = False


class StepCall(_Body):
    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]
    step: Annotated[str, Field(pattern=r"^(commit|release|refund)$")]
    # A refund's lines, for when retention has deleted the finished reservation.
    lines: Annotated[list[tuple[Sku, Qty]] | None, Field(max_length=ITEMS_MAX)] = None


class ClaimCall(_Body):
    """A payment ID claimed for an order at the center (services/payments.py)."""

    payment_id: Annotated[str, Field(pattern=PAYMENT_ID_PATTERN)]
    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]
    amount_cents: Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)]
    dry_run: bool = False


class StockCall(_Body):
    sku: Sku
    total: Annotated[int, Field(ge=0, le=STOCK_MAX)]


class StaleCall(_Body):
    cell: int
    older_than_ms: Annotated[int, Field(ge=0)]
    limit: Annotated[int, Field(ge=1, le=1000)]


class SkuCall(_Body):
    sku: Sku


class ProductsCall(_Body):
    skus: Annotated[list[Sku], Field(min_length=1, max_length=ITEMS_MAX)]


# Answers of the public API -------------------------------------------------------------
# Documented (OpenAPI `responses=`), not validated: the handlers answer with orjson straight
# from the services' dicts (services/orders.py, cart.py, catalog.py, inventory.py).

OrderStatus = Literal["created", "paid", "closed", "refunded"]


class OrderLine(BaseModel):
    sku: str
    title: str
    qty: int
    price_cents: int
    line_cents: int


class Order(BaseModel):
    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$", description="decimal string")]
    buyer_id: int
    status: OrderStatus
    total_cents: int
    items: list[OrderLine]
    payment_id: str | None
    cell: Annotated[int, Field(description="the unit cell the order lives in")]
    region: Annotated[str, Field(description="the owner region of that cell")]
    created_ms: int
    updated_ms: int


class OrderPage(BaseModel):
    orders: list[Order]
    next_cursor: Annotated[str | None, Field(description="null on the last page")]


class CartLine(BaseModel):
    sku: str
    qty: int
    # null when the product is no longer in this region's copy of the catalog
    title: str | None
    price_cents: int | None
    line_cents: int | None


class Cart(BaseModel):
    buyer_id: int
    items: list[CartLine]
    total_cents: int


class Product(BaseModel):
    sku: str
    title: str
    price_cents: int
    updated_ms: int


class ProductPage(BaseModel):
    products: list[Product]
    next_cursor: Annotated[str | None, Field(description="null on the last page")]


class InventoryLevels(BaseModel):
    sku: str
    available: int
    reserved: int
    sold: int


class ProductWritten(Product):
    stock: Annotated[int, Field(description="available + reserved + sold")]
    available: int
    reserved: int
    sold: int


class ControlWatch(BaseModel):
    connected: bool
    last_error: str


class Health(BaseModel):
    """A region's state; docs/api.md describes each field."""

    status: Literal["ok"]
    region: str
    worker: int = Field(description="which process of the region answered (0 .. workers - 1)")
    workers: int = Field(description="the region's serving processes (`workers`)")
    leader: bool = Field(
        description="whether the process that answered does the region's "
        "background work (replication into the region, outbox, retention)"
    )
    development_secrets: list[str] = Field(
        description="secrets that come from the built-in development one (empty: none)"
    )
    rule_version: int
    acked: dict[str, int]
    control: ControlWatch
    lease: dict[str, Any] = Field(
        description="the region's write lease: valid, ms left, renewals, the last error"
    )
    quarantine: dict[str, Any] = Field(
        description="per cell, changelog rows moved to the quarantine after failovers"
    )
    owned_cells: list[str]
    owners: dict[str, str]
    banned: list[str]
    forwarded: int
    held: dict[str, int]
    lost_answers: dict[str, int] = Field(
        description="forwarded writes whose answer was lost: in all, resends, resolved by "
        "a resend, answered 504 outcome_unknown; and keys this gateway added"
    )
    positions: dict[str, int]
    trimmed: dict[str, int] = Field(
        description="per cell, the changelog position up to which this copy has trimmed"
    )
    replication: list[dict[str, Any]]
    followers: dict[str, Any]
    flow: dict[str, Any] = Field(
        description="flow control: the flow rules' version, switches on, what each limit "
        "admitted, refused and queued, overload (in flight, loop delay, shed), breakers"
    )
    processes: list[dict[str, Any]] | None = Field(
        None,
        description="a region of many processes: what each last reported of itself (worker, "
        "pid, leader, rule version, acknowledgements, lease, watch) and how long ago",
    )
    replication_from: dict[str, Any] | None = Field(
        None,
        description="a region of many processes: the process whose replication streams "
        "`replication` shows (the leader) and how old its report is",
    )


class PeerProbeCall(_Body):
    """The control plane asks a region whether it can reach another (failover agreement)."""

    region: Annotated[str, Field(max_length=16)]
