"""Failover of a dead region (issue 10): write leases, the failover workflow, the loss
report, and the returning region's quarantine, on real processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.replication_support import current_owners, wait_converged
from tests.support import Api
from tests.switch_support import Acked, Control, Load, buyers_of_cell
from tests.test_switchover import start_cluster, unitrade
from unitrade.cluster import LocalCluster
from unitrade.topology.config import CONTROL_NAME, TopologyConfig

STOCK = 1_000_000
SKUS = ["FO-A", "FO-B"]


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def running_on(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[LocalCluster, Path]]:
    yield from start_cluster(tmp_path, request.param)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path]]:
    yield from start_cluster(tmp_path, "sqlite")


@pytest.fixture
def closing() -> Iterator[list[Api]]:
    """Clients to close after the test, whatever its outcome."""
    made: list[Api] = []
    yield made
    for api in made:
        api.http.close()


def wait_down(control: Control, region: str, timeout_s: float = 30.0) -> None:
    """Until the control plane's health checker has marked `region` down (the failover's
    pre-check asks it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = control.http.get("/healthz").json().get("health", {})
        if health.get("regions", {}).get(region, {}).get("state") == "down":
            return
        assert time.monotonic() < deadline, f"{region} never marked down: {health}"
        time.sleep(0.1)


def failover(control: Control, region: str, **extra: Any) -> httpx.Response:
    if not extra.pop("healthy", False):
        wait_down(control, region)
    return control.http.post("/v1/failover", json={"region": region, **extra})


def failover_and_wait(control: Control, region: str, **extra: Any) -> dict[str, Any]:
    answer = failover(control, region, **extra)
    assert answer.status_code == 202, answer.text
    op = control.operation(answer.json()["id"], wait_s=45)
    assert op["state"] == "done", op
    return op


def quarantined(config: TopologyConfig, region: str) -> list[dict[str, Any]]:
    """The returning region's quarantine, through its signed internal API (as the CLI)."""
    from unitrade.gateway.quarantine_routes import LIST_PATH
    from unitrade.replication.diff_cli import cluster_regions

    with cluster_regions(config) as regions:
        answer = regions.call(region, LIST_PATH, {"limit": 1000}, region)
    entries: list[dict[str, Any]] = answer["entries"]
    return entries


def wait_quarantine_settled(config: TopologyConfig, region: str, timeout_s: float = 30.0) -> None:
    """Until the returning region has checked its copies and rebuilt them (converged)."""
    wait_converged(config, timeout_s)


def order_state(api: Api, gateway: str, acked: Acked) -> tuple[int, str | None]:
    answer = api.call(gateway, "GET", f"/v1/orders/{acked.order_id}", acked.buyer)
    status = answer.json().get("status") if answer.status_code == 200 else None
    return answer.status_code, status


def assert_stock_conserved(api: Api, gateway: str) -> None:
    for sku in SKUS:
        answer = api.call(gateway, "GET", f"/v1/inventory/{sku}")
        assert answer.status_code == 200, answer.text
        levels = answer.json()
        assert levels["available"] + levels["reserved"] + levels["sold"] == STOCK, levels
        assert min(levels["available"], levels["reserved"], levels["sold"]) >= 0, levels


def kill_under_load(cluster: LocalCluster, lost: str, load: Load, lost_buyers: list[int]) -> float:
    """kill -9 `lost` while its buyers' orders are being acknowledged; the kill's time."""
    load.wait_acked(lost_buyers, 30)
    cluster.kill_region(lost)
    killed = time.monotonic()
    # The fault struck mid-flight: orders of the lost region's buyers were being
    # acknowledged right up to the kill.
    with load._lock:
        recent = [a for a in load.acked if a.buyer in set(lost_buyers)]
    assert recent, "no order of the lost region's buyers before the kill"
    return killed


