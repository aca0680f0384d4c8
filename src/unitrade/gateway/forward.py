"""Forwarding a client request, once, to the region that owns its data (DESIGN §2).

The forwarded request is signed by this region (rpc/signing.py). The owner serves it; a
signed forwarded request that reaches a region which is not the owner is refused with
`wrong_region` instead of being forwarded again, so a request crosses at most one hop even
while regions disagree about the rule.
"""

from __future__ import annotations

import httpx
from fastapi import Request
from fastapi.responses import Response

from unitrade.errors import RegionUnavailable
from unitrade.gateway.edge import FORWARDED_BY_HEADER, REGION_HEADER, SERVED_BY_HEADER
from unitrade.rpc.signing import sign
from unitrade.topology.config import TopologyConfig

PASSED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
PASSED_RESPONSE_HEADERS = (
    "content-type",
    REGION_HEADER,
    SERVED_BY_HEADER,
    "retry-after",
    "idempotent-replayed",
)


def request_target(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


class Forwarder:
    def __init__(self, config: TopologyConfig, region: str, http: httpx.AsyncClient) -> None:
        self.config = config
        self.region = region
        self.http = http
        self.forwarded = 0  # requests this region sent to an owner
        self.failed = 0

    async def forward(self, request: Request, owner: str) -> Response:
        assert owner != self.region
        body = await request.body()
        target = request_target(request)
        headers = {h: request.headers[h] for h in PASSED_REQUEST_HEADERS if h in request.headers}
        headers.update(sign(self.config.secret, self.region, request.method, target, body))
        url = self.config.region(owner).base_url + target
        try:
            response = await self._send(request.method, url, body, headers)
        except httpx.TransportError as exc:
            self.failed += 1
            raise RegionUnavailable(
                f"owner region {owner} is unreachable: {type(exc).__name__}", region=owner
            ) from exc
        self.forwarded += 1
        out = {h: response.headers[h] for h in PASSED_RESPONSE_HEADERS if h in response.headers}
        out[FORWARDED_BY_HEADER] = self.region
        return Response(content=response.content, status_code=response.status_code, headers=out)

    async def _send(
        self, method: str, url: str, body: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        try:
            return await self.http.request(method, url, content=body, headers=headers)
        except httpx.ConnectError:
            # Nothing reached the owner, so one more try cannot apply the request twice.
            return await self.http.request(method, url, content=body, headers=headers)
