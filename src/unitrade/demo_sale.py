"""`unitrade demo`, the flash sale: a few hundred buyers of every region rush a sale of a
few dozen units through random gateways: each asks for a sale token, orders the SKU with
it and pays. Then the demo prints the tokens issued and refused, the orders and the units
sold, and where every token of the sale is (`unitrade sale show`)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import httpx
from rich.console import Console

from unitrade.topology.config import TopologyConfig
from unitrade.web.tokens import issue_token

SALE_SKU = "FLASH-PHONE"
SALE_PRICE_CENTS = 99_900
SALE_STOCK = 30
SALE_TOKENS = 120  # 4x the units: the stock service sees at most this many orders
SALE_BUYERS = 200
SALE_SEGMENT = 20
CONCURRENCY = 32
RETRIES_MAX = 10


async def act(
    http: httpx.AsyncClient, config: TopologyConfig, admin: dict[str, str], console: Console
) -> bool:
    console.rule("a flash sale")
    urls = [r.base_url for r in config.regions]
    rng = random.Random(12)
    put = await http.put(
        f"{urls[0]}/v1/admin/products/{SALE_SKU}",
        json={"title": "a phone, flash sale", "price_cents": SALE_PRICE_CENTS, "stock": 0},
        headers=admin,
    )
    put.raise_for_status()
    start = int(time.time() * 1000)
    created = await http.post(
        f"{rng.choice(urls)}/v1/admin/sales",
        json={
            "sku": SALE_SKU,
            "stock": SALE_STOCK,
            "tokens": SALE_TOKENS,
            "per_buyer": 1,
            "start_ms": start,
            "end_ms": start + 600_000,
            "segment_size": SALE_SEGMENT,
        },
        headers=admin,
    )
    created.raise_for_status()
    sale_id = created.json()["sale_id"]
    console.print(
        f"sale {sale_id}: {SALE_STOCK} units of {SALE_SKU} for {SALE_TOKENS} tokens, one per "
        f"buyer, handed to the regions in segments of {SALE_SEGMENT}; {SALE_BUYERS} buyers rush"
    )
    seen: Counter[str] = Counter()
    semaphore = asyncio.Semaphore(CONCURRENCY)
    began = time.monotonic()

    async def buyer(buyer_id: int) -> None:
        headers = {"authorization": "Bearer " + issue_token(config.token_keys, buyer_id=buyer_id)}

        async def call(method: str, path: str, body: Any = None) -> httpx.Response:
            """As a client would: a request refused for now (429, or 503: nothing was
            written) is sent again after its Retry-After, a few times."""
            for _ in range(RETRIES_MAX):
                answer = await http.request(
                    method, rng.choice(urls) + path, json=body, headers=headers
                )
                if answer.status_code not in (429, 503):
                    return answer
                seen[f"retried after {answer.json().get('error', answer.status_code)}"] += 1
                await asyncio.sleep(min(float(answer.headers.get("retry-after", 1)), 1.0))
            return answer

        async with semaphore:
            token = await call("POST", f"/v1/sales/{sale_id}/tokens")
            if token.status_code != 201:
                seen[f"token {token.json().get('error', token.status_code)}"] += 1
                return
            seen["token issued"] += 1
            body = {"items": [{"sku": SALE_SKU, "qty": 1}], "sale_token": token.json()["token"]}
            order = await call("POST", "/v1/orders", body)
            if order.status_code != 201:
                seen[f"order {order.json().get('error', order.status_code)}"] += 1
                return
            seen["order placed"] += 1
            order_id = order.json()["order_id"]
            pay = {"payment_id": f"flash-{order_id}", "amount_cents": SALE_PRICE_CENTS}
            paid = await call("POST", f"/v1/orders/{order_id}/pay", pay)
            seen["paid" if paid.status_code == 200 else f"pay {paid.status_code}"] += 1

    buyers = rng.sample(range(1, 10**9), SALE_BUYERS)
    await asyncio.gather(*(buyer(b) for b in buyers))
    took_s = time.monotonic() - began
    shown = (await http.get(f"{urls[0]}/v1/admin/sales/{sale_id}", headers=admin)).json()
    levels = shown["levels"]
    done = ("token issued", "order placed", "paid")
    refused = ", ".join(
        f"{k} {n}" for k, n in sorted(seen.items()) if k not in done and "retried" not in k
    )
    retried = ", ".join(f"{k} {n}" for k, n in sorted(seen.items()) if "retried" in k)
    console.print(
        f"in {took_s:.1f} s: tokens issued {seen['token issued']} (of {SALE_TOKENS}); "
        f"orders placed {seen['order placed']}, paid {seen['paid']}; units sold "
        f"{levels['sold']} of {SALE_STOCK} (reserved {levels['reserved']}, available "
        f"{levels['available']})",
        soft_wrap=True,
    )
    console.print(f"refused: {refused or 'none'}", soft_wrap=True)
    if retried:
        console.print(f"sent again (flow control refused them for now): {retried}", soft_wrap=True)
    held = ", ".join(f"{r} {n}" for r, n in sorted(shown["unissued_by_region"].items()))
    console.print(
        f"tokens: remaining at the center {shown['remaining']}, issued {shown['issued']} "
        f"({shown['used']} used), unissued in the regions' segments {shown['unissued_in_segments']}"
        + (f" ({held})" if held else "")
        + f", lost {shown['lost']}: every token accounted for: "
        + ("[green]yes[/]" if shown["balanced"] else "[red]NO[/]"),
        soft_wrap=True,
    )
    oversold = levels["sold"] + levels["reserved"] > SALE_STOCK
    placed_sold = seen["order placed"] == levels["sold"]
    console.print(
        f"no unit oversold: {'[red]NO[/]' if oversold else '[green]yes[/]'}; orders placed = "
        f"units sold: {'[green]yes[/]' if placed_sold else '[red]no[/]'}",
        soft_wrap=True,
    )
    return (
        not oversold
        and shown["balanced"]
        and seen["order placed"] == levels["sold"] == seen["paid"]
        and seen["token issued"] <= SALE_TOKENS
    )
