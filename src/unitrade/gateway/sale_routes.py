"""The public API of flash sales and coupons (docs/api.md), declared like the rest of the
public API (gateway/api.py): each endpoint names its home.

- A token request is a write of the buyer's cell: served at its owner region, which
  issues from the segment it holds (services/sale_tokens.py).
- A coupon claim, and every admin call on sales and coupons, is a write or read of the
  center cell: served at its owner.
- A sale's definition is a public read of this region's copy of the center cell.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from fastapi.responses import Response

from unitrade.errors import Forbidden, UnknownSku
from unitrade.gateway import models
from unitrade.gateway.api import Ctx, PublicApi
from unitrade.gateway.edge import REPLAYED_HEADER
from unitrade.gateway.resend import Resend
from unitrade.gateway.routing import buyer_home, center_home, center_owner_for_admin
from unitrade.region import RegionRuntime
from unitrade.services.coupons import parse_discount
from unitrade.services.sale_tokens import sale_account
from unitrade.topology.rule import route_buyer, route_cell
from unitrade.web.responses import json_response

SaleIdPath = Annotated[str, Path(pattern=models.SALE_ID_PATTERN)]
CodePath = Annotated[str, Path(pattern=models.COUPON_PATTERN)]


def mount_sales(api: PublicApi, runtime: RegionRuntime) -> None:
    def admin(ctx: Ctx) -> None:
        if not ctx.who.admin:
            raise Forbidden("this endpoint needs the admin token")

    def replayed(body: object, new: bool, status: int) -> Response:
        return json_response(body, status, None if new else {REPLAYED_HEADER: "true"})

    # -- buyers: sales --------------------------------------------------------------------

    @api.endpoint(
        "GET",
        "/v1/sales/{sale_id}",
        public=True,
        answer=models.Sale,
        errors=(404, 422, 503),
        tags=["sales"],
    )
    async def get_sale(ctx: Ctx, sale_id: SaleIdPath) -> Response:
        """A sale's SKU, window and limits (from this region's copy of the center cell)."""
        rule = runtime.gateway.rule
        principal = ctx.who.principal
        buyer = principal.buyer_id if principal is not None else None
        home = route_buyer(rule, buyer) if buyer is not None else route_cell(rule, rule.center_cell)
        ctx.request.state.home_region = home.region
        return json_response((await runtime.sale_book.get(sale_id)).body())

    @api.endpoint(
        "POST",
        "/v1/sales/{sale_id}/tokens",
        home=buyer_home,
        status_code=201,
        answer=models.SaleToken,
        errors=(401, 403, 404, 409, 422, 503, 504),
        tags=["sales"],
        summary="Get a sale token",
    )
    async def take_token(ctx: Ctx, sale_id: SaleIdPath) -> Response:
        """A token of the sale for the calling buyer: it buys one unit of the sale's SKU,
        once, while the sale runs. At most `per_buyer` per buyer. Not idempotent: after a
        504, list the buyer's tokens (GET) before asking again."""
        token = await runtime.tokens.issue(ctx.who.buyer_id, sale_id)
        return json_response(token, 201)

    @api.endpoint(
        "GET",
        "/v1/sales/{sale_id}/tokens",
        home=buyer_home,
        answer=models.SaleTokens,
        errors=(401, 403, 404, 422, 503),
        tags=["sales"],
        summary="List my sale tokens",
    )
    async def my_tokens(ctx: Ctx, sale_id: SaleIdPath) -> Response:
        tokens = await runtime.tokens.tokens_of(ctx.who.buyer_id, sale_id)
        return json_response({"sale_id": sale_id, "tokens": tokens})

    # -- buyers: coupons ------------------------------------------------------------------

    @api.endpoint(
        "POST",
        "/v1/coupons/{code}/claim",
        home=center_home,
        resend=Resend(),  # claiming again answers the same claim
        answer=models.CouponClaim,
        errors=(401, 403, 404, 409, 422, 503, 504),
        tags=["coupons"],
        summary="Claim a coupon",
    )
    async def claim_coupon(ctx: Ctx, code: CodePath) -> Response:
        """Claim a coupon, once per buyer (again: the same claim, with the replayed
        header); at most its `count` claims in all."""
        claim, new = await runtime.coupons.claim(code, ctx.who.buyer_id)
        return replayed(claim, new, 200)

    @api.endpoint(
        "GET",
        "/v1/coupons/{code}",
        home=center_home,
        answer=models.CouponShown,
        errors=(401, 403, 404, 422, 503),
        tags=["coupons"],
        summary="Show a coupon and my claim",
    )
    async def show_coupon(ctx: Ctx, code: CodePath) -> Response:
        return json_response(await runtime.coupons.show(code, ctx.who.buyer_id))

    # -- admin ----------------------------------------------------------------------------

    @api.endpoint(
        "POST",
        "/v1/admin/sales",
        home=center_owner_for_admin,
        switch="admin_writes",
        status_code=201,
        answer=models.SaleQuota,
        errors=(400, 401, 403, 404, 409, 413, 422, 503, 504),
        tags=["admin"],
        summary="Create a sale",
    )
    async def create_sale(ctx: Ctx, body: models.CreateSale) -> Response:
        """A flash sale of one SKU of the catalog: its units become the SKU's available
        stock; one sale of a SKU at a time (`conflict` names the other)."""
        admin(ctx)
        await runtime.flow.admit_admin_write()
        found = await runtime.catalog.get_cached([body.sku])
        if body.sku not in found:
            raise UnknownSku(f"unknown SKU {body.sku!r}: put the product first", sku=body.sku)
        sale = await runtime.sales.create(
            body.sku,
            body.stock,
            body.tokens,
            body.per_buyer,
            body.start_ms,
            body.end_ms,
            body.segment_size,
        )
        return json_response(sale, 201)

    @api.endpoint(
        "GET",
        "/v1/admin/sales",
        home=center_owner_for_admin,
        answer=models.SalePage,
        errors=(401, 403, 422, 503),
        tags=["admin"],
        summary="List sales",
    )
    async def list_sales(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Response:
        admin(ctx)
        return json_response({"sales": await runtime.sales.page(limit)})

    @api.endpoint(
        "GET",
        "/v1/admin/sales/{sale_id}",
        home=center_owner_for_admin,
        answer=models.SaleAccount,
        errors=(401, 403, 404, 422, 503),
        tags=["admin"],
        summary="Show a sale and its tokens' accounting",
    )
    async def show_sale(ctx: Ctx, sale_id: SaleIdPath) -> Response:
        admin(ctx)
        body = await sale_account(runtime.sales, runtime.inventory, runtime.copies, sale_id)
        return json_response(body)

    @api.endpoint(
        "POST",
        "/v1/admin/coupons",
        home=center_owner_for_admin,
        switch="admin_writes",
        status_code=201,
        answer=models.Coupon,
        errors=(400, 401, 403, 409, 413, 422, 503, 504),
        tags=["admin"],
        summary="Create a coupon",
    )
    async def create_coupon(ctx: Ctx, body: models.CreateCoupon) -> Response:
        """A coupon code with `count` claims; the same definition again answers it."""
        admin(ctx)
        await runtime.flow.admit_admin_write()
        coupon, new = await runtime.coupons.create(
            body.code, body.count, parse_discount(body.discount), body.min_total_cents, body.valid_s
        )
        return replayed(coupon, new, 201)

    @api.endpoint(
        "GET",
        "/v1/admin/coupons",
        home=center_owner_for_admin,
        answer=models.CouponPage,
        errors=(401, 403, 422, 503),
        tags=["admin"],
        summary="List coupons",
    )
    async def list_coupons(ctx: Ctx, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Response:
        admin(ctx)
        return json_response({"coupons": await runtime.coupons.page(limit)})

    @api.endpoint(
        "GET",
        "/v1/admin/coupons/{code}",
        home=center_owner_for_admin,
        answer=models.CouponShown,
        errors=(401, 403, 404, 422, 503),
        tags=["admin"],
        summary="Show a coupon and its claims",
    )
    async def admin_coupon(ctx: Ctx, code: CodePath) -> Response:
        admin(ctx)
        return json_response(await runtime.coupons.show(code))
