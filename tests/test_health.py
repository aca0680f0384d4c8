"""The control plane's health checker (control/health.py): every region and cell probed,
synthetic orders kept out of listings and counts and swept at their owner, a dead or
frozen region and its cells marked down, on a real cluster."""

from __future__ import annotations

import asyncio
import signal
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.storage_support import RULE, make_store
from tests.support import Api, free_ports, topology_toml
from unitrade.cli import main
from unitrade.cluster import LocalCluster
from unitrade.control.health import HealthChecker
from unitrade.services.retention import RetentionSweeper
from unitrade.storage.schema import buyer_orders, order_lines, orders, outbox, reservations
from unitrade.storage.store import WriteTx, now_ms
from unitrade.topology.config import RetentionConfig, TopologyConfig, parse_config
from unitrade.topology.probes import PROBE_BUYER_MIN, PROBE_LINES, PROBE_SKU, probe_buyer
from unitrade.topology.rule import initial_rule, route_buyer
from unitrade.web.tokens import issue_token

CONTROL = """
health_orders = true
health_interval_ms = 500
health_timeout_ms = 400
health_failures_max = 3
"""
RETENTION = """
[retention]
probe_orders_s = 1
sweep_interval_s = 0.5
"""


# -- no cluster ----------------------------------------------------------------------------


def test_probe_buyers_land_in_their_cell_and_the_range_is_reserved() -> None:
    for cell in RULE.unit_cells():
        buyer = probe_buyer(RULE, cell)
        assert buyer is not None and PROBE_BUYER_MIN <= buyer < PROBE_BUYER_MIN + 100
        assert route_buyer(RULE, buyer).cell == cell
    assert probe_buyer(RULE, RULE.center_cell) is None  # no bucket maps to it
    import orjson

    from unitrade.services.inventory import normalize_lines

    # What the center stores for a probe order's reservation is what the sweep looks for.
    assert orjson.dumps(normalize_lines([(PROBE_SKU, 1)])).decode() == PROBE_LINES
    result = CliRunner().invoke(main, ["token", str(PROBE_BUYER_MIN)])
    assert result.exit_code == 2 and "range" in result.output


def test_the_timeout_must_be_below_the_interval() -> None:
    from unitrade.topology.config import ConfigError

    text = topology_toml(free_ports(4), control="health_interval_ms = 500\nhealth_timeout_ms = 500")
    with pytest.raises(ConfigError, match=r"control: health_timeout_ms \(500\) must be below"):
        parse_config(tomllib.loads(text))
    with pytest.raises(ConfigError, match=r"control\.health_failures_max"):
        parse_config(tomllib.loads(topology_toml(free_ports(4), control="health_failures_max = 0")))


