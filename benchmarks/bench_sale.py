"""Flash-sale benchmark (run on demand, not in CI): a rush of buyers for a few units.

    .venv/bin/python -m benchmarks.bench_sale [--buyers 20000] [--units 5000]
        [--tokens N] [--segment 100] [--concurrency 256] [--json PATH]

On a cluster of its own (the default topology on SQLite, free ports): one product, and a
sale of `--units` units of it for `--tokens` tokens (default: twice the units), one per
buyer, handed to the regions in segments of `--segment`. Then `--buyers` buyers, spread
over all three regions, each rush once through a gateway chosen at random (most requests
are forwarded once to the buyer's home region, as from a client that does not know it):
ask for a token; with a token, order one unit with it; with an order, pay it. A closed
loop of `--concurrency` requests at once, over keep-alive connections.

A request refused for now (429 rate_limited, 503 overloaded: flow control; nothing was
written) is sent again after 0.5 s, at most 10 times, as a client would; every answer
counts. Measured: token requests per second (from the first token request sent to the
last token answer) and their latency (p50/p99/max) by outcome, the same for orders and payments,
and each process's CPU. Checked at the end, through the admin API: orders placed = units
sold = `--units` (when tokens >= units), no unit oversold (reserved + sold <= units), no
buyer with more than one token, no more than `--tokens` issued, and every token
accounted for (`unitrade sale show`: remaining + issued + unissued in segments + lost =
tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from benchmarks.harness import (
    BenchError,
    Pool,
    busy_before_run,
    error_code,
    free_ports,
    http_request,
    run_bounded,
    run_header,
    source_info,
    write_topology,
)
from benchmarks.load import cpu_between, cpu_snapshot, pct, r3, seed_products
from unitrade.cluster import LocalCluster
from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import initial_rule, route_buyer
from unitrade.web.tokens import issue_token

SKU = "flash-sale-1"
REQUEST_TIMEOUT_S = 30.0
SALE_LENGTH_MS = 3_600_000
SETTLE_TIMEOUT_S = 40.0  # segments are given back within their TTL (10 s)
RETRIES_MAX = 10
RETRY_PAUSE_S = 0.5


@dataclass
class Answer:
    kind: str  # token | order | pay
    region: str  # the buyer's home region
    sent: float
    latency_s: float
    status: int  # 0: no answer
    code: str


def buyers_everywhere(config: TopologyConfig, count: int, seed: int) -> list[tuple[int, str]]:
    """`count` buyer IDs spread over the ID space (so over every bucket), with their home."""
    rule = initial_rule(config)
    rng = random.Random(seed)
    return [(b, route_buyer(rule, b).region) for b in rng.sample(range(1, 10**12), count)]


async def rush(
    config: TopologyConfig,
    sale_id: str,
    buyers: list[tuple[int, str]],
    concurrency: int,
    seed: int,
) -> list[Answer]:
    """Every buyer: token, order with it, pay; `concurrency` requests in flight at most."""
    ports = [config.region(r).port for r in config.region_names]
    rng = random.Random(seed)
    pool = Pool()
    answers: list[Answer] = []
    queue = list(buyers)

    async def send(kind: str, region: str, request_of: Any) -> tuple[int, bytes]:
        """One request, sent again (after a pause) while flow control refuses it for now:
        a 429 or 503 wrote nothing, and clients retry them. Every answer is recorded."""
        for _ in range(RETRIES_MAX):
            status, body = await send_once(kind, region, request_of)
            if status not in (429, 503):
                break
            await asyncio.sleep(RETRY_PAUSE_S)
        return status, body

    async def send_once(kind: str, region: str, request_of: Any) -> tuple[int, bytes]:
        port = rng.choice(ports)
        connection = pool.take(port)
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                reply = await connection.send(request_of(port))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, BenchError) as exc:
            failed = type(exc).__name__
            answers.append(Answer(kind, region, sent, time.perf_counter() - sent, 0, failed))
            return 0, b""
        pool.give(connection)
        code = "" if reply.status < 300 else error_code(reply.body)
        answers.append(Answer(kind, region, sent, time.perf_counter() - sent, reply.status, code))
        return reply.status, reply.body

    async def one(buyer: int, region: str) -> None:
        token = issue_token(config.token_keys, buyer_id=buyer)
        path = f"/v1/sales/{sale_id}/tokens"
        status, body = await send("token", region, lambda p: http_request("POST", path, p, token))
        if status != 201:
            return
        order = orjson.dumps(
            {"items": [{"sku": SKU, "qty": 1}], "sale_token": orjson.loads(body)["token"]}
        )
        status, body = await send(
            "order", region, lambda p: http_request("POST", "/v1/orders", p, token, order)
        )
        if status != 201:
            return
        placed = orjson.loads(body)
        order_id = placed["order_id"]
        pay = orjson.dumps(
            {"payment_id": f"bench-{order_id}", "amount_cents": placed["total_cents"]}
        )
        target = f"/v1/orders/{order_id}/pay"
        await send("pay", region, lambda p: http_request("POST", target, p, token, pay))

    async def worker() -> None:
        while queue:
            buyer, region = queue.pop()
            await one(buyer, region)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        pool.close()
    return answers


def figures_of(answers: list[Answer], kind: str) -> dict[str, Any]:
    mine = [a for a in answers if a.kind == kind]
    if not mine:
        return {"requests": 0}
    first = min(a.sent for a in mine)
    last = max(a.sent + a.latency_s for a in mine)
    by_outcome: dict[str, list[float]] = {}
    for a in mine:
        outcome = "ok" if 200 <= a.status < 300 else (a.code or str(a.status))
        by_outcome.setdefault(outcome, []).append(a.latency_s * 1000)
    return {
        "requests": len(mine),
        "per_s": round(len(mine) / max(last - first, 1e-9), 1),
        "window_s": round(last - first, 3),
        "p50_ms": r3(pct([a.latency_s * 1000 for a in mine], 0.5)),
        "p99_ms": r3(pct([a.latency_s * 1000 for a in mine], 0.99)),
        "outcomes": {
            outcome: {
                "count": len(ms),
                "p50_ms": r3(pct(ms, 0.5)),
                "p99_ms": r3(pct(ms, 0.99)),
                "max_ms": r3(max(ms)),
            }
            for outcome, ms in sorted(by_outcome.items())
        },
    }


async def create_sale(config: TopologyConfig, args: argparse.Namespace) -> str:
    admin = {"authorization": "Bearer " + issue_token(config.token_keys, admin=True)}
    start = int(time.time() * 1000)
    body = {
        "sku": SKU,
        "stock": args.units,
        "tokens": args.tokens,
        "per_buyer": 1,
        "start_ms": start,
        "end_ms": start + SALE_LENGTH_MS,
        "segment_size": args.segment,
    }
    async with httpx.AsyncClient(timeout=10.0, headers=admin) as client:
        url = config.regions[1].base_url + "/v1/admin/sales"  # forwarded to the center
        answer = await client.post(url, json=body)
        if answer.status_code != 201:
            raise BenchError(f"sale not created: {answer.status_code} {answer.text[:300]}")
        return str(answer.json()["sale_id"])


async def settled(config: TopologyConfig, sale_id: str) -> dict[str, Any]:
    """The sale's accounting once no region holds a segment and the copies caught up."""
    admin = {"authorization": "Bearer " + issue_token(config.token_keys, admin=True)}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    async with httpx.AsyncClient(timeout=10.0, headers=admin) as client:
        while True:
            url = config.regions[0].base_url + f"/v1/admin/sales/{sale_id}"
            shown: dict[str, Any] = (await client.get(url)).json()
            if (shown["segments"]["open"] == 0 and shown["balanced"]) or (
                time.monotonic() > deadline
            ):
                return shown
            await asyncio.sleep(0.5)


