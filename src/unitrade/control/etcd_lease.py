"""Write leases from etcd (`[control] lease_authority = "etcd"`): the production variant of
control/lease.py. A region renews with etcd directly, so no control plane process is on
its write path: with every control plane down, the regions go on writing.

A region process holds one etcd lease (TTL `ceil(lease_ms / 1000)` s) and the key
`leases/<region>` attached to it (`leases/<region>/<k>` for worker k > 0 of a region of
many processes: each process its own lease and key, and `expires_in_ms` is the latest of
them). One renewal, counted by LeaseHolder from when it was sent:

1. a txn: if `blocks/<region>` does not exist (or names a rule version the region already
   holds), `leases/<region>` must be attached to the region's lease (a read-only compare
   in the steady state; the key is put when it is not); otherwise LeaseRefused;
2. a keepalive of that etcd lease (etcd counts the TTL again from when it receives it).

Both must succeed. Why it is safe: the region counts `min(lease_ms, TTL / (1 + 2 drift))`
less its drift and margin from before step 1; etcd keeps the key at least TTL after it
received step 2, on its own clock (a new etcd leader even extends leases, etcd#9395: TTL
is a lower bound). So the key outlives every lease the region believes it holds, and
"the key is gone" means "the region's lease is over". A failover's block (the key
`blocks/<region>`, written by the control store) fails every later step 1, so no renewal
succeeds after it; `expires_in_ms` is then the key's remaining TTL, 0 once it is gone.

The block does not revoke the region's etcd lease: the key would vanish at once while the
region may still count its last renewal, and "the key is gone" would no longer prove
anything. Waiting for the TTL costs a failover at most one lease.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import orjson

from unitrade.control.etcd import (
    GRPC_NOT_FOUND,
    EtcdClient,
    EtcdError,
    EtcdKeys,
    created,
    lease_is,
    modified,
    prefix_end,
    put_op,
    range_op,
    value_is,
)
from unitrade.control.etcd_store import EtcdControlStore
from unitrade.control.lease import ControlPlaneLeaseSource, LeaseGrant, LeaseSource, drift_ratio
from unitrade.errors import LeaseRefused, UnitradeError
from unitrade.rpc.client import RegionClient
from unitrade.topology.config import ControlConfig, TopologyConfig

log = logging.getLogger("unitrade.lease")

STATUS_REFRESH_S = 1.0


def etcd_ttl_s(config: ControlConfig) -> int:
    """The TTL asked of etcd for a region's (or the leader's) lease, whole seconds."""
    return max(1, math.ceil(config.lease_ms / 1000))


def election_ttl_s(config: ControlConfig) -> int:
    """The TTL of the active control plane member's key: half a write lease (at least the
    2 s etcd grants at the least with its default election timeout), so that a standby
    takes over, after the TTL and one poll, within one write lease of the leader's death."""
    return max(2, math.ceil(config.lease_ms / 2000))


def counted_ttl_ms(config: ControlConfig, granted_s: int) -> int:
    """What the holder of an etcd lease granted for `granted_s` counts: never more than
    lease_ms, and short enough that etcd's TTL, on etcd's clock, outlasts it whatever the
    drift between the two clocks."""
    return min(config.lease_ms, int(granted_s * 1000 / (1 + 2 * drift_ratio(config))))


def etcd_client(config: TopologyConfig, timeout_ms: int | None = None) -> EtcdClient:
    control = config.control
    timeout = control.etcd_timeout_ms if timeout_ms is None else timeout_ms
    return EtcdClient(control.etcd_endpoints, timeout / 1000, config.http_verify)


def etcd_keys(config: TopologyConfig) -> EtcdKeys:
    return EtcdKeys(config.control.etcd_prefix)


