"""The `unitrade` command."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console
from rich.markup import escape

from unitrade.cli_options import (
    CONFIG_HINT,
    DATA_DIR_DEFAULT,
    DATA_ENVVAR,
    compact_table,
    config_option,
    load,
    mask_password,
    not_the_cluster,
    refuse_ports_in_use,
)
from unitrade.topology.config import (
    CONTROL_NAME,
    WORKERS_MAX,
    ConfigError,
    DevelopmentSecret,
    TopologyConfig,
    check_production,
)
from unitrade.topology.probes import PROBE_BUYER_MIN

console = Console()
WORKER_REPORT_MS_MAX = 3_000  # workers report every second: older is away


# The commands of other modules, imported when run (or listed by --help): most of them
# bring the whole region (its services, storage and web stack), a second of imports that
# `unitrade status` or `unitrade switch` in an incident has no use for.
LAZY_COMMANDS = {
    "coupon": "unitrade.sale_cli:coupon",
    "degrade": "unitrade.control.flow_cli:degrade",
    "diff": "unitrade.replication.diff_cli:diff",
    "evacuate": "unitrade.control.cli:evacuate",
    "failover": "unitrade.control.failover_cli:failover",
    "limits": "unitrade.control.flow_cli:limits",
    "operations": "unitrade.control.cli:operations",
    "outbox": "unitrade.outbox_cli:outbox",
    "quarantine": "unitrade.control.failover_cli:quarantine",
    "sale": "unitrade.sale_cli:sale",
    "start": "unitrade.supervisor_cli:start",
    "stop": "unitrade.supervisor_cli:stop",
    "switch": "unitrade.control.cli:switch",
    "verify": "unitrade.verify.cli:verify_command",
}


class LazyGroup(click.Group):
    """click's lazily loading group (its documentation's pattern): a command named in
    LAZY_COMMANDS is imported when it is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command) and command.name == cmd_name, target
        return command


def _load(config_path: Path | None) -> TopologyConfig:
    return load(config_path)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unitrade")
def main() -> None:
    """unitrade: a multi-region, active-active trading platform.

    Buyers are homed to a region by their ID (buyer -> bucket -> cell -> owner region);
    any region's gateway serves any request, forwarding once to the owner. `up` runs a
    local cluster; the other commands talk to a running one.

    \b
    Every command (but stop and start, which find `up` by its --data) takes --config
    FILE, the topology TOML the cluster runs with; set UNITRADE_CONFIG once instead of
    repeating it:
      export UNITRADE_CONFIG=topology.toml
      unitrade up --data /tmp/ut        # in one shell (Ctrl-C stops)
      unitrade status                   # in another
      unitrade switch --cell u3 --to hz
      unitrade stop --region sh --kill --data /tmp/ut   # a crash drill; `start` undoes it
      unitrade verify --seconds 60      # a cluster of its own under faults, checked
      unitrade sale create --sku PHONE-1 --stock 5000 --tokens 50000 --end +10m
    """


@main.command()
@config_option
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DATA_DIR_DEFAULT,
    show_default=True,
    envvar=DATA_ENVVAR,
    show_envvar=True,
    help="Directory for the regions' cell copies (SQLite), the control plane's store and "
    "the logs (DIR/logs/REGION.log). Kept between runs.",
)
@click.option(
    "--production",
    is_flag=True,
    help="Refuse to start while any secret is the built-in development one "
    "(the same as `[secrets] production = true`).",
)
def up(config_path: Path | None, data_dir: Path, production: bool) -> None:
    """Run the control plane and every region as local processes, supervised.

    Checks first that every port of the topology is free (exit 2 naming the port if not,
    with nothing started), waits until all are healthy, prints the regions, their URLs and
    storage (passwords masked), and stays in the foreground, supervising: a region or the
    control plane that exits is started again on its data, after 0.2 s (doubling up to 5 s
    while it keeps dying within 10 s of its start); after 5 restarts within 60 s it is left
    down, said loudly, and the rest keep running. Each restart is printed and logged in
    DIR/logs/supervisor.log. `unitrade stop` and `unitrade start` (with the same --data)
    take one down and bring it back, for drills. Ctrl-C or SIGTERM stops them all cleanly.

    \b
    Examples:
      unitrade up --config topology.toml --data /tmp/ut
      unitrade stop --region sh --kill --data /tmp/ut    # in another shell: a crash drill
      unitrade start --region sh --data /tmp/ut
    """
    from unitrade.cluster import ClusterError, LocalCluster

    config = _load(config_path)
    try:
        warning = check_production(config, production)
    except DevelopmentSecret as exc:
        raise click.ClickException(str(exc)) from exc
    if warning is not None:
        console.print(f"[bold red]{warning}[/]")
    cluster = LocalCluster(config, data_dir.resolve(), config_path)
    refuse_ports_in_use(cluster)
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    try:
        with console.status("starting regions..."):
            cluster.start()
        _print_regions(config, data_dir)
        cluster.supervise(on_event=_print_supervisor_event)
        console.print("[bold green]cluster up[/] (supervised) - Ctrl-C to stop")
        while not halt.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        with console.status("stopping regions..."):
            cluster.stop()
        console.print("stopped")


