"""The HTTP API of a region: the same public API at every region, plus the internal API.

Each public handler finds the owner region of the data it touches (the buyer's cell, or the
cell in the order ID) and either serves locally or forwards once to the owner. Responses
name the owner region in `X-Unitrade-Region` and the serving region in
`X-Unitrade-Served-By`, so a client can go to its home region directly next time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.routing import Route

from unitrade import __version__
from unitrade.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    Unauthorized,
    WriteBanned,
    WrongRegion,
)
from unitrade.gateway import models
from unitrade.gateway.auth import Principal, read_authorization
from unitrade.gateway.edge import (
    REPLAYED_HEADER,
    DirectHandler,
    EdgeMiddleware,
    install_error_handlers,
    invalid_body,
    json_response,
)
from unitrade.gateway.forward import RULE_VERSION_HEADER, changing_owner, is_write
from unitrade.gateway.metrics import metrics_endpoint
from unitrade.gateway.outbox_routes import outbox_routes
from unitrade.region import RegionRuntime
from unitrade.replication.diff_routes import diff_routes
from unitrade.replication.replicator import serve_pull, serve_pull_many
from unitrade.replication.snapshot import serve_snapshot, snapshot_tables
from unitrade.rpc.center import PRODUCTS_TARGET
from unitrade.topology.config import CONTROL_NAME
from unitrade.topology.order_id import parse_order_id
from unitrade.topology.rule import Route as CellRoute
from unitrade.topology.rule import RoutingError, Rule, route_buyer, route_cell, route_order

BodyT = TypeVar("BodyT", bound=BaseModel)
SkuPath = Annotated[str, Path(pattern=models.SKU_PATTERN)]
Consistency = Literal["owner", "replica"]


@dataclass(frozen=True)
class Caller:
    principal: Principal
    forwarded_from: str | None  # the region that forwarded this request, if signed

    @property
    def buyer_id(self) -> int:
        if self.principal.buyer_id is None:
            raise Forbidden("this endpoint needs a buyer token, not the admin token")
        return self.principal.buyer_id


def request_target(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def signed_by(request: Request) -> str | None:
    """The region that signed this request, or None (unsigned, or a forged signature);
    checked once by the edge (EdgeMiddleware)."""
    origin: str | None = getattr(request.state, "forwarded_from", None)
    return origin


async def caller(request: Request) -> Caller:
    # The edge has read the token of every unsigned request (an HMAC); a forwarded one
    # carries the client's token, read here.
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        secret = request.app.state.runtime.config.secret
        principal = read_authorization(secret, request.headers.get("authorization"))
    return Caller(principal=principal, forwarded_from=signed_by(request))


CallerDep = Annotated[Caller, Depends(caller)]


def build_app(runtime: RegionRuntime) -> FastAPI:
    forwarder = runtime.forwarder

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="unitrade",
        version=__version__,
        summary=f"region {runtime.name}: the same API at every region",
        lifespan=lifespan,
    )
    direct: dict[tuple[str, str], DirectHandler] = {}  # filled below
    app.add_middleware(
        EdgeMiddleware,
        region=runtime.name,
        secret=runtime.config.secret,
        regions=[*runtime.config.region_names, CONTROL_NAME],
        forwarder=forwarder,
        direct=direct,
    )
    install_error_handlers(app)
    app.state.runtime = runtime

    async def routed(
        request: Request,
        who: Caller,
        home: Callable[[Rule], CellRoute],
        serve: Callable[[], Awaitable[Response]],
    ) -> Response:
        """Serve a request here if this region owns its cell, else send it to the owner.

        The edge has already routed it (and held it while its cell was banned); this is for
        a rule that changed since. A fence that refuses the write (`write_banned`,
        `wrong_region`) has applied nothing, so the request is routed again under the newer
        rule, within the hold deadline: a switch costs clients latency, not errors.
        """
        deadline = forwarder.holds.deadline()
        write = is_write(request.method)
        while True:
            rule = runtime.gateway.rule
            route = home(rule)
            request.state.home_region = route.region
            if write and rule.is_banned(route.cell):
                await forwarder.holds.until_unbanned(route.cell, rule, deadline)
                continue
            if route.region != runtime.name:
                if who.forwarded_from is not None:
                    if await newer_rule_at_sender(request, rule.version, deadline):
                        continue
                    # One hop only: the region that forwarded this sends it on.
                    raise WrongRegion(
                        f"forwarded by {who.forwarded_from} to {runtime.name}, but the owner "
                        f"of cell {route.cell} is {route.region}",
                        owner=route.region,
                        cell=route.cell,
                    )
                headers = {k.lower(): v for k, v in request.headers.items()}
                response = await forwarder.forward_held(
                    request.method,
                    request_target(request),
                    headers,
                    await request.body(),
                    home,
                    deadline,
                )
                if response is not None:
                    return response
                continue
            try:
                return await serve()
            except (WriteBanned, WrongRegion) as refused:
                if not await forwarder.holds.after_refusal(rule.version, deadline):
                    if isinstance(refused, WrongRegion) and who.forwarded_from is None:
                        cell = route.cell
                        raise forwarder.holds.refuse(cell, changing_owner(cell)) from refused
                    raise

    async def newer_rule_at_sender(request: Request, version: int, deadline: float) -> bool:
        """The forwarding region routed under a newer rule than this one holds: wait for
        it (within the hold); True if a newer rule arrived."""
        sent = request.headers.get(RULE_VERSION_HEADER, "")
        if not sent.isdigit() or int(sent) <= version:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        return (await runtime.gateway.changed(version, left)).version > version

    def buyer_home(buyer_id: int) -> Callable[[Rule], CellRoute]:
        return lambda rule: route_buyer(rule, buyer_id)

    def order_home(order_id: str) -> tuple[int, Callable[[Rule], CellRoute]]:
        try:
            parsed = parse_order_id(order_id)
            route_order(runtime.gateway.rule, parsed)
        except (ValueError, RoutingError) as exc:
            raise NotFound(f"no order {order_id[:40]}: {exc}") from exc
        return parsed, lambda rule: route_order(rule, parsed)

    public = APIRouter()

    @public.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        rule = runtime.fence.rule
        names = {c: info.name for c, info in rule.cells.items()}
        return json_response(
            {
                "status": "ok",
                "region": runtime.name,
                "rule_version": rule.version,
                "acked": runtime.acked(),
                "control": runtime.agent.status(),
                "owned_cells": [names[c] for c in runtime.owned_cells()],
                "owners": {names[c]: owner for c, owner in sorted(rule.owners.items())},
                "banned": [names[c] for c in sorted(rule.banned)],
                "forwarded": forwarder.forwarded,
                "held": {
                    "now": forwarder.holds.held,
                    "total": forwarder.holds.held_total,
                    "refused": forwarder.holds.refused_total,
                    "retried": forwarder.retried,
                },
                "positions": {
                    names[c]: store.position for c, store in runtime.copies.stores.items()
                },
                "replication": runtime.replicator.status(),
                "followers": runtime.replicator.followers.body(names),
            }
        )

    # -- orders -----------------------------------------------------------------------------

    async def place_order(request: Request, body: models.CreateOrder, who: Caller) -> Response:
        buyer = who.buyer_id

        async def serve() -> Response:
            items = [(i.sku, i.qty) for i in body.items]
            created = await runtime.orders.create(buyer, items, body.idempotency_key)
            headers = {REPLAYED_HEADER: "true"} if created.replayed else None
            return json_response(created.order, 201, headers)

        return await routed(request, who, buyer_home(buyer), serve)

    @public.post("/v1/orders", status_code=201, tags=["orders"])
    async def create_order(request: Request, body: models.CreateOrder, who: CallerDep) -> Response:
        # Served by `create_order_direct` at the edge; this route is its OpenAPI entry.
        return await place_order(request, body, who)

    async def create_order_direct(request: Request) -> Response:
        """POST /v1/orders past FastAPI's machinery: the same checks in the same order
        (token, then body), the same answers."""
        who = await caller(request)
        try:
            body = models.CreateOrder.model_validate_json(await request.body())
        except ValidationError as exc:
            raise invalid_body(list(exc.errors())) from exc
        return await place_order(request, body, who)

    direct[("POST", "/v1/orders")] = create_order_direct

    @public.get("/v1/orders", tags=["orders"])
    async def list_orders(
        request: Request,
        who: CallerDep,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        buyer = who.buyer_id

        async def serve() -> Response:
            page, next_cursor = await runtime.orders.list(buyer, limit, cursor)
            return json_response({"orders": page, "next_cursor": next_cursor})

        return await routed(request, who, buyer_home(buyer), serve)

    @public.get("/v1/orders/{order_id}", tags=["orders"])
    async def get_order(
        request: Request,
        order_id: str,
        who: CallerDep,
        consistency: Annotated[
            Consistency,
            Query(
                description="owner: read at the owner region (forwarded); replica: this "
                "region's copy, which may lag the owner by the replication lag"
            ),
        ] = "owner",
    ) -> Response:
        buyer = who.buyer_id
        parsed, home = order_home(order_id)

        async def serve() -> Response:
            return json_response(await runtime.orders.get(buyer, parsed))

        if consistency == "replica":
            request.state.home_region = home(runtime.gateway.rule).region
            return await serve()
        return await routed(request, who, home, serve)

    @public.post("/v1/orders/{order_id}/pay", tags=["orders"])
    async def pay_order(
        request: Request, order_id: str, body: models.Pay, who: CallerDep
    ) -> Response:
        buyer = who.buyer_id
        parsed, home = order_home(order_id)

        async def serve() -> Response:
            order = await runtime.orders.pay(buyer, parsed, body.payment_id, body.amount_cents)
            return json_response(order)

        return await routed(request, who, home, serve)

    def transition_route(name: str) -> None:
        async def handler(request: Request, order_id: str, who: CallerDep) -> Response:
            buyer = who.buyer_id
            parsed, home = order_home(order_id)

            async def serve() -> Response:
                return json_response(await runtime.orders.transition(buyer, parsed, name))

            return await routed(request, who, home, serve)

        public.add_api_route(
            f"/v1/orders/{{order_id}}/{name}",
            handler,
            methods=["POST"],
            tags=["orders"],
            name=f"{name}_order",
            summary=f"{name.capitalize()} order",
        )

    transition_route("close")
    transition_route("refund")

    # -- cart -------------------------------------------------------------------------------

    @public.put("/v1/cart/items/{sku}", tags=["cart"])
    async def put_cart_item(
        request: Request, sku: SkuPath, body: models.CartQty, who: CallerDep
    ) -> Response:
        buyer = who.buyer_id

        async def serve() -> Response:
            return json_response(await runtime.cart.put(buyer, sku, body.qty))

        return await routed(request, who, buyer_home(buyer), serve)

    @public.delete("/v1/cart/items/{sku}", tags=["cart"])
    async def delete_cart_item(request: Request, sku: SkuPath, who: CallerDep) -> Response:
        buyer = who.buyer_id

        async def serve() -> Response:
            return json_response(await runtime.cart.remove(buyer, sku))

        return await routed(request, who, buyer_home(buyer), serve)

    @public.get("/v1/cart", tags=["cart"])
    async def get_cart(request: Request, who: CallerDep) -> Response:
        buyer = who.buyer_id

        async def serve() -> Response:
            return json_response(await runtime.cart.get(buyer))

        return await routed(request, who, buyer_home(buyer), serve)

    @public.post("/v1/cart/checkout", status_code=201, tags=["cart"])
    async def checkout(
        request: Request, who: CallerDep, body: models.Checkout | None = None
    ) -> Response:
        buyer = who.buyer_id
        key = body.idempotency_key if body else None

        async def serve() -> Response:
            created = await runtime.orders.checkout(buyer, key)
            headers = {REPLAYED_HEADER: "true"} if created.replayed else None
            return json_response(created.order, 201, headers)

        return await routed(request, who, buyer_home(buyer), serve)

    # -- catalog and inventory ----------------------------------------------------------------

    def reader_home(request: Request, who: Caller, cell: int) -> None:
        rule = runtime.gateway.rule
        buyer = who.principal.buyer_id
        home = route_buyer(rule, buyer) if buyer is not None else route_cell(rule, cell)
        request.state.home_region = home.region

    @public.get("/v1/products", tags=["catalog"])
    async def list_products(
        request: Request,
        who: CallerDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(pattern=models.SKU_PATTERN)] = None,
    ) -> Response:
        reader_home(request, who, runtime.gateway.rule.global_cell)
        page = await runtime.catalog.page(limit, cursor)
        next_cursor = page[-1]["sku"] if len(page) == limit else None
        return json_response({"products": page, "next_cursor": next_cursor})

    @public.get("/v1/products/{sku}", tags=["catalog"])
    async def get_product(request: Request, sku: SkuPath, who: CallerDep) -> Response:
        reader_home(request, who, runtime.gateway.rule.global_cell)
        found = await runtime.catalog.get_many([sku])
        if sku not in found:
            raise NotFound(f"no product {sku!r}")
        return json_response(found[sku])

    @public.get("/v1/inventory/{sku}", tags=["catalog"])
    async def get_inventory(request: Request, sku: SkuPath, who: CallerDep) -> Response:
        reader_home(request, who, runtime.gateway.rule.center_cell)
        return json_response(await runtime.center.levels(sku))

    @public.put("/v1/admin/products/{sku}", tags=["admin"])
    async def put_product(
        request: Request, sku: SkuPath, body: models.PutProduct, who: CallerDep
    ) -> Response:
        if not who.principal.admin:
            raise Forbidden("this endpoint needs the admin token")

        async def serve() -> Response:
            # Stock first: it is the step that can be refused (below reserved + sold); both
            # steps set absolute values, so retrying the whole request is safe.
            levels = await runtime.center.set_stock(sku, body.stock)
            product = await runtime.catalog_service.put(sku, body.title, body.price_cents)
            return json_response({**product, "stock": body.stock, **levels})

        return await routed(request, who, lambda rule: route_cell(rule, rule.global_cell), serve)

    app.include_router(public)
    for route in [*internal_routes(runtime), *diff_routes(runtime), *outbox_routes(runtime)]:
        app.router.routes.append(route)
        direct[("POST", route.path)] = route.endpoint
    app.add_route("/metrics", metrics_endpoint(runtime, forwarder), include_in_schema=False)
    return app


def internal_routes(runtime: RegionRuntime) -> list[Route]:
    """Region-to-region calls (`/internal/...`, not in the OpenAPI document). Plain Starlette
    routes: they skip FastAPI's per-request machinery, which cost more than the call itself.
    Every request must carry a valid region signature (checked by the edge)."""

    def endpoint(
        model: type[BodyT],
        serve: Callable[[BodyT], Awaitable[Any]],
        owned: Callable[[], int] | None,
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            if signed_by(request) is None:
                raise Unauthorized("internal API: missing or invalid region signature")
            if owned is not None:
                cell = owned()
                owner = runtime.fence.rule.owner_of(cell)
                if owner != runtime.name:
                    raise WrongRegion(f"cell {cell} is owned by {owner}", owner=owner, cell=cell)
            try:
                body = model.model_validate_json(await request.body())
            except ValidationError as exc:
                raise InvalidRequest(f"internal call: {exc.errors()[0]['msg']}") from exc
            return json_response(await serve(body))

        return handle

    def center() -> int:
        return runtime.fence.rule.center_cell

    inventory = runtime.inventory

    async def reserve(b: models.ReserveCall) -> Any:
        return await inventory.reserve(int(b.order_id), b.cell, [(s, q) for s, q in b.lines])

    async def step(b: models.StepCall) -> Any:
        return await inventory.step(int(b.order_id), b.step)

    async def stock(b: models.StockCall) -> Any:
        return await inventory.set_stock(b.sku, b.total)

    async def stale(b: models.StaleCall) -> Any:
        found = await inventory.stale(b.cell, b.older_than_ms, b.limit)
        return [str(order_id) for order_id in found]

    async def levels(b: models.SkuCall) -> Any:
        return await inventory.levels(b.sku)

    async def pull(b: models.PullCall) -> Any:
        if b.cell not in runtime.copies.stores:
            raise NotFound(f"no cell {b.cell}")
        follower = (b.region, b.rule_version) if b.region else None
        return await serve_pull(
            runtime.copies,
            b.cell,
            b.after,
            b.limit,
            b.wait_ms,
            runtime.replicator.followers,
            follower,
        )

    async def pull_many(b: models.PullManyCall) -> Any:
        # Cells this region does not own or does not know are answered one by one in the
        # reply's `errors`: the follower holds back only those streams.
        follower = (b.region, b.rule_version) if b.region else None
        return await serve_pull_many(
            runtime.copies,
            [(c.cell, c.after) for c in b.cells],
            b.limit,
            b.wait_ms,
            runtime.replicator.followers,
            follower,
        )

    def global_cell() -> int:
        return runtime.fence.rule.global_cell

    async def products(b: models.ProductsCall) -> Any:
        return await runtime.catalog_service.get_many(b.skus)

    async def snapshot(b: models.SnapshotCall) -> Any:
        if b.cell not in runtime.copies.stores:
            raise NotFound(f"no cell {b.cell}")
        if b.table is not None and b.table not in snapshot_tables(runtime.copies[b.cell]):
            raise NotFound(f"no table {b.table} in cell {b.cell}")
        return await serve_snapshot(runtime.copies, b.cell, b.table, b.after, b.limit, b.upto)

    async def wait(b: models.WaitCall) -> Any:
        if b.cell not in runtime.copies.stores:
            raise NotFound(f"no cell {b.cell}")
        store = runtime.copies[b.cell]
        position = await store.wait_beyond(b.position - 1, b.timeout_ms / 1000)
        return {"cell": b.cell, "position": position, "reached": position >= b.position}

    calls: list[tuple[str, Callable[[Request], Awaitable[Response]]]] = [
        ("/internal/replication/wait", endpoint(models.WaitCall, wait, None)),
        ("/internal/replication/snapshot", endpoint(models.SnapshotCall, snapshot, None)),
        ("/internal/replication/pull", endpoint(models.PullCall, pull, None)),
        ("/internal/replication/pull_many", endpoint(models.PullManyCall, pull_many, None)),
        ("/internal/center/reserve", endpoint(models.ReserveCall, reserve, center)),
        ("/internal/center/step", endpoint(models.StepCall, step, center)),
        ("/internal/center/stock", endpoint(models.StockCall, stock, center)),
        ("/internal/center/stale", endpoint(models.StaleCall, stale, center)),
        ("/internal/center/levels", endpoint(models.SkuCall, levels, center)),
        (PRODUCTS_TARGET, endpoint(models.ProductsCall, products, global_cell)),
    ]
    return [Route(path, handler, methods=["POST"]) for path, handler in calls]
