"""The public API of a region: orders, cart, catalog and admin writes, the same at every
region. Each endpoint names its home (gateway/routing.py); it is served at the owner region
of that cell, forwarded there once from any other region."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import Path, Query
from fastapi.responses import Response

from unitrade.errors import Forbidden, NotFound, UnitradeError
from unitrade.gateway import models
from unitrade.gateway.api import Ctx, PublicApi
from unitrade.gateway.edge import REPLAYED_HEADER
from unitrade.gateway.resend import Resend
from unitrade.gateway.routing import (
    buyer_home,
    global_owner_for_admin,
    order_home,
    order_list_home,
    order_read_home,
)
from unitrade.region import RegionRuntime
from unitrade.services.orders import CURSOR_PATTERN, NO_OFFER, Offer
from unitrade.topology.order_id import parse_order_id
from unitrade.topology.probes import PROBE_SKU
from unitrade.topology.rule import RoutingError, route_buyer, route_cell, route_order
from unitrade.web.responses import json_response
from unitrade.web.tokens import read_claims

SkuPath = Annotated[str, Path(pattern=models.SKU_PATTERN)]
Consistency = Literal["owner", "replica"]


def mount_public(api: PublicApi, runtime: RegionRuntime) -> None:
    def parse_order(order_id: str) -> int:
        try:
            parsed = parse_order_id(order_id)
            route_order(runtime.gateway.rule, parsed)
        except (ValueError, RoutingError) as exc:
            raise NotFound(f"no order {order_id[:40]}: {exc}") from exc
        return parsed

    def created(order: object, replayed: bool) -> Response:
        headers = {REPLAYED_HEADER: "true"} if replayed else None
        return json_response(order, 201, headers)

    # -- orders -----------------------------------------------------------------------------

    @api.endpoint(
        "POST",
        "/v1/orders",
        home=buyer_home,
        direct_body=models.CreateOrder,
        resend=Resend(keyed=models.CreateOrder),
        status_code=201,
        answer=models.Order,
        errors=(400, 401, 403, 404, 409, 413, 422, 503, 504),
        tags=["orders"],
    )
    async def create_order(ctx: Ctx, body: models.CreateOrder) -> Response:
        items = [(i.sku, i.qty) for i in body.items]
        offer = Offer(body.sale_token, body.coupon)
        done = await runtime.orders.create(ctx.who.buyer_id, items, body.idempotency_key, offer)
        return created(done.order, done.replayed)

    @api.endpoint(
        "GET",
        "/v1/orders",
        home=order_list_home,  # the switch order_list_owner_reads serves it from here
        answer=models.OrderPage,
        errors=(401, 403, 422, 503),
        tags=["orders"],
    )
    async def list_orders(
        ctx: Ctx,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
    ) -> Response:
        page, next_cursor = await runtime.orders.list(ctx.who.buyer_id, limit, cursor)
        return json_response({"orders": page, "next_cursor": next_cursor})

    @api.endpoint(
        "GET",
        "/v1/orders/{order_id}",
        home=order_read_home,
        answer=models.Order,
        errors=(401, 403, 404, 422, 503),
        tags=["orders"],
    )
    async def get_order(
        ctx: Ctx,
        order_id: str,
        consistency: Annotated[
            Consistency,
            Query(
                description="owner: read at the owner region (forwarded); replica: this "
                "region's copy, which may lag the owner by the replication lag"
            ),
        ] = "owner",
    ) -> Response:
        buyer = ctx.who.buyer_id
        parsed = parse_order(order_id)
        if consistency == "replica":
            ctx.request.state.home_region = route_order(runtime.gateway.rule, parsed).region
        return json_response(await runtime.orders.get(buyer, parsed))

    @api.endpoint(
        "POST",
        "/v1/orders/{order_id}/pay",
        home=order_home,
        resend=Resend(),  # by its payment_id
        answer=models.Order,
        errors=(400, 401, 403, 404, 409, 413, 422, 503, 504),
        tags=["orders"],
    )
    async def pay_order(ctx: Ctx, order_id: str, body: models.Pay) -> Response:
        buyer = ctx.who.buyer_id
        parsed = parse_order(order_id)
        return json_response(
            await runtime.orders.pay(buyer, parsed, body.payment_id, body.amount_cents)
        )

    @api.endpoint(
        "POST",
        "/v1/orders/{order_id}/close",
        home=order_home,
        resend=Resend(),  # a repeated transition answers the order
        answer=models.Order,
        errors=(401, 403, 404, 409, 422, 503, 504),
        tags=["orders"],
        summary="Close order",
    )
    async def close_order(ctx: Ctx, order_id: str) -> Response:
        buyer = ctx.who.buyer_id
        parsed = parse_order(order_id)
        return json_response(await runtime.orders.transition(buyer, parsed, "close"))

    @api.endpoint(
        "POST",
        "/v1/orders/{order_id}/refund",
        home=order_home,
        resend=Resend(),
        answer=models.Order,
        errors=(401, 403, 404, 409, 422, 503, 504),
        tags=["orders"],
        summary="Refund order",
    )
    async def refund_order(ctx: Ctx, order_id: str) -> Response:
        buyer = ctx.who.buyer_id
        parsed = parse_order(order_id)
        return json_response(await runtime.orders.transition(buyer, parsed, "refund"))

    # -- cart -------------------------------------------------------------------------------

    @api.endpoint(
        "PUT",
        "/v1/cart/items/{sku}",
        home=buyer_home,
        switch="cart_writes",
        answer=models.Cart,
        errors=(400, 401, 403, 404, 409, 413, 422, 503, 504),
        tags=["cart"],
    )
    async def put_cart_item(ctx: Ctx, sku: SkuPath, body: models.CartQty) -> Response:
        return json_response(await runtime.cart.put(ctx.who.buyer_id, sku, body.qty))

    @api.endpoint(
        "DELETE",
        "/v1/cart/items/{sku}",
        home=buyer_home,
        switch="cart_writes",
        answer=models.Cart,
        errors=(401, 403, 404, 422, 503, 504),
        tags=["cart"],
    )
    async def delete_cart_item(ctx: Ctx, sku: SkuPath) -> Response:
        return json_response(await runtime.cart.remove(ctx.who.buyer_id, sku))

    @api.endpoint(
        "GET",
        "/v1/cart",
        home=buyer_home,
        answer=models.Cart,
        errors=(401, 403, 503),
        tags=["cart"],
    )
    async def get_cart(ctx: Ctx) -> Response:
        return json_response(await runtime.cart.get(ctx.who.buyer_id))

    @api.endpoint(
        "POST",
        "/v1/cart/checkout",
        home=buyer_home,
        resend=Resend(keyed=models.Checkout),
        status_code=201,
        answer=models.Order,
        errors=(400, 401, 403, 404, 409, 413, 422, 503, 504),
        tags=["cart"],
    )
    async def checkout(ctx: Ctx, body: models.Checkout | None = None) -> Response:
        key = body.idempotency_key if body else None
        offer = Offer(body.sale_token, body.coupon) if body else NO_OFFER
        done = await runtime.orders.checkout(ctx.who.buyer_id, key, offer)
        return created(done.order, done.replayed)

    # -- catalog and inventory: public reads of this region's copies ------------------------

    def reader_home(ctx: Ctx, cell: int) -> None:
        """The home-region header of a read served here: the buyer's, else the cell's."""
        rule = runtime.gateway.rule
        principal = ctx.who.principal
        buyer = principal.buyer_id if principal is not None else None
        home = route_buyer(rule, buyer) if buyer is not None else route_cell(rule, cell)
        ctx.request.state.home_region = home.region

    @api.endpoint(
        "GET",
        "/v1/products",
        public=True,
        answer=models.ProductPage,
        errors=(422,),
        tags=["catalog"],
    )
    async def list_products(
        ctx: Ctx,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(pattern=models.SKU_PATTERN)] = None,
    ) -> Response:
        reader_home(ctx, runtime.gateway.rule.global_cell)
        page = await runtime.catalog.page(limit, cursor)
        next_cursor = page[-1]["sku"] if len(page) == limit else None
        return json_response({"products": page, "next_cursor": next_cursor})

    @api.endpoint(
        "GET",
        "/v1/products/{sku}",
        public=True,
        answer=models.Product,
        errors=(404, 422),
        tags=["catalog"],
    )
    async def get_product(ctx: Ctx, sku: SkuPath) -> Response:
        reader_home(ctx, runtime.gateway.rule.global_cell)
        found = await runtime.catalog.get_many([sku])
        if sku not in found:
            raise NotFound(f"no product {sku!r}")
        return json_response(found[sku])

    @api.endpoint(
        "GET",
        "/v1/inventory/{sku}",
        public=True,
        answer=models.InventoryLevels,
        errors=(404, 422, 503),
        tags=["catalog"],
    )
    async def get_inventory(ctx: Ctx, sku: SkuPath) -> Response:
        reader_home(ctx, runtime.gateway.rule.center_cell)
        return json_response(await runtime.center.levels(sku))

    # -- admin ------------------------------------------------------------------------------

    @api.endpoint(
        "PUT",
        "/v1/admin/products/{sku}",
        home=global_owner_for_admin,
        switch="admin_writes",
        answer=models.ProductWritten,
        errors=(400, 401, 403, 404, 409, 413, 422, 503, 504),
        tags=["admin"],
    )
    async def put_product(ctx: Ctx, sku: SkuPath, body: models.PutProduct) -> Response:
        if not ctx.who.admin:
            raise Forbidden("this endpoint needs the admin token")
        if sku != PROBE_SKU:  # the health checker's probe stock is never limited
            await runtime.flow.admit_admin_write()
        # Stock first: it is the step that can be refused (below reserved + sold); both
        # steps set absolute values, so retrying the whole request is safe.
        levels = await runtime.center.set_stock(sku, body.stock)
        product = await runtime.catalog_service.put(sku, body.title, body.price_cents)
        return json_response({**product, "stock": body.stock, **levels})

    @api.endpoint(
        "POST",
        "/v1/admin/tokens/revoke",
        home=global_owner_for_admin,
        answer=models.TokenRevoked,
        errors=(400, 401, 403, 404, 409, 413, 422, 503, 504),
        tags=["admin"],
    )
    async def revoke_token(ctx: Ctx, body: models.RevokeToken) -> Response:
        """Revoke a bearer token before it expires, in every region (the revocation is
        written in the global cell and replicated; it is kept until the token expires)."""
        if not ctx.who.admin:
            raise Forbidden("this endpoint needs the admin token")
        await runtime.flow.admit_admin_write()
        try:
            claims = read_claims(runtime.config.token_keys, body.token, expired_ok=True)
        except UnitradeError as exc:
            # Well-formed or not, a token no key of this cluster signed does not exist here.
            raise NotFound(f"no token of this cluster: {exc.message}") from exc
        expired = claims.expires_s < time.time()
        if not expired:
            await runtime.revocations.revoke(claims.token_id, claims.expires_s)
        return json_response(
            {"token_id": claims.token_id, "expires_s": claims.expires_s, "expired": expired}
        )
