"""Failover benchmark (run on demand, not in CI): how long a lost region's buyers cannot write
(RTO) with automatic failover, and whether the loss report is exact.

    .venv/bin/python -m benchmarks.bench_failover [--faults kill,stop] [--region sh]
        [--rate N] [--warmup S] [--after S] [--json PATH]

For each fault in `--faults`, on a cluster of its own (the default topology on SQLite, free
ports, `[control] auto_failover = true`, the health checker at its defaults), with a steady
open-loop load of order creations sent only to the surviving regions' gateways (half for
buyers of the lost region's cells, half for the others):

- **kill**: the region is killed (kill -9) and not restarted during the measurement;
- **stop**: the region is frozen (SIGSTOP) and kept frozen;
- **control**: the control plane (the embedded lease authority) is killed and kept down:
  how long every region keeps writing before its lease ends (no failover is involved).

Measured: the replication lag of the lost region's cells at the moment of the fault (what
the survivors had not applied yet, in positions and ms); **detection** (from the fault to
the failover the health checker starts) and **promotion** (the failover itself, step by
step); the **RTO**: from the fault to the first successful write of a lost region's buyer
sent after it, and to the last failed one; client errors of the other buyers (the target
is none); the loss report (changes known to be missing). Then the region comes back
(restarted, or SIGCONT) and its quarantine gives the exact number of changes it had that
the new owners did not: the report is exact when every one of them is at or below the
position the report says the region was known to have reached, or accounted for.

Targets (issue 10 item 6): RTO <= 5 s at the default settings; no client of another region
sees an error; the loss report exact.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop

from benchmarks.harness import (
    BenchError,
    busy_before_run,
    free_ports,
    run_bounded,
    run_header,
    source_info,
    write_topology,
)
from benchmarks.load import (
    DRAIN_S,
    ControlClient,
    Sample,
    buyers_by_cell,
    latency_figures,
    make_plan,
    open_loop,
    seed_products,
)
from unitrade.cluster import LocalCluster
from unitrade.topology.config import CONTROL_NAME, TopologyConfig
from unitrade.topology.rule import initial_rule, route_buyer

SKUS = [f"failover-{i:02d}" for i in range(5)]
STOCK = 10**9
BUYERS_PER_SIDE = 300
FAILOVER_TIMEOUT_S = 60.0
RETURN_TIMEOUT_S = 90.0
TARGET_RTO_S = 5.0


def buyers_of_region(config: TopologyConfig, lost: str, per_side: int) -> dict[str, list[int]]:
    """`per_side` buyers homed in the lost region ("moved": every one of its cells) and as
    many homed elsewhere ("other")."""
    rule = initial_rule(config)
    found: dict[str, list[int]] = {"moved": [], "other": []}
    buyer = 3_000_001
    while min(len(found["moved"]), len(found["other"])) < per_side:
        side = "moved" if route_buyer(rule, buyer).region == lost else "other"
        if len(found[side]) < per_side:
            found[side].append(buyer)
        buyer += 1
    return found


async def stream_lag(config: TopologyConfig, lost: str) -> dict[str, dict[str, int]]:
    """Each survivor's replication lag, for the lost region's cells, now."""
    out: dict[str, dict[str, int]] = {}
    async with httpx.AsyncClient(timeout=2.0) as client:
        for region in config.region_names:
            if region == lost:
                continue
            body = (await client.get(config.region(region).base_url + "/healthz")).json()
            for stream in body["replication"]:
                if stream["source"] == lost:
                    out[f"{region}<-{stream['cell_name']}"] = {
                        "positions": int(stream["lag_positions"]),
                        "ms": int(stream["lag_ms"]),
                    }
    return out


async def wait_failover(control: ControlClient, after_ms: int) -> dict[str, Any]:
    """The failover the health checker started after `after_ms` (wall clock), once ended."""
    deadline = time.monotonic() + FAILOVER_TIMEOUT_S
    while time.monotonic() < deadline:
        listed = (await control.http.get("/v1/operations", params={"limit": 5})).json()
        for op in listed["operations"]:
            if op["kind"] == "failover" and op["created_ms"] >= after_ms:
                got = await control.http.get(f"/v1/operations/{op['id']}", params={"wait_s": 30})
                ended: dict[str, Any] = got.json()
                if ended["state"] != "running":
                    return ended
        await asyncio.sleep(0.05)
    raise BenchError(f"no failover ended within {FAILOVER_TIMEOUT_S:.0f} s of the fault")


async def returned(config: TopologyConfig, region: str) -> tuple[int, bool]:
    """The rows the returned region moved to its quarantine (its /healthz summary), and
    whether every copy it follows has caught up."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        body = (await client.get(config.region(region).base_url + "/healthz")).json()
    rows = sum(sum(states.values()) for states in body.get("quarantine", {}).values())
    caught_up = all(s.get("lag_positions", 1) == 0 for s in body["replication"])
    return rows, caught_up


