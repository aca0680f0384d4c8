"""One run of `unitrade verify`: start the cluster, run the workloads under the nemesis,
stop the faults, wait for quiescence, read everything back, check, report. Whatever
happens, every process started is stopped and its PostgreSQL databases dropped."""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from unitrade.cluster import LocalCluster
from unitrade.control.reconcile import Reconcile
from unitrade.replication.diff_cli import cluster_regions, run_diff
from unitrade.topology.config import TopologyConfig
from unitrade.verify import elle
from unitrade.verify import report as reporting
from unitrade.verify.attached import AttachedCluster, AttachError, Processes, attach_problems
from unitrade.verify.changelog import owner_positions, read_changelogs
from unitrade.verify.checks import Ending, Result, RuleVersion, check_all
from unitrade.verify.faults import NETWORK_FAULTS, Nemesis, NetworkFaults, schedule
from unitrade.verify.history import History
from unitrade.verify.setup import BASES, drop_databases, pg_prefix, write_topology
from unitrade.verify.workload import (
    POLLER,
    REQUEST_TIMEOUT_S,
    SKUS,
    Buyer,
    Client,
    attached_skus,
    buyers_of_every_cell,
    final_reads,
    seed_stock,
    shopper,
    stock_poller,
)
from unitrade.web.tokens import issue_token

# A run's hard bound beyond --seconds: quiescence, reconcile, final reads and diff must fit
# in it; past it the run ends (and fails) whatever it was waiting for.
AFTER_WORKLOAD_S = 420.0
QUIESCENCE_S = 90.0  # every region up, connected, caught up: or the run reports it was not
WORKERS = 8
ORDER_ID = re.compile(r"\b(\d{6,19})\b")


@dataclass(frozen=True)
class Attach:
    """A running cluster to verify instead of one of the run's own: its topology and,
    for the faults that stop processes, the data directory of the `unitrade up` that
    supervises it (verify/attached.py)."""

    config: TopologyConfig
    config_path: Path | None
    data_dir: Path | None


@dataclass
class Options:
    seconds: float = 30.0
    rate: float = 20.0  # operations per second over all workers
    faults: tuple[str, ...] = ("kill", "pause", "switch", "control-kill")
    seed: int = 1
    storage: str = "sqlite"
    out: Path = Path("verify-out")
    attach: Attach | None = None


@dataclass
class Outcome:
    results: list[Result]
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(r.violations == 0 for r in self.results)


class OutError(ValueError):
    """An --out directory verify will not empty."""


def check_out(out: Path) -> None:
    """--out is emptied first: only when it is empty or a previous run's (history.jsonl
    in it), never a directory of something else given by mistake."""
    if out.exists() and not out.is_dir():
        raise OutError(f"--out {out} is a file")
    if out.exists() and any(out.iterdir()) and not (out / "history.jsonl").exists():
        raise OutError(
            f"--out {out} is not empty and holds no previous run (no history.jsonl): "
            "give an empty or new directory"
        )


