"""Soak benchmark (run on demand, not in CI): does anything grow without bound?

    .venv/bin/python -m benchmarks.bench_soak [--minutes 30] [--rate 100] [--sample-s 30]
        [--storage sqlite|postgresql] [--json PATH]

It starts a three-region cluster (the default topology on free ports, SQLite or PostgreSQL)
with short `[retention]` settings written into its topology, then runs a steady mixed
workload at `--rate` requests/s for `--minutes`: orders created with idempotency keys (and a
few keys replayed), paid, closed and refunded; cart writes; catalog reads. Buyers of every
region, most requests sent to the buyer's home region and the rest forwarded by another.
Every created order is paid or closed soon after, so stock reservations finish.

Every `--sample-s` it records each database's size (SQLite: file + WAL; PostgreSQL:
`pg_database_size`), the RSS of every process it started (the regions and the control
plane), the row count of every table in every copy (read-only queries), and the client's
counts, errors and latency over the interval. It prints a row per sample as it goes and, at
the end, a verdict per series (see `verdict`): flat after warm-up or growing, with the slope
per hour. Orders, their lines, the buyer's order index and payments are business records
that are kept: they and the unit cells' databases grow with the orders created by design.

Bounded: the run stops by itself (and under a hard alarm), stops every process it started,
drops its PostgreSQL databases and removes its data directory (unless `--keep-data`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import math
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    home_buyers,
    http_request,
    run_bounded,
    run_header,
    source_info,
    write_topology,
)
from unitrade.cluster import LocalCluster
from unitrade.topology.config import CONTROL_NAME, TopologyConfig
from unitrade.web.tokens import issue_token

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
SKUS = [f"soak-{i:02d}" for i in range(20)]
STOCK = 10**9  # never runs out
REQUEST_TIMEOUT_S = 10.0  # a request not answered by then counts as a client error
DRAIN_S = REQUEST_TIMEOUT_S + 5.0
LATE_S = 0.05  # a request sent this much after it was due waited for the in-flight bound
QUEUE_MAX = 10_000  # orders waiting to be paid, closed or refunded; keys to replay
REPLAY_KEYS_MAX = 500
VERDICT_SAMPLES_MIN = 8  # 4 in the second half: one per quarter
SAMPLE_TIMEOUT_S = 120.0
END_SLACK_S = 0.5
CATALOG_TIMEOUT_S = 30.0
# Each series may move by the larger of `--tolerance` (relative) and this floor (absolute,
# in the series' unit) between the first and the last quarter of the second half.
FLOORS = {"rows": 200.0, "db_mb": 1.0, "wal_mb": 1.0, "rss_mb": 8.0, "latency_ms": 10.0}
# Business records: kept forever, so they grow with the orders created.
KEPT_TABLES = frozenset({"orders", "order_lines", "buyer_orders", "payments"})
# The workload: operation -> weight. Pay and close take a created order (falling back to a
# create when none waits) and together outweigh create, so every order is finished soon.
MIX: dict[str, int] = {
    "create": 22,
    "replay": 2,  # an idempotency key sent again: the same order, not a new one
    "pay": 14,
    "close": 9,
    "refund": 5,
    "cart_put": 10,
    "cart_delete": 10,
    "product": 20,
    "products": 8,
}
# Cart writes go to a few buyers and SKUs with puts and deletes alike, so the carts table
# settles at about half of these pairs within a minute or two instead of filling slowly.
CART_BUYERS_PER_REGION = 20
CART_SKUS = SKUS[:5]
FORWARDED_SHARE = 0.2  # requests sent to a region other than the buyer's home
SUMMARY_TABLES = ("changelog", "outbox", "idempotency_keys", "reservations", "carts", "orders")


# -- the workload ------------------------------------------------------------------------------


@dataclass
class Buyer:
    id: int
    home: str
    token: str


@dataclass
class Pending:
    buyer: Buyer
    order_id: str
    total_cents: int


@dataclass
class Op:
    kind: str
    port: int
    request: bytes
    on_ok: Callable[[bytes], None] | None = None


class Workload:
    """Builds the next request from what earlier answers returned (orders to pay, close or
    refund); every queue is bounded."""

    def __init__(self, config: TopologyConfig, buyers: Sequence[Buyer], seed: int) -> None:
        self.rng = random.Random(seed)
        self.ports = {name: config.region(name).port for name in config.region_names}
        self.buyers = list(buyers)
        homes: dict[str, list[Buyer]] = {}
        for buyer in buyers:
            homes.setdefault(buyer.home, []).append(buyer)
        self.cart_buyers = [b for group in homes.values() for b in group[:CART_BUYERS_PER_REGION]]
        self.run_id = uuid.uuid4().hex[:8]
        self.count = 0
        self.created: deque[Pending] = deque(maxlen=QUEUE_MAX)
        self.paid: deque[Pending] = deque(maxlen=QUEUE_MAX)
        self.keys: deque[tuple[Buyer, str, bytes]] = deque(maxlen=REPLAY_KEYS_MAX)
        self.kinds = list(MIX)
        self.weights = list(MIX.values())

    def port(self, buyer: Buyer) -> int:
        if self.rng.random() < FORWARDED_SHARE:
            return self.ports[self.rng.choice([r for r in self.ports if r != buyer.home])]
        return self.ports[buyer.home]

    def next(self) -> Op:
        self.count += 1
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if kind in ("pay", "close") and self.created:
            return self.transition(kind, self.created.popleft())
        if kind == "refund" and self.paid:
            return self.transition(kind, self.paid.popleft())
        if kind == "replay" and self.keys:
            buyer, _key, body = self.rng.choice(self.keys)
            port = self.port(buyer)
            return Op(kind, port, http_request("POST", "/v1/orders", port, buyer.token, body))
        if kind in ("cart_put", "cart_delete"):
            return self.cart(kind)
        buyer = self.rng.choice(self.buyers)
        port = self.port(buyer)
        sku = self.rng.choice(SKUS)
        if kind == "product":
            return Op(kind, port, http_request("GET", f"/v1/products/{sku}", port, buyer.token))
        if kind == "products":
            path = "/v1/products?limit=20"
            return Op(kind, port, http_request("GET", path, port, buyer.token))
        return self.create(buyer, port)

    def cart(self, kind: str) -> Op:
        buyer = self.rng.choice(self.cart_buyers)
        port = self.port(buyer)
        path = f"/v1/cart/items/{self.rng.choice(CART_SKUS)}"
        if kind == "cart_delete":
            return Op(kind, port, http_request("DELETE", path, port, buyer.token))
        body = orjson.dumps({"qty": self.rng.randint(1, 5)})
        return Op(kind, port, http_request("PUT", path, port, buyer.token, body))

    def create(self, buyer: Buyer, port: int) -> Op:
        key = f"soak-{self.run_id}-{self.count}"
        skus = self.rng.sample(SKUS, self.rng.randint(1, 3))
        items = [{"sku": s, "qty": self.rng.randint(1, 3)} for s in skus]
        body = orjson.dumps({"items": items, "idempotency_key": key})

        def created(reply: bytes) -> None:
            order = orjson.loads(reply)
            self.created.append(Pending(buyer, order["order_id"], order["total_cents"]))
            self.keys.append((buyer, key, body))

        request = http_request("POST", "/v1/orders", port, buyer.token, body)
        return Op("create", port, request, created)

    def transition(self, kind: str, order: Pending) -> Op:
        port = self.port(order.buyer)
        path = f"/v1/orders/{order.order_id}/{kind}"
        body = None
        on_ok = None
        if kind == "pay":
            payment = f"soak-pay-{self.run_id}-{self.count}"
            body = orjson.dumps({"payment_id": payment, "amount_cents": order.total_cents})

            def paid(_reply: bytes) -> None:
                self.paid.append(order)

            on_ok = paid
        return Op(kind, port, http_request("POST", path, port, order.buyer.token, body), on_ok)


@dataclass
class Window:
    """The client's view of one sample interval."""

    sent: int = 0
    ok: int = 0
    late: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    by_kind: Counter[str] = field(default_factory=Counter)

    def figures(self, seconds: float) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)
        return {
            "sent": self.sent,
            "ok": self.ok,
            "ok_per_s": round(self.ok / seconds, 1) if seconds > 0 else 0.0,
            "late": self.late,
            "errors": dict(self.errors),
            "p50_ms": ms(quantile(ordered, 0.5)),
            "p99_ms": ms(quantile(ordered, 0.99)),
            "max_ms": ms(ordered[-1]) if ordered else None,
            "ok_by_kind": dict(self.by_kind),
        }


