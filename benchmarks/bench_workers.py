"""A region of many processes: order creation with 1 and 2 workers per region, on PostgreSQL
and on MariaDB, against the single-database baseline on the same engine, in one run (run on
demand, not in CI).

    .venv/bin/python -m benchmarks.bench_workers [--engines postgresql,mysql] [--workers 1,2]
        [--duration S] [--rounds R] [--concurrency N] [--warmup S] [--json PATH]

Per engine, the baseline (benchmarks/baseline_app.py on ONE database of that engine, one
process, the same driver used the same way as unitrade) runs throughout. For each worker
count, a three-region unitrade cluster starts (the default topology, hz running that many
workers behind its one address, sh and bj one each; every cell copy a database of the
engine, one reader per copy to stay within the server's connections), seeded with the same
products, and the load alternates with the baseline's round by round (ABBA). The load is
closed-loop (`--concurrency` keep-alive connections, each sending its next order when the
last is answered) of hz-homed buyers' orders sent to hz: every cell such an order touches
(the buyer's unit cell, the center for the stock reservation, the global cell for prices)
is hz's, so the whole order path is hz's to serve, spread over its workers by the kernel.

Per phase: orders/s, p50/p99, and CPU per order of the servers, read from /proc/<pid>/stat
before and after: hz's processes, all of unitrade's (hz, the replicas sh and bj applying,
the control plane), the baseline's, and the database server's processes (`postgres` or
`mariadbd`/`mysqld`: whatever else uses the server on the machine is counted too, so run it
on a quiet machine). The figures to look at: `ratio_2_to_1_workers` (orders/s; the issue's
target is 1.6x where the machine has the cores for it), `ratio_to_baseline` per worker
count (MariaDB's target 0.85x), and the CPU per order, from which `orders_per_core_s`
(1,000 / hz's ms per order) says what a region of n cores could serve: about n times that,
less what its database needs (the database's own ms per order, on its own machines).

Everything listens on and targets 127.0.0.1 on free ports; every database the run creates
(`ut_bench_<hex>_...`) is dropped at the end; every process is stopped on exit, Ctrl-C or
error; the whole run has a hard time bound.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson
import uvloop

from benchmarks.bench_orders import PhaseResult, closed_loop, pct
from benchmarks.harness import (
    HOST,
    REPO_ROOT,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    BenchError,
    busy_before_run,
    cpu_seconds,
    free_ports,
    home_buyers,
    machine_busy_seconds,
    order_request,
    run_bounded,
    run_header,
    self_cpu_seconds,
    source_info,
    write_topology,
)
from unitrade.cluster import LocalCluster
from unitrade.topology.config import SECRET_DEFAULT, TopologyConfig
from unitrade.web.tokens import issue_token

SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432",
    "mysql": "mysql://root@127.0.0.1:3306",
}
DB_PROCESS_NAMES = {"postgresql": ("postgres",), "mysql": ("mariadbd", "mysqld")}
SKU_COUNT = 50
STOCK = 10**8
BUYERS = 600
LINES_PER_ORDER = 2
PLAN_LENGTH = 6_000
TARGET_2_WORKERS = 1.6
TARGET_TO_BASELINE = {"mysql": 0.85}


class ServerBaseline:
    """The baseline app on one database of a server engine, in its own uvicorn process."""

    def __init__(self, port: int, url: str, data_dir: Path) -> None:
        self.port = port
        self.url = url
        self.log_path = data_dir / "logs" / "baseline.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "benchmarks.baseline_app", "--host", HOST]
        command += ["--port", str(self.port), "--url", self.url, "--secret", SECRET_DEFAULT]
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise BenchError(f"the baseline exited with {self.process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.base_url + "/healthz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise BenchError(f"the baseline not healthy after {START_TIMEOUT_S:.0f} s")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def database_pids(engine: str) -> list[int]:
    """The database server's processes on this machine (PostgreSQL: one per connection)."""
    names = DB_PROCESS_NAMES[engine]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
    return found


def drop_databases(engine: str, prefix: str) -> None:
    if engine == "postgresql":
        import psycopg

        with psycopg.connect(
            host=HOST, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)
            ).fetchall()
            for (name,) in rows:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        return
    import pymysql

    with pymysql.connect(host=HOST, port=3306, user="root", autocommit=True) as conn:
        cursor = conn.cursor()
        cursor.execute(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s",
            (prefix + "%",),
        )
        for (name,) in cursor.fetchall():
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def plan(config: TopologyConfig, port: int, skus: Sequence[str], seed: int) -> list[Any]:
    """Prebuilt order requests of hz-homed buyers, all sent to `port`."""
    rng = random.Random(seed)
    buyers = home_buyers(config, BUYERS)["hz"]
    tokens: dict[int, str] = {}
    requests = []
    for _ in range(PLAN_LENGTH):
        buyer = rng.choice(buyers)
        token = tokens.get(buyer) or tokens.setdefault(
            buyer, issue_token(config.token_keys, buyer_id=buyer)
        )
        lines = rng.sample(list(skus), LINES_PER_ORDER)
        body = orjson.dumps({"items": [{"sku": s, "qty": rng.randint(1, 3)} for s in lines]})
        requests.append((port, order_request(port, token, body)))
    return requests


