"""A region's HTTP server: the public API (gateway/public.py), `/healthz`, `/metrics`, and
the internal API of its cells (center, catalog, replication, diff), behind the edge.

Responses name the owner region in `X-Unitrade-Region` and the serving region in
`X-Unitrade-Served-By`, so a client can go to its home region directly next time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from unitrade import __version__
from unitrade.gateway.api import PublicApi
from unitrade.gateway.edge import DirectHandler, EdgeMiddleware
from unitrade.gateway.forward import Forwarder
from unitrade.gateway.health import health_router
from unitrade.gateway.hold import Holds
from unitrade.gateway.internal import internal_routes
from unitrade.gateway.metrics import metrics_endpoint
from unitrade.gateway.outbox_routes import outbox_routes
from unitrade.gateway.public import mount_public
from unitrade.gateway.quarantine_routes import quarantine_routes
from unitrade.gateway.reconcile_routes import reconcile_routes
from unitrade.gateway.routing import Dispatcher, EndpointTable
from unitrade.gateway.sale_routes import mount_sales
from unitrade.region import RegionRuntime
from unitrade.replication.diff_routes import diff_routes
from unitrade.replication.routes import replication_routes
from unitrade.rpc.signing import Verifier
from unitrade.web.responses import TELEMETRY_OFF, install_error_handlers
from unitrade.web.tokens import token_reader


def build_dispatcher(runtime: RegionRuntime) -> Dispatcher:
    control = runtime.config.control
    holds = Holds(runtime.gateway, control.hold_ms, control.hold_requests_max)
    forwarder = Forwarder(runtime.gateway, runtime.name, runtime.client, runtime.flow.breakers)
    return Dispatcher(runtime.name, runtime.gateway, holds, forwarder)


def build_app(runtime: RegionRuntime) -> FastAPI:
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
        telemetry=TELEMETRY_OFF,
    )
    config = runtime.config
    tokens = token_reader(config.token_keys, runtime.revocations)
    verifier = Verifier(runtime.name, lambda sender: config.link_secret(sender, runtime.name))

    dispatcher = build_dispatcher(runtime)
    table = EndpointTable()
    direct: dict[tuple[str, str], DirectHandler] = {}
    public = APIRouter()
    endpoints = PublicApi(public, table, dispatcher, tokens, direct)
    mount_public(endpoints, runtime)
    mount_sales(endpoints, runtime)
    app.include_router(health_router(runtime, dispatcher))
    app.include_router(public)
    internal = [
        *internal_routes(runtime),
        *outbox_routes(runtime),
        *quarantine_routes(runtime),
        *reconcile_routes(runtime),
        *replication_routes(runtime.copies, runtime.replicator),
        *diff_routes(runtime.copies, lambda: runtime.fence.rule, runtime.client),
    ]
    for route in internal:
        app.router.routes.append(route)
        direct[("POST", route.path)] = route.endpoint
    app.add_route("/metrics", metrics_endpoint(runtime, dispatcher), include_in_schema=False)
    app.add_middleware(
        EdgeMiddleware,
        region=runtime.name,
        verifier=verifier,
        tokens=tokens,
        endpoints=table,
        dispatcher=dispatcher,
        direct=direct,
        flow=runtime.flow,
        worker=runtime.worker if runtime.shared else None,
    )
    install_error_handlers(app)
    return app
