"""The edge of every response: body size limit, `X-Unitrade-*` headers, error bodies.

Every error leaves as `{error, message}` with a 4xx/5xx status; nothing leaves as a bare
framework error page.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unitrade.errors import InvalidRequest, MalformedJson, UnitradeError
from unitrade.gateway.forward import Forwarder, route_of_request
from unitrade.rpc.signing import SIG_HEADER, verify
from unitrade.topology.rule import Route, Rule

log = logging.getLogger("unitrade.gateway")

BODY_BYTES_MAX = 64 * 1024
REGION_HEADER = "x-unitrade-region"
SERVED_BY_HEADER = "x-unitrade-served-by"
REPLAYED_HEADER = "idempotent-replayed"

# A handler the edge calls itself, past FastAPI's routing and dependency machinery: for the
# routes that carry the load (order creation, region-to-region calls), where that machinery
# cost more of the owner's CPU than the work (docs/benchmarks.md, Replication).
DirectHandler = Callable[[Request], Awaitable[Response]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(error: UnitradeError) -> Response:
    headers = {}
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return json_response(error.body(), status=error.status, headers=headers)


def _error(status: int, code: str, message: str) -> Response:
    return json_response({"error": code, "message": message}, status=status)


class EdgeMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): bounds the request body, checks region
    signatures, forwards requests owned by another region, and stamps the region headers
    on every response."""

    def __init__(
        self,
        app: ASGIApp,
        region: str,
        secret: str,
        regions: list[str],
        forwarder: Forwarder,
        direct: dict[tuple[str, str], DirectHandler] | None = None,
        body_bytes_max: int = BODY_BYTES_MAX,
    ) -> None:
        self.app = app
        self.region = region
        self.secret = secret
        self.regions = regions
        self.forwarder = forwarder
        self.direct = direct if direct is not None else {}  # (method, path) -> handler
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

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
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
                message = {**message, "headers": headers}
            await send(message)

        try:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            target = _target(scope)
            method = scope["method"]
            origin = None
            if SIG_HEADER in headers:
                origin = verify(self.secret, headers, method, target, bytes(body))
                origin = origin if origin in self.regions else None
            state["forwarded_from"] = origin
            principal = None
            if origin is None:
                principal = self.forwarder.principal(headers.get("authorization"))
            state["principal"] = principal
            if principal is None:
                await self._serve_here(scope, replay, stamped)
                return
            path, query = scope["path"], scope.get("query_string", b"").decode("latin-1")

            def route_of(rule: Rule) -> Route | None:
                route = route_of_request(rule, method, path, principal, query)
                if route is not None:
                    state["home_region"] = route.region
                return route

            forwarder = self.forwarder
            try:
                response = await forwarder.forward_held(
                    method, target, headers, bytes(body), route_of, forwarder.holds.deadline()
                )
            except UnitradeError as error:
                response = error_response(error)
            if response is None:
                await self._serve_here(scope, replay, stamped)
                return
            await response(scope, replay, stamped)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            response = _error(500, "internal", "internal error; the request was not applied")
            await response(scope, receive, stamped)

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
        response = _error(
            413, "payload_too_large", f"request body is larger than {self.body_bytes_max} bytes"
        )
        response.headers[SERVED_BY_HEADER] = self.region
        await response(scope, receive, send)


def _target(scope: Scope) -> str:
    """path?query as the client sent it: what a region signature covers."""
    path: str = scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    return path + (f"?{query}" if query else "")


def invalid_body(errors: list[Any]) -> UnitradeError:
    """The error for a request body that failed validation, as FastAPI's handlers answer
    it (see install_error_handlers): 400 if it is not JSON, else 422 naming the fields."""
    status, _, message = _validation_message(errors)
    return MalformedJson(message) if status == 400 else InvalidRequest(message)


def _validation_message(errors: list[Any]) -> tuple[int, str, str]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed_json", "request body is not valid JSON"
    parts = []
    for error in errors[:5]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return 422, "invalid_request", "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UnitradeError)
    async def _unitrade(_request: Request, exc: UnitradeError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        status, code, message = _validation_message(list(exc.errors()))
        return _error(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