def seed_products(config: TopologyConfig, urls: Sequence[str], skus: Sequence[str]) -> None:
    token = issue_token(config.token_keys, admin=True)
    with httpx.Client(timeout=30.0, headers={"authorization": f"Bearer {token}"}) as client:
        for i, sku in enumerate(skus):
            body = {"title": f"benchmark product {i}", "price_cents": 199 + 100 * i, "stock": STOCK}
            for url in urls:
                response = client.put(f"{url}/v1/admin/products/{sku}", json=body)
                if response.status_code != 200:
                    raise BenchError(f"seeding {sku} at {url}: {response.text}")


def measure(
    engine: str,
    name: str,
    requests: Sequence[Any],
    pids: dict[str, list[int]],
    concurrency: int,
    duration_s: float,
) -> PhaseResult:
    """One closed-loop phase; CPU seconds per group of processes in `server_cpu_s` (the
    database's processes read again: PostgreSQL starts one per new connection)."""
    pids = {**pids, "database": database_pids(engine)}
    before = {group: sum(cpu_seconds(p) for p in members) for group, members in pids.items()}
    busy_before, total_before = machine_busy_seconds()
    client_before = self_cpu_seconds()
    result = uvloop.run(closed_loop(name, requests, concurrency, duration_s))
    result.client_cpu_s = self_cpu_seconds() - client_before
    busy_after, total_after = machine_busy_seconds()
    result.machine_busy = (busy_after - busy_before) / max(total_after - total_before, 1e-9)
    result.server_cpu_s = {
        group: sum(cpu_seconds(p) for p in members) - before[group]
        for group, members in pids.items()
    }
    per_order = {
        g: round(1000 * s / max(1, result.completed), 3) for g, s in result.server_cpu_s.items()
    }
    print(
        f"  {name:<28} {result.throughput:8.1f} orders/s  p50 {pct(result, 0.5) * 1000:6.2f} "
        f"ms  p99 {pct(result, 0.99) * 1000:7.2f} ms  errors {sum(result.errors.values())}  "
        f"CPU ms/order {per_order}  machine {result.machine_busy:.0%}",
        flush=True,
    )
    if result.errors:
        print(f"    errors: {dict(result.errors)} e.g. {result.error_sample}", flush=True)
    return result


def figures(results: list[PhaseResult]) -> dict[str, Any]:
    latencies = [x for r in results for x in r.latencies_s]
    duration = sum(r.duration_s for r in results)
    completed = sum(r.completed for r in results)
    cpu: dict[str, float] = {}
    for r in results:
        for group, seconds in r.server_cpu_s.items():
            cpu[group] = cpu.get(group, 0.0) + seconds
    per_order = {g: round(1000 * s / max(1, completed), 3) for g, s in cpu.items()}
    served_by = next((g for g in ("hz", "baseline") if g in per_order), None)
    body: dict[str, Any] = {
        "orders_per_s": round(completed / duration, 1) if duration else math.nan,
        "orders_per_s_by_round": [round(r.throughput, 1) for r in results],
        "p50_ms": round(pct(latencies, 0.5) * 1000, 3),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 3),
        "requests": completed,
        "errors": sum(sum(r.errors.values()) for r in results),
        "server_cpu_ms_per_order": per_order,
        "server_cpu_cores": {g: round(s / duration, 3) for g, s in cpu.items()},
        "client_cpu_cores": round(sum(r.client_cpu_s for r in results) / duration, 3),
        "machine_busy": round(sum(r.machine_busy for r in results) / len(results), 3),
    }
    if served_by is not None and per_order[served_by] > 0:
        # What one core of the serving processes does, the database's work not counted.
        body["orders_per_core_s"] = round(1000 / per_order[served_by], 1)
    return body