def _print_supervisor_event(message: str, loud: bool) -> None:
    if loud:
        console.print(f"[bold red]SUPERVISOR: {message}[/]", soft_wrap=True)
    else:
        console.print(f"[yellow]supervisor:[/] {message}", soft_wrap=True)


def _print_regions(config: TopologyConfig, data_dir: Path) -> None:
    table = compact_table("unitrade regions")
    for column in ("region", "role", "url", "owns cells (rule in force)"):
        table.add_column(column, no_wrap=column != "owns cells (rule in force)")
    owners = {c.name: c.owner for c in config.cells}  # rule version 1
    try:
        url = config.regions[0].base_url + "/healthz"
        health = httpx.get(url, timeout=2.0, verify=config.http_verify).json()
        owners = {str(c): str(r) for c, r in health["owners"].items()}
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    for region in config.regions:
        owned = ", ".join(c for c, owner in owners.items() if owner == region.name)
        role = "center" if owners.get("center") == region.name else "unit"
        table.add_row(region.name, role, region.base_url, owned)
    console.print(table)
    control = config.control
    store = mask_password(control.storage_url(data_dir))
    if control.etcd:
        store = f"etcd {', '.join(control.etcd_endpoints)} under {control.etcd_prefix}"
    # soft_wrap: a URL is never broken across lines, so it can be copied.
    urls = ", ".join(control.urls)
    console.print(f"control plane: {urls} (store {store})", soft_wrap=True)
    for region in config.regions:
        url = mask_password(region.storage_url("{cell}", data_dir))
        console.print(f"storage of {region.name}: {url}", soft_wrap=True)