def verify(
    options: Options,
    console: Console,
    network: NetworkFaults | None = None,
    launcher: Callable[[str], list[str]] | None = None,
) -> Outcome:
    """One run. `network` applies the partition and slow faults and `launcher` prefixes
    each process's command (a region in a network namespace of its own). With partition
    or slow among the faults and no `network` given, the run makes its own
    (verify/network.py): regions in network namespaces where it can, else a TCP proxy
    between them; on PostgreSQL always the proxy (the database is on the machine's
    loopback, which a namespace does not reach), and so on MariaDB."""
    out = options.out.resolve()
    check_out(out)
    attach = options.attach
    if attach is not None:
        problem = attach_problems(attach.config, attach.data_dir, list(options.faults))
        if problem:
            raise AttachError(problem)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    prefix = pg_prefix() if options.storage in BASES and attach is None else None
    if attach is None:
        config, path = write_topology(out, options.storage, prefix)
    else:
        config = attach.config
    plan = schedule(config, list(options.faults), options.seconds, options.seed)
    console.print(f"seed {options.seed}: {len(plan)} faults scheduled")
    for fault in plan:
        console.print(f"  at {fault.at_s:5.1f} s  {fault.kind:<12} {fault.target}")
    history = History(out / "history.jsonl")
    made_network: Any = None
    cluster: LocalCluster | AttachedCluster
    if attach is not None:
        cluster = AttachedCluster(config, attach.data_dir)
        console.print(f"attached to the cluster of {attach.config_path or 'the default topology'}")
    elif network is None and set(options.faults) & set(NETWORK_FAULTS):
        from unitrade.verify.network import PROXY, NetworkFaults, server_names

        mode = PROXY if options.storage in BASES else None
        made_network = NetworkFaults(server_names(config), mode=mode)
        network = made_network
        cluster, path = made_network.cluster(path.read_text(), out)
        config = cluster.config
        console.print(f"network faults by {made_network.mode}")
    else:
        cluster = LocalCluster(config, out / "data", path, launcher)
    nemesis: Nemesis | None = None
    try:
        if isinstance(cluster, LocalCluster):
            with console.status("starting the cluster..."):
                cluster.start()
        else:
            cluster.wait_healthy(timeout_s=10.0)
        nemesis = Nemesis(cluster, history, plan, network)
        ending = asyncio.run(_bounded(options, cluster, history, nemesis, console))
    finally:
        if nemesis is not None:
            nemesis.stop()
            nemesis.resume_all()
            nemesis.close()
        if isinstance(cluster, LocalCluster):
            with console.status("stopping the cluster..."):
                cluster.stop()
        else:
            cluster.release()  # what a run cut short still held down: not ours to keep down
        history.close()
        if made_network is not None:
            made_network.close()
        if prefix is not None:
            drop_databases(options.storage, prefix)
    results = check_all(history, ending)
    elle.write(out, history)
    document = reporting.build(options, plan, nemesis.applied, history, ending, results)
    # Which way the network faults were struck: iptables in namespaces, or our proxy.
    document["network_faults"] = None if made_network is None else made_network.mode
    reporting.write(out, document)
    reporting.show(console, document, results)
    return Outcome(results, document)


async def _bounded(
    options: Options,
    cluster: Processes,
    history: History,
    nemesis: Nemesis,
    console: Console,
) -> Ending:
    try:
        return await asyncio.wait_for(
            _run(options, cluster, history, nemesis, console),
            timeout=options.seconds + AFTER_WORKLOAD_S,
        )
    except TimeoutError:
        console.print(
            f"[red]the run did not end within {options.seconds + AFTER_WORKLOAD_S:.0f} s[/]"
        )
        return Ending(quiescent=False, lagging=["the run hit its hard time bound"])


async def _run(
    options: Options,
    cluster: Processes,
    history: History,
    nemesis: Nemesis,
    console: Console,
) -> Ending:
    config = cluster.config
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=2.0)
    async with httpx.AsyncClient(timeout=timeout, verify=config.http_verify) as http:
        # A run attached to a cluster orders products of its own and reads the changelogs
        # from where they stood when it began (what came before is not its history).
        skus = SKUS if options.attach is None else attached_skus()
        client = Client(config, history, http, skus)
        since = {} if options.attach is None else await asyncio.to_thread(owner_positions, config)
        await seed_stock(client)
        buyers = buyers_of_every_cell(config, options.seed)
        owners: dict[str, Buyer] = {}
        stop = asyncio.Event()
        pause_s = WORKERS / max(options.rate, 0.1)
        shares = [buyers[n::WORKERS] for n in range(WORKERS)]
        tasks = [
            asyncio.create_task(shopper(client, n, share, owners, pause_s, stop, options.seed))
            for n, share in enumerate(shares)
            if share
        ]
        tasks.append(asyncio.create_task(stock_poller(client, stop, options.seed + POLLER)))
        started = time.monotonic()
        faults = threading.Thread(target=nemesis.run, args=(started,), daemon=True)
        faults.start()
        try:
            while time.monotonic() - started < options.seconds:
                await asyncio.sleep(1.0)
                now = nemesis.applied[-1] if nemesis.applied else None
                done = sum(1 for e in history.events if e.type == "ok")
                console.print(
                    f"{time.monotonic() - started:5.1f} s  ok {done}  "
                    f"faults {len(nemesis.applied)}/{len(nemesis.plan)}"
                    + (
                        f"  now: {now.fault.kind} {now.fault.target}"
                        if now is not None and now.end_s is None
                        else ""
                    )
                )
        finally:
            stop.set()
            nemesis.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(faults.join, 120.0)
        console.print("workload stopped; waiting for quiescence")
        ending = Ending()
        ending.quiescent = await asyncio.to_thread(_quiesce, cluster, nemesis, ending)
        for applied in nemesis.applied:
            if applied.fault.kind == "failover" and "lease_ended_ms" in applied.detail:
                ending.lease_ended_ms[applied.fault.target] = applied.detail["lease_ended_ms"]
        console.print(f"reading back {len(owners)} orders from every region")
        await final_reads(client, owners)
        ending.rules = await _rules(http, config.control.base_url, client.admin)
    changelogs = await asyncio.to_thread(read_changelogs, config, since)
    ending.changelog, ending.changelog_unread = changelogs.rows, changelogs.unread
    ending.differences, ending.not_compared = await asyncio.to_thread(
        run_diff, config, list(config.cells), 1000, False, console
    )
    return ending


