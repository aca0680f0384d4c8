"""Write leases (docs/architecture.md, "Leases and the safety of failover").

A region admits writes to the cells it owns only while it holds a write lease from the
lease authority. It renews every `lease_renew_ms`; a renewal sent at monotonic time `t`
and granted for `ttl` makes the lease valid, on the region's own clock, until

    t + ttl * (1 - drift) - LEASE_MARGIN_MS

where `drift` is `clock_drift_ppm_max`: the region counts from when it *sent* the request
(the authority granted it later), shortens the lease by the most its clock can run slow
against the authority's, and stops a margin early so that a transaction checked just
before its commit still commits inside the lease. The authority counts from when it
*received* the renewal and adds the same drift on its own side, so in real time the
region's lease always ends before the authority believes it may have. A failover
(control/failover.py) first blocks the lost region (its renewals are refused from then
on) and then waits until the authority's `expires_in_ms` reaches 0; only then does any
other region become an owner of the lost region's cells.

In a region of many processes every process holds a lease of its own and renews it itself
(`worker`); the region's `expires_in_ms` is the latest of its processes' and a block
refuses all of them, so a failover waits for every process of the lost region.

The authority is behind one narrow interface, `LeaseAuthority` (the control plane's side)
and `LeaseSource` (the region's side), with two implementations: the control plane itself
(here, the embedded default) and an etcd cluster (production).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from unitrade.errors import LeaseRefused, UnitradeError
from unitrade.topology.config import CONTROL_NAME, ControlConfig

log = logging.getLogger("unitrade.lease")

LEASE_MARGIN_MS = 100  # a region stops this much before its lease ends (commit time)
RETRY_MS_AFTER_FAILURE = 100  # a failed renewal is tried again this soon
WORKERS_TRACKED_MAX = 64  # processes per region whose renewals the status lists


@dataclass(frozen=True)
class LeaseGrant:
    """A renewed lease: valid for `ttl_ms` from when the renewal was sent, and only while
    the region holds rule version `rule_version_min` or newer (a failover sets it)."""

    ttl_ms: int
    rule_version_min: int = 0

    def body(self) -> dict[str, int]:
        return {"ttl_ms": self.ttl_ms, "rule_version_min": self.rule_version_min}


class LeaseAuthority(Protocol):
    """The authority's side, used by the control plane's failover."""

    async def start(self) -> None: ...

    async def renew(self, region: str, rule_version: int, worker: int = 0) -> LeaseGrant:
        """Grant or extend the lease of `region`'s process `worker`; LeaseRefused while a
        failover blocks the region and it holds a rule older than the block requires."""
        ...

    async def block(self, region: str, rule_version_min: int, operation_id: str) -> None:
        """Refuse `region` every lease from now on until it holds `rule_version_min`."""
        ...

    async def expires_in_ms(self, region: str) -> int:
        """How long, on the authority's clock, until every lease any process of `region`
        may hold has surely ended (drift allowed for); 0 once it has."""
        ...

    def status(self) -> list[dict[str, Any]]: ...


class LeaseSource(Protocol):
    """The region's side: one renewal of its own lease."""

    async def renew(self, rule_version: int) -> LeaseGrant: ...

    async def aclose(self) -> None: ...


def drift_ratio(config: ControlConfig) -> float:
    return config.clock_drift_ppm_max / 1_000_000


class ControlPlaneLeases:
    """The embedded lease authority: the control plane grants leases from memory and keeps
    the blocks of failovers in its store.

    A restarted control plane does not know what its previous process granted, so it
    assumes that every region renewed at the moment it started: a failover right after a
    restart waits a whole lease longer, and no region notices the restart as long as it
    comes back within the lease (docs/operations.md measures how long that is)."""

    def __init__(self, config: ControlConfig, regions: list[str], blocks: BlockStore) -> None:
        self.config = config
        self.regions = regions
        self.blocks = blocks
        self._started = time.monotonic()
        # region -> monotonic time of the last grant to any of its processes: each process's
        # lease ends before (its renewal arrived at or before that one), so the region's
        # `expires_in_ms` counts from it.
        self._renewed: dict[str, float] = {}
        self._workers: dict[str, dict[int, float]] = {}  # region -> worker -> last grant
        self._blocked: dict[str, int] = {}  # region -> rule version it must hold
        self.refused_total = 0

    async def start(self) -> None:
        self._started = time.monotonic()
        self._blocked = await self.blocks.lease_blocks()

    async def renew(self, region: str, rule_version: int, worker: int = 0) -> LeaseGrant:
        if region not in self.regions:
            raise LeaseRefused(f"unknown region {region!r}")
        needed = self._blocked.get(region, 0)
        if rule_version < needed:
            self.refused_total += 1
            raise LeaseRefused(
                f"region {region} lost its cells in a failover: it must install rule "
                f"version {needed} (it holds {rule_version}) before it may write again",
                rule_version_min=needed,
            )
        now = time.monotonic()
        self._renewed[region] = now
        workers = self._workers.setdefault(region, {})
        if worker in workers or len(workers) < WORKERS_TRACKED_MAX:
            workers[worker] = now
        return LeaseGrant(self.config.lease_ms, needed)

    async def block(self, region: str, rule_version_min: int, operation_id: str) -> None:
        # Persisted first: a control plane that restarts mid-failover keeps refusing.
        await self.blocks.block_lease(region, rule_version_min, operation_id)
        self._blocked[region] = max(self._blocked.get(region, 0), rule_version_min)

    async def expires_in_ms(self, region: str) -> int:
        last = self._renewed.get(region, self._started)
        ttl_s = self.config.lease_ms / 1000 * (1 + 2 * drift_ratio(self.config))
        return max(0, int((last + ttl_s - time.monotonic()) * 1000) + 1)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "region": region,
                "renewed_ms_ago": (
                    int((now - self._renewed[region]) * 1000) if region in self._renewed else None
                ),
                "rule_version_min": self._blocked.get(region, 0),
                "workers": {
                    str(w): int((now - at) * 1000)
                    for w, at in sorted(self._workers.get(region, {}).items())
                },
            }
            for region in self.regions
        ]


