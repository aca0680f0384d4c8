"""`unitrade failover` and `unitrade quarantine`: the operator's side of losing a region
(docs/operations.md, "A dead region")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from unitrade.cli_options import compact_table, config_option, load
from unitrade.control.cli import (
    ControlApi,
    _fail,
    _finish,
    add_figures,
    cell_list,
    console,
    follow,
)
from unitrade.control.reconcile import ENTRIES_MAX, ERROR, Item, Reconcile
from unitrade.gateway.quarantine_routes import LIST_PATH
from unitrade.replication.diff_cli import DiffError, cluster_regions
from unitrade.storage.quarantine import CONFLICT, HELD, LIST_ROWS_MAX, REAPPLIED, SUPERSEDED


@click.command()
@config_option
@click.option("--region", required=True, help="The lost region whose cells move.")
@click.option(
    "--to",
    "targets",
    default="",
    help="Regions that may take the cells, comma-separated (hz,bj). Default: every other "
    "region that answers.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Fail over even though the health checker and a majority of the other regions do "
    "not agree the region is down (recorded in the operation). The region stops writing at "
    "the end of its lease all the same.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(1, 3600),
    default=120.0,
    show_default=True,
    help="Seconds to follow the failover (it goes on in the control plane after that).",
)
def failover(
    config_path: Path | None, region: str, targets: str, force: bool, timeout_s: float
) -> None:
    """Move every cell of a lost region to surviving regions, without its cooperation.

    Refused unless the health checker and a majority of the other regions agree that the
    region is unreachable (a typo must not fail over a healthy region; --force overrides).
    Then: the region gets no more write leases; wait until its last one has surely ended;
    per cell, promote the surviving copy with the highest applied position; publish the new
    owners. Ends with the loss report: per cell, the promotion position and the last
    position the lost region was known to have reached. Once the region runs again, the
    changes it made past the promotion are in its quarantine (`unitrade quarantine list`).
    Exit 0 when done; 1 when refused or failed.

    \b
    Examples:
      unitrade failover --region sh
      unitrade failover --region sh --to hz
    """
    names = [t.strip() for t in targets.split(",") if t.strip()]
    with ControlApi(load(config_path)) as api:
        body = {"region": region, "to": names, "force": force}
        code, answer = api.call("POST", "/v1/failover", body)
        if code != 202:
            _fail(code, answer)
        cells = cell_list(api, answer["cells"])
        console.print(f"failover {answer['id']}: cells {cells} of {region} to {answer['target']}")
        _finish(api, follow(api, answer["id"], timeout_s))


def print_failover(api: ControlApi, op: dict[str, Any]) -> None:
    detail = op["detail"]
    table = compact_table(f"failover {op['id']}: {op['state']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    agreement = detail.get("agreement", {})
    rows = [
        ("lost region", ", ".join(sorted(set(op["sources"].values())))),
        ("cells", cell_list(api, op["cells"])),
        ("started by", detail.get("started_by")),
        ("forced", detail.get("forced")),
        ("control plane saw it", agreement.get("control_plane")),
        ("peers saw it", agreement.get("peers")),
        ("total ms", detail.get("total_ms")),
        ("wait for its lease ms", detail.get("expire_ms")),
        ("ban + acks ms", detail.get("ban_ms")),
        ("publish + acks ms", detail.get("publish_ms")),
        (
            "rule versions",
            f"ban {detail.get('ban_version')}, new owners {detail.get('publish_version')}",
        ),
    ]
    add_figures(table, rows, op["error"])
    console.print(table)
    report = detail.get("loss_report")
    if not report:
        return
    loss = compact_table("loss report (changes of the lost region not in the new owner)")
    for column in ("cell", "to", "promoted at", "known at", "missing at least", "known from"):
        loss.add_column(column, no_wrap=column != "known from")
    for cell in report["cells"]:
        loss.add_row(
            cell["cell"],
            cell["to"],
            str(cell["promoted_position"]),
            str(cell["known_position"]),
            str(cell["missing_at_least"]),
            ", ".join(f"{k}={v}" for k, v in cell["known_from"].items()) or "-",
        )
    console.print(loss)
    console.print(report["exact"])


@click.group("quarantine")
def quarantine() -> None:
    """Changes a region made past a failover's promotion position (its divergent tail)."""


