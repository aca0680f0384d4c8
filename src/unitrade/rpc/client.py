"""HTTP client for calls to other regions, with bounded timeouts and retries.

aiohttp rather than httpx for region-to-region traffic: an httpx request cost 1.07 ms
against 0.21-0.24 ms for aiohttp (benchmarks/bench_micro.py, docs/benchmarks.md), and
every remote order makes such a call.

A call that fails tells how: `Unreachable` when no attempt ever reached the region (the
connection was refused or never made: nothing can have been applied there), `Unanswered`
when some attempt may have reached it and no answer came back (a timeout or a dropped
connection after the request left: a write may have been applied). Both are 503
`region_unavailable` to callers that do not care; a caller whose call writes turns
`Unanswered` into 504 `outcome_unknown` or resolves it (services/remote.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)
from tenacity.stop import stop_base

from unitrade.errors import NotLeader, RegionUnavailable, UnitradeError, error_from_body
from unitrade.rpc.signing import sign
from unitrade.topology.config import CONTROL_NAME, TopologyConfig

CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0
ATTEMPTS_MAX = 3
CONNECTIONS_MAX = 200


class Unreachable(RegionUnavailable):
    """No attempt reached the region: nothing was applied there."""


class Unanswered(RegionUnavailable):
    """An attempt may have reached the region and no answer came back: a write may have
    been applied there."""


def never_sent(exc: BaseException) -> bool:
    """True when the request cannot have reached the peer: the connection was refused or
    never made (a connect timeout). A total timeout or a reset after connecting may come
    after the request left."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class RegionClient:
    """Signed requests from this region to other regions."""

    def __init__(
        self, config: TopologyConfig, region: str, request_timeout_s: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.config = config
        self.region = region
        self.request_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._control_member = 0  # the control plane member that answered last

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=CONNECTIONS_MAX, keepalive_timeout=30, ssl=self.config.http_verify
                ),
                timeout=aiohttp.ClientTimeout(
                    total=self.request_timeout_s, sock_connect=CONNECT_TIMEOUT_S
                ),
                auto_decompress=False,
                # No Content-Type of aiohttp's own: the signature covers content-type, and
                # one added after signing (application/octet-stream for a GET's empty
                # body) made every forwarded GET look unsigned to its owner.
                skip_auto_headers=("User-Agent", "Content-Type"),
            )
        return self._session

    def base_url(self, peer: str) -> str:
        """A region's address, or the control plane's (`control`)."""
        if peer == CONTROL_NAME:
            urls = self.config.control.urls
            return urls[self._control_member % len(urls)]
        return self.config.region(peer).base_url

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        region: str,
        method: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
    ) -> Reply:
        """One signed request to `region` (`target` = path?query); no retry. `timeout_s`
        bounds it in all (the client's request timeout when None)."""
        url, signed = self._signed(region, method, target, body, headers)
        options: dict[str, Any] = {}
        if timeout_s is not None:  # else the session's (None would mean no timeout at all)
            if timeout_s <= 0:  # and 0 would mean none either
                raise TimeoutError(f"no time left for a request to {region}")
            connect_s = min(CONNECT_TIMEOUT_S, timeout_s)
            options["timeout"] = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_s)
        async with self.session.request(
            method, url, data=body, headers=signed, **options
        ) as response:
            return Reply(response.status, response.headers, await response.read())

    def _signed(
        self, region: str, method: str, target: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[str, dict[str, str]]:
        """The URL of `target` at `region` and the request's headers, signed."""
        assert region != self.region, "a call to this region runs in-process"
        secret = self.config.link_secret(self.region, region)
        if secret is None:
            raise Unreachable(f"{region} is not part of this cluster", region=region)
        signed = {**headers, **sign(secret, self.region, region, method, target, body, headers)}
        return self.base_url(region) + target, signed

    @asynccontextmanager
    async def stream(
        self,
        region: str,
        target: str,
        payload: Any,
        timeout_s: float,
        idle_s: float,
        frame_bytes_max: int,
    ) -> AsyncIterator[AsyncIterator[list[bytes]]]:
        """A signed POST to `region` answered with a streamed body of length-prefixed
        frames (`<bytes>\\n<frame>`): the frames, as they come (`read_frames`). No retry:
        the caller opens it again. `timeout_s` bounds it in all, `idle_s` each wait for
        bytes; an error answer raises its UnitradeError, no answer `Unreachable` or
        `Unanswered`."""
        body = orjson.dumps(payload)
        headers = {"content-type": "application/json"}
        url, signed = self._signed(region, "POST", target, body, headers)
        timeout = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, timeout_s), sock_read=idle_s
        )
        try:
            async with self.session.post(url, data=body, headers=signed, timeout=timeout) as reply:
                if reply.status >= 400:
                    data = await reply.read()
                    raise error_from_body(reply.status, orjson.loads(data) if data else None)
                yield read_frames(reply.content, frame_bytes_max)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if never_sent(exc):
                raise Unreachable(
                    f"region {region} is unreachable: {type(exc).__name__}", region=region
                ) from exc
            raise Unanswered(
                f"region {region} stream broke: {type(exc).__name__}", region=region
            ) from exc

    async def call(
        self,
        region: str,
        method: str,
        target: str,
        payload: Any = None,
        idempotent: bool = True,
        timeout_s: float | None = None,
    ) -> Any:
        """Call the internal API of `region`; a typed UnitradeError for an error answer,
        `Unreachable` or `Unanswered` when no answer came (module docstring).

        Only connection failures and timeouts are retried, and only for idempotent calls
        (every center step is keyed by order ID, so a retry after a lost answer changes
        nothing). `timeout_s` bounds all the attempts together; without it each attempt
        has the client's request timeout. The control plane's members
        (`[[control.members]]`) are tried in turn.
        """
        if region == CONTROL_NAME and len(self.config.control.urls) > 1:
            return await self._call_control(method, target, payload, idempotent, timeout_s)
        attempts = ATTEMPTS_MAX if idempotent else 1
        return await self._call(region, method, target, payload, attempts, timeout_s)

    async def _call_control(
        self,
        method: str,
        target: str,
        payload: Any,
        idempotent: bool,
        timeout_s: float | None = None,
    ) -> Any:
        """One attempt per member, starting with the one that answered last: a standby
        answers `not_leader` naming the leader (tried next), a dead one does not answer.
        A call that may have reached the leader and got no answer is retried only when
        idempotent."""
        urls = self.config.control.urls
        last: UnitradeError = RegionUnavailable("no control plane member", region=CONTROL_NAME)
        for _ in range(len(urls)):
            current = self._control_member % len(urls)
            following = (current + 1) % len(urls)
            try:
                return await self._call(CONTROL_NAME, method, target, payload, 1, timeout_s)
            except NotLeader as exc:
                last = exc
                leader = exc.details.get("leader")
                hinted = urls.index(leader) if leader in urls else current
                self._control_member = hinted if hinted != current else following
            except RegionUnavailable as exc:
                last = exc
                self._control_member = following
                if not idempotent:
                    raise
        raise last

    async def _call(
        self,
        region: str,
        method: str,
        target: str,
        payload: Any,
        attempts: int,
        timeout_s: float | None = None,
    ) -> Any:
        body = b"" if payload is None else orjson.dumps(payload)
        headers = {"content-type": "application/json"}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sent = False  # some attempt may have reached the region
        stop: stop_base = stop_after_attempt(attempts)
        if timeout_s is not None:
            stop = stop | stop_after_delay(timeout_s)
        try:
            async for attempt in AsyncRetrying(
                stop=stop,
                wait=wait_exponential(multiplier=0.05, max=0.5),
                retry=retry_if_exception_type((aiohttp.ClientConnectionError, TimeoutError)),
                reraise=True,
            ):
                with attempt:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"no time left for a call to {region}")
                    try:
                        reply = await self.send(region, method, target, body, headers, left)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        sent = sent or not never_sent(exc)
                        raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            if sent:
                raise Unanswered(
                    f"region {region} did not answer: {type(exc).__name__}", region=region
                ) from exc
            raise Unreachable(
                f"region {region} is unreachable: {type(exc).__name__}", region=region
            ) from exc
        data = orjson.loads(reply.body) if reply.body else None
        if reply.status >= 400:
            raise error_from_body(reply.status, data)
        return data


