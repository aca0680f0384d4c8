"""A region of many processes (`workers`), on real processes over PostgreSQL and MariaDB:
one address served by every worker, order IDs that never repeat across them, one
acknowledgement per region that waits for every connected worker, the database fence
across processes, background work that moves off a killed leader, prompt pulls from a
worker that did not write, and a switchover under load that loses nothing."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.replication_support import differences, wait_converged
from tests.switch_support import Control, Load, buyers_of_cell
from tests.test_switchover import SKUS, STOCK, check_nothing_lost, unitrade
from tests.test_workers_storage import cell_lock_held
from tests.workers_support import (
    ENGINES,
    U1,
    U2,
    health,
    health_of_worker,
    leader_of,
    pinned,
    stopped,
    wait_for,
    workers_cluster,
)
from unitrade.gateway.edge import WORKER_HEADER
from unitrade.rpc.signing import sign
from unitrade.supervisor import SupervisorFiles
from unitrade.topology.config import TopologyConfig
from unitrade.web.tokens import issue_token


def token(config: TopologyConfig, buyer: int | None = None) -> dict[str, str]:
    issued = issue_token(config.token_keys, buyer_id=buyer, admin=buyer is None)
    return {"authorization": f"Bearer {issued}"}


def put_products(config: TopologyConfig) -> None:
    from tests.support import Api

    with Api(config) as api:
        for sku in SKUS:
            api.put_product(sku, STOCK)


def order(client: httpx.Client, config: TopologyConfig, buyer: int, sku: str) -> httpx.Response:
    body = {"items": [{"sku": sku, "qty": 1}]}
    return client.post("/v1/orders", json=body, headers=token(config, buyer))


def regions_board(config: TopologyConfig) -> dict[str, Any]:
    with Control(config) as control:
        answer = control.http.get("/v1/regions")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


@pytest.mark.parametrize("engine", ENGINES)
def test_a_region_of_two_workers_serves_through_its_one_address(
    tmp_path: Path, engine: str
) -> None:
    with workers_cluster(tmp_path, engine) as (cluster, path):
        config = cluster.config
        put_products(config)
        hz_buyers = buyers_of_cell(config, U1, 20)
        sh_buyers = buyers_of_cell(config, U2, 10)
        ids: list[str] = []
        # Each worker of hz, reached through the one address, takes orders: of its own
        # region's buyers, and of sh's (forwarded to either of sh's workers).
        for worker in (0, 1):
            with pinned(config, "hz", worker) as client:
                for n, buyer in enumerate(hz_buyers + sh_buyers):
                    created = order(client, config, buyer, SKUS[n % len(SKUS)])
                    assert created.status_code == 201, created.text
                    assert created.headers[WORKER_HEADER] == str(worker)
                    ids.append(created.json()["order_id"])
        # And many clients through the address at once, every region's gateway.
        load = Load(config, hz_buyers + sh_buyers, SKUS, threads=6)
        load.start()
        load.wait_acked(hz_buyers, 60)
        load.stop()
        assert load.errors == [], load.errors[:5]
        ids += [a.order_id for a in load.acked]
        assert len(ids) == len(set(ids)), "an order ID was issued twice"
        # Every worker of every region of two answers, and each says what all hold.
        for region in ("hz", "sh"):
            for worker in (0, 1):
                body = health_of_worker(config, region, worker)
                assert body["workers"] == 2
                assert sorted(p["worker"] for p in body["processes"]) == [0, 1]
        board = {r["region"]: r for r in regions_board(config)["regions"]}
        assert [w["worker"] for w in board["hz"]["workers"]] == [0, 1]
        assert all(w["connected"] for w in board["hz"]["workers"])
        status = unitrade(path, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("2/2 (leader") == 2, status.stdout  # hz and sh
        # Every order is where it belongs in every copy, and the copies are equal.
        wait_converged(config)
        with httpx.Client(base_url=config.region("bj").base_url, timeout=30) as bj:
            for acked in load.acked[:50]:
                read = bj.get(
                    f"/v1/orders/{acked.order_id}?consistency=replica",
                    headers=token(config, acked.buyer),
                )
                assert read.status_code == 200, read.text
        diff = unitrade(path, "diff")
        assert diff.returncode == 0, diff.stdout + diff.stderr
        assert differences(config, cluster.data_dir) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_9_of_the_leader_moves_background_work_to_the_other_worker(
    tmp_path: Path, engine: str
) -> None:
    with workers_cluster(tmp_path, engine, supervise=True) as (cluster, _path):
        config = cluster.config
        put_products(config)
        leader = leader_of(config, "sh")
        killed = cluster.pid(f"sh.{leader}")
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        # hz writes u1; sh's copy of it is kept by sh's leader, which must now be the other
        # worker: replication into sh goes on within seconds.
        hz_buyers = buyers_of_cell(config, U1, 10)
        with httpx.Client(base_url=config.region("hz").base_url, timeout=30) as hz:
            for n, buyer in enumerate(hz_buyers):
                assert order(hz, config, buyer, SKUS[n % len(SKUS)]).status_code == 201
        head = health(config, "hz")["positions"]["u1"]

        def replicated() -> bool:
            return int(health(config, "sh", fresh=True)["positions"]["u1"]) >= head

        wait_for(replicated, "sh's copy of u1 to catch up without its leader", 15)
        assert leader_of(config, "sh", not_pid=killed) == 1 - leader
        # The region kept serving through its address, and the killed worker is back.
        with httpx.Client(base_url=config.region("sh").base_url, timeout=30) as sh:
            for n, buyer in enumerate(buyers_of_cell(config, U2, 10)):
                created = order(sh, config, buyer, SKUS[n % len(SKUS)])
                assert created.status_code == 201, created.text

        def restarted() -> bool:
            pid = cluster.pid(f"sh.{leader}")
            return pid is not None and pid != killed

        wait_for(restarted, f"sh.{leader} started again", 20)
        cluster.wait_healthy([f"sh.{leader}"])
        assert health_of_worker(config, "sh", leader)["leader"] is False
        assert cluster.watches[f"sh.{leader}"].restarts == 1


def signed_pull(config: TopologyConfig, after: int, wait_ms: int) -> tuple[bytes, dict[str, str]]:
    """A pull of u1 from hz as region bj would send it."""
    body = json.dumps(
        {
            "cells": [{"cell": U1, "after": after}],
            "limit": 1000,
            "wait_ms": wait_ms,
            "region": "bj",
            "rule_version": 1,
        }
    ).encode()
    headers = {"content-type": "application/json"}
    secret = config.link_secret("bj", "hz")
    assert secret is not None
    target = "/internal/replication/pull_many"
    return body, {**headers, **sign(secret, "bj", "hz", "POST", target, body, headers)}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pull_held_by_the_worker_that_did_not_write_is_answered_promptly(
    tmp_path: Path, engine: str
) -> None:
    """Worker 1 of hz holds a follower's long poll while worker 0 commits: the pull must
    come back at once (a few polls of the position), not when its 2 s hold ends."""
    with workers_cluster(tmp_path, engine, workers={"hz": 2}) as (cluster, _path):
        config = cluster.config
        put_products(config)
        buyers = buyers_of_cell(config, U1, 40)
        delays: list[float] = []
        with pinned(config, "hz", 0) as writer, pinned(config, "hz", 1) as puller:
            for n, buyer in enumerate(buyers):
                body, headers = signed_pull(config, 0, 0)
                head = int(
                    puller.post(PULL, content=body, headers=headers).json()["cells"][0]["head"]
                )
                answered: dict[str, Any] = {}

                def pull(head: int = head, answered: dict[str, Any] = answered) -> None:
                    body, headers = signed_pull(config, head, 2_000)
                    reply = puller.post(PULL, content=body, headers=headers)
                    answered["at"] = time.monotonic()
                    answered["reply"] = reply

                holder = threading.Thread(target=pull)
                holder.start()
                time.sleep(0.15)  # the pull is held: nothing new yet
                assert "at" not in answered
                created = order(writer, config, buyer, SKUS[n % len(SKUS)])
                committed = time.monotonic()
                assert created.status_code == 201, created.text
                holder.join(timeout=10)
                reply = answered["reply"]
                assert reply.status_code == 200, reply.text
                assert reply.headers[WORKER_HEADER] == "1"
                cell = reply.json()["cells"][0]
                assert cell["changes"], "the pull came back without the new order"
                assert int(cell["head"]) > head
                delays.append(max(0.0, answered["at"] - committed))
        delays.sort()
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        # Generous for a shared, busy machine: a pull waiting for its 2 s hold is 2,000.
        assert p99 < 0.5, f"pull answered {p99 * 1000:.0f} ms after the commit: {delays}"
        assert statistics.median(delays) < 0.25, delays


PULL = "/internal/replication/pull_many"


@pytest.mark.parametrize("engine", ENGINES)
def test_replication_lag_stays_low_under_load_on_two_workers(tmp_path: Path, engine: str) -> None:
    """The whole path: orders through both workers of hz, sh's leader pulling from
    whichever worker its connections reach; the lag its streams report stays low."""
    with workers_cluster(tmp_path, engine) as (cluster, _path):
        config = cluster.config
        put_products(config)
        load = Load(config, buyers_of_cell(config, U1, 20), SKUS, threads=4, gateways=["hz"])
        samples: list[int] = []
        load.start()
        try:
            load.wait_acked(load.buyers, 20)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                for stream in health(config, "sh")["replication"]:
                    if stream["cell_name"] in ("u1", "center"):
                        samples.append(int(stream["lag_ms"]))
                time.sleep(0.1)
        finally:
            load.stop()
        assert load.errors == [], load.errors[:5]
        samples.sort()
        p99 = samples[int(len(samples) * 0.99)]
        assert p99 < 500, f"replication lag p99 {p99} ms: {samples[-10:]}"


@pytest.mark.parametrize("engine", ENGINES)
def test_switchover_under_load_with_two_worker_regions_loses_nothing(
    tmp_path: Path, engine: str
) -> None:
    with workers_cluster(tmp_path, engine) as (cluster, path):
        config = cluster.config
        put_products(config)
        moved = buyers_of_cell(config, U1, 10)
        others = buyers_of_cell(config, U2, 6)
        load = Load(config, moved + others, SKUS, threads=4)
        control = Control(config)
        load.start()
        try:
            for n in range(6):
                load.wait_acked(moved, 2)
                op = control.switch_and_wait(["u1"], "sh" if n % 2 == 0 else "hz")
                assert op["detail"]["streams_not_following"] == [], op["detail"]
            load.wait_acked(moved, 2)
        finally:
            load.stop()
            control.close()
        assert sum(1 for a in load.acked if a.buyer in moved) > 6
        check_nothing_lost(config, path, cluster.data_dir, load)


def test_a_region_acknowledges_a_rule_only_once_every_connected_worker_has(
    tmp_path: Path,
) -> None:
    """One worker of hz frozen (SIGSTOP): hz's acknowledgement of the ban waits for it
    while it counts as connected, and the switch with it; a worker that stays away is
    not waited for (the database fence holds it off), and learns the rule on waking."""
    with workers_cluster(tmp_path, "postgresql") as (cluster, path):
        config = cluster.config
        put_products(config)
        with Control(config) as control:
            control.wait_connected()
            version = int(control.rule()["version"])
            frozen = 1 - leader_of(config, "hz")  # background work goes on meanwhile
            pid = cluster.pid(f"hz.{frozen}")
            assert pid is not None
            with stopped(pid):
                answer = control.switch(["u2"], "bj")  # hz is connected: its ack counts
                assert answer.status_code == 202, answer.text
                op_id = answer.json()["id"]

                def awake_worker_acked() -> bool:
                    hz = {r["region"]: r for r in regions_board(config)["regions"]}["hz"]
                    awake = [w for w in hz["workers"] if w["worker"] != frozen]
                    return all(w["version"] > version for w in awake)

                wait_for(awake_worker_acked, "the awake worker's acknowledgement", 5)
                hz = {r["region"]: r for r in regions_board(config)["regions"]}["hz"]
                sleeping = next(w for w in hz["workers"] if w["worker"] == frozen)
                assert sleeping["connected"] and sleeping["version"] == version
                assert hz["version"] == version, "hz acknowledged without its frozen worker"
                assert control.operation(op_id)["step"] == "ban"
                # Past the grace the frozen worker is no longer connected, and the switch
                # goes on without it.
                op = control.operation(op_id, wait_s=30)
                assert op["state"] == "done", op
            newest = int(control.rule()["version"])
            wait_for(
                lambda: health_of_worker(config, "hz", frozen)["rule_version"] == newest,
                "the woken worker to take the newest rule",
                15,
            )
            control.wait_connected()
        # The copies are equal (nothing written under the stale rule).
        wait_converged(config)
        diff = unitrade(path, "diff")
        assert diff.returncode == 0, diff.stdout + diff.stderr


def test_a_write_still_open_in_any_process_holds_the_switch(tmp_path: Path) -> None:
    """A transaction holding u1's lock in hz's copy (as a process frozen inside a write
    would) keeps hz from acknowledging the ban: every worker's database fence waits for
    it. Released within the ack timeout, the switch goes on; held past it, the switch
    rolls back and u1 stays with hz, writable."""
    with workers_cluster(tmp_path, "postgresql", control="ack_timeout_ms = 3000") as (
        cluster,
        _path,
    ):
        config = cluster.config
        put_products(config)
        url = config.region("hz").storage_url("u1", cluster.data_dir)
        with Control(config) as control:
            control.wait_connected()
            version = int(control.rule()["version"])
            with cell_lock_held(url):
                op_id = control.switch(["u1"], "sh").json()["id"]
                wait_for(lambda: control.operation(op_id)["step"] == "ban", "the ban", 5)
                time.sleep(1.0)
                hz = {r["region"]: r for r in regions_board(config)["regions"]}["hz"]
                assert hz["version"] == version, "hz acknowledged past an open write"
                assert all(w["version"] == version for w in hz["workers"]), hz
            op = control.operation(op_id, wait_s=30)
            assert op["state"] == "done", op
            assert control.rule()["owners"][str(U1)] == "sh"
            # Held past the acknowledgement timeout: rolled back.
            with cell_lock_held(config.region("sh").storage_url("u1", cluster.data_dir)):
                op_id = control.switch(["u1"], "hz").json()["id"]
                op = control.operation(op_id, wait_s=30)
                assert op["state"] == "rolled_back", op
            rule = control.rule()
            assert rule["owners"][str(U1)] == "sh" and rule["banned"] == []
            control.wait_connected()
        with httpx.Client(base_url=config.region("sh").base_url, timeout=30) as sh:
            buyer = buyers_of_cell(config, U1, 1)[0]
            assert order(sh, config, buyer, SKUS[0]).status_code == 201


def test_unitrade_serve_runs_and_supervises_a_regions_workers(tmp_path: Path) -> None:
    """`unitrade serve --region hz --workers 2` on hz's own "host" (a data directory of its
    own): both workers on hz's one address, a killed worker started again, all stopped by
    SIGTERM."""
    with workers_cluster(tmp_path, "postgresql", workers={"hz": 1}) as (cluster, path):
        config = cluster.config
        cluster.stop_region("hz")  # hz moves to "its own host"
        host_data = tmp_path / "hz-host"
        command = [sys.executable, "-m", "unitrade.cli", "serve", "--region", "hz"]
        command += ["--workers", "2", "--config", str(path), "--data", str(host_data)]
        serving = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            files = SupervisorFiles(host_data)

            def both_up() -> bool:
                state = files.read_state()
                return state is not None and set(state["processes"]) == {"hz.0", "hz.1"}

            wait_for(both_up, "serve to start hz.0 and hz.1", 60)
            for worker in (0, 1):
                body = health_of_worker(config, "hz", worker)
                assert body["workers"] == 2, body
            state = files.read_state()
            assert state is not None
            killed = int(state["processes"]["hz.1"]["pid"])
            os.kill(killed, signal.SIGKILL)

            def restarted() -> bool:
                now = files.read_state()
                return now is not None and now["processes"]["hz.1"]["pid"] != killed

            wait_for(restarted, "hz.1 started again", 30)
            assert health_of_worker(config, "hz", 1)["worker"] == 1
            put_products(config)  # writes at hz, the owner of the global and center cells
        finally:
            serving.send_signal(signal.SIGTERM)
            output, _ = serving.communicate(timeout=60)
        assert serving.returncode == 0, output
        assert "workers hz.0, hz.1 up" in output, output
        final = SupervisorFiles(host_data).read_state()
        assert final is None  # the supervisor removed its state: every worker stopped
