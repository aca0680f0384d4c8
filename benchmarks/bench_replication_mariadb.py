"""Replication apply rate on MariaDB (run on demand, not in CI): unitrade's follower catching
up a backlog, against MariaDB's own binlog replication catching up the same rows.

    .venv/bin/python -m benchmarks.bench_replication_mariadb [--backlog-orders N]
        [--rounds N] [--warmup-orders N] [--poll-ms MS] [--replica-stop all|sql]
        [--replica-parallel-threads N] [--writers N] [--json PATH] [--profile DIR]

The MariaDB counterpart of the apply-rate phase of `bench_replication` (whose pieces it
imports). In one run it starts:

- a three-region unitrade cluster (the default topology, free ports, never 8700-8703)
  whose cell copies are databases `ut_bench_<hex>_<region>_<cell>` on the local MariaDB
  server (127.0.0.1:3306, root, no password; `storage_readers = 1`);
- a PRIVATE MariaDB primary and a PRIVATE replica: two `mariadbd` processes of the same
  binaries, each with its own datadir in a temporary directory (`mariadb-install-db`) and
  its own free port; the primary writes a ROW binlog, the replica follows it with binlog
  replication (`CHANGE MASTER TO`, `START SLAVE`). The system server's configuration is not
  touched. Both hold the unit and center cell tables (`unitrade.storage.schema`, DDL
  compiled for MariaDB) in one database.

Each round (`--rounds`, default 3) measures, back to back:

1. **unitrade**: sh is stopped (SIGSTOP) while `--backlog-orders` orders are written at hz
   (closed loop, 16 in flight; bj keeps following), then resumed (SIGCONT); rows/s =
   changelog rows sh applies / time from SIGCONT until sh's checkpoints (`cell_meta.
   last_position` of its copies of the three cells hz owns, read from MariaDB by a separate
   polling process every `--poll-ms`) equal hz's positions.
2. **MariaDB**: the replica is stopped (`STOP SLAVE`: both threads, like a paused follower
   that fetches nothing either; `--replica-stop sql` stops only the SQL thread and lets the
   IO thread fetch the whole backlog into the relay log first); the same changelog rows
   (row images grouped back into their transactions, as bench_replication does for
   PostgreSQL) are written at the primary as fast as it takes them (`--writers`
   connections), a marker row last; then `START SLAVE`; rows/s = rows / time until the
   marker row is visible on the replica (polled every `--poll-ms`).

The ratio is the median of the rounds' unitrade / MariaDB ratios (target >= 0.5). CPU of
every process (the regions, the client, the poller, the system mariadbd holding the cell
copies, the private primary and replica) is read from /proc over each measured block.

Everything listens on and targets 127.0.0.1; both private servers are stopped and their
datadirs deleted, every `ut_bench_<hex>_*` database is dropped and every region process is
stopped on exit, error, Ctrl-C or SIGTERM; the run has a hard time bound.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pymysql
import uvloop
from sqlalchemy.dialects.mysql.mariadb import MariaDBDialect
from sqlalchemy.schema import CreateIndex, CreateTable

from benchmarks.bench_orders import BUYERS_PER_REGION, SKU_COUNT, Setup, seed
from benchmarks.bench_replication import (
    CONVERGE_TIMEOUT_S,
    OWNER,
    PG_TABLES,
    REPLICAS,
    TARGET_APPLY_RATIO,
    Change,
    Cluster,
    Context,
    Measured,
    Poller,
    ReplayResult,
    Schedule,
    closed_loop_count,
    cores_text,
    fmt,
    now_s,
    owned_cells,
    summarise_apply,
    transaction_sql,
    unitrade_apply_phase,
)
from benchmarks.bench_workers import drop_databases
from benchmarks.harness import (
    HOST,
    START_TIMEOUT_S,
    BenchError,
    busy_before_run,
    free_ports,
    home_buyers,
    run_bounded,
    run_header,
    source_info,
    source_line,
    write_topology,
)
from unitrade.cluster import LocalCluster
from unitrade.topology.config import default_config

SERVER_PORT = 3306  # the system MariaDB, holding unitrade's cell copies
DATABASE = "bench"  # the private primary's and replica's one database
REPL_USER = "bench_repl"
MARKER_TIMEOUT_S = 120.0
STOP_SERVER_S = 30.0
COLLATION = "utf8mb4_nopad_bin"  # what unitrade creates its copies with on MariaDB
DIALECT = MariaDBDialect()
quote_identifier = DIALECT.identifier_preparer.quote

# Both private servers: the system server's settings (it runs MariaDB's compiled defaults:
# InnoDB, innodb_flush_log_at_trx_commit = 1, 128 MiB buffer pool, 96 MiB redo log; only
# these set in its my.cnf), so a commit there costs what it costs unitrade's copies.
COMMON_FLAGS = (
    "--bind-address=127.0.0.1",
    "--skip-name-resolve",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
    "--innodb-flush-log-at-trx-commit=1",
)
# The primary: a ROW binlog (what the replica applies), fsynced at each commit group.
PRIMARY_FLAGS = ("--server-id=1", "--log-bin=binlog", "--binlog-format=ROW", "--sync-binlog=1")
# The replica: no binlog of its own (unitrade's copies on 3306 write none either), its
# position (mysql.gtid_slave_pos, InnoDB) committed with each applied transaction;
# MariaDB's defaults for the rest (slave_parallel_threads = 0: one SQL thread applying in
# order, sync_relay_log = 10000).
REPLICA_FLAGS = ("--server-id=2", "--relay-log=relay-bin", "--skip-slave-start")


# -- unitrade on MariaDB -------------------------------------------------------------------------

# The polling process (plain pymysql, not this module): one query reads every copy's
# checkpoint; records (time before the previous read, time after the read that saw it,
# copy index, position), as bench_replication's SQLite poller does.
_POLLER = r"""
import json, os, select, sys, time
import pymysql
interval_s, max_s, out = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
host, port = sys.argv[4].rsplit(":", 1)
dbs = sys.argv[5:]
conn = pymysql.connect(host=host, port=int(port), user="root", autocommit=True)
cursor = conn.cursor()
sql = "SELECT " + ", ".join(f"(SELECT last_position FROM `{d}`.cell_meta)" for d in dbs)
last = [-1] * len(dbs)
before_previous = time.time()
events = []
polls = 0
print("ready", flush=True)
cpu = os.times()
started = next_tick = time.monotonic()
while time.monotonic() - started < max_s:
    if select.select([sys.stdin], [], [], 0)[0]:
        break
    before = time.time()
    cursor.execute(sql)
    row = cursor.fetchone()
    after = time.time()
    for i, position in enumerate(row):
        if position != last[i]:
            events.append((before_previous, after, i, int(position)))
            last[i] = position
    before_previous = before
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
conn.close()
with open(out, "w") as f:
    json.dump({"events": events, "polls": polls, "seconds": seconds, "cpu_s": cpu_s}, f)