def test_the_sweep_deletes_old_probe_orders_and_reservations_only(tmp_path: Path) -> None:
    """At a unit cell's owner every row of an old probe order goes and a buyer's order
    stays; at the center, released probe reservations go once past the reserve guard."""
    url = f"sqlite:///{tmp_path}/{{cell}}.db"
    settings = RetentionConfig(probe_orders_s=10, reserve_window_s=5, sweep_batch_rows=10)

    def order(order_id: int, buyer: int, age_s: int) -> Callable[[WriteTx], None]:
        stamp = now_ms() - age_s * 1000

        def work(tx: WriteTx) -> None:
            row = {
                "order_id": order_id,
                "buyer_id": buyer,
                "cell_id": 1,
                "status": "closed",
                "total_cents": 0,
                "document": "{}",
                "payment_id": None,
                "idempotency_key": None,
                "created_ms": stamp,
                "updated_ms": stamp,
                "version": 2,
            }
            tx.insert(orders, row)
            line = {"order_id": order_id, "line_no": 1, "sku": PROBE_SKU, "qty": 1}
            tx.insert(order_lines, {**line, "price_cents": 0})
            tx.insert(buyer_orders, {"buyer_id": buyer, "created_ms": stamp, "order_id": order_id})
            step = {"order_id": order_id, "step": "release", "status": "done", "attempts": 0}
            tx.insert(outbox, {**step, "created_ms": stamp, "updated_ms": stamp})

        return work

    async def run() -> None:
        unit = make_store(url, 1)
        center = make_store(url, RULE.center_cell)
        await unit.open()
        await center.open()
        try:
            probe = probe_buyer(RULE, 1)
            assert probe is not None
            # 25 old probe orders (several batches), one young, one of a real buyer.
            for n in range(25):
                await unit.write(order(1000 + n, probe, 60))
            await unit.write(order(2000, probe, 0))
            await unit.write(order(3000, 42, 60))

            def reservation(order_id: int, lines: str, age_s: int) -> dict[str, Any]:
                stamp = now_ms() - age_s * 1000
                return {
                    "order_id": order_id,
                    "cell_id": 1,
                    "status": "released",
                    "lines": lines,
                    "created_ms": stamp,
                    "updated_ms": stamp,
                }

            rows = [
                reservation(1, PROBE_LINES, 60),  # goes
                reservation(2, PROBE_LINES, 1),  # a late reserve could still come: kept
                reservation(3, '[["TEA",1]]', 60),  # a buyer's: ordinary retention
            ]

            def insert(tx: WriteTx) -> None:
                for row in rows:
                    tx.insert(reservations, row)

            await center.write(insert)
            copies: Any = {1: unit, RULE.center_cell: center}
            sweep = RetentionSweeper(copies, settings, lambda: [1, RULE.center_cell])
            assert (await sweep.sweep_cell(unit))["probe_orders"] == 25
            left = await unit.read(lambda c: {r.order_id for r in c.execute(orders.select())})
            assert left == {2000, 3000}
            steps = await unit.read(lambda c: {r.order_id for r in c.execute(outbox.select())})
            assert steps == {2000, 3000}
            # The counts: the buyer's outbox step as business, the probe's on its own.
            assert sweep.kept_rows[(1, "outbox")] == 1
            assert sweep.kept_rows[(1, "probe_orders")] == 1
            assert (await sweep.sweep_cell(center))["probe_reservations"] == 1
            kept = await center.read(
                lambda c: {r.order_id for r in c.execute(reservations.select())}
            )
            assert kept == {2, 3}
            assert sweep.kept_rows[(RULE.center_cell, "reservations")] == 1
            assert sweep.kept_rows[(RULE.center_cell, "probe_reservations")] == 1
        finally:
            await unit.close()
            await center.close()

    asyncio.run(run())


