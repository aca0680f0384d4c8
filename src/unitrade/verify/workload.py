"""The workloads, run together through every gateway: buyers homed to every cell create,
pay, close and refund orders with idempotency keys and read their own orders and others'
(orders, payments, isolation); a poller reads the stock levels (bank). Every request is an
invoke line and a completion line of the history."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import initial_rule, route_buyer
from unitrade.verify.history import FAIL, INFO, OK, History
from unitrade.web.tokens import issue_token

REQUEST_TIMEOUT_S = 10.0
BUYERS_PER_CELL = 4
STOCK = 1_000_000
SKUS = ("VF-A", "VF-B", "VF-C")
# verify's buyers: IDs from 2^61 up, below the health checker's (2^62 up), so that a run
# attached to a shop's cluster never writes in a real buyer's name.
BUYER_ID_MIN = 2**61
BUYER_ID_SPAN = 2**40
POLL_S = 0.25  # the stock poller's period
ORDERS_KEPT = 200  # a worker's open orders it may still move on (a bound)
ESSENTIALS = ("order_id", "buyer_id", "status", "total_cents", "payment_id", "cell", "error")
INVENTORY = ("available", "reserved", "sold")
NEMESIS = -1
POLLER = 1000
CHECKER = 2000


def attached_skus() -> tuple[str, ...]:
    """Products of a run's own, for a run attached to a cluster that holds other data (and
    maybe another run's): named apart by a random tag."""
    tag = secrets.token_hex(3)
    return tuple(f"{sku}-{tag}" for sku in SKUS)


def wall_ms() -> int:
    return int(time.time() * 1000)


def classify(status: int) -> str:
    """A 2xx is done; a 504 (outcome_unknown) or a 500 may have been written; any other
    answer is a refusal."""
    if 200 <= status < 300:
        return OK
    if status in (500, 504):
        return INFO
    return FAIL


@dataclass
class Buyer:
    buyer_id: int
    cell: int
    headers: dict[str, str]


@dataclass
class Orders:
    """What one worker knows of its orders: order_id -> (buyer, status it believes)."""

    open: dict[str, tuple[Buyer, str, int]] = field(default_factory=dict)