class BlockStore(Protocol):
    """Where the embedded authority keeps failover blocks (the control store)."""

    async def lease_blocks(self) -> dict[str, int]: ...

    async def block_lease(self, region: str, rule_version_min: int, operation_id: str) -> None: ...


class LeaseHolder:
    """A region's lease: renewed in the background, checked by the fence before every
    write is admitted and again just before it commits (storage/store.py)."""

    def __init__(
        self,
        region: str,
        source: LeaseSource,
        config: ControlConfig,
        rule_version: Any,  # Callable[[], int]: the rule version the region holds
    ) -> None:
        self.region = region
        self.source = source
        self.config = config
        self.rule_version = rule_version
        self._valid_until = 0.0  # monotonic
        self._rule_version_min = 0
        self._renewed_at = 0.0
        self._granted = asyncio.Event()
        self.renewals = 0
        self.failures = 0
        self.refusals = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def valid(self) -> bool:
        """Safe to call from any thread: it reads two numbers and the clock."""
        return (
            time.monotonic() < self._valid_until and self.rule_version() >= self._rule_version_min
        )

    def remaining_ms(self) -> int:
        return max(0, int((self._valid_until - time.monotonic()) * 1000))

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_forever(), name="write-lease")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.source.aclose()

    async def first(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) for the first grant; whether one came."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._granted.wait()
        return self._granted.is_set()

    async def renew_once(self) -> None:
        sent = time.monotonic()
        timeout_s = self.config.lease_ms / 3000
        try:
            async with asyncio.timeout(timeout_s):
                grant = await self.source.renew(self.rule_version())
        except LeaseRefused as exc:
            # A failover took this region's cells: stop writing now, not at the lease's end.
            self._valid_until = 0.0
            self._rule_version_min = int(exc.details.get("rule_version_min", 0))
            self.refusals += 1
            self._failed(exc)
            return
        except (UnitradeError, OSError, TimeoutError, ValueError) as exc:
            self.failures += 1
            self._failed(exc)
            return
        ttl_s = grant.ttl_ms / 1000 * (1 - drift_ratio(self.config))
        self._rule_version_min = grant.rule_version_min
        self._valid_until = max(self._valid_until, sent + ttl_s - LEASE_MARGIN_MS / 1000)
        self._renewed_at = time.monotonic()
        self.renewals += 1
        if self.last_error:
            log.info("write lease renewed again (%d ms left)", self.remaining_ms())
        self.last_error = ""
        self._granted.set()

    def _failed(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"[:200]
        if not self.last_error:
            log.warning("write lease not renewed (%d ms left): %s", self.remaining_ms(), message)
        self.last_error = message

    async def _renew_forever(self) -> None:
        while True:
            await self.renew_once()
            interval_ms = self.config.lease_renew_ms
            if self.last_error:
                interval_ms = min(interval_ms, RETRY_MS_AFTER_FAILURE)
            await asyncio.sleep(interval_ms / 1000)

    def status(self) -> dict[str, Any]:
        return {
            "valid": self.valid(),
            "remaining_ms": self.remaining_ms(),
            "renewed_ms_ago": (
                int((time.monotonic() - self._renewed_at) * 1000) if self._renewed_at else None
            ),
            "rule_version_min": self._rule_version_min,
            "renewals": self.renewals,
            "failures": self.failures,
            "refusals": self.refusals,
            "last_error": self.last_error,
        }


class ControlPlaneLeaseSource:
    """The region's side of the embedded authority: a signed call to the control plane.
    A client of its own, with a timeout shorter than the renewal interval allows, so
    that a renewal never waits behind other calls."""

    def __init__(self, client: Any, worker: int = 0) -> None:  # rpc.client.RegionClient
        self.client = client
        self.worker = worker

    async def renew(self, rule_version: int) -> LeaseGrant:
        payload = {
            "region": self.client.region,
            "worker": self.worker,
            "rule_version": rule_version,
        }
        reply = await self.client.call(
            CONTROL_NAME, "POST", "/internal/control/lease", payload, idempotent=False
        )
        return LeaseGrant(int(reply["ttl_ms"]), int(reply["rule_version_min"]))

    async def aclose(self) -> None:
        await self.client.aclose()


class MemoryBlocks:
    """Failover blocks kept in memory: for a lease authority embedded in one process with
    its regions (tests, tools), where nothing outlives the process anyway."""

    def __init__(self) -> None:
        self.blocks: dict[str, int] = {}

    async def lease_blocks(self) -> dict[str, int]:
        return dict(self.blocks)

    async def block_lease(self, region: str, rule_version_min: int, operation_id: str) -> None:
        self.blocks[region] = max(self.blocks.get(region, 0), rule_version_min)


class InProcessLeaseSource:
    """A region's renewals sent to an authority in the same process (no socket between):
    the same grant and refusal logic as over HTTP, for a region run in-process."""

    def __init__(self, region: str, authority: LeaseAuthority) -> None:
        self.region = region
        self.authority = authority

    async def renew(self, rule_version: int) -> LeaseGrant:
        return await self.authority.renew(self.region, rule_version)

    async def aclose(self) -> None:
        return None