@quarantine.command("list")
@config_option
@click.option("--region", "only", default=None, help="Ask only this region. Default: all.")
@click.option(
    "--state",
    type=click.Choice(["held", "reapplied", "conflict", "superseded"]),
    default=None,
    help="Only entries in this state. Default: all.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, LIST_ROWS_MAX),
    default=200,
    show_default=True,
    help="Entries listed per region, oldest position first.",
)
def list_(config_path: Path | None, only: str | None, state: str | None, limit: int) -> None:
    """List quarantined changes in business terms: cell, position, what changed (order,
    buyer, payment, cart, stock), and what reconcile decided. Exit status 1 if any are
    still held, 2 if a region could not be asked."""
    config = load(config_path)
    if only is not None and only not in config.region_names:
        raise click.BadParameter(f"unknown region {only!r}", param_hint="--region")
    entries: list[dict[str, Any]] = []
    unasked: list[str] = []
    with cluster_regions(config) as regions:
        _, answering = regions.survey()
        for region in [only] if only else config.region_names:
            if region not in answering:
                unasked.append(region)
                continue
            answer = regions.call(region, LIST_PATH, {"state": state, "limit": limit}, region)
            entries += [{**e, "region": region} for e in answer["entries"]]
    table = compact_table("quarantined changes")
    for column in ("region", "cell", "failover", "position", "what", "state"):
        table.add_column(column, no_wrap=column not in ("what",))
    for e in entries:
        table.add_row(
            e["region"],
            e["cell"],
            f"v{e['promotion_version']}",
            str(e["position"]),
            e["what"],
            e["state"] + (f" ({e['note']})" if e["note"] else ""),
        )
    console.print(table)
    for region in unasked:
        click.echo(f"not asked: {region} does not answer")
    held = any(e["state"] == "held" for e in entries)
    raise SystemExit(1 if held else 2 if unasked else 0)


@quarantine.command("reconcile")
@config_option
@click.option(
    "--region",
    "only",
    default=None,
    help="Reconcile this region's quarantine. Default: every region with held entries.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Decide and print, writing nothing anywhere (no owner changes, no marks).",
)
def reconcile(config_path: Path | None, only: str | None, dry_run: bool) -> None:
    """Re-apply a lost region's quarantined changes at the current owners; report conflicts.

    The held entries are reduced to business objects (an order with its lines, payment and
    idempotency key; a cart line; a stock reservation; a SKU's stock; a product; a revoked
    token), each sent to the current owner of its cell, which re-applies it through its
    normal write path unless the owner changed it too:

    \b
    - an order the owner lacks is re-created with its ID and state, its stock held again
      at the center (conflict "insufficient stock for order X" when the units are gone);
      one the owner has at the version the change began from gets the same transition
      (pay, close, refund); one the owner changed too is a conflict;
    - a cart line is set if the owner's line is older than the lost region's change;
    - a lost center's reservation holds the stock its order (at its owner) needs now; a
      changed stock total (set_stock) is a conflict, to be set again by hand;
    - a product is written again unless the owner has a newer version; a revocation is
      made again.

    Each entry ends reapplied, conflict or superseded (with a note), recorded in the
    region's quarantine (`unitrade quarantine list`); an object whose owner does not answer
    stays held. Safe to run again: only held entries are read. Exit status 0 when nothing
    is left held or in conflict, 1 when something is (conflicts are for an operator), 2
    when a region could not be asked.

    \b
    Examples:
      unitrade quarantine reconcile --region sh --dry-run
      unitrade quarantine reconcile --region sh
    """
    config = load(config_path)
    if only is not None and only not in config.region_names:
        raise click.BadParameter(f"unknown region {only!r}", param_hint="--region")
    left_total = 0
    unasked: list[str] = []
    with cluster_regions(config) as regions:
        owners, answering = regions.survey()
        if only is not None:
            if only not in answering:
                raise DiffError(f"region {only} does not answer: its quarantine cannot be read")
            chosen = [only]
        else:
            unasked = [r for r in config.region_names if r not in answering]
            chosen = [r for r in config.region_names if r in answering]
        for region in chosen:
            run = Reconcile(regions, region, owners, answering, dry_run)
            if only is None:
                summary = run.summary().values()
                if not any(s.get(HELD) for s in summary):
                    conflicts = sum(s.get(CONFLICT, 0) for s in summary)
                    if conflicts:
                        console.print(f"{region}: nothing held, {conflicts} in conflict")
                    left_total += conflicts
                    continue
            items = run.run()
            print_reconcile(run, items)
            left = run.left()
            left_total += left["held"] + left["conflict"]
            console.print(
                f"{region}: {left['held']} entries {'would stay' if dry_run else 'left'} "
                f"held, {left['conflict']} in conflict"
            )
    for region in unasked:
        click.echo(f"not asked: {region} does not answer")
    raise SystemExit(1 if left_total else 2 if unasked else 0)


def print_reconcile(run: Reconcile, items: list[Item]) -> None:
    title = f"reconcile of {run.region}'s quarantine" + (
        " (dry run: nothing written)" if run.dry_run else ""
    )
    table = compact_table(title)
    for column in ("cell", "what", "rows", "outcome", "note"):
        table.add_column(column, no_wrap=column not in ("what", "note"))
    for item in items:
        state = item.state if not run.dry_run or item.state == ERROR else f"{item.state}?"
        table.add_row(item.cell, item.name, str(len(item.changes)), state, item.note)
    console.print(table)
    counts = run.counts()
    entries = sum(len(i.changes) for i in items)
    console.print(
        f"{len(items)} objects ({entries} entries): {counts[REAPPLIED]} reapplied, "
        f"{counts[CONFLICT]} conflict, {counts[SUPERSEDED]} superseded, "
        f"{counts[ERROR]} not decided (their owner did not answer; still held)"
    )
    if run.truncated:
        console.print(f"more than {ENTRIES_MAX} held entries: run reconcile again for the rest")
