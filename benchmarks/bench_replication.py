"""Replication benchmark (run on demand, not in CI): lag and apply rate, unitrade against
PostgreSQL's native logical replication.

    .venv/bin/python -m benchmarks.bench_replication [--rates 250,500,1000,2000,max]
        [--duration S] [--backlog-orders N] [--apply-rounds N] [--json PATH]
        [--profile DIR] [--no-postgres]

In one run it starts a three-region unitrade cluster (the default topology, SQLite, on free
ports) and, on the local PostgreSQL server (127.0.0.1:5432, needs `wal_level = logical`),
two fresh databases joined by a publication and a subscription, and measures:

0. **hz's capacity** (for the `max` rate): closed-loop orders/s at hz with the replicas
   following and with both stopped, and hz's CPU at 300 orders/s in both states.
1. **Lag at a fixed rate.** For each rate (`max`: --max-fraction of the capacity), orders
   are created open loop (paced: request i is due at t0 + i / rate, at most `--in-flight`
   outstanding) for `--duration` seconds, all sent to hz for hz-homed buyers: the writes
   land in the cells hz owns (its two unit cells and the center cell) and stream to sh and
   bj. For every changelog row of the phase, the lag is the time from its commit at the
   owner (the row's `created_ms`) to the moment the replica's copy has it (its checkpoint,
   `cell_meta.last_position`, passed the row's position). The replicas' checkpoints are
   polled every `--poll-ms` from a separate process that reads the replicas' SQLite files
   (read-only); a change is placed at the midpoint between the last poll that had not
   seen it and the first that had, so the error is +- half a poll interval (reported).
   Then PostgreSQL gets the same rows: the owner's changelog rows of the phase (row
   images), grouped into the same transactions and replayed into the source database at
   the same offsets from the phase start. Each row carries `src_ts = clock_timestamp()`
   from the source statement; the destination stamps `dst_ts = clock_timestamp()` in a
   trigger that fires on apply (`ENABLE ALWAYS TRIGGER`); the lag is dst_ts - src_ts of
   every inserted row.
2. **Apply rate.** unitrade: sh is stopped (SIGSTOP) while `--backlog-orders` orders are
   written at hz as fast as hz takes them (closed loop), then resumed (SIGCONT); rows/s =
   changelog rows sh applies / time from SIGCONT until sh has hz's last position in every
   cell. PostgreSQL: the subscription is disabled, the same rows are written at the
   source, a marker row last, the subscription is enabled; rows/s = rows / time from
   ENABLE until the marker is visible at the destination (the destination's stamping
   trigger is disabled for this phase, so PostgreSQL pays nothing extra). `--apply-rounds`
   rounds, unitrade then PostgreSQL in each; the ratio is the median of the rounds'.
3. With `--profile DIR`, two extra phases that are not counted: py-spy on hz and sh during
   open-loop load at `--profile-rate`, and during a catch-up.

Everything listens on and targets 127.0.0.1 on free ports (never 8700-8703); every phase is
bounded in time; every process the benchmark starts is stopped, and the subscription, its
slot, the publication and both databases are dropped, on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
import uvloop
from psycopg.conninfo import make_conninfo
from sqlalchemy import Table
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.schema import CreateIndex, CreateTable

from benchmarks.bench_orders import (
    BUYERS_PER_REGION,
    OTHER_CORES_MAX,
    SKU_COUNT,
    Setup,
    closed_loop,
    print_profile,
    seed,
    summarise_profile,
)
from benchmarks.harness import (
    HOST,
    STOP_TIMEOUT_S,
    BenchError,
    Connection,
    busy_before_run,
    cpu_seconds,
    free_ports,
    home_buyers,
    machine_busy_seconds,
    run_bounded,
    run_header,
    self_cpu_seconds,
    source_info,
    source_line,
    write_topology,
)
from unitrade.cluster import LocalCluster
from unitrade.storage.schema import center, unit
from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.topology.rule import initial_rule

OWNER = "hz"
REPLICAS = ("sh", "bj")
STOPPED_REPLICA = "sh"  # the replica stopped for the apply-rate phase
IN_FLIGHT_MAX = 64
IDLE_REUSE_S = 2.0  # a keep-alive connection idle longer than this is not reused
LATE_S = 0.05  # a request sent later than this after its due time counts as late
SUSTAINED_RATIO = 0.95  # achieved / target rate for a rate to count as sustained
LATE_SHARE_MAX = 0.01
CONVERGE_TIMEOUT_S = 120.0
HEALTHZ_EVERY_S = 0.2
SPIKE_SLOT_MS = 100  # the lag timeline's resolution (JSON `spikes`)
SPIKE_LAG_MS = 60.0  # a slot whose worst lag passes this is listed
PG_CONNECTIONS = 32
PG_MARKER_TIMEOUT_S = 120.0
PG_STATEMENT_TIMEOUT_MS = 60_000
TARGET_LAG_P99_MS = 100.0
TARGET_LAG_RATE = 1000
TARGET_APPLY_RATIO = 0.5
# A cell's changelog rows are grouped into the transactions that wrote them: rows of one
# transaction share `created_ms` (stamped once per commit), and the transactions of order
# creation end with these tables (reserve: inventory updates, then the reservation; order:
# the order, its lines, then the buyer's index; an order-ID segment is a transaction alone).
TXN_LAST_TABLES = frozenset({"buyer_orders", "reservations", "id_sequences"})
PG_TABLES: dict[str, Table] = {**unit.tables, **center.tables}
INSERTED_TABLES = ("orders", "order_lines", "buyer_orders", "reservations")


def now_s() -> float:
    return time.time()


# -- polling the replicas' checkpoints (a separate process) ------------------------------------

_POSITION_SQL = "SELECT last_position FROM cell_meta"

# The polling process runs this, not this module: importing the benchmark (SQLAlchemy,
# psycopg, unitrade) would cost more CPU than a whole phase of polling.
_POLLER = r"""
import json, os, select, sqlite3, sys, time
interval_s, max_s, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
dbs = [sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None) for p in sys.argv[4:]]
sql = "SELECT last_position FROM cell_meta"
last = [-1] * len(dbs)
before_previous = [time.time()] * len(dbs)
events = []
polls = 0
print("ready", flush=True)
cpu = os.times()
started = next_tick = time.monotonic()
while time.monotonic() - started < max_s:
    if select.select([sys.stdin], [], [], 0)[0]:
        break
    for i, db in enumerate(dbs):
        before = time.time()
        position = db.execute(sql).fetchone()[0]
        after = time.time()
        if position != last[i]:
            events.append((before_previous[i], after, i, position))
            last[i] = position
        before_previous[i] = before
    polls += 1
    next_tick += interval_s
    delay = next_tick - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    else:
        next_tick = time.monotonic()
seconds = time.monotonic() - started
used = os.times()
cpu_s = used.user + used.system - cpu.user - cpu.system
with open(out, "w") as f:
    json.dump({"events": events, "polls": polls, "seconds": seconds, "cpu_s": cpu_s}, f)
print("done", flush=True)
"""


class Copies:
    """Read-only connections to SQLite cell copies, to read their checkpoints."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.dbs = [
            sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None) for p in paths
        ]

    def positions(self) -> list[int]:
        return [int(db.execute(_POSITION_SQL).fetchone()[0]) for db in self.dbs]

    def close(self) -> None:
        for db in self.dbs:
            db.close()


