"""Write leases from etcd (control/etcd_lease.py) against real etcd members: a region's
renewals, a failover's block, `expires_in_ms`, and the loss of etcd members (one of three:
the lease lives on; a quorum: the region stops before its lease ends)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.etcd_support import EtcdCluster, etcd_prefix
from unitrade.control.etcd import EtcdClient, EtcdKeys
from unitrade.control.etcd_lease import EtcdLeases, EtcdLeaseSource, etcd_ttl_s
from unitrade.control.etcd_store import EtcdControlStore
from unitrade.control.lease import LEASE_MARGIN_MS, LeaseHolder, drift_ratio
from unitrade.errors import LeaseRefused
from unitrade.topology.config import ControlConfig, default_config

# Short leases keep the tests short: etcd grants at least 1 s with the test members'
# election timeout (tests/etcd_support.py).
LEASE = ControlConfig(lease_ms=2_000, lease_renew_ms=200)
REGIONS = default_config().region_names
DEADLINE_S = 15.0


@dataclass
class Region:
    """One region's lease, renewed in the background as a region renews it."""

    source: EtcdLeaseSource
    holder: LeaseHolder
    rule_version: list[int] = field(default_factory=lambda: [1])


@asynccontextmanager
async def region_lease(
    endpoints: list[str], keys: EtcdKeys, region: str = "sh"
) -> AsyncIterator[Region]:
    source = EtcdLeaseSource(EtcdClient(endpoints, LEASE.lease_ms / 6000), keys, region, LEASE)
    version = [1]
    holder = LeaseHolder(region, source, LEASE, lambda: version[0])
    holder.start()
    try:
        assert await holder.first(DEADLINE_S), holder.last_error
        yield Region(source, holder, version)
    finally:
        await holder.stop()


@asynccontextmanager
async def authority(endpoints: list[str], keys: EtcdKeys) -> AsyncIterator[EtcdLeases]:
    store = EtcdControlStore(EtcdClient(endpoints, 2.0), keys)
    try:
        yield EtcdLeases(LEASE, REGIONS, store)
    finally:
        await store.close()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_region_is_granted_a_lease_and_renews_it(etcd_one: EtcdCluster) -> None:
    async def scenario() -> None:
        keys = EtcdKeys(etcd_prefix())
        async with region_lease(etcd_one.endpoints, keys) as region:
            assert region.holder.valid()
            first_lease = region.source.lease_id
            first = await region.source.client.get(keys.lease("sh"))
            renewals = region.holder.renewals
            await until(lambda: region.holder.renewals >= renewals + 3, "three more renewals")
            assert region.holder.valid() and region.source.lease_id == first_lease
            # It counts less than etcd keeps the key: TTL, drift and the commit margin.
            assert region.holder.remaining_ms() <= LEASE.lease_ms * (1 - drift_ratio(LEASE))
            held = await region.source.client.get(keys.lease("sh"))
            assert held is not None and held.lease == first_lease
            assert held.json()["rule_version"] == 1
            # Renewals in the steady state write nothing (a compare and a keepalive).
            assert first is not None and held.mod_revision == first.mod_revision
            async with authority(etcd_one.endpoints, keys) as leases:
                remaining = await leases.expires_in_ms("sh")
                assert 0 < remaining <= (etcd_ttl_s(LEASE) + 1) * 1000 * 1.1
                assert await leases.expires_in_ms("bj") == 0  # never held one

    asyncio.run(scenario())


def test_a_block_refuses_renewals_until_the_region_holds_the_rule_it_names(
    etcd_one: EtcdCluster,
) -> None:
    async def scenario() -> None:
        keys = EtcdKeys(etcd_prefix())
        async with (
            authority(etcd_one.endpoints, keys) as leases,
            region_lease(etcd_one.endpoints, keys) as region,
        ):
            await leases.block("sh", 5, "op-failover")
            with pytest.raises(LeaseRefused) as refused:
                await region.source.renew(4)
            assert refused.value.details["rule_version_min"] == 5
            # The holder learns it at its next renewal and stops at once.
            await until(lambda: not region.holder.valid(), "the holder to stop")
            assert region.holder.refusals >= 1
            assert region.holder.status()["rule_version_min"] == 5
            # Once it holds version 5 (the failover's rule), it may write again.
            region.rule_version[0] = 5
            await until(lambda: region.holder.valid(), "the holder to renew again")
            assert (await region.source.renew(5)).rule_version_min == 5
            assert await leases.store.lease_blocks() == {"sh": 5}

    asyncio.run(scenario())


