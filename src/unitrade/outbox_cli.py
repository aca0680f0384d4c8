"""`unitrade outbox`: center steps (commit, release, refund) that the outbox drainer gave up
on after OUTBOX_ATTEMPTS_MAX attempts, and a reset that makes it send them again.

Each region is asked, with a signed call (the CLI holds the cluster secret, as for
`unitrade diff`), for the unit cells it owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from unitrade.cli_options import config_option, load
from unitrade.gateway.outbox_routes import FAILED_PATH, FAILED_ROWS_MAX, RETRY_PATH
from unitrade.replication.diff_cli import DiffError, cluster_regions
from unitrade.topology.order_id import decode_order_id, parse_order_id


@click.group("outbox")
def outbox() -> None:
    """Outbox steps to the center that failed for good, and retrying them."""


@outbox.command("failed")
@config_option
@click.option(
    "--cell",
    "cell_text",
    default=None,
    help="Unit cell id or name (u3). Default: every unit cell.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, FAILED_ROWS_MAX),
    default=100,
    show_default=True,
    help="Steps listed per region, oldest first.",
)
def failed(config_path: Path | None, cell_text: str | None, limit: int) -> None:
    """List outbox steps that failed for good: cell, order ID, step, attempts, last error
    and age. Exit status 1 if there are any, 2 if a region could not be asked."""
    config = load(config_path)
    cell: int | None = None
    if cell_text is not None:
        try:
            cell = config.find_cell(cell_text).id
        except KeyError as exc:
            raise click.BadParameter(str(exc.args[0]), param_hint="--cell") from exc
    steps: list[dict[str, Any]] = []
    unasked: list[str] = []
    with cluster_regions(config) as regions:
        _, answering = regions.survey()
        for region in config.region_names:
            if region not in answering:
                unasked.append(region)
                continue
            answer = regions.call(region, FAILED_PATH, {"cell": cell, "limit": limit}, region)
            steps += answer["steps"]
    table = Table(title="outbox steps failed for good", box=box.SIMPLE, pad_edge=False)
    for column in ("cell", "order", "step", "attempts", "last error", "age s"):
        table.add_column(column, no_wrap=column != "last error")
    for s in steps:
        row = (s["cell"], s["order_id"], s["step"], s["attempts"], s["last_error"], s["age_s"])
        table.add_row(*("" if v is None else str(v) for v in row))
    Console(highlight=False).print(table)
    for region in unasked:
        click.echo(f"not asked: {region} does not answer (the cells it owns)")
    raise SystemExit(1 if steps else 2 if unasked else 0)


@outbox.command("retry")
@config_option
@click.option(
    "--order", "order_text", required=True, help="Order ID whose failed steps are sent again."
)
def retry(config_path: Path | None, order_text: str) -> None:
    """Reset the failed outbox steps of one order (attempts to 0), so that its cell's
    owner sends them to the center again within a second."""
    config = load(config_path)
    try:
        order_id = parse_order_id(order_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--order") from exc
    with cluster_regions(config) as regions:
        owners, _ = regions.survey()
        try:
            cell = config.cell(decode_order_id(order_id).cell)
        except KeyError as exc:
            message = f"order {order_id}: {exc.args[0]}"
            raise click.BadParameter(message, param_hint="--order") from exc
        owner = owners.get(cell.name, cell.owner)
        answer = regions.call(owner, RETRY_PATH, {"order_id": str(order_id)}, owner)
    reset = answer["reset"]
    if not reset:
        raise DiffError(f"order {order_id} has no failed outbox step at {owner}")
    click.echo(f"order {order_id}: {', '.join(reset)} pending again at {owner}")
