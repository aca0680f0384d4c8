"""What the benchmarks share: a cluster's topology on free ports, the processes' CPU and the
machine's load from /proc, a raw HTTP/1.1 keep-alive client for load generators, the JSON
run header and the hard time bound every run has.

Everything listens on and targets 127.0.0.1 on free ports, never 8700-8703 (a developer's
`unitrade up`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from unitrade.topology.config import TopologyConfig, default_config, load_config
from unitrade.topology.rule import initial_rule, route_buyer

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
RESERVED_PORTS = frozenset({8700, 8701, 8702, 8703})  # a developer's `unitrade up`

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0

REUSE_IDLE_MAX_S = 2.0  # uvicorn closes idle keep-alive connections after 5 s
IDLE_BUSY_MAX = 0.15  # warn when the machine is busier than this before the run


class BenchError(RuntimeError):
    pass


# -- the cluster's topology ---------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for 127.0.0.1 now (all held open until all are chosen)."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            if sock.getsockname()[1] in RESERVED_PORTS:
                sock.close()
                continue
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_topology(
    path: Path,
    ports: Sequence[int],
    storage: str | None = None,
    control_storage: str | None = None,
    sections: Mapping[str, Mapping[str, int | float | str]] | None = None,
    control: Mapping[str, int | float | str | bool] | None = None,
    regions: Mapping[str, Mapping[str, int | str]] | None = None,
) -> TopologyConfig:
    """The default topology (regions, cells, buckets, owners) on the given ports: one per
    region, then the control plane's. `storage` (a template with `{region}` and `{cell}`)
    and `control_storage` replace the SQLite defaults; `sections` adds top-level tables
    such as `{"retention": {...}}`, `control` settings of the `[control]` table, `regions`
    settings of a region's table (e.g. `{"hz": {"workers": 2}}`)."""
    default = default_config()
    lines: list[str] = []
    *region_ports, control_port = ports
    for region, port in zip(default.regions, region_ports, strict=True):
        lines.append(f"[regions.{region.name}]")
        if region.center:
            lines.append("center = true")
        lines.append(f'listen = "{HOST}:{port}"')
        if storage is not None:
            lines.append(f"storage = {json.dumps(storage)}")
        for key, value in (regions or {}).get(region.name, {}).items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    lines += ["[control]", f'listen = "{HOST}:{control_port}"']
    if control_storage is not None:
        lines.append(f"storage = {json.dumps(control_storage)}")
    lines += [f"{key} = {json.dumps(value)}" for key, value in (control or {}).items()]
    lines.append("")
    for name, values in (sections or {}).items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    for cell in default.cells:
        lines += ["[[cells]]", f"id = {cell.id}", f'kind = "{cell.kind.value}"']
        lines.append(f'owner = "{cell.owner}"')
        if cell.buckets:
            lines.append(f'buckets = "{cell.buckets}"')
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    config = load_config(path)
    assert [c.model_dump() for c in config.cells] == [c.model_dump() for c in default.cells]
    return config


# -- processes and the machine ---------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / tick, sum(values) / tick