class Poller:
    """A process that reads the checkpoints of `paths` every `interval_s` until stopped (or
    `max_s` passed) and records each change as (time before the previous read of that copy,
    time after the read that saw it, copy index, position): the copy reached the position
    between the two."""

    def __init__(
        self,
        paths: Sequence[Path | str],
        interval_s: float,
        max_s: float,
        script: str = _POLLER,
    ) -> None:
        """`script`: the polling program (argv: interval, max, output file, *paths), e.g. one
        that reads the checkpoints from a database server instead of SQLite files."""
        self.out = Path(tempfile.mkstemp(prefix="bench-repl-poll-", suffix=".json")[1])
        command = [sys.executable, "-c", script, str(interval_s), str(max_s), str(self.out)]
        self.process = subprocess.Popen(
            [*command, *(str(p) for p in paths)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            self.kill()
            raise BenchError("the polling process did not start")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "done":
            raise BenchError("the polling process failed")
        self.process.wait(timeout=STOP_TIMEOUT_S)
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.out.unlink(missing_ok=True)


def first_seen(events: list[tuple[float, float, int, int]], index: int) -> PositionTimes:
    return PositionTimes([e for e in events if e[2] == index])


class PositionTimes:
    """When one copy's checkpoint reached each position: (lower, upper) bounds in seconds."""

    def __init__(self, events: list[tuple[float, float, int, int]]) -> None:
        self.events = sorted(events, key=lambda e: e[3])
        self.positions = [e[3] for e in self.events]

    def bounds(self, position: int) -> tuple[float, float] | None:
        at = bisect.bisect_left(self.positions, position)
        if at == len(self.positions):
            return None
        event = self.events[at]
        return event[0], event[1]


# -- the unitrade side --------------------------------------------------------------------------


@dataclass
class Change:
    cell: int
    position: int
    created_ms: int
    tbl: str
    pk: str
    op: str
    row_image: str | None


def read_changes(path: Path, cell: int, after: int, upto: int) -> list[Change]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT position, created_ms, tbl, pk, op, row_image FROM changelog "
            "WHERE position > ? AND position <= ? ORDER BY position",
            (after, upto),
        ).fetchall()
    return [Change(cell, *row) for row in rows]


def transactions(changes: Sequence[Change]) -> list[list[Change]]:
    """One cell's changelog rows grouped into the transactions that wrote them."""
    found: list[list[Change]] = []
    current: list[Change] = []
    for change in changes:
        if current and change.created_ms != current[-1].created_ms:
            found.append(current)
            current = []
        current.append(change)
        if change.tbl in TXN_LAST_TABLES:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


@dataclass
class Cluster:
    config: TopologyConfig
    setup: Setup
    data_dir: Path
    cells: dict[int, str]  # the cells hz owns that order creation writes: id -> name
    readers: dict[str, Copies] = field(default_factory=dict)  # region -> its copies of them

    def path(self, region: str, cell: int) -> Path:
        return self.setup.cluster.data_dir / region / f"cell-{self.cells[cell]}.db"

    def paths(self, regions: Sequence[str]) -> list[Path]:
        return [self.path(r, c) for r in regions for c in self.cells]

    def pid(self, region: str) -> int:
        return self.setup.cluster.processes[region].pid

    def server_pids(self) -> dict[str, int]:
        """Database servers the copies live on, whose CPU counts too (none for SQLite)."""
        return {}

    def poller(self, regions: Sequence[str], interval_s: float, max_s: float) -> Poller:
        """A polling process for the checkpoints of `regions`' copies (regions, then cells)."""
        return Poller(self.paths(regions), interval_s, max_s)

    def positions(self, region: str) -> dict[int, int]:
        """The checkpoint of each of `region`'s copies, read from its SQLite files."""
        if region not in self.readers:
            self.readers[region] = Copies(self.paths([region]))
        return dict(zip(self.cells, self.readers[region].positions(), strict=True))

    def heads(self) -> dict[int, int]:
        return self.positions(OWNER)

    def wait_converged(self, regions: Sequence[str], timeout_s: float) -> dict[int, int]:
        """Wait until the copies of `regions` have the owner's position in every cell."""
        deadline = time.monotonic() + timeout_s
        while True:
            heads = self.heads()
            seen = {region: self.positions(region) for region in regions}
            if all(seen[r][c] >= heads[c] for r in regions for c in self.cells):
                return heads
            if time.monotonic() > deadline:
                raise BenchError(f"replicas not caught up after {timeout_s:.0f} s: {seen}")
            time.sleep(0.005)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()

    def changes(self, before: dict[int, int], after: dict[int, int]) -> list[Change]:
        found: list[Change] = []
        for cell in self.cells:
            found += read_changes(self.path(OWNER, cell), cell, before[cell], after[cell])
        return found


@dataclass
class LoadResult:
    target_rate: float
    duration_s: float
    sent: int = 0
    completed: int = 0  # 201s answered within the phase
    answered: int = 0  # all 201s, also those answered after the phase
    late: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_sample: str = ""
    latencies_s: list[float] = field(default_factory=list)  # from the due time
    in_flight_max: int = 0
    healthz_lag_ms_max: dict[str, int] = field(default_factory=dict)
    healthz_lag_positions_max: dict[str, int] = field(default_factory=dict)
    started_s: float = 0.0  # wall clock
    ended_s: float = 0.0

    @property
    def achieved(self) -> float:
        return self.completed / self.duration_s

    @property
    def sustained(self) -> bool:
        return (
            self.achieved >= SUSTAINED_RATIO * self.target_rate
            and self.late <= LATE_SHARE_MAX * max(1, self.sent)
            and not self.errors
        )


def healthz_request(port: int) -> bytes:
    return f"GET /healthz HTTP/1.1\r\nhost: {HOST}:{port}\r\n\r\n".encode()


async def sample_healthz(
    ports: dict[str, int], cells: set[str], result: LoadResult, stop: asyncio.Event
) -> None:
    """Every HEALTHZ_EVERY_S: each replica's `replication` lag_ms and lag_positions of the
    streams of `cells` (the coarse view an operator has)."""
    connections = {region: Connection(port) for region, port in ports.items()}
    try:
        while not stop.is_set():
            for region, connection in connections.items():
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, BenchError):
                    reply = await connection.send(healthz_request(ports[region]))
                    for stream in orjson.loads(reply.body)["replication"]:
                        if stream["cell_name"] not in cells:
                            continue
                        key = f"{region}/{stream['cell_name']}"
                        lag_ms = result.healthz_lag_ms_max
                        lag_ms[key] = max(lag_ms.get(key, 0), int(stream["lag_ms"]))
                        lag_pos = result.healthz_lag_positions_max
                        lag_pos[key] = max(lag_pos.get(key, 0), int(stream["lag_positions"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEALTHZ_EVERY_S)
    finally:
        for connection in connections.values():
            connection.close()


async def open_loop(
    requests: Iterator[tuple[int, bytes]],
    rate: float,
    duration_s: float,
    in_flight_max: int,
    healthz_ports: dict[str, int],
    healthz_cells: set[str],
) -> LoadResult:
    """Request i is due at t0 + i / rate; at most `in_flight_max` outstanding (one keep-alive
    connection each). Nothing is sent after t0 + duration: a rate the server cannot take
    shows as late requests and a lower achieved rate."""
    result = LoadResult(rate, duration_s)
    clock = time.perf_counter
    idle: list[tuple[Connection, float]] = []  # with when it was last answered
    slots = asyncio.Semaphore(in_flight_max)
    tasks: set[asyncio.Task[None]] = set()
    in_flight = 0
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_healthz(healthz_ports, healthz_cells, result, stop))

    async def one(port: int, request: bytes, due: float) -> None:
        nonlocal in_flight
        connection = Connection(port)
        while idle:
            reused, answered_at = idle.pop()
            if clock() - answered_at < IDLE_REUSE_S:
                connection = reused
                break
            reused.close()  # the server may be closing it (uvicorn: keep-alive 5 s)
        in_flight += 1
        result.in_flight_max = max(result.in_flight_max, in_flight)
        try:
            reply = await connection.send(request)
        except (OSError, asyncio.IncompleteReadError, BenchError) as exc:
            result.errors[type(exc).__name__] += 1
            return
        finally:
            in_flight -= 1
            slots.release()
            if connection.writer is not None:
                idle.append((connection, clock()))
        end = clock()
        if reply.status != 201:
            result.errors[str(reply.status)] += 1
            result.error_sample = result.error_sample or reply.body[:300].decode()
            return
        result.answered += 1
        if end <= deadline:
            result.completed += 1
            result.latencies_s.append(end - due)

    await asyncio.sleep(0.05)
    t0 = clock()
    deadline = t0 + duration_s
    result.started_s = now_s()
    i = 0
    while True:
        due = t0 + i / rate
        if due >= deadline:
            break
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        if clock() >= deadline:
            slots.release()
            break
        if clock() - due > LATE_S:
            result.late += 1
        port, request = next(requests)
        task = asyncio.create_task(one(port, request, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        result.sent += 1
        i += 1
    if tasks:
        await asyncio.wait(tasks, timeout=30.0)
    result.ended_s = now_s()
    stop.set()
    await sampler
    for connection, _ in idle:
        connection.close()
    return result


async def closed_loop_count(
    requests: Iterator[tuple[int, bytes]], count: int, concurrency: int
) -> Counter[str]:
    """Exactly `count` requests, `concurrency` at a time, as fast as they are answered."""
    remaining = count
    outcome: Counter[str] = Counter()

    async def worker() -> None:
        nonlocal remaining
        connection: Connection | None = None
        try:
            while remaining > 0:
                remaining -= 1
                port, request = next(requests)
                connection = connection or Connection(port)
                try:
                    reply = await connection.send(request)
                    outcome[str(reply.status)] += 1
                except (OSError, asyncio.IncompleteReadError, BenchError) as exc:
                    outcome[type(exc).__name__] += 1
                    connection = None
        finally:
            if connection is not None:
                connection.close()

    async with asyncio.timeout(count * 0.05 + 60.0):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcome


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "max": math.nan}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "p50": round(at(0.5), 2),
        "p90": round(at(0.9), 2),
        "p99": round(at(0.99), 2),
        "max": round(ordered[-1], 2),
    }


def lag_figures(
    cluster: Cluster, changes: Sequence[Change], polled: dict[str, Any]
) -> dict[str, Any]:
    """Per replica and together: the lag of every change (ms), and the error bar."""
    events = polled["events"]
    copies = [(r, c) for r in REPLICAS for c in cluster.cells]  # the poller's order
    index = {copy: i for i, copy in enumerate(copies)}
    by_replica: dict[str, list[float]] = {r: [] for r in REPLICAS}
    widths: list[float] = []
    missing = 0
    times = {key: first_seen(events, i) for key, i in index.items()}
    start_ms = min((c.created_ms for c in changes), default=0)
    worst_by_slot: dict[int, float] = {}  # SPIKE_SLOT_MS slot of the commit -> worst lag
    for change in changes:
        committed_ms = change.created_ms + 0.5  # created_ms is floored to the millisecond
        for replica in REPLICAS:
            bounds = times[(replica, change.cell)].bounds(change.position)
            if bounds is None:
                missing += 1
                continue
            low, high = bounds
            lag_ms = max(0.0, (low + high) / 2 * 1000 - committed_ms)
            by_replica[replica].append(lag_ms)
            widths.append((high - low) * 1000)
            slot = int((change.created_ms - start_ms) // SPIKE_SLOT_MS)
            worst_by_slot[slot] = max(worst_by_slot.get(slot, 0.0), lag_ms)
    together = [x for values in by_replica.values() for x in values]
    interval_ms = 1000 * polled["seconds"] / max(1, polled["polls"])
    return {
        "all": percentiles(together),
        **{replica: percentiles(values) for replica, values in by_replica.items()},
        "missing": missing,
        # When the tail happened: (seconds into the phase, worst lag ms) of every slot whose
        # worst lag passed SPIKE_LAG_MS, by commit time.
        "first_commit_ms": start_ms,
        "spikes": [
            (round(slot * SPIKE_SLOT_MS / 1000, 1), round(worst, 1))
            for slot, worst in sorted(worst_by_slot.items())
            if worst > SPIKE_LAG_MS
        ],
        "poll_interval_ms": round(interval_ms, 2),
        "error_bar_ms": round(percentiles(widths)["p50"] / 2 + 0.5, 2) if widths else math.nan,
        "poller_cpu_cores": round(polled["cpu_s"] / max(polled["seconds"], 1e-9), 3),
    }


# -- PostgreSQL ----------------------------------------------------------------------------------


def sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    assert "\x00" not in text
    return "'" + text.replace("'", "''") + "'"


def change_sql(
    change: Change,
    stamp: str | None = "clock_timestamp()",
    quote: Callable[[str], str] = str,
) -> str:
    """One changelog row as the SQL statement that makes it, setting `src_ts` to `stamp`
    (None: no `src_ts` column); `quote` quotes an identifier (MySQL: `lines` is reserved)."""
    table = quote(PG_TABLES[change.tbl].name)
    key = orjson.loads(change.pk)
    where = " AND ".join(f"{quote(c)} = {sql_literal(v)}" for c, v in key.items())
    if change.op == "d":
        return f"DELETE FROM {table} WHERE {where}"
    assert change.row_image is not None
    image = orjson.loads(change.row_image)
    stamped = [] if stamp is None else [("src_ts", stamp)]
    if change.op == "i":
        columns = ", ".join([*(quote(c) for c in image), *(c for c, _ in stamped)])
        values = ", ".join([*(sql_literal(v) for v in image.values()), *(v for _, v in stamped)])
        return f"INSERT INTO {table} ({columns}) VALUES ({values})"
    assigned = [f"{quote(c)} = {sql_literal(v)}" for c, v in image.items() if c not in key]
    assigned += [f"{c} = {v}" for c, v in stamped]
    return f"UPDATE {table} SET {', '.join(assigned)} WHERE {where}"


def transaction_sql(
    rows: Sequence[Change],
    stamp: str | None = "clock_timestamp()",
    quote: Callable[[str], str] = str,
) -> str:
    return ";\n".join(["BEGIN", *(change_sql(r, stamp, quote) for r in rows), "COMMIT"])


@dataclass
class Schedule:
    """Transactions to replay at the source, each at an offset (s) from the start."""

    items: list[tuple[float, str]]
    rows: int
    inserted_rows: int

    @classmethod
    def of(
        cls,
        changes: Sequence[Change],
        start_s: float | None,
        to_sql: Callable[[Sequence[Change]], str] = transaction_sql,
    ) -> Schedule:
        """From changelog rows of any cells; offsets from `start_s` (wall clock), or all at
        once when None; `to_sql` writes a transaction's SQL."""
        by_cell: dict[int, list[Change]] = {}
        for change in changes:
            by_cell.setdefault(change.cell, []).append(change)
        txns = [t for rows in by_cell.values() for t in transactions(rows)]
        txns.sort(key=lambda t: (t[0].created_ms, t[0].cell, t[0].position))
        items = []
        for txn in txns:
            offset = 0.0 if start_s is None else max(0.0, txn[0].created_ms / 1000 - start_s)
            items.append((offset, to_sql(txn)))
        inserted = sum(1 for c in changes if c.op == "i" and c.tbl in INSERTED_TABLES)
        return cls(items, len(changes), inserted)


@dataclass
class ReplayResult:
    transactions: int = 0
    late: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_sample: str = ""
    seconds: float = 0.0
    started_s: float = 0.0


async def replay(
    dsn: str,
    schedule: Schedule,
    connections: int,
    measured: Measured | None = None,
    then: Callable[[], None] | None = None,
) -> ReplayResult:
    """Run the schedule's transactions at their offsets (one round trip each: simple-query
    protocol, BEGIN ... COMMIT in one message) on a pool of connections, then `then()`.
    `measured` covers both, and not the pool's connection set-up and close (the backends
    of a closed connection are gone before their CPU can be read)."""
    result = ReplayResult()
    pool = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(connections)]
    idle = asyncio.Queue[psycopg.AsyncConnection[Any]]()
    for connection in pool:
        idle.put_nowait(connection)
    tasks: set[asyncio.Task[None]] = set()
    clock = time.perf_counter

    async def one(connection: psycopg.AsyncConnection[Any], sql: str) -> None:
        try:
            await connection.execute(sql.encode())
        except psycopg.Error as exc:
            result.errors[type(exc).__name__] += 1
            result.error_sample = result.error_sample or str(exc)[:300]
            with contextlib.suppress(psycopg.Error):
                await connection.execute(b"ROLLBACK")
        finally:
            idle.put_nowait(connection)

    async def run_schedule() -> None:
        t0 = clock()
        result.started_s = now_s()
        for offset, sql in schedule.items:
            delay = t0 + offset - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            connection = await idle.get()
            if clock() - (t0 + offset) > LATE_S:
                result.late += 1
            task = asyncio.create_task(one(connection, sql))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            result.transactions += 1
        if tasks:
            await asyncio.wait(tasks, timeout=120.0)
        result.seconds = clock() - t0
        if then is not None:
            then()

    try:
        with measured or contextlib.nullcontext():
            await run_schedule()
    finally:
        for connection in pool:
            await connection.close()
    return result


def postgres_processes_cpu() -> dict[int, float]:
    """pid -> CPU seconds of every process named `postgres` (the server, its backends)."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "postgres":
                value = cpu_seconds(int(entry.name))
                if not math.isnan(value):
                    found[int(entry.name)] = value
    return found


class PgPair:
    """Two databases on the local server, a publication and a subscription between them."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        tag = secrets.token_hex(4)
        self.src = f"bench_repl_src_{tag}"
        self.dst = f"bench_repl_dst_{tag}"
        self.publication = f"bench_repl_pub_{tag}"
        self.subscription = f"bench_repl_sub_{tag}"
        self.slot = f"bench_repl_slot_{tag}"
        self.created: list[str] = []
        self.marker = 0
        self._kept: dict[str, psycopg.Connection[Any]] = {}  # for the markers
        self.retry_interval_s = 5.0  # wal_retrieve_retry_interval, read in setup()
        self.launcher_woken = time.monotonic()

    def dsn(self, database: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=database)

    def connect(self, database: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(database), autocommit=True)

    @staticmethod
    def check(admin_dsn: str) -> dict[str, Any]:
        """wal_level, version and the other clients of the server right now."""
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            wal_level = conn.execute("SHOW wal_level").fetchone()
            version = conn.execute("SHOW server_version").fetchone()
            others = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid() AND coalesce(datname, '') NOT LIKE 'bench_repl_%'"
            ).fetchone()
        assert wal_level and version and others
        return {"wal_level": wal_level[0], "version": version[0], "other_clients": others[0]}

    def setup(self) -> None:
        with self.connect("postgres") as admin:
            for database in (self.src, self.dst):
                admin.execute(f"CREATE DATABASE {database}".encode())
                self.created.append(database)
        dialect = PGDialect()  # type: ignore[no-untyped-call]
        for database in (self.src, self.dst):
            with self.connect(database) as conn:
                for table in PG_TABLES.values():
                    conn.execute(str(CreateTable(table).compile(dialect=dialect)).encode())
                    for index in table.indexes:
                        conn.execute(str(CreateIndex(index).compile(dialect=dialect)).encode())
                    conn.execute(f"ALTER TABLE {table.name} ADD COLUMN src_ts timestamptz".encode())
                conn.execute(
                    b"CREATE TABLE bench_marker (id integer PRIMARY KEY, "
                    b"src_ts timestamptz NOT NULL DEFAULT clock_timestamp())"
                )
        with self.connect(self.dst) as conn:
            conn.execute(
                b"CREATE FUNCTION stamp_dst() RETURNS trigger LANGUAGE plpgsql AS "
                b"$$ BEGIN NEW.dst_ts := clock_timestamp(); RETURN NEW; END $$"
            )
            for table in PG_TABLES.values():
                name = table.name
                conn.execute(f"ALTER TABLE {name} ADD COLUMN dst_ts timestamptz".encode())
                conn.execute(
                    f"CREATE TRIGGER stamp_dst BEFORE INSERT OR UPDATE ON {name} "
                    f"FOR EACH ROW EXECUTE FUNCTION stamp_dst()".encode()
                )
            self.set_stamping(conn, True)
        with self.connect(self.src) as conn:
            conn.execute(f"SET statement_timeout = {PG_STATEMENT_TIMEOUT_MS}".encode())
            conn.execute(f"CREATE PUBLICATION {self.publication} FOR ALL TABLES".encode())
            # Created here, not by CREATE SUBSCRIPTION: a subscription in the same cluster
            # that creates its own slot hangs (the slot waits for the creating transaction).
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))
        with self.connect(self.dst) as conn:
            source = make_conninfo(self.admin_dsn, dbname=self.src)
            conn.execute(
                f"CREATE SUBSCRIPTION {self.subscription} CONNECTION '{source}' "
                f"PUBLICATION {self.publication} WITH (create_slot = false, "
                f"slot_name = '{self.slot}', copy_data = false)".encode()
            )
        self.wait_worker(running=True)
        self.launcher_woken = time.monotonic()
        row = (
            self.kept(self.dst)
            .execute(
                "SELECT setting::integer FROM pg_settings "
                "WHERE name = 'wal_retrieve_retry_interval'"
            )
            .fetchone()
        )
        assert row is not None
        self.retry_interval_s = row[0] / 1000

    @staticmethod
    def set_stamping(conn: psycopg.Connection[Any], on: bool) -> None:
        mode = "ENABLE ALWAYS" if on else "DISABLE"
        for table in PG_TABLES.values():
            conn.execute(f"ALTER TABLE {table.name} {mode} TRIGGER stamp_dst".encode())

    def wait_worker(self, running: bool, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.connect(self.dst) as conn:
            while True:
                row = conn.execute(
                    "SELECT pid FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL",
                    (self.subscription,),
                ).fetchone()
                if (row is not None and row[0] is not None) == running:
                    self.launcher_woken = time.monotonic()
                    return
                if time.monotonic() > deadline:
                    raise BenchError(f"subscription worker not {'up' if running else 'down'}")
                time.sleep(0.02)

    def kept(self, database: str) -> psycopg.Connection[Any]:
        """A connection kept open (a backend that exits takes its CPU figures with it)."""
        if database not in self._kept:
            self._kept[database] = self.connect(database)
        return self._kept[database]

    def put_marker(self) -> int:
        self.marker += 1
        self.kept(self.src).execute("INSERT INTO bench_marker (id) VALUES (%s)", (self.marker,))
        return self.marker

    def wait_marker(self, marker: int, timeout_s: float = PG_MARKER_TIMEOUT_S) -> float:
        """Poll the destination every 2 ms until the marker row is there; when (wall)."""
        deadline = time.monotonic() + timeout_s
        conn = self.kept(self.dst)
        while True:
            if conn.execute("SELECT 1 FROM bench_marker WHERE id = %s", (marker,)).fetchone():
                return now_s()
            if time.monotonic() > deadline:
                raise BenchError(f"marker {marker} not replicated after {timeout_s:.0f} s")
            time.sleep(0.002)

    def lags_ms(self, since_s: float) -> list[float]:
        """dst_ts - src_ts of every row inserted at the source since `since_s`."""
        found: list[float] = []
        with self.connect(self.dst) as conn:
            for name in INSERTED_TABLES:
                rows = conn.execute(
                    f"SELECT extract(epoch FROM dst_ts - src_ts) * 1000 FROM {name} "
                    "WHERE src_ts >= to_timestamp(%s)".encode(),
                    (since_s,),
                ).fetchall()
                found += [float(r[0]) for r in rows if r[0] is not None]
        return found

    def set_enabled(self, enabled: bool) -> None:
        verb = "ENABLE" if enabled else "DISABLE"
        self.kept(self.dst).execute(f"ALTER SUBSCRIPTION {self.subscription} {verb}".encode())
        if enabled:
            self.launcher_woken = time.monotonic()

    def wait_restartable(self) -> None:
        """The launcher starts workers at most once per wal_retrieve_retry_interval: wait
        that long after the last start, so that ENABLE starts the worker at once."""
        delay = self.launcher_woken + self.retry_interval_s + 0.5 - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def cleanup(self) -> list[str]:
        """Drop everything this pair created; what could not be dropped."""
        problems: list[str] = []
        for conn in self._kept.values():
            with contextlib.suppress(psycopg.Error):
                conn.close()
        self._kept.clear()

        def attempt(database: str, sql: str, params: tuple[Any, ...] = ()) -> None:
            try:
                with self.connect(database) as conn:
                    conn.execute(sql.encode(), params or None)
            except psycopg.Error as exc:
                problems.append(f"{sql[:60]}: {str(exc).strip()[:160]}")

        if self.dst in self.created:
            sub = self.subscription
            with contextlib.suppress(psycopg.Error), self.connect(self.dst) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_subscription WHERE subname = %s", (sub,)
                ).fetchone()
                if exists:
                    conn.execute(f"ALTER SUBSCRIPTION {sub} DISABLE".encode())
                    conn.execute(f"ALTER SUBSCRIPTION {sub} SET (slot_name = NONE)".encode())
                    conn.execute(f"DROP SUBSCRIPTION {sub}".encode())
        if self.src in self.created:
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline:
                try:
                    with self.connect(self.src) as conn:
                        row = conn.execute(
                            "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                            (self.slot,),
                        ).fetchone()
                        if row is None:
                            break
                        if not row[0]:
                            conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                            break
                except psycopg.Error as exc:
                    problems.append(f"slot {self.slot}: {str(exc).strip()[:160]}")
                    break
                time.sleep(0.1)
            attempt(self.src, f"DROP PUBLICATION IF EXISTS {self.publication}")
        for database in reversed(self.created):
            attempt("postgres", f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        self.created.clear()
        return problems


# -- phases ----------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    cluster: Cluster
    pg: PgPair | None
    requests: Iterator[tuple[int, bytes]]
    pg_replayed: dict[int, int]  # cell -> the owner position PostgreSQL has been given


def process_cpu(
    cluster: Cluster, extra: dict[str, int]
) -> tuple[dict[str, float], dict[int, float]]:
    cpu = {region: cpu_seconds(cluster.pid(region)) for region in (OWNER, *REPLICAS)}
    cpu["client"] = self_cpu_seconds()
    cpu.update({name: cpu_seconds(pid) for name, pid in {**cluster.server_pids(), **extra}.items()})
    return cpu, postgres_processes_cpu()


class Measured:
    """CPU of every process over a block, how busy the machine was, and the busy CPU that
    none of them used ("other": other processes, kernel threads)."""

    def __init__(self, cluster: Cluster, extra: dict[str, int] | None = None) -> None:
        self.cluster = cluster
        self.extra = extra or {}

    def __enter__(self) -> Measured:
        self.cpu_before = process_cpu(self.cluster, self.extra)
        self.busy_before = machine_busy_seconds()
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        busy_after = machine_busy_seconds()
        after, pg_after = process_cpu(self.cluster, self.extra)
        before, pg_before = self.cpu_before
        used = {k: after[k] - v for k, v in before.items()}
        # PostgreSQL's processes come and go (backends, the apply worker, walsenders): those
        # alive at the end count from their start or from the beginning of the block.
        used["postgres"] = sum(v - pg_before.get(pid, 0.0) for pid, v in pg_after.items())
        self.cores = {k: round(v / max(self.wall, 1e-9), 3) for k, v in used.items()}
        busy = busy_after[0] - self.busy_before[0]
        total = busy_after[1] - self.busy_before[1]
        self.machine_busy = round(busy / max(total, 1e-9), 3)
        known = sum(v for v in self.cores.values() if not math.isnan(v))
        other = self.machine_busy * (os.cpu_count() or 1) - known
        self.other_cores = round(max(0.0, other), 3)
        if self.other_cores > OTHER_CORES_MAX:
            print(
                f"    WARNING: {self.other_cores:.2f} cores of other load during this phase; "
                "its figures are distorted",
                flush=True,
            )

    def body(self) -> dict[str, Any]:
        return {
            "cpu_cores": self.cores,
            "machine_busy": self.machine_busy,
            "other_cores": self.other_cores,
        }


def cores_text(measured: Measured) -> str:
    used = [f"{k} {v:.2f}" for k, v in measured.cores.items() if v >= 0.01]
    return ", ".join([*used, f"other {measured.other_cores:.2f}"])


def pg_catch_up(ctx: Context, upto: dict[int, int]) -> None:
    """Give PostgreSQL every owner change up to `upto`, all at once (not measured)."""
    assert ctx.pg is not None
    changes: list[Change] = []
    for cell in ctx.cluster.cells:
        path = ctx.cluster.path(OWNER, cell)
        changes += read_changes(path, cell, ctx.pg_replayed[cell], upto[cell])
    if changes:
        result = uvloop.run(replay(ctx.pg.dsn(ctx.pg.src), Schedule.of(changes, None), 8))
        if result.errors:
            raise BenchError(f"PostgreSQL catch-up: {dict(result.errors)} {result.error_sample}")
    ctx.pg_replayed.update(upto)
    ctx.pg.wait_marker(ctx.pg.put_marker())


def unitrade_rate_phase(ctx: Context, name: str, rate: float, duration: float) -> dict[str, Any]:
    cluster, args = ctx.cluster, ctx.args
    before = cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S)
    poller = cluster.poller(REPLICAS, args.poll_ms / 1000, duration + 300)
    try:
        with Measured(cluster, {"poller": poller.pid}) as measured:
            load = uvloop.run(
                open_loop(
                    ctx.requests,
                    rate,
                    duration,
                    args.in_flight,
                    {r: cluster.config.region(r).port for r in REPLICAS},
                    set(cluster.cells.values()),
                )
            )
            after = cluster.heads()
            cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S)
            caught_up_s = now_s()
        polled = poller.stop()
    finally:
        poller.kill()
    changes = cluster.changes(before, after)
    lag = lag_figures(cluster, changes, polled)
    owner_ms = 1000 * measured.cores[OWNER] * measured.wall / max(1, load.answered)
    figures = {
        "label": name,
        "target_orders_per_s": rate,
        "achieved_orders_per_s": round(load.achieved, 1),
        "sustained": load.sustained,
        "sent": load.sent,
        "late_sends": load.late,
        "in_flight_max": load.in_flight_max,
        "errors": dict(load.errors),
        "error_sample": load.error_sample,
        "order_latency_from_due_ms": percentiles([x * 1000 for x in load.latencies_s]),
        "changes": len(changes),
        "changes_per_s": round(len(changes) / duration, 1),
        "changes_per_order": round(len(changes) / max(1, load.answered), 2),
        "owner_cpu_ms_per_order": round(owner_ms, 3),
        "lag_ms": lag,
        "healthz_lag_ms_max": load.healthz_lag_ms_max,
        "healthz_lag_positions_max": load.healthz_lag_positions_max,
        "caught_up_after_load_s": round(caught_up_s - load.ended_s, 3),
        **measured.body(),
        "started_s": load.started_s,
        "before": before,
        "after": after,
    }
    print(
        f"  unitrade {name:<10} {load.achieved:7.1f} orders/s "
        f"({'sustained' if load.sustained else 'NOT sustained'}, late {load.late}, "
        f"errors {sum(load.errors.values())})  {len(changes) / duration:7.0f} changes/s  "
        f"lag ms p50 {lag['all']['p50']:.1f} p99 {lag['all']['p99']:.1f} "
        f"max {lag['all']['max']:.1f} (+-{lag['error_bar_ms']} ms)  "
        f"cores: {cores_text(measured)}",
        flush=True,
    )
    if load.errors:
        print(f"    errors: {dict(load.errors)} e.g. {load.error_sample}", flush=True)
    if lag["spikes"]:
        shown = ", ".join(f"{t:.1f} s: {ms:.0f} ms" for t, ms in lag["spikes"][:12])
        print(f"    lag over {SPIKE_LAG_MS:.0f} ms, by commit time into the phase: {shown}")
    return figures