def region_lease_source(config: TopologyConfig, region: str, worker: int = 0) -> LeaseSource:
    """A region process's lease source as configured: etcd directly, or the control plane.
    Every process of a region holds a lease of its own (`worker`)."""
    control = config.control
    if control.etcd:
        # Two requests per renewal within the holder's timeout (a third of lease_ms).
        timeout_ms = min(control.etcd_timeout_ms, control.lease_ms // 6)
        client = etcd_client(config, timeout_ms)
        return EtcdLeaseSource(client, etcd_keys(config), region, control, worker)
    return ControlPlaneLeaseSource(
        RegionClient(config, region, request_timeout_s=control.lease_ms / 3000), worker
    )


class EtcdLeaseSource:
    """A region's renewals, straight to etcd (one txn and one keepalive each)."""

    def __init__(
        self,
        client: EtcdClient,
        keys: EtcdKeys,
        region: str,
        config: ControlConfig,
        worker: int = 0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.region = region
        self.config = config
        self.worker = worker
        self.lease_id = 0  # this process's etcd lease; 0 until granted (again)

    async def renew(self, rule_version: int) -> LeaseGrant:
        needed = await self._put_key(rule_version)
        ttl_s = await self.client.keepalive(self.lease_id)
        if ttl_s <= 0:
            self.lease_id = 0  # expired between the two steps: a new one next time
            raise EtcdError(f"the etcd lease of region {self.region} expired", GRPC_NOT_FOUND)
        return LeaseGrant(counted_ttl_ms(self.config, ttl_s), needed)

    async def _put_key(self, rule_version: int) -> int:
        """Step 1: check the block and that the lease key is in place (a read-only txn:
        in the steady state a renewal writes nothing to etcd's history); write the key
        when it is not. The block's rule version (0 without one); LeaseRefused when the
        region holds an older rule."""
        block, key = self.keys.block(self.region), self.keys.lease(self.region, self.worker)
        value = orjson.dumps(
            {"region": self.region, "worker": self.worker, "rule_version": rule_version}
        )
        for attempt in range(2):
            if not self.lease_id:
                self.lease_id, _granted = await self.client.grant(etcd_ttl_s(self.config))
            put = put_op(key, value, self.lease_id)
            no_block = created(block, 0)
            try:
                in_place = [no_block, lease_is(key, self.lease_id), value_is(key, value)]
                checked = await self.client.txn(in_place, [], [range_op(block)])
                if checked.succeeded:
                    return 0
                found = checked.ranges[0].kvs
                if not found:  # no block: the key is missing or out of date
                    written = await self.client.txn([no_block], [put], [range_op(block)])
                    if written.succeeded:
                        return 0
                    found = written.ranges[0].kvs
                needed = _rule_version_min(found[0].value)
                if rule_version < needed:
                    raise LeaseRefused(
                        f"region {self.region} lost its cells in a failover: it must install "
                        f"rule version {needed} (it holds {rule_version}) before it may "
                        "write again",
                        rule_version_min=needed,
                    )
                # It holds the rule the block asks for: renewed, unless the block moved on.
                same_block = modified(block, found[0].mod_revision)
                if (await self.client.txn([same_block], [put])).succeeded:
                    return needed
                raise EtcdError(f"the lease block of {self.region} changed during a renewal")
            except EtcdError as exc:
                if exc.grpc_code != GRPC_NOT_FOUND or attempt:
                    raise
                self.lease_id = 0  # "requested lease not found": it expired; grant again
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        # The etcd lease is not revoked: the region may still count on it while it stops,
        # and a failover must wait for it (module docstring).
        await self.client.aclose()


def _rule_version_min(value: bytes) -> int:
    try:
        return int(orjson.loads(value)["rule_version_min"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EtcdError(f"an unreadable lease block in etcd: {value[:100]!r}") from exc


class EtcdLeases:
    """The authority's side on etcd, used by the control plane (failover): blocks go to the
    control store (`blocks/<region>`, fenced by the leadership), expiry is read from etcd."""

    def __init__(self, config: ControlConfig, regions: list[str], store: EtcdControlStore) -> None:
        self.config = config
        self.regions = regions
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self._sources: dict[str, EtcdLeaseSource] = {}
        self._status: list[dict[str, Any]] = [
            {"region": region, "held": None, "rule_version_min": 0} for region in regions
        ]
        self._refreshed = 0.0
        self._refreshing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._refresh()

    async def renew(self, region: str, rule_version: int, worker: int = 0) -> LeaseGrant:
        """A region that renews through the control plane (configured for the embedded
        authority while the control plane runs on etcd): the same renewal, on its behalf."""
        if region not in self.regions:
            raise LeaseRefused(f"unknown region {region!r}")
        source = self._sources.get(f"{region}/{worker}")
        if source is None:
            source = self._sources[f"{region}/{worker}"] = EtcdLeaseSource(
                self.client, self.keys, region, self.config, worker
            )
        return await source.renew(rule_version)

    async def block(self, region: str, rule_version_min: int, operation_id: str) -> None:
        await self.store.block_lease(region, rule_version_min, operation_id)

    async def expires_in_ms(self, region: str) -> int:
        """0 once every lease key of the region's processes is gone (their leases are over:
        module docstring); else the longest of etcd's remaining TTLs (rounded up) with the
        drift allowed for."""
        prefix = self.keys.worker_leases(region)
        kvs = (await self.client.range(prefix, prefix_end(prefix))).kvs
        kv = await self.client.get(self.keys.lease(region))
        longest = 0
        for found in [*kvs, *([kv] if kv is not None else [])]:
            remaining_s = await self.client.time_to_live(found.lease) if found.lease else -1
            if remaining_s < 0:
                # The lease is gone and the key with it (etcd deletes both in one step).
                continue
            # etcd rounds the remaining seconds down.
            ms = int((remaining_s + 1) * 1000 * (1 + 2 * drift_ratio(self.config))) + 1
            longest = max(longest, ms)
        return longest

    def status(self) -> list[dict[str, Any]]:
        """The last known state (refreshed in the background at most once a second)."""
        loop_time = asyncio.get_running_loop().time()
        stale = loop_time - self._refreshed > STATUS_REFRESH_S
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._refresh(), name="lease-status")
        return self._status

    async def _refresh(self) -> None:
        try:
            leases = await self.client.range(self.keys.leases, prefix_end(self.keys.leases))
            blocks = await self.store.lease_blocks()
        except UnitradeError as exc:
            log.warning("lease status not read from etcd: %s", exc)
            return
        held: dict[str, dict[int, Any]] = {}  # region -> worker -> its key's value
        for kv in leases.kvs:
            region, _, worker = kv.key.removeprefix(self.keys.leases).partition("/")
            held.setdefault(region, {})[int(worker or 0)] = kv.json()
        self._status = [
            {
                "region": region,
                "held": region in held,
                "rule_version": min(
                    (v.get("rule_version", 0) for v in held.get(region, {}).values()),
                    default=None,
                ),
                "workers": sorted(held.get(region, {})),
                "rule_version_min": blocks.get(region, 0),
            }
            for region in self.regions
        ]
        self._refreshed = asyncio.get_running_loop().time()