def run_engine(engine: str, args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    prefix = f"ut_bench_{secrets.token_hex(4)}"
    server = SERVERS[engine]
    skus = [f"bench-{i:03d}" for i in range(SKU_COUNT)]
    ports = free_ports(5)
    baseline = ServerBaseline(ports[4], f"{server}/{prefix}_baseline", data_dir / engine)
    phases: dict[str, list[PhaseResult]] = {"baseline": []}
    names = {w: f"unitrade {w} worker{'s' if w > 1 else ''}" for w in args.workers}
    try:
        (data_dir / engine).mkdir(parents=True, exist_ok=True)
        baseline.start()
        # The baseline derives its token keys from the secret: the cluster's tokens work there.
        seed_config = write_topology(data_dir / engine / "seed.toml", ports[:4])
        seed_products(seed_config, [baseline.base_url], skus)
        baseline_plan = plan(seed_config, baseline.port, skus, seed=1)
        for workers in args.workers:
            directory = data_dir / engine / f"workers-{workers}"
            config_path = directory / "topology.toml"
            directory.mkdir(parents=True, exist_ok=True)
            config = write_topology(
                config_path,
                ports[:4],
                storage=f"{server}/{prefix}_w{workers}_{{region}}_{{cell}}",
                regions={r: {"storage_readers": 1} for r in ("hz", "sh", "bj")}
                | {"hz": {"storage_readers": 1, "workers": workers}},
            )
            cluster = LocalCluster(config, directory / "data", config_path)
            try:
                print(f"{engine}: starting unitrade with {workers} worker(s) in hz", flush=True)
                cluster.start()
                seed_products(config, [config.region("hz").base_url], skus)
                requests = plan(config, config.region("hz").port, skus, seed=2)
                pids = {
                    "hz": [p for n in cluster.worker_names("hz") if (p := cluster.pid(n))],
                    "unitrade": [p.pid for p in cluster.processes.values()],
                }
                assert baseline.process is not None
                baseline_pids = {"baseline": [baseline.process.pid]}
                if args.warmup > 0:
                    for name, work, group in (
                        (names[workers], requests, pids),
                        ("baseline", baseline_plan, baseline_pids),
                    ):
                        measure(
                            engine, f"warm-up {name}", work, group, args.concurrency, args.warmup
                        )
                phases[names[workers]] = []
                for round_no in range(args.rounds):
                    order = [("u", requests, pids), ("b", baseline_plan, baseline_pids)]
                    for kind, work, group in order if round_no % 2 == 0 else order[::-1]:
                        name = names[workers] if kind == "u" else "baseline"
                        phases[name].append(
                            measure(engine, name, work, group, args.concurrency, args.duration)
                        )
            finally:
                cluster.stop()
    finally:
        baseline.stop()
        drop_databases(engine, prefix)
    load = {name: figures(results) for name, results in phases.items() if results}
    base = load["baseline"]["orders_per_s"]
    for name, body in load.items():
        if name != "baseline" and base:
            body["ratio_to_baseline"] = round(body["orders_per_s"] / base, 3)
    if 1 in args.workers and 2 in args.workers:
        one, two = load[names[1]]["orders_per_s"], load[names[2]]["orders_per_s"]
        load["ratio_2_to_1_workers"] = round(two / one, 3) if one else None
    return load


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    busy = busy_before_run()
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-workers-"))
    results: dict[str, Any] = {
        **run_header("bench_workers", args.label, source, busy),
        "settings": {
            "engines": args.engines,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
        },
        "targets": {
            "2 workers >= 1.6 x 1 worker (where the cores allow)": TARGET_2_WORKERS,
            "MariaDB >= 0.85 x its baseline": TARGET_TO_BASELINE["mysql"],
        },
    }
    try:
        for engine in args.engines:
            results[engine] = run_engine(engine, args, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    for engine in args.engines:
        for name, body in results[engine].items():
            if isinstance(body, dict):
                ratio = body.get("ratio_to_baseline")
                print(
                    f"{engine:<10} {name:<20} {body['orders_per_s']:8.1f} orders/s  "
                    f"p50 {body['p50_ms']:7.2f} ms  p99 {body['p99_ms']:7.2f} ms  "
                    f"CPU ms/order {body['server_cpu_ms_per_order']}"
                    + (f"  x baseline {ratio}" if ratio is not None else "")
                )
        if "ratio_2_to_1_workers" in results[engine]:
            print(f"{engine:<10} 2 workers / 1 worker: {results[engine]['ratio_2_to_1_workers']}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="postgresql,mysql", help="postgresql and/or mysql")
    parser.add_argument("--workers", default="1,2", help="worker counts of hz to measure")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per phase (ABBA)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--warmup", type=float, default=5.0, help="warm-up seconds per phase")
    parser.add_argument("--label", help="a note kept in the JSON")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - set(SERVERS))
    if unknown:
        parser.error(f"unknown engines {unknown}: postgresql, mysql")
    args.workers = sorted({int(w) for w in args.workers.split(",")})
    if not args.workers or min(args.workers) < 1 or max(args.workers) > 8:
        parser.error("--workers: counts between 1 and 8")
    phases = len(args.engines) * (len(args.workers) * 2 * (args.rounds + 1))
    budget_s = 600 + phases * (args.duration + args.warmup + 30)
    return run_bounded(run, args, budget_s)


if __name__ == "__main__":
    sys.exit(main())