print("done", flush=True)
"""


def connect_server(**extra: Any) -> pymysql.Connection[Any]:
    return pymysql.connect(host=HOST, port=SERVER_PORT, user="root", autocommit=True, **extra)


@dataclass
class MariaCluster(Cluster):
    """A cluster whose copies are databases `<prefix>_<region>_<cell>` on the MariaDB server
    on port 3306: checkpoints and changelogs read from there."""

    prefix: str = ""
    servers: dict[str, int] = field(default_factory=dict)  # name -> pid, CPU counted
    _conn: pymysql.Connection[Any] | None = None

    def database(self, region: str, cell: int) -> str:
        return f"{self.prefix}_{region}_{self.cells[cell]}"

    def databases(self, regions: Sequence[str]) -> list[str]:
        return [self.database(r, c) for r in regions for c in self.cells]

    def cursor(self) -> Any:
        if self._conn is None:
            self._conn = connect_server()
        return self._conn.cursor()

    def positions(self, region: str) -> dict[int, int]:
        names = self.databases([region])
        cursor = self.cursor()
        cursor.execute(
            "SELECT " + ", ".join(f"(SELECT last_position FROM `{n}`.cell_meta)" for n in names)
        )
        return dict(zip(self.cells, (int(v) for v in cursor.fetchone()), strict=True))

    def server_pids(self) -> dict[str, int]:
        return dict(self.servers)

    def poller(self, regions: Sequence[str], interval_s: float, max_s: float) -> Poller:
        server = f"{HOST}:{SERVER_PORT}"
        return Poller([server, *self.databases(regions)], interval_s, max_s, script=_POLLER)

    def changes(self, before: dict[int, int], after: dict[int, int]) -> list[Change]:
        found: list[Change] = []
        cursor = self.cursor()
        for cell in self.cells:
            cursor.execute(
                f"SELECT position, created_ms, tbl, pk, op, row_image "
                f"FROM `{self.database(OWNER, cell)}`.changelog "
                "WHERE position > %s AND position <= %s ORDER BY position",
                (before[cell], after[cell]),
            )
            rows = [Change(cell, *row) for row in cursor.fetchall()]
            if len(rows) != after[cell] - before[cell]:
                raise BenchError(
                    f"cell {self.cells[cell]}: {len(rows)} changelog rows in "
                    f"({before[cell]}, {after[cell]}] (trimmed?)"
                )
            found += rows
        return found

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(pymysql.MySQLError):
                self._conn.close()
            self._conn = None
        super().close()


def server_info() -> dict[str, Any]:
    """The system server: version, pid, settings that matter here, other clients now."""
    with connect_server() as conn:
        cursor = conn.cursor()
        cursor.execute(
            "SELECT VERSION(), @@pid_file, @@innodb_flush_log_at_trx_commit, @@log_bin, "
            "@@innodb_buffer_pool_size, @@max_connections"
        )
        version, pid_file, flush, log_bin, pool, connections = cursor.fetchone()
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE ID <> CONNECTION_ID() AND COMMAND NOT IN ('Daemon', 'Binlog Dump')"
        )
        (others,) = cursor.fetchone()
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.SCHEMATA "
            "WHERE SCHEMA_NAME LIKE 'ut\\_bench\\_%'"
        )
        (leftovers,) = cursor.fetchone()
    try:  # its CPU is counted; a server elsewhere (or an unreadable pid file): not
        pid = int(Path(pid_file).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = 0
    return {
        "version": version,
        "pid": pid,
        "innodb_flush_log_at_trx_commit": int(flush),
        "log_bin": int(log_bin),
        "innodb_buffer_pool_size": int(pool),
        "max_connections": int(connections),
        "other_clients": int(others),
        "ut_bench_databases_before": int(leftovers),
    }


# -- the private MariaDB primary and replica ----------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def mysql_sql(rows: Sequence[Change]) -> str:
    """A transaction's SQL for MariaDB: identifiers quoted where reserved, no `src_ts`."""
    return transaction_sql(rows, stamp=None, quote=quote_identifier)