async def one_run(
    args: argparse.Namespace, config: TopologyConfig, cluster: LocalCluster
) -> dict[str, Any]:
    await seed_products(config, [SKU], 0)
    sale_id = await create_sale(config, args)
    buyers = buyers_everywhere(config, args.buyers, args.seed)
    pids = {name: process.pid for name, process in cluster.processes.items()}
    before = cpu_snapshot(pids)
    answers = await rush(config, sale_id, buyers, args.concurrency, args.seed)
    cores, busy = cpu_between(before, cpu_snapshot(pids))
    shown = await settled(config, sale_id)
    levels = shown["levels"]
    ok = Counter(a.kind for a in answers if 200 <= a.status < 300)
    tokens_by_region = Counter(a.region for a in answers if a.kind == "token" and a.status == 201)
    checks = {
        "orders_placed_eq_units_sold": ok["order"] == levels["sold"],
        "units_sold_eq_units": levels["sold"] == min(args.units, args.tokens),
        "no_oversell": levels["sold"] + levels["reserved"] <= args.units,
        "tokens_issued_le_tokens": shown["issued"] <= args.tokens,
        "tokens_issued_eq_answers": shown["issued"] == ok["token"],
        "every_token_accounted_for": bool(shown["balanced"]),
    }
    return {
        "sale_id": sale_id,
        "buyers": args.buyers,
        "units": args.units,
        "tokens": args.tokens,
        "segment": args.segment,
        "concurrency": args.concurrency,
        "token": figures_of(answers, "token"),
        "order": figures_of(answers, "order"),
        "pay": figures_of(answers, "pay"),
        "tokens_issued_by_home_region": dict(tokens_by_region),
        "levels": levels,
        "accounting": {
            k: shown[k]
            for k in (
                "remaining",
                "issued",
                "used",
                "unissued_in_segments",
                "lost",
                "segments",
                "balanced",
            )
        },
        "cpu_cores": cores,
        "machine_busy": busy,
        "checks": checks,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    busy_before = busy_before_run()
    results: dict[str, Any] = {"header": run_header("bench_sale", args.label, source, busy_before)}
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-sale-"))
    ports = free_ports(4)
    config_path = data_dir / "topology.toml"
    config = write_topology(config_path, ports)
    cluster = LocalCluster(config, data_dir / "unitrade", config_path)
    try:
        print(f"cluster on ports {ports}", flush=True)
        cluster.start()
        figures = uvloop.run(one_run(args, config, cluster))
        results["run"] = figures
        print_figures(figures)
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


def print_figures(f: dict[str, Any]) -> None:
    print(
        f"\n{f['buyers']} buyers, {f['units']} units, {f['tokens']} tokens (segments of "
        f"{f['segment']}), {f['concurrency']} requests at once"
    )
    for kind in ("token", "order", "pay"):
        k = f[kind]
        if not k["requests"]:
            print(f"  {kind}: none")
            continue
        outcomes = ", ".join(
            f"{o} {v['count']} (p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms)"
            for o, v in k["outcomes"].items()
        )
        print(
            f"  {kind}: {k['requests']} requests, {k['per_s']}/s over {k['window_s']} s; "
            f"p50 {k['p50_ms']} ms, p99 {k['p99_ms']} ms; {outcomes}"
        )
    print(f"  stock: {f['levels']}; tokens: {f['accounting']}")
    print(f"  CPU (cores): {f['cpu_cores']}, machine busy {f['machine_busy']:.0%}")
    failed = [name for name, ok in f["checks"].items() if not ok]
    print(f"  checks: {'all hold' if not failed else 'FAILED ' + ', '.join(failed)}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sale",
        description="A flash sale: buyers of every region rush a few units with sale tokens.",
    )
    parser.add_argument("--buyers", type=int, default=20_000, help="buyers who rush, once each")
    parser.add_argument("--units", type=int, default=5_000, help="units for sale")
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens of the sale (default: 2 x units)"
    )
    parser.add_argument("--segment", type=int, default=100, help="tokens per segment")
    parser.add_argument(
        "--concurrency", type=int, default=256, help="requests in flight at most (closed loop)"
    )
    parser.add_argument("--seed", type=int, default=1, help="buyers and gateways")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 2 * args.units
    if not 1 <= args.units <= 10**6 or not 1 <= args.buyers <= 10**6:
        parser.error("need 1 <= --units, --buyers <= 10^6")
    if not 1 <= args.tokens <= 10**7 or not 1 <= args.segment <= 100_000:
        parser.error("need 1 <= --tokens <= 10^7 and 1 <= --segment <= 100000")
    if not 1 <= args.concurrency <= 4_096:
        parser.error("need 1 <= --concurrency <= 4096")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Generous: 3 requests per buyer at 50/s at the least, plus start and settling.
    budget = 180 + SETTLE_TIMEOUT_S + 3 * args.buyers / 50
    exit_status = run_bounded(run, args, budget)
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