def pg_rate_phase(ctx: Context, name: str, unitrade: dict[str, Any]) -> dict[str, Any]:
    """The owner's changes of a unitrade phase, replayed into PostgreSQL at the same offsets."""
    assert ctx.pg is not None
    cluster, pg = ctx.cluster, ctx.pg
    pg_catch_up(ctx, unitrade["before"])
    changes = cluster.changes(unitrade["before"], unitrade["after"])
    start_s = min((c.created_ms for c in changes), default=0) / 1000
    schedule = Schedule.of(changes, start_s)
    measured = Measured(cluster)

    def caught_up() -> None:
        pg.wait_marker(pg.put_marker())

    replayed = uvloop.run(replay(pg.dsn(pg.src), schedule, PG_CONNECTIONS, measured, caught_up))
    ctx.pg_replayed.update(unitrade["after"])
    lags = pg.lags_ms(replayed.started_s)
    duration = unitrade["changes"] / max(unitrade["changes_per_s"], 1e-9)
    figures = {
        "rows": schedule.rows,
        "transactions": replayed.transactions,
        "rows_per_s": round(schedule.rows / max(replayed.seconds, 1e-9), 1),
        "replay_seconds": round(replayed.seconds, 3),
        "unitrade_phase_seconds": round(duration, 3),
        "late_sends": replayed.late,
        "errors": dict(replayed.errors),
        "error_sample": replayed.error_sample,
        "lag_ms": percentiles(lags),
        "lag_rows_expected": schedule.inserted_rows,
        **measured.body(),
    }
    lag = figures["lag_ms"]
    print(
        f"  postgres {name:<10} {schedule.rows / max(replayed.seconds, 1e-9):7.0f} rows/s "
        f"(late {replayed.late}, errors {sum(replayed.errors.values())})  "
        f"lag ms p50 {lag['p50']:.1f} p99 {lag['p99']:.1f} max {lag['max']:.1f} "
        f"({lag['n']} of {schedule.inserted_rows} rows)  cores: {cores_text(measured)}",
        flush=True,
    )
    if replayed.errors:
        print(f"    errors: {dict(replayed.errors)} e.g. {replayed.error_sample}", flush=True)
    return figures