async def control_down(
    args: argparse.Namespace, config: TopologyConfig, cluster: LocalCluster
) -> dict[str, Any]:
    """The control plane killed and kept down: from the kill to each region's first
    `no_write_lease` refusal, under the same load."""
    await seed_products(config, SKUS, STOCK)
    buyers = buyers_by_cell(config, 1, BUYERS_PER_SIDE)
    plan = make_plan(config, buyers, 0.5, seed=7, skus=SKUS)
    samples: list[Sample] = []
    error_bodies: dict[str, str] = {}
    stop = asyncio.Event()
    control = ControlClient(config)
    try:
        await control.wait_connected()
        load = asyncio.create_task(
            open_loop(plan, args.rate, args.in_flight, stop, samples, {}, error_bodies)
        )
        await asyncio.sleep(args.warmup)
        killed = time.perf_counter()
        cluster.stop_region(CONTROL_NAME, kill=True, keep_down=True)
        print("  control plane killed", flush=True)
        await asyncio.sleep(config.control.lease_ms / 1000 + args.after)
        stop.set()
        await asyncio.wait_for(load, DRAIN_S + 5)
    finally:
        stop.set()
        await control.close()
    after = [s for s in samples if s.sent >= killed]
    refused = [s for s in after if s.code == "no_write_lease"]
    last_ok = max((s.sent + s.latency_s for s in after if 200 <= s.status < 300), default=killed)
    return {
        "fault": "control",
        "writes_ok_after_kill": sum(1 for s in after if 200 <= s.status < 300),
        "last_ok_after_kill_s": round(last_ok - killed, 3),
        "first_no_write_lease_s": (
            round(min(s.sent + s.latency_s for s in refused) - killed, 3) if refused else None
        ),
        "lease_ms": config.control.lease_ms,
        "lease_renew_ms": config.control.lease_renew_ms,
        "errors": {k: v[:200] for k, v in error_bodies.items()},
    }


