"""Declaring a public endpoint: one decorator gives the FastAPI route (validation, OpenAPI),
the edge's routing entry (its home) and, where asked, a direct handler for the hot path.

    @api.endpoint("POST", "/v1/orders/{order_id}/pay", home=order_home, tags=["orders"])
    async def pay_order(ctx: Ctx, order_id: str, body: models.Pay) -> Response: ...

The handler only serves: routing, holds, forwarding and retrying after a rule change are
`Dispatcher.run`'s, around it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from fastapi import APIRouter, Depends, Security
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from unitrade.errors import UnitradeError
from unitrade.gateway.edge import DirectHandler, TokenReader
from unitrade.gateway.resend import KEY_FIELD, Resend
from unitrade.gateway.routing import Caller, Dispatcher, Endpoint, EndpointTable, Home, Passage
from unitrade.web.responses import BEARER, error_responses, invalid_body
from unitrade.web.signed import request_target
from unitrade.web.tokens import Principal


@dataclass(frozen=True)
class Ctx:
    request: Request
    who: Caller


Handler = Callable[..., Awaitable[Response]]


class PublicApi:
    def __init__(
        self,
        router: APIRouter,
        table: EndpointTable,
        dispatcher: Dispatcher,
        tokens: TokenReader,
        direct: dict[tuple[str, str], DirectHandler],
    ) -> None:
        self.router = router
        self.table = table
        self.dispatcher = dispatcher
        self.tokens = tokens
        self.direct = direct

    # -- who is calling ---------------------------------------------------------------------

    def caller(self, request: Request) -> Caller:
        """The caller of an endpoint that needs a token (401 without a valid one). The edge
        has read the token of every unsigned request; a forwarded one is read here."""
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            principal = self.tokens(request.headers.get("authorization"))
        return Caller(principal, getattr(request.state, "forwarded_from", None))

    def reader(self, request: Request) -> Caller:
        """The caller of a public read: a valid token names the buyer (for the home-region
        header); no token, or one that is not valid, reads anonymously."""
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None and request.headers.get("authorization"):
            try:
                principal = self.tokens(request.headers.get("authorization"))
            except UnitradeError:
                principal = None
        return Caller(principal, getattr(request.state, "forwarded_from", None))

    # -- declaring --------------------------------------------------------------------------

    def endpoint(
        self,
        method: str,
        path: str,
        *,
        home: Home | None = None,
        public: bool = False,
        direct_body: type[BaseModel] | None = None,
        resend: Resend | None = None,
        switch: str | None = None,
        answer: type[BaseModel],
        errors: tuple[int, ...],
        status_code: int = 200,
        **route: Any,
    ) -> Callable[[Handler], Handler]:
        """Register `handler(ctx, **params)` at `method path`. With `home`, the request is
        served at the owner region of the cell it names; `public` reads need no token;
        `direct_body` also serves the endpoint at the edge, past FastAPI (the handler's
        only parameter then is `body`). `resend` says how a forwarded write whose answer
        was lost may be sent again (gateway/resend.py); `switch` names the degradation
        switch that turns the endpoint off (503 degraded). `answer` documents the
        `status_code` body and `errors` the error statuses the endpoint can answer; neither
        is validated on the way out (the handlers answer with json_response)."""
        # Any request may be refused at the edge by a rate limit (429) or shed by
        # overload protection (503) before it is routed (gateway/edge.py).
        responses: dict[int | str, dict[str, Any]] = {
            status_code: {"model": answer},
            **error_responses(*sorted({*errors, 429, 503})),
        }
        if not public:
            route.setdefault("dependencies", []).append(Security(BEARER))

        def register(handler: Handler) -> Handler:
            served = self._served(handler, home, public, resend, switch)
            self.router.add_api_route(
                path,
                served,
                methods=[method],
                name=handler.__name__,
                status_code=status_code,
                responses=responses,
                **route,
            )
            if home is not None:
                self.table.add(Endpoint(method, path, home, resend, switch))
            if direct_body is not None:
                self.direct[(method, path)] = self._direct(served, direct_body)
            return handler

        return register

    def _served(
        self,
        handler: Handler,
        home: Home | None,
        public: bool,
        resend: Resend | None,
        switch: str | None,
    ) -> Handler:
        async def served(request: Request, who: Caller, **params: Any) -> Response:
            ctx = Ctx(request, who)
            if home is None:
                return await handler(ctx, **params)
            raw = {k: str(v) for k, v in request.path_params.items()}
            query = request.url.query
            state = request.scope.setdefault("state", {})
            passage = Passage(
                request.method,
                request_target(request),
                request.headers,  # case-insensitive already: no copy on the hot path
                await request.body(),
                who,
                state.get("deadline") or self.dispatcher.holds.deadline(),
                state,
                resend,
                switch,
                key=state.get("idempotency_key"),
                lost=state.get("lost"),
            )

            async def serve() -> Response:
                keyed = resend.keyed if resend is not None else None
                if keyed is not None and passage.key is not None:
                    # A forward of this request gave it a key and lost its answer, then
                    # the rule brought it here: serve it with that key, so that it is
                    # the same request.
                    if getattr(params.get("body"), KEY_FIELD, None) is None:
                        params["body"] = keyed.model_validate_json(passage.body)
                return await handler(ctx, **params)

            response = await self.dispatcher.run(
                passage, lambda rule: home(rule, who, raw, query), serve
            )
            assert response is not None, "run() with a handler always answers"
            return response

        # FastAPI reads the signature: the handler's own parameters (resolved, since this
        # module's globals are not the handler's), the request, and the caller dependency.
        hints = get_type_hints(handler, include_extras=True)
        own = list(inspect.signature(handler).parameters.values())[1:]
        keyword = inspect.Parameter.KEYWORD_ONLY
        dependency = self.reader if public else self.caller
        parameters = [
            inspect.Parameter("request", keyword, annotation=Request),
            inspect.Parameter("who", keyword, annotation=Caller, default=Depends(dependency)),
            *(p.replace(kind=keyword, annotation=hints.get(p.name, p.annotation)) for p in own),
        ]
        served.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        served.__doc__ = handler.__doc__
        return served

    def _direct(self, served: Handler, model: type[BaseModel]) -> DirectHandler:
        async def direct(request: Request) -> Response:
            # The same checks in the same order as the FastAPI route: token, then body.
            who = self.caller(request)
            try:
                body = model.model_validate_json(await request.body())
            except ValidationError as exc:
                raise invalid_body(list(exc.errors())) from exc
            return await served(request, who, body=body)

        return direct
