"""Clusters whose regions run several processes (`workers`), on PostgreSQL or MariaDB.

A small topology, so that three regions of two processes each stay well within the
database servers' connections, which every test on this machine shares: hz (center) and
sh run 2 workers by default, bj one; four cells: u1 (hz, buckets 0-49), u2 (sh, 50-99),
the center and the global cell (hz). Each copy keeps one reader beside its writer, and
each worker one connection for the leader lock: (2 + 2 + 1) x 4 x 2 + 5 = 45 connections.
"""

from __future__ import annotations

import os
import signal
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support import (
    MYSQL_BASE,
    drop_mysql_databases,
    drop_pg_databases,
    free_ports,
    mysql_prefix,
    new_secret,
    pg_prefix,
    require_mysql,
    require_postgres,
)
from unitrade.cluster import LocalCluster
from unitrade.gateway.edge import WORKER_HEADER
from unitrade.topology.config import TopologyConfig, parse_config

ENGINES = ["postgresql", "mysql"]
U1, U2 = 1, 2


def storage_base(engine: str) -> tuple[str, str, Callable[[str], None]]:
    """(server URL, a fresh database prefix, the function that drops its databases)."""
    if engine == "mysql":
        require_mysql()
        return MYSQL_BASE, mysql_prefix(), drop_mysql_databases
    require_postgres()
    return "postgresql://postgres@127.0.0.1:5432", pg_prefix(), drop_pg_databases


def topology(
    ports: list[int],
    storage: str,
    workers: Mapping[str, int],
    control: str = "",
) -> str:
    lines = [f'secret = "{new_secret()}"']
    for (name, port), center in zip(
        (("hz", ports[0]), ("sh", ports[1]), ("bj", ports[2])), (True, False, False), strict=True
    ):
        lines += [f"[regions.{name}]", f'listen = "127.0.0.1:{port}"']
        if center:
            lines.append("center = true")
        lines += [f'storage = "{storage}"', "storage_readers = 1"]
        lines.append(f"workers = {workers.get(name, 1)}")
    lines += ["[control]", f'listen = "127.0.0.1:{ports[3]}"', "health_orders = false"]
    lines += [line.strip() for line in control.strip().splitlines()]
    cells = [
        (U1, "unit", "hz", "0-49"),
        (U2, "unit", "sh", "50-99"),
        (1000, "center", "hz", None),
        (1001, "global", "hz", None),
    ]
    for cell, kind, owner, buckets in cells:
        lines += ["[[cells]]", f"id = {cell}", f'kind = "{kind}"', f'owner = "{owner}"']
        if buckets:
            lines.append(f'buckets = "{buckets}"')
    return "\n".join(lines) + "\n"


@contextmanager
def workers_cluster(
    tmp_path: Path,
    engine: str,
    workers: Mapping[str, int] | None = None,
    control: str = "",
    supervise: bool = False,
) -> Iterator[tuple[LocalCluster, Path]]:
    """A running cluster of the topology above; its databases dropped afterwards."""
    base, prefix, drop = storage_base(engine)
    text = topology(
        free_ports(4),
        f"{base}/{prefix}_{{region}}_{{cell}}",
        {"hz": 2, "sh": 2} if workers is None else workers,
        control,
    )
    path = tmp_path / "topology.toml"
    path.write_text(text)
    config = parse_config(tomllib.loads(text))
    try:
        with LocalCluster(config, tmp_path / "data", path) as cluster:
            cluster.start()
            if supervise:
                cluster.supervise()
            yield cluster, path
    finally:
        drop(prefix)


def health(config: TopologyConfig, region: str, fresh: bool = False) -> dict[str, Any]:
    """/healthz of one of the region's processes (`fresh`: on a new connection)."""
    headers = {"connection": "close"} if fresh else {}
    body: dict[str, Any] = httpx.get(
        config.region(region).base_url + "/healthz", headers=headers, timeout=10
    ).json()
    return body


def health_of_worker(config: TopologyConfig, region: str, worker: int) -> dict[str, Any]:
    """/healthz as worker `worker` answers it."""
    with pinned(config, region, worker) as client:
        body: dict[str, Any] = client.get("/healthz").json()
    assert body["worker"] == worker
    return body


@contextmanager
def pinned(
    config: TopologyConfig, region: str, worker: int, timeout_s: float = 20.0, **options: Any
) -> Iterator[httpx.Client]:
    """A client with one keep-alive connection that the kernel handed to worker `worker`
    of the region (new connections are tried until one is): every request on it is
    served by that process."""
    deadline = time.monotonic() + timeout_s
    base_url = config.region(region).base_url
    while True:
        client = httpx.Client(
            base_url=base_url,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=30.0,
            **options,
        )
        try:
            reached = client.get("/healthz").headers.get(WORKER_HEADER) == str(worker)
        except httpx.TransportError:
            reached = False
        if reached:
            break
        client.close()
        assert time.monotonic() < deadline, f"no connection reached {region}.{worker}"
        time.sleep(0.01)
    try:
        yield client
    finally:
        client.close()


def leader_of(
    config: TopologyConfig, region: str, timeout_s: float = 15.0, not_pid: int | None = None
) -> int:
    """The worker that leads the region, as the processes report themselves (once one
    reports it: they report every second); with `not_pid`, one that is not that process."""
    deadline = time.monotonic() + timeout_s
    while True:
        for process in health(config, region)["processes"]:
            fresh = process["reported_ms_ago"] < 1_500
            if process["leader"] and fresh and process["pid"] != not_pid:
                return int(process["worker"])
        assert time.monotonic() < deadline, f"no leader in {region}"
        time.sleep(0.1)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process frozen (SIGSTOP) for the block, then resumed."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