def order_past_an_open_breaker(
    api: Api, gateway: str, buyer: int, items: list[tuple[str, int]], timeout_s: float = 15.0
) -> httpx.Response:
    """An order sent again, as a client would, while the gateway answers `circuit_open`
    (nothing was sent; Retry-After says when to try again). A breaker that stays open
    still fails the caller's assertion once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = api.order(gateway, buyer, items)
        refused = answer.status_code == 503 and answer.json().get("error") == "circuit_open"
        if not refused or time.monotonic() > deadline:
            return answer
        time.sleep(float(answer.headers.get("retry-after", "1")))


def test_a_killed_unit_region_is_failed_over_and_nothing_acknowledged_is_lost_silently(
    running_on: tuple[LocalCluster, Path], closing: list[Api]
) -> None:
    cluster, path = running_on
    config = cluster.config
    api = Api(config)
    closing.append(api)
    for sku in SKUS:
        api.put_product(sku, STOCK)
    lost = "sh"
    lost_buyers = buyers_of_cell(config, 3, 6) + buyers_of_cell(config, 4, 6)
    other_buyers = buyers_of_cell(config, 1, 4) + buyers_of_cell(config, 5, 4)
    with Control(config) as control:
        control.wait_connected()
        load = Load(config, lost_buyers + other_buyers, SKUS, threads=4, gateways=["hz", "bj"])
        load.start()
        try:
            killed = kill_under_load(cluster, lost, load, lost_buyers)
            started = time.monotonic()
            op = failover_and_wait(control, lost)
            took_s = time.monotonic() - started
            # Its buyers' writes succeed again, through the survivors' gateways.
            load.wait_acked(lost_buyers, 20)
            recovered = time.monotonic()
        finally:
            load.stop()
        report = op["detail"]["loss_report"]
        assert {c["cell"] for c in report["cells"]} == {"u3", "u4"}
        assert all(c["to"] in ("hz", "bj") for c in report["cells"])
        owners = current_owners(config)
        assert owners["u3"] != lost and owners["u4"] != lost
        assert took_s < 20, f"failover took {took_s:.1f} s"
        assert recovered - killed < 60
        # No other region's buyer saw an error after the failover ended.
        assert_stock_conserved(api, "hz")

        # Every acknowledged order is readable from the survivors with its last
        # acknowledged state, or it is one of the lost region's changes past the promotion.
        missing: list[Acked] = []  # not at the new owner at all
        unpaid: list[Acked] = []  # there, but its acknowledged payment is not
        for acked in load.acked:
            status, state = order_state(api, "hz", acked)
            if status == 404:
                missing.append(acked)
                continue
            assert status == 200, (status, acked)
            if acked.paid and state != "paid":
                assert state == "created", (acked, state)
                unpaid.append(acked)

        # The lost region comes back: it learns the rule, quarantines its divergent tail
        # and is rebuilt from the new owners.
        cluster.start_region(lost)
        cluster.wait_healthy([lost])
        wait_quarantine_settled(config, lost)
        entries = quarantined(config, lost)
        orders_held = {
            str(e["key"]["order_id"])
            for e in entries
            if e["table"] == "orders" and e["op"] != "delete"
        }
        for acked in missing:
            assert acked.order_id in orders_held, f"order {acked.order_id} lost without a trace"
        payments_held = {
            str(e["key"]["order_id"])
            for e in entries
            if e["table"] == "orders" and "paid" in e["what"]
        }
        for acked in unpaid:
            assert acked.order_id in payments_held, f"payment of {acked.order_id} lost"
        assert all(e["state"] == "held" for e in entries)
        assert {e["cell"] for e in entries} <= {"u3", "u4"}
        # It writes nothing for the cells it lost: its buyers are served by the new owners.
        buyer = lost_buyers[0]
        created = api.order(lost, buyer, [(SKUS[0], 1)])
        assert created.status_code == 201, created.text
        diff = unitrade(path, "diff")
        assert diff.returncode == 0, diff.stdout + diff.stderr
        # It takes a cell back by a planned switch, and writes it again.
        control.wait_connected()
        control.switch_and_wait(["u3"], lost)
        buyer = buyers_of_cell(config, 3, 1)[0]
        # hz's breaker of forwarding to sh may still be open from the kill, or again from
        # calls of its own since (it opened once in CI, with the machine busy).
        back = order_past_an_open_breaker(api, "hz", buyer, [(SKUS[0], 1)])
        assert back.status_code == 201, back.text
        assert back.headers["x-unitrade-served-by"] == lost


def test_a_failover_of_a_healthy_region_is_refused(
    running: tuple[LocalCluster, Path],
) -> None:
    cluster, path = running
    config = cluster.config
    with Control(config) as control:
        control.wait_connected()
        answer = failover(control, "sh", healthy=True)
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"] == "failover_refused"
        assert "not agreed to be down" in answer.json()["message"]
        assert current_owners(config)["u3"] == "sh"
        refused = unitrade(path, "failover", "--region", "sh")
        assert refused.returncode == 1
        assert "failover_refused" in refused.stdout


def test_a_killed_center_region_is_failed_over_and_orders_go_on(
    running_on: tuple[LocalCluster, Path], closing: list[Api]
) -> None:
    cluster, _path = running_on
    config = cluster.config
    api = Api(config)
    closing.append(api)
    for sku in SKUS:
        api.put_product(sku, STOCK)
    lost = "hz"
    lost_buyers = buyers_of_cell(config, 1, 4) + buyers_of_cell(config, 2, 4)
    other_buyers = buyers_of_cell(config, 3, 4) + buyers_of_cell(config, 5, 4)
    with Control(config) as control:
        control.wait_connected()
        load = Load(config, lost_buyers + other_buyers, SKUS, threads=4, gateways=["sh", "bj"])
        load.start()
        try:
            kill_under_load(cluster, lost, load, lost_buyers)
            op = failover_and_wait(control, lost, to=["sh", "bj"])
            load.wait_acked(lost_buyers + other_buyers, 40)
        finally:
            load.stop()
        owners = current_owners_from(config, "sh")
        assert owners["center"] in ("sh", "bj") and owners["global"] in ("sh", "bj"), owners
        assert {c["cell"] for c in op["detail"]["loss_report"]["cells"]} == {
            "u1",
            "u2",
            "center",
            "global",
        }
        # Stock conserved at the new owner of the center cell: the reservations of orders
        # the lost center took past its promotion are in its quarantine, not in the count.
        assert_stock_conserved(api, "sh")
        # Catalog writes go to the new owner of the global cell.
        body = {"title": "new", "price_cents": 99, "stock": 10}
        written = api.call("bj", "PUT", "/v1/admin/products/FO-NEW", body=body)
        assert written.status_code == 200, written.text
        deadline = time.monotonic() + 10
        while api.call("sh", "GET", "/v1/products/FO-NEW").status_code != 200:
            assert time.monotonic() < deadline, "the new product never reached sh"
            time.sleep(0.05)


def current_owners_from(config: TopologyConfig, region: str) -> dict[str, str]:
    body = httpx.get(config.region(region).base_url + "/healthz", timeout=5).json()
    return {str(c): str(o) for c, o in body["owners"].items()}


def test_the_control_plane_killed_during_a_failover_resumes_it(
    running: tuple[LocalCluster, Path],
) -> None:
    cluster, _path = running
    config = cluster.config
    with Control(config) as control:
        control.wait_connected()
        cluster.kill_region("bj")
        cluster.kill_region(CONTROL_NAME)
        cluster.start_control(env={"UNITRADE_CONTROL_PAUSE": "expire:30"})
        cluster.wait_healthy([CONTROL_NAME])
        control.wait_connected_except("bj")
        answer = failover(control, "bj")
        assert answer.status_code == 202, answer.text
        op_id = answer.json()["id"]
        control.wait_step(op_id, "expire")
        cluster.kill_region(CONTROL_NAME)  # mid-failover: the block is recorded, nothing else
        cluster.start_control()
        cluster.wait_healthy([CONTROL_NAME])
        op = control.operation(op_id, wait_s=45)
        assert op["state"] == "done", op
        owners = current_owners_from(config, "hz")
        assert owners["u5"] != "bj" and owners["u6"] != "bj"


def test_a_forced_failover_of_a_serving_region_is_recorded_and_loses_nothing(
    running: tuple[LocalCluster, Path], closing: list[Api]
) -> None:
    """`force` overrides the agreement check (the region answers): the region is blocked
    from leases at once, stops writing at its next renewal, and its cells move with every
    acknowledged order kept; the operation records that it was forced."""
    cluster, _path = running
    config = cluster.config
    api = Api(config)
    closing.append(api)
    for sku in SKUS:
        api.put_product(sku, STOCK)
    moved = buyers_of_cell(config, 3, 4) + buyers_of_cell(config, 4, 4)
    others = buyers_of_cell(config, 1, 4) + buyers_of_cell(config, 5, 4)
    with Control(config) as control:
        control.wait_connected()
        load = Load(config, moved + others, SKUS, threads=4)  # sh's own gateway too
        load.start()
        try:
            load.wait_acked(moved, 20)
            refused = failover(control, "sh", healthy=True)
            assert refused.status_code == 409, refused.text
            op = failover_and_wait(control, "sh", healthy=True, force=True)
            load.wait_acked(moved, 20)
        finally:
            load.stop()
        assert op["detail"]["forced"] is True
        assert op["detail"]["agreement"]["control_plane"] == "up"
        owners = current_owners(config)
        assert owners["u3"] != "sh" and owners["u4"] != "sh", owners
        # The region answered throughout: it learned the new rule, wrote nothing after its
        # lease was refused, and every order it acknowledged is at the new owners.
        for acked in load.acked:
            status, state = order_state(api, "hz", acked)
            assert status == 200, (status, acked)
            if acked.paid:
                assert state == "paid", (acked, state)
        wait_converged(config)
        assert quarantined(config, "sh") == []
        assert_stock_conserved(api, "hz")


def test_with_auto_failover_a_killed_region_is_failed_over_by_the_health_checker(
    tmp_path: Path, closing: list[Api]
) -> None:
    """`[control] auto_failover = true`: nobody runs `unitrade failover`; the health checker
    sees the region down and starts it, once (failover_interval_s)."""
    import tomllib

    from tests.support import free_ports, topology_toml
    from unitrade.topology.config import parse_config

    text = topology_toml(free_ports(4), control="auto_failover = true\nfailover_interval_s = 600")
    path = tmp_path / "topology.toml"
    path.write_text(text)
    config = parse_config(tomllib.loads(text))
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        closing.append(api)
        api.put_product(SKUS[0], STOCK)
        buyer = buyers_of_cell(config, 5, 1)[0]  # u5, owned by bj
        with Control(config) as control:
            control.wait_connected()
            assert api.order("hz", buyer, [(SKUS[0], 1)]).status_code == 201
            cluster.kill_region("bj")
            deadline = time.monotonic() + 30
            while True:
                listed = control.http.get("/v1/operations").json()["operations"]
                done = [o for o in listed if o["kind"] == "failover" and o["state"] == "done"]
                if done:
                    break
                assert time.monotonic() < deadline, f"no automatic failover: {listed}"
                time.sleep(0.1)
            (op,) = done
            assert op["detail"]["started_by"] == "health checker"
            assert current_owners_from(config, "hz")["u5"] != "bj"
            created = api.order("hz", buyer, [(SKUS[0], 1)])
            assert created.status_code == 201, created.text
            # One failover, not one per probe round.
            time.sleep(2.0)
            listed = control.http.get("/v1/operations").json()["operations"]
            assert [o["kind"] for o in listed].count("failover") == 1