def ms(seconds: float | None) -> float | None:
    """Milliseconds, rounded; None stays None (JSON has no NaN)."""
    return None if seconds is None else round(1000 * seconds, 2)


def quantile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Load:
    """Request i is due at t0 + i / rate; at most `in_flight` outstanding; until `stop`."""

    def __init__(self, workload: Workload, rate: float, in_flight: int) -> None:
        self.workload = workload
        self.rate = rate
        self.slots = asyncio.Semaphore(in_flight)
        self.pool = Pool()
        self.window = Window()
        self.total = Window()  # latencies are not kept: counts only
        self.error_bodies: dict[str, str] = {}

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window

    async def one(self, op: Op) -> None:
        connection = self.pool.take(op.port)
        sent = time.perf_counter()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                reply = await connection.send(op.request)
        except (OSError, asyncio.IncompleteReadError, BenchError, TimeoutError) as exc:
            self.count_error(f"{op.kind} {type(exc).__name__}", str(exc))
            return
        finally:
            self.slots.release()
            self.pool.give(connection)
        if not 200 <= reply.status < 300:
            text = reply.body[:300].decode("utf-8", "replace")
            self.count_error(f"{op.kind} {reply.status} {error_code(reply.body)}", text)
            return
        for window in (self.window, self.total):
            window.ok += 1
            window.by_kind[op.kind] += 1
        self.window.latencies_s.append(time.perf_counter() - sent)
        if op.on_ok is not None:
            op.on_ok(reply.body)

    def count_error(self, key: str, text: str) -> None:
        self.window.errors[key] += 1
        self.total.errors[key] += 1
        if key not in self.error_bodies and len(self.error_bodies) < 50:
            self.error_bodies[key] = text
            print(f"    client error: {key}: {text[:200]}", flush=True)

    async def run(self, stop: asyncio.Event) -> None:
        clock = time.perf_counter
        tasks: set[asyncio.Task[None]] = set()
        t0 = clock()
        try:
            for i in range(10**12):
                due = t0 + i / self.rate
                wait = due - clock()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
                if stop.is_set():
                    break
                await self.slots.acquire()
                if clock() - due > LATE_S:
                    self.window.late += 1
                    self.total.late += 1
                self.window.sent += 1
                self.total.sent += 1
                task = asyncio.create_task(self.one(self.workload.next()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks), timeout=DRAIN_S)
        finally:
            for task in tasks:
                task.cancel()
            self.pool.close()