# -- a real cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Api]]:
    """A three-region cluster whose control plane probes every 0.5 s with synthetic orders."""
    directory = tmp_path_factory.mktemp("health")
    path = directory / "topology.toml"
    path.write_text(topology_toml(free_ports(4), control=CONTROL) + RETENTION)
    config = parse_config(tomllib.loads(path.read_text()))
    with LocalCluster(config, directory / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            yield cluster, api
        finally:
            api.http.close()


def control_health(config: TopologyConfig) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(config.control.base_url + "/healthz").json()["health"]
    return body


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def states(health: dict[str, Any]) -> dict[str, str]:
    found = {f"region {r}": p["state"] for r, p in health["regions"].items()}
    found.update({f"cell {c}": p["state"] for c, p in health["cells"].items()})
    return found


def all_up_by_orders(config: TopologyConfig) -> bool:
    health = control_health(config)
    cells = health["cells"]
    return set(states(health).values()) == {"up"} and all(
        cells[f"u{n}"]["judged_by"] == "order" for n in range(1, 7)
    )


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


@pytest.mark.cluster
def test_every_region_and_cell_is_up_with_orders_and_shown(
    probed: tuple[LocalCluster, Api],
) -> None:
    cluster, _api = probed
    config = cluster.config
    wait_for("every region and cell up", lambda: all_up_by_orders(config))
    health = control_health(config)
    assert health["probe_sku_ready"] and health["failures_max"] == 3
    assert health["cells"]["u3"]["owner"] == "sh" and health["cells"]["center"]["owner"] == "hz"
    text = httpx.get(config.control.base_url + "/metrics").text
    assert metric(text, "unitrade_region_up", region="bj") == 1
    assert metric(text, "unitrade_cell_up", cell="u5", region="bj") == 1
    assert metric(text, "unitrade_probe_last_good_ms", kind="cell", target="u5") > 0
    result = CliRunner().invoke(main, ["status", "--config", str(cluster.config_path)])
    assert result.exit_code == 0, result.output
    assert "health probes" in result.output
    rows = [line.split() for line in result.output.splitlines()]
    u3 = next(row for row in rows if row[:2] == ["cell", "u3"])
    assert u3[2:5] == ["sh", "order", "up"], u3
    assert float(u3[5].removesuffix("s")) < 5  # seconds since its last good probe


@pytest.mark.cluster
def test_synthetic_orders_stay_out_of_listings_and_counts_and_are_swept(
    probed: tuple[LocalCluster, Api],
) -> None:
    cluster, api = probed
    config = cluster.config
    wait_for("every region and cell up", lambda: all_up_by_orders(config))
    # The probe SKU exists (every probe buys it) but is in no listing.
    assert api.call("hz", "GET", f"/v1/products/{PROBE_SKU}").status_code == 200
    listed = api.call("sh", "GET", "/v1/products?limit=500").json()["products"]
    assert PROBE_SKU not in [p["sku"] for p in listed]
    # A buyer cannot order it, nor put it in a cart.
    refused = api.order("hz", 7, [(PROBE_SKU, 1)])
    assert refused.status_code == 404 and refused.json()["error"] == "unknown_sku"
    carted = api.call("hz", "PUT", f"/v1/cart/items/{PROBE_SKU}", 7, {"qty": 1})
    assert carted.status_code == 404
    # Counts of business rows leave the probes out; theirs are labelled. Every unit cell
    # has had probe orders, and only probe orders: their outbox steps count for nothing.
    rule = initial_rule(config)
    for region in config.region_names:
        text = httpx.get(config.region(region).base_url + "/metrics").text
        owned = [rule.cells[c].name for c in rule.cells_owned_by(region)]
        units = [name for name in owned if name.startswith("u")]
        for cell in units:
            assert metric(text, "unitrade_retained_rows", cell=cell, table="outbox") == 0

    def swept() -> bool:
        texts = [httpx.get(r.base_url + "/metrics").text for r in config.regions]
        deleted = "unitrade_retention_deleted_rows_total"
        return all(metric(t, deleted, table="probe_orders") > 0 for t in texts)

    wait_for("probe orders swept in every region", swept)
    # What the probe buyer of u3 still has at its owner is recent: older ones are gone.
    buyer = probe_buyer(rule, 3)
    assert buyer is not None
    headers = {"authorization": "Bearer " + issue_token(config.token_keys, buyer_id=buyer)}
    page = httpx.get(config.region("sh").base_url + "/v1/orders?limit=100", headers=headers)
    assert page.status_code == 200, page.text
    ages_s = [(now_ms() - o["created_ms"]) / 1000 for o in page.json()["orders"]]
    # probe_orders_s = 1 and a sweep every 0.5 s: a few seconds at most, loaded machine.
    assert len(ages_s) < 30 and max(ages_s, default=0) < 10, ages_s
    # The stock comes back: every probe order is closed (a close that got no answer is
    # made again), never paid; at most one per unit cell is in flight.
    made = control_health(config)["cells"]["u1"]["probes"] * 6
    wait_for("probe stock back", lambda: api.levels(PROBE_SKU)["reserved"] <= 6)
    levels = api.levels(PROBE_SKU)
    assert made >= 30 and levels["sold"] == 0, (made, levels)
    assert levels["available"] + levels["reserved"] == 1_000_000


@pytest.mark.cluster
def test_a_frozen_region_is_down_without_holding_up_the_others(
    probed: tuple[LocalCluster, Api],
) -> None:
    cluster, _api = probed
    config = cluster.config
    wait_for("every region and cell up", lambda: all_up_by_orders(config))
    before = control_health(config)
    process = cluster.processes["sh"]
    process.send_signal(signal.SIGSTOP)
    try:
        wait_for("sh down", lambda: control_health(config)["regions"]["sh"]["state"] == "down")
        health = control_health(config)
        # The probes of hz went on at the usual pace while sh's hung.
        rounds = health["rounds"] - before["rounds"]
        assert rounds >= 3
        assert health["regions"]["hz"]["last_good_ms"] >= health["last_round_ms"] - 1000
        assert health["regions"]["sh"]["failures"] >= 3
        assert "region sh" in health["regions"]["sh"]["last_error"]
        wait_for("sh's cells down", lambda: _down(config) >= {"u3", "u4"})
        assert not _down(config) & {"u1", "u2", "center", "global"}
    finally:
        process.send_signal(signal.SIGCONT)
    wait_for("sh and its cells up again", lambda: all_up_by_orders(config))


def _down(config: TopologyConfig) -> set[str]:
    cells = control_health(config)["cells"]
    return {name for name, probed in cells.items() if probed["state"] == "down"}


@pytest.mark.cluster
def test_a_killed_region_turns_down_once_with_its_cells(
    probed: tuple[LocalCluster, Api],
) -> None:
    """Last: it kills a region of the module's cluster. An in-process checker (the one the
    control plane runs) shows the interface the failover workflow calls."""
    cluster, _api = probed
    config = cluster.config
    wait_for("every region and cell up", lambda: all_up_by_orders(config))
    turned_down: list[str] = []

    async def scenario() -> None:
        checker = HealthChecker(config, lambda: initial_rule(config))

        async def hook(region: str) -> None:
            turned_down.append(region)

        checker.on_region_down = hook
        checker.start()
        try:
            deadline = time.monotonic() + 30
            while not (checker.rounds and checker.regions["bj"].state == "up"):
                assert time.monotonic() < deadline, checker.status()
                await asyncio.sleep(0.05)
            positions, at_ms = checker.last_positions("bj") or ({}, 0)
            assert set(positions) >= {"u5", "u6", "center"} and at_ms > 0
            assert not checker.region_down("bj") and not checker.cell_down(5)
            killed_ms = now_ms()
            await asyncio.to_thread(cluster.kill_region, "bj")
            deadline = time.monotonic() + 30
            while not (checker.cell_down(5) and checker.cell_down(6)):
                assert time.monotonic() < deadline, checker.status()
                await asyncio.sleep(0.05)
            assert checker.region_down("bj") and not checker.region_down("hz")
            assert not checker.cell_down(1) and not checker.cell_down(RULE.center_cell)
            # The positions are those of bj's last answer, before it died.
            last = checker.last_positions("bj")
            assert last is not None and last[1] <= killed_ms + 1000
            status = checker.status()
            assert status["regions"]["bj"]["failures"] >= 3
            assert status["cells"]["u5"]["last_error"].startswith("region bj:")
            more = checker.rounds + 3
            while checker.rounds < more:  # more failed rounds: still one call
                assert time.monotonic() < deadline, checker.status()
                await asyncio.sleep(0.05)
        finally:
            await checker.stop()

    asyncio.run(scenario())
    assert turned_down == ["bj"]
    # The control plane's own checker agrees, and says so in every place it shows health.
    wait_for("bj down at the control plane", lambda: _down(config) >= {"u5", "u6"})
    assert control_health(config)["regions"]["bj"]["state"] == "down"
    text = httpx.get(config.control.base_url + "/metrics").text
    assert metric(text, "unitrade_region_up", region="bj") == 0
    assert metric(text, "unitrade_cell_up", cell="u6", region="bj") == 0
    assert metric(text, "unitrade_region_up", region="hz") == 1
    result = CliRunner().invoke(main, ["status", "--config", str(cluster.config_path)])
    assert result.exit_code == 1
    assert "cell u5 (probes)" in result.output.splitlines()[-1]
