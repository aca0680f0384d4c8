"""Order creation benchmark (run on demand, not in CI): unitrade against a plain baseline.

    .venv/bin/python -m benchmarks.bench_orders [--duration S] [--concurrency N] [--json PATH]

In one run it starts a three-region unitrade cluster (the default topology, on free ports)
and the single-database baselines (`benchmarks/baseline_app.py`) side by side, seeds the
same products in all of them, warms up, and measures:

1. throughput and latency under closed-loop load (`--concurrency` requests in flight for
   `--duration` seconds per phase): the baseline (one thread hop per transaction); the same
   baseline with its transactions inline on the event loop ("baseline inline", not a
   target, skip with `--no-inline-baseline`); unitrade with every request sent to its
   buyer's home region ("direct", buyers of all three regions); unitrade with hz-homed
   buyers sent to hz only. Phases alternate over `--rounds` rounds (ABBA order).
2. forwarded against direct latency, one request at a time: hz-homed buyers sent to hz
   (direct) and to sh (forwarded once to hz), interleaved with sh-homed buyers sent to sh
   (direct, but the stock reservation, and the catalog lookup unless cached, are calls to
   hz) and with the baselines, `--sequential` of each.
3. with `--profile DIR`, two extra load phases (not counted: direct, then hz only) with
   py-spy recording the region processes.

Everything listens on and targets 127.0.0.1 on free ports (never 8700-8703), every phase is
bounded in time, and every process the benchmark starts is stopped on exit, Ctrl-C or error.
The load generator is raw HTTP/1.1 over keep-alive connections on uvloop in this process;
its CPU use is reported so that it can be told apart from the servers'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import orjson
import uvloop

from benchmarks.harness import (
    HOST,
    REPO_ROOT,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    BenchError,
    Connection,
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
    source_line,
    wal_bytes,
    write_topology,
)
from unitrade.cluster import LocalCluster
from unitrade.topology.config import TopologyConfig
from unitrade.web.tokens import issue_token

SKU_COUNT = 50
STOCK = 10**8  # never runs out
BUYERS_PER_REGION = 600
LINES_PER_ORDER = 2
PLAN_LENGTH = 6_000
GRACE_S = 20.0  # bound on finishing the requests in flight after a phase's deadline
INLINE = "baseline inline"  # the second baseline: the same app, transactions on the loop
OTHER_CORES_MAX = 0.2  # a phase with more unattributed busy CPU than this is flagged
TARGETS = {"unitrade >= 0.85 x baseline orders/s": 0.85, "forwarded p50 <= 1.5 x direct": 1.5}


# -- processes ------------------------------------------------------------------------------


class Baseline:
    """The baseline app in its own uvicorn process (`inline`: no thread hop)."""

    def __init__(self, name: str, port: int, data_dir: Path, inline: bool = False) -> None:
        self.name = name
        self.port = port
        self.inline = inline
        self.db = data_dir / name / "shop.db"
        self.log_path = data_dir / "logs" / f"{name}.log"
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
        command += ["--port", str(self.port), "--db", str(self.db)]
        command += ["--inline"] if self.inline else []
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
                    raise BenchError(f"{self.name} exited with {self.process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.base_url + "/healthz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} not healthy after {START_TIMEOUT_S:.0f} s")
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


# -- HTTP/1.1 load generator -----------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    duration_s: float
    completed: int  # 201s completed before the deadline
    errors: Counter[str] = field(default_factory=Counter)
    error_sample: str = ""
    latencies_s: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0  # fraction of all cores busy
    wal_mb: dict[str, float] = field(default_factory=dict)  # SQLite WAL files after the phase
    other_cpu_s: float = 0.0  # busy CPU of the machine not used by the servers or the client

    @property
    def throughput(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else math.nan


async def closed_loop(
    name: str, plan: Sequence[tuple[int, bytes]], concurrency: int, duration_s: float
) -> PhaseResult:
    """`concurrency` workers, each sending the next request of the plan as soon as its
    previous one is answered, until `duration_s` has passed."""
    result = PhaseResult(name, concurrency, duration_s, 0)
    requests = itertools.cycle(plan)
    latencies = result.latencies_s
    clock = time.perf_counter

    async def worker() -> None:
        connections: dict[int, Connection] = {}
        try:
            while (start := clock()) < deadline:
                port, request = next(requests)
                connection = connections.get(port) or connections.setdefault(port, Connection(port))
                try:
                    reply = await connection.send(request)
                except (OSError, asyncio.IncompleteReadError, BenchError) as exc:
                    result.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.01)
                    continue
                end = clock()
                if reply.status != 201:
                    result.errors[str(reply.status)] += 1
                    result.error_sample = result.error_sample or reply.body[:300].decode()
                elif end <= deadline:
                    latencies.append(end - start)
        finally:
            for connection in connections.values():
                connection.close()

    deadline = clock() + duration_s
    async with asyncio.timeout(duration_s + GRACE_S):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.completed = len(latencies)
    return result


async def sequential(
    plans: Mapping[str, Sequence[tuple[int, bytes]]],
    count: int,
    expect: Mapping[str, Mapping[str, str | None]],
) -> dict[str, PhaseResult]:
    """One request at a time, the plans interleaved (a, b, c, a, b, c, ...); checks the
    response headers against `expect` (e.g. which region served a forwarded request)."""
    results = {name: PhaseResult(name, 1, 0.0, 0) for name in plans}
    connections: dict[int, Connection] = {}
    clock = time.perf_counter
    try:
        async with asyncio.timeout(count * len(plans) * 0.5 + GRACE_S):
            for i in range(count):
                for name, plan in plans.items():
                    port, request = plan[i % len(plan)]
                    connection = connections.setdefault(port, Connection(port))
                    start = clock()
                    reply = await connection.send(request, want_headers=True)
                    elapsed = clock() - start
                    result = results[name]
                    wrong = {
                        k: reply.headers.get(k)
                        for k, v in expect.get(name, {}).items()
                        if reply.headers.get(k) != v
                    }
                    if reply.status != 201 or wrong:
                        result.errors[
                            f"{reply.status} {wrong}" if wrong else str(reply.status)
                        ] += 1
                        result.error_sample = result.error_sample or reply.body[:300].decode()
                    else:
                        result.latencies_s.append(elapsed)
                        result.duration_s += elapsed
    finally:
        for connection in connections.values():
            connection.close()
    for result in results.values():
        result.completed = len(result.latencies_s)
    return results


# -- the benchmark -------------------------------------------------------------------------


@dataclass
class Setup:
    config: TopologyConfig
    cluster: LocalCluster
    baselines: dict[str, Baseline]  # "baseline" (thread hop), "baseline inline" (optional)
    buyers: dict[str, list[int]]  # region -> buyer IDs homed there
    skus: list[str]

    def wal_mb(self) -> dict[str, float]:
        """Total size of the SQLite WAL files: unitrade (all regions) and each baseline."""
        roots = {"unitrade": self.cluster.data_dir}
        roots.update({name: b.db.parent for name, b in self.baselines.items()})
        return {name: round(wal_bytes(root) / 1e6, 1) for name, root in roots.items()}

    def port(self, region: str) -> int:
        return self.config.region(region).port

    def pids(self) -> dict[str, int]:
        pids = {region: p.pid for region, p in self.cluster.processes.items()}
        for name, baseline in self.baselines.items():
            assert baseline.process is not None
            pids[name] = baseline.process.pid
        return pids

    def plan(
        self, buyer_regions: Sequence[str], target: str | None, seed: int
    ) -> list[tuple[int, bytes]]:
        """Prebuilt requests: buyers of `buyer_regions` taken in turn, each sent to `target`
        (a region name or a baseline's name), or to the buyer's home region when `target` is
        None."""
        rng = random.Random(seed)
        keys = self.config.token_keys
        tokens: dict[int, str] = {}
        plan: list[tuple[int, bytes]] = []
        for i in range(PLAN_LENGTH):
            region = buyer_regions[i % len(buyer_regions)]
            buyer = rng.choice(self.buyers[region])
            token = tokens.get(buyer) or tokens.setdefault(buyer, issue_token(keys, buyer_id=buyer))
            skus = rng.sample(self.skus, LINES_PER_ORDER)
            body = orjson.dumps({"items": [{"sku": s, "qty": rng.randint(1, 3)} for s in skus]})
            if target in self.baselines:
                port = self.baselines[target].port
            else:
                port = self.port(target or region)
            plan.append((port, order_request(port, token, body)))
        return plan


def seed(setup: Setup) -> None:
    """The same catalog and stock in unitrade (through hz, the global cell's owner) and in
    the baselines."""
    token = issue_token(setup.config.token_keys, admin=True)
    headers = {"authorization": f"Bearer {token}"}
    urls = [setup.config.region("hz").base_url]
    urls += [baseline.base_url for baseline in setup.baselines.values()]
    with httpx.Client(timeout=10.0, headers=headers) as client:
        for i, sku in enumerate(setup.skus):
            body = {"title": f"benchmark product {i}", "price_cents": 199 + 100 * i, "stock": STOCK}
            for url in urls:
                response = client.put(f"{url}/v1/admin/products/{sku}", json=body)
                if response.status_code != 200:
                    raise BenchError(f"seeding {sku} at {url}: {response.text}")


def measure(
    setup: Setup, name: str, plan: Sequence[tuple[int, bytes]], concurrency: int, duration: float
) -> PhaseResult:
    pids = setup.pids()
    before = {n: cpu_seconds(p) for n, p in pids.items()}
    busy_before, total_before = machine_busy_seconds()
    client_before = self_cpu_seconds()
    wall = time.perf_counter()
    result = uvloop.run(closed_loop(name, plan, concurrency, duration))
    wall = time.perf_counter() - wall
    result.client_cpu_s = self_cpu_seconds() - client_before
    busy_after, total_after = machine_busy_seconds()
    result.machine_busy = (busy_after - busy_before) / max(total_after - total_before, 1e-9)
    result.server_cpu_s = {n: cpu_seconds(p) - before[n] for n, p in pids.items()}
    result.wal_mb = setup.wal_mb()
    # Busy CPU not accounted to the servers or the load generator: other processes, kernel
    # threads (e.g. writing back dirty pages). Much of it means the figures are distorted.
    known = sum(result.server_cpu_s.values()) + result.client_cpu_s
    result.other_cpu_s = max(0.0, result.machine_busy * (os.cpu_count() or 1) * wall - known)
    print(
        f"  {name:<22} {result.throughput:8.1f} orders/s  p50 {ms(pct(result, 0.5)):6.2f} ms  "
        f"p99 {ms(pct(result, 0.99)):6.2f} ms  errors {sum(result.errors.values())}  "
        f"client {result.client_cpu_s / wall:.2f} cores  machine {result.machine_busy:.0%} "
        f"(other {result.other_cpu_s / wall:.2f} cores)  WAL MB {result.wal_mb}",
        flush=True,
    )
    if result.errors:
        print(f"    errors: {dict(result.errors)} e.g. {result.error_sample}", flush=True)
    return result


def pct(result: PhaseResult | list[float], q: float) -> float:
    values = sorted(result.latencies_s if isinstance(result, PhaseResult) else result)
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def ms(seconds: float) -> float:
    return seconds * 1000.0


def pooled(results: list[PhaseResult], servers: set[str]) -> dict[str, Any]:
    """The rounds of one phase together; CPU per order counts the processes in `servers`."""
    latencies = [x for r in results for x in r.latencies_s]
    duration = sum(r.duration_s for r in results)
    cpu: Counter[str] = Counter()
    for r in results:
        cpu.update(r.server_cpu_s)
    return {
        "orders_per_s": sum(r.completed for r in results) / duration if duration else math.nan,
        "orders_per_s_by_round": [round(r.throughput, 1) for r in results],
        "p50_ms": round(ms(pct(latencies, 0.5)), 3),
        "p99_ms": round(ms(pct(latencies, 0.99)), 3),
        "mean_ms": round(ms(sum(latencies) / len(latencies)), 3) if latencies else math.nan,
        "requests": len(latencies),
        "errors": sum(sum(r.errors.values()) for r in results),
        "client_cpu_cores": round(sum(r.client_cpu_s for r in results) / duration, 3),
        "other_cpu_cores": round(sum(r.other_cpu_s for r in results) / duration, 3),
        "server_cpu_cores": {n: round(s / duration, 3) for n, s in cpu.items()},
        "server_cpu_ms_per_order": round(
            1000 * sum(cpu[n] for n in servers) / max(1, sum(r.completed for r in results)), 3
        ),
        "machine_busy": round(sum(r.machine_busy for r in results) / len(results), 3),
        "wal_mb_after_each_round": [r.wal_mb for r in results],
        "rounds_with_other_load": [
            i for i, r in enumerate(results) if r.other_cpu_s / r.duration_s > OTHER_CORES_MAX
        ],
    }


PROFILE_MODES = {"": [], "-gil": ["--gil"]}  # all non-idle threads; the GIL holder only


def profile(
    setup: Setup,
    phases: Mapping[str, tuple[Sequence[tuple[int, bytes]], Sequence[str]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Extra load phases (not counted), `{name: (plan, regions)}`, during each of which
    py-spy records the regions: every non-idle thread (`<name>-<region>.txt`) and only the
    thread holding the GIL (`<name>-<region>-gil.txt`)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy (.venv/bin/pip install py-spy)")
    out: Path = args.profile
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, Any] = {}
    for phase, (plan, regions) in phases.items():
        files = {
            f"{phase}-{region}{mode}": (setup.cluster.processes[region].pid, flags)
            for region in regions
            for mode, flags in PROFILE_MODES.items()
        }
        for name in files:
            (out / f"{name}.txt").unlink(missing_ok=True)
        spied = SpiedLoad(spy, files, out, max(1, int(args.profile_seconds)))
        spied.run(setup, f"profiling {phase}", plan, args.concurrency)
        for name in files:
            if (out / f"{name}.txt").exists():
                summaries[name] = summarise_profile(out / f"{name}.txt")
    for name, summary in summaries.items():
        print_profile(f"{name} ({out / name}.txt)", summary)
    return summaries


@dataclass
class SpiedLoad:
    """A load phase with py-spy recording processes: py-spy starts 1 s into the load and
    records for `seconds`; the load lasts `seconds + 3`."""

    spy: str
    files: dict[str, tuple[int, list[str]]]  # name -> (pid, py-spy flags)
    out: Path
    seconds: int
    spies: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_spies(self) -> None:
        for name, (pid, flags) in self.files.items():
            command = [self.spy, "record", "-p", str(pid), "-d", str(self.seconds), "-f", "raw"]
            command += ["--threads", "--nonblocking", *flags, "-o", str(self.out / f"{name}.txt")]
            self.spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))

    def run(
        self, setup: Setup, name: str, plan: Sequence[tuple[int, bytes]], concurrency: int
    ) -> None:
        timer = threading.Timer(1.0, self.start_spies)
        try:
            timer.start()
            measure(setup, name, plan, concurrency, self.seconds + 3.0)
            timer.join()
            for spy in self.spies:
                spy.wait(timeout=self.seconds + 30)
        finally:
            timer.cancel()
            timer.join()
            for spy in self.spies:
                if spy.poll() is None:
                    spy.terminate()
                    spy.wait(timeout=STOP_TIMEOUT_S)


def _frame_label(frame: str) -> tuple[str, str]:
    """`name (path/to/file.py:123)` -> (`name`, `path/to/file.py`), the path made short."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return name, path


def _package(path: str) -> str:
    if path.startswith("unitrade/"):
        return "/".join(path.split("/")[:2]).removesuffix(".py")
    return path.split("/", 1)[0].removesuffix(".py")


# Where a sample's time goes: the first rule with a marker in the stack wins, except the
# thread hand-off, which is recognised by the leaf frame (a transaction on a worker thread
# has the executor's frames below it).
HAND_OFF = "thread hand-off (executor submit/wake-up, future callbacks)"
HAND_OFF_LEAVES = ("concurrent/futures/", "_chain_future", "asyncio/futures.py")
SUBSYSTEMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("failed `import sniffio` in httpcore (importlib)", ("_find_and_load",)),
    ("logging (httpx logs every request at INFO)", ("logging/__init__.py",)),
    ("storage: transactions (unitrade/storage, SQLAlchemy, SQLite)", ("unitrade/storage/",)),
    (
        "outgoing HTTP: RPC and forwarding (client side)",
        ("httpx/", "httpcore/", "aiohttp/", "unitrade/rpc/client.py", "gateway/forward.py"),
    ),
    ("region signature check (HMAC)", ("unitrade/rpc/signing.py",)),
    ("bearer token check (HMAC)", ("unitrade/web/tokens.py",)),
    ("services (orders, inventory, catalog) outside storage and RPC", ("unitrade/services/",)),
    ("HTTP server and framework (uvicorn, Starlette, FastAPI, pydantic)", ("uvicorn/",)),
)
OTHER = "other (event loop in C: uvloop I/O, scheduling)"


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """A py-spy raw (folded) profile summarised: samples by thread, by subsystem
    (`SUBSYSTEMS`), by package of the leaf frame, the top leaf frames, and the unitrade
    functions by inclusive samples. Shares are of all samples in the file."""
    threads: Counter[str] = Counter()
    subsystems: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith(("thread (", "process ")):
            thread = frames.pop(0).partition(": ")[2]
        frames = [f for f in frames if " (" in f]
        if not frames:
            continue
        total += count
        threads[thread.rstrip("0123456789").rstrip("_")] += count
        label = next((t for t, marks in SUBSYSTEMS if any(m in stack for m in marks)), OTHER)
        if any(mark in frames[-1] for mark in HAND_OFF_LEAVES):
            label = HAND_OFF
        subsystems[label] += count
        name, file = _frame_label(frames[-1])
        leaves[f"{file}:{name}"] += count
        packages[_package(file)] += count
        for key in {f"{f}:{n}" for n, f in map(_frame_label, frames) if f.startswith("unitrade/")}:
            inclusive[key] += count

    def shares(counter: Counter[str], n: int = top) -> list[tuple[str, float]]:
        return [(key, round(value / total, 4)) for key, value in counter.most_common(n)]

    return {
        "samples": total,
        "threads": shares(threads, 8),
        "subsystems": shares(subsystems, len(SUBSYSTEMS) + 2),
        "leaf_packages": shares(packages),
        "leaf_frames": shares(leaves),
        "unitrade_inclusive": shares(inclusive, top + 6),
    }


def print_profile(name: str, summary: dict[str, Any]) -> None:
    what = "GIL holder only" if name.split(" ")[0].endswith("-gil") else "all non-idle threads"
    print(f"\nprofile of {name}: {summary['samples']} samples ({what})")
    if not summary["samples"]:
        return
    print("  by thread: " + ", ".join(f"{t} {s:.0%}" for t, s in summary["threads"]))
    titles = {
        "subsystems": "where the time goes (first matching subsystem of each stack)",
        "leaf_packages": "self time by package of the leaf frame",
        "leaf_frames": "self time, top leaf frames",
        "unitrade_inclusive": "inclusive time, unitrade functions",
    }
    for key, title in titles.items():
        print(f"  {title}:")
        for label, share in summary[key]:
            print(f"    {share:6.1%}  {label}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()  # before the run: src/ may change while it runs
    busy_before = busy_before_run()
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-"))
    ports = free_ports(6)
    config_path = data_dir / "topology.toml"
    config = write_topology(config_path, ports[:4])
    setup = Setup(
        config=config,
        cluster=LocalCluster(config, data_dir / "unitrade", config_path),
        baselines={"baseline": Baseline("baseline", ports[4], data_dir)},
        buyers=home_buyers(config, BUYERS_PER_REGION),
        skus=[f"bench-{i:03d}" for i in range(SKU_COUNT)],
    )
    if not args.no_inline_baseline:
        setup.baselines[INLINE] = Baseline(INLINE, ports[5], data_dir, inline=True)
    try:
        print(
            f"data in {data_dir}; regions on ports {ports[:3]}, control on {ports[3]}, "
            f"baselines on {ports[4:]}"
        )
        setup.cluster.start()
        for baseline in setup.baselines.values():
            baseline.start()
        seed(setup)
        regions = config.region_names
        plans = {name: setup.plan(regions, name, seed=1) for name in setup.baselines} | {
            "unitrade direct": setup.plan(regions, None, seed=2),
            "unitrade hz only": setup.plan(["hz"], "hz", seed=3),
        }
        if args.no_hz_only:
            del plans["unitrade hz only"]
        print(f"warm-up ({args.warmup:.0f} s each)", flush=True)
        for name, plan in plans.items() if args.warmup > 0 else ():
            measure(setup, f"warm-up {name}", plan, args.concurrency, args.warmup)
        print(
            f"measuring: {args.rounds} round(s) of {args.duration:.0f} s per phase, "
            f"concurrency {args.concurrency}",
            flush=True,
        )
        phases: dict[str, list[PhaseResult]] = {name: [] for name in plans}
        for round_no in range(args.rounds):
            order = list(plans) if round_no % 2 == 0 else list(reversed(plans))
            for name in order:
                phases[name].append(
                    measure(setup, name, plans[name], args.concurrency, args.duration)
                )
        print(f"sequential latency: {args.sequential} requests of each, interleaved", flush=True)
        sequential_plans = {
            "direct (hz buyer -> hz)": setup.plan(["hz"], "hz", seed=4),
            "forwarded (hz buyer -> sh -> hz)": setup.plan(["hz"], "sh", seed=5),
            "direct (sh buyer -> sh, reservation at hz)": setup.plan(["sh"], "sh", seed=7),
        } | {name: setup.plan(regions, name, seed=6) for name in setup.baselines}
        expect: dict[str, dict[str, str | None]] = {
            "direct (hz buyer -> hz)": {
                "x-unitrade-served-by": "hz",
                "x-unitrade-forwarded-by": None,
            },
            "forwarded (hz buyer -> sh -> hz)": {
                "x-unitrade-served-by": "hz",
                "x-unitrade-forwarded-by": "sh",
            },
            "direct (sh buyer -> sh, reservation at hz)": {
                "x-unitrade-served-by": "sh",
                "x-unitrade-forwarded-by": None,
            },
        }
        warm = {name: plan[-50:] for name, plan in sequential_plans.items()}
        uvloop.run(sequential(warm, 50, expect))
        latency = uvloop.run(sequential(sequential_plans, args.sequential, expect))
        for result in latency.values():
            if result.errors:
                print(f"  {result.name}: errors {dict(result.errors)} {result.error_sample}")
        profiles = {}
        if args.profile is not None:
            profiled = {"direct": (plans["unitrade direct"], ["hz", "sh"])}
            if "unitrade hz only" in plans:
                profiled["hz_only"] = (plans["unitrade hz only"], ["hz"])
            profiles = profile(setup, profiled, args)
        results = report(args, source, phases, latency)
        results["machine"]["busy_before_run"] = round(busy_before, 3)
        if profiles:
            results["profile"] = {"py_spy_seconds": args.profile_seconds, **profiles}
        return results
    finally:
        print("stopping processes...", flush=True)
        try:
            for baseline in setup.baselines.values():
                baseline.stop()
        finally:
            setup.cluster.stop()
        if args.keep_data:
            print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def report(
    args: argparse.Namespace,
    source: dict[str, Any],
    phases: dict[str, list[PhaseResult]],
    latency: dict[str, PhaseResult],
) -> dict[str, Any]:
    load = {
        name: pooled(results, {name} if name.startswith("baseline") else {"hz", "sh", "bj"})
        for name, results in phases.items()
    }
    for name, figures in load.items():
        for base, key in (("baseline", "baseline"), (INLINE, "inline_baseline")):
            if base not in load:
                continue
            figures[f"ratio_to_{key}"] = round(
                figures["orders_per_s"] / load[base]["orders_per_s"], 3
            )
            figures[f"ratio_to_{key}_by_round"] = [
                round(r.throughput / b.throughput, 3)
                for r, b in zip(phases[name], phases[base], strict=True)
            ]
    for figures in load.values():
        figures["orders_per_s"] = round(figures["orders_per_s"], 1)
    seq = {
        name: {
            "p50_ms": round(ms(pct(r, 0.5)), 3),
            "p99_ms": round(ms(pct(r, 0.99)), 3),
            "mean_ms": round(ms(sum(r.latencies_s) / max(1, r.completed)), 3),
            "requests": r.completed,
            "errors": sum(r.errors.values()),
        }
        for name, r in latency.items()
    }
    direct, forwarded = seq["direct (hz buyer -> hz)"], seq["forwarded (hz buyer -> sh -> hz)"]
    forward_ratio = round(forwarded["p50_ms"] / direct["p50_ms"], 3)
    throughput_ratio = load["unitrade direct"]["ratio_to_baseline"]
    results: dict[str, Any] = {
        **run_header("bench_orders", args.label, source),
        "settings": {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "sequential": args.sequential,
            "lines_per_order": LINES_PER_ORDER,
            "skus": SKU_COUNT,
        },
        "load": load,
        "sequential": seq,
        "targets": {
            "throughput_ratio": throughput_ratio,
            "throughput_target": TARGETS["unitrade >= 0.85 x baseline orders/s"],
            "throughput_met": throughput_ratio >= 0.85,
            "forwarded_p50_ratio": forward_ratio,
            "forwarded_target": TARGETS["forwarded p50 <= 1.5 x direct"],
            "forwarded_met": forward_ratio <= 1.5,
            # Not a target of the issue: the same ratio against the baseline without the
            # thread hop (unitrade runs its SQLite transactions on the loop too).
            "throughput_ratio_to_inline_baseline": load["unitrade direct"].get(
                "ratio_to_inline_baseline"
            ),
        },
    }
    print_tables(results)
    return results


def print_tables(results: dict[str, Any]) -> None:
    settings = results["settings"]
    print(source_line(results))
    print(
        f"\nthroughput, concurrency {settings['concurrency']}, "
        f"{settings['rounds']} x {settings['duration_s']:.0f} s per phase"
    )
    print(
        "| phase | orders/s | by round | p50 ms | p99 ms | x baseline | x baseline inline "
        "| errors | CPU used (cores) | server CPU ms/order | WAL MB at end |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for name, f in results["load"].items():
        cpu = (
            ", ".join(f"{n} {c:.2f}" for n, c in f["server_cpu_cores"].items() if c >= 0.01)
            + f", client {f['client_cpu_cores']:.2f}, other {f['other_cpu_cores']:.2f}"
        )
        rounds = " / ".join(f"{x:.0f}" for x in f["orders_per_s_by_round"])
        wal = f["wal_mb_after_each_round"][-1][name if name.startswith("baseline") else "unitrade"]
        inline = f.get("ratio_to_inline_baseline")
        print(
            f"| {name} | {f['orders_per_s']:.1f} | {rounds} | {f['p50_ms']:.2f} | "
            f"{f['p99_ms']:.2f} | {f['ratio_to_baseline']:.2f} | "
            f"{'-' if inline is None else f'{inline:.2f}'} | {f['errors']} | {cpu} | "
            f"{f['server_cpu_ms_per_order']:.2f} | {wal:.0f} |"
        )
    flagged = {n: f["rounds_with_other_load"] for n, f in results["load"].items()}
    if any(flagged.values()):
        print(
            f"WARNING: more than {OTHER_CORES_MAX} cores of other load (not the servers, not "
            f"the client) in rounds {flagged}: those figures are distorted; rerun on a quiet "
            "machine"
        )
    print(f"\nsequential latency (concurrency 1, {settings['sequential']} of each, interleaved)")
    print("| path | p50 ms | p99 ms | mean ms | errors |")
    print("|---|---:|---:|---:|---:|")
    for name, f in results["sequential"].items():
        print(
            f"| {name} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['mean_ms']:.2f} | "
            f"{f['errors']} |"
        )
    t, direct = results["targets"], results["load"]["unitrade direct"]
    by_round = " / ".join(f"{x:.2f}" for x in direct["ratio_to_baseline_by_round"])
    print("\n| target | measured | met |")
    print("|---|---:|---|")
    print(
        f"| unitrade direct >= {t['throughput_target']} x baseline orders/s | "
        f"{t['throughput_ratio']:.2f} x (by round {by_round}) | "
        f"{'yes' if t['throughput_met'] else 'NO'} |"
    )
    if "ratio_to_inline_baseline" in direct:
        by_round = " / ".join(f"{x:.2f}" for x in direct["ratio_to_inline_baseline_by_round"])
        print(
            f"| (not a target) unitrade direct against the inline baseline | "
            f"{direct['ratio_to_inline_baseline']:.2f} x (by round {by_round}) | - |"
        )
    print(
        f"| forwarded p50 <= {t['forwarded_target']} x direct p50 | "
        f"{t['forwarded_p50_ratio']:.2f} x | {'yes' if t['forwarded_met'] else 'NO'} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_orders",
        description="Order creation: unitrade (3 regions) against a single-database baseline.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of load phases (ABBA)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per target")
    parser.add_argument(
        "--sequential", type=int, default=500, help="requests of each path, forwarded vs direct"
    )
    parser.add_argument("--no-hz-only", action="store_true", help="skip the hz-only phase")
    parser.add_argument(
        "--no-inline-baseline",
        action="store_true",
        help="skip the second baseline (transactions inline on the event loop)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after measuring, run py-spy on hz and sh during extra load; raw profiles here",
    )
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 1024 or args.duration <= 0 or args.rounds < 1:
        parser.error("need 1 <= --concurrency <= 1024, --duration > 0, --rounds >= 1")
    if not 1 <= args.sequential <= 100_000 or args.warmup < 0:
        parser.error("need 1 <= --sequential <= 100000 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A hard bound on the whole run; the handler raises, so the processes are still stopped.
    budget = 180 + (args.rounds * 4 + 4) * (args.duration + args.warmup + GRACE_S)
    budget += args.sequential * 0.2 + (2 * args.profile_seconds + 80 if args.profile else 0)
    return run_bounded(run, args, budget)


if __name__ == "__main__":
    sys.exit(main())