# -- what is sampled -----------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB: psutil when installed, else /proc."""
    with contextlib.suppress(ImportError):
        psutil: Any = importlib.import_module("psutil")
        try:
            return float(psutil.Process(pid).memory_info().rss) / 1e6
        except psutil.Error:
            return math.nan
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return math.nan


class Storage:
    """The cluster's databases, read without writing: sizes and row counts of every table."""

    def sizes_mb(self) -> dict[str, float]:
        raise NotImplementedError

    def wal_mb(self) -> dict[str, float]:
        """Write-ahead logs kept per database (SQLite); PostgreSQL's WAL is the server's."""
        return {}

    def rows(self) -> dict[str, dict[str, int]]:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


def size_mb(path: Path) -> float:
    try:
        return round(path.stat().st_size / 1e6, 3)
    except OSError:
        return 0.0


class SqliteStorage(Storage):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def files(self) -> list[Path]:
        return sorted(self.data_dir.rglob("*.db"))

    def name(self, path: Path) -> str:
        return str(path.relative_to(self.data_dir).with_suffix(""))

    def sizes_mb(self) -> dict[str, float]:
        return {self.name(path): size_mb(path) for path in self.files()}

    def wal_mb(self) -> dict[str, float]:
        return {self.name(p): size_mb(p.with_name(p.name + "-wal")) for p in self.files()}

    def rows(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        for path in self.files():
            # Read-only: the copy is the region's; a reader in WAL mode blocks no writer.
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
            try:
                connection.execute("PRAGMA query_only = 1")
                tables = [
                    name
                    for (name,) in connection.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE 'sqlite_%' ORDER BY name"
                    )
                ]
                found[self.name(path)] = {
                    table: connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                    for table in tables
                }
            except sqlite3.Error as exc:
                print(f"    cannot read {path}: {exc}", flush=True)
            finally:
                connection.close()
        return found