@main.command(short_help="Serve one region on this host (a region's own host).")
@config_option
@click.option("--region", required=True, help="The region this process serves.")
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=DATA_DIR_DEFAULT,
    show_default=True,
    help="The data directory: the region keeps DIR/REGION (its persisted rule, its SQLite copies "
    "when its storage is not a database URL).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, WORKERS_MAX),
    help="Serving processes of the region (overrides `workers` of its `[regions.X]`; more "
    "than 1 needs PostgreSQL or MySQL/MariaDB storage).",
)
@click.option(
    "--worker",
    type=click.IntRange(0, WORKERS_MAX - 1),
    help="Serve only this worker of a region of many (0 .. workers - 1), for a supervisor "
    "of your own (a systemd template unit per worker); without it every worker runs, "
    "supervised by this command.",
)
def serve(
    config_path: Path | None,
    region: str,
    data_dir: Path,
    workers: int | None,
    worker: int | None,
) -> None:
    """Serve one region on this host: what `unitrade up` starts per region, and what runs
    on a region's own machines in production (under systemd or another supervisor;
    docs/operations.md, "Regions on their own hosts").

    \b
    It binds the region's `listen` (e.g. 0.0.0.0:8701) and the others reach it at its
    `advertise` (e.g. 10.1.0.5:8701, or a name): every host of the cluster runs with the
    same topology file, which holds the secrets, so keep it readable by the service user
    only. Clocks of all hosts must agree within 30 s (signed calls are refused beyond
    that); leases do not depend on clocks agreeing.

    \b
    With `workers = N` (> 1) the region runs N processes on the one address (SO_REUSEPORT),
    over its PostgreSQL or MySQL/MariaDB databases; without --worker this command starts
    and supervises them (a worker that exits is started again, logs in DIR/logs/REGION.K.log;
    `unitrade stop --region REGION.K --data DIR` is a drill on one), with --worker K it is
    worker K alone.

    \b
      unitrade serve --region sh --config /etc/unitrade/topology.toml --data /var/lib/unitrade
      unitrade serve --region sh --workers 4 --config topology.toml --data /var/lib/unitrade
      unitrade serve --region sh --worker 2 --workers 4 --config topology.toml  # one of 4
    """
    from unitrade.serve import serve_region

    config = _load(config_path)
    if region not in config.region_names:
        raise click.BadParameter(f"unknown region {region!r}", param_hint="--region")
    if workers is not None and workers != config.region(region).workers:
        try:
            config = config.with_workers(region, workers)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--workers") from exc
    count = config.region(region).workers
    if worker is not None and worker >= count:
        raise click.BadParameter(
            f"region {region} runs workers 0..{count - 1}", param_hint="--worker"
        )
    if worker is not None or count == 1:
        serve_region(config, region, data_dir.resolve(), worker or 0)
        return
    _serve_workers(config, config_path, region, data_dir.resolve())


def _serve_workers(
    config: TopologyConfig, config_path: Path | None, region: str, data_dir: Path
) -> None:
    """Run every worker of a region of many on this host, supervised, until SIGTERM or
    Ctrl-C (the machinery of `unitrade up`, cluster.py, for this region alone)."""
    from unitrade.cluster import ClusterError, LocalCluster

    cluster = LocalCluster(config, data_dir, config_path, health_at_listen=True)
    halt = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    try:
        cluster.start_region(region)
        cluster.wait_healthy([region])
        cluster.supervise(on_event=_print_supervisor_event)
        names = ", ".join(cluster.worker_names(region))
        console.print(f"region {region}: workers {names} up (supervised)", soft_wrap=True)
        while not halt.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        cluster.stop()


@main.command("serve-control", short_help="Serve the control plane in this process.")
@config_option
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=DATA_DIR_DEFAULT,
    help="The cluster's data directory (as given to `up`).",
)
@click.option(
    "--member",
    help="The control plane member this process is (`[[control.members]]`); needed when "
    "there are several.",
)
def serve_control(config_path: Path | None, data_dir: Path, member: str | None) -> None:
    """Serve the control plane in this process: what `unitrade up` starts, and what runs on
    the control plane's own machine in production (or one member per region on etcd,
    `--member NAME`). It binds `[control] listen` and is reached at its `advertise`.

    \b
      unitrade serve-control --config /etc/unitrade/topology.toml --data /var/lib/unitrade
    """
    from unitrade.control.serve import serve_control as run

    config = _load(config_path)
    names = [m.name for m in config.control.members]
    if member is None and len(names) > 1:
        raise click.UsageError(f"name the member to serve: --member {' | '.join(names)}")
    if member is not None and member not in names:
        known = ", ".join(names) or "none: `[control]` has no members"
        raise click.BadParameter(f"unknown member {member!r} (members: {known})")
    run(config, data_dir.resolve(), member or (names[0] if names else None))


