"""Flow control benchmarks (run on demand, not in CI), three in one module:

    .venv/bin/python -m benchmarks.bench_flow checks   [--checks N] [--concurrency N]
        [--duration S] [--json PATH]
    .venv/bin/python -m benchmarks.bench_flow cost     [--duration S] [--rounds N]
        [--concurrency N] [--storage memory|redis] [--json PATH]
    .venv/bin/python -m benchmarks.bench_flow overload [--duration S] [--concurrency N]
        [--factor F] [--in-flight-max N] [--json PATH]

- **checks**: what one rate-limit check costs, in one process, for the choice of
  limiter (docs/architecture.md, Flow control): the hand-written schedule
  (flow/limiter.py) in this process and in Redis (one Lua call), against the `limits`
  library's moving window and sliding-window counter, in memory and in Redis (redis-py),
  `--checks` sequential checks each on one event loop, keys spread over 1,000 buyers.
  Needs Redis on 127.0.0.1:6379 for the Redis rows (left out, with a note, without it).
  Then the Redis schedules under load: `--concurrency` requests at a time for `--duration`
  s, each taking the edge's checks (ip, buyer, region) and then the business layer's
  (order_buyer, order_sku) as an order does: requests/s, Redis calls per request and the
  CPU per request in this process and in the Redis server (its INFO), which on a machine
  whose cores are all busy is what the limits cost an order.
- **cost** (issue 12 item 8a): the limiter and the breakers on the order path. A
  three-region cluster (the default topology, SQLite, free ports); closed-loop order
  creations to the buyers' home regions for `--duration` s per phase, phases alternating
  flow control **on** (every limit, overload protection and breakers on, at the generous
  defaults, so every check runs and none refuses) and **off** (all of them disabled),
  changed live through the control plane between phases (ABBA over `--rounds`), in one
  run. Target: on >= 0.95 x off orders/s. `--storage redis` keeps the limits in Redis.
- **overload** (item 8c): one region offered more than it can serve. Buyers homed in hz,
  sent to hz directly. (1) unloaded: an open loop at `--unloaded-rate` orders/s, its p99;
  (2) capacity: a closed loop at `--concurrency`, orders/s; (3) offered `--factor` x the
  capacity in an open loop (at most `--in-flight` outstanding; with `--in-flight-max`
  the region's overload rule bounds what it admits at once): goodput (201/s), the p99
  of the admitted (201) orders, what was shed (503 overloaded) or limited (429). Targets:
  goodput >= 0.9 x capacity; admitted p99 <= 2 x unloaded p99.

Everything listens on and targets 127.0.0.1 on free ports (never 8700-8703), every phase
is bounded in time, and every process the benchmark starts is stopped on exit, Ctrl-C or
error.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from benchmarks.bench_orders import STOCK, closed_loop
from benchmarks.harness import (
    BenchError,
    busy_before_run,
    free_ports,
    home_buyers,
    order_request,
    run_bounded,
    run_header,
    source_info,
    write_topology,
)
from benchmarks.load import (
    Plan,
    Sample,
    cpu_between,
    cpu_snapshot,
    latency_figures,
    open_loop,
    pct,
    seed_products,
)
from unitrade.cluster import LocalCluster
from unitrade.topology.config import TopologyConfig, load_config
from unitrade.topology.flow_rules import LIMITS, Limit
from unitrade.web.tokens import issue_token

SKUS = [f"FLOW-{i:02d}" for i in range(20)]
BUYERS_PER_REGION = 600
PLAN_LENGTH = 4_000
REDIS_URL = "redis://127.0.0.1:6379/0"
TARGETS = {
    "cost: on >= 0.95 x off orders/s": 0.95,
    "overload: goodput >= 0.9 x capacity": 0.9,
    "overload: admitted p99 <= 2 x unloaded p99": 2.0,
}


# -- checks: the cost of one limiter check -----------------------------------------------------


async def _time_checks(name: str, check: Any, n: int) -> dict[str, Any]:
    rng = random.Random(1)
    keys = [str(rng.randrange(1000)) for _ in range(n)]
    for key in keys[:200]:  # warm up
        await check(key)
    started = time.perf_counter()
    for key in keys:
        await check(key)
    seconds = time.perf_counter() - started
    row = {"limiter": name, "checks": n, "us_per_check": round(seconds / n * 1e6, 2)}
    print(f"  {name:<44} {row['us_per_check']:8.2f} us per check", flush=True)
    return row


async def _redis_cpu_s(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _shared_load(rules: Any, prefix: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """Requests taking an order's checks in Redis, `concurrency` at a time."""
    from unitrade.flow.limits import RateLimits
    from unitrade.flow.redis_limiter import RedisSchedules

    shared = RedisSchedules(REDIS_URL, 1.0)
    limits = RateLimits("bench", lambda: rules, shared, f"{prefix}-load")
    rng = random.Random(2)
    done = 0

    async def worker(deadline: float) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            buyer = str(rng.randrange(1800))
            await limits.admit([("ip", "127.0.0.1"), ("buyer", buyer), ("region", "all")])
            await limits.admit([("order_buyer", buyer), ("order_sku", rng.choice(SKUS))])
            done += 1

    try:
        await asyncio.gather(*(worker(time.monotonic() + 1.0) for _ in range(concurrency)))
        done, calls_before = 0, shared.calls
        redis_before, cpu_before = await _redis_cpu_s(shared.client), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(time.monotonic() + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_before
        redis_s = await _redis_cpu_s(shared.client) - redis_before
        calls = shared.calls - calls_before
    finally:
        await shared.aclose()
    row = {
        "limiter": f"unitrade schedule, Redis, {concurrency} requests at a time",
        "requests": done,
        "requests_per_s": round(done / elapsed, 1),
        "calls_per_request": round(calls / max(1, done), 3),
        "client_us_per_request": round(cpu_s / max(1, done) * 1e6, 1),
        "redis_us_per_request": round(redis_s / max(1, done) * 1e6, 1),
    }
    print(
        f"  {row['limiter']:<44} {row['requests_per_s']:8.1f} requests/s  "
        f"calls/request {row['calls_per_request']:.3f}  CPU per request: "
        f"here {row['client_us_per_request']:.1f} us, Redis {row['redis_us_per_request']:.1f} us",
        flush=True,
    )
    return row


async def _checks(n: int, concurrency: int, seconds: float) -> list[dict[str, Any]]:
    import limits as limits_lib
    from limits.aio.storage import MemoryStorage, RedisStorage
    from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    from unitrade.flow.limits import RateLimits
    from unitrade.flow.redis_limiter import RedisSchedules
    from unitrade.topology.flow_rules import FlowRules

    limit = Limit(rate_per_s=1_000_000, burst=1_000_000)  # never refuses: the cost only
    rules = FlowRules().model_copy(update={"limits": dict.fromkeys(LIMITS, limit)})
    item = limits_lib.parse("1000000/second")
    rows = []
    local = RateLimits("bench", lambda: rules)
    rows.append(await _time_checks("unitrade schedule, in process", _admit(local), n))
    moving = MovingWindowRateLimiter(MemoryStorage())
    rows.append(await _time_checks("limits moving window, memory", _hit(moving, item), n))
    sliding = SlidingWindowCounterRateLimiter(MemoryStorage())
    rows.append(await _time_checks("limits sliding window counter, memory", _hit(sliding, item), n))
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    shared = RedisSchedules(REDIS_URL, 1.0)
    try:
        await shared.client.ping()
    except Exception as exc:
        print(f"  (no Redis at {REDIS_URL}: {type(exc).__name__}; Redis rows left out)")
        await shared.aclose()
        return rows
    try:
        in_redis = RateLimits("bench", lambda: rules, shared, prefix)
        rows.append(
            await _time_checks("unitrade schedule, Redis (one Lua call)", _admit(in_redis), n)
        )
        storage = RedisStorage(REDIS_URL, implementation="redispy", key_prefix=prefix)
        moving = MovingWindowRateLimiter(storage)
        rows.append(await _time_checks("limits moving window, Redis", _hit(moving, item), n))
        sliding = SlidingWindowCounterRateLimiter(storage)
        rows.append(
            await _time_checks("limits sliding window counter, Redis", _hit(sliding, item), n)
        )
        rows.append(await _shared_load(rules, prefix, concurrency, seconds))
    finally:
        keys = await shared.client.keys(f"{prefix}*")
        if keys:
            await shared.client.delete(*keys)
        await shared.aclose()
    return rows


def _admit(limits: Any) -> Any:
    async def check(key: str) -> None:
        await limits.admit([("buyer", key)])

    return check


def _hit(limiter: Any, item: Any) -> Any:
    async def check(key: str) -> None:
        if not await limiter.hit(item, "buyer", key):
            raise BenchError("the limits library refused a check")

    return check


def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    rows = uvloop.run(_checks(args.checks, args.concurrency, args.duration))
    return {**run_header("bench_flow", args.label, source), "mode": "checks", "rows": rows}


# -- the cluster ----------------------------------------------------------------------------


class Flow:
    """The control plane's flow API, with the admin token."""

    def __init__(self, config: TopologyConfig) -> None:
        token = issue_token(config.token_keys, admin=True)
        self.http = httpx.Client(
            base_url=config.control.base_url,
            timeout=30.0,
            headers={"authorization": f"Bearer {token}"},
        )

    def put(self, path: str, body: dict[str, Any]) -> None:
        answer = self.http.put(path, json=body)
        if answer.status_code != 200 or answer.json()["not_acknowledged"]:
            raise BenchError(f"PUT {path}: {answer.status_code} {answer.text[:300]}")

    def turn(self, on: bool) -> None:
        """Every limit, overload protection and the breakers on or off."""
        for name in LIMITS:
            self.put(f"/v1/flow/limits/{name}", {"enabled": on})
        self.put("/v1/flow/overload", {"enabled": on})
        self.put("/v1/flow/breakers", {"enabled": on})

    def close(self) -> None:
        self.http.close()


def start_cluster(storage: str, data_dir: Path) -> tuple[TopologyConfig, LocalCluster]:
    ports = free_ports(4)
    path = data_dir / "topology.toml"
    config = write_topology(path, ports)
    if storage == "redis":
        text = path.read_text(encoding="utf-8")
        path.write_text(
            text + f'\n[flow]\nstorage = "{REDIS_URL}"\nkey_prefix = "bench-{ports[0]}"\n',
            encoding="utf-8",
        )
        config = load_config(path)
    cluster = LocalCluster(config, data_dir / "unitrade", path)
    print(f"data in {data_dir}; regions on ports {ports[:3]}, control on {ports[3]}", flush=True)
    cluster.start()
    uvloop.run(seed_products(config, SKUS, STOCK))
    return config, cluster


def plan_for(
    config: TopologyConfig, buyers: dict[str, list[int]], regions: list[str], seed: int
) -> list[tuple[int, bytes]]:
    """Order creations for buyers of `regions`, each sent to the buyer's home region."""
    rng = random.Random(seed)
    tokens: dict[int, str] = {}
    plan: list[tuple[int, bytes]] = []
    for i in range(PLAN_LENGTH):
        region = regions[i % len(regions)]
        buyer = rng.choice(buyers[region])
        token = tokens.get(buyer) or tokens.setdefault(
            buyer, issue_token(config.token_keys, buyer_id=buyer)
        )
        skus = rng.sample(SKUS, 2)
        body = orjson.dumps({"items": [{"sku": s, "qty": rng.randint(1, 3)} for s in skus]})
        port = config.region(region).port
        plan.append((port, order_request(port, token, body)))
    return plan


# -- cost: flow control on against off -----------------------------------------------------


def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    busy = busy_before_run()
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-flow-"))
    config, cluster = start_cluster(args.storage, data_dir)
    flow = Flow(config)
    try:
        buyers = home_buyers(config, BUYERS_PER_REGION)
        plan = plan_for(config, buyers, config.region_names, seed=1)
        # The first seconds of a new cluster run slower and slower less (caches, the
        # databases' files growing): a short warm-up made whichever phase came first look
        # 15-25 % slower, flow control on or off.
        print(f"warm-up ({args.warmup:.0f} s)...", flush=True)
        uvloop.run(closed_loop("warm-up", plan, args.concurrency, args.warmup))
        phases: dict[str, list[Any]] = {"on": [], "off": []}
        order = ["on", "off", "off", "on"] * args.rounds  # ABBA
        for name in order[: 2 * args.rounds]:
            flow.turn(name == "on")
            result = uvloop.run(closed_loop(name, plan, args.concurrency, args.duration))
            errors = sum(result.errors.values())
            print(
                f"  flow {name:<3} {result.throughput:8.1f} orders/s  "
                f"p50 {pct(result.latencies_s, 0.5) * 1000:6.2f} ms  "
                f"p99 {pct(result.latencies_s, 0.99) * 1000:6.2f} ms  errors {errors}"
                + (f" (e.g. {result.error_sample})" if errors else ""),
                flush=True,
            )
            phases[name].append(
                {
                    "orders_per_s": round(result.throughput, 1),
                    "p50_ms": round(pct(result.latencies_s, 0.5) * 1000, 3),
                    "p99_ms": round(pct(result.latencies_s, 0.99) * 1000, 3),
                    "errors": dict(result.errors),
                    "error_sample": result.error_sample,
                }
            )
        mean = {n: sum(p["orders_per_s"] for p in v) / len(v) for n, v in phases.items()}
        ratio = mean["on"] / mean["off"] if mean["off"] else float("nan")
        print(f"on / off = {ratio:.3f} (target >= 0.95)", flush=True)
        header = run_header("bench_flow", args.label, source, busy)
        return {
            **header,
            "mode": "cost",
            "storage": args.storage,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "phases": phases,
            "mean_orders_per_s": mean,
            "on_over_off": round(ratio, 3),
            "target_met": ratio >= TARGETS["cost: on >= 0.95 x off orders/s"],
        }
    finally:
        flow.close()
        print("stopping processes...", flush=True)
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# -- overload: a region offered more than it can serve ---------------------------------------


async def _open(plan: Plan, rate: float, in_flight: int, seconds: float) -> list[Sample]:
    samples: list[Sample] = []
    stop = asyncio.Event()
    runner = asyncio.create_task(open_loop(plan, rate, in_flight, stop, samples, {}, {}))
    await asyncio.sleep(seconds)
    stop.set()
    await runner
    return samples


def run_overload(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    busy = busy_before_run()
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-flow-"))
    config, cluster = start_cluster("memory", data_dir)
    try:
        buyers = home_buyers(config, BUYERS_PER_REGION)
        requests = plan_for(config, buyers, ["hz"], seed=2)
        plan = Plan([(port, request, False) for port, request in requests])
        pids = {r: p.pid for r, p in cluster.processes.items()}
        print("warm-up...", flush=True)
        uvloop.run(closed_loop("warm-up", requests, args.concurrency, min(args.duration, 3.0)))
        unloaded = uvloop.run(_open(plan, args.unloaded_rate, 64, args.duration))
        quiet = latency_figures(unloaded)
        print(f"  unloaded at {args.unloaded_rate:g}/s: {quiet}", flush=True)
        capacity = uvloop.run(closed_loop("capacity", requests, args.concurrency, args.duration))
        print(f"  capacity: {capacity.throughput:.1f} orders/s", flush=True)
        offered = capacity.throughput * args.factor
        if args.in_flight_max:
            flow = Flow(config)
            try:
                flow.put("/v1/flow/overload", {"in_flight_max": args.in_flight_max})
            finally:
                flow.close()
        before = cpu_snapshot(pids)
        loaded = uvloop.run(_open(plan, offered, args.in_flight, args.duration))
        cores, machine = cpu_between(before, cpu_snapshot(pids))
        admitted = latency_figures(loaded)
        codes: dict[str, int] = {}
        for sample in loaded:
            key = str(sample.status) + (f" {sample.code}" if sample.code else "")
            codes[key] = codes.get(key, 0) + 1
        goodput = admitted["ok"] / args.duration
        ratio_goodput = goodput / capacity.throughput if capacity.throughput else float("nan")
        p99_ratio = (admitted["p99_ms"] or float("nan")) / (quiet["p99_ms"] or float("nan"))
        print(
            f"  offered {offered:.0f}/s: goodput {goodput:.1f}/s ({ratio_goodput:.2f} x "
            f"capacity), admitted p99 {admitted['p99_ms']} ms ({p99_ratio:.2f} x unloaded); "
            f"answers {codes}; cores {cores}",
            flush=True,
        )
        header = run_header("bench_flow", args.label, source, busy)
        return {
            **header,
            "mode": "overload",
            "unloaded": {"rate": args.unloaded_rate, **quiet},
            "capacity_orders_per_s": round(capacity.throughput, 1),
            "offered_per_s": round(offered, 1),
            "in_flight_max": args.in_flight_max,
            "loaded": {**admitted, "goodput_per_s": round(goodput, 1), "answers": codes},
            "cores": cores,
            "machine_busy": machine,
            "goodput_over_capacity": round(ratio_goodput, 3),
            "p99_over_unloaded": round(p99_ratio, 3),
        }
    finally:
        print("stopping processes...", flush=True)
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_flow",
        description="Flow control: the cost of a limiter check, of flow control on the order "
        "path (on against off), and a region offered more than it can serve.",
    )
    parser.add_argument("mode", choices=["checks", "cost", "overload"])
    parser.add_argument("--checks", type=int, default=20_000, help="checks: per limiter")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="cost: on/off pairs (ABBA)")
    parser.add_argument(
        "--warmup", type=float, default=20.0, help="cost: seconds of load before the phases"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop workers")
    parser.add_argument("--storage", choices=["memory", "redis"], default="memory")
    parser.add_argument("--factor", type=float, default=3.0, help="overload: x capacity")
    parser.add_argument("--unloaded-rate", type=float, default=50.0, help="overload: orders/s")
    parser.add_argument("--in-flight", type=int, default=1024, help="overload: outstanding max")
    parser.add_argument(
        "--in-flight-max",
        type=int,
        default=0,
        help="overload: the region's in_flight_max for the loaded phase (0: the default rule)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup <= 600:
        parser.error("need 0 <= --warmup <= 600")
    if not 1 <= args.duration <= 600 or not 1 <= args.rounds <= 20:
        parser.error("need 1 <= --duration <= 600 and 1 <= --rounds <= 20")
    if not 1 <= args.concurrency <= 1024 or not 1 <= args.checks <= 10_000_000:
        parser.error("need 1 <= --concurrency <= 1024 and 1 <= --checks <= 10000000")
    if not 1 <= args.factor <= 10 or not 1 <= args.unloaded_rate <= 1000:
        parser.error("need 1 <= --factor <= 10 and 1 <= --unloaded-rate <= 1000")
    if not 1 <= args.in_flight <= 4096:
        parser.error("need 1 <= --in-flight <= 4096")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = {"checks": run_checks, "cost": run_cost, "overload": run_overload}
    budget = 300 + args.warmup + args.duration * (4 * args.rounds + 6)
    return run_bounded(runs[args.mode], args, budget)


if __name__ == "__main__":
    sys.exit(main())
