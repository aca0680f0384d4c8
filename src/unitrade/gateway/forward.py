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

import aiohttp
from starlette.responses import Response

from unitrade.errors import RegionUnavailable, UnitradeError
from unitrade.gateway.auth import Principal, read_authorization
from unitrade.rpc.client import RegionClient, Reply
from unitrade.storage.fence import Fence
from unitrade.topology.order_id import parse_order_id
from unitrade.topology.rule import RoutingError, Rule, route_buyer, route_order

FORWARDED_BY_HEADER = "x-unitrade-forwarded-by"
PASSED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
PASSED_RESPONSE_HEADERS = (
    "content-type",
    "x-unitrade-region",
    "x-unitrade-served-by",
    "retry-after",
    "idempotent-replayed",
)


def owner_of_request(
    rule: Rule, method: str, path: str, principal: Principal, query: str = ""
) -> str | None:
    """The region that owns what a public request touches; None when it is not routed
    (including a read that asks for this region's replica)."""
    if method == "GET" and "consistency=replica" in query:
        return None
    parts = path.strip("/").split("/")
    if len(parts) < 2 or parts[0] != "v1":
        return None
    if parts[1] == "admin":
        return rule.owner_of(rule.global_cell) if principal.admin and method == "PUT" else None
    buyer = principal.buyer_id
    if buyer is None:
        return None
    if parts[1] == "cart" or (parts[1] == "orders" and len(parts) == 2):
        return route_buyer(rule, buyer).region
    if parts[1] == "orders":
        try:
            return route_order(rule, parse_order_id(parts[2])).region
        except (ValueError, RoutingError):
            return None  # the handler answers 404
    return None


class Forwarder:
    def __init__(self, fence: Fence, secret: str, client: RegionClient) -> None:
        self.fence = fence
        self.secret = secret
        self.client = client
        self.forwarded = 0  # requests this region sent on to an owner

    def route(
        self, method: str, path: str, authorization: str | None, query: str = ""
    ) -> str | None:
        """The owner region if it is another region, else None (serve here)."""
        try:
            principal = read_authorization(self.secret, authorization)
        except UnitradeError:
            return None  # the handler answers 401
        owner = owner_of_request(self.fence.rule, method, path, principal, query)
        return owner if owner != self.fence.region else None

    async def forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes, owner: str
    ) -> Response:
        passed = {h: headers[h] for h in PASSED_REQUEST_HEADERS if h in headers}
        try:
            reply = await self._send(owner, method, target, body, passed)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegionUnavailable(
                f"owner region {owner} is unreachable: {type(exc).__name__}", region=owner
            ) from exc
        self.forwarded += 1
        out = {h: reply.headers[h] for h in PASSED_RESPONSE_HEADERS if h in reply.headers}
        out[FORWARDED_BY_HEADER] = self.fence.region
        return Response(content=reply.body, status_code=reply.status, headers=out)

    async def _send(
        self, owner: str, method: str, target: str, body: bytes, headers: dict[str, str]
    ) -> Reply:
        try:
            return await self.client.send(owner, method, target, body, headers)
        except aiohttp.ClientConnectorError:
            # Nothing reached the owner, so one more try cannot apply the request twice.
            return await self.client.send(owner, method, target, body, headers)
