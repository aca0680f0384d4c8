"""Planned switchover (issue 4): live rules with acknowledgements, the ban, holds at the
gateways, the persistent workflow, and zero loss under load, on real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.replication_support import current_owners, differences, wait_converged
from tests.support import (
    MYSQL_BASE,
    Api,
    drop_mysql_databases,
    drop_pg_databases,
    mysql_prefix,
    pg_prefix,
    require_mysql,
    require_postgres,
    write_topology,
)
from tests.switch_support import Control, Load, buyers_of_cell
from unitrade.cluster import LocalCluster
from unitrade.topology.config import CONTROL_NAME, TopologyConfig

SWITCHES = 20
STOCK = 1_000_000
SKUS = ["SW-A", "SW-B", "SW-C"]
MOVED = "u3"  # owned by sh in the default topology


def unitrade(path: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unitrade.cli", *args, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def health(config: TopologyConfig, region: str) -> dict[str, object]:
    body: dict[str, object] = httpx.get(config.region(region).base_url + "/healthz").json()
    return body


def wait_rule_everywhere(config: TopologyConfig, version: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for region in config.region_names:
        while health(config, region)["rule_version"] != version:
            assert time.monotonic() < deadline, f"{region} never took rule version {version}"
            time.sleep(0.05)


def start_cluster(tmp_path: Path, storage: str) -> Iterator[tuple[LocalCluster, Path]]:
    """A cluster with cell copies and the control store on SQLite, on PostgreSQL or on
    MySQL/MariaDB; or `mixed`: each region on its own engine."""
    if storage == "mixed":
        yield from start_mixed_cluster(tmp_path)
        return
    prefix, drop = None, drop_pg_databases
    if storage == "postgresql":
        require_postgres()
        prefix = pg_prefix()
        base = "postgresql://postgres@127.0.0.1:5432"
    elif storage == "mysql":
        require_mysql()
        prefix, drop, base = mysql_prefix(), drop_mysql_databases, MYSQL_BASE
    if prefix is not None:
        config, path = write_topology(
            tmp_path, f"{base}/{prefix}_{{region}}_{{cell}}", f"{base}/{prefix}_control"
        )
    else:
        config, path = write_topology(tmp_path)
    try:
        with LocalCluster(config, tmp_path / "data", path) as cluster:
            cluster.start()
            yield cluster, path
    finally:
        if prefix is not None:
            drop(prefix)


def start_mixed_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    """hz's cell copies on PostgreSQL, sh's on MariaDB, bj's on SQLite, the control store on
    MariaDB: replication, switchovers and diff between engines."""
    require_postgres()
    require_mysql()
    prefix = mysql_prefix()  # the same form as pg_prefix(): one name for both servers
    storage = {
        "hz": f"postgresql://postgres@127.0.0.1:5432/{prefix}_{{region}}_{{cell}}",
        "sh": f"{MYSQL_BASE}/{prefix}_{{region}}_{{cell}}",
    }
    config, path = write_topology(tmp_path, storage, f"{MYSQL_BASE}/{prefix}_control")
    try:
        with LocalCluster(config, tmp_path / "data", path) as cluster:
            cluster.start()
            yield cluster, path
    finally:
        drop_pg_databases(prefix)
        drop_mysql_databases(prefix)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    yield from start_cluster(tmp_path, "sqlite")


@pytest.fixture(params=["sqlite", "postgresql", "mysql", "mixed"])
def running_on(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[LocalCluster, Path]]:
    """The same tests on the embedded default, on PostgreSQL, on MySQL/MariaDB, and with
    each region on another of the three (`mixed`: MOVED switches between sh on MariaDB
    and hz on PostgreSQL)."""
    yield from start_cluster(tmp_path, request.param)


@pytest.fixture
def control(running: tuple[LocalCluster, Path]) -> Iterator[Control]:
    with Control(running[0].config) as client:
        yield client


@pytest.fixture
def control_on(running_on: tuple[LocalCluster, Path]) -> Iterator[Control]:
    with Control(running_on[0].config) as client:
        yield client


def restart_control_paused(cluster: LocalCluster, control: Control, step: str) -> None:
    """Restart the control plane so that a switch pauses 60 s when `step` begins."""
    cluster.kill_region(CONTROL_NAME)
    cluster.start_control(env={"UNITRADE_CONTROL_PAUSE": f"{step}:60"})
    cluster.wait_healthy([CONTROL_NAME])
    control.wait_connected()


def switch_paused_at(cluster: LocalCluster, control: Control, step: str, target: str) -> str:
    """Start a switch of MOVED to `target` that pauses at `step`; its operation ID once it
    is there."""
    restart_control_paused(cluster, control, step)
    answer = control.switch([MOVED], target)
    assert answer.status_code == 202, answer.text
    op_id: str = answer.json()["id"]
    control.wait_step(op_id, step)
    return op_id


def with_product(config: TopologyConfig, sku: str) -> None:
    api = Api(config)
    api.put_product(sku, 100)
    api.http.close()


def check_nothing_lost(config: TopologyConfig, path: Path, data_dir: Path, load: Load) -> None:
    """No acknowledged order lost, none duplicated, each readable from every region with
    the state it was acknowledged in; stock conserved; every copy equal to its owner's."""
    assert load.errors == [], load.errors[:10]
    assert len(load.acked) > 0
    ids = [a.order_id for a in load.acked]
    assert len(set(ids)) == len(ids), "an order ID was issued twice"
    wait_converged(config)
    api = Api(config)
    try:
        for acked in load.acked:
            for region in config.region_names:
                got = api.call(
                    region, "GET", f"/v1/orders/{acked.order_id}?consistency=replica", acked.buyer
                )
                assert got.status_code == 200, (region, acked, got.text)
                expected = "paid" if acked.paid else "created"
                assert got.json()["status"] == expected, (region, acked, got.json())
        by_buyer: dict[int, set[str]] = {}
        for acked in load.acked:
            by_buyer.setdefault(acked.buyer, set()).add(acked.order_id)
        for buyer, expected_ids in by_buyer.items():
            listed: set[str] = set()
            cursor = None
            while True:
                query = "/v1/orders?limit=100" + (f"&cursor={cursor}" if cursor else "")
                page = api.call("hz", "GET", query, buyer)
                assert page.status_code == 200, page.text
                listed |= {o["order_id"] for o in page.json()["orders"]}
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
            assert listed == expected_ids, f"buyer {buyer}: orders that nobody acknowledged"
        sold = Counter(a.sku for a in load.acked if a.paid)
        reserved = Counter(a.sku for a in load.acked if not a.paid)
        for sku in SKUS:
            levels = api.levels(sku)
            assert levels["available"] + levels["reserved"] + levels["sold"] == STOCK, levels
            assert (levels["sold"], levels["reserved"]) == (sold[sku], reserved[sku]), levels
    finally:
        api.http.close()
    diff = unitrade(path, "diff")
    assert diff.returncode == 0, diff.stdout + diff.stderr
    # And row by row from outside, whatever engine each copy is on.
    assert differences(config, data_dir) == []


