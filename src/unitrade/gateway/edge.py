"""The edge of every request and response: body size limit, region signatures, flow
control (overload shedding and the ip, buyer and region rate limits, before any
forwarding), routing before the framework, `X-Unitrade-*` headers.

Every error leaves as `{error, message}` with a 4xx/5xx status; nothing leaves as a bare
framework error page.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unitrade.errors import UnitradeError
from unitrade.flow.control import Admission, FlowControl
from unitrade.gateway.routing import Caller, Dispatcher, EndpointTable, Passage
from unitrade.rpc.signing import SIG_HEADER, Verifier
from unitrade.topology.probes import PROBE_SKU, is_probe_buyer
from unitrade.topology.rule import Route, Rule
from unitrade.web.responses import error_body_response, error_response
from unitrade.web.tokens import Principal

log = logging.getLogger("unitrade.gateway")

BODY_BYTES_MAX = 64 * 1024
REGION_HEADER = "x-unitrade-region"
SERVED_BY_HEADER = "x-unitrade-served-by"
# Which process of a region of many answered (its `worker`): for operators and tests.
WORKER_HEADER = "x-unitrade-worker"
REPLAYED_HEADER = "idempotent-replayed"
# Never limited nor shed (flow control): health probes, metrics, and the internal API
# (replication, rule watch and leases, center and catalog RPC, diff, reconcile), which
# answers signed callers only.
UNLIMITED_PATHS = ("/healthz", "/metrics")
INTERNAL_PREFIX = "/internal/"

# A handler the edge calls itself, past FastAPI's routing and dependency machinery: for the
# routes that carry the load (order creation, region-to-region calls), where that machinery
# cost more of the owner's CPU than the work (docs/benchmarks.md, Replication).
DirectHandler = Callable[[Request], Awaitable[Response]]
# Reads a bearer token: the principal, or UnitradeError (401) for a bad one.
TokenReader = Callable[[str | None], Principal]


class EdgeMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): bounds the request body, checks region
    signatures and tokens once, forwards requests owned by another region (the endpoint
    table says which), and stamps the region headers on every response."""

    def __init__(
        self,
        app: ASGIApp,
        region: str,
        verifier: Verifier,
        tokens: TokenReader,
        endpoints: EndpointTable,
        dispatcher: Dispatcher,
        direct: dict[tuple[str, str], DirectHandler],
        flow: FlowControl | None = None,
        body_bytes_max: int = BODY_BYTES_MAX,
        worker: int | None = None,
    ) -> None:
        self.app = app
        self.region = region
        # Stamped on every response by a process of a region of many; None: not stamped.
        self.worker = None if worker is None else (WORKER_HEADER.encode(), str(worker).encode())
        self.verifier = verifier
        self.tokens = tokens
        self.endpoints = endpoints
        self.dispatcher = dispatcher
        self.direct = direct  # (method, path) -> handler
        self.flow = flow
        self.body_bytes_max = body_bytes_max

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.body_bytes_max):
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > self.body_bytes_max:
                await self._too_large(scope, receive, send)
                return
        replayed = False
        # The body the handler reads: the edge may have given it an idempotency key
        # (gateway/resend.py) before a forward that lost its answer sent it elsewhere.
        served = bytes(body)

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": served, "more_body": False}
            return await receive()

        started = False

        async def stamped(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if SERVED_BY_HEADER.encode() not in names:
                    headers.append((SERVED_BY_HEADER.encode(), self.region.encode()))
                home = state.get("home_region")
                if home and REGION_HEADER.encode() not in names:
                    headers.append((REGION_HEADER.encode(), str(home).encode()))
                if self.worker is not None:
                    headers.append(self.worker)
                message = {**message, "headers": headers}
            await send(message)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        admission: Admission | None = None
        try:
            self._identify(scope, state, headers, served)
            try:
                admission = await self._admit(scope, state, headers)
            except UnitradeError as error:
                await error_response(error)(scope, replay, stamped)
                return
            response, served = await self._route(scope, state, headers, served)
            if response is None:
                await self._serve_here(scope, replay, stamped)
            else:
                await response(scope, replay, stamped)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            # Not "not applied": an unexpected error may come after a commit. A write is
            # repeated as it was (its idempotency key or payment ID) to learn its outcome.
            response = error_body_response(
                500,
                "internal",
                "internal error; if this was a write it may or may not have been applied: "
                "repeat it as it was (the same idempotency key or payment ID) to learn its outcome",
            )
            await response(scope, receive, stamped)
        finally:
            if admission is not None:
                admission.done()

    def _identify(
        self, scope: Scope, state: dict[str, Any], headers: dict[str, str], body: bytes
    ) -> None:
        """Who sent the request: a region (a valid signature: `forwarded_from`), else a
        client with a principal if its token is valid; and when its hold ends."""
        method: str = scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        target = scope["path"] + (f"?{query}" if query else "")
        state["target"] = target
        origin = None
        if SIG_HEADER in headers:
            origin = self.verifier.verify(headers, method, target, body)
        state["forwarded_from"] = origin
        state["deadline"] = self.dispatcher.holds.deadline()
        principal = None
        if origin is None:
            try:
                principal = self.tokens(headers.get("authorization"))
            except UnitradeError:
                principal = None  # the handler answers 401 where a token is needed
        state["principal"] = principal

    async def _admit(
        self, scope: Scope, state: dict[str, Any], headers: dict[str, str]
    ) -> Admission | None:
        """Flow control before anything else is done: shed when overloaded, then the ip,
        buyer and region limits (a client's request; a region's forwarded one is only
        shed). Health probes, metrics, the internal API and the health checker's probe
        orders are never limited nor shed."""
        path: str = scope["path"]
        flow = self.flow
        if flow is None or path in UNLIMITED_PATHS or path.startswith(INTERNAL_PREFIX):
            return None
        if state["forwarded_from"] is not None:
            return flow.admit_forwarded()
        principal: Principal | None = state["principal"]
        buyer = principal.buyer_id if principal is not None else None
        if (buyer is not None and is_probe_buyer(buyer)) or PROBE_SKU in path:
            return None
        client = scope.get("client")
        ip = flow.address.of(client[0] if client else None, headers)
        return await flow.admit_client(ip, buyer)

    async def _route(
        self, scope: Scope, state: dict[str, Any], headers: dict[str, str], body: bytes
    ) -> tuple[Response | None, bytes]:
        """The answer of another region for a request it owns, or None to serve it here;
        and the body to serve it with."""
        method: str = scope["method"]
        path: str = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        target: str = state["target"]
        deadline: float = state["deadline"]
        principal: Principal | None = state["principal"]
        matched = self.endpoints.match(method, path) if principal is not None else None
        if matched is None:
            return None, body
        endpoint, params = matched
        assert endpoint.home is not None
        home = endpoint.home
        who = Caller(principal=principal, forwarded_from=None)

        def route_of(rule: Rule) -> Route | None:
            return home(rule, who, params, query)

        passage = Passage(
            method, target, headers, body, who, deadline, state, endpoint.resend, endpoint.switch
        )
        try:
            response = await self.dispatcher.run(passage, route_of, None)
        except UnitradeError as error:
            return error_response(error), body
        passage.keep()
        return response, passage.body

    async def _serve_here(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a request in this region: by its direct handler if it has one, else by
        the application."""
        handler = self.direct.get((scope["method"], scope["path"]))
        if handler is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except UnitradeError as error:
            response = error_response(error)
        await response(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_body_response(
            413, "payload_too_large", f"request body is larger than {self.body_bytes_max} bytes"
        )
        response.headers[SERVED_BY_HEADER] = self.region
        await response(scope, receive, send)
