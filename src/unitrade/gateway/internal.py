"""The internal API a region serves for the cells it owns: center services (inventory,
payment claims) and catalog reads at the global cell's owner. Signed region-to-region calls
only (not in the OpenAPI document)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.routing import Route

from unitrade.errors import InvalidRequest, UnitradeError, WrongRegion
from unitrade.gateway import models
from unitrade.region import RegionRuntime
from unitrade.services.coupons import CouponHold
from unitrade.services.inventory import NO_TERMS, Terms
from unitrade.services.remote import PRODUCTS_TARGET
from unitrade.web.signed import internal_endpoint

PEER_PROBE_TIMEOUT_S = 0.5  # a region that answers does so in milliseconds, even across regions


def internal_routes(runtime: RegionRuntime) -> list[Route]:
    def owned(cell: Callable[[], int]) -> Callable[[], None]:
        def check() -> None:
            owner = runtime.fence.rule.owner_of(cell())
            if owner != runtime.name:
                raise WrongRegion(f"cell {cell()} is owned by {owner}", owner=owner, cell=cell())

        return check

    center = owned(lambda: runtime.fence.rule.center_cell)
    global_cell = owned(lambda: runtime.fence.rule.global_cell)
    inventory = runtime.inventory

    sales = runtime.sales

    async def reserve(b: models.ReserveCall) -> Any:
        terms = NO_TERMS
        if b.terms is not None:
            terms = Terms(b.terms.buyer_id, b.terms.sale_id, b.terms.coupon, b.terms.subtotal_cents)
        lines = [(s, q) for s, q in b.lines]
        return await inventory.reserve(int(b.order_id), b.cell, lines, terms)

    async def sale_segment(b: models.SaleSegmentCall) -> Any:
        return await sales.grant(b.sale_id, b.region, b.holder, b.grant_id)

    async def sale_return(b: models.SaleReturnCall) -> Any:
        return await sales.give_back(b.sale_id, b.segment_id, b.used)

    async def sale(b: models.SaleCall) -> Any:
        return (await sales.get(b.sale_id)).body()

    async def step(b: models.StepCall) -> Any:
        lines = [(s, q) for s, q in b.lines] if b.lines else None
        return await inventory.step(int(b.order_id), b.step, lines)

    async def reinstate(b: models.ReinstateCall) -> Any:
        lines = [(s, q) for s, q in b.lines]
        held = None if b.coupon is None else CouponHold(**b.coupon.model_dump())
        order_id = int(b.order_id)
        return await inventory.reinstate(order_id, b.cell, lines, b.hold, b.dry_run, held)

    async def claim(b: models.ClaimCall) -> Any:
        order_id = int(b.order_id)
        return await runtime.payment_claims.claim(b.payment_id, order_id, b.amount_cents, b.dry_run)

    async def stock(b: models.StockCall) -> Any:
        return await inventory.set_stock(b.sku, b.total)

    async def stale(b: models.StaleCall) -> Any:
        found = await inventory.stale(b.cell, b.older_than_ms, b.limit)
        return [str(order_id) for order_id in found]

    async def levels(b: models.SkuCall) -> Any:
        return await inventory.levels(b.sku)

    async def products(b: models.ProductsCall) -> Any:
        return await runtime.catalog_service.get_many(b.skus)

    async def probe(b: models.PeerProbeCall) -> Any:
        """Can this region reach region `b.region` now? One /healthz, briefly bounded: a
        failover asks every other region before it takes a region's cells."""
        if b.region not in runtime.config.region_names or b.region == runtime.name:
            raise InvalidRequest(f"not another region of the cluster: {b.region!r}")
        try:
            async with asyncio.timeout(PEER_PROBE_TIMEOUT_S):
                await runtime.client.call(b.region, "GET", "/healthz", idempotent=False)
        except (UnitradeError, OSError, TimeoutError) as exc:
            return {"region": b.region, "reachable": False, "error": f"{type(exc).__name__}"}
        return {"region": b.region, "reachable": True, "error": ""}

    calls = [
        ("/internal/center/reserve", internal_endpoint(models.ReserveCall, reserve, before=center)),
        ("/internal/center/step", internal_endpoint(models.StepCall, step, before=center)),
        (
            "/internal/center/reinstate",
            internal_endpoint(models.ReinstateCall, reinstate, before=center),
        ),
        ("/internal/center/claim", internal_endpoint(models.ClaimCall, claim, before=center)),
        ("/internal/center/stock", internal_endpoint(models.StockCall, stock, before=center)),
        ("/internal/center/stale", internal_endpoint(models.StaleCall, stale, before=center)),
        ("/internal/center/levels", internal_endpoint(models.SkuCall, levels, before=center)),
        (
            "/internal/center/sale_segment",
            internal_endpoint(models.SaleSegmentCall, sale_segment, before=center),
        ),
        (
            "/internal/center/sale_return",
            internal_endpoint(models.SaleReturnCall, sale_return, before=center),
        ),
        ("/internal/center/sale", internal_endpoint(models.SaleCall, sale, before=center)),
        (PRODUCTS_TARGET, internal_endpoint(models.ProductsCall, products, before=global_cell)),
        ("/internal/peer/probe", internal_endpoint(models.PeerProbeCall, probe)),
    ]
    return [Route(path, handler, methods=["POST"]) for path, handler in calls]
