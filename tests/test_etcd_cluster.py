"""A cluster on etcd: three regions, a control plane member per region (one active by
election), leases and the control state in etcd. The active member is killed (kill -9)
and a standby takes over; a switchover still works, through the CLI, which skips the dead
member and the standbys; a switch cut off mid-way is finished by the next leader; writes
go on with every control plane down and stop, in time, with etcd down. Also measured, for
comparison: how long writes go on with the embedded authority's control plane down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.etcd_support import EtcdCluster, etcd_prefix
from tests.support import Api, free_ports, topology_toml, write_topology
from unitrade.cli import main
from unitrade.cluster import LocalCluster
from unitrade.topology.config import TopologyConfig, load_config

pytestmark = pytest.mark.cluster
DEADLINE_S = 30.0
PAUSE_ENV = "UNITRADE_CONTROL_PAUSE"


def etcd_topology(directory: Path, endpoints: list[str]) -> tuple[TopologyConfig, Path]:
    """The default topology (hz, sh, bj) with a control plane member per region on etcd."""
    ports = free_ports(6)
    lines = [
        topology_toml(ports[:3]),
        "[control]",
        'lease_authority = "etcd"',
        "etcd_endpoints = [" + ", ".join(f'"{e}"' for e in endpoints) + "]",
        f'etcd_prefix = "{etcd_prefix()}"',
    ]
    for name, port in zip(("hz", "sh", "bj"), ports[3:], strict=True):
        lines += ["[[control.members]]", f'name = "{name}"', f'listen = "127.0.0.1:{port}"']
    path = directory / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path), path


def roles(cluster: LocalCluster) -> dict[str, str]:
    """Each control plane member's role as it reports it (`down` when it does not answer)."""
    found = {}
    for name in cluster.control_names():
        try:
            found[name] = httpx.get(cluster.base_url(name) + "/healthz", timeout=1.0).json()["role"]
        except (httpx.HTTPError, ValueError, KeyError):
            found[name] = "down"
    return found


def wait_leader(cluster: LocalCluster, timeout_s: float = DEADLINE_S) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        leaders = [n for n, role in roles(cluster).items() if role == "leader"]
        assert len(leaders) <= 1, f"two leaders: {leaders}"
        if leaders:
            return leaders[0]
        assert time.monotonic() < deadline, f"no control plane leader: {roles(cluster)}"
        time.sleep(0.05)


