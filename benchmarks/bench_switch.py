"""Switchover benchmark (run on demand, not in CI): what a planned switch costs the clients.

    .venv/bin/python -m benchmarks.bench_switch [--rate N] [--switches N] [--pause S]
        [--baseline S] [--json PATH]

In one run it starts a three-region unitrade cluster and its control plane (the default
topology, SQLite, on free ports), seeds a few products with stock that never runs out, and
keeps a steady open-loop load of order creations running for the whole run: request i is
due at t0 + i / `--rate` (at most `--in-flight` outstanding; a request that has to wait for
that bound is counted as sent late), sent to a gateway chosen at random among the three
(so some are forwarded), for a buyer of the moved cell (`--cell`, u3 by default: buyer_id
% 100 in 33..49) with probability `--moved-share`, else for a buyer of one of the other
unit cells. Every request records when it was due, when it was sent, its latency, its
status (and error code), and whether its buyer is in the moved cell.

1. **Warm-up** (`--warmup` s, not counted), then a **baseline** (`--baseline` s, no
   switch): the moved cell's write latency p50/p99 without a switch.
2. **Switches**: `--switches` times, the moved cell goes to the other region of the pair
   (`--to`, hz by default, and back to its first owner), through the control plane's API
   (`POST /v1/switch`, then `GET /v1/operations/{id}?wait_s=30`), with `--pause` s between
   them. For each: the operation's own figures (`total_ms`, `banned_ms`, the step
   timings), the client-observed wall time of the API calls, and the latency of the writes
   to the moved cell that were outstanding at some time in the switch's window, from the
   switch request to the answer that it has ended (so writes sent just before it and held
   by the ban count): p50/p99/max, and the added latency = those minus the baseline's
   p50/p99. Also reported: the moved cell's writes in the second after each switch and
   between the switches (by owner), to see whether a switch leaves slowness behind.
3. **Errors**: every answer that is not a 2xx, and every transport error or timeout,
   during the whole run (warm-up included), by status and error code, with the first body
   of each. The load closes keep-alive connections idle for more than 2 s instead of
   reusing them: uvicorn closes them after 5 s, and a request written as it does so reads
   nothing back (a client-side race that showed up as `IncompleteReadError` before).

Targets (issue 4 item 8): a switch takes <= 2 s (`total_ms` of every switch); the p99 added
write latency <= 1 s (every switch's window p99 minus the baseline p99); no client errors.

Everything listens on and targets 127.0.0.1 on free ports (never 8700-8703); every wait has
a timeout and the whole run a hard bound; every process the benchmark starts is stopped on
exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

from benchmarks.bench_orders import OTHER_CORES_MAX, STOCK
from benchmarks.harness import (
    REUSE_IDLE_MAX_S,
    BenchError,
    busy_before_run,
    free_ports,
    run_bounded,
    run_header,
    source_info,
    source_line,
    write_topology,
)
from benchmarks.load import (
    DRAIN_S,
    OPERATION_TIMEOUT_S,
    ControlClient,
    Plan,
    Sample,
    between,
    buyers_by_cell,
    cpu_between,
    cpu_snapshot,
    latency_figures,
    make_plan,
    minus,
    open_loop,
    r3,
    seed_products,
)
from unitrade.cluster import LocalCluster
from unitrade.topology.config import CellKind, TopologyConfig, load_config

SKUS = [f"switch-{i:02d}" for i in range(5)]
BUYERS_PER_SIDE = 300  # buyers of the moved cell, and of the other unit cells
AFTER_S = 1.0  # the moved cell's writes this long after each switch are reported too
LATE_S = 0.05  # a request sent this much after it was due waited for the in-flight bound
TARGET_SWITCH_MS = 2_000
TARGET_ADDED_P99_MS = 1_000
STEPS = ("ban_ms", "catch_up_ms", "publish_ms", "verify_ms")


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Marks:
    """perf_counter times of the phases."""

    load_start: float = 0.0
    baseline: tuple[float, float] = (0.0, 0.0)
    switching: tuple[float, float] = (0.0, 0.0)
    load_end: float = 0.0


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    switches: list[dict[str, Any]] = field(default_factory=list)
    marks: Marks = field(default_factory=Marks)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> name -> cores
    machine_busy: dict[str, float] = field(default_factory=dict)
    holds: dict[str, Any] = field(default_factory=dict)
    connections: dict[str, int] = field(default_factory=dict)  # the load's, opened/retired
    error_bodies: dict[str, str] = field(default_factory=dict)  # the first of each error


async def drive(
    args: argparse.Namespace, config: TopologyConfig, cluster: LocalCluster, plan: Plan
) -> Run:
    run = Run()
    control = ControlClient(config)
    stop = asyncio.Event()
    pids = {name: p.pid for name, p in cluster.processes.items()}
    clock = time.perf_counter
    try:
        await control.wait_connected()
        first_owner = await control.owner(args.cell)
        if first_owner == args.to:
            raise BenchError(f"{args.cell} is owned by {args.to} already; pick another --to")
        load = asyncio.create_task(
            open_loop(
                plan,
                args.rate,
                args.in_flight,
                stop,
                run.samples,
                run.connections,
                run.error_bodies,
            )
        )
        run.marks.load_start = clock()
        print(f"warm-up {args.warmup:.0f} s at {args.rate:g} orders/s", flush=True)
        await asyncio.sleep(args.warmup)
        print(f"baseline {args.baseline:.0f} s (no switch)", flush=True)
        snap = cpu_snapshot(pids)
        start = clock()
        await asyncio.sleep(args.baseline)
        run.marks.baseline = (start, clock())
        run.cpu["baseline"], run.machine_busy["baseline"] = cpu_between(snap, cpu_snapshot(pids))
        print(f"{args.switches} switches of {args.cell}, {args.pause:g} s apart", flush=True)
        snap = cpu_snapshot(pids)
        start = clock()
        owner = first_owner
        for n in range(args.switches):
            if load.done():
                raise BenchError("the load generator stopped early") from load.exception()
            target = args.to if owner == first_owner else first_owner
            op = await control.switch(args.cell, target)
            op["_n"] = n + 1
            op["_from"] = owner
            op["_to"] = target
            run.switches.append(op)
            detail = op.get("detail", {})
            wall_ms = (op["_client"]["ended"] - op["_client"]["started"]) * 1000
            print(
                f"  switch {n + 1}: {owner} -> {target} {op['state']}: total "
                f"{detail.get('total_ms')} ms, banned {detail.get('banned_ms')} ms, "
                + ", ".join(f"{s} {detail.get(s)}" for s in STEPS)
                + f"; client wall {wall_ms:.0f} ms"
                + (f"; error {op.get('error')}" if op.get("error") else ""),
                flush=True,
            )
            if op["state"] == "done":
                owner = target
            else:
                owner = await control.owner(args.cell)
            await asyncio.sleep(args.pause)
        run.marks.switching = (start, clock())
        run.cpu["switching"], run.machine_busy["switching"] = cpu_between(snap, cpu_snapshot(pids))
        run.marks.load_end = clock()
        stop.set()
        await asyncio.wait_for(load, DRAIN_S + 5)
        run.holds = await gateway_holds(config)
    finally:
        stop.set()
        await control.close()
    return run


async def gateway_holds(config: TopologyConfig) -> dict[str, Any]:
    """Each gateway's hold counters (held, refused after the hold bound, retried)."""
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=10.0) as client:
        for region in config.region_names:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                body = (await client.get(config.region(region).base_url + "/healthz")).json()
                out[region] = {"held": body.get("held"), "forwarded": body.get("forwarded")}
    return out


