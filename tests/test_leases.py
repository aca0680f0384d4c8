"""Write leases (issue 10 item 1): a region writes its cells only while it holds a lease
from the control plane; a restart of the control plane within the lease goes unnoticed by
clients, and a region cut off from it for longer stops writing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Api, write_topology
from tests.switch_support import Control, Load, buyers_of_cell
from tests.test_switchover import start_cluster
from unitrade.cluster import LocalCluster
from unitrade.topology.config import CONTROL_NAME, TopologyConfig

STOCK = 1_000_000
SKUS = ["LS-A", "LS-B"]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    yield from start_cluster(tmp_path, "sqlite")


# Long enough for a control plane process to start again on a loaded CI machine (a Python
# process importing its web and database stack takes 1-2 s there), so that the restart test
# checks what it says: an outage shorter than the lease.
RESTART_LEASE_MS = 8_000


@pytest.fixture
def long_lease(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    config, path = write_topology(tmp_path, control=f"lease_ms = {RESTART_LEASE_MS}")
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        yield cluster, path


def lease_of(config: TopologyConfig, region: str) -> dict[str, Any]:
    body = httpx.get(config.region(region).base_url + "/healthz", timeout=5).json()
    lease: dict[str, Any] = body["lease"]
    return lease


def test_a_control_plane_restarted_within_the_lease_costs_no_client_an_error(
    long_lease: tuple[LocalCluster, Path],
) -> None:
    cluster, _path = long_lease
    config = cluster.config
    with Api(config) as api, Control(config) as control:
        for sku in SKUS:
            api.put_product(sku, STOCK)
        control.wait_connected()
        buyers = [b for cell in (1, 3, 5) for b in buyers_of_cell(config, cell, 3)]
        load = Load(config, buyers, SKUS, threads=3)
        load.start()
        try:
            load.wait_acked(buyers, 20)
            failures_before = {r: lease_of(config, r)["failures"] for r in config.region_names}
            cluster.kill_region(CONTROL_NAME)
            down = time.monotonic()
            # The fault struck while leases were being renewed: renewals fail now.
            deadline = time.monotonic() + 5
            while lease_of(config, "sh")["failures"] == failures_before["sh"]:
                assert time.monotonic() < deadline, "no renewal failed with the control plane down"
                time.sleep(0.02)
            cluster.start_control()
            cluster.wait_healthy([CONTROL_NAME])
            down_s = time.monotonic() - down
            load.wait_acked(buyers, 30)
        finally:
            load.stop()
        assert load.errors == [], load.errors[:5]
        assert down_s < config.control.lease_ms / 1000, f"restart took {down_s:.2f} s"
        for region in config.region_names:
            assert lease_of(config, region)["valid"], region


def test_a_region_cut_off_from_the_lease_authority_stops_writing_before_its_lease_ends(
    running: tuple[LocalCluster, Path],
) -> None:
    cluster, _path = running
    config = cluster.config
    with Api(config) as api, Control(config) as control:
        api.put_product(SKUS[0], STOCK)
        control.wait_connected()
        buyer = buyers_of_cell(config, 3, 1)[0]  # u3: owned by sh
        assert api.order("sh", buyer, [(SKUS[0], 1)]).status_code == 201
        cluster.kill_region(CONTROL_NAME)
        killed = time.monotonic()
        refused: list[str] = []
        written_after_kill: list[float] = []
        deadline = killed + 10
        while True:
            answer = api.order("sh", buyer, [(SKUS[0], 1)])
            if answer.status_code == 201:
                written_after_kill.append(time.monotonic() - killed)
            else:
                assert answer.status_code == 503, answer.text
                body = answer.json()
                assert body["error"] == "no_write_lease", body
                assert answer.headers["retry-after"]
                refused.append(answer.json()["message"])
                break
            assert time.monotonic() < deadline, "sh kept writing without a lease"
            time.sleep(0.01)
        # Every write acknowledged after the control plane died was inside the lease.
        assert all(t < config.control.lease_ms / 1000 for t in written_after_kill)
        # Reads are still served; writes stay refused while the authority is away.
        listed = api.call("sh", "GET", "/v1/orders", buyer)
        assert listed.status_code == 200, listed.text
        assert not lease_of(config, "sh")["valid"]
        count_before = len(listed.json()["orders"])
        again = api.order("sh", buyer, [(SKUS[0], 1)])
        assert again.status_code == 503
        assert len(api.call("sh", "GET", "/v1/orders", buyer).json()["orders"]) == count_before
        # Back: writes are accepted again as soon as the lease is renewed.
        cluster.start_control()
        cluster.wait_healthy([CONTROL_NAME])
        deadline = time.monotonic() + 10
        while api.order("sh", buyer, [(SKUS[0], 1)]).status_code != 201:
            assert time.monotonic() < deadline, "writes not accepted after the lease came back"
            time.sleep(0.05)