def wal_bytes(root: Path) -> int:
    total = 0
    for path in root.rglob("*.db-wal"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


def machine_busy_fraction(seconds: float) -> float:
    """How busy the whole machine is over the next `seconds` (0..1)."""
    busy_before, total_before = machine_busy_seconds()
    time.sleep(seconds)
    busy_after, total_after = machine_busy_seconds()
    return (busy_after - busy_before) / max(total_after - total_before, 1e-9)


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- HTTP/1.1 client for load generators ----------------------------------------------------


def order_request(port: int, token: str, body: bytes) -> bytes:
    head = (
        f"POST /v1/orders HTTP/1.1\r\nhost: {HOST}:{port}\r\nauthorization: Bearer {token}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection; requests are prebuilt bytes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes, want_headers: bool = False) -> Reply:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            self.writer.transport.set_write_buffer_limits(high=1 << 20)
        assert self.reader is not None
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lowered = head.lower()
            at = lowered.find(b"\r\ncontent-length:")
            if at < 0:
                raise BenchError("response without content-length")
            end = lowered.find(b"\r\n", at + 17)
            body = await self.reader.readexactly(int(lowered[at + 17 : end]))
        except BaseException:
            self.close()
            raise
        headers: dict[str, str] = {}
        if want_headers:
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
        return Reply(int(head[9:12]), headers, body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def http_request(
    method: str, path: str, port: int, token: str | None = None, body: bytes | None = None
) -> bytes:
    """A request for `Connection.send`: any method and path, a bearer token, a JSON body."""
    head = f"{method} {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\n"
    if token is not None:
        head += f"authorization: Bearer {token}\r\n"
    if body is not None:
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    elif method in ("POST", "PUT", "DELETE"):
        head += "content-length: 0\r\n"
    return (head + "\r\n").encode() + (body or b"")


class PooledConnection(Connection):
    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.last_used = time.monotonic()
        self.uses = 0


class Pool:
    """Idle keep-alive connections per port (the most recently used first); a new one when
    none is idle. A connection idle for longer than `REUSE_IDLE_MAX_S` is closed instead of
    reused: the server closes it after 5 s (uvicorn's keep-alive timeout), and a request
    written as it does so reads nothing back, a client-side race, not a server error."""

    def __init__(self) -> None:
        self.idle: dict[int, list[PooledConnection]] = {}
        self.opened = 0
        self.retired = 0

    def take(self, port: int) -> PooledConnection:
        idle = self.idle.setdefault(port, [])
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if now - connection.last_used <= REUSE_IDLE_MAX_S:
                return connection
            connection.close()
            self.retired += 1
        self.opened += 1
        return PooledConnection(port)

    def give(self, connection: PooledConnection) -> None:
        connection.last_used = time.monotonic()
        connection.uses += 1
        self.idle.setdefault(connection.port, []).append(connection)

    def close(self) -> None:
        for connections in self.idle.values():
            for connection in connections:
                connection.close()
        self.idle.clear()


def error_code(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "?"
    return str(parsed.get("error", "?")) if isinstance(parsed, dict) else "?"


# -- buyers, the run header, the time bound ------------------------------------------------


def home_buyers(config: TopologyConfig, per_region: int) -> dict[str, list[int]]:
    rule = initial_rule(config)
    buyers: dict[str, list[int]] = {r: [] for r in config.region_names}
    for buyer in itertools.count(1_000_001):
        region = route_buyer(rule, buyer).region
        if len(buyers[region]) < per_region:
            buyers[region].append(buyer)
        if all(len(b) >= per_region for b in buyers.values()):
            return buyers
    raise AssertionError("unreachable")


def busy_before_run() -> float:
    """The machine's busy fraction before a run, with a warning when others are using it."""
    busy = machine_busy_fraction(2.0)
    if busy > IDLE_BUSY_MAX:
        print(
            f"WARNING: the machine is {busy:.0%} busy before the benchmark starts; "
            "other load will distort the figures",
            flush=True,
        )
    return busy


def run_header(
    module: str, label: str | None, source: dict[str, Any], busy_before: float | None = None
) -> dict[str, Any]:
    """What every benchmark's JSON starts with: when, the command, what was measured, where."""
    machine: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if busy_before is not None:
        machine["busy_before_run"] = round(busy_before, 3)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([f".venv/bin/python -m benchmarks.{module}", *sys.argv[1:]]),
        "label": label,
        "source": source,
        "machine": machine,
    }


def source_info() -> dict[str, Any]:
    """Which unitrade was measured: its path, and the git state of the repository's src/
    (read-only git commands)."""
    import unitrade

    def git(*command: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(REPO_ROOT), *command],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return "?"
        return done.stdout

    path = Path(unitrade.__file__).resolve().parent
    info: dict[str, Any] = {"unitrade_path": str(path), "git_head": None}
    if path.is_relative_to(REPO_ROOT / "src"):
        info["git_head"] = git("rev-parse", "HEAD")[:12]
        changed = git("status", "--porcelain", "--", "src").split("\n")
        info["src_uncommitted"] = [line[3:] for line in changed if line.strip()]
        if info["src_uncommitted"]:
            diff = git("diff", "HEAD", "--", "src").encode()
            info["src_diff_sha256"] = hashlib.sha256(diff).hexdigest()[:16]
    return info


def source_line(results: dict[str, Any]) -> str:
    """The run's first printed line: which unitrade was measured, and the run's label."""
    source = results["source"]
    dirty = source.get("src_uncommitted")
    return (
        f"\nunitrade from {source['unitrade_path']}"
        + (f" at {source['git_head']}" if source["git_head"] else " (not this repository's src/)")
        + (f" + uncommitted {', '.join(dirty)} ({source['src_diff_sha256']})" if dirty else "")
        + (f"; label: {results['label']}" if results["label"] else "")
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bounded(
    run_fn: Callable[[argparse.Namespace], dict[str, Any]],
    args: argparse.Namespace,
    budget_s: float,
) -> int:
    """Run a benchmark under a hard time bound (the alarm handler raises, so every process
    is still stopped) and write its results to `--json`; the exit status. SIGTERM stops it
    the same way."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)
    signal.alarm(int(budget_s))
    try:
        results = run_fn(args)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({str(exc) or 'Ctrl-C'}); processes stopped", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nresults written to {args.json}")
    return 0
