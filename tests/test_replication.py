"""Replication of every cell to every region, seen from outside: positions and rows."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.replication_support import (
    differences,
    disk_positions,
    owner_heads,
    owners_of,
    region_positions,
    wait_converged,
    wipe_copy,
)
from tests.support import (
    MYSQL_BASE,
    Api,
    drop_mysql_databases,
    mysql_prefix,
    require_mysql,
    write_topology,
)
from unitrade.cluster import LocalCluster

pytestmark = pytest.mark.cluster


@pytest.fixture(params=["sqlite", "mysql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[LocalCluster, Api]]:
    """A new cluster whose cell copies are SQLite files, or MySQL/MariaDB databases."""
    prefix = None
    storage = None
    if request.param == "mysql":
        require_mysql()
        prefix = mysql_prefix()
        storage = f"{MYSQL_BASE}/{prefix}_{{region}}_{{cell}}"
    config, path = write_topology(tmp_path, storage)
    try:
        with LocalCluster(config, tmp_path / "data", path) as cluster:
            cluster.start()
            api = Api(config)
            yield cluster, api
            api.http.close()
    finally:
        if prefix is not None:
            drop_mysql_databases(prefix)


def burst(api: Api, skus: list[str], n: int, seed: int) -> int:
    """Orders, payments, closes and cart writes through random gateways; the 201s."""
    rng = random.Random(seed)
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(lambda i: one_step(api, skus, rng, i), range(n)))


def one_step(api: Api, skus: list[str], rng: random.Random, i: int) -> int:
    """One order, then its payment or close and a cart write; 1 if the order was created."""
    try:
        return _attempt(api, skus, rng, i)
    except httpx.TransportError:
        return 0  # the region called is down (a fault test): the client sees an error


def _attempt(api: Api, skus: list[str], rng: random.Random, i: int) -> int:
    region = rng.choice(api.config.region_names)
    buyer = rng.randrange(1, 10**6)
    created = api.order(region, buyer, [(rng.choice(skus), 1)])
    if created.status_code != 201:
        return 0
    order = created.json()
    if i % 3 == 0:
        api.call(
            rng.choice(api.config.region_names),
            "POST",
            f"/v1/orders/{order['order_id']}/pay",
            buyer,
            {"payment_id": f"p{order['order_id']}", "amount_cents": order["total_cents"]},
        )
    elif i % 3 == 1:
        api.call(region, "POST", f"/v1/orders/{order['order_id']}/close", buyer)
    api.call(region, "PUT", f"/v1/cart/items/{skus[0]}", buyer, {"qty": 2})
    return 1


class SteadyLoad:
    """`one_step` from a few threads until stopped (at most STEPS_MAX): unlike a burst of
    fixed size, it is certainly still running when a fault strikes, however slow the
    machine."""

    STEPS_MAX = 20_000
    THREADS = 4

    def __init__(self, api: Api, skus: list[str], seed: int) -> None:
        self.api, self.skus = api, skus
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.steps = itertools.count()
        self.done_steps = 0
        self.created = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.THREADS)
        self._workers = [self._pool.submit(self._run) for _ in range(self.THREADS)]

    def _run(self) -> None:
        while not self.stop_event.is_set():
            i = next(self.steps)
            if i >= self.STEPS_MAX:
                return
            created = one_step(self.api, self.skus, self.rng, i)
            with self._lock:
                self.done_steps += 1
                self.created += created

    def running(self) -> bool:
        return not self.stop_event.is_set() and not any(w.done() for w in self._workers)

    def wait_steps(self, more: int, timeout_s: float = 30.0) -> None:
        """Wait until `more` further steps have finished."""
        target = self.done_steps + more
        deadline = time.monotonic() + timeout_s
        while self.done_steps < target:
            assert self.running(), "the load stopped"
            assert time.monotonic() < deadline, f"the load made no {more} steps"
            time.sleep(0.01)

    def stop(self) -> int:
        """Stop, wait for the threads; the orders created."""
        self.stop_event.set()
        for worker in self._workers:
            worker.result()  # a worker's failure fails the test
        self._pool.shutdown()
        return self.created


def kill_with_rows_in_flight(
    cluster: LocalCluster, api: Api, load: SteadyLoad, victim: str, as_owner: bool, tries: int = 20
) -> list[str]:
    """kill -9 `victim` while the load runs and rows are provably in flight from an owner to
    a follower (`victim` as the owner, or as the follower); the cells whose rows were.

    The proof comes after the kill, from what can no longer change: a killed follower's
    committed positions (its files) below what its owners had shown before the kill, or a
    killed owner's committed positions above what its followers show after it. If the
    follower caught up in the instant before the kill, the victim is restarted and the kill
    tried again."""
    owners = owners_of(api.config)
    others = [r for r in api.config.region_names if r != victim]
    for _ in range(tries):
        load.wait_steps(10)  # rows flow in every cell
        # Read the owners last, then kill at once. With a 25 ms batch window on every pull a
        # busy cell's newest rows had almost always not reached its followers yet; a stream
        # sends them within a few ms, so more tries land after the rows did.
        heads = {} if as_owner else owner_heads(api.config, others)
        assert load.running()
        cluster.kill_region(victim)
        assert load.running(), "the load had ended when the kill landed"
        if as_owner:
            own = [c for c, o in owners.items() if o == victim]
            committed = disk_positions(api.config, cluster.data_dir, victim, own)
            seen_after = [region_positions(api.config, r) for r in others]
            behind = [c for c in own if any(seen[c] < committed[c] for seen in seen_after)]
        else:
            followed = [c for c in heads if owners[c] != victim]
            applied = disk_positions(api.config, cluster.data_dir, victim, followed)
            behind = [c for c in followed if applied[c] < heads[c]]
        if behind:
            return behind
        cluster.start([victim])
    raise AssertionError(f"no kill of {victim} landed with rows in flight in {tries} tries")


def test_every_copy_converges_after_bursts_in_all_regions(
    fresh: tuple[LocalCluster, Api],
) -> None:
    cluster, api = fresh
    skus = [f"R{i}" for i in range(5)]
    for sku in skus:
        api.put_product(sku, stock=10_000)
    created = 0
    for seed in range(3):
        created += burst(api, skus, 60, seed)
    assert created == 180
    heads = wait_converged(api.config)
    assert heads["center"] > 0 and heads["global"] == 5
    assert differences(api.config, cluster.data_dir) == []


def test_replica_killed_mid_stream_catches_up_without_loss_or_duplicates(
    fresh: tuple[LocalCluster, Api],
) -> None:
    cluster, api = fresh
    skus = ["K1", "K2"]
    for sku in skus:
        api.put_product(sku, stock=10_000)
    load = SteadyLoad(api, skus, 1)
    try:
        # kill -9 while hz and sh stream rows to bj that bj has not applied
        assert kill_with_rows_in_flight(cluster, api, load, "bj", as_owner=False)
        load.wait_steps(20)  # bj's own buyers get errors while it is down; the rest go on
        cluster.start(["bj"])
        load.wait_steps(20)
    finally:
        created = load.stop()
    assert created > 0
    wait_converged(api.config)
    assert differences(api.config, cluster.data_dir) == []


def test_source_killed_mid_stream_resumes_from_the_checkpoints(
    fresh: tuple[LocalCluster, Api],
) -> None:
    cluster, api = fresh
    api.put_product("S1", stock=100_000)
    burst(api, ["S1"], 30, 2)
    load = SteadyLoad(api, ["S1"], 3)
    try:
        # hz owns the center, the global cell, u1 and u2; killed while sh or bj lacks rows
        # it had committed
        assert kill_with_rows_in_flight(cluster, api, load, "hz", as_owner=True)
        load.wait_steps(20)
        cluster.start(["hz"])
    finally:
        load.stop()
    burst(api, ["S1"], 30, 4)
    # After the restart hz's outbox still retries the center steps that failed while it was
    # down, so the center cell keeps changing for a moment: compare once it is quiet (every
    # copy at its owner's position, and no owner moved while the copies were compared).
    deadline = time.monotonic() + 20
    while True:
        heads = wait_converged(api.config)
        found = differences(api.config, cluster.data_dir)
        heads_after = wait_converged(api.config)
        if (not found and heads_after == heads) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found == []
    assert heads_after == heads, "the copies never stood still after the restart"


def test_a_wiped_copy_is_rebuilt_from_a_snapshot_while_the_owner_keeps_writing(
    fresh: tuple[LocalCluster, Api],
) -> None:
    cluster, api = fresh
    api.put_product("W1", stock=100_000)
    burst(api, ["W1"], 150, 5)
    wait_converged(api.config)
    cluster.kill_region("bj")
    for cell in ("u1", "u3", "center", "global"):  # bj's copies of cells owned elsewhere
        wipe_copy(api.config, cluster.data_dir, "bj", cell)
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(burst, api, ["W1"], 80, 6)  # writes go on at the owners
        cluster.start(["bj"])
        load.result()
    wait_converged(api.config)
    assert differences(api.config, cluster.data_dir) == []
    streams = api.http.get(api.url("bj", "/healthz")).json()["replication"]
    rebuilt = {s["cell_name"] for s in streams if s["bootstraps"] > 0}
    assert {"u1", "u3", "center"} <= rebuilt