def switch_back_and_forth(cluster: LocalCluster, path: Path, switches: int) -> None:
    config = cluster.config
    api = Api(config)
    for sku in SKUS:
        api.put_product(sku, STOCK)
    api.http.close()
    moved = buyers_of_cell(config, 3, 12)
    others = buyers_of_cell(config, 1, 4) + buyers_of_cell(config, 5, 4)
    load = Load(config, moved + others, SKUS, threads=4)
    control = Control(config)
    load.start()
    try:
        run_switches(control, load, switches, moved)
    finally:
        control.close()
    assert current_owners(config)[MOVED] == ("hz" if switches % 2 else "sh")
    moved_writes = sum(1 for a in load.acked if a.buyer in moved)
    assert moved_writes > switches, "the load did not write the moved cell"
    check_nothing_lost(config, path, cluster.data_dir, load)


def run_switches(control: Control, load: Load, switches: int, moved: list[int]) -> None:
    """Switch the cell of the `moved` buyers back and forth, each switch after the load has
    written that cell again: under load, and proof that writes resumed after each switch."""
    figures = []
    try:
        for n in range(switches):
            load.wait_acked(moved, 2)
            target = "hz" if n % 2 == 0 else "sh"
            op = control.switch_and_wait([MOVED], target)
            figures.append(op["detail"])
            assert op["detail"]["streams_not_following"] == [], op["detail"]
        load.wait_acked(moved, 2)
    finally:
        load.stop()
    slowest = max(f["total_ms"] for f in figures)
    assert slowest < 10_000, figures