@main.command()
@config_option
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DATA_DIR_DEFAULT,
    show_default=True,
    envvar=DATA_ENVVAR,
    show_envvar=True,
    help="The data directory of `unitrade up`, if it runs on this machine: what is down is "
    "then shown with the supervisor's word for it (stopped by operator, restarting, failed).",
)
def status(config_path: Path | None, data_dir: Path) -> None:
    """Show what is up and down, the cells' owners and the lag.

    Prints the control plane (its rule version and running operation), the regions (health,
    the rule version each component has acknowledged), the cells with their owners under
    the newest rule a live region reports (never the configuration's initial owners), the
    control plane's own probes of every region and cell (up, down or unknown, seconds
    since the last good probe, the last error), the replication lag of every stream, and
    flow control per region (the limits version, switches on, what limits refused and
    overload shed, breakers not closed).
    The last line names what is down: what does not answer this command, with why when the
    `unitrade up` on --data knows (e.g. `region sh (stopped by operator)`), and what the
    control plane's probes find down.

    \b
    Exit status:
      0  the control plane and every region answer
      1  the control plane or some region is down (named in the last line)
      2  bad usage or configuration
    """
    config = _load(config_path)
    with httpx.Client(timeout=2.0, verify=config.http_verify) as client:
        control = _control_health(client, config)
        healths = {
            region.name: health
            for region in config.regions
            if (health := _health(client, region.base_url)) is not None
        }
    urls = {r.name: r.base_url for r in config.regions} | {CONTROL_NAME: config.control.base_url}
    from unitrade.supervisor_cli import supervisor_notes

    notes = supervisor_notes(data_dir, urls)
    _print_control(config, control, regions_up=bool(healths))
    newest = _newest_rule(healths)
    _print_region_table(config, healths, newest, notes)
    _print_cells(config, newest)
    probes = control.get("health") if control is not None else None
    if isinstance(probes, dict):
        _print_probes(probes)
    if healths:
        _print_replication(config, healths)
        _print_flow(config, healths)
    down = ([] if control is not None else [_noted("the control plane", CONTROL_NAME, notes)]) + [
        _noted(f"region {r}", r, notes) for r in config.region_names if r not in healths
    ]
    down += _probed_down(probes, already=down)
    if not down:
        console.print(f"[green]all up[/]: the control plane and {len(healths)} regions")
        return
    console.print(f"[red]down[/]: {', '.join(down)}", soft_wrap=True)
    if not healths and control is None:
        console.print(f"nothing answered: {CONFIG_HINT}", soft_wrap=True)
    sys.exit(1)


def _print_flow(config: TopologyConfig, healths: dict[str, dict[str, Any]]) -> None:
    """Flow control per region (`flow` in its /healthz)."""
    table = compact_table(
        "flow control",
        "limits: the rule version the flow rules last changed at; refused: 429 by limit; "
        "shed: 503 overloaded; breakers: those not closed (call@region)",
    )
    for column in ("region", "limits", "switches on", "refused", "shed", "in flight", "breakers"):
        table.add_column(column, no_wrap=column not in ("switches on", "refused", "breakers"))
    for region in config.regions:
        flow = healths.get(region.name, {}).get("flow")
        if not isinstance(flow, dict):
            table.add_row(region.name, "-", "-", "-", "-", "-", "-")
            continue
        refused = ", ".join(
            f"{name} {counts['refused']}"
            for name, counts in flow.get("limits", {}).items()
            if counts.get("refused")
        )
        overload = flow.get("overload", {})
        shed = sum(int(v) for v in overload.get("shed", {}).values())
        breakers = ", ".join(
            f"[red]{b['call']}@{b['region']} {b['state']}[/]"
            for b in flow.get("breakers", [])
            if b.get("state") != "closed"
        )
        table.add_row(
            region.name,
            f"v{flow.get('version', '?')} ({flow.get('storage', '?')})",
            ", ".join(flow.get("switches", [])) or "none",
            refused or "0",
            str(shed),
            str(overload.get("in_flight", "-")),
            breakers or "all closed",
        )
    console.print(table)


def _noted(what: str, name: str, notes: dict[str, str]) -> str:
    return f"{what} ({notes[name]})" if name in notes else what


