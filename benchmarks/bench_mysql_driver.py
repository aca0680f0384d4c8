"""Which MySQL/MariaDB driver a cell copy runs on (docs/benchmarks.md, MySQL drivers).

    .venv/bin/python -m benchmarks.bench_mysql_driver [--n 2000] [--json out.json]

The same cell store (storage/store.py) on one MariaDB/MySQL server, side by side in one run:

- `asyncmy` and `aiomysql`: the asyncio drivers, transactions on the event loop (SQLAlchemy
  runs the store's sync work functions in a greenlet);
- `pymysql` and `mysqldb` (mysqlclient, if installed): sync drivers on the store's threads,
  as PostgreSQL's psycopg runs (`psycopg` is measured too, for reference, when PostgreSQL
  is up).

Each variant runs, on a database of its own:

1. a typical order write: the cell lock, the order-ID row read and updated (read back by
   key where there is no UPDATE ... RETURNING), an order, two lines and the buyer's index
   inserted, five changelog rows: sequentially (latency p50/p99), then 16 at a time
   (throughput: the cell lock serialises them anyway);
2. a read of an order and its lines by key: sequentially, then 16 at a time over the
   copy's four readers.

CPU per operation is this process's (all threads: what a region process pays) and the
database server's (`mariadbd`/`mysqld` from /proc, if it runs on this machine). Everything
is bounded by --n and the time budget; the databases are dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select

from benchmarks.harness import (
    busy_before_run,
    cpu_seconds,
    run_bounded,
    run_header,
    self_cpu_seconds,
    source_info,
)
from unitrade.storage.fence import Fence
from unitrade.storage.schema import buyer_orders, id_sequences, order_lines, orders
from unitrade.storage.store import CellStore, WriteTx, by_key, key_params
from unitrade.topology.config import default_config
from unitrade.topology.rule import initial_rule

BUDGET_S = 900
CONCURRENCY = 16
MYSQL_DEFAULT = "mysql://root@127.0.0.1:3306"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432"
CELL = 1  # u1, owned by hz in the default topology
DRIVERS = ("asyncmy", "aiomysql", "pymysql", "mysqldb")
_LINES = select(order_lines).where(order_lines.c.order_id == bindparam("order_id"))


def write_order(order_id: int, buyer: int) -> Callable[[WriteTx], int]:
    def work(tx: WriteTx) -> int:
        row = tx.get(id_sequences, {"cell_id": CELL})
        if row is None:
            tx.insert(id_sequences, {"cell_id": CELL, "time_s": 1, "next_sequence": 1})
        else:
            tx.update(id_sequences, {"cell_id": CELL}, {"next_sequence": row.next_sequence + 1})
        tx.insert(
            orders,
            {
                "order_id": order_id,
                "buyer_id": buyer,
                "cell_id": CELL,
                "status": "created",
                "total_cents": 1234,
                "document": '{"lines":[["SKU-1",1],["SKU-2",2]],"note":"' + "x" * 300 + '"}',
                "payment_id": None,
                "idempotency_key": None,
                "created_ms": order_id,
                "updated_ms": order_id,
                "version": 1,
            },
        )
        for line_no, sku in enumerate(("SKU-1", "SKU-2"), start=1):
            tx.insert(
                order_lines,
                {
                    "order_id": order_id,
                    "line_no": line_no,
                    "sku": sku,
                    "qty": line_no,
                    "price_cents": 411,
                },
            )
        tx.insert(buyer_orders, {"buyer_id": buyer, "created_ms": order_id, "order_id": order_id})
        return order_id

    return work


def read_order(order_id: int) -> Callable[[Connection], int]:
    def work(conn: Connection) -> int:
        order = conn.execute(by_key(orders), key_params({"order_id": order_id})).first()
        assert order is not None, f"order {order_id} was not written"
        return len(conn.execute(_LINES, {"order_id": order_id}).all())

    return work


def server_pid() -> int | None:
    """The database server's process on this machine, if any."""
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() in ("mariadbd", "mysqld"):
                return int(stat.parent.name)
        except OSError:
            continue
    return None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(
    n: int, one: Callable[[int], Awaitable[Any]], concurrency: int, server: int | None
) -> dict[str, float]:
    """Run `one(i)` for i in range(n), `concurrency` at a time: latency, rate and CPU."""
    latencies: list[float] = []
    next_i = iter(range(n))

    async def worker() -> None:
        for i in next_i:
            started = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - started)

    cpu_before = self_cpu_seconds()
    server_before = cpu_seconds(server) if server else float("nan")
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    server_cpu = (cpu_seconds(server) - server_before) if server else float("nan")
    return {
        "ops_per_s": round(n / elapsed, 1),
        "p50_us": round(statistics.median(latencies) * 1e6, 1),
        "p99_us": round(percentile(latencies, 0.99) * 1e6, 1),
        "cpu_us_per_op": round((self_cpu_seconds() - cpu_before) / n * 1e6, 1),
        "server_cpu_us_per_op": round(server_cpu / n * 1e6, 1),
    }