def test_switch_back_and_forth_under_load_loses_nothing(
    running_on: tuple[LocalCluster, Path],
) -> None:
    switch_back_and_forth(*running_on, SWITCHES)


def test_unreachable_target_is_refused_before_anything_is_banned(
    running: tuple[LocalCluster, Path], control: Control
) -> None:
    cluster, path = running
    before = control.rule()
    cluster.kill_region("bj")
    answer = control.switch([MOVED], "bj")
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "switch_refused"
    assert "bj" in answer.json()["message"]
    assert control.rule() == before, "a refused switch published a rule"
    op = control.operation(answer.json()["operation"])
    assert op["state"] == "refused"
    assert [e["step"] for e in op["log"]] == ["precheck", "precheck"]
    for region in ("hz", "sh"):
        assert health(cluster.config, region)["banned"] == []
    # The CLI says the same and exits 1.
    refused = unitrade(path, "switch", "--cell", MOVED, "--to", "bj")
    assert refused.returncode == 1
    assert "switch_refused" in refused.stdout


def test_control_plane_killed_before_publish_rolls_back(
    running_on: tuple[LocalCluster, Path], control_on: Control
) -> None:
    control = control_on
    cluster, path = running_on
    config = cluster.config
    with_product(config, "SKU-X")
    op_id = switch_paused_at(cluster, control, "catch_up", "hz")
    cluster.kill_region(CONTROL_NAME)

    # The cell is banned and the control plane is gone: regions keep serving under the rule
    # they have; a write to the banned cell is held, then refused with 503 and Retry-After.
    api = Api(config)
    api.http.timeout = httpx.Timeout(30.0)
    buyer = buyers_of_cell(config, 3, 1)[0]
    started = time.monotonic()
    held = api.call("bj", "PUT", "/v1/cart/items/SKU-X", buyer, {"qty": 1})
    assert held.status_code == 503, held.text
    assert held.json()["error"] == "write_banned"
    assert held.headers["retry-after"] == "1"
    # Held for the hold time (2 s), not refused at once; the upper end is the 503 itself,
    # which came before the client's 30 s timeout.
    assert time.monotonic() - started >= 1.8
    other = buyers_of_cell(config, 4, 1)[0]
    assert api.call("bj", "PUT", "/v1/cart/items/SKU-X", other, {"qty": 1}).status_code == 200

    cluster.start_control()
    cluster.wait_healthy([CONTROL_NAME])
    op = control.operation(op_id, wait_s=30)
    assert op["state"] == "rolled_back", op
    assert "restarted" in op["error"]
    assert current_owners(config)[MOVED] == "sh"
    wait_rule_everywhere(config, op["detail"]["unban_version"])
    for region in config.region_names:
        assert health(config, region)["banned"] == []
    assert api.call("bj", "PUT", "/v1/cart/items/SKU-X", buyer, {"qty": 2}).status_code == 200
    api.http.close()
    log = unitrade(path, "operations", op_id)
    assert log.returncode == 0 and "rollback" in log.stdout


def test_control_plane_killed_after_publish_finishes_the_switch(
    running_on: tuple[LocalCluster, Path], control_on: Control
) -> None:
    control = control_on
    cluster, _ = running_on
    config = cluster.config
    with_product(config, "SKU-X")
    op_id = switch_paused_at(cluster, control, "verify", "hz")
    cluster.kill_region(CONTROL_NAME)
    cluster.start_control()
    cluster.wait_healthy([CONTROL_NAME])
    op = control.operation(op_id, wait_s=30)
    assert op["state"] == "done", op
    assert current_owners(config)[MOVED] == "hz"
    api = Api(config)
    buyer = buyers_of_cell(config, 3, 1)[0]
    answer = api.call("bj", "PUT", "/v1/cart/items/SKU-X", buyer, {"qty": 1})
    assert answer.status_code == 200
    assert answer.headers["x-unitrade-region"] == "hz"
    api.http.close()


