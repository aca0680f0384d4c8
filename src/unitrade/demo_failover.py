"""The last act of `unitrade demo`: a region dies while its buyers shop, is failed over, comes
back and is reconciled; then the same checks as before (no acknowledged order lost, stock
conserved, every copy identical to its owner's)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console

from unitrade.cluster import LocalCluster
from unitrade.control.reconcile import Item, Reconcile
from unitrade.replication.diff_cli import cluster_regions, run_diff
from unitrade.replication.routes import FAULTS_ENV, REFUSE_PULLS
from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.topology.rule import initial_rule, route_buyer
from unitrade.web.tokens import issue_token

DOWN_WAIT_S = 30.0  # until the health checker marks the killed region down
FAILOVER_WAIT_S = 45.0
RETURN_WAIT_S = 60.0
SHOP_BEFORE_S = 1.5  # the buyers shop this long before the kill
SHOP_AFTER_S = 2.0  # and this long after the failover
ACT_STOCK = 1_000_000


class ActFailed(RuntimeError):
    """The cluster did not do what this act waits for, within its bound."""


@dataclass
class Shopping:
    """Orders of the lost region's buyers, acknowledged (and paid) through the surviving
    gateways."""

    acked: dict[str, dict[str, Any]] = field(default_factory=dict)  # order_id -> last answer
    refused: Counter[str] = field(default_factory=Counter)
    acked_after_failover: int = 0
    failed_over: bool = False
    # Orders whose payment got no answer (504 outcome_unknown, or the connection broke
    # after the request left): paid or not, both are right.
    pay_unknown: set[str] = field(default_factory=set)


def lost_region(config: TopologyConfig) -> str:
    """The region the act kills: one that owns unit cells and not the center."""
    center = next(c.owner for c in config.cells if c.kind is CellKind.CENTER)
    return next(r for r in config.region_names if r != center)


async def act(
    http: httpx.AsyncClient,
    config: TopologyConfig,
    cluster: LocalCluster,
    admin: dict[str, str],
    console: Console,
) -> bool:
    lost = lost_region(config)
    survivors = [r for r in config.region_names if r != lost]
    rule = initial_rule(config)
    rng = random.Random(11)
    buyers = [b for b in rng.sample(range(1, 10**9), 4000) if route_buyer(rule, b).region == lost]
    console.rule(f"a region dies: {lost}")
    skus = await _seed(http, config, admin)
    stock = ACT_STOCK
    # What a region acknowledged just before it died usually reached the others already
    # (replication lags by milliseconds): to show the loss report and the quarantine at
    # work, the lost region first runs with its outgoing replication cut, as behind a
    # partition, so that what it acknowledges then exists only in its own copies.
    cluster.stop_region(lost, keep_down=True)
    cluster.start_region(lost, env={FAULTS_ENV: REFUSE_PULLS})
    cluster.wait_healthy([lost])
    console.print(
        f"{lost} restarted with its outgoing replication cut ({FAULTS_ENV}=refuse_pulls, a "
        "fault the demo injects): what it acknowledges now exists only in its copies"
    )
    shopping = Shopping()
    stop = asyncio.Event()
    shoppers = [
        asyncio.create_task(_shop(http, config, survivors, buyers, skus, shopping, stop, n))
        for n in range(8)
    ]
    try:
        await asyncio.sleep(SHOP_BEFORE_S)
        before = len(shopping.acked)
        cluster.stop_region(lost, kill=True, keep_down=True)
        killed = time.monotonic()
        console.print(
            f"killed {lost} (kill -9) while its buyers shop through {', '.join(survivors)} "
            f"({before} of their orders acknowledged so far)"
        )
        await _wait_down(http, config, lost)
        console.print(
            f"the control plane's health checker marks {lost} down after "
            f"{time.monotonic() - killed:.1f} s"
        )
        op = await _failover(http, config, admin, lost)
        shopping.failed_over = True
        await asyncio.sleep(SHOP_AFTER_S)
    finally:
        stop.set()
        await asyncio.gather(*shoppers)
    _print_failover(console, op, killed)
    console.print(
        f"{lost}'s buyers ordered again at the new owners: {shopping.acked_after_failover} "
        f"orders after the failover; refused while it was down: "
        + (", ".join(f"{e} {n}" for e, n in shopping.refused.items()) or "none")
    )
    cluster.start_region(lost)  # without the fault
    cluster.wait_healthy([lost])
    await _converged(http, config)
    items = await asyncio.to_thread(_reconcile, config, lost)
    reported = _print_reconcile(console, lost, op, items)
    lost_orders = await _unreadable(http, config, shopping)
    console.print(
        f"no acknowledged order lost: {'[green]yes[/]' if not lost_orders else '[red]NO[/]'} "
        f"(all {len(shopping.acked)} orders of {lost}'s buyers read back at their owners"
        + ("" if not lost_orders else "; missing: " + ", ".join(lost_orders[:5]))
        + ")"
    )
    conserved = await _stock_conserved(http, config, admin, skus, stock, console)
    await _converged(http, config)
    left, not_compared = await asyncio.to_thread(
        run_diff, config, list(config.cells), 1000, False, console
    )
    identical = left == 0 and not not_compared
    console.print(
        f"every copy of every cell identical to its owner's after {lost} came back: "
        f"{'[green]yes[/]' if identical else '[red]NO[/]'}"
    )
    return (
        op["state"] == "done"
        and reported
        and not lost_orders
        and conserved
        and identical
        and shopping.acked_after_failover > 0
    )


async def _seed(
    http: httpx.AsyncClient, config: TopologyConfig, admin: dict[str, str]
) -> list[str]:
    """Products of this act, with stock enough for every order it sends, visible in every
    region before the buyers start."""
    skus = [f"ACT-{i}" for i in range(1, 4)]
    url = config.regions[0].base_url
    for i, sku in enumerate(skus, 1):
        body = {"title": f"act product {i}", "price_cents": 500 * i, "stock": ACT_STOCK}
        answer = await http.put(f"{url}/v1/admin/products/{sku}", json=body, headers=admin)
        if answer.status_code != 200:
            raise ActFailed(f"seeding {sku}: {answer.status_code} {answer.text}")
    deadline = time.monotonic() + RETURN_WAIT_S
    for region in config.regions:
        for sku in skus:
            while (await http.get(f"{region.base_url}/v1/products/{sku}")).status_code != 200:
                if time.monotonic() > deadline:
                    raise ActFailed(f"{sku} did not reach {region.name}")
                await asyncio.sleep(0.05)
    return skus


async def _shop(
    http: httpx.AsyncClient,
    config: TopologyConfig,
    gateways: list[str],
    buyers: list[int],
    skus: list[str],
    shopping: Shopping,
    stop: asyncio.Event,
    seed: int,
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        buyer = rng.choice(buyers)
        headers = {"authorization": "Bearer " + issue_token(config.token_keys, buyer_id=buyer)}
        url = config.region(rng.choice(gateways)).base_url
        items = [{"sku": rng.choice(skus), "qty": 1}]
        failed_over = shopping.failed_over
        try:
            answer = await http.post(f"{url}/v1/orders", json={"items": items}, headers=headers)
        except httpx.HTTPError as exc:
            shopping.refused[type(exc).__name__] += 1
            continue
        if answer.status_code != 201:
            shopping.refused[str(answer.json().get("error", answer.status_code))] += 1
            await asyncio.sleep(0.05)
            continue
        order = answer.json()
        shopping.acked[order["order_id"]] = order
        if failed_over:
            shopping.acked_after_failover += 1
        if rng.random() < 0.5:
            pay = {"payment_id": f"pay-{order['order_id']}", "amount_cents": order["total_cents"]}
            try:
                with_pay = await http.post(
                    f"{url}/v1/orders/{order['order_id']}/pay", json=pay, headers=headers
                )
            except httpx.HTTPError as exc:
                shopping.refused[f"pay {type(exc).__name__}"] += 1
                shopping.pay_unknown.add(order["order_id"])
                continue
            if with_pay.status_code == 200:
                shopping.acked[order["order_id"]] = with_pay.json()
            else:
                code = str(with_pay.json().get("error", with_pay.status_code))
                shopping.refused[f"pay {code}"] += 1
                if with_pay.status_code == 504:
                    shopping.pay_unknown.add(order["order_id"])


async def _wait_down(http: httpx.AsyncClient, config: TopologyConfig, region: str) -> None:
    deadline = time.monotonic() + DOWN_WAIT_S
    while time.monotonic() < deadline:
        health = (await http.get(config.control.base_url + "/healthz")).json().get("health", {})
        if health.get("regions", {}).get(region, {}).get("state") == "down":
            return
        await asyncio.sleep(0.1)
    raise ActFailed(f"the health checker did not mark {region} down in {DOWN_WAIT_S:.0f} s")


async def _failover(
    http: httpx.AsyncClient, config: TopologyConfig, admin: dict[str, str], region: str
) -> dict[str, Any]:
    base = config.control.base_url
    answer = await http.post(f"{base}/v1/failover", json={"region": region}, headers=admin)
    if answer.status_code != 202:
        raise ActFailed(f"failover of {region} refused: {answer.text}")
    op_id = answer.json()["id"]
    deadline = time.monotonic() + FAILOVER_WAIT_S
    while time.monotonic() < deadline:
        op: dict[str, Any] = (
            await http.get(f"{base}/v1/operations/{op_id}?wait_s=10", headers=admin)
        ).json()
        if op["state"] != "running":
            return op
    raise ActFailed(f"failover {op_id} did not end in {FAILOVER_WAIT_S:.0f} s")


def _print_failover(console: Console, op: dict[str, Any], killed: float) -> None:
    detail = op["detail"]
    steps = ", ".join(
        f"{step} {detail.get(f'{step}_ms')} ms"
        for step in ("precheck", "expire", "ban", "promote", "publish")
        if detail.get(f"{step}_ms") is not None
    )
    console.print(f"failover {op['id']}: {op['state']} in {detail.get('total_ms')} ms ({steps})")
    report = detail.get("loss_report", {})
    for cell in report.get("cells", []):
        console.print(
            f"  loss report: cell {cell['cell']} now owned by {cell['to']}, promoted at "
            f"position {cell['promoted_position']}; the lost region was known to have reached "
            f"{cell['known_position']}: at least {cell['missing_at_least']} changes missing"
        )


def _reconcile(config: TopologyConfig, region: str) -> list[Item]:
    with cluster_regions(config) as regions:
        owners, answering = regions.survey()
        return Reconcile(regions, region, owners, answering, dry_run=False).run()


def _print_reconcile(console: Console, region: str, op: dict[str, Any], items: list[Item]) -> bool:
    """What the quarantine held and what became of it; False if something is left held."""
    rows = sum(len(item.changes) for item in items)
    orders = [item for item in items if item.kind == "order"]
    console.print(
        f"{region} came back: it learned the rule before serving and moved {rows} changes it "
        f"had made past the promotion into its quarantine ({len(orders)} orders among them); "
        "reconciled at the new owners:"
    )
    fates = Counter(item.state for item in orders)
    console.print(
        "  orders in the loss report: "
        + (", ".join(f"{state} {n}" for state, n in sorted(fates.items())) or "none")
    )
    for item in orders[:5]:
        console.print(f"  {item.name}: {item.state}, {item.status or '-'} at its owner now")
    if len(orders) > 5:
        console.print(f"  ... and {len(orders) - 5} more (`unitrade quarantine list`)")
    others = Counter(f"{item.kind} {item.state}" for item in items if item.kind != "order")
    if others:
        console.print(
            "  other changes: " + ", ".join(f"{k} {n}" for k, n in sorted(others.items()))
        )
    return all(item.state != "error" for item in items)


async def _converged(http: httpx.AsyncClient, config: TopologyConfig) -> None:
    urls = {r.name: r.base_url for r in config.regions}
    deadline = time.monotonic() + RETURN_WAIT_S
    while time.monotonic() < deadline:
        health = {r: (await http.get(f"{u}/healthz")).json() for r, u in urls.items()}
        owners = next(iter(health.values()))["owners"]
        heads = {cell: health[owner]["positions"][cell] for cell, owner in owners.items()}
        if all(h["positions"] == heads for h in health.values()):
            return
        await asyncio.sleep(0.2)
    raise ActFailed(f"copies did not converge in {RETURN_WAIT_S:.0f} s")


async def _unreadable(
    http: httpx.AsyncClient, config: TopologyConfig, shopping: Shopping
) -> list[str]:
    """Acknowledged orders not readable at their owner in their last acknowledged state
    (or, for one whose payment was in the lost tail and conflicted, at least present)."""
    missing: list[str] = []
    url = config.regions[0].base_url
    for order_id, order in shopping.acked.items():
        token = issue_token(config.token_keys, buyer_id=order["buyer_id"])
        got = await http.get(
            f"{url}/v1/orders/{order_id}", headers={"authorization": f"Bearer {token}"}
        )
        if got.status_code != 200:
            missing.append(f"{order_id} (HTTP {got.status_code})")
        elif got.json()["status"] != order["status"] and not (
            order_id in shopping.pay_unknown and got.json()["status"] == "paid"
        ):
            missing.append(f"{order_id} ({got.json()['status']}, acknowledged {order['status']})")
    return missing


async def _stock_conserved(
    http: httpx.AsyncClient,
    config: TopologyConfig,
    admin: dict[str, str],
    skus: list[str],
    stock: int,
    console: Console,
) -> bool:
    url = config.regions[0].base_url
    ok = True
    for sku in skus:
        levels = (await http.get(f"{url}/v1/inventory/{sku}", headers=admin)).json()
        total = levels["available"] + levels["reserved"] + levels["sold"]
        if total != stock or min(levels["available"], levels["reserved"], levels["sold"]) < 0:
            ok = False
            console.print(f"[red]{sku}: {levels}, total {total} != {stock}[/]")
    console.print(
        f"stock conserved after the failover and the reconcile: "
        f"{'[green]yes[/]' if ok else '[red]NO[/]'} (available + reserved + sold = {stock} "
        f"for all {len(skus)} SKUs)"
    )
    return ok
