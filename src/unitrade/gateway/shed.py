"""Overload shedding before the request is read: the region's HTTP protocol refuses a new
request with 503 `overloaded` as soon as its headers are parsed, when flow control says
the region is overloaded (flow/overload.py).

Why here and not only at the edge: a refusal at the edge costs the request's ASGI task,
the framework's middleware, the body's read, the token or signature check and the flow
checks, about as much CPU as a cheap request; a region offered three times what it serves
spent the core it lacked on refusing (docs/benchmarks.md, Flow control). Here a refusal
is a canned answer written by a task that does nothing else. The edge still checks again
(gateway/edge.py): a request admitted here is counted in flight there.

Never shed, as at the edge: `/healthz`, `/metrics`, the internal API (replication, rule
pushes, leases, center calls) and the health checker's probe orders (its probe SKU in the
path, or a probe buyer's token, read only when a request is about to be shed).
"""

from __future__ import annotations

from collections.abc import Callable

import httptools
from starlette.types import ASGIApp

from unitrade.flow.control import FlowControl
from unitrade.gateway.edge import INTERNAL_PREFIX, SERVED_BY_HEADER, UNLIMITED_PATHS, TokenReader
from unitrade.topology.probes import PROBE_SKU, is_probe_buyer
from unitrade.web.coalesce import CoalescingHttpProtocol
from unitrade.web.responses import error_response

AUTHORIZATION = b"authorization"
# Which app serves a request whose headers were just parsed: None for the region's own.
Shedder = Callable[[str, list[tuple[bytes, bytes]]], ASGIApp | None]


def shedder(region: str, flow: FlowControl, tokens: TokenReader) -> Shedder:
    def shed(path: str, headers: list[tuple[bytes, bytes]]) -> ASGIApp | None:
        if path in UNLIMITED_PATHS or path.startswith(INTERNAL_PREFIX) or PROBE_SKU in path:
            return None
        reason = flow.overload.shedding()
        if reason is None or _from_probe(headers, tokens):
            return None
        response = error_response(flow.overload.refuse(reason))
        response.headers[SERVED_BY_HEADER] = region
        return response

    return shed


def _from_probe(headers: list[tuple[bytes, bytes]], tokens: TokenReader) -> bool:
    for name, value in headers:
        if name.lower() == AUTHORIZATION:
            try:
                principal = tokens(value.decode("latin-1"))
            except Exception:  # a bad token is no probe's; the edge answers it if admitted
                return False
            return principal.buyer_id is not None and is_probe_buyer(principal.buyer_id)
    return False


def shedding_protocol(shed: Shedder) -> type[CoalescingHttpProtocol]:
    """uvicorn's protocol (uvicorn.Config's `http`) that asks `shed` which app serves each
    request once its headers are parsed."""

    class SheddingHttpProtocol(CoalescingHttpProtocol):
        def on_headers_complete(self) -> None:
            path = httptools.parse_url(self.url).path.decode("latin-1")
            refusal = shed(path, self.headers)
            if refusal is None:
                super().on_headers_complete()
                return
            # uvicorn builds the request's cycle (body, keep-alive, pipelining) as for any
            # request; only the app it runs is the refusal.
            app, self.app = self.app, refusal
            try:
                super().on_headers_complete()
            finally:
                self.app = app

    return SheddingHttpProtocol
