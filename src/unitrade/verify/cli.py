"""`unitrade verify`: the command."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from unitrade.cli_options import DATA_ENVVAR, config_option, load
from unitrade.verify.attached import AttachError, attach_problems
from unitrade.verify.faults import ALL_FAULTS, FaultError, parse_faults
from unitrade.verify.run import Attach, Options, OutError, check_out, verify

DEFAULT_FAULTS = "kill,pause,switch,failover,control-kill"


@click.command("verify")
@click.option(
    "--seconds",
    type=click.FloatRange(5, 3600),
    default=30.0,
    show_default=True,
    help="How long the workload runs under faults (quiescence and checks follow).",
)
@click.option(
    "--rate",
    type=click.FloatRange(1, 2000),
    default=20.0,
    show_default=True,
    help="Operations per second over all workers (an upper bound).",
)
@click.option(
    "--faults",
    default=DEFAULT_FAULTS,
    show_default=True,
    help=f"Comma-separated faults, of: {', '.join(ALL_FAULTS)}; empty for none. "
    "partition and slow put every region behind a network of the run's own (namespaces "
    "with iptables where it runs as root, else a TCP proxy; the report says which).",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="The seed of the fault schedule and the workload; printed, so that a run "
    "can be repeated. Random when omitted.",
)
@click.option(
    "--storage",
    type=click.Choice(["sqlite", "postgres", "mariadb"]),
    default="sqlite",
    show_default=True,
    help="Cell copies and control store on SQLite, on PostgreSQL at 127.0.0.1:5432 "
    "(user postgres), or on MySQL/MariaDB at 127.0.0.1:3306 (user root, no password): "
    "databases of the run's own, dropped after.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("verify-out"),
    show_default=True,
    help="Directory for history.jsonl, report.json, the "
    "topology and the data and logs of the cluster (emptied first: only a new or empty "
    "directory, or a previous run's).",
)
@click.option(
    "--attach",
    is_flag=True,
    help="Verify the running cluster of --config instead of one of the run's own. It "
    "adds products of its own (VF-*-tag) and orders by buyers from 2^61 up; with --data "
    "(the `unitrade up` supervising it) it also kills, pauses and fails over its regions: "
    "for a staging cluster, never a shop's live one.",
)
@config_option
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar=DATA_ENVVAR,
    show_envvar=True,
    help="With --attach: the data directory of the `unitrade up` that supervises the "
    "cluster (kill, pause, failover and control-kill go through it).",
)
def verify_command(
    seconds: float,
    rate: float,
    faults: str,
    seed: int | None,
    storage: str,
    out: Path,
    attach: bool,
    config_path: Path | None,
    data_dir: Path | None,
) -> None:
    """Run a cluster of its own under randomized faults while it takes traffic, record
    every operation, and check the invariants on the history.

    \b
    It starts a local cluster (free ports, its own data dir in --out, its own secret),
    runs the orders, payments, isolation and stock workloads through every gateway,
    applies the fault schedule the seed gives (the same seed, the same schedule), stops
    the faults, waits until every region is up and caught up, reads everything back and
    checks: orders, payments, stock, isolation, ownership, convergence. It then stops
    every process it started. Exit 0 only when no invariant is violated.

    \b
    Faults: kill (kill -9 of a region, restarted after a hold), pause (SIGSTOP, SIGCONT),
    switch (a planned switchover of a cell, or an evacuation), failover (kill -9, wait
    until the health checker marks it down, failover, restart, reconcile), control-kill,
    partition (a region cut off from the others, one way or both), slow (20-200 ms added
    to a region's links).

    \b
    With --attach it runs the workloads and the faults against a running cluster (the
    topology of --config; the processes of the `unitrade up` on --data) and leaves it
    running; partition and slow need a network of the run's own and are refused.

    \b
      unitrade verify --seconds 60 --faults kill,pause,switch --seed 7 --out /tmp/v
      unitrade verify --attach --config prod-like.toml --data /srv/ut --faults switch,kill
    """
    console = Console()
    try:
        fault_list = parse_faults(faults)
    except FaultError as exc:
        raise click.UsageError(str(exc)) from exc
    target: Attach | None = None
    if attach:
        config = load(config_path)
        where = data_dir.resolve() if data_dir is not None else None
        problem = attach_problems(config, where, fault_list)
        if problem:
            raise click.UsageError(problem)
        target = Attach(config, config_path, where)
    elif config_path is not None or data_dir is not None:
        raise click.UsageError("--config and --data name a cluster to attach to: add --attach")
    try:
        check_out(out.resolve())
    except OutError as exc:
        raise click.UsageError(str(exc)) from exc
    if seed is None:
        import random

        seed = random.randrange(1, 2**31)
    options = Options(seconds, rate, tuple(fault_list), seed, storage, out, target)
    try:
        outcome = verify(options, console)
    except AttachError as exc:
        raise click.ClickException(f"verify --attach: {exc}") from exc
    sys.exit(0 if outcome.passed else 1)
