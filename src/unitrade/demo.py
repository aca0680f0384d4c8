"""`unitrade demo`: a three-region cluster taking orders from many buyers through random
regions, with a switchover of a cell to another region and back while they shop; then a
check that no acknowledged order was lost, that every order is where its ID says, that
stock is conserved and that every copy of every cell equals its owner's. Then a flash sale
(demo_sale.py): buyers of every region rush a few dozen units with sale tokens. It ends
with a region killed while its buyers shop, failed over, brought back and reconciled
(demo_failover.py), and the same checks again."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from unitrade import demo_failover, demo_sale
from unitrade.cluster import LocalCluster
from unitrade.replication.diff_cli import run_diff
from unitrade.topology.config import TopologyConfig
from unitrade.topology.order_id import decode_order_id
from unitrade.topology.rule import initial_rule
from unitrade.web.tokens import issue_token

console = Console()
REQUEST_TIMEOUT_S = 30.0
WAIT_S_MAX = 30.0
SWITCHED_CELL = "u3"


class DemoFailed(RuntimeError):
    """The cluster did not do what the demo waits for, within its bound."""


@dataclass
class Tally:
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # order_id -> order
    direct: int = 0
    forwarded: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    def note(self, response: httpx.Response, gateway: str) -> None:
        served_by = response.headers.get("x-unitrade-served-by")
        if served_by == gateway:
            self.direct += 1
        else:
            self.forwarded += 1
        if response.status_code >= 400:
            self.errors[response.json().get("error", str(response.status_code))] += 1


def run_demo(
    config: TopologyConfig,
    config_path: Path | None,
    data_dir: Path,
    buyers: int,
    skus: int,
    stock: int,
    concurrency: int,
) -> bool:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    cluster = LocalCluster(config, data_dir.resolve(), config_path)
    with console.status("starting regions..."):
        cluster.start()
    try:
        # A region that crashes under the load is started again (and said so), as in `up`.
        cluster.supervise(on_event=lambda message, _loud: console.print(f"supervisor: {message}"))
        return asyncio.run(_workload(config, cluster, buyers, skus, stock, concurrency))
    finally:
        with console.status("stopping regions..."):
            cluster.stop()


async def _workload(
    config: TopologyConfig,
    cluster: LocalCluster,
    buyers: int,
    sku_count: int,
    stock: int,
    concurrency: int,
) -> bool:
    rng = random.Random(7)
    urls = {r.name: r.base_url for r in config.regions}
    admin = {"authorization": "Bearer " + issue_token(config.token_keys, admin=True)}
    tally = Tally()
    skus = [f"SKU-{i:04d}" for i in range(1, sku_count + 1)]
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(
        timeout=REQUEST_TIMEOUT_S, limits=limits, verify=config.http_verify
    ) as http:
        for i, sku in enumerate(skus):
            region = rng.choice(list(urls))
            body = {"title": f"Product {i + 1}", "price_cents": 100 * (i + 1), "stock": stock}
            response = await http.put(
                f"{urls[region]}/v1/admin/products/{sku}", json=body, headers=admin
            )
            response.raise_for_status()
        await _wait_catalog(http, urls, admin, skus)
        console.print(f"seeded {len(skus)} products, {stock} units each, via random regions")

        semaphore = asyncio.Semaphore(concurrency)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("buyers shopping", total=buyers)

            async def one(buyer: int) -> None:
                async with semaphore:
                    await _buyer(http, urls, config, buyer, skus, random.Random(buyer), tally)
                progress.advance(task)

            # Buyer IDs spread over the ID space, as real ones are, so every bucket is used.
            buyer_ids = rng.sample(range(1, 10**9), buyers)
            shopping = asyncio.gather(*(one(b) for b in buyer_ids))
            switched = await _switch_while_shopping(http, config, admin, shopping)
            await shopping
        reported = await _report(http, config, urls, admin, skus, stock, tally)
        sold = await demo_sale.act(http, config, admin, console)
        # The last act: a region dies, is failed over, comes back and is reconciled.
        survived = await demo_failover.act(http, config, cluster, admin, console)
        return reported and switched and sold and survived


async def _switch_while_shopping(
    http: httpx.AsyncClient,
    config: TopologyConfig,
    admin: dict[str, str],
    shopping: asyncio.Future[Any],
) -> bool:
    """Move a cell to another region and back while the buyers shop (a planned switchover
    under load); print what each switch took. True when both switched."""
    base = config.control.base_url
    home = next(c.owner for c in config.cells if c.name == SWITCHED_CELL)
    away = next(r for r in config.region_names if r != home)
    ok = True
    for target in (away, home):
        await asyncio.sleep(0.5)
        if shopping.done():
            console.print("[yellow]the buyers finished before the switch; skipped[/]")
            return True
        answer = await http.post(
            f"{base}/v1/switch", json={"cells": [SWITCHED_CELL], "to": target}, headers=admin
        )
        if answer.status_code != 202:
            console.print(f"[red]switch of {SWITCHED_CELL} to {target} refused: {answer.text}[/]")
            ok = False
            continue
        op_id = answer.json()["id"]
        op = (await http.get(f"{base}/v1/operations/{op_id}?wait_s=30", headers=admin)).json()
        detail = op["detail"]
        console.print(
            f"switchover {op_id}: {SWITCHED_CELL} to {target} under load: {op['state']} in "
            f"{detail.get('total_ms')} ms (writes to it held {detail.get('banned_ms')} ms; "
            f"final positions {detail.get('final_positions')})"
        )
        ok = ok and op["state"] == "done"
    return ok


async def _wait_catalog(
    http: httpx.AsyncClient, urls: dict[str, str], admin: dict[str, str], skus: list[str]
) -> None:
    """Products are written at the global cell's owner and read from each region's copy:
    wait until replication has brought them everywhere (bounded)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S_MAX
    for url in urls.values():
        while True:
            listed = await http.get(f"{url}/v1/products?limit=500", headers=admin)
            if {p["sku"] for p in listed.json()["products"]} >= set(skus):
                break
            if asyncio.get_running_loop().time() > deadline:
                raise DemoFailed(f"the catalog did not reach {url} in {WAIT_S_MAX} s")
            await asyncio.sleep(0.05)