async def read_frames(content: aiohttp.StreamReader, bytes_max: int) -> AsyncIterator[list[bytes]]:
    """Length-prefixed frames (`<bytes>\\n<frame>`) until the body ends, in lists of every
    frame that had arrived whole (the reader of a busy stream takes several at once);
    ValueError for a malformed or oversized header or a body that ends inside a frame."""
    buffer = bytearray()
    while True:
        chunk = await content.readany()
        if not chunk:
            if buffer:
                raise ValueError("the stream ended inside a frame")
            return
        buffer += chunk
        frames, used = _whole_frames(buffer, bytes_max)
        del buffer[:used]
        if frames:
            yield frames


FRAME_HEADER_BYTES_MAX = 20


def _whole_frames(buffer: bytearray, bytes_max: int) -> tuple[list[bytes], int]:
    """The whole frames at the start of `buffer`, and the bytes they take."""
    frames: list[bytes] = []
    at = 0
    while True:
        end = buffer.find(b"\n", at, at + FRAME_HEADER_BYTES_MAX + 1)
        if end < 0:
            if len(buffer) - at > FRAME_HEADER_BYTES_MAX:
                raise ValueError(f"malformed frame header {bytes(buffer[at : at + 20])!r}")
            return frames, at
        size = bytes(buffer[at:end])
        if not size.isdigit() or int(size) > bytes_max:
            raise ValueError(f"malformed frame header {size[:20]!r}")
        if end + 1 + int(size) > len(buffer):
            return frames, at
        frames.append(bytes(buffer[end + 1 : end + 1 + int(size)]))
        at = end + 1 + int(size)
