"""Typed errors shared by every layer; the gateway maps them to `{error, message}` bodies.

`code` is the stable machine-readable name clients switch on; `status` the HTTP status.
"""

from __future__ import annotations

from typing import Any, ClassVar


class UnitradeError(Exception):
    code: ClassVar[str] = "error"
    status: ClassVar[int] = 400

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class InvalidRequest(UnitradeError):
    code = "invalid_request"
    status = 422


class MalformedJson(UnitradeError):
    code = "malformed_json"
    status = 400


class PayloadTooLarge(UnitradeError):
    code = "payload_too_large"
    status = 413


class Unauthorized(UnitradeError):
    code = "unauthorized"
    status = 401


class Forbidden(UnitradeError):
    code = "forbidden"
    status = 403


class NotFound(UnitradeError):
    code = "not_found"
    status = 404


# Refusals of requests that are valid by the schema are not 422 (which means "fix the
# request's shape"): the SKU names no product (404), the amount contradicts the order (409).
class UnknownSku(UnitradeError):
    code = "unknown_sku"
    status = 404


class AmountMismatch(UnitradeError):
    code = "amount_mismatch"
    status = 409


class InsufficientStock(UnitradeError):
    code = "insufficient_stock"
    status = 409


class IllegalTransition(UnitradeError):
    code = "illegal_transition"
    status = 409


class Conflict(UnitradeError):
    """A request that contradicts an earlier one with the same key (idempotency, payment)."""

    code = "conflict"
    status = 409


class CartEmpty(UnitradeError):
    code = "cart_empty"
    status = 409


class StockBelowCommitted(UnitradeError):
    code = "stock_below_committed"
    status = 409


class WrongRegion(UnitradeError):
    """A write (or a forwarded request) reached a region that does not own the cell."""

    code = "wrong_region"
    status = 421  # Misdirected Request


class WriteBanned(UnitradeError):
    """The cell is banned for a switch: no region may write it now; retry shortly."""

    code = "write_banned"
    status = 503
    retry_after_s: ClassVar[int] = 1


class NoWriteLease(WriteBanned):
    """This region holds no valid write lease (control/lease.py): it cannot reach the lease
    authority, or a failover has taken its cells. Nothing was written; retry shortly (the
    gateway sends the retry to whichever region owns the cell by then)."""

    code = "no_write_lease"
    status = 503
    retry_after_s: ClassVar[int] = 1


class LeaseRefused(UnitradeError):
    """The lease authority refuses a region's lease: a failover took its cells, and the
    region has not installed the rule that says so yet."""

    code = "lease_refused"
    status = 409


class RegionUnavailable(UnitradeError):
    code = "region_unavailable"
    status = 503
    retry_after_s: ClassVar[int] = 2


class NotLeader(UnitradeError):
    """This control plane is a standby (control/election.py): another member is the active
    one, named in `leader` (its URL, when known). Nothing was done; ask the leader."""

    code = "not_leader"
    status = 503
    retry_after_s: ClassVar[int] = 1


class EtcdUnavailable(UnitradeError):
    """No etcd member answered (control/etcd.py); for a write that was sent, it may or may
    not have been applied."""

    code = "etcd_unavailable"
    status = 503
    retry_after_s: ClassVar[int] = 1


class Overloaded(UnitradeError):
    """Too many reads are already waiting for this region's copy of a cell: refused at once,
    so that a burst queues no further. Safe to retry."""

    code = "overloaded"
    status = 503
    retry_after_s: ClassVar[int] = 1


class RateLimited(UnitradeError):
    """A rate limit refused the request before any of it was done (unitrade.flow): `limit`
    names which (ip, buyer, region, order_buyer, order_sku, admin_writes). Retry after
    Retry-After seconds."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class CircuitOpen(UnitradeError):
    """A circuit breaker on calls to another region is open (unitrade.flow.breaker): the
    call failed fast, before anything was sent, so nothing was applied. `region` and `call`
    name the breaker. Retry after Retry-After seconds."""

    code = "circuit_open"
    status = 503

    def __init__(self, message: str, retry_after_s: int = 1, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class Degraded(UnitradeError):
    """A degradation switch has turned this off for now (`switch` names it; `unitrade
    degrade` lists them). Nothing was applied."""

    code = "degraded"
    status = 503
    retry_after_s: ClassVar[int] = 30


class ReadTimeout(UnitradeError):
    """A read waited too long for a reader of the cell copy and never ran. Safe to retry."""

    code = "read_timeout"
    status = 503
    retry_after_s: ClassVar[int] = 1


class OutcomeUnknown(UnitradeError):
    """The request left for another region and no answer came back (a timeout, a dropped
    connection): it may or may not have been applied. Retry with the same idempotency key
    (or payment ID), which resolves it; never read this as "nothing was written"."""

    code = "outcome_unknown"
    status = 504
    retry_after_s: ClassVar[int] = 1


class WriteOutcomeUnknown(OutcomeUnknown):
    """The database connection failed while a write transaction ran or committed (the
    server went away, the connection was cut): the commit may have reached the database or
    not. Repeat the request with the same idempotency key (or payment ID) to learn which;
    never read this as "nothing was written"."""


class OrderTimedOut(UnitradeError):
    """An order could not be written in time after its stock was reserved; nothing was
    written and the reservation is released. Safe to retry."""

    code = "order_timeout"
    status = 503
    retry_after_s: ClassVar[int] = 1


class ClockBehind(UnitradeError):
    """The clock went backwards further than order IDs may borrow from the future."""

    code = "clock_behind"
    status = 503
    retry_after_s: ClassVar[int] = 1


class SwitchRefused(UnitradeError):
    """A switchover's pre-check failed; nothing was banned or changed."""

    code = "switch_refused"
    status = 409