async def _converged(http: httpx.AsyncClient, urls: dict[str, str]) -> dict[str, int]:
    """Wait until every region's copy of every cell has its owner's position."""
    deadline = asyncio.get_running_loop().time() + WAIT_S_MAX
    while True:
        health = {r: (await http.get(f"{u}/healthz")).json() for r, u in urls.items()}
        heads = {
            cell: health[owner]["positions"][cell]
            for cell, owner in next(iter(health.values()))["owners"].items()
        }
        if all(h["positions"] == heads for h in health.values()):
            return heads
        if asyncio.get_running_loop().time() > deadline:
            raise DemoFailed(f"copies did not converge in {WAIT_S_MAX} s")
        await asyncio.sleep(0.1)


async def _buyer(
    http: httpx.AsyncClient,
    urls: dict[str, str],
    config: TopologyConfig,
    buyer: int,
    skus: list[str],
    rng: random.Random,
    tally: Tally,
) -> None:
    headers = {"authorization": "Bearer " + issue_token(config.token_keys, buyer_id=buyer)}

    async def call(method: str, path: str, body: Any = None) -> httpx.Response:
        gateway = rng.choice(list(urls))
        response = await http.request(method, urls[gateway] + path, json=body, headers=headers)
        tally.note(response, gateway)
        return response

    for n in range(rng.randint(1, 3)):
        items = [{"sku": s, "qty": rng.randint(1, 2)} for s in rng.sample(skus, rng.randint(1, 3))]
        if rng.random() < 0.3:
            for item in items:
                await call("PUT", f"/v1/cart/items/{item['sku']}", {"qty": item["qty"]})
            response = await call("POST", "/v1/cart/checkout", {"idempotency_key": f"co-{n}"})
        else:
            response = await call(
                "POST", "/v1/orders", {"items": items, "idempotency_key": f"o-{n}"}
            )
        if response.status_code != 201:
            continue
        order = response.json()
        roll = rng.random()
        if roll < 0.6:
            pay = {"payment_id": f"pay-{order['order_id']}", "amount_cents": order["total_cents"]}
            paid = await call("POST", f"/v1/orders/{order['order_id']}/pay", pay)
            order = paid.json() if paid.status_code == 200 else order
            if paid.status_code == 200 and rng.random() < 0.1:
                refunded = await call("POST", f"/v1/orders/{order['order_id']}/refund")
                order = refunded.json() if refunded.status_code == 200 else order
        elif roll < 0.8:
            closed = await call("POST", f"/v1/orders/{order['order_id']}/close")
            order = closed.json() if closed.status_code == 200 else order
        tally.orders[order["order_id"]] = order


