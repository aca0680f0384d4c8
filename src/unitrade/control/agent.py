"""A region's side of the rule push (docs/architecture.md): the rule agent.

The agent holds a long poll open at the control plane (`/internal/control/watch`), so a new
rule version reaches the region as soon as it is published: push, over a connection the
region opens (no inbound port on the regions is needed for it). Each watch request carries
the versions that the region's components have acknowledged, so the acknowledgement of a
version is the next watch request after it is in force: one round trip per rule change.

In a region of many processes every process runs its own agent, naming itself (`worker`):
the control plane counts the region as having acknowledged a version once every process of
it that is connected has (control/board.py).

When the control plane is down the region keeps the rule it has (item 3) and retries with
a bounded backoff; every installed rule is persisted before it is acknowledged, so a region
that restarts comes back under the newest rule it ever acknowledged, never the older rule
in its configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from unitrade.errors import UnitradeError
from unitrade.rpc.client import RegionClient
from unitrade.topology.config import CONTROL_NAME
from unitrade.topology.rule import RoutingError, Rule, check_rule_fits, rule_from_body

log = logging.getLogger("unitrade.rules")

WATCH_WAIT_MS = 5_000  # how long the control plane holds a watch (< the client timeout)
BACKOFF_S_MIN = 0.1
BACKOFF_S_MAX = 2.0


class RuleAgent:
    def __init__(
        self,
        client: RegionClient,
        region: str,
        current: Callable[[], int],
        acked: Callable[[], dict[str, int]],
        install: Callable[[Rule], Awaitable[None]],
        worker: int = 0,
    ) -> None:
        self.client = client
        self.region = region
        self.worker = worker
        self.current = current
        self.acked = acked
        self.install = install
        self.connected = False
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch_forever(), name="rule-agent")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "last_error": self.last_error}

    async def _watch_forever(self) -> None:
        backoff = BACKOFF_S_MIN
        while True:
            try:
                await self._watch_once()
                self.connected, self.last_error = True, ""
                backoff = BACKOFF_S_MIN
            except (UnitradeError, RoutingError, OSError, TimeoutError, ValueError) as exc:
                if self.connected or not self.last_error:
                    log.warning("control plane watch failed: %s: %s", type(exc).__name__, exc)
                self.connected = False
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S_MAX)

    async def sync(self, timeout_s: float) -> bool:
        """Install the newest rule the control plane has, at most `timeout_s`; whether the
        control plane answered. A region does this before it serves, so that one coming
        back after a failover never acts on the rule it went down with."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._watch_once(wait_ms=0)
        except (UnitradeError, RoutingError, OSError, TimeoutError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            log.warning("rule not synced with the control plane at start: %s", self.last_error)
            return False
        return True

    async def _watch_once(self, wait_ms: int = WATCH_WAIT_MS) -> None:
        payload = {
            "region": self.region,
            "worker": self.worker,
            "after": self.current(),
            "acked": self.acked(),
            "wait_ms": wait_ms,
        }
        reply = await self.client.call(CONTROL_NAME, "POST", "/internal/control/watch", payload)
        body = reply.get("rule") if isinstance(reply, dict) else None
        if body is None:
            return
        rule = rule_from_body(body)
        check_rule_fits(rule, self.client.config)
        if rule.version > self.current():
            log.info("rule version %s received (banned: %s)", rule.version, sorted(rule.banned))
            await self.install(rule)
