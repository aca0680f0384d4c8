"""Endpoints that only another region (or the control plane) may call: signed requests with a
JSON body validated by a pydantic model. Plain Starlette handlers: they skip FastAPI's
per-request machinery, which cost more than most internal calls themselves."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from unitrade.errors import InvalidRequest, Unauthorized
from unitrade.web.responses import json_response

BodyT = TypeVar("BodyT", bound=BaseModel)
InternalHandler = Callable[[Request], Awaitable[Response]]
# Who signed a request: the region's name, or None (unsigned, forged, or stale).
Signer = Callable[[Request, bytes], str | None]


def request_target(request: Request) -> str:
    """path?query as the client sent it: what a signature covers."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def signed_by_edge(request: Request, _body: bytes) -> str | None:
    """The signer found by a server's edge, which checks every signature once."""
    origin: str | None = getattr(request.state, "forwarded_from", None)
    return origin


def internal_endpoint(
    model: type[BodyT],
    serve: Callable[[BodyT], Awaitable[Any]],
    signer: Signer = signed_by_edge,
    before: Callable[[], None] | None = None,
) -> InternalHandler:
    """A signed JSON call: 401 without a valid signature, `before` (e.g. "this region owns
    the cell"), then 422 for a body the model refuses, then `serve`'s answer as JSON."""

    async def handle(request: Request) -> Response:
        body = await request.body()
        if signer(request, body) is None:
            raise Unauthorized("internal API: missing or invalid region signature")
        if before is not None:
            before()
        try:
            call = model.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidRequest(f"internal call: {exc.errors()[0]['msg']}") from exc
        return json_response(await serve(call))

    return handle