def window_rate(times: Sequence[tuple[float, int]], window_s: float) -> float:
    """The highest rows/s over any `window_s` of (time, cumulative rows) samples."""
    best = 0.0
    j = 0
    for i in range(len(times)):
        while times[i][0] - times[j][0] > window_s:
            j += 1
        span = times[i][0] - times[j][0]
        if span >= window_s * 0.9:
            best = max(best, (times[i][1] - times[j][1]) / span)
    return best


def unitrade_apply_phase(ctx: Context, profiled: bool = False) -> dict[str, Any]:
    """sh stopped while the backlog is written, then resumed and timed. `profiled`: with
    py-spy on sh and hz during the catch-up (a separate round: py-spy slows them)."""
    cluster, args = ctx.cluster, ctx.args
    process = cluster.setup.cluster.processes[STOPPED_REPLICA]
    cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S)
    stopped_at = cluster.positions(STOPPED_REPLICA)
    process.send_signal(signal.SIGSTOP)
    try:
        started = time.perf_counter()
        outcome = uvloop.run(closed_loop_count(ctx.requests, args.backlog_orders, 16))
        write_s = time.perf_counter() - started
        others = [r for r in REPLICAS if r != STOPPED_REPLICA]
        heads = cluster.wait_converged(others, CONVERGE_TIMEOUT_S)
    except BaseException:
        process.send_signal(signal.SIGCONT)
        raise
    rows = sum(heads[c] - stopped_at[c] for c in cluster.cells)
    print(
        f"  unitrade backlog: {args.backlog_orders} orders in {write_s:.1f} s "
        f"({dict(outcome)}), {rows} changes for {STOPPED_REPLICA}",
        flush=True,
    )
    poller = cluster.poller([STOPPED_REPLICA], args.poll_ms / 1000, 600)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        with Measured(cluster, {"poller": poller.pid}) as measured:
            resumed = now_s()
            process.send_signal(signal.SIGCONT)
            if profiled:
                spies = start_spies(cluster, args, "apply", [STOPPED_REPLICA, OWNER])
            cluster.wait_converged([STOPPED_REPLICA], CONVERGE_TIMEOUT_S)
        polled = poller.stop()
    finally:
        poller.kill()
        process.send_signal(signal.SIGCONT)
    events = polled["events"]
    cells = list(cluster.cells)
    current = {i: stopped_at[c] for i, c in enumerate(cells)}
    progress: list[tuple[float, int]] = [(resumed, 0)]
    done_s = resumed
    for _low, high, i, position in sorted(events, key=lambda e: e[1]):
        if position <= current[i]:
            continue
        current[i] = position
        progress.append((high, sum(current[j] - stopped_at[cells[j]] for j in current)))
        done_s = max(done_s, high)
    moved = [t for t, applied in progress if applied > 0]
    first_s = moved[0] if moved else resumed
    seconds = done_s - resumed
    profiles = finish_spies(spies, args, "apply")
    figures = {
        "replica": STOPPED_REPLICA,
        "backlog_orders": args.backlog_orders,
        "backlog_writes": dict(outcome),
        "rows": rows,
        "by_cell": {cluster.cells[c]: heads[c] - stopped_at[c] for c in cells},
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / max(seconds, 1e-9), 1),
        "first_progress_after_s": round(first_s - resumed, 3),
        "rows_per_s_after_first_progress": round(rows / max(done_s - first_s, 1e-9), 1),
        "rows_per_s_best_second": round(window_rate(progress, 1.0), 1),
        **measured.body(),
        "poll_interval_ms": round(1000 * polled["seconds"] / max(1, polled["polls"]), 2),
        "profiles": profiles,
    }
    print(
        f"  unitrade apply{' (profiled, not counted)' if profiled else ''}: {rows} rows in "
        f"{seconds:.2f} s = {rows / max(seconds, 1e-9):,.0f} "
        f"rows/s (first progress after {first_s - resumed:.3f} s; best second "
        f"{figures['rows_per_s_best_second']:,.0f} rows/s)  cores: {cores_text(measured)}",
        flush=True,
    )
    figures["changes"] = (stopped_at, heads)
    return figures