# -- figures ---------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, source: dict[str, Any], config: TopologyConfig, run: Run
) -> dict[str, Any]:
    samples = run.samples
    marks = run.marks
    baseline_all = between(samples, *marks.baseline)
    base_moved = latency_figures([s for s in baseline_all if s.moved])
    base_other = latency_figures([s for s in baseline_all if not s.moved])
    # A switch's window: from the switch request to the answer that it has ended. The
    # requests of a window are those outstanding at some time in it (sent before it and
    # held by the ban included).
    windows = [(op["_client"]["started"], op["_client"]["ended"]) for op in run.switches]

    def in_any_window(s: Sample) -> bool:
        return any(s.overlaps(a, b) for a, b in windows)

    switches: list[dict[str, Any]] = []
    in_windows: set[int] = set()
    for i, op in enumerate(run.switches):
        c = op["_client"]
        window = [s for s in samples if s.overlaps(c["started"], c["ended"])]
        in_windows |= {id(s) for s in window if s.moved}
        following = windows[i + 1][0] if i + 1 < len(windows) else marks.switching[1]
        pause = [s for s in between(samples, c["ended"], following) if not in_any_window(s)]
        moved = latency_figures([s for s in window if s.moved])
        other = latency_figures([s for s in window if not s.moved])
        detail = op.get("detail", {})
        switches.append(
            {
                "n": op["_n"],
                "from": op["_from"],
                "to": op["_to"],
                "state": op["state"],
                "error": op.get("error", ""),
                "total_ms": detail.get("total_ms"),
                "banned_ms": detail.get("banned_ms"),
                **{step: detail.get(step) for step in STEPS},
                "final_positions": detail.get("final_positions"),
                "streams_not_following": detail.get("streams_not_following"),
                "client_wall_ms": round((c["ended"] - c["started"]) * 1000, 1),
                "client_accept_ms": round((c["accepted"] - c["started"]) * 1000, 1),
                "moved_writes": moved,
                "moved_added_p50_ms": minus(moved["p50_ms"], base_moved["p50_ms"]),
                "moved_added_p99_ms": minus(moved["p99_ms"], base_moved["p99_ms"]),
                "other_writes": other,
                "moved_writes_until_next_switch": latency_figures([s for s in pause if s.moved]),
                "log": op.get("log", []),
            }
        )
    pooled = latency_figures([s for s in samples if id(s) in in_windows])
    # The second after each switch ended: does the latency come back at once?
    after: list[Sample] = []
    for _, end in windows:
        after += [s for s in between(samples, end, end + AFTER_S) if s.moved]
    # The moved cell's writes between the switches (outside every window), by owner.
    owners_after = [
        (end, sw["to"] if sw["state"] == "done" else sw["from"])
        for (_, end), sw in zip(windows, switches, strict=True)
    ]
    between_switches: dict[str, list[Sample]] = {}
    for s in between(samples, *marks.switching):
        if not s.moved or in_any_window(s):
            continue
        owner = next((o for t, o in reversed(owners_after) if t <= s.sent), None)
        if owner is not None:
            between_switches.setdefault(owner, []).append(s)
    errors: Counter[str] = Counter()
    errors_by_phase: dict[str, Counter[str]] = {}
    for s in samples:
        if 200 <= s.status < 300:
            continue
        key = f"{s.status} {s.code}" if s.status else s.code
        errors[key] += 1
        if in_any_window(s):
            phase = "outstanding during a switch"
        elif marks.baseline[0] <= s.sent < marks.baseline[1]:
            phase = "baseline"
        elif s.sent < marks.baseline[0]:
            phase = "warm-up"
        else:
            phase = "between switches"
        errors_by_phase.setdefault(phase, Counter())[key + (" moved" if s.moved else " other")] += 1
    unanswered = [s for s in samples if s.status == 0]
    transport = {
        "on_new_connections": sum(1 for s in unanswered if math.isnan(s.idle_s)),
        "on_reused_connections_idle_s": sorted(
            round(s.idle_s, 2) for s in unanswered if not math.isnan(s.idle_s)
        ),
    }
    late = [s.sent - s.due for s in samples]
    load_s = max(marks.load_end - marks.load_start, 1e-9)
    done = [s for s in switches if s["state"] == "done"]
    totals = [s["total_ms"] for s in switches if s["total_ms"] is not None]
    added_p99 = [s["moved_added_p99_ms"] for s in switches if s["moved_added_p99_ms"] is not None]
    every_done = len(done) == len(switches) == args.switches
    results: dict[str, Any] = {
        **run_header("bench_switch", args.label, source),
        "settings": {
            "rate": args.rate,
            "in_flight": args.in_flight,
            "moved_share": args.moved_share,
            "cell": args.cell,
            "to": args.to,
            "switches": args.switches,
            "pause_s": args.pause,
            "warmup_s": args.warmup,
            "baseline_s": args.baseline,
            "hold_ms": config.control.hold_ms,
            "storage": "sqlite",
        },
        "load": {
            "requests": len(samples),
            "sent_per_s": round(len(samples) / load_s, 1),
            "sent_late": sum(1 for d in late if d > LATE_S),
            "max_send_delay_ms": r3(max(late) * 1000) if late else None,
            "connections": run.connections,
            "cpu_cores": run.cpu,
            "machine_busy": run.machine_busy,
        },
        "baseline": {"moved_writes": base_moved, "other_writes": base_other},
        "switches": switches,
        "moved_writes_in_all_windows": {
            **pooled,
            "added_p50_ms": minus(pooled["p50_ms"], base_moved["p50_ms"]),
            "added_p99_ms": minus(pooled["p99_ms"], base_moved["p99_ms"]),
        },
        "moved_writes_in_the_second_after_each_switch": latency_figures(after),
        "moved_writes_between_switches_by_owner": {
            o: latency_figures(v) for o, v in sorted(between_switches.items())
        },
        "errors": dict(errors),
        "errors_by_phase": {k: dict(v) for k, v in errors_by_phase.items()},
        "error_examples": run.error_bodies,
        # Errors without an answer: how many on new connections, and for the others how
        # long their keep-alive connection had been idle.
        "unanswered": transport,
        "gateway_holds": run.holds,
        "targets": {
            "switches_done": f"{len(done)}/{args.switches}",
            "max_total_ms": max(totals) if totals else None,
            "switch_met": every_done and bool(totals) and max(totals) <= TARGET_SWITCH_MS,
            "max_added_p99_ms": max(added_p99) if added_p99 else None,
            "added_p99_met": every_done
            and bool(added_p99)
            and len(added_p99) == len(switches)
            and max(added_p99) <= TARGET_ADDED_P99_MS,
            "client_errors": sum(errors.values()),
            "errors_met": not errors,
        },
    }
    print_tables(results)
    return results


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_tables(results: dict[str, Any]) -> None:
    settings, load = results["settings"], results["load"]
    print(source_line(results))
    print(
        f"\nload: {settings['rate']:g} orders/s open loop (sent {load['sent_per_s']:g}/s, "
        f"{load['sent_late']} sent late, max send delay {fmt(load['max_send_delay_ms'], 1)} ms), "
        f"{settings['moved_share']:.0%} for buyers of {settings['cell']}, gateways at random; "
        f"hold_ms {settings['hold_ms']}; keep-alive connections opened "
        f"{load['connections'].get('opened')}, closed after {REUSE_IDLE_MAX_S:g} s idle "
        f"{load['connections'].get('retired_idle')}"
    )
    for phase, cores in load["cpu_cores"].items():
        print(
            f"  CPU in {phase} (cores): "
            + ", ".join(f"{n} {c:.2f}" for n, c in cores.items())
            + f"; machine {load['machine_busy'][phase]:.0%} busy"
        )
    b = results["baseline"]
    print(
        f"\nbaseline ({settings['baseline_s']:g} s, no switch): moved-cell writes p50 "
        f"{fmt(b['moved_writes']['p50_ms'], 1)} ms, p99 {fmt(b['moved_writes']['p99_ms'], 1)} ms "
        f"({b['moved_writes']['ok']} ok); other writes p50 {fmt(b['other_writes']['p50_ms'], 1)} "
        f"ms, p99 {fmt(b['other_writes']['p99_ms'], 1)} ms"
    )
    print(
        "\n| # | move | state | total ms | banned ms | ban / catch-up / publish / verify ms "
        "| client wall ms | moved writes in window | p50 ms | p99 ms | max ms "
        "| added p50 ms | added p99 ms | other writes p99 ms | moved p99 ms until next |"
    )
    print("|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in results["switches"]:
        m = s["moved_writes"]
        steps = " / ".join(fmt(s[step]) for step in STEPS)
        print(
            f"| {s['n']} | {s['from']} -> {s['to']} | {s['state']} | {fmt(s['total_ms'])} | "
            f"{fmt(s['banned_ms'])} | {steps} | {fmt(s['client_wall_ms'])} | {m['ok']} | "
            f"{fmt(m['p50_ms'], 1)} | {fmt(m['p99_ms'], 1)} | {fmt(m['max_ms'], 1)} | "
            f"{fmt(s['moved_added_p50_ms'], 1)} | {fmt(s['moved_added_p99_ms'], 1)} | "
            f"{fmt(s['other_writes']['p99_ms'], 1)} | "
            f"{fmt(s['moved_writes_until_next_switch']['p99_ms'], 1)} |"
        )
    p = results["moved_writes_in_all_windows"]
    print(
        f"\nmoved-cell writes in all switch windows together: {p['ok']} ok, p50 "
        f"{fmt(p['p50_ms'], 1)} ms, p99 {fmt(p['p99_ms'], 1)} ms, max {fmt(p['max_ms'], 1)} ms; "
        f"added p50 {fmt(p['added_p50_ms'], 1)} ms, added p99 {fmt(p['added_p99_ms'], 1)} ms"
    )
    a = results["moved_writes_in_the_second_after_each_switch"]
    print(
        f"moved-cell writes in the {AFTER_S:g} s after each switch: {a['ok']} ok, p50 "
        f"{fmt(a['p50_ms'], 1)} ms, p99 {fmt(a['p99_ms'], 1)} ms, max {fmt(a['max_ms'], 1)} ms"
    )
    for owner, f in results["moved_writes_between_switches_by_owner"].items():
        print(
            f"moved-cell writes between switches, owner {owner}: {f['ok']} ok, p50 "
            f"{fmt(f['p50_ms'], 1)} ms, p99 {fmt(f['p99_ms'], 1)} ms"
        )
    busy = {p: c["other"] for p, c in load["cpu_cores"].items() if c["other"] > OTHER_CORES_MAX}
    if busy:
        print(
            f"WARNING: other load (not the cluster, not the client) of {busy} cores: the "
            "figures are distorted; rerun on a quiet machine"
        )
    print(f"\nclient errors: {results['errors'] or 'none'}")
    if results["errors_by_phase"]:
        print(f"  by phase: {results['errors_by_phase']}")
        for key, body in results["error_examples"].items():
            print(f"  e.g. {key}: {body}")
    unanswered = results["unanswered"]
    if unanswered["on_new_connections"] or unanswered["on_reused_connections_idle_s"]:
        print(
            f"  without an answer: {unanswered['on_new_connections']} on new connections; on "
            "reused keep-alive connections after these idle times (s): "
            f"{unanswered['on_reused_connections_idle_s']}"
        )
    print(f"gateway holds: {results['gateway_holds']}")
    t = results["targets"]
    print("\n| target | measured | met |")
    print("|---|---:|---|")
    print(
        f"| a switch takes <= {TARGET_SWITCH_MS} ms | slowest {fmt(t['max_total_ms'])} ms "
        f"({t['switches_done']} done) | {'yes' if t['switch_met'] else 'NO'} |"
    )
    print(
        f"| p99 added write latency <= {TARGET_ADDED_P99_MS} ms | worst switch "
        f"{fmt(t['max_added_p99_ms'], 1)} ms | {'yes' if t['added_p99_met'] else 'NO'} |"
    )
    print(f"| no client errors | {t['client_errors']} | {'yes' if t['errors_met'] else 'NO'} |")


def run(args: argparse.Namespace) -> dict[str, Any]:
    source = source_info()  # before the run: src/ may change while it runs
    busy_before = busy_before_run()
    data_dir = Path(tempfile.mkdtemp(prefix="unitrade-bench-switch-"))
    ports = free_ports(4)  # the regions', then the control plane's
    config_path = data_dir / "topology.toml"
    config = write_topology(config_path, ports)
    if args.hold_ms is not None:
        text = config_path.read_text(encoding="utf-8")
        config_path.write_text(
            text.replace("[control]\n", f"[control]\nhold_ms = {args.hold_ms}\n", 1),
            encoding="utf-8",
        )
        config = load_config(config_path)
        assert config.control.hold_ms == args.hold_ms
    try:
        moved_cell = config.find_cell(args.cell)
    except KeyError:
        raise BenchError(f"unknown cell {args.cell!r}") from None
    if moved_cell.kind is not CellKind.UNIT:
        raise BenchError(f"{args.cell} is not a unit cell")
    if args.to not in config.region_names:
        raise BenchError(f"unknown region {args.to!r}")
    cluster = LocalCluster(config, data_dir / "unitrade", config_path)
    try:
        print(f"data in {data_dir}; regions on ports {ports[:3]}, control on {ports[3]}")
        cluster.start()
        uvloop.run(seed_products(config, SKUS, STOCK))
        buyers = buyers_by_cell(config, moved_cell.id, BUYERS_PER_SIDE)
        plan = make_plan(config, buyers, args.moved_share, seed=1, skus=SKUS)
        result = uvloop.run(drive(args, config, cluster, plan))
        results = report(args, source, config, result)
        results["machine"]["busy_before_run"] = round(busy_before, 3)
        return results
    finally:
        print("stopping processes...", flush=True)
        cluster.stop()
        if args.keep_data:
            print(f"data kept in {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_switch",
        description="Planned switchover under steady load: time per switch, latency the "
        "moved cell's writes gain, client errors.",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="orders/s, all gateways")
    parser.add_argument("--in-flight", type=int, default=256, help="bound on outstanding requests")
    parser.add_argument(
        "--moved-share",
        type=float,
        default=0.5,
        help="share of the orders for buyers of the moved cell",
    )
    parser.add_argument("--cell", default="u3", help="the unit cell to move")
    parser.add_argument("--to", default="hz", help="the region it moves to (and back from)")
    parser.add_argument("--switches", type=int, default=10, help="switches, alternating")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between switches")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds, not counted")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds without a switch")
    parser.add_argument(
        "--hold-ms",
        type=int,
        default=None,
        help="[control] hold_ms for the cluster (default: the topology's default, 2000); a "
        "hold shorter than the bans shows what clients get past it",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep-data", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--label", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    if not 1 <= args.rate <= 5_000 or not 1 <= args.in_flight <= 4_096:
        parser.error("need 1 <= --rate <= 5000 and 1 <= --in-flight <= 4096")
    if not 0 < args.moved_share < 1:
        parser.error("need 0 < --moved-share < 1")
    if not 1 <= args.switches <= 1_000 or args.pause < 0 or args.warmup < 0:
        parser.error("need 1 <= --switches <= 1000, --pause >= 0, --warmup >= 0")
    if not 1 <= args.baseline <= 3_600:
        parser.error("need 1 <= --baseline <= 3600")
    if args.hold_ms is not None and not 0 <= args.hold_ms <= 30_000:
        parser.error("need 0 <= --hold-ms <= 30000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = 180 + args.warmup + args.baseline + DRAIN_S
    budget += args.switches * (args.pause + OPERATION_TIMEOUT_S + 5)
    return run_bounded(run, args, budget)


if __name__ == "__main__":
    sys.exit(main())