class PostgresStorage(Storage):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def connect(self, dbname: str) -> Any:
        psycopg: Any = importlib.import_module("psycopg")
        return psycopg.connect(
            host="127.0.0.1", user="postgres", dbname=dbname, connect_timeout=5, autocommit=True
        )

    def databases(self) -> list[str]:
        with self.connect("postgres") as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname",
                (self.prefix + "%",),
            ).fetchall()
        return [name for (name,) in rows]

    def name(self, database: str) -> str:
        return database.removeprefix(self.prefix + "_")

    def sizes_mb(self) -> dict[str, float]:
        with self.connect("postgres") as conn:
            rows = conn.execute(
                "SELECT datname, pg_database_size(datname) FROM pg_database "
                "WHERE datname LIKE %s ORDER BY datname",
                (self.prefix + "%",),
            ).fetchall()
        return {self.name(name): round(size / 1e6, 3) for name, size in rows}

    def rows(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        for database in self.databases():
            with self.connect(database) as conn:
                conn.execute("SET default_transaction_read_only = on")
                tables = conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
                ).fetchall()
                found[self.name(database)] = {
                    table: conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
                    for (table,) in tables
                }
        return found

    def cleanup(self) -> None:
        with self.connect("postgres") as conn:
            for database in self.databases():
                conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def take_sample(cluster: LocalCluster, storage: Storage) -> dict[str, Any]:
    return {
        "rss_mb": {
            name: round(rss_mb(cluster.processes[name].pid), 1)
            for name in [*cluster.config.region_names, CONTROL_NAME]
        },
        "db_mb": storage.sizes_mb(),
        "wal_mb": storage.wal_mb(),
        "rows": storage.rows(),
    }


# -- verdicts --------------------------------------------------------------------------------


