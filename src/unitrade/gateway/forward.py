"""Routing at the edge, and forwarding a client request once to its owner region.

The owner region of a public request follows from its method, path and token alone
(the buyer's cell, or the cell carried in the order ID), so the edge decides before the
framework parses or validates anything: a request for another region costs one token check
and one signed hop. Whatever the edge does not route (bad tokens, unknown paths, local
data) goes to the handlers, which answer it.

A forwarded request is signed by this region (rpc/signing.py). The owner serves it; a signed
forwarded request that reaches a region which is not the owner is refused with
`wrong_region` instead of being forwarded again, so a request crosses at most one hop even
while regions disagree about the rule.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import orjson
from starlette.responses import Response

from unitrade.errors import RegionUnavailable, UnitradeError
from unitrade.gateway.auth import Principal, read_authorization
from unitrade.gateway.hold import Holds
from unitrade.rpc.client import RegionClient, Reply
from unitrade.topology.order_id import parse_order_id
from unitrade.topology.rule import Route, RoutingError, Rule, route_buyer, route_cell, route_order
from unitrade.topology.rule_view import RuleView

FORWARDED_BY_HEADER = "x-unitrade-forwarded-by"
# The rule version the forwarding gateway routed under. A receiver whose rule is older
# waits (within its hold) for the newer one before refusing as not the owner: the rule
# reaches regions a few ms apart, and a switch should not turn that into refusals.
RULE_VERSION_HEADER = "x-unitrade-rule-version"
PASSED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
PASSED_RESPONSE_HEADERS = (
    "content-type",
    "x-unitrade-region",
    "x-unitrade-served-by",
    "retry-after",
    "idempotent-replayed",
)
# Answers that mean "nothing was applied; the rule moved under this request": a fence
# refused the write (the cell is banned, or the region is no longer its owner).
RETRYABLE = {421: "wrong_region", 503: "write_banned"}

RouteOf = Callable[[Rule], Route | None]


def route_of_request(
    rule: Rule, method: str, path: str, principal: Principal, query: str = ""
) -> Route | None:
    """The cell and owner region of what a public request touches; None when it is not
    routed (including a read that asks for this region's replica)."""
    if method == "GET" and "consistency=replica" in query:
        return None
    parts = path.strip("/").split("/")
    if len(parts) < 2 or parts[0] != "v1":
        return None
    if parts[1] == "admin":
        if principal.admin and method == "PUT":
            return route_cell(rule, rule.global_cell)
        return None
    buyer = principal.buyer_id
    if buyer is None:
        return None
    if parts[1] == "cart" or (parts[1] == "orders" and len(parts) == 2):
        return route_buyer(rule, buyer)
    if parts[1] == "orders":
        try:
            return route_order(rule, parse_order_id(parts[2]))
        except (ValueError, RoutingError):
            return None  # the handler answers 404
    return None


def changing_owner(cell: int) -> str:
    return f"cell {cell} is changing owner; retry shortly"


def is_write(method: str) -> bool:
    return method not in ("GET", "HEAD", "OPTIONS")


class Forwarder:
    def __init__(
        self, view: RuleView, region: str, secret: str, client: RegionClient, holds: Holds
    ) -> None:
        self.view = view
        self.region = region
        self.secret = secret
        self.client = client
        self.holds = holds
        self.forwarded = 0  # requests this region sent on to an owner
        self.retried = 0  # forwarded requests sent again after a rule change

    def principal(self, authorization: str | None) -> Principal | None:
        try:
            return read_authorization(self.secret, authorization)
        except UnitradeError:
            return None  # the handler answers 401

    async def forward_held(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        route_of: RouteOf,
        deadline: float,
    ) -> Response | None:
        """Send a request to the owner region of its cell, holding it while the cell is
        banned and sending it again when the owner refused it because the rule moved
        (nothing was applied there), until `deadline`. None when the owner is this region
        (the caller serves it)."""
        while True:
            rule = self.view.rule
            route = route_of(rule)
            if route is not None and is_write(method) and rule.is_banned(route.cell):
                await self.holds.until_unbanned(route.cell, rule, deadline)
                continue
            if route is None or route.region == self.region:
                return None
            reply = await self._send(method, target, headers, body, route.region)
            expected = RETRYABLE.get(reply.status)
            if expected is None or error_code(reply.body) != expected:
                return self._response(reply)
            if not await self.holds.after_refusal(rule.version, deadline):
                if expected == "wrong_region" and is_write(method):
                    # The regions still disagree about the owner after the whole hold: to
                    # the client this is the switch taking too long, and it gets what the
                    # hold promises (503 with Retry-After), not an internal refusal.
                    raise self.holds.refuse(route.cell, changing_owner(route.cell))
                return self._response(reply)
            self.retried += 1

    async def _send(
        self, method: str, target: str, headers: dict[str, str], body: bytes, owner: str
    ) -> Reply:
        passed = {h: headers[h] for h in PASSED_REQUEST_HEADERS if h in headers}
        passed[RULE_VERSION_HEADER] = str(self.view.rule.version)
        try:
            try:
                reply = await self.client.send(owner, method, target, body, passed)
            except aiohttp.ClientConnectorError:
                # Nothing reached the owner, so one more try cannot apply the request twice.
                reply = await self.client.send(owner, method, target, body, passed)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegionUnavailable(
                f"owner region {owner} is unreachable: {type(exc).__name__}", region=owner
            ) from exc
        self.forwarded += 1
        return reply

    def _response(self, reply: Reply) -> Response:
        out = {h: reply.headers[h] for h in PASSED_RESPONSE_HEADERS if h in reply.headers}
        out[FORWARDED_BY_HEADER] = self.region
        return Response(content=reply.body, status_code=reply.status, headers=out)


def error_code(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data.get("error") if isinstance(data, dict) else None