async def one_fault(
    args: argparse.Namespace, fault: str, config: TopologyConfig, cluster: LocalCluster
) -> dict[str, Any]:
    if fault == "control":
        return await control_down(args, config, cluster)
    lost = args.region
    await seed_products(config, SKUS, STOCK)
    buyers = buyers_of_region(config, lost, BUYERS_PER_SIDE)
    survivors = [r for r in config.region_names if r != lost]
    plan = make_plan(config, buyers, 0.5, seed=7, skus=SKUS, regions=survivors)
    samples: list[Sample] = []
    connections: dict[str, int] = {}
    error_bodies: dict[str, str] = {}
    stop = asyncio.Event()
    control = ControlClient(config)
    clock = time.perf_counter
    try:
        await control.wait_connected()
        load = asyncio.create_task(
            open_loop(plan, args.rate, args.in_flight, stop, samples, connections, error_bodies)
        )
        await asyncio.sleep(args.warmup)
        lag = await stream_lag(config, lost)
        process = cluster.processes[lost]
        fault_at = clock()
        fault_ms = int(time.time() * 1000)
        if fault == "kill":
            process.kill()
        else:
            os.kill(process.pid, signal.SIGSTOP)
        print(f"  {fault} of {lost} at {fault_ms}; lag then {lag}", flush=True)
        op = await wait_failover(control, fault_ms - 1000)
        print(
            f"  failover {op['id']} {op['state']} in {op['detail'].get('total_ms')} ms", flush=True
        )
        await asyncio.sleep(args.after)
        stop.set()
        await asyncio.wait_for(load, DRAIN_S + 5)
    finally:
        stop.set()
        await control.close()
    moved_after = [s for s in samples if s.moved and s.sent >= fault_at]
    ok = [s for s in moved_after if 200 <= s.status < 300]
    failed = [s for s in moved_after if not 200 <= s.status < 300]
    first_ok_s = min((s.sent + s.latency_s for s in ok), default=float("nan")) - fault_at
    # The RTO: from the fault to the moment from which every write of a lost region's buyer
    # succeeded (the send of the last one that failed). Writes already at a frozen region
    # end later, with their timeout and 504 outcome_unknown: counted apart.
    last_failed_sent_s = max((s.sent for s in failed), default=fault_at) - fault_at
    last_failed_s = max((s.sent + s.latency_s for s in failed), default=fault_at) - fault_at
    unknown = sum(1 for s in failed if s.code == "outcome_unknown" or s.status == 0)
    others_failed = [s for s in samples if not s.moved and not 200 <= s.status < 300]
    detail = op["detail"]
    report = detail.get("loss_report", {})
    # The region comes back; its quarantine is the exact count.
    if fault == "kill":
        cluster.start_region(lost)
        cluster.wait_healthy([lost], timeout_s=RETURN_TIMEOUT_S)
    else:
        os.kill(cluster.processes[lost].pid, signal.SIGCONT)
    deadline = time.monotonic() + RETURN_TIMEOUT_S
    exact = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        with contextlib.suppress(httpx.HTTPError):
            exact, caught_up = await returned(config, lost)
            if caught_up:
                break
    return {
        "fault": fault,
        "lag_at_fault": lag,
        "detection_ms": op["created_ms"] - fault_ms,
        "failover_total_ms": detail.get("total_ms"),
        "steps_ms": {
            s: detail.get(f"{s}_ms") for s in ("precheck", "expire", "ban", "promote", "publish")
        },
        "rto_s": round(last_failed_sent_s, 3),
        "first_ok_s": round(first_ok_s, 3),
        "last_failure_answered_s": round(last_failed_s, 3),
        "lost_buyers_unknown_outcome": unknown,
        "lost_buyers_after_fault": latency_figures(moved_after),
        "other_buyers_errors": len(others_failed),
        "errors": {k: v[:200] for k, v in error_bodies.items()},
        "loss_report": {
            "missing_at_least": report.get("missing_at_least"),
            "cells": [
                {k: c[k] for k in ("cell", "to", "promoted_position", "known_position")}
                for c in report.get("cells", [])
            ],
        },
        "quarantined_rows_after_return": exact,
        "state": op["state"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()
    busy_before = busy_before_run()
    results: dict[str, Any] = {
        "header": run_header("bench_failover", args.label, source, busy_before),
        "runs": [],
    }
    for fault in args.faults:
        data_dir = Path(tempfile.mkdtemp(prefix=f"unitrade-bench-failover-{fault}-"))
        ports = free_ports(4)
        config_path = data_dir / "topology.toml"
        control = {"auto_failover": True, "failover_interval_s": 0}
        config = write_topology(config_path, ports, control=control)
        cluster = LocalCluster(config, data_dir / "unitrade", config_path)
        try:
            print(f"{fault}: cluster on ports {ports}", flush=True)
            cluster.start()
            figures = uvloop.run(one_fault(args, fault, config, cluster))
            results["runs"].append(figures)
            print_figures(figures)
        finally:
            with_stopped = cluster.processes.get(args.region) if fault == "stop" else None
            if with_stopped is not None and with_stopped.poll() is None:
                os.kill(with_stopped.pid, signal.SIGCONT)
            cluster.stop()
            shutil.rmtree(data_dir, ignore_errors=True)
    return results


def print_figures(f: dict[str, Any]) -> None:
    if f["fault"] == "control":
        print(
            f"\ncontrol plane killed: writes went on for {f['last_ok_after_kill_s']} s "
            f"({f['writes_ok_after_kill']} acknowledged), the first no_write_lease came "
            f"{f['first_no_write_lease_s']} s after the kill (lease {f['lease_ms']} ms, "
            f"renewed every {f['lease_renew_ms']} ms)",
            flush=True,
        )
        return
    print(f"\n{f['fault']}: failover {f['state']}")
    print(f"  lag at the fault: {f['lag_at_fault']}")
    print(
        f"  detection {f['detection_ms']} ms, failover {f['failover_total_ms']} ms: {f['steps_ms']}"
    )
    print(
        f"  RTO: every write of a lost buyer sent {f['rto_s']} s or more after the fault "
        f"succeeded (first success {f['first_ok_s']} s after it; the last failed answer came "
        f"{f['last_failure_answered_s']} s after it, {f['lost_buyers_unknown_outcome']} "
        "of the failures outcome_unknown or timed out)"
    )
    print(f"  lost buyers' writes after the fault: {f['lost_buyers_after_fault']}")
    print(f"  other buyers' errors: {f['other_buyers_errors']}")
    print(
        f"  loss report: at least {f['loss_report']['missing_at_least']} changes missing "
        f"(per cell {f['loss_report']['cells']}); exactly "
        f"{f['quarantined_rows_after_return']} in the quarantine once the region returned"
    )
    rto = f["rto_s"]
    print(
        f"  targets: RTO <= {TARGET_RTO_S:g} s: {'yes' if rto <= TARGET_RTO_S else 'NO'} "
        f"({rto:.2f} s); no other buyer's error: "
        f"{'yes' if f['other_buyers_errors'] == 0 else 'NO'}",
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_failover",
        description="A region lost under load: RTO with automatic failover, detection and "
        "promotion apart, the loss report against the replication lag.",
    )
    parser.add_argument(
        "--faults", default="kill,stop,control", help="kill, stop, control; comma-separated"
    )
    parser.add_argument("--region", default="sh", help="the region lost (not the center)")
    parser.add_argument("--rate", type=float, default=200.0, help="orders/s, surviving gateways")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of load before the fault"
    )
    parser.add_argument(
        "--after", type=float, default=5.0, help="seconds of load after the failover"
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=2048,
        help="bound on outstanding requests: writes sent to a frozen region wait for their "
        "timeout, and a low bound would hold back the writes sent after the failover",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    if not args.faults or set(args.faults) - {"kill", "stop", "control"}:
        parser.error("--faults takes kill, stop and/or control")
    if not 1 <= args.in_flight <= 4_096:
        parser.error("need 1 <= --in-flight <= 4096")
    if not 1 <= args.rate <= 2_000 or args.warmup < 1 or args.after < 1:
        parser.error("need 1 <= --rate <= 2000, --warmup >= 1, --after >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = len(args.faults) * (
        120 + args.warmup + args.after + FAILOVER_TIMEOUT_S + RETURN_TIMEOUT_S
    )
    return run_bounded(run, args, budget)


if __name__ == "__main__":
    sys.exit(main())