def test_abort_rolls_back_and_regions_keep_the_newest_rule(
    running: tuple[LocalCluster, Path], control: Control
) -> None:
    cluster, path = running
    config = cluster.config
    op_id = switch_paused_at(cluster, control, "catch_up", "bj")
    aborted = unitrade(path, "switch", "--abort", op_id)
    assert aborted.returncode == 1, aborted.stdout + aborted.stderr
    assert "rolled_back" in aborted.stdout
    op = control.operation(op_id)
    assert op["state"] == "rolled_back" and op["error"] == "aborted by the operator"
    version = control.rule()["version"]
    assert version == 3  # 2 banned the cell, 3 lifted the ban
    wait_rule_everywhere(config, version)
    # A region restarted while the control plane is down comes back under the newest rule
    # it acknowledged, not the configuration's version 1.
    cluster.kill_region(CONTROL_NAME)
    cluster.kill_region("sh")
    cluster.start_region("sh")
    cluster.wait_healthy(["sh"])
    assert health(config, "sh")["rule_version"] == version
    status = unitrade(path, "status")
    assert status.returncode == 1  # the control plane is down
    assert status.stdout.splitlines()[-1] == "down: the control plane"
    assert f"(owners: rule {version}, from " in status.stdout


def test_evacuate_a_region_and_move_the_center_cell(
    running: tuple[LocalCluster, Path], control: Control
) -> None:
    cluster, path = running
    config = cluster.config
    with_product(config, "EV-1")
    evacuated = unitrade(path, "evacuate", "--region", "bj", "--to", "sh")
    assert evacuated.returncode == 0, evacuated.stdout + evacuated.stderr
    assert "total ms" in evacuated.stdout and "done" in evacuated.stdout
    owners = current_owners(config)
    assert owners["u5"] == owners["u6"] == "sh"
    assert health(config, "bj")["owned_cells"] == []
    api = Api(config)
    buyer = buyers_of_cell(config, 5, 1)[0]
    created = api.order("bj", buyer, [("EV-1", 1)])
    assert created.status_code == 201, created.text
    assert created.headers["x-unitrade-region"] == "sh"

    # The center cell (inventory) moves like any other: center calls follow the rule.
    op = control.switch_and_wait(["center"], "sh")
    assert op["state"] == "done"
    assert current_owners(config)["center"] == "sh"
    second = api.order("hz", buyers_of_cell(config, 1, 1)[0], [("EV-1", 2)])
    assert second.status_code == 201, second.text
    levels = api.levels("EV-1")
    assert (levels["available"], levels["reserved"]) == (97, 3)
    api.http.close()
    wait_converged(config)
    diff = unitrade(path, "diff")
    assert diff.returncode == 0, diff.stdout


def test_a_control_store_behind_the_regions_refuses_operations(
    running: tuple[LocalCluster, Path], control: Control
) -> None:
    cluster, _ = running
    control.switch_and_wait([MOVED], "hz")
    cluster.kill_region(CONTROL_NAME)
    for leftover in (cluster.data_dir / "control").glob("control.db*"):
        leftover.unlink()  # the store is lost; a new one starts at version 1
    cluster.start_control()
    cluster.wait_healthy([CONTROL_NAME])
    deadline = time.monotonic() + 15
    while not httpx.get(cluster.config.control.base_url + "/healthz").json()["ahead"]:
        assert time.monotonic() < deadline, "the control plane never saw the regions ahead"
        time.sleep(0.05)
    refused = control.switch([MOVED], "sh")
    assert refused.status_code == 409, refused.text
    assert "control store is behind" in refused.json()["message"]
    assert current_owners(cluster.config)[MOVED] == "hz"  # nothing was built on stale owners
