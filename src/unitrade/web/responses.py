"""JSON answers and error bodies: every error leaves as `{error, message}` with a 4xx/5xx
status and, where retrying helps, Retry-After; nothing leaves as a bare framework page."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from fastapi.telemetry import TelemetryConfig
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from unitrade.errors import InvalidRequest, MalformedJson, UnitradeError

# FastAPI's own OpenTelemetry, off for every app: its check of whether a tracer or meter is
# configured ran on every request, about 10 us each (docs/benchmarks.md, "The forwarding
# hop"), and unitrade reports through /metrics.
TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


class Error(BaseModel):
    """Every error answer: a stable code, a message for people, and sometimes more fields
    (`sku`, `owner`, `cell`, ...)."""

    model_config = ConfigDict(extra="allow")
    error: str
    message: str


# What each error status means, for the OpenAPI document (docs/api.md has the full table).
ERROR_STATUS_TEXT: dict[int, str] = {
    400: "malformed_json: the body is not JSON (or not UTF-8)",
    401: "unauthorized: missing, malformed or forged token",
    403: "forbidden: a token of the wrong kind (buyer or admin) for this endpoint",
    404: "not_found: no such resource, or another buyer's",
    409: "a conflict with the current state (error names which)",
    413: "payload_too_large: body over 64 KiB",
    421: "wrong_region: the owner changed under the request; retry",
    422: "invalid_request (the message names the field), or a business rule refused it",
    429: "rate_limited: a rate limit (`limit` names it) refused the request before anything "
    "was done; retry after Retry-After seconds",
    503: "unavailable for now, nothing was applied (overloaded, circuit_open, degraded, "
    "write_banned, region_unavailable, ...); retry after Retry-After seconds",
    504: "outcome_unknown: a region did not answer (`region`, `call`); the write may have "
    "been applied: send it again with the body's `idempotency_key` (or the same payment ID) "
    "to learn its outcome",
}
RETRY_AFTER_HEADER: dict[str, Any] = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
    }
}


# Declares the bearer scheme in the OpenAPI document. It never refuses (auto_error=False):
# the caller dependency reads and checks the token, and answers 401 in our error shape.
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`unitrade token BUYER_ID` or `unitrade token --admin`",
)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of the given error statuses, each an `Error` body."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": Error, "description": ERROR_STATUS_TEXT[status]}
        if status in (429, 503, 504):
            entry["headers"] = RETRY_AFTER_HEADER
        documented[status] = entry
    return documented


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


def error_body_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"error": code, "message": message}, status=status, headers=headers)


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
        return error_body_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # FastAPI's only 400: a body it could not decode, such as invalid UTF-8 (not a
            # JSONDecodeError, so not a validation error): the same answer as bad JSON.
            return error_response(MalformedJson("request body is not valid JSON"))
        codes = {404: "not_found", 405: "method_not_allowed"}
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        if exc.status_code == 405:
            headers["allow"] = _allowed_methods(request)
        return error_body_response(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), headers
        )


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method of the path. Starlette's own `Allow` names only the first route that
    matched the path, and each of our methods is a route of its own (asked method by
    method, since included routers wrap their routes)."""
    methods: set[str] = set()
    for method in HTTP_METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            methods.add(method)
    return ", ".join(sorted(methods))