def test_expires_in_ms_reaches_0_after_a_block_and_never_before_the_region_stops(
    etcd_one: EtcdCluster,
) -> None:
    async def scenario() -> None:
        keys = EtcdKeys(etcd_prefix())
        async with (
            authority(etcd_one.endpoints, keys) as leases,
            region_lease(etcd_one.endpoints, keys) as region,
        ):
            assert await leases.expires_in_ms("sh") > 0
            await leases.block("sh", 2, "op-failover")
            blocked = time.monotonic()
            # While the authority says the lease may live, the region may still count on
            # it; the moment it says 0, the region must have stopped.
            while (remaining := await leases.expires_in_ms("sh")) > 0:
                assert time.monotonic() - blocked < DEADLINE_S, "expires_in_ms never reached 0"
                await asyncio.sleep(0.02)
            assert remaining == 0 and not region.holder.valid()
            assert await region.source.client.get(keys.lease("sh")) is None
            waited_ms = (time.monotonic() - blocked) * 1000
            print(f"expires_in_ms reached 0 {waited_ms:.0f} ms after the block")

    asyncio.run(scenario())


def test_a_region_cut_off_from_etcd_stops_before_its_lease_ends(tmp_path: Path) -> None:
    """Every member killed: the region's last renewal was sent before the kill, so its
    lease must be over (by its own count) a lease after the kill; and once etcd is back
    it renews again."""

    async def scenario(etcd: EtcdCluster) -> None:
        keys = EtcdKeys(etcd_prefix())
        async with region_lease(etcd.endpoints, keys) as region:
            await asyncio.to_thread(etcd.kill_member, 0)
            killed = time.monotonic()
            lease_s = LEASE.lease_ms / 1000
            while region.holder.valid():
                assert time.monotonic() - killed < lease_s, "still valid a lease after the kill"
                await asyncio.sleep(0.005)
            stopped_ms = (time.monotonic() - killed) * 1000
            assert region.holder.failures >= 1
            print(f"valid for {stopped_ms:.0f} ms after etcd was killed (lease {LEASE.lease_ms})")
            await asyncio.to_thread(etcd.start_member, 0)
            await until(lambda: region.holder.valid(), "a renewal once etcd is back")

    with EtcdCluster(tmp_path / "etcd", 1) as etcd:
        asyncio.run(scenario(etcd))


def test_with_three_members_a_lease_survives_the_loss_of_one_not_of_two(tmp_path: Path) -> None:
    async def scenario(etcd: EtcdCluster) -> None:
        keys = EtcdKeys(etcd_prefix())
        leader = etcd.leader()
        # The region talks to the etcd leader first: the worst member to lose.
        endpoints = [etcd.endpoints[leader]] + [
            e for i, e in enumerate(etcd.endpoints) if i != leader
        ]
        async with region_lease(endpoints, keys) as region:
            invalid_samples = 0

            async def watch(seconds: float) -> None:
                nonlocal invalid_samples
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    invalid_samples += not region.holder.valid()
                    await asyncio.sleep(0.005)

            watching = asyncio.create_task(watch(3 * LEASE.lease_ms / 1000))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(etcd.kill_member, leader)
            renewals = region.holder.renewals
            await watching
            assert invalid_samples == 0, "the lease lapsed while one member of three was lost"
            assert region.holder.renewals > renewals, "no renewal after the member was lost"
            # The control store works on the two members left, too.
            async with authority(endpoints, keys) as leases:
                await leases.block("bj", 3, "op-x")
                assert await leases.store.lease_blocks() == {"bj": 3}
                # A second member lost: no quorum, no renewal; the region stops in time.
                second = next(i for i in range(3) if i != leader)
                await asyncio.to_thread(etcd.kill_member, second)
                lost = time.monotonic()
                while region.holder.valid():
                    assert time.monotonic() - lost < LEASE.lease_ms / 1000
                    await asyncio.sleep(0.005)
                await asyncio.to_thread(etcd.start_member, second)
                await until(lambda: region.holder.valid(), "a renewal with a quorum")

    with EtcdCluster(tmp_path / "etcd", 3) as etcd:
        asyncio.run(scenario(etcd))


def test_the_counted_lease_is_shorter_than_etcds(etcd_one: EtcdCluster) -> None:
    """What a region counts after a renewal, against the TTL etcd applies: drift and the
    commit margin come off, never added."""

    async def scenario() -> None:
        keys = EtcdKeys(etcd_prefix())
        source = EtcdLeaseSource(EtcdClient(etcd_one.endpoints, 1.0), keys, "hz", LEASE)
        try:
            grant = await source.renew(1)
            assert grant.ttl_ms <= min(LEASE.lease_ms, etcd_ttl_s(LEASE) * 1000)
            assert grant.ttl_ms >= LEASE.lease_ms * (1 - 3 * drift_ratio(LEASE))
            assert grant.ttl_ms * (1 - drift_ratio(LEASE)) - LEASE_MARGIN_MS > 0
        finally:
            await source.aclose()

    asyncio.run(scenario())
