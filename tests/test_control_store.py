"""The control store's promises, run the same on each implementation: SQLite (store.py)
and etcd (etcd_store.py, against a real etcd member). Rules only grow one version at a
time, operations keep their step log and an abort request, lease blocks only grow, and
the retention sweep deletes finished operations past the newest kept, never a running one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.etcd_support import EtcdCluster, etcd_prefix
from unitrade.control.etcd import EtcdClient, EtcdKeys, put_op
from unitrade.control.etcd_store import EtcdControlStore
from unitrade.control.store import ControlStore, SqlControlStore, StaleRule
from unitrade.errors import NotLeader
from unitrade.storage.store import now_ms
from unitrade.topology.config import default_config
from unitrade.topology.rule import initial_rule

CONFIG = default_config()
RULE = initial_rule(CONFIG)
StoreFactory = Callable[[], ControlStore]


@pytest.fixture(params=["sqlite", "etcd"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes stores that share one state: the same SQLite file, or the same etcd prefix."""
    if request.param == "sqlite":
        yield lambda: SqlControlStore(f"sqlite:///{tmp_path}/control.db")
        return
    etcd: EtcdCluster = request.getfixturevalue("etcd_one")
    keys = EtcdKeys(etcd_prefix())
    yield lambda: EtcdControlStore(EtcdClient(etcd.endpoints, 2.0), keys)


def test_the_first_open_records_version_1_and_later_opens_the_newest(
    stores: StoreFactory,
) -> None:
    async def scenario() -> None:
        store = stores()
        try:
            assert await store.open(CONFIG, RULE) == RULE
            assert await store.open(CONFIG, RULE) == RULE  # opened again: nothing new
            await store.publish(RULE.derive(2, banned={1}), "a ban", "op-1")
        finally:
            await store.close()
        again = stores()
        try:
            newest = await again.open(CONFIG, RULE)
            assert newest.version == 2 and newest.banned == {1}
        finally:
            await again.close()

    asyncio.run(scenario())


def test_rule_versions_only_grow_one_at_a_time(stores: StoreFactory) -> None:
    async def scenario() -> None:
        store = stores()
        await store.open(CONFIG, RULE)
        try:
            with pytest.raises(StaleRule):
                await store.publish(RULE.derive(3), "skips a version", None)
            await store.publish(RULE.derive(2, banned={1}), "a ban", "op-1")
            with pytest.raises(StaleRule):
                await store.publish(RULE.derive(2), "the same version again", None)
            await store.publish(RULE.derive(3), "lift the ban", "op-1")
            history = await store.history(10)
            assert [h["version"] for h in history] == [3, 2, 1]
            assert history[1]["reason"] == "a ban" and history[1]["operation_id"] == "op-1"
            assert history[1]["rule"]["banned"] == [1]
            assert history[2]["operation_id"] is None
            assert [h["version"] for h in await store.history(1)] == [3]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_an_operation_keeps_its_steps_its_log_and_an_abort_request(stores: StoreFactory) -> None:
    async def scenario() -> None:
        store = stores()
        await store.open(CONFIG, RULE)
        try:
            op = await store.create_operation("switch", [3, 4], {3: "sh", 4: "sh"}, "hz")
            await store.record(op, "precheck", "begin")
            await store.record(op, "precheck", "done", {"precheck_ms": 7})
            await store.request_abort(op.id)
            # A record after an abort request keeps it (the workflow's copy is older).
            await store.record(op, "ban", "begin", {"ban_version": 2})
            stored = await store.operation(op.id)
            assert stored is not None
            assert stored.abort_requested and stored.step == "ban"
            assert stored.detail == {"precheck_ms": 7, "ban_version": 2}
            assert stored.cells == [3, 4] and stored.sources == {3: "sh", 4: "sh"}
            await store.record(op, "rollback", "error", {"reason": "x"}, "rolled_back", "why")
            stored = await store.operation(op.id)
            assert stored is not None
            assert (stored.state, stored.error) == ("rolled_back", "why")
            log = await store.log(op.id)
            assert [(e["step"], e["event"]) for e in log] == [
                ("precheck", "begin"),
                ("precheck", "done"),
                ("ban", "begin"),
                ("rollback", "error"),
            ]
            assert log[1]["detail"] == {"precheck_ms": 7}
            assert await store.operation("op-000000000000") is None
            assert await store.log("op-000000000000") == []
            await asyncio.sleep(0.002)  # a later creation time
            running = await store.create_operation("evacuate", [5], {5: "bj"}, "hz")
            assert [o.id for o in await store.operations(10)] == [running.id, op.id]
            assert [o.id for o in await store.operations(10, state="running")] == [running.id]
            assert [o.id for o in await store.operations(1)] == [running.id]
            assert await store.count_operations() == 2
        finally:
            await store.close()

    asyncio.run(scenario())