class MariaPair:
    """Two private `mariadbd` processes, a primary and a replica following its binlog."""

    NAMES = ("primary", "replica")

    def __init__(self, root: Path, ports: Sequence[int], parallel_threads: int) -> None:
        self.root = root
        self.ports = dict(zip(self.NAMES, ports, strict=True))
        self.parallel_threads = parallel_threads
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[TextIO] = []
        self._kept: dict[str, pymysql.Connection[Any]] = {}
        self.marker = 0

    def datadir(self, name: str) -> Path:
        return self.root / name / "data"

    def socket(self, name: str) -> Path:
        return self.root / name / "mysqld.sock"

    def flags(self, name: str) -> list[str]:
        own = list(PRIMARY_FLAGS) if name == "primary" else list(REPLICA_FLAGS)
        if name == "replica":
            own.append(f"--slave-parallel-threads={self.parallel_threads}")
        return [*COMMON_FLAGS, *own]

    def command(self, name: str) -> list[str]:
        mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        command = [mariadbd, "--no-defaults", f"--datadir={self.datadir(name)}"]
        command += [f"--port={self.ports[name]}", f"--socket={self.socket(name)}"]
        command += [f"--pid-file={self.root / name / 'mysqld.pid'}"]
        command += [f"--log-error={self.root / name / 'error.log'}"]
        if os.geteuid() == 0:
            command.append("--user=root")
        return [*command, *self.flags(name)]

    def start(self) -> None:
        install = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
        primary = self.datadir("primary")
        primary.parent.mkdir(parents=True)
        command = [install, "--no-defaults", f"--datadir={primary}", "--skip-test-db"]
        command += ["--auth-root-authentication-method=normal"]
        if os.geteuid() == 0:
            command.append("--user=root")
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BenchError(f"mariadb-install-db failed: {done.stderr[-500:]}")
        shutil.copytree(primary, self.datadir("replica"))  # the same fresh system tables
        for name in self.NAMES:
            log = open(self.root / name / "stdout.log", "w", encoding="utf-8")
            self._logs.append(log)
            self.processes[name] = subprocess.Popen(
                self.command(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
        for name in self.NAMES:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if self.processes[name].poll() is not None:
                    log_text = (self.root / name / "error.log").read_text(errors="replace")
                    raise BenchError(f"mariadbd {name} exited: {log_text[-800:]}")
                with contextlib.suppress(pymysql.MySQLError, OSError):
                    self.connect(name).close()
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"mariadbd {name} not up after {START_TIMEOUT_S:.0f} s")
                time.sleep(0.1)

    def connect(
        self, name: str, database: str | None = None, multi: bool = False
    ) -> pymysql.Connection[Any]:
        extra: dict[str, Any] = {}
        if multi:
            extra["client_flag"] = pymysql.constants.CLIENT.MULTI_STATEMENTS
        return pymysql.connect(
            unix_socket=str(self.socket(name)),
            user="root",
            database=database,
            autocommit=True,
            charset="utf8mb4",
            **extra,
        )

    def kept(self, name: str) -> Any:
        """A cursor on a connection kept open."""
        if name not in self._kept:
            self._kept[name] = self.connect(name)
        return self._kept[name].cursor()

    def pids(self) -> dict[str, int]:
        return {f"mariadb {name}": p.pid for name, p in self.processes.items()}

    def setup(self) -> None:
        cursor = self.kept("primary")
        cursor.execute("SET SESSION sql_log_bin = 0")
        cursor.execute(f"CREATE USER '{REPL_USER}'@'127.0.0.1' IDENTIFIED BY '{REPL_USER}'")
        cursor.execute(f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'127.0.0.1'")
        cursor.execute("SET SESSION sql_log_bin = 1")
        cursor.execute("SHOW BINARY LOGS")
        first_binlog = cursor.fetchone()[0]
        cursor.execute(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4 COLLATE {COLLATION}")
        cursor.execute(f"USE {DATABASE}")
        for table in PG_TABLES.values():
            cursor.execute(str(CreateTable(table).compile(dialect=DIALECT)))
            for index in table.indexes:
                cursor.execute(str(CreateIndex(index).compile(dialect=DIALECT)))
        cursor.execute("CREATE TABLE bench_marker (id INTEGER PRIMARY KEY)")
        # Replicate from the primary's first binlog: the replica gets the tables by
        # replication too.
        replica = self.kept("replica")
        replica.execute(
            f"CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {self.ports['primary']}, "
            f"MASTER_USER = '{REPL_USER}', MASTER_PASSWORD = '{REPL_USER}', "
            f"MASTER_LOG_FILE = '{first_binlog}', MASTER_LOG_POS = 4"
        )
        replica.execute("START SLAVE")
        self.wait_marker(self.put_marker(), poll_s=0.01)

    def replica_status(self) -> dict[str, Any]:
        cursor = self.kept("replica")
        cursor.execute("SHOW SLAVE STATUS")
        row = cursor.fetchone()
        if row is None:
            return {}
        return dict(zip([d[0] for d in cursor.description], row, strict=True))

    def put_marker(self) -> int:
        self.marker += 1
        self.kept("primary").execute(
            f"INSERT INTO {DATABASE}.bench_marker (id) VALUES (%s)", (self.marker,)
        )
        return self.marker

    def wait_marker(self, marker: int, poll_s: float, timeout_s: float = MARKER_TIMEOUT_S) -> float:
        """Poll the replica every `poll_s` until the marker row is there; when (wall)."""
        deadline = time.monotonic() + timeout_s
        cursor = self.kept("replica")
        sql = f"SELECT 1 FROM {DATABASE}.bench_marker WHERE id = %s"
        polls = 0
        while True:
            try:
                cursor.execute(sql, (marker,))
                if cursor.fetchone():
                    return now_s()
            except pymysql.err.ProgrammingError as exc:
                if exc.args[0] not in (1049, 1146):  # no such database / table (yet)
                    raise
            polls += 1
            if polls % 500 == 0 or time.monotonic() > deadline:
                status = self.replica_status()
                failed = status.get("Slave_SQL_Running") == "No" and status.get("Last_SQL_Error")
                if failed or status.get("Last_IO_Error") or time.monotonic() > deadline:
                    raise BenchError(
                        f"marker {marker} not on the replica: SQL thread "
                        f"{status.get('Slave_SQL_Running')} {status.get('Last_SQL_Error')!r}, "
                        f"IO thread {status.get('Slave_IO_Running')} "
                        f"{status.get('Last_IO_Error')!r}"
                    )
            time.sleep(poll_s)

    def replay(self, schedule: Schedule, connections: int) -> ReplayResult:
        """The schedule's transactions at the primary, as fast as it takes them, on
        `connections` connections (threads; one round trip per transaction: BEGIN ...
        COMMIT as one multi-statement query)."""
        result = ReplayResult()
        items = iter(schedule.items)
        lock = threading.Lock()
        pool = [self.connect("primary", DATABASE, multi=True) for _ in range(connections)]

        def worker(conn: pymysql.Connection[Any]) -> None:
            cursor = conn.cursor()
            # The row images' strings are SQL literals with quotes doubled, nothing else
            # escaped: backslashes must stay themselves.
            cursor.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
            while True:
                with lock:
                    item = next(items, None)
                    if item is None:
                        return
                    result.transactions += 1
                try:
                    cursor.execute(item[1])
                    while cursor.nextset():
                        pass
                except pymysql.MySQLError as exc:
                    with lock:
                        result.errors[type(exc).__name__] += 1
                        result.error_sample = result.error_sample or str(exc)[:300]
                    with contextlib.suppress(pymysql.MySQLError):
                        cursor.execute("ROLLBACK")

        try:
            threads = [threading.Thread(target=worker, args=(conn,)) for conn in pool]
            started = time.perf_counter()
            result.started_s = now_s()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            result.seconds = time.perf_counter() - started
        finally:
            for conn in pool:
                with contextlib.suppress(pymysql.MySQLError):
                    conn.close()
        return result

    def stop_replica(self, mode: str) -> None:
        self.kept("replica").execute("STOP SLAVE" if mode == "all" else "STOP SLAVE SQL_THREAD")

    def start_replica(self, mode: str) -> None:
        self.kept("replica").execute("START SLAVE" if mode == "all" else "START SLAVE SQL_THREAD")

    def wait_fetched(self, timeout_s: float = MARKER_TIMEOUT_S) -> None:
        """Until the replica's IO thread has read the primary's whole binlog."""
        cursor = self.kept("primary")
        cursor.execute("SHOW MASTER STATUS")
        binlog, position = cursor.fetchone()[:2]
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.replica_status()
            if (status["Master_Log_File"], int(status["Read_Master_Log_Pos"])) == (
                binlog,
                int(position),
            ):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"relay log not fetched after {timeout_s:.0f} s: {status}")
            time.sleep(0.01)

    def stop(self) -> list[str]:
        """Stop both servers and delete their datadirs; what went wrong."""
        problems: list[str] = []
        for conn in self._kept.values():
            with contextlib.suppress(pymysql.MySQLError):
                conn.close()
        self._kept.clear()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=STOP_SERVER_S)
            except subprocess.TimeoutExpired:
                problems.append(f"mariadbd {name} killed after {STOP_SERVER_S:.0f} s")
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        return problems


# -- the MariaDB phase ---------------------------------------------------------------------------


@dataclass
class MariaState:
    pair: MariaPair
    replayed: dict[int, int]  # cell -> the owner position the primary has been given


def catch_up(ctx: Context, state: MariaState, upto: dict[int, int]) -> None:
    """Give the primary every owner change up to `upto` (not measured) and wait until the
    replica has it."""
    changes = ctx.cluster.changes(state.replayed, upto)
    if changes:
        written = state.pair.replay(Schedule.of(changes, None, to_sql=mysql_sql), 8)
        if written.errors:
            raise BenchError(f"MariaDB catch-up: {dict(written.errors)} {written.error_sample}")
    state.replayed = dict(upto)
    state.pair.wait_marker(state.pair.put_marker(), ctx.args.poll_ms / 1000)


def mariadb_apply_phase(
    ctx: Context, state: MariaState, unitrade: dict[str, Any]
) -> dict[str, Any]:
    args, cluster, pair = ctx.args, ctx.cluster, state.pair
    stopped_at, heads = unitrade.pop("changes")
    catch_up(ctx, state, stopped_at)
    changes = cluster.changes(stopped_at, heads)
    schedule = Schedule.of(changes, None, to_sql=mysql_sql)
    mode = args.replica_stop
    pair.stop_replica(mode)
    try:
        written = pair.replay(schedule, args.writers)
        if written.errors:
            raise BenchError(f"MariaDB backlog: {dict(written.errors)} {written.error_sample}")
        marker = pair.put_marker()
        fetched_s = 0.0
        if mode == "sql":
            started = time.perf_counter()
            pair.wait_fetched()
            fetched_s = time.perf_counter() - started
        print(
            f"  mariadb backlog: {schedule.rows} rows in {written.transactions} transactions, "
            f"written in {written.seconds:.1f} s"
            + (f", in the relay log {fetched_s:.1f} s later" if mode == "sql" else ""),
            flush=True,
        )
        with Measured(cluster) as measured:
            resumed = now_s()
            pair.start_replica(mode)
            seen = pair.wait_marker(marker, args.poll_ms / 1000)
    except BaseException:
        with contextlib.suppress(pymysql.MySQLError):
            pair.start_replica("all")
        raise
    state.replayed = dict(heads)
    seconds = seen - resumed
    figures = {
        "replica_stop": "STOP SLAVE" if mode == "all" else "STOP SLAVE SQL_THREAD",
        "rows": schedule.rows,
        "transactions": written.transactions,
        "write_seconds": round(written.seconds, 3),
        "seconds": round(seconds, 3),
        "rows_per_s": round(schedule.rows / max(seconds, 1e-9), 1),
        **measured.body(),
    }
    if schedule.rows != unitrade["rows"]:
        print(f"    WARNING: {schedule.rows} rows for MariaDB, {unitrade['rows']} for unitrade")
    print(
        f"  mariadb apply: {schedule.rows} rows in {seconds:.2f} s = "
        f"{schedule.rows / max(seconds, 1e-9):,.0f} rows/s  cores: {cores_text(measured)}",
        flush=True,
    )
    return figures


# -- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    busy_before = busy_before_run()
    server = server_info()
    if server["other_clients"]:
        print(f"WARNING: {server['other_clients']} other client(s) on MariaDB now", flush=True)
    prefix = f"ut_bench_{secrets.token_hex(4)}"
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-repl-maria-"))
    ports = free_ports(6)  # the regions', the control plane's, the primary's, the replica's
    config_path = data_dir / "topology.toml"
    config = write_topology(
        config_path,
        ports[:4],
        storage=f"mysql://root@{HOST}:{SERVER_PORT}/{prefix}_{{region}}_{{cell}}",
        regions={r: {"storage_readers": 1} for r in default_config().region_names},
    )
    setup = Setup(
        config=config,
        cluster=LocalCluster(config, data_dir / "unitrade", config_path),
        baselines={},
        buyers=home_buyers(config, BUYERS_PER_REGION),
        skus=[f"bench-{i:03d}" for i in range(SKU_COUNT)],
    )
    cluster = MariaCluster(
        config,
        setup,
        data_dir,
        owned_cells(config),
        prefix=prefix,
        servers={f"mariadb {SERVER_PORT}": server["pid"]} if server["pid"] else {},
    )
    pair = MariaPair(data_dir / "mariadb", ports[4:], args.replica_parallel_threads)
    try:
        print(
            f"data in {data_dir}; regions on ports {ports[:3]}, control on {ports[3]}; "
            f"copies {prefix}_* on MariaDB {server['version']} port {SERVER_PORT}; private "
            f"primary on {ports[4]}, replica on {ports[5]}",
            flush=True,
        )
        pair.start()
        pair.setup()
        cluster.servers.update(pair.pids())
        setup.cluster.start()
        seed(setup)
        plan = setup.plan([OWNER], OWNER, seed=11)

        def cycle() -> Iterator[tuple[int, bytes]]:
            while True:
                yield from plan

        ctx = Context(args, cluster, None, cycle(), {c: 0 for c in cluster.cells})
        state = MariaState(pair, {c: 0 for c in cluster.cells})
        if args.warmup_orders > 0:
            print(f"warm-up: {args.warmup_orders} orders at hz", flush=True)
            uvloop.run(closed_loop_count(ctx.requests, args.warmup_orders, 16))
            catch_up(ctx, state, cluster.wait_converged(REPLICAS, CONVERGE_TIMEOUT_S))
        print(
            f"apply rate: {args.rounds} round(s), a backlog of {args.backlog_orders} orders "
            "each, unitrade then MariaDB",
            flush=True,
        )
        rounds = []
        for _ in range(args.rounds):
            figures = unitrade_apply_phase(ctx)
            theirs = mariadb_apply_phase(ctx, state, figures)
            rounds.append({"unitrade": figures, "mariadb": theirs})
        profiles: dict[str, Any] = {}
        if args.profile is not None:
            print(f"profiling (not counted), py-spy for {args.profile_seconds} s", flush=True)
            profiled = unitrade_apply_phase(ctx, profiled=True)
            profiled.pop("changes", None)
            profiles["apply"] = profiled
        results = report(
            args, source, busy_before, server, pair, summarise_apply(rounds, "mariadb")
        )
        if profiles:
            results["profiles"] = profiles
        return results
    finally:
        print("stopping processes...", flush=True)
        try:
            cluster.close()
            for process in setup.cluster.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGCONT)
            setup.cluster.stop()
        finally:
            try:
                problems = pair.stop()
                if problems:
                    print(f"MariaDB clean-up problems: {problems}", file=sys.stderr)
            finally:
                try:
                    drop_databases("mysql", prefix)
                finally:
                    shutil.rmtree(data_dir, ignore_errors=True)