class Client:
    """Requests that are recorded in the history."""

    def __init__(
        self,
        config: TopologyConfig,
        history: History,
        http: httpx.AsyncClient,
        skus: tuple[str, ...] = SKUS,
    ) -> None:
        self.config = config
        self.history = history
        self.http = http
        self.skus = skus  # the run's own products: a run attached to a cluster adds its own
        self.admin = {"authorization": "Bearer " + issue_token(config.token_keys, admin=True)}

    async def call(
        self,
        process: int,
        f: str,
        region: str,
        method: str,
        path: str,
        headers: dict[str, str],
        value: dict[str, Any],
        body: Any = None,
    ) -> tuple[str, dict[str, Any]]:
        invoke_value = {**value, "wall_ms": wall_ms()}
        self.history.add("invoke", process, f, region, invoke_value)
        url = self.config.region(region).base_url + path
        try:
            answer = await self.http.request(method, url, json=body, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Never sent: certainly not done.
            self.history.add(FAIL, process, f, region, {"wall_ms": wall_ms()}, error=_name(exc))
            return FAIL, {}
        except httpx.HTTPError as exc:
            self.history.add(INFO, process, f, region, {"wall_ms": wall_ms()}, error=_name(exc))
            return INFO, {}
        try:
            raw = answer.json()
        except ValueError:
            raw = {}
        got = {k: raw[k] for k in ESSENTIALS if isinstance(raw, dict) and k in raw}
        if f == "inventory" and isinstance(raw, dict):
            got.update({k: raw[k] for k in INVENTORY if k in raw})
        served_by = answer.headers.get("x-unitrade-served-by")
        if served_by:
            got["served_by"] = served_by
        got["wall_ms"] = wall_ms()
        kind = classify(answer.status_code)
        error = None if kind == OK else str(got.get("error", answer.status_code))
        self.history.add(kind, process, f, region, got, status=answer.status_code, error=error)
        return kind, got


def _name(exc: Exception) -> str:
    return type(exc).__name__


def buyers_of_every_cell(config: TopologyConfig, seed: int) -> list[Buyer]:
    rule = initial_rule(config)
    rng = random.Random(seed)
    per_cell: dict[int, list[int]] = {}
    wanted = {c.id for c in config.cells if c.buckets}
    while any(len(per_cell.get(c, [])) < BUYERS_PER_CELL for c in wanted):
        buyer = BUYER_ID_MIN + rng.randrange(BUYER_ID_SPAN)
        cell = route_buyer(rule, buyer).cell
        if cell in wanted and len(per_cell.setdefault(cell, [])) < BUYERS_PER_CELL:
            per_cell[cell].append(buyer)
    return [
        Buyer(b, cell, {"authorization": "Bearer " + issue_token(config.token_keys, buyer_id=b)})
        for cell, found in sorted(per_cell.items())
        for b in found
    ]


async def seed_stock(client: Client) -> None:
    """The SKUs with their stock, recorded as stock-set lines, visible in every region."""
    config = client.config
    center = next(r.name for r in config.regions if r.center)
    for n, sku in enumerate(client.skus, 1):
        body = {"title": f"verify product {n}", "price_cents": 100 * n, "stock": STOCK}
        kind, _ = await client.call(
            CHECKER,
            "stock-set",
            center,
            "PUT",
            f"/v1/admin/products/{sku}",
            client.admin,
            {"sku": sku, "stock": STOCK},
            body,
        )
        if kind != OK:
            raise RuntimeError(f"could not set the stock of {sku}")
    deadline = time.monotonic() + 30
    for region in config.region_names:
        for sku in client.skus:
            while (
                await client.http.get(config.region(region).base_url + f"/v1/products/{sku}")
            ).status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{sku} did not reach {region}")
                await asyncio.sleep(0.05)


async def shopper(
    client: Client,
    process: int,
    buyers: list[Buyer],
    others: dict[str, Buyer],
    pause_s: float,
    stop: asyncio.Event,
    seed: int,
) -> None:
    """One worker: an operation at a time, through a random gateway."""
    rng = random.Random(seed * 7919 + process)
    regions = client.config.region_names
    mine = Orders()
    last_key: tuple[Buyer, str, list[dict[str, Any]]] | None = None
    n = 0
    while not stop.is_set():
        n += 1
        region = rng.choice(regions)
        roll = rng.random()
        if roll < 0.35 or not mine.open:
            buyer = rng.choice(buyers)
            key = f"k-{process}-{n}"
            items = [{"sku": rng.choice(client.skus), "qty": rng.randint(1, 3)}]
            if last_key is not None and rng.random() < 0.1:
                buyer, key, items = last_key  # the same request again: the same order
            kind, got = await client.call(
                process,
                "create",
                region,
                "POST",
                "/v1/orders",
                buyer.headers,
                {"buyer": buyer.buyer_id, "cell": buyer.cell, "key": key, "items": items},
                {"items": items, "idempotency_key": key},
            )
            last_key = (buyer, key, items)
            if kind == OK and "order_id" in got:
                mine.open[got["order_id"]] = (buyer, got["status"], got["total_cents"])
                others[got["order_id"]] = buyer
                if len(mine.open) > ORDERS_KEPT:
                    mine.open.pop(next(iter(mine.open)))
        elif roll < 0.8:
            order_id = rng.choice(list(mine.open))
            buyer, status, total = mine.open[order_id]
            value = {"buyer": buyer.buyer_id, "cell": buyer.cell, "order_id": order_id}
            if (status == "created" and rng.random() < 0.7) or (
                status == "paid" and rng.random() < 0.1
            ):
                # Now and then a second payment of a paid order, or the payment of another
                # order: both must be refused.
                payment_id = f"pay-{order_id}" if status == "created" else f"pay2-{order_id}"
                if status == "created" and len(mine.open) > 1 and rng.random() < 0.05:
                    other = rng.choice([o for o in mine.open if o != order_id])
                    payment_id = f"pay-{other}"
                pay = {"payment_id": payment_id, "amount_cents": total}
                kind, got = await client.call(
                    process,
                    "pay",
                    region,
                    "POST",
                    f"/v1/orders/{order_id}/pay",
                    buyer.headers,
                    {**value, **pay},
                    pay,
                )
            elif status == "created":
                kind, got = await client.call(
                    process,
                    "close",
                    region,
                    "POST",
                    f"/v1/orders/{order_id}/close",
                    buyer.headers,
                    value,
                )
            elif status == "paid":
                kind, got = await client.call(
                    process,
                    "refund",
                    region,
                    "POST",
                    f"/v1/orders/{order_id}/refund",
                    buyer.headers,
                    value,
                )
            else:
                mine.open.pop(order_id)
                continue
            if kind == OK and "status" in got:
                mine.open[order_id] = (buyer, got["status"], total)
        elif roll < 0.9:
            # Carts: a buyer's own, by the buyer's token; it must never answer another's.
            buyer = rng.choice(buyers)
            if rng.random() < 0.5:
                sku, qty = rng.choice(client.skus), rng.randint(1, 5)
                await client.call(
                    process,
                    "cart-put",
                    region,
                    "PUT",
                    f"/v1/cart/items/{sku}",
                    buyer.headers,
                    {"buyer": buyer.buyer_id, "cell": buyer.cell, "sku": sku, "qty": qty},
                    {"qty": qty},
                )
            else:
                await client.call(
                    process,
                    "cart-read",
                    region,
                    "GET",
                    "/v1/cart",
                    buyer.headers,
                    {"buyer": buyer.buyer_id},
                )
        else:
            buyer = rng.choice(buyers)
            if others and rng.random() < 0.5:
                order_id = rng.choice(list(others))
                owner = others[order_id]
                f = "read" if owner.buyer_id == buyer.buyer_id else "read-other"
            else:
                f, order_id = "read-other", str(rng.randrange(10**15, 10**16))
            await client.call(
                process,
                f,
                region,
                "GET",
                f"/v1/orders/{order_id}",
                buyer.headers,
                {"buyer": buyer.buyer_id, "order_id": order_id},
            )
        await asyncio.sleep(pause_s * rng.uniform(0.5, 1.5))


async def stock_poller(client: Client, stop: asyncio.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        sku = rng.choice(client.skus)
        await client.call(
            POLLER,
            "inventory",
            rng.choice(client.config.region_names),
            "GET",
            f"/v1/inventory/{sku}",
            client.admin,
            {"sku": sku},
        )
        await asyncio.sleep(POLL_S)


async def final_reads(client: Client, owners: dict[str, Buyer], concurrency: int = 8) -> None:
    """Every order acknowledged (or whose creation's outcome is unknown but got an ID) read
    from every region's own copy, then the stock at the end."""
    jobs = [(o, b, r) for o, b in owners.items() for r in client.config.region_names]
    queue: asyncio.Queue[tuple[str, Buyer, str]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def reader(process: int) -> None:
        while not queue.empty():
            order_id, buyer, region = queue.get_nowait()
            await client.call(
                process,
                "final",
                region,
                "GET",
                f"/v1/orders/{order_id}?consistency=replica",
                buyer.headers,
                {"buyer": buyer.buyer_id, "order_id": order_id},
            )

    await asyncio.gather(*(reader(CHECKER + 1 + n) for n in range(concurrency)))
    for sku in client.skus:
        for region in client.config.region_names:
            await client.call(
                CHECKER,
                "inventory",
                region,
                "GET",
                f"/v1/inventory/{sku}",
                client.admin,
                {"sku": sku},
            )