def wait_connected(api: Api, leader_url: str, timeout_s: float = DEADLINE_S) -> None:
    """Until every region watches the leader (a switch's pre-check needs them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = api.http.get(leader_url + "/v1/regions", headers=api.admin_headers)
        if answer.status_code == 200 and all(r["connected"] for r in answer.json()["regions"]):
            return
        assert time.monotonic() < deadline, f"regions not connected: {answer.text}"
        time.sleep(0.1)


class Writer:
    """Orders to every region's own cells, one after another; what each answered."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.buyers = {region: api.buyer_in(region) for region in api.config.region_names}
        self.answers: list[tuple[float, str, int, str]] = []  # sent, region, status, error

    def write(self, region: str) -> tuple[int, str]:
        sent = time.monotonic()
        answer = self.api.order(region, self.buyers[region], [("sku-e", 1)])
        while answer.status_code == 429:
            # One buyer ordering as fast as it can meets the default per-buyer order limit
            # (200/s): a client backs off and sends again; not what these tests are about.
            time.sleep(0.01)
            sent = time.monotonic()
            answer = self.api.order(region, self.buyers[region], [("sku-e", 1)])
        error = answer.json().get("error", "") if answer.status_code >= 400 else ""
        self.answers.append((sent, region, answer.status_code, error))
        return answer.status_code, error

    def write_for(self, seconds: float) -> list[tuple[int, str]]:
        """Writes to each region in turn for `seconds`; the refusals (none expected)."""
        refused = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for region in self.api.config.region_names:
                status, error = self.write(region)
                if status != 201:
                    refused.append((status, error))
        return refused


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """An etcd of this module's own: one test stops it."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), 1) as running:
        yield running


@pytest.fixture(scope="module")
def on_etcd(
    etcd: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalCluster, Api, Path]]:
    directory = tmp_path_factory.mktemp("etcd-cluster")
    config, path = etcd_topology(directory, etcd.endpoints)
    with LocalCluster(config, directory / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        wait_leader(cluster)
        api.put_product("sku-e", 1_000_000)
        yield cluster, api, path
        api.http.close()


def test_a_standby_answers_not_leader_naming_the_leader(
    on_etcd: tuple[LocalCluster, Api, Path],
) -> None:
    cluster, api, path = on_etcd
    leader = wait_leader(cluster)
    leader_url = cluster.base_url(leader)
    standby = next(n for n in cluster.control_names() if n != leader)
    for method, target in (("GET", "/v1/rules/current"), ("POST", "/internal/control/watch")):
        answer = api.http.request(
            method, cluster.base_url(standby) + target, headers=api.admin_headers, json={}
        )
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == "not_leader"
        assert answer.json()["leader"] == leader_url
        assert answer.headers["retry-after"] == "1"
    health = httpx.get(cluster.base_url(standby) + "/healthz").json()
    assert health["role"] == "standby" and health["leader"]["url"] == leader_url
    status = CliRunner().invoke(main, ["status", "--config", str(path)])
    assert status.exit_code == 0, status.output
    assert f"{leader_url}: up" in status.output.replace("\n", "")
    assert status.output.count(": standby") == 2, status.output


def test_the_leader_killed_a_standby_takes_over_and_a_switch_still_works(
    on_etcd: tuple[LocalCluster, Api, Path],
) -> None:
    cluster, api, path = on_etcd
    writer = Writer(api)
    leader = wait_leader(cluster)
    wait_connected(api, cluster.base_url(leader))
    assert writer.write_for(0.5) == []
    cluster.kill_region(leader)  # kill -9
    killed = time.monotonic()
    refused = []
    while True:
        refused += writer.write_for(0.05)
        leaders = [n for n, role in roles(cluster).items() if role == "leader"]
        if leaders:
            break
        assert time.monotonic() - killed < DEADLINE_S, f"no standby took over: {roles(cluster)}"
    took_over_ms = (time.monotonic() - killed) * 1000
    new_leader = leaders[0]
    assert new_leader != leader
    assert refused == [], "writes were refused while the control plane changed leader"
    print(f"\nstandby {new_leader} took over {took_over_ms:.0f} ms after the leader was killed")
    assert took_over_ms < api.config.control.lease_ms, "the takeover outlasted a write lease"
    # A switch through the CLI, which tries the members in the configured order: the dead
    # one does not answer, a standby answers not_leader naming the leader.
    wait_connected(api, cluster.base_url(new_leader))
    cell = next(c.name for c in api.config.cells if c.owner == "sh")
    switch = ["switch", "--cell", cell, "--config", str(path), "--to"]
    result = CliRunner().invoke(main, [*switch, "hz"])
    assert result.exit_code == 0, result.output
    health = api.http.get(api.url("hz", "/healthz")).json()
    assert health["owners"][cell] == "hz"
    # And back, so that the module's other tests find the topology's owners.
    back = CliRunner().invoke(main, [*switch, "sh"])
    assert back.exit_code == 0, back.output
    cluster.start_control(name=leader)
    cluster.wait_healthy([leader])
    assert writer.write_for(0.2) == []


def test_a_switch_cut_off_mid_way_is_rolled_back_by_the_next_leader(
    on_etcd: tuple[LocalCluster, Api, Path],
) -> None:
    """The leader is made to pause in catch_up (the cell banned), then killed; the member
    elected next finds the operation running in the store and rolls it back."""
    cluster, api, _path = on_etcd
    for name in cluster.control_names():
        cluster.kill_region(name)
    paused = cluster.control_names()[0]
    cluster.start_control(env={PAUSE_ENV: "catch_up:60"}, name=paused)
    assert wait_leader(cluster) == paused
    for name in cluster.control_names()[1:]:
        cluster.start_control(name=name)
    cluster.wait_healthy()
    leader_url = cluster.base_url(paused)
    wait_connected(api, leader_url)
    cell = next(c.name for c in api.config.cells if c.owner == "bj")
    answer = api.http.post(
        leader_url + "/v1/switch", json={"cells": [cell], "to": "hz"}, headers=api.admin_headers
    )
    assert answer.status_code == 202, answer.text
    op_id = answer.json()["id"]
    _wait_step(api, leader_url, op_id, "catch_up")
    cluster.kill_region(paused)
    new_leader = wait_leader(cluster)
    op = _operation(api, cluster.base_url(new_leader), op_id, wait_s=20)
    assert op["state"] == "rolled_back", op
    assert ("rollback", "begin") in [(e["step"], e["event"]) for e in op["log"]]
    deadline = time.monotonic() + DEADLINE_S
    while api.http.get(api.url("bj", "/healthz")).json()["banned"]:
        assert time.monotonic() < deadline, "the cell stayed banned"
        time.sleep(0.05)
    cluster.start_control(name=paused)
    cluster.wait_healthy([paused])


def _operation(api: Api, url: str, op_id: str, wait_s: float = 0.0) -> dict[str, Any]:
    answer = api.http.get(
        f"{url}/v1/operations/{op_id}", params={"wait_s": wait_s}, headers=api.admin_headers
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _wait_step(api: Api, url: str, op_id: str, step: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while _operation(api, url, op_id)["step"] != step:
        assert time.monotonic() < deadline, f"{op_id} never reached {step}"
        time.sleep(0.05)


def test_writes_go_on_with_every_control_plane_down_and_stop_in_time_with_etcd_down(
    on_etcd: tuple[LocalCluster, Api, Path], etcd: EtcdCluster
) -> None:
    cluster, api, _path = on_etcd
    lease_s = api.config.control.lease_ms / 1000
    writer = Writer(api)
    for name in cluster.control_names():
        cluster.kill_region(name)
    down = time.monotonic()
    assert writer.write_for(3 * lease_s) == [], "writes were refused without a control plane"
    wrote_s = time.monotonic() - down
    print(f"\nwith etcd: writes went on for {wrote_s:.1f} s (3 leases) with no control plane")
    # etcd gone as well: each region stops writing before a lease has passed.
    etcd.kill_member(0)
    try:
        cut = time.monotonic()
        refusals: list[str] = []
        while len(refusals) < 3:
            status, error = writer.write("hz")
            if status != 201:
                refusals.append(error)
            assert time.monotonic() - cut < DEADLINE_S, "hz never stopped writing"
        accepted_after_lease = [a for a in writer.answers if a[0] > cut + lease_s and a[2] == 201]
        assert accepted_after_lease == [], "a write was admitted after the lease had ended"
        assert set(refusals) == {"no_write_lease"}, refusals
        last_ok = max(a[0] for a in writer.answers if a[2] == 201 and a[1] == "hz")
        print(f"with etcd down: hz wrote for {(last_ok - cut) * 1000:.0f} ms more, then refused")
    finally:
        etcd.start_member(0)  # the module's other tests need it, whatever became of this one
    deadline = time.monotonic() + DEADLINE_S
    while writer.write("hz")[0] != 201:
        assert time.monotonic() < deadline, "hz did not write again once etcd was back"
        time.sleep(0.05)
    cluster.start_control()
    cluster.wait_healthy(cluster.control_names())
    wait_leader(cluster)


def test_with_the_embedded_authority_writes_stop_a_lease_after_the_control_plane(
    tmp_path: Path,
) -> None:
    """For comparison: the control plane is the lease authority, so without it a region
    stops writing within a lease (and writes again once it is back)."""
    config, path = write_topology(tmp_path)
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            api.put_product("sku-e", 1_000_000)
            writer = Writer(api)
            assert writer.write_for(0.3) == []
            lease_s = config.control.lease_ms / 1000
            cluster.kill_region("control")
            down = time.monotonic()
            while writer.write("hz")[0] == 201:
                assert time.monotonic() - down < DEADLINE_S, "hz never stopped writing"
            late = [a for a in writer.answers if a[0] > down + lease_s and a[2] == 201]
            assert late == [], "a write was admitted after the lease had ended"
            assert writer.answers[-1][3] == "no_write_lease", writer.answers[-1]
            last_ok = max(a[0] for a in writer.answers if a[2] == 201)
            print(f"\nembedded: hz wrote for {(last_ok - down) * 1000:.0f} ms more, then refused")
            cluster.start_control()
            cluster.wait_healthy(["control"])
            deadline = time.monotonic() + DEADLINE_S
            while writer.write("hz")[0] != 201:
                assert time.monotonic() < deadline, "hz did not write again"
                time.sleep(0.05)
        finally:
            api.http.close()


def test_a_region_killed_on_etcd_is_failed_over(etcd: EtcdCluster, tmp_path: Path) -> None:
    """The failover on etcd: the block is a key in etcd, the wait is for the lost region's
    lease key to expire, and the leader publishes the new owners."""
    config, _path = etcd_topology(tmp_path, etcd.endpoints)
    with LocalCluster(config, tmp_path / "data", _path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            leader_url = cluster.base_url(wait_leader(cluster))
            wait_connected(api, leader_url)
            api.put_product("sku-f", 1_000)
            buyer = api.buyer_in("bj")
            assert api.order("hz", buyer, [("sku-f", 1)]).status_code == 201
            cluster.kill_region("bj")
            deadline = time.monotonic() + DEADLINE_S
            while True:
                health = api.http.get(leader_url + "/healthz").json().get("health", {})
                if health.get("regions", {}).get("bj", {}).get("state") == "down":
                    break
                assert time.monotonic() < deadline, f"bj never marked down: {health}"
                time.sleep(0.1)
            answer = api.http.post(
                leader_url + "/v1/failover", json={"region": "bj"}, headers=api.admin_headers
            )
            assert answer.status_code == 202, answer.text
            op = _operation(api, leader_url, answer.json()["id"], wait_s=45)
            assert op["state"] == "done", op
            assert op["detail"]["expire_ms"] >= 0
            owners = api.http.get(config.region("hz").base_url + "/healthz").json()["owners"]
            assert owners["u5"] != "bj" and owners["u6"] != "bj", owners
            created = api.order("sh", buyer, [("sku-f", 1)])
            assert created.status_code == 201, created.text
        finally:
            api.http.close()