def verdict(
    times_s: Sequence[float], values: Sequence[float], tolerance: float, floor: float
) -> dict[str, Any]:
    """The rule: the first half of the run is warm-up. Of the second half, the mean of its
    first quarter is compared with the mean of its last quarter; the series is flat when it
    grew by at most max(tolerance x the first mean, floor), else growing. The slope is the
    least-squares fit over the second half, per hour."""
    points = [(t, v) for t, v in zip(times_s, values, strict=True) if not math.isnan(v)]
    if len(points) < VERDICT_SAMPLES_MIN:
        return {"verdict": "too few samples", "samples": len(points)}
    second = points[len(points) // 2 :]
    quarter = max(1, len(second) // 4)
    first_mean = statistics.fmean(v for _, v in second[:quarter])
    last_mean = statistics.fmean(v for _, v in second[-quarter:])
    allowed = max(tolerance * abs(first_mean), floor)
    xs = [t for t, _ in second]
    ys = [v for _, v in second]
    slope = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 1 else 0.0
    return {
        "verdict": "flat" if last_mean - first_mean <= allowed else "growing",
        "first_quarter_mean": round(first_mean, 3),
        "last_quarter_mean": round(last_mean, 3),
        "allowed_growth": round(allowed, 3),
        "slope_per_hour": round(slope * 3600, 3),
        "samples": len(points),
    }


def series_of(samples: Sequence[dict[str, Any]]) -> dict[str, tuple[str, list[float]]]:
    """Every series: name -> (kind, values per sample); a copy or table that appears later
    (created on first use) counts as 0 before."""
    out: dict[str, tuple[str, list[float]]] = {}

    def put(name: str, kind: str, index: int, value: float) -> None:
        values = out.setdefault(name, (kind, [0.0] * len(samples)))[1]
        values[index] = value

    for i, sample in enumerate(samples):
        for name, value in sample["rss_mb"].items():
            put(f"rss_mb {name}", "rss_mb", i, value)
        put("db_mb all", "db_mb", i, sum(sample["db_mb"].values()))
        for name, value in sample["db_mb"].items():
            put(f"db_mb {name}", "db_mb", i, value)
        if sample["wal_mb"]:
            put("wal_mb all", "wal_mb", i, sum(sample["wal_mb"].values()))
        for name, value in sample["wal_mb"].items():
            put(f"wal_mb {name}", "wal_mb", i, value)
        totals: Counter[str] = Counter()
        for copy, tables in sample["rows"].items():
            for table, count in tables.items():
                put(f"rows {copy} {table}", "rows", i, count)
                totals[table] += count
        for table, count in totals.items():
            put(f"rows all {table}", "rows", i, count)
        for q in ("p50", "p99"):
            value = sample["load"][f"{q}_ms"]
            put(f"latency_ms {q}", "latency_ms", i, math.nan if value is None else value)
    return out


def kept_by_design(name: str) -> bool:
    """Series that grow with the orders created: the business tables and the databases of
    the unit cells (which hold them)."""
    parts = name.split(" ")
    if parts[0] == "rows":
        return parts[-1] in KEPT_TABLES
    return parts[0] == "db_mb" and (parts[1] == "all" or "cell-u" in parts[1] or "_u" in parts[1])


def verdicts(samples: Sequence[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    times = [s["t_s"] for s in samples]
    found: dict[str, Any] = {}
    for name, (kind, values) in series_of(samples).items():
        figures = verdict(times, values, tolerance, FLOORS[kind])
        figures["kept_by_design"] = kept_by_design(name)
        found[name] = figures
    return found


# -- the run ---------------------------------------------------------------------------------


def retention(args: argparse.Namespace) -> dict[str, int | float]:
    age = args.retention_s
    return {
        "changelog_positions_kept": args.changelog_kept,
        "changelog_age_s": age,
        "outbox_done_s": age,
        "idempotency_keys_s": max(60, age),
        "reservations_finished_s": age,
        "operations_kept": 10,
        "operations_s": age,
        "sweep_interval_s": args.sweep_s,
    }


def seed_products(config: TopologyConfig) -> None:
    headers = {"authorization": "Bearer " + issue_token(config.token_keys, admin=True)}
    url = config.region("hz").base_url
    with httpx.Client(timeout=10.0, headers=headers) as client:
        for i, sku in enumerate(SKUS):
            body = {"title": f"soak product {i}", "price_cents": 100 + 37 * i, "stock": STOCK}
            response = client.put(f"{url}/v1/admin/products/{sku}", json=body)
            if response.status_code != 200:
                raise BenchError(f"seeding {sku}: {response.status_code} {response.text}")
        # The products are written at hz; the other regions serve them from their copies of
        # the global cell, so reads there would be 404 until replication has brought them.
        deadline = time.monotonic() + CATALOG_TIMEOUT_S
        for region in config.region_names:
            path = f"{config.region(region).base_url}/v1/products?limit={len(SKUS)}"
            while len(client.get(path).json().get("products", [])) < len(SKUS):
                if time.monotonic() > deadline:
                    raise BenchError(f"{region} does not serve the catalog after seeding")
                time.sleep(0.05)


async def soak(
    args: argparse.Namespace, cluster: LocalCluster, storage: Storage, load: Load
) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    started = time.perf_counter()
    end = started + args.minutes * 60
    print_row_header()
    sample = await asyncio.to_thread(take_sample, cluster, storage)
    samples.append({"t_s": 0.0, **sample, "load": Window().figures(1.0)})
    print_row(samples[-1])
    runner = asyncio.create_task(load.run(stop))
    last = started
    try:
        while not runner.done():
            now = time.perf_counter()
            await asyncio.sleep(max(0.0, min(last + args.sample_s, end) - now))
            now = time.perf_counter()
            figures = load.take_window().figures(now - last)
            last = now
            async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                sample = await asyncio.to_thread(take_sample, cluster, storage)
            samples.append({"t_s": round(now - started, 1), **sample, "load": figures})
            print_row(samples[-1])
            if now >= end - END_SLACK_S:  # a sleep may end a little early
                break
            for name, process in cluster.processes.items():
                if process.poll() is not None:
                    raise BenchError(f"{name} exited with {process.returncode}")
    finally:
        stop.set()
        await runner
    return samples


def print_row_header() -> None:
    rows = " / ".join(SUMMARY_TABLES)
    print(
        "| t s | ok/s | errors | late | p50 ms | p99 ms | DB MB | WAL MB | "
        "RSS MB (hz/sh/bj/control) | "
        f"rows, all copies: {rows} |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")


def print_row(sample: dict[str, Any]) -> None:
    load = sample["load"]
    totals: Counter[str] = Counter()
    for tables in sample["rows"].values():
        totals.update(tables)
    rss = "/".join(f"{v:.0f}" for v in sample["rss_mb"].values())
    rows = " / ".join(str(totals.get(t, 0)) for t in SUMMARY_TABLES)
    print(
        f"| {sample['t_s']:.0f} | {load['ok_per_s']:.1f} | {sum(load['errors'].values())} | "
        f"{load['late']} | {fmt(load['p50_ms'])} | {fmt(load['p99_ms'])} | "
        f"{sum(sample['db_mb'].values()):.1f} | {sum(sample['wal_mb'].values()):.1f} | "
        f"{rss} | {rows} |",
        flush=True,
    )


def fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def print_verdicts(results: dict[str, Any]) -> None:
    found = results["verdicts"]
    rule = results["settings"]["verdict_rule"]
    if not any("first_quarter_mean" in f for f in found.values()):
        print(f"\nno verdicts: fewer than {VERDICT_SAMPLES_MIN} samples")
        return
    print(f"\nverdicts ({rule})")
    print("| series | first quarter | last quarter | allowed growth | slope / h | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    shown = [
        n
        for n, f in found.items()
        if not n.startswith(("rows ", "db_mb ", "wal_mb "))
        or n.startswith(("rows all", "db_mb all", "wal_mb all"))
    ]
    shown += [
        n
        for n, f in found.items()
        if n not in shown and f["verdict"] == "growing" and not f["kept_by_design"]
    ]
    for name in shown:
        f = found[name]
        if "first_quarter_mean" not in f:
            print(f"| {name} | - | - | - | - | {f['verdict']} |")
            continue
        word = f["verdict"] + (" (kept by design)" if f["kept_by_design"] else "")
        print(
            f"| {name} | {f['first_quarter_mean']:.1f} | {f['last_quarter_mean']:.1f} | "
            f"{f['allowed_growth']:.1f} | {f['slope_per_hour']:.1f} | {word} |"
        )
    counts = Counter(f["verdict"] for f in found.values())
    unexpected = [
        n for n, f in found.items() if f["verdict"] == "growing" and not f["kept_by_design"]
    ]
    print(
        f"\n{len(found)} series: {dict(counts)}; growing and not kept by design: "
        f"{len(unexpected)} (each copy's table and each database are in the JSON)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()  # before the run: src/ may change while it runs
    busy_before = busy_before_run()
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-soak-"))
    ports = free_ports(4)
    prefix = f"ut_soak_{uuid.uuid4().hex[:8]}"
    storage: Storage = SqliteStorage(data_dir / "unitrade")
    pg_storage = pg_control = None
    if args.storage == "postgresql":
        pg_storage = f"{PG_SERVER}/{prefix}_{{region}}_{{cell}}"
        pg_control = f"{PG_SERVER}/{prefix}_control"
        storage = PostgresStorage(prefix)
    config_path = data_dir / "topology.toml"
    config = write_topology(
        config_path, ports, pg_storage, pg_control, {"retention": retention(args)}
    )
    cluster = LocalCluster(config, data_dir / "unitrade", config_path)
    rule_buyers = home_buyers(config, args.buyers_per_region)
    buyers = [
        Buyer(b, region, issue_token(config.token_keys, buyer_id=b))
        for region, ids in rule_buyers.items()
        for b in ids
    ]
    load = Load(Workload(config, buyers, seed=1), args.rate, args.in_flight)
    try:
        print(
            f"data in {data_dir}; regions on ports {ports[:3]}, control on {ports[3]}; "
            f"{args.storage}; retention {retention(args)}",
            flush=True,
        )
        cluster.start()
        seed_products(config)
        print(
            f"soak: {args.rate:g} requests/s for {args.minutes:g} min, a sample every "
            f"{args.sample_s:g} s",
            flush=True,
        )
        samples = uvloop.run(soak(args, cluster, storage, load))
    finally:
        print("stopping processes...", flush=True)
        cluster.stop()
        with contextlib.suppress(Exception):
            if not args.keep_data:
                storage.cleanup()
        if args.keep_data:
            print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    results = report(args, source, busy_before, samples, load)
    print_verdicts(results)
    return results


def report(
    args: argparse.Namespace,
    source: dict[str, Any],
    busy_before: float,
    samples: list[dict[str, Any]],
    load: Load,
) -> dict[str, Any]:
    total = load.total
    return {
        **run_header("bench_soak", args.label, source, busy_before),
        "settings": {
            "minutes": args.minutes,
            "rate": args.rate,
            "sample_s": args.sample_s,
            "storage": args.storage,
            "in_flight": args.in_flight,
            "buyers_per_region": args.buyers_per_region,
            "mix": MIX,
            "forwarded_share": FORWARDED_SHARE,
            "retention": retention(args),
            "tolerance": args.tolerance,
            "floors": FLOORS,
            "verdict_rule": (
                "first half is warm-up; flat when the mean of the second half's last quarter "
                "exceeds that of its first quarter by at most max(tolerance x first, floor)"
            ),
        },
        "client": {
            "sent": total.sent,
            "ok": total.ok,
            "late": total.late,
            "errors": dict(total.errors),
            "error_samples": load.error_bodies,
            "ok_by_kind": dict(total.by_kind),
            "connections_opened": load.pool.opened,
        },
        "samples": samples,
        "verdicts": verdicts(samples, args.tolerance),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_soak",
        description="Soak: a steady mixed workload; are databases, memory and tables flat?",
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s, all kinds")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--storage", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--in-flight", type=int, default=64, help="bound on open requests")
    parser.add_argument("--buyers-per-region", type=int, default=200)
    parser.add_argument(
        "--retention-s",
        type=int,
        default=90,
        help="age after which changelog, outbox, idempotency keys, reservations may go",
    )
    parser.add_argument("--sweep-s", type=float, default=5.0, help="retention sweep interval")
    parser.add_argument(
        "--changelog-kept", type=int, default=1000, help="changelog positions always kept"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.1, help="relative growth still called flat"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep-data", action="store_true", help="keep the data (and PG dbs)")
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60 or not 0 < args.rate <= 10_000:
        parser.error("need 0 < --minutes <= 1440 and 0 < --rate <= 10000")
    if not 1 <= args.sample_s <= 3600 or not 1 <= args.in_flight <= 4096:
        parser.error("need 1 <= --sample-s <= 3600 and 1 <= --in-flight <= 4096")
    if not 1 <= args.buyers_per_region <= 100_000 or not 0 <= args.tolerance <= 10:
        parser.error("need 1 <= --buyers-per-region <= 100000 and 0 <= --tolerance <= 10")
    if args.minutes * 60 / args.sample_s < VERDICT_SAMPLES_MIN:
        print(f"WARNING: fewer than {VERDICT_SAMPLES_MIN} samples: no verdicts", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A hard bound on the whole run; the handler raises, so the processes are still stopped.
    budget = args.minutes * 60 + 2 * SAMPLE_TIMEOUT_S + DRAIN_S + 180
    return run_bounded(run, args, budget)


if __name__ == "__main__":
    sys.exit(main())