def start_spies(
    cluster: Cluster, args: argparse.Namespace, prefix: str, regions: Sequence[str]
) -> list[subprocess.Popen[bytes]]:
    """py-spy on `regions` for --profile-seconds: every non-idle thread (`<prefix>-<region>`)
    and only the thread holding the GIL (`<prefix>-<region>-gil`), raw files in DIR."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy (.venv/bin/pip install py-spy)")
    out: Path = args.profile
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for region in regions:
        for mode, flags in (("", ["--threads", "--nonblocking"]), ("-gil", ["--gil"])):
            path = out / f"{prefix}-{region}{mode}.txt"
            path.unlink(missing_ok=True)
            command = [spy, "record", "-p", str(cluster.pid(region)), "-d"]
            command += [str(args.profile_seconds), "-f", "raw", *flags, "-o", str(path)]
            spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
    return spies


def finish_spies(
    spies: list[subprocess.Popen[bytes]], args: argparse.Namespace, prefix: str
) -> dict[str, Any]:
    if not spies:
        return {}
    for spy in spies:
        try:
            spy.wait(timeout=args.profile_seconds + 30)
        except subprocess.TimeoutExpired:
            spy.terminate()
            spy.wait(timeout=STOP_TIMEOUT_S)
    summaries = {}
    for path in sorted(Path(args.profile).glob(f"{prefix}-*.txt")):
        summaries[path.stem] = summarise_profile(path)
        print_profile(f"{path.stem} ({path})", summaries[path.stem])
    return summaries


def profiled_rate_phase(ctx: Context, rate: float) -> dict[str, Any]:
    """An extra open-loop phase at `rate` (not counted) with py-spy on hz and sh, started 1 s
    into the load; the load lasts --profile-seconds + 3 s."""
    cluster, args = ctx.cluster, ctx.args
    cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S)
    spies: list[subprocess.Popen[bytes]] = []
    timer = threading.Timer(
        1.0, lambda: spies.extend(start_spies(cluster, args, "lag", [OWNER, STOPPED_REPLICA]))
    )
    ports = {r: cluster.config.region(r).port for r in REPLICAS}
    try:
        timer.start()
        load = uvloop.run(
            open_loop(ctx.requests, rate, args.profile_seconds + 3.0, args.in_flight, ports, set())
        )
        timer.join()
    finally:
        timer.cancel()
    print(
        f"  profiled phase at {rate:g}/s (not counted): {load.achieved:.0f} orders/s",
        flush=True,
    )
    cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S)
    return finish_spies(spies, args, "lag")


def pg_apply_phase(ctx: Context, unitrade: dict[str, Any]) -> dict[str, Any]:
    assert ctx.pg is not None
    cluster, pg = ctx.cluster, ctx.pg
    stopped_at, heads = unitrade.pop("changes")
    pg_catch_up(ctx, stopped_at)
    changes = cluster.changes(stopped_at, heads)
    schedule = Schedule.of(changes, None)
    pg.set_enabled(False)
    pg.wait_worker(running=False)
    with pg.connect(pg.dst) as conn:
        pg.set_stamping(conn, False)
    try:
        written = uvloop.run(replay(pg.dsn(pg.src), schedule, 16))
        if written.errors:
            raise BenchError(f"PostgreSQL backlog: {dict(written.errors)} {written.error_sample}")
        marker = pg.put_marker()
        print(
            f"  postgres backlog: {schedule.rows} rows in {written.transactions} transactions, "
            f"written in {written.seconds:.1f} s",
            flush=True,
        )
        pg.wait_restartable()
        with Measured(cluster) as measured:
            enabled = now_s()
            pg.set_enabled(True)
            seen = pg.wait_marker(marker)
    finally:
        pg.set_enabled(True)
        with pg.connect(pg.dst) as conn:
            pg.set_stamping(conn, True)
    ctx.pg_replayed.update(heads)
    seconds = seen - enabled
    figures = {
        "rows": schedule.rows,
        "transactions": written.transactions,
        "seconds": round(seconds, 3),
        "rows_per_s": round(schedule.rows / max(seconds, 1e-9), 1),
        **measured.body(),
    }
    print(
        f"  postgres apply: {schedule.rows} rows in {seconds:.2f} s = "
        f"{schedule.rows / max(seconds, 1e-9):,.0f} rows/s  cores: {cores_text(measured)}",
        flush=True,
    )
    return figures


# -- the run ---------------------------------------------------------------------------------------


PROBE_FIXED_RATE = 300.0  # orders/s: hz's CPU at a rate well below its capacity


def probe_capacity(
    ctx: Context, plan: Sequence[tuple[int, bytes]], seconds: float
) -> dict[str, Any]:
    """With the replicas following, then with both stopped (SIGSTOP: hz serves no pulls
    meanwhile): hz's closed-loop orders/s (16 in flight, hz-homed buyers), its capacity, and
    its CPU at PROBE_FIXED_RATE orders/s (open loop): what serving replication costs it."""
    cluster = ctx.cluster
    found: dict[str, Any] = {}
    for label in ("following", "replicas stopped"):
        cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S)
        processes = [cluster.setup.cluster.processes[r] for r in REPLICAS]
        try:
            if label != "following":
                for process in processes:
                    process.send_signal(signal.SIGSTOP)
            with Measured(cluster) as measured:
                result = uvloop.run(closed_loop(f"probe, {label}", plan, 16, seconds))
            with Measured(cluster) as fixed:
                load = uvloop.run(open_loop(ctx.requests, PROBE_FIXED_RATE, seconds, 64, {}, set()))
        finally:
            for process in processes:
                process.send_signal(signal.SIGCONT)
        owner_ms = 1000 * measured.cores[OWNER] * measured.wall / max(1, result.completed)
        fixed_ms = 1000 * fixed.cores[OWNER] * fixed.wall / max(1, load.answered)
        found[label] = {
            "orders_per_s": round(result.throughput, 1),
            "errors": sum(result.errors.values()) + sum(load.errors.values()),
            "owner_cpu_ms_per_order": round(owner_ms, 3),
            **measured.body(),
            "fixed_rate": {
                "orders_per_s": round(load.achieved, 1),
                "owner_cores": fixed.cores[OWNER],
                "owner_cpu_ms_per_order": round(fixed_ms, 3),
                **fixed.body(),
            },
        }
        print(
            f"  capacity, replicas {label}: {result.throughput:.0f} orders/s, "
            f"hz {owner_ms:.2f} ms CPU/order  cores: {cores_text(measured)}\n"
            f"    at {load.achieved:.0f} orders/s: hz {fixed.cores[OWNER]:.2f} cores, "
            f"{fixed_ms:.2f} ms CPU/order  cores: {cores_text(fixed)}",
            flush=True,
        )
    cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S)
    return found


def summarise_apply(rounds: list[dict[str, Any]], other: str = "postgres") -> dict[str, Any]:
    """Medians over the rounds; the ratio is the median of each round's unitrade/PostgreSQL
    (the two measured back to back). `other`: the key of the system compared against."""
    unitrade = [r["unitrade"]["rows_per_s"] for r in rounds]
    theirs = [r[other]["rows_per_s"] for r in rounds if r[other] is not None]
    ratios = [
        round(r["unitrade"]["rows_per_s"] / r[other]["rows_per_s"], 3)
        for r in rounds
        if r[other] is not None
    ]
    return {
        "rounds": rounds,
        "unitrade_rows_per_s": statistics.median(unitrade),
        f"{other}_rows_per_s": statistics.median(theirs) if theirs else None,
        "ratio_by_round": ratios,
        "ratio": statistics.median(ratios) if ratios else None,
    }


def owned_cells(config: TopologyConfig) -> dict[int, str]:
    rule = initial_rule(config)
    return {
        cell.id: cell.name
        for cell in rule.cells.values()
        if rule.owner_of(cell.id) == OWNER and cell.kind in (CellKind.UNIT, CellKind.CENTER)
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    busy_before = busy_before_run()
    pg_info: dict[str, Any] = {}
    pg: PgPair | None = None
    if not args.no_postgres:
        pg_info = PgPair.check(args.pg_dsn)
        if pg_info["wal_level"] != "logical":
            raise BenchError(
                f"PostgreSQL has wal_level = {pg_info['wal_level']}; logical replication needs "
                "`ALTER SYSTEM SET wal_level = logical` and a restart (or run --no-postgres)"
            )
        if pg_info["other_clients"]:
            print(
                f"WARNING: {pg_info['other_clients']} other client(s) on PostgreSQL now",
                flush=True,
            )
        pg = PgPair(args.pg_dsn)
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-repl-"))
    ports = free_ports(4)  # the regions', then the control plane's
    config_path = data_dir / "topology.toml"
    config = write_topology(config_path, ports)
    setup = Setup(
        config=config,
        cluster=LocalCluster(config, data_dir / "unitrade", config_path),
        baselines={},
        buyers=home_buyers(config, BUYERS_PER_REGION),
        skus=[f"bench-{i:03d}" for i in range(SKU_COUNT)],
    )
    cluster = Cluster(config, setup, data_dir, owned_cells(config))
    try:
        print(
            f"data in {data_dir}; regions on ports {ports[:3]}, control on {ports[3]}", flush=True
        )
        setup.cluster.start()
        seed(setup)
        plan = setup.plan([OWNER], OWNER, seed=11)

        def cycle() -> Iterator[tuple[int, bytes]]:
            while True:
                yield from plan

        ctx = Context(args, cluster, pg, cycle(), {c: 0 for c in cluster.cells})
        if pg is not None:
            print(f"PostgreSQL {pg_info['version']}: databases {pg.src} -> {pg.dst}", flush=True)
            pg.setup()
        if args.warmup > 0:
            print(f"warm-up: {args.warmup:.0f} s at 300 orders/s", flush=True)
            unitrade_rate_phase(ctx, "warm-up", 300, args.warmup)
        if pg is not None:
            pg_catch_up(ctx, cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S))
        print(f"lag: {args.duration:.0f} s at each rate, open loop", flush=True)
        capacity: dict[str, Any] = {}
        if "max" in args.rates:
            capacity = probe_capacity(ctx, plan, args.probe_seconds)
            if pg is not None:
                pg_catch_up(ctx, cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S))
        rates: list[dict[str, Any]] = []
        for text in args.rates:
            if text == "max":
                top = capacity["following"]["orders_per_s"] * args.max_fraction
                rate = max(10.0, round(top / 10) * 10)
                name = f"max {rate:g}/s"
            else:
                rate = float(text)
                name = f"{rate:g}/s"
            unitrade_figures = unitrade_rate_phase(ctx, name, rate, args.duration)
            pg_figures = pg_rate_phase(ctx, name, unitrade_figures) if pg is not None else None
            for key in ("before", "after", "started_s"):
                unitrade_figures.pop(key)
            rates.append({"unitrade": unitrade_figures, "postgres": pg_figures})
        apply: dict[str, Any] = {}
        if args.backlog_orders > 0:
            print(
                f"apply rate: {args.apply_rounds} round(s), a backlog of "
                f"{args.backlog_orders} orders each",
                flush=True,
            )
            rounds = []
            for _ in range(args.apply_rounds):
                figures = unitrade_apply_phase(ctx)
                pg_figures = pg_apply_phase(ctx, figures) if pg else None
                figures.pop("changes", None)
                rounds.append({"unitrade": figures, "postgres": pg_figures})
            apply = summarise_apply(rounds)
        profiles: dict[str, Any] = {}
        if args.profile is not None:
            print(f"profiling (not counted), py-spy for {args.profile_seconds} s", flush=True)
            profiles["lag"] = profiled_rate_phase(ctx, args.profile_rate)
            if args.backlog_orders > 0:
                profiled = unitrade_apply_phase(ctx, profiled=True)
                profiled.pop("changes", None)
                profiles["apply"] = profiled
        results = report(args, source, busy_before, pg_info, capacity, rates, apply)
        if profiles:
            results["profiles"] = profiles
        return results
    finally:
        print("stopping processes...", flush=True)
        cluster.close()
        try:
            for process in setup.cluster.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
            setup.cluster.stop()
        finally:
            if pg is not None:
                problems = pg.cleanup()
                if problems:
                    print(f"PostgreSQL clean-up problems: {problems}", file=sys.stderr)
        if args.keep_data:
            print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def report(
    args: argparse.Namespace,
    source: dict[str, Any],
    busy_before: float,
    pg_info: dict[str, Any],
    capacity: dict[str, Any],
    rates: list[dict[str, Any]],
    apply: dict[str, Any],
) -> dict[str, Any]:
    at_target = next(
        (r for r in rates if r["unitrade"]["target_orders_per_s"] == TARGET_LAG_RATE), None
    )
    targets: dict[str, Any] = {}
    if at_target is not None:
        u = at_target["unitrade"]
        p99 = u["lag_ms"]["all"]["p99"]
        targets["lag_p99_ms_at_1000"] = p99
        targets["lag_target_ms"] = TARGET_LAG_P99_MS
        targets["lag_rate_sustained"] = u["sustained"]
        targets["lag_achieved_orders_per_s"] = u["achieved_orders_per_s"]
        targets["lag_met"] = p99 <= TARGET_LAG_P99_MS and u["sustained"]
    sustained = [r["unitrade"] for r in rates if r["unitrade"]["sustained"]]
    if sustained:
        top = max(sustained, key=lambda u: u["achieved_orders_per_s"])
        targets["highest_sustained_orders_per_s"] = top["achieved_orders_per_s"]
        targets["lag_p99_ms_at_highest_sustained"] = top["lag_ms"]["all"]["p99"]
    if apply.get("ratio") is not None:
        targets["apply_ratio"] = apply["ratio"]
        targets["apply_ratio_by_round"] = apply["ratio_by_round"]
        targets["apply_target"] = TARGET_APPLY_RATIO
        targets["apply_met"] = apply["ratio"] >= TARGET_APPLY_RATIO
    results: dict[str, Any] = {
        **run_header("bench_replication", args.label, source, busy_before),
        "postgres": pg_info,
        "settings": {
            "rates": args.rates,
            "max_fraction": args.max_fraction,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "in_flight_max": args.in_flight,
            "poll_ms": args.poll_ms,
            "backlog_orders": args.backlog_orders,
        },
        "capacity": capacity,
        "rates": rates,
        "apply": apply,
        "targets": targets,
    }
    print_tables(results)
    return results


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def print_tables(results: dict[str, Any]) -> None:
    print(source_line(results))
    print(
        "\nlag, commit at the owner -> applied at the replica (ms), "
        f"{results['settings']['duration_s']:.0f} s per rate"
    )
    print(
        "| target orders/s | achieved | sustained | changes/s | system | lag p50 | p90 | p99 "
        "| max | rows measured | CPU (cores) |"
    )
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in results["rates"]:
        u, p = r["unitrade"], r["postgres"]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in u["cpu_cores"].items() if v >= 0.01)
        head = (
            f"| {u['label'].removesuffix('/s')} | {u['achieved_orders_per_s']:.0f} | "
            f"{'yes' if u['sustained'] else 'NO'} | {u['changes_per_s']:,.0f} |"
        )
        for replica in REPLICAS:
            lag = u["lag_ms"][replica]
            print(
                f"{head} unitrade -> {replica} | {fmt(lag['p50'])} | {fmt(lag['p90'])} | "
                f"{fmt(lag['p99'])} | {fmt(lag['max'])} | {lag['n']} | {cpu} |"
            )
            head, cpu = "| | | | |", ""
        if p is not None:
            lag = p["lag_ms"]
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_cores"].items() if v >= 0.01)
            print(
                f"{head} PostgreSQL | {fmt(lag['p50'])} | {fmt(lag['p90'])} | "
                f"{fmt(lag['p99'])} | {fmt(lag['max'])} | {lag['n']} | {cpu} |"
            )
    if results["rates"]:
        first = results["rates"][0]["unitrade"]["lag_ms"]
        print(
            f"(unitrade: replicas polled every {first['poll_interval_ms']} ms, error bar "
            f"+-{first['error_bar_ms']} ms; the poller used {first['poller_cpu_cores']} cores)"
        )
    capacity = results.get("capacity")
    if capacity:
        print("\nhz capacity, closed loop (16 in flight), hz-homed buyers")
        print(
            "| replicas | orders/s | hz CPU ms/order | CPU (cores) "
            f"| hz cores at {PROBE_FIXED_RATE:g}/s | hz CPU ms/order at {PROBE_FIXED_RATE:g}/s |"
        )
        print("|---|---:|---:|---|---:|---:|")
        for label, f in capacity.items():
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in f["cpu_cores"].items() if v >= 0.01)
            fixed = f["fixed_rate"]
            print(
                f"| {label} | {f['orders_per_s']:.0f} | {f['owner_cpu_ms_per_order']:.2f} | "
                f"{cpu}, other {f['other_cores']:.2f} | {fixed['owner_cores']:.2f} | "
                f"{fixed['owner_cpu_ms_per_order']:.2f} |"
            )
    apply = results["apply"]
    if apply:
        print("\napply rate, catching up a backlog (one replica / one subscription)")
        print("| round | system | rows | seconds | rows/s | CPU (cores) |")
        print("|---:|---|---:|---:|---:|---|")
        for i, one in enumerate(apply["rounds"], start=1):
            for name, f in one.items():
                if f is None:
                    continue
                cpu = ", ".join(f"{k} {v:.2f}" for k, v in f["cpu_cores"].items() if v >= 0.01)
                print(
                    f"| {i} | {name} | {f['rows']:,} | {f['seconds']:.2f} | "
                    f"{f['rows_per_s']:,.0f} | {cpu}, other {f['other_cores']:.2f} |"
                )
        print(
            f"median rows/s: unitrade {fmt(apply['unitrade_rows_per_s'], 0)}, PostgreSQL "
            f"{fmt(apply['postgres_rows_per_s'], 0)}; ratio by round {apply['ratio_by_round']}"
        )
    t = results["targets"]
    print("\n| target | measured | met |")
    print("|---|---:|---|")
    if "lag_met" in t:
        note = (
            ""
            if t["lag_rate_sustained"]
            else f" (rate NOT sustained: {t['lag_achieved_orders_per_s']:.0f}/s)"
        )
        print(
            f"| lag p99 <= {t['lag_target_ms']:.0f} ms at 1000 orders/s | "
            f"{t['lag_p99_ms_at_1000']:.1f} ms{note} | {'yes' if t['lag_met'] else 'NO'} |"
        )
    if "highest_sustained_orders_per_s" in t:
        print(
            f"| (for reference) lag p99 at the highest sustained rate, "
            f"{t['highest_sustained_orders_per_s']:.0f} orders/s | "
            f"{t['lag_p99_ms_at_highest_sustained']:.1f} ms | - |"
        )
    if "apply_met" in t:
        print(
            f"| apply rate >= {t['apply_target']} x PostgreSQL | {t['apply_ratio']:.2f} x "
            f"(median; rounds {' / '.join(f'{r:.2f}' for r in t['apply_ratio_by_round'])}) | "
            f"{'yes' if t['apply_met'] else 'NO'} |"
        )


def parse_rates(text: str) -> list[str]:
    """Orders/s, comma separated; `max`: a fraction (--max-fraction) of hz's measured
    closed-loop capacity, the highest rate it sustains."""
    rates = [x.strip() for x in text.split(",") if x.strip()]
    for rate in rates:
        if rate != "max" and not (rate.replace(".", "", 1).isdigit() and 1 <= float(rate) <= 20e3):
            raise argparse.ArgumentTypeError("rates are 1 to 20000 orders/s or `max`")
    if not rates:
        raise argparse.ArgumentTypeError("no rate")
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_replication",
        description="Replication lag and apply rate: unitrade against PostgreSQL logical "
        "replication.",
    )
    parser.add_argument(
        "--rates",
        type=parse_rates,
        default=["250", "500", "1000", "2000", "max"],
        help="orders/s, comma separated; `max` = --max-fraction x hz's closed-loop capacity",
    )
    parser.add_argument("--max-fraction", type=float, default=0.85)
    parser.add_argument(
        "--probe-seconds", type=float, default=5.0, help="closed-loop capacity probe, each"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds")
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT_MAX)
    parser.add_argument("--poll-ms", type=float, default=2.0, help="replica polling interval")
    parser.add_argument(
        "--backlog-orders", type=int, default=8000, help="orders written while sh is stopped"
    )
    parser.add_argument(
        "--apply-rounds", type=int, default=3, help="apply-rate rounds (unitrade, PostgreSQL)"
    )
    parser.add_argument(
        "--pg-dsn",
        default=f"host={HOST} port=5432 user=postgres dbname=postgres",
        help="an admin connection to the local PostgreSQL server",
    )
    parser.add_argument("--no-postgres", action="store_true", help="unitrade only")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy on hz and sh in two extra phases (load at --profile-rate, a catch-up); "
        "not counted; raw profiles here",
    )
    parser.add_argument("--profile-seconds", type=int, default=3)
    parser.add_argument(
        "--profile-rate",
        type=float,
        default=float(TARGET_LAG_RATE),
        help="orders/s of the profiled (not counted) load phase",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or not 1 <= args.in_flight <= 1024:
        parser.error("need --duration > 0, --warmup >= 0, 1 <= --in-flight <= 1024")
    if not 1 <= args.apply_rounds <= 20 or not 0.1 <= args.max_fraction <= 1.0:
        parser.error("need 1 <= --apply-rounds <= 20 and 0.1 <= --max-fraction <= 1")
    if not 0.5 <= args.poll_ms <= 100 or not 0 <= args.backlog_orders <= 100_000:
        parser.error("need 0.5 <= --poll-ms <= 100 and 0 <= --backlog-orders <= 100000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = 300 + len(args.rates) * (2 * args.duration + 4 * CONVERGE_TIMEOUT_S)
    budget += (args.apply_rounds + 1) * (
        args.backlog_orders * 0.01 + CONVERGE_TIMEOUT_S + PG_MARKER_TIMEOUT_S
    )
    return run_bounded(run, args, budget)


if __name__ == "__main__":
    sys.exit(main())