def _health(client: httpx.Client, base_url: str) -> dict[str, Any] | None:
    try:
        body = client.get(base_url + "/healthz").json()
    except (httpx.HTTPError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _control_health(client: httpx.Client, config: TopologyConfig) -> dict[str, Any] | None:
    """The active control plane's health (with members: the leader's, and a line per
    member printed here); None when none serves."""
    members = config.control.member_list
    if len(members) == 1:
        return _health(client, members[0].base_url)
    active = None
    for member in members:
        health = _health(client, member.base_url)
        role = "[red]down[/]" if health is None else health.get("role", "?")
        console.print(f"control plane member {member.name} {member.base_url}: {role}")
        if health is not None and health.get("role") == "leader":
            active = {**health, "url": member.base_url}
    return active


def _newest_rule(healths: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The live region holding the newest rule, and its health: the owners to show."""
    reporting = [(r, h) for r, h in healths.items() if isinstance(h.get("owners"), dict)]
    if not reporting:
        return None
    return max(reporting, key=lambda item: int(item[1].get("rule_version", 0)))


def _print_control(
    config: TopologyConfig, control: dict[str, Any] | None, regions_up: bool
) -> None:
    url = (control or {}).get("url") or ", ".join(config.control.urls)
    where = f"control plane {url}"
    if control is not None:
        running = control.get("running") or "none"
        console.print(
            f"{where}: [green]up[/], rule version {control.get('rule_version', '?')}, "
            f"running operation: {running}",
            soft_wrap=True,
        )
    elif regions_up:
        console.print(
            f"{where}: [red]down[/] (the regions that answer keep serving under the rule "
            "they have; no switchover until it is back)",
        )
    else:
        console.print(f"{where}: [red]down[/]", soft_wrap=True)


def _print_region_table(
    config: TopologyConfig,
    healths: dict[str, dict[str, Any]],
    newest: tuple[str, dict[str, Any]] | None,
    notes: dict[str, str],
) -> None:
    table = compact_table(
        "regions",
        "rule: the rule version the region holds; acked: the version its gateway/rpc/dal "
        "have acknowledged (as the worker that answered holds them); workers: those that "
        "reported in the last 3 s of the region's `workers`, and the leader; fwd: requests "
        "it forwarded to an owner",
    )
    columns = ("region", "role", "url", "health", "rule", "acked", "control", "lease")
    for column in (*columns, "workers", "fwd"):
        table.add_column(column, no_wrap=True)
    center = newest[1]["owners"].get("center") if newest else None
    for region in config.regions:
        health = healths.get(region.name, {})
        acked = health.get("acked", {})
        connected = health.get("control", {}).get("connected")
        role = "?" if center is None else "center" if region.name == center else "unit"
        table.add_row(
            region.name,
            role,
            region.base_url,
            "[green]up[/]" if health else f"[red]{notes.get(region.name, 'down')}[/]",
            str(health.get("rule_version", "-")),
            "/".join(str(acked.get(c, "-")) for c in ("gateway", "rpc", "dal")),
            "-" if connected is None else ("connected" if connected else "[red]no[/]"),
            _lease_text(health.get("lease")),
            _workers_text(health),
            str(health.get("forwarded", "-")),
        )
    console.print(table)


def _workers_text(health: dict[str, Any]) -> str:
    """A region of many processes: the workers reporting lately of all, and the leader."""
    processes = health.get("processes")
    if not health or not isinstance(processes, list):
        return "-" if not health else "1"
    live = [p for p in processes if int(p.get("reported_ms_ago", 10**9)) < WORKER_REPORT_MS_MAX]
    leaders = [str(p.get("worker")) for p in live if p.get("leader")]
    text = f"{len(live)}/{health.get('workers', '?')}"
    if len(live) < int(health.get("workers", 0)):
        text = f"[red]{text}[/]"
    return f"{text} (leader {', '.join(leaders) or '[red]none[/]'})"


def _lease_text(lease: Any) -> str:
    """A region's write lease: time left, or why it has none."""
    if not isinstance(lease, dict):
        return "-"
    if lease.get("valid"):
        return f"{int(lease.get('remaining_ms', 0)) / 1000:.1f} s"
    if lease.get("rule_version_min"):
        return f"[red]blocked[/] (needs rule {lease['rule_version_min']})"
    return "[red]none[/]"


def _print_cells(config: TopologyConfig, newest: tuple[str, dict[str, Any]] | None) -> None:
    if newest is None:
        title = "cells (owners unknown: no region answered)"
    else:
        title = f"cells (owners: rule {newest[1].get('rule_version')}, from {newest[0]})"
    cells = compact_table(title)
    for column in ("cell", "id", "kind", "owner", "buckets", "status"):
        cells.add_column(column)
    owners: dict[str, str] = newest[1]["owners"] if newest else {}
    banned: list[str] = newest[1].get("banned", []) if newest else []
    for cell in config.cells:
        owner = owners.get(cell.name, "unknown: no region answered")
        if newest is None:
            state = "unknown"
        else:
            state = "[yellow]banned[/]" if cell.name in banned else "writable"
        cells.add_row(cell.name, str(cell.id), cell.kind.value, owner, cell.buckets or "-", state)
    console.print(cells)


STALE_WHY_CHARS = 60


def _print_probes(probes: dict[str, Any]) -> None:
    """The control plane's health checker (`health` in its /healthz)."""
    table = compact_table(
        "health probes (by the control plane)",
        "probe: how a cell was judged (order: a synthetic order; healthz: its owner's "
        "/healthz; read: a read at its owner); good: seconds since the last good probe",
    )
    for column in ("target", "owner", "probe", "state", "good", "failed", "last error"):
        table.add_column(column, no_wrap=column != "last error")
    now = int(probes.get("now_ms") or 0)
    styles = {"up": "green", "down": "red"}

    def row(target: str, owner: str, how: str, probed: dict[str, Any]) -> None:
        state = str(probed.get("state", "?"))
        good = probed.get("last_good_ms")
        ago = "never" if good is None else f"{max(0, now - int(good)) / 1000:.1f}s"
        error = probed.get("last_error") if probed.get("failures") else None
        table.add_row(
            target,
            owner,
            how,
            f"[{styles.get(state, 'yellow')}]{state}[/]",
            ago,
            str(probed.get("failures", "-")),
            str(error or "-"),
        )

    for name, probed in dict(probes.get("regions") or {}).items():
        row(f"region {name}", "-", "healthz", probed)
    for name, probed in dict(probes.get("cells") or {}).items():
        row(f"cell {name}", str(probed.get("owner")), str(probed.get("judged_by") or "-"), probed)
    console.print(table)


def _probed_down(probes: Any, already: list[str]) -> list[str]:
    """What the control plane's probes find down, as the last line names it."""
    if not isinstance(probes, dict):
        return []
    found = [
        f"region {name} (probes)"
        for name, probed in dict(probes.get("regions") or {}).items()
        if probed.get("state") == "down"
        and not any(d == f"region {name}" or d.startswith(f"region {name} (") for d in already)
    ]
    found += [
        f"cell {name} (probes)"
        for name, probed in dict(probes.get("cells") or {}).items()
        if probed.get("state") == "down"
    ]
    return found


def _print_replication(config: TopologyConfig, healths: dict[str, dict[str, Any]]) -> None:
    """Every stream; one whose owner has not answered for a while is shown as stale with
    its last error (its lag figures are as of the last answer, not now)."""
    table = compact_table("replication (owner -> copy)")
    for column in (
        "cell",
        "from",
        "to",
        "applied",
        "owner head",
        "lag positions",
        "lag ms",
        "errors",
    ):
        table.add_column(column)
    for region in config.regions:
        for s in healths.get(region.name, {}).get("replication", []):
            lag = s["lag_positions"]
            style = "green" if lag == 0 and not s["last_error"] else "yellow"
            lag_text = f"[{style}]{lag}[/]"
            lag_ms = str(s["lag_ms"])
            if s.get("stale"):
                silent_s = int(s.get("heard_ms_ago", 0)) // 1000
                why = s["last_error"] or f"no answer from {s['source']}"
                if len(why) > STALE_WHY_CHARS:  # the whole error is in /healthz
                    why = why[: STALE_WHY_CHARS - 3] + "..."
                lag_text = f"[red]stale {silent_s} s: {escape(why)}[/]"
                lag_ms = "?"
            table.add_row(
                s["cell_name"],
                s["source"],
                region.name,
                str(s["applied"]),
                str(s["head"]),
                lag_text,
                lag_ms,
                str(s["errors"]),
            )
    console.print(table)


@main.command()
@config_option
@click.option("--cell", "cell_text", required=True, help="Cell id or name (3, u3, center).")
@click.option("--region", required=True, help="The region whose copy to wait for.")
@click.option(
    "--position",
    type=click.IntRange(min=0),
    required=True,
    help="Changelog position of the cell to wait for.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, max=3600),
    default=30.0,
    show_default=True,
    help="Seconds to wait at most.",
)
def wait(
    config_path: Path | None, cell_text: str, region: str, position: int, timeout_s: float
) -> None:
    """Wait until a region's copy of a cell reaches a position.

    Exit 0 once REGION has applied CELL up to POSITION, 1 on --timeout. The switchover uses
    the same internal API: it reads a cell's final position at the old owner and waits for
    the new owner to reach it.

    \b
    Example:
      unitrade wait --cell u3 --region hz --position 120 --timeout 10
    """
    import time

    import orjson

    from unitrade.rpc.signing import sign

    config = _load(config_path)
    try:
        cell = config.find_cell(cell_text)
    except KeyError as exc:
        raise click.BadParameter(str(exc), param_hint="--cell") from exc
    if region not in config.region_names:
        raise click.BadParameter(f"unknown region {region!r}", param_hint="--region")
    target = "/internal/replication/wait"
    deadline = time.monotonic() + timeout_s
    reached = {"position": None}
    with httpx.Client(timeout=70.0, verify=config.http_verify) as client:
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            body = orjson.dumps(
                {"cell": cell.id, "position": position, "timeout_ms": min(left_ms, 60_000)}
            )
            plain = {"content-type": "application/json"}
            secret = config.control_secret
            headers = {**plain, **sign(secret, CONTROL_NAME, region, "POST", target, body, plain)}
            try:
                answer = client.post(
                    config.region(region).base_url + target, content=body, headers=headers
                )
            except httpx.HTTPError as exc:
                raise not_the_cluster(f"region {region} is unreachable: {exc}") from exc
            if answer.status_code == 401:
                raise not_the_cluster(f"region {region} refused the call: {answer.text}")
            if answer.status_code != 200:
                raise click.ClickException(f"region {region} answered {answer.text}")
            reached = answer.json()
            if reached["reached"] or time.monotonic() >= deadline:
                break
    if not reached["reached"]:
        console.print(
            f"[red]timed out[/]: {region} has {cell.name} at {reached['position']}, not {position}"
        )
        sys.exit(1)
    console.print(f"{region} has applied {cell.name} up to {reached['position']} (>= {position})")


def _duration_s(text: str) -> int:
    """`90`, `90s`, `30m`, `12h` or `7d` in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not number.isdigit() or int(number) == 0:
        raise click.BadParameter(f"{text!r}: use e.g. 90s, 30m, 12h or 7d", param_hint="--ttl")
    return int(number) * units[unit]


@main.command()
@config_option
@click.argument("buyer_id", type=click.IntRange(min=1, max=PROBE_BUYER_MIN - 1), required=False)
@click.option("--admin", is_flag=True, help="Print the admin token instead of a buyer's.")
@click.option(
    "--ttl",
    "ttl",
    metavar="DURATION",
    help="How long the token is valid: 90s, 30m, 12h, 7d (at most 30d). "
    "Default: 24h for a buyer, 1h for the admin.",
)
@click.option(
    "--revoke",
    "revoke",
    metavar="TOKEN",
    help="Revoke TOKEN at once in every region instead of printing a new one "
    "(the revocation lasts until the token would have expired).",
)
def token(
    config_path: Path | None,
    buyer_id: int | None,
    admin: bool,
    ttl: str | None,
    revoke: str | None,
) -> None:
    """Print a bearer token for a buyer or the admin, or revoke one.

    BUYER_ID is the buyer (1 .. 2^62-1) the token speaks for; give it or --admin. Buyer
    IDs from 2^62 up are reserved for the control plane's synthetic probe orders. The
    token is signed with the configuration's current token key, so only a cluster started
    with the same configuration accepts it.

    \b
    Examples:
      curl -H "authorization: Bearer $(unitrade token 42)" localhost:8701/v1/cart
      unitrade token 42                 a buyer token, valid 24 h
      unitrade token --admin --ttl 15m  an admin token, valid 15 minutes
      unitrade token --revoke ut2....   revoke a token before it expires
    """
    from unitrade.web.tokens import TTL_S_MAX, issue_token

    config = _load(config_path)
    if revoke is not None:
        if admin or buyer_id is not None or ttl is not None:
            raise click.UsageError("--revoke takes no BUYER_ID, --admin or --ttl")
        _revoke_token(config, revoke)
        return
    if admin == (buyer_id is not None):
        raise click.UsageError("give either BUYER_ID or --admin")
    ttl_s = _duration_s(ttl) if ttl is not None else None
    if ttl_s is not None and ttl_s > TTL_S_MAX:
        raise click.BadParameter(f"at most {TTL_S_MAX // 86_400}d", param_hint="--ttl")
    click.echo(issue_token(config.token_keys, buyer_id=buyer_id, admin=admin, ttl_s=ttl_s))


def _revoke_token(config: TopologyConfig, token_text: str) -> None:
    """Ask the regions, in turn, to revoke a token; the first that answers does it for all
    (the revocation is written in the global cell and replicated)."""
    from unitrade.web.tokens import issue_token

    admin = issue_token(config.token_keys, admin=True, ttl_s=60)
    headers = {"authorization": f"Bearer {admin}"}
    failures = []
    with httpx.Client(timeout=10.0, verify=config.http_verify) as client:
        for region in config.regions:
            try:
                answer = client.post(
                    region.base_url + "/v1/admin/tokens/revoke",
                    json={"token": token_text},
                    headers=headers,
                )
            except httpx.HTTPError as exc:
                failures.append(f"{region.name}: {type(exc).__name__}")
                continue
            if answer.status_code != 200:
                raise click.ClickException(f"{region.name} answered {answer.text}")
            body = answer.json()
            console.print(
                f"token {body['token_id']} revoked in every region "
                f"(kept until it expires at {body['expires_s']})"
            )
            return
    raise click.ClickException("no region answered: " + "; ".join(failures))


@main.command()
@config_option
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".unitrade/demo"),
    show_default=True,
    help="Directory for the demo cluster. Wiped at the start: not the data of `up`.",
)
@click.option(
    "--buyers",
    type=click.IntRange(1, 100_000),
    default=300,
    show_default=True,
    help="Buyers who shop, each placing 1-3 orders.",
)
@click.option(
    "--skus",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Products in the seeded catalog.",
)
@click.option(
    "--stock",
    type=click.IntRange(0, 10**6),
    default=40,
    show_default=True,
    help="Units of stock of each product.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=16,
    show_default=True,
    help="Buyers shopping at the same time.",
)
def demo(
    config_path: Path | None, data_dir: Path, buyers: int, skus: int, stock: int, concurrency: int
) -> None:
    """Run a fresh cluster under load, with a switchover, and check it.

    Starts a cluster in --data (on the topology's ports: exit 2, naming the port, if
    something already listens there, e.g. `unitrade up`), seeds a catalog, places, pays and
    closes orders through random regions while a cell is switched to another region and
    back, then prints what happened: orders per region and cell, forwarding, no order lost,
    stock conserved, every copy identical. Then a short flash sale: 200 buyers rush 30
    units with 120 sale tokens (tokens issued, orders, units sold, every token accounted
    for), and a region killed, failed over and reconciled. Exit 0 when every check holds,
    1 otherwise.
    """
    from unitrade.cluster import ClusterError, LocalCluster
    from unitrade.demo import DemoFailed, run_demo

    config = _load(config_path)
    refuse_ports_in_use(LocalCluster(config, data_dir.resolve(), config_path))
    try:
        ok = run_demo(config, config_path, data_dir, buyers, skus, stock, concurrency)
    except (ClusterError, DemoFailed) as exc:
        raise click.ClickException(f"{exc} (the regions' logs are in {data_dir}/logs)") from exc
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(prog_name="unitrade")
