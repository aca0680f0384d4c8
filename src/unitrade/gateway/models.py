"""Request bodies of the public and internal API. Unknown fields are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SALE_ID_PATTERN = r"^[0-9a-f]{12}$"
SALE_TOKEN_PATTERN = r"^[0-9a-f]{16}$"
COUPON_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
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
SaleId = Annotated[str, Field(pattern=SALE_ID_PATTERN, description="a sale's ID")]
CouponCode = Annotated[str, Field(pattern=COUPON_PATTERN, description="a coupon code")]
SaleTokenId = Annotated[
    str,
    Field(
        pattern=SALE_TOKEN_PATTERN,
        description="a token of the sale whose SKU the order buys (POST /v1/sales/{id}/tokens)",
    ),
]
# Cents off (1 to 10^12 - 1) or a whole percent (1% to 100%).
DISCOUNT_PATTERN = r"^([1-9][0-9]{0,11}|([1-9][0-9]?|100)%)$"
TOKENS_MAX = 10**9
PER_BUYER_MAX = 100
SEGMENT_SIZE_MAX = 100_000
TIME_MS_MAX = 2**53  # unix ms; far beyond any sale
COUPON_COUNT_MAX = 10**8
COUPON_VALID_S_MAX = 366 * 86_400
Qty = Annotated[int, Field(ge=1, le=QTY_MAX, strict=True), WHOLE]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrderItem(_Body):
    sku: Sku
    qty: Qty


class CreateOrder(_Body):
    items: Annotated[list[OrderItem], Field(min_length=1, max_length=ITEMS_MAX)]
    idempotency_key: Annotated[str | None, Field(pattern=KEY_PATTERN)] = None
    sale_token: SaleTokenId | None = None
    coupon: Annotated[
        CouponCode | None, Field(description="a coupon this buyer claimed, for this order")
    ] = None


class Checkout(_Body):
    idempotency_key: Annotated[str | None, Field(pattern=KEY_PATTERN)] = None
    sale_token: SaleTokenId | None = None
    coupon: Annotated[
        CouponCode | None, Field(description="a coupon this buyer claimed, for this order")
    ] = None


class CreateSale(_Body):
    sku: Sku
    stock: Annotated[
        int,
        Field(ge=0, le=STOCK_MAX, strict=True, description="units for sale: the SKU's available"),
        WHOLE,
    ]
    tokens: Annotated[
        int,
        Field(ge=1, le=TOKENS_MAX, strict=True, description="tokens the sale issues at most (M)"),
        WHOLE,
    ]
    per_buyer: Annotated[
        int,
        Field(ge=1, le=PER_BUYER_MAX, strict=True, description="tokens one buyer may hold (K)"),
        WHOLE,
    ]
    start_ms: Annotated[int, Field(ge=0, le=TIME_MS_MAX, strict=True), WHOLE]
    end_ms: Annotated[int, Field(ge=0, le=TIME_MS_MAX, strict=True), WHOLE]
    segment_size: Annotated[
        int,
        Field(
            ge=1,
            le=SEGMENT_SIZE_MAX,
            strict=True,
            description="tokens handed to a region's process at a time",
        ),
        WHOLE,
    ] = 100


class CreateCoupon(_Body):
    code: CouponCode
    count: Annotated[
        int,
        Field(ge=1, le=COUPON_COUNT_MAX, strict=True, description="claims allowed in all (N)"),
        WHOLE,
    ]
    discount: Annotated[
        str,
        Field(pattern=DISCOUNT_PATTERN, description="cents off (500) or a percent off (10%)"),
    ]
    min_total_cents: Annotated[
        int,
        Field(ge=0, le=PRICE_CENTS_MAX, strict=True, description="orders from this subtotal"),
        WHOLE,
    ] = 0
    valid_s: Annotated[
        int,
        Field(
            ge=1,
            le=COUPON_VALID_S_MAX,
            strict=True,
            description="seconds from now during which it may be claimed and used",
        ),
        WHOLE,
    ] = 30 * 86_400


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


class TermsCall(_Body):
    """An order's sale and coupon, checked and held with its stock (inventory.py Terms)."""

    buyer_id: Annotated[int, Field(ge=0)]
    sale_id: Annotated[str | None, Field(pattern=SALE_ID_PATTERN)] = None
    coupon: Annotated[str | None, Field(pattern=COUPON_PATTERN)] = None
    subtotal_cents: Annotated[int, Field(ge=0)]