async def _report(
    http: httpx.AsyncClient,
    config: TopologyConfig,
    urls: dict[str, str],
    admin: dict[str, str],
    skus: list[str],
    stock: int,
    tally: Tally,
) -> bool:
    rule = initial_rule(config)
    region = next(iter(urls))
    owners = (await http.get(f"{urls[region]}/healthz")).json()["owners"]
    per_cell: Counter[str] = Counter()
    per_region: Counter[str] = Counter()
    expected_reserved: Counter[str] = Counter()
    expected_sold: Counter[str] = Counter()
    for order in tally.orders.values():
        cell = decode_order_id(int(order["order_id"])).cell
        assert cell == order["cell"], "the order ID carries the order's cell"
        per_cell[rule.cells[cell].name] += 1
        per_region[owners[rule.cells[cell].name]] += 1
        tally.statuses[order["status"]] += 1
        for item in order["items"]:
            if order["status"] == "created":
                expected_reserved[item["sku"]] += item["qty"]
            elif order["status"] == "paid":
                expected_sold[item["sku"]] += item["qty"]

    table = Table(title="orders per cell")
    for column in ("cell", "owner region", "orders"):
        table.add_column(column)
    for cell in rule.unit_cells():
        name = rule.cells[cell].name
        table.add_row(name, owners[name], str(per_cell[name]))
    console.print(table)
    console.print("orders per region: " + ", ".join(f"{r} {per_region[r]}" for r in urls))
    console.print("order states: " + ", ".join(f"{s} {n}" for s, n in tally.statuses.items()))
    console.print(
        f"requests: {tally.direct} served by the region called, "
        f"{tally.forwarded} forwarded to the owner region"
    )
    if tally.errors:
        console.print("refused: " + ", ".join(f"{e} {n}" for e, n in tally.errors.items()))

    lost = await _lost_orders(http, config, urls, tally)
    console.print(
        f"no acknowledged order lost: {'[green]yes[/]' if not lost else '[red]NO[/]'} "
        f"(all {len(tally.orders)} read back from every region in their last acknowledged "
        f"state{'' if not lost else '; missing or different: ' + ', '.join(lost[:5])})"
    )
    conserved = True
    for sku in skus:
        levels = (await http.get(f"{urls[region]}/v1/inventory/{sku}", headers=admin)).json()
        total = levels["available"] + levels["reserved"] + levels["sold"]
        if (
            total != stock
            or levels["reserved"] != expected_reserved[sku]
            or levels["sold"] != expected_sold[sku]
            or levels["available"] < 0
        ):
            conserved = False
            console.print(
                f"[red]{sku}: {levels} but expected reserved "
                f"{expected_reserved[sku]} sold {expected_sold[sku]} total {stock}[/]"
            )
    all_cells = len(per_cell) == len(rule.unit_cells())
    heads = await _converged(http, urls)
    console.print(
        f"replication: every region's copy of all {len(heads)} cells is at its owner's "
        f"position ({sum(heads.values())} changelog rows in all); comparing row by row:"
    )
    left, not_compared = await asyncio.to_thread(
        run_diff, config, list(config.cells), 1000, False, console
    )
    identical = left == 0 and not not_compared
    console.print(
        f"every copy of every cell identical to its owner's: "
        f"{'[green]yes[/]' if identical else '[red]NO[/]'}"
    )
    console.print(
        f"stock conserved: {'[green]yes[/]' if conserved else '[red]NO[/]'} "
        f"(available + reserved + sold = {stock} for all {len(skus)} SKUs; reserved and sold "
        "match the open and paid orders)"
    )
    console.print(f"orders in every unit cell: {'[green]yes[/]' if all_cells else '[red]no[/]'}")
    return conserved and all_cells and identical and tally.forwarded > 0 and not lost


async def _lost_orders(
    http: httpx.AsyncClient, config: TopologyConfig, urls: dict[str, str], tally: Tally
) -> list[str]:
    """Acknowledged orders that a region cannot read back in their last acknowledged state
    (from its own copy, once the copies have converged)."""
    await _converged(http, urls)
    lost: list[str] = []
    for order_id, order in tally.orders.items():
        token = issue_token(config.token_keys, buyer_id=order["buyer_id"])
        for region, url in urls.items():
            got = await http.get(
                f"{url}/v1/orders/{order_id}?consistency=replica",
                headers={"authorization": f"Bearer {token}"},
            )
            if got.status_code != 200 or got.json()["status"] != order["status"]:
                lost.append(f"{order_id}@{region}")
    return lost
