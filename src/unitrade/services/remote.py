"""`center` and `global` route types: inventory, payment-claim and catalog calls go to the
owner region of the center or global cell; when that is this region they run in-process.

A center call that fails names the center region and the call (`region`, `call: center`):
a buyer of another region must learn which region failed, not only that their order did.
A write to the center (a stock reservation, a step, a stock total, a payment claim) sent
without an answer is 504 `outcome_unknown`, never a 503 that says nothing happened; where
the caller knows better (an order whose reservation is lost is not written, a payment whose
claim is lost is not written: services/orders.py) it says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from unitrade.errors import OutcomeUnknown, RegionUnavailable, UnitradeError, WriteBanned
from unitrade.flow.breaker import BreakerBoard
from unitrade.rpc.client import RegionClient, Unanswered, Unreachable
from unitrade.services.catalog import CatalogService
from unitrade.services.catalog_cache import CatalogCache
from unitrade.services.coupons import CouponHold
from unitrade.services.inventory import NO_TERMS, InventoryService, Lines, Terms
from unitrade.services.payments import PaymentClaims
from unitrade.services.sales import SaleService
from unitrade.topology.rule_view import RuleView

log = logging.getLogger("unitrade.services.remote")

PRODUCTS_TARGET = "/internal/catalog/products"
CENTER_CALL = "center"  # the `call` of an error body when a center stock call failed
CATALOG_CALL = "catalog"  # the breaker of reads of the global cell's owner
CATALOG_OWNER_READS = "catalog_owner_reads"  # the switch that turns those reads off
# What each center call does, for messages; and whether it writes.
CENTER_CALLS: dict[str, tuple[str, bool]] = {
    "reserve": ("stock reservation", True),
    "step": ("reservation step", True),
    "reinstate": ("reservation of a reconciled order", True),
    "stock": ("stock total", True),
    "claim": ("payment claim", True),
    "stale": ("read of old reservations", False),
    "levels": ("stock read", False),
    "sale_segment": ("sale token quota", True),
    "sale_return": ("return of sale tokens", True),
    "sale": ("sale read", False),
}


def failed_call(exc: BaseException) -> bool:
    """Whether a remote call's error counts against its breaker (flow/breaker.py): no
    answer, or an answer that says the region could not serve the call. A refusal of the
    request itself (4xx) and a cell banned for a switch are answers of a healthy region."""
    if isinstance(exc, UnitradeError):
        return exc.status >= 500 and not isinstance(exc, WriteBanned)
    return True


class CenterClient:
    def __init__(
        self,
        rules: RuleView,
        region: str,
        local: InventoryService,
        client: RegionClient,
        breakers: BreakerBoard | None = None,
        *,
        claims: PaymentClaims,
        sales: SaleService | None = None,
    ) -> None:
        self.rules = rules
        self.region = region
        self.local = local
        self.claims = claims
        self.client = client
        self.breakers = breakers
        self.sales = sales or SaleService(local.store)

    async def _call(
        self,
        local: Callable[[], Awaitable[Any]],
        path: str,
        payload: dict[str, Any],
        timeout_s: float | None = None,
    ) -> Any:
        """In-process when this region owns the center cell, else a signed call to its owner
        (the rule is read once, so both halves agree on the owner), all its attempts within
        `timeout_s` when given."""
        rule = self.rules.rule
        owner = rule.owner_of(rule.center_cell)
        if owner == self.region:
            return await local()
        what, writes = CENTER_CALLS[path]
        call = f"center stock call ({what}) to center region {owner}"
        try:
            return await self._send(owner, path, payload, timeout_s)
        except Unanswered as exc:
            if writes:
                raise OutcomeUnknown(
                    f"{call}: no answer; it may have been applied", region=owner, call=CENTER_CALL
                ) from exc
            raise RegionUnavailable(f"{call}: no answer", region=owner, call=CENTER_CALL) from exc
        except Unreachable as exc:
            raise RegionUnavailable(
                f"{call}: unreachable, nothing was sent", region=owner, call=CENTER_CALL
            ) from exc

    async def _send(
        self, owner: str, path: str, payload: dict[str, Any], timeout_s: float | None
    ) -> Any:
        """The signed call, through the center's breaker: while it is open the call fails
        fast with 503 circuit_open, before anything is sent."""

        def send() -> Awaitable[Any]:
            return self.client.call(
                owner, "POST", f"/internal/center/{path}", payload, timeout_s=timeout_s
            )

        if self.breakers is None:
            return await send()
        return await self.breakers.get(owner, CENTER_CALL).run(send, failed_call)

    async def reserve(
        self,
        order_id: int,
        cell: int,
        lines: Lines,
        timeout_s: float | None = None,
        terms: Terms = NO_TERMS,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"order_id": str(order_id), "cell": cell, "lines": lines}
        if terms != NO_TERMS:
            # Only when there are terms: a center of an older version takes the call as before.
            payload["terms"] = {
                "buyer_id": terms.buyer_id,
                "sale_id": terms.sale_id,
                "coupon": terms.coupon,
                "subtotal_cents": terms.subtotal_cents,
            }
        result: dict[str, Any] = await self._call(
            lambda: self.local.reserve(order_id, cell, lines, terms), "reserve", payload, timeout_s
        )
        return result

    async def sale_segment(
        self, sale_id: str, region: str, holder: str, grant_id: str
    ) -> dict[str, Any]:
        """A segment of a sale's token quota for this process (services/sales.py)."""
        payload = {"sale_id": sale_id, "region": region, "holder": holder, "grant_id": grant_id}
        result: dict[str, Any] = await self._call(
            lambda: self.sales.grant(sale_id, region, holder, grant_id), "sale_segment", payload
        )
        return result

    async def sale_return(self, sale_id: str, segment_id: int, used: int) -> dict[str, Any]:
        payload = {"sale_id": sale_id, "segment_id": segment_id, "used": used}
        result: dict[str, Any] = await self._call(
            lambda: self.sales.give_back(sale_id, segment_id, used), "sale_return", payload
        )
        return result

    async def sale(self, sale_id: str) -> dict[str, Any]:
        """A sale's definition, read at the center's owner."""

        async def local() -> dict[str, Any]:
            return (await self.sales.get(sale_id)).body()

        result: dict[str, Any] = await self._call(local, "sale", {"sale_id": sale_id})
        return result

    async def step(
        self,
        order_id: int,
        step: str,
        lines: Lines | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"order_id": str(order_id), "step": step}
        if lines:
            payload["lines"] = lines
        result: dict[str, Any] = await self._call(
            lambda: self.local.step(order_id, step, lines), "step", payload, timeout_s
        )
        return result

    async def reinstate(
        self,
        order_id: int,
        cell: int,
        lines: Lines,
        hold: bool,
        dry_run: bool = False,
        coupon: CouponHold | None = None,
    ) -> dict[str, Any]:
        """The reservation of a reconciled order holds its stock, or none, and its coupon
        claim follows it (inventory.py)."""
        payload = {
            "order_id": str(order_id),
            "cell": cell,
            "lines": lines,
            "hold": hold,
            "dry_run": dry_run,
            "coupon": None if coupon is None else dataclasses.asdict(coupon),
        }
        result: dict[str, Any] = await self._call(
            lambda: self.local.reinstate(order_id, cell, lines, hold, dry_run, coupon),
            "reinstate",
            payload,
        )
        return result

    async def claim(
        self,
        payment_id: str,
        order_id: int,
        amount_cents: int,
        timeout_s: float | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Claim a payment ID for an order at the center (services/payments.py); conflict
        if another order holds it."""
        payload = {
            "payment_id": payment_id,
            "order_id": str(order_id),
            "amount_cents": amount_cents,
            "dry_run": dry_run,
        }
        result: dict[str, Any] = await self._call(
            lambda: self.claims.claim(payment_id, order_id, amount_cents, dry_run),
            "claim",
            payload,
            timeout_s,
        )
        return result

    async def set_stock(self, sku: str, total: int) -> dict[str, Any]:
        payload = {"sku": sku, "total": total}
        result: dict[str, Any] = await self._call(
            lambda: self.local.set_stock(sku, total), "stock", payload
        )
        return result

    async def stale(self, cell: int, older_than_ms: int, limit: int) -> list[int]:
        payload = {"cell": cell, "older_than_ms": older_than_ms, "limit": limit}
        found = await self._call(
            lambda: self.local.stale(cell, older_than_ms, limit), "stale", payload
        )
        return [int(order_id) for order_id in found]

    async def levels(self, sku: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            lambda: self.local.levels(sku), "levels", {"sku": sku}
        )
        return result


class CatalogClient:
    """Reads of the global cell, from this region's own copy (replicated from the owner,
    docs/architecture.md), with a cache that every replicated product change invalidates.

    A SKU this copy does not have yet is asked of the global cell's owner: a product written
    there a moment ago (a shop adding a product, then its first order coming in at another
    region) is orderable at once, not only once replication has brought it. The copy still
    answers everything it holds; the owner is asked only for what it lacks, within
    FALLBACK_TIMEOUT_S and once (a read: nothing to retry into).
    """

    FALLBACK_TIMEOUT_S = 1.0

    def __init__(
        self,
        local: CatalogService,
        cache: CatalogCache | None = None,
        rules: RuleView | None = None,
        region: str = "",
        client: RegionClient | None = None,
        breakers: BreakerBoard | None = None,
    ) -> None:
        self.local = local
        self.breakers = breakers
        self.cache = cache or CatalogCache()
        self.rules = rules
        self.region = region
        self.client = client
        self.fallbacks = 0  # SKUs the owner was asked for
        local.on_write.append(self.cache.invalidate)

    async def get_cached(self, skus: list[str]) -> dict[str, dict[str, Any]]:
        """Products for pricing and carts: cached (see services/catalog_cache.py)."""
        found, missing = self.cache.get(skus)
        if missing:
            fetched = await self.local.get_many(missing)
            lacking = [sku for sku in missing if sku not in fetched]
            if lacking:
                fetched.update(await self._from_owner(lacking))
            self.cache.put(fetched)
            found.update(fetched)
        return found

    async def _from_owner(self, skus: list[str]) -> dict[str, dict[str, Any]]:
        """The products the global cell's owner has of `skus` (none if this region is the
        owner, the owner does not answer in time or its breaker is open, or the switch
        catalog_owner_reads is on: the SKUs are then unknown here)."""
        if self.rules is None or self.client is None:
            return {}
        rule = self.rules.rule
        owner = rule.owner_of(rule.global_cell)
        if owner == self.region or rule.flow.switch_on(CATALOG_OWNER_READS):
            return {}
        self.fallbacks += len(skus)
        client = self.client

        async def read() -> Any:
            async with asyncio.timeout(self.FALLBACK_TIMEOUT_S):
                return await client.call(
                    owner, "POST", PRODUCTS_TARGET, {"skus": skus}, idempotent=False
                )

        try:
            if self.breakers is None:
                got = await read()
            else:
                got = await self.breakers.get(owner, CATALOG_CALL).run(read, failed_call)
        except (UnitradeError, TimeoutError) as exc:
            log.warning("catalog: %s not here and not from %s: %s", skus[:3], owner, exc)
            return {}
        return {str(sku): product for sku, product in dict(got).items() if sku in skus}

    async def get_many(self, skus: list[str]) -> dict[str, dict[str, Any]]:
        return await self.local.get_many(skus)

    async def page(self, limit: int, after: str | None) -> list[dict[str, Any]]:
        return await self.local.page(limit, after)