class ReserveCall(_Body):
    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]
    cell: int
    lines: Annotated[list[tuple[Sku, Qty]], Field(min_length=1, max_length=ITEMS_MAX)]
    terms: TermsCall | None = None


class SaleSegmentCall(_Body):
    sale_id: Annotated[str, Field(pattern=SALE_ID_PATTERN)]
    region: Annotated[str, Field(max_length=16)]
    holder: Annotated[str, Field(min_length=1, max_length=32)]
    grant_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class SaleReturnCall(_Body):
    sale_id: Annotated[str, Field(pattern=SALE_ID_PATTERN)]
    segment_id: Annotated[int, Field(ge=1)]
    used: Annotated[int, Field(ge=0)]


class SaleCall(_Body):
    sale_id: Annotated[str, Field(pattern=SALE_ID_PATTERN)]


class CouponHoldCall(_Body):
    """The coupon a reconciled order was priced with (services/coupons.py CouponHold)."""

    code: CouponCode
    buyer_id: Annotated[int, Field(ge=0)]
    discount_cents: Annotated[int, Field(ge=0)]


class ReinstateCall(_Body):
    """A reconciled order's reservation (services/inventory.py `reinstate`)."""

    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]
    cell: int
    lines: Annotated[list[tuple[Sku, Qty]], Field(min_length=1, max_length=ITEMS_MAX)]
    hold: bool
    dry_run: bool = False
    coupon: CouponHoldCall | None = None


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
    total_cents: Annotated[int, Field(description="subtotal less the coupon's discount")]
    subtotal_cents: Annotated[int, Field(description="the sum of the lines")]
    discount_cents: int
    coupon: str | None
    sale_id: Annotated[str | None, Field(description="the sale whose token bought a unit")]
    sale_token: str | None
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


SaleState = Literal["scheduled", "open", "ended"]


class Sale(BaseModel):
    sale_id: str
    sku: str
    stock: int
    tokens: int
    per_buyer: int
    segment_size: int
    start_ms: int
    end_ms: int
    state: SaleState


class SaleQuota(Sale):
    remaining: Annotated[int, Field(description="tokens not handed to any region yet")]
    segments: Annotated[int, Field(description="segments handed out so far")]


class SalePage(BaseModel):
    sales: list[SaleQuota]


class SaleAccount(Sale):
    """Where every token of the sale is (docs/api.md, docs/architecture.md)."""

    remaining: int
    issued: Annotated[int, Field(description="tokens in buyers' cells")]
    used: Annotated[int, Field(description="issued tokens that bought a unit")]
    unissued_in_segments: int
    unissued_by_region: dict[str, int]
    lost: Annotated[int, Field(description="untaken in segments never given back")]
    lost_by_region: dict[str, int]
    issued_unknown_segments: int
    segments: dict[str, int]
    segments_counted: int
    balanced: Annotated[bool, Field(description="remaining + issued + unissued + lost = tokens")]
    as_of_ms: int
    levels: InventoryLevels | None


class SaleToken(BaseModel):
    token: str
    sale_id: str
    sku: str | None
    buyer_id: int
    status: Literal["issued", "used"]
    order_id: str | None
    created_ms: int
    sale_end_ms: int


class SaleTokens(BaseModel):
    sale_id: str
    tokens: list[SaleToken]


class Coupon(BaseModel):
    code: str
    count: int
    claimed: int
    discount: str
    discount_kind: Literal["cents", "percent"]
    discount_value: int
    min_total_cents: int
    end_ms: int
    created_ms: int


class CouponClaim(BaseModel):
    code: str
    buyer_id: int
    status: Literal["claimed", "held", "used"]
    order_id: str | None
    claimed_ms: int


class CouponShown(Coupon):
    claims: dict[str, int]
    mine: Annotated[CouponClaim | None, Field(description="the calling buyer's claim")] = None


class CouponPage(BaseModel):
    coupons: list[Coupon]


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