def report(
    args: argparse.Namespace,
    source: dict[str, Any],
    busy_before: float,
    server: dict[str, Any],
    pair: MariaPair,
    apply: dict[str, Any],
) -> dict[str, Any]:
    for one in apply["rounds"]:
        one["unitrade"].pop("changes", None)
    ratio = apply["ratio"]
    results: dict[str, Any] = {
        **run_header("bench_replication_mariadb", args.label, source, busy_before),
        "mariadb": {
            "server": server,
            "primary_flags": pair.flags("primary"),
            "replica_flags": pair.flags("replica"),
        },
        "settings": {
            "backlog_orders": args.backlog_orders,
            "rounds": args.rounds,
            "warmup_orders": args.warmup_orders,
            "poll_ms": args.poll_ms,
            "replica_stop": args.replica_stop,
            "replica_parallel_threads": args.replica_parallel_threads,
            "writers": args.writers,
        },
        "apply": apply,
        "targets": {
            "apply_ratio": ratio,
            "apply_ratio_by_round": apply["ratio_by_round"],
            "apply_target": TARGET_APPLY_RATIO,
            "apply_met": ratio is not None and ratio >= TARGET_APPLY_RATIO,
        },
    }
    print_tables(results)
    return results


def print_tables(results: dict[str, Any]) -> None:
    apply = results["apply"]
    print(source_line(results))
    print(
        "\napply rate, catching up a backlog: unitrade's sh on MariaDB against a MariaDB "
        f"replica ({results['settings']['replica_stop']} stopped, "
        f"slave_parallel_threads = {results['settings']['replica_parallel_threads']})"
    )
    print("| round | system | rows | seconds | rows/s | CPU (cores) |")
    print("|---:|---|---:|---:|---:|---|")
    for i, one in enumerate(apply["rounds"], start=1):
        for name, f in one.items():
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in f["cpu_cores"].items() if v >= 0.01)
            print(
                f"| {i} | {name} | {f['rows']:,} | {f['seconds']:.2f} | "
                f"{f['rows_per_s']:,.0f} | {cpu}, other {f['other_cores']:.2f} |"
            )
    t = results["targets"]
    print(
        f"median rows/s: unitrade {fmt(apply['unitrade_rows_per_s'], 0)}, MariaDB "
        f"{fmt(apply['mariadb_rows_per_s'], 0)}; ratio by round {t['apply_ratio_by_round']}"
    )
    print("\n| target | measured | met |")
    print("|---|---:|---|")
    print(
        f"| apply rate >= {t['apply_target']} x MariaDB binlog replication | "
        f"{t['apply_ratio']:.2f} x (median; rounds "
        f"{' / '.join(f'{r:.2f}' for r in t['apply_ratio_by_round'])}) | "
        f"{'yes' if t['apply_met'] else 'NO'} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_replication_mariadb",
        description="Replication apply rate on MariaDB: unitrade's follower catching up a "
        "backlog against MariaDB's binlog replication catching up the same rows (private "
        "primary and replica); needs MariaDB on 127.0.0.1:3306 (root, no password) and the "
        "mariadbd / mariadb-install-db binaries.",
    )
    parser.add_argument(
        "--backlog-orders", type=int, default=8000, help="orders written while sh is stopped"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (unitrade, then MariaDB)")
    parser.add_argument(
        "--warmup-orders", type=int, default=500, help="orders written before the rounds"
    )
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=5.0,
        help="polling interval of sh's checkpoints and of the replica's marker row",
    )
    parser.add_argument(
        "--replica-stop",
        choices=("all", "sql"),
        default="all",
        help="all: STOP SLAVE (nothing fetched while stopped, as a paused follower); sql: "
        "STOP SLAVE SQL_THREAD (the relay log holds the whole backlog before the clock starts)",
    )
    parser.add_argument(
        "--replica-parallel-threads",
        type=int,
        default=0,
        help="the replica's slave_parallel_threads (MariaDB's default 0: one SQL thread)",
    )
    parser.add_argument(
        "--writers", type=int, default=16, help="connections writing the backlog at the primary"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="an extra unitrade catch-up (not counted) with py-spy on sh and hz; raw here",
    )
    parser.add_argument("--profile-seconds", type=int, default=3)
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 0 <= args.warmup_orders <= 100_000:
        parser.error("need 1 <= --rounds <= 20 and 0 <= --warmup-orders <= 100000")
    if not 100 <= args.backlog_orders <= 100_000 or not 0.5 <= args.poll_ms <= 100:
        parser.error("need 100 <= --backlog-orders <= 100000 and 0.5 <= --poll-ms <= 100")
    if not 0 <= args.replica_parallel_threads <= 64 or not 1 <= args.writers <= 64:
        parser.error("need 0 <= --replica-parallel-threads <= 64 and 1 <= --writers <= 64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    per_round = args.backlog_orders * 0.02 + 2 * CONVERGE_TIMEOUT_S + MARKER_TIMEOUT_S
    budget = 300 + args.warmup_orders * 0.02 + (args.rounds + 1) * per_round
    return run_bounded(run, args, budget)


if __name__ == "__main__":
    sys.exit(main())