async def one_variant(url: str, n: int, server: int | None) -> dict[str, Any]:
    rule = initial_rule(default_config())
    store = CellStore(rule.cells[CELL], "hz", url, Fence("hz", rule))
    await store.open()
    try:
        base = 10**12
        for i in range(50):  # warm the connections and the statement caches
            await store.write(write_order(base + i, i))
            await store.read(read_order(base + i))
        results: dict[str, Any] = {}
        first = base + 1_000

        async def write(offset: int) -> Callable[[int], Awaitable[Any]]:
            return lambda i: store.write(write_order(first + offset + i, i % 1000))

        results["write"] = await measure(n, await write(0), 1, server)
        results[f"write x{CONCURRENCY}"] = await measure(n, await write(n), CONCURRENCY, server)
        results["read"] = await measure(n, lambda i: store.read(read_order(first + i)), 1, server)
        results[f"read x{CONCURRENCY}"] = await measure(
            n, lambda i: store.read(read_order(first + n + i)), CONCURRENCY, server
        )
        return results
    finally:
        await store.close()


def drop(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    from unitrade.storage.engine import sync_url

    parsed = make_url(sync_url(url))
    name = parsed.database
    if parsed.get_backend_name() == "postgresql":
        admin = create_engine(
            parsed.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        statement = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    else:
        admin = create_engine(parsed.set(database=None), poolclass=NullPool)
        statement = f"DROP DATABASE IF EXISTS `{name}`"
    with admin.begin() as conn:
        conn.execute(text(statement))
    admin.dispose()


def available(driver: str) -> bool:
    module = {"mysqldb": "MySQLdb", "psycopg": "psycopg"}.get(driver, driver)
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run(args: argparse.Namespace) -> dict[str, Any]:
    busy = busy_before_run()
    server = server_pid()
    prefix = f"ut_bench_{uuid.uuid4().hex[:8]}"
    variants: dict[str, str] = {}
    for driver in DRIVERS:
        if available(driver):
            variants[driver] = f"{args.mysql.replace('mysql://', f'mysql+{driver}://')}/"
            variants[driver] += f"{prefix}_{driver}"
        else:
            print(f"{driver}: not installed, left out", file=sys.stderr)
    if args.postgres and available("psycopg"):
        variants["psycopg (PostgreSQL)"] = f"{args.postgres}/{prefix}_psycopg"
    results: dict[str, Any] = {}
    try:
        for name, url in variants.items():
            print(f"{name}...", flush=True)
            try:
                # PostgreSQL's server CPU is not counted: the pid found is MariaDB's.
                pid = server if url.startswith("mysql") else None
                results[name] = asyncio.run(one_variant(url, args.n, pid))
            except OSError as error:
                print(f"{name}: {error}; left out", file=sys.stderr)
    finally:
        for url in variants.values():
            try:
                drop(url)
            except Exception as error:  # a server that was never reached
                print(f"dropping {url}: {error}", file=sys.stderr)
    print_table(results)
    return {
        **run_header("bench_mysql_driver", args.label, source_info(), busy),
        "n": args.n,
        "concurrency": CONCURRENCY,
        "results": results,
    }


def print_table(results: dict[str, Any]) -> None:
    header = f"{'driver':<22}{'step':<12}{'ops/s':>9}{'p50 us':>9}{'p99 us':>9}"
    header += f"{'cpu us/op':>11}{'db cpu us/op':>14}"
    print("\n" + header)
    for name, steps in results.items():
        for step, figures in steps.items():
            print(
                f"{name:<22}{step:<12}{figures['ops_per_s']:>9}{figures['p50_us']:>9}"
                f"{figures['p99_us']:>9}{figures['cpu_us_per_op']:>11}"
                f"{figures['server_cpu_us_per_op']:>14}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="operations per step (100-100000)")
    parser.add_argument("--mysql", default=MYSQL_DEFAULT, help="server URL, no database")
    parser.add_argument(
        "--postgres", default=PG_DEFAULT, help="PostgreSQL server URL for reference; '' for none"
    )
    parser.add_argument("--label", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not 100 <= args.n <= 100_000:
        parser.error("--n is 100 to 100000")
    return run_bounded(run, args, BUDGET_S)


if __name__ == "__main__":
    sys.exit(main())
