"""HTTP client for calls to other regions, with bounded timeouts and retries."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from unitrade.errors import RegionUnavailable, error_from_body
from unitrade.rpc.signing import sign
from unitrade.topology.config import TopologyConfig

CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0
ATTEMPTS_MAX = 3
CONNECTIONS_MAX = 200


class RegionClient:
    """Signed requests from this region to another region's internal API."""

    def __init__(self, config: TopologyConfig, region: str) -> None:
        self.config = config
        self.region = region
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(
                max_connections=CONNECTIONS_MAX, max_keepalive_connections=CONNECTIONS_MAX
            ),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def url(self, region: str, target: str) -> str:
        return self.config.region(region).base_url + target

    async def call(
        self, region: str, method: str, target: str, payload: Any = None, idempotent: bool = True
    ) -> Any:
        """Call `target` on `region`; a typed UnitradeError for an error answer.

        Only connection failures are retried, and only for idempotent calls (every center
        step is keyed by order ID, so a retry after a lost answer changes nothing).
        """
        assert region != self.region, "a call to this region runs in-process"
        body = b"" if payload is None else orjson.dumps(payload)
        attempts = ATTEMPTS_MAX if idempotent else 1
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(attempts),
                wait=wait_exponential(multiplier=0.05, max=0.5),
                retry=retry_if_exception_type(httpx.TransportError),
                reraise=True,
            ):
                with attempt:
                    response = await self.http.request(
                        method,
                        self.url(region, target),
                        content=body,
                        headers={
                            "content-type": "application/json",
                            **sign(self.config.secret, self.region, method, target, body),
                        },
                    )
        except httpx.TransportError as exc:
            raise RegionUnavailable(
                f"region {region} is unreachable: {type(exc).__name__}", region=region
            ) from exc
        data = orjson.loads(response.content) if response.content else None
        if response.status_code >= 400:
            raise error_from_body(response.status_code, data)
        return data
