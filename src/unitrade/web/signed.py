"""Endpoints that only another region (or the control plane) may call: signed requests with a
JSON body validated by a pydantic model. Plain Starlette handlers: they skip FastAPI's
per-request machinery, which cost more than most internal calls themselves."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

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
        call = await _checked_call(request, model, signer, before)
        return json_response(await serve(call))

    return handle


def internal_stream_endpoint(
    model: type[BodyT],
    serve: Callable[[BodyT], AsyncIterator[bytes]],
    signer: Signer = signed_by_edge,
) -> InternalHandler:
    """A signed JSON call answered with a streamed body (`serve`'s chunks as they come):
    the same checks as `internal_endpoint`, all of them before the answer starts."""

    async def handle(request: Request) -> Response:
        call = await _checked_call(request, model, signer, None)
        return StreamingResponse(serve(call), media_type="application/octet-stream")

    return handle


async def _checked_call(
    request: Request,
    model: type[BodyT],
    signer: Signer,
    before: Callable[[], None] | None,
) -> BodyT:
    body = await request.body()
    if signer(request, body) is None:
        raise Unauthorized("internal API: missing or invalid region signature")
    if before is not None:
        before()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(f"internal call: {exc.errors()[0]['msg']}") from exc