def _quiesce(cluster: Processes, nemesis: Nemesis, ending: Ending) -> bool:
    """Every process up, every region connected to the rule in force, the failed-over
    regions reconciled, every copy at its owner's position; within QUIESCENCE_S."""
    deadline = time.monotonic() + QUIESCENCE_S
    nemesis.resume_all()
    for name in [*cluster.control_names(), *cluster.config.region_names]:
        if not cluster.running(name):
            cluster.start_region(name)
    cluster.wait_healthy(timeout_s=QUIESCENCE_S)
    config = cluster.config
    admin = {"authorization": "Bearer " + issue_token(config.token_keys, admin=True)}
    with httpx.Client(timeout=10.0, verify=config.http_verify) as http:
        while not _connected(http, config.control.base_url, admin):
            if time.monotonic() > deadline:
                ending.lagging.append("regions not connected to the rule in force")
                return False
            time.sleep(0.2)
        for region in nemesis.failed_over:
            with cluster_regions(config) as regions:
                found, answering = regions.survey()
                items = Reconcile(regions, region, found, answering, dry_run=False).run()
            for item in items:
                if item.kind in ("order", "reservation"):
                    ending.reported.update(ORDER_ID.findall(item.name))
        while True:
            lagging = _lagging(http, [r.base_url for r in config.regions])
            if not lagging:
                return True
            if time.monotonic() > deadline:
                ending.lagging.extend(lagging)
                return False
            time.sleep(0.2)


def _connected(http: httpx.Client, control: str, admin: dict[str, str]) -> bool:
    try:
        body = http.get(control + "/v1/regions", headers=admin).json()
    except (httpx.HTTPError, ValueError):
        return False
    return all(r["connected"] and r["version"] == body["rule_version"] for r in body["regions"])


def _lagging(http: httpx.Client, urls: list[str]) -> list[str]:
    try:
        health = [http.get(f"{u}/healthz").json() for u in urls]
    except (httpx.HTTPError, ValueError) as exc:
        return [f"healthz: {type(exc).__name__}"]
    owners = health[0]["owners"]
    heads = {
        cell: next(h for h in health if h["region"] == owner)["positions"][cell]
        for cell, owner in owners.items()
    }
    return [
        f"{h['region']} cell {cell} at {h['positions'].get(cell)}, owner at {head}"
        for h in health
        for cell, head in heads.items()
        if h["positions"].get(cell) != head
    ]


async def _rules(http: httpx.AsyncClient, control: str, admin: dict[str, str]) -> list[RuleVersion]:
    body = (await http.get(control + "/v1/rules", params={"limit": 500}, headers=admin)).json()
    return [
        RuleVersion(
            r["version"],
            r["created_ms"],
            {int(c): o for c, o in r["rule"]["owners"].items()},
            frozenset(int(c) for c in r["rule"].get("banned", [])),
        )
        for r in body["rules"]
    ]