class FailoverRefused(UnitradeError):
    """A failover's pre-check failed (the region is not agreed to be down, or nothing can
    take its cells); nothing was changed. `--force` overrides the agreement check."""

    code = "failover_refused"
    status = 409


class OperationRunning(UnitradeError):
    """Another operation holds the control plane's single operation slot."""

    code = "operation_running"
    status = 409
    retry_after_s: ClassVar[int] = 2


class PastPointOfNoReturn(UnitradeError):
    """A switch that has published its new owner finishes; it can no longer be aborted."""

    code = "past_point_of_no_return"
    status = 409


class ChangelogTrimmed(UnitradeError):
    """A follower asked for changelog rows its owner has already trimmed: the copy can only
    be rebuilt from a snapshot (the follower does so by itself)."""

    code = "changelog_trimmed"
    status = 410


# Flash sales (services/sales.py, services/sale_tokens.py) ---------------------------------


class SaleNotFound(UnitradeError):
    code = "sale_not_found"
    status = 404


class SaleClosed(UnitradeError):
    """The sale has not started or has ended (`start_ms`, `end_ms`: its window)."""

    code = "sale_closed"
    status = 409


class SaleWindowInvalid(UnitradeError):
    """A sale's window that would never be open (it ends before it starts, or in the
    past) or that is longer than a sale may last."""

    code = "sale_window_invalid"
    status = 409


class SaleSoldOut(UnitradeError):
    """Every token of the sale is issued, or held by a region that has not returned it."""

    code = "sale_sold_out"
    status = 409


class SaleLimitReached(UnitradeError):
    """The buyer holds as many tokens of this sale as one buyer may (`per_buyer`)."""

    code = "sale_limit_reached"
    status = 409


class SaleTokenRequired(UnitradeError):
    """An order of a sale's SKU needs a token of that sale issued to this buyer
    (`sale_token` in the order body); this one is missing, unknown or another's."""

    code = "sale_token_required"
    status = 403


class SaleTokenUsed(UnitradeError):
    """The sale token has bought its unit already (`order_id` names the order)."""

    code = "sale_token_used"
    status = 409


# Coupons (services/coupons.py) ------------------------------------------------------------


class CouponNotFound(UnitradeError):
    code = "coupon_not_found"
    status = 404


class CouponSoldOut(UnitradeError):
    """All `count` coupons of this code are claimed."""

    code = "coupon_sold_out"
    status = 409


class CouponExpired(UnitradeError):
    """The coupon is past its end (`end_ms`): it can be neither claimed nor used."""

    code = "coupon_expired"
    status = 409


class CouponNotClaimed(UnitradeError):
    """An order named a coupon this buyer has not claimed."""

    code = "coupon_not_claimed"
    status = 409


class CouponUsed(UnitradeError):
    """The buyer's coupon is held by another order or used (`order_id`)."""

    code = "coupon_used"
    status = 409


class CouponNotApplicable(UnitradeError):
    """The order is below the coupon's minimum (`min_total_cents`)."""

    code = "coupon_not_applicable"
    status = 409


ERRORS_BY_CODE: dict[str, type[UnitradeError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        MalformedJson,
        PayloadTooLarge,
        Unauthorized,
        Forbidden,
        NotFound,
        UnknownSku,
        AmountMismatch,
        InsufficientStock,
        IllegalTransition,
        Conflict,
        CartEmpty,
        StockBelowCommitted,
        WrongRegion,
        WriteBanned,
        NoWriteLease,
        LeaseRefused,
        FailoverRefused,
        RegionUnavailable,
        NotLeader,
        EtcdUnavailable,
        OutcomeUnknown,
        Overloaded,
        RateLimited,
        CircuitOpen,
        Degraded,
        ReadTimeout,
        OrderTimedOut,
        ClockBehind,
        SwitchRefused,
        OperationRunning,
        PastPointOfNoReturn,
        ChangelogTrimmed,
        SaleNotFound,
        SaleClosed,
        SaleWindowInvalid,
        SaleSoldOut,
        SaleLimitReached,
        SaleTokenRequired,
        SaleTokenUsed,
        CouponNotFound,
        CouponSoldOut,
        CouponExpired,
        CouponNotClaimed,
        CouponUsed,
        CouponNotApplicable,
    )
}


def error_from_body(status: int, body: Any) -> UnitradeError:
    """Rebuild a typed error from another region's `{error, message}` answer."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        cls = ERRORS_BY_CODE.get(body["error"])
        details = {k: v for k, v in body.items() if k not in ("error", "message")}
        message = str(body.get("message", body["error"]))
        if cls is not None:
            return cls(message, **details)
    return RegionUnavailable(f"remote region answered HTTP {status}")