def test_lease_blocks_only_grow(stores: StoreFactory) -> None:
    async def scenario() -> None:
        store = stores()
        await store.open(CONFIG, RULE)
        try:
            assert await store.lease_blocks() == {}
            await store.block_lease("sh", 5, "op-a")
            await store.block_lease("sh", 3, "op-b")
            assert await store.lease_blocks() == {"sh": 5}
            await store.block_lease("sh", 7, "op-c")
            await store.block_lease("bj", 2, "op-d")
            assert await store.lease_blocks() == {"sh": 7, "bj": 2}
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_sweep_deletes_finished_operations_past_the_newest_kept(stores: StoreFactory) -> None:
    async def scenario() -> None:
        store = stores()
        await store.open(CONFIG, RULE)
        try:
            ids = []
            for n in range(6):
                await asyncio.sleep(0.002)  # creation times in order
                op = await store.create_operation("switch", [1], {1: "hz"}, "sh")
                ids.append(op.id)
                state = "running" if n == 0 else "done"
                await store.record(op, "done", "done", state=state)
                await store.record(op, "done", "note")
            # Nothing is old enough yet.
            assert await store.sweep_operations(2, now_ms() - 60_000, 10) == 0
            # Keep the newest 2; of the older four, the running one stays.
            later = now_ms() + 10_000
            assert await store.sweep_operations(2, later, 2) == 2
            assert await store.sweep_operations(2, later, 2) == 1
            assert await store.sweep_operations(2, later, 2) == 0
            left = {op.id for op in await store.operations(10)}
            assert left == {ids[0], ids[4], ids[5]}
            assert await store.log(ids[1]) == []
            assert await store.operation(ids[1]) is None
            assert len(await store.log(ids[5])) == 2
            assert await store.count_operations() == 3
        finally:
            await store.close()

    asyncio.run(scenario())


def test_two_stores_publishing_the_same_version_only_one_wins(etcd_one: EtcdCluster) -> None:
    """Two control planes that both believe they lead (one paused past its leadership):
    the compare on the newest version lets exactly one rule in. (The SQL store is for one
    control plane per store and makes no such promise.)"""

    async def scenario() -> None:
        keys = EtcdKeys(etcd_prefix())
        one, two = (EtcdControlStore(EtcdClient(etcd_one.endpoints, 2.0), keys) for _ in "12")
        await one.open(CONFIG, RULE)
        try:
            for version in range(2, 12):
                results = await asyncio.gather(
                    one.publish(RULE.derive(version, banned={1}), "one", None),
                    two.publish(RULE.derive(version, banned={3}), "two", None),
                    return_exceptions=True,
                )
                assert sum(isinstance(r, StaleRule) for r in results) == 1, results
                assert sum(r is None for r in results) == 1, results
            assert [h["version"] for h in await one.history(20)] == list(range(11, 0, -1))
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())


def test_a_store_fenced_by_a_lost_leadership_writes_nothing(etcd_one: EtcdCluster) -> None:
    async def scenario() -> None:
        keys = EtcdKeys(etcd_prefix())
        client = EtcdClient(etcd_one.endpoints, 2.0)
        lease, _ttl = await client.grant(30)
        won = await client.txn([], [put_op(keys.leader, b'{"member": "a"}', lease)])
        held = {"revision": won.revision}
        fence = lambda: held["revision"]  # noqa: E731 - the election's current_revision
        store = EtcdControlStore(EtcdClient(etcd_one.endpoints, 2.0), keys, fence)
        try:
            await store.open(CONFIG, RULE)
            await store.publish(RULE.derive(2), "while leading", None)
            # The leader key goes (its lease ended) and another member creates it anew.
            await client.revoke(lease)
            await client.txn([], [put_op(keys.leader, b'{"member": "b"}')])
            with pytest.raises(NotLeader):
                await store.publish(RULE.derive(3), "after losing the leadership", None)
            with pytest.raises(NotLeader):
                await store.create_operation("switch", [1], {1: "hz"}, "sh")
            with pytest.raises(NotLeader):
                await store.block_lease("sh", 9, "op-x")
            held["revision"] = 0  # the election knows it lost: refused before etcd
            with pytest.raises(NotLeader):
                await store.publish(RULE.derive(3), "not the leader", None)
            assert [h["version"] for h in await store.history(5)] == [2, 1]
            assert await store.lease_blocks() == {}
        finally:
            await store.close()
            await client.aclose()

    asyncio.run(scenario())
