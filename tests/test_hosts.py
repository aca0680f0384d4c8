"""Regions on hosts of their own: every region and the control plane in a network namespace
of its own (its own address, joined to the others by a bridge), each binding 0.0.0.0 on
the same port and reached at its own advertised address, as on separate machines. The
operator's CLI runs on another host (the machine itself, on the bridge). A workload through
every gateway, a switchover by the CLI, nothing lost, `unitrade diff` clean."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Api, free_ports, topology_toml
from tests.switch_support import Control, Load, buyers_of_cell
from tests.test_switchover import SKUS, STOCK, check_nothing_lost, unitrade
from unitrade.cluster import LocalCluster
from unitrade.netns import Network, unavailable_reason
from unitrade.topology.config import CONTROL_NAME, default_config, parse_config
from unitrade.verify.network import relocate


@pytest.fixture
def network() -> Iterator[Network]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces (root, ip and iptables are needed): {reason}")
    hosts = [*default_config().region_names, CONTROL_NAME]
    with Network(hosts) as made:
        yield made


def hosts_cluster(network: Network, directory: Path) -> tuple[LocalCluster, Path]:
    """The default topology with every server on a host of its own: `listen` 0.0.0.0 on
    one port shared by all the regions, `advertise` the host's own address."""
    region_port, control_port = free_ports(2)
    text = topology_toml([region_port + n for n in range(3)] + [control_port])
    config = parse_config(tomllib.loads(text))
    moves: dict[str, tuple[str, str | None]] = {
        r.name: (f"0.0.0.0:{region_port}", f"{network.hosts[r.name]}:{region_port}")
        for r in config.regions
    }
    moves[CONTROL_NAME] = (
        f"0.0.0.0:{control_port}",
        f"{network.hosts[CONTROL_NAME]}:{control_port}",
    )
    # The regions were written on three ports of 127.0.0.1; now all bind one port.
    path = directory / "topology.toml"
    path.write_text(relocate(text, moves, config))
    placed = parse_config(tomllib.loads(path.read_text()), str(path))
    return LocalCluster(placed, directory / "data", path, launcher=network.prefix), path


@pytest.mark.cluster
def test_regions_on_hosts_of_their_own_take_orders_switch_and_converge(
    network: Network, tmp_path: Path
) -> None:
    cluster, path = hosts_cluster(network, tmp_path)
    config = cluster.config
    assert {(r.host, r.port) for r in config.regions} == {("0.0.0.0", config.regions[0].port)}
    assert len({r.base_url for r in config.regions}) == 3
    with cluster:
        cluster.start()
        api = Api(config)
        for sku in SKUS:
            api.put_product(sku, STOCK)
        api.http.close()
        moved = buyers_of_cell(config, 3, 8)  # u3, owned by sh
        others = buyers_of_cell(config, 1, 4) + buyers_of_cell(config, 5, 4)
        load = Load(config, moved + others, SKUS, threads=4)
        with Control(config) as control:
            control.wait_connected()
            load.start()
            try:
                load.wait_acked(moved, 10)
                status = unitrade(path, "status")
                assert status.returncode == 0, status.stdout + status.stderr
                assert "all up: the control plane and 3 regions" in status.stdout
                switched = unitrade(path, "switch", "--cell", "u3", "--to", "bj")
                assert switched.returncode == 0, switched.stdout + switched.stderr
                load.wait_acked(moved, 10)
            finally:
                load.stop()
            owners = control.rule()["owners"]
            assert owners["3"] == "bj", owners
        assert not load.errors, load.errors[:5]
        check_nothing_lost(config, path, cluster.data_dir, load)
