"""`unitrade diff`: compare every replica copy of a cell with its owner's copy, row by row.

For each cell, table and replica region: the owner lists its chunks (key ranges of at most
`--chunk-rows` rows, with checksums), the replica checksums the same ranges of its copy, and
only the chunks whose checksums differ are compared row by row, by the replica, against the
owner's rows (replication/diff.py). Each mismatched primary key is printed with its cell,
region, table and kind; `--repair` makes the replica's rows equal to the owner's, then checks
everything again.

Exit status: 0 when every copy equals its owner's (after the repair, with `--repair`), 1 when
differences remain, 2 when a region could not be asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import click
import httpx
import orjson
from rich import box
from rich.console import Console
from rich.table import Table

from unitrade.cli_options import CONFIG_HINT, config_option, load
from unitrade.replication.diff import (
    CHECKSUMS_PATH,
    CHUNK_ROWS_DEFAULT,
    CHUNK_ROWS_MAX,
    CHUNKS_PATH,
    CHUNKS_PER_CALL_MAX,
    COMPARE_PATH,
    REPLICA_OVERSHOOT,
    ROWS_PER_CALL_MAX,
    TRIMMED_PATH,
    Checksum,
    compared_tables,
)
from unitrade.rpc.signing import sign
from unitrade.topology.config import CONTROL_NAME, CellConfig, TopologyConfig

CONNECT_TIMEOUT_S = 3.0
# A call reads a bounded number of rows, but a compare call may also wait for the replica to
# catch up (diff.CATCH_UP_WAIT_S) and call the owner (rpc.client.REQUEST_TIMEOUT_S).
CALL_TIMEOUT_S = 60.0
COMPARE_PAGE_ROWS = 500
HEADERS = {"mismatched_chunks": "differ", "in_flux": "in flux"}


class DiffError(click.ClickException):
    """The comparison could not be made (exit status 2, not 1: nothing is known to differ)."""

    exit_code = 2


@dataclass
class Tally:
    """What the comparison of one replica copy of one cell found."""

    chunks: int = 0
    mismatched_chunks: int = 0
    missing: int = 0
    extra: int = 0
    different: int = 0
    in_flux: int = 0
    repaired: int = 0

    @property
    def differences(self) -> int:
        return self.missing + self.extra + self.different


class Regions:
    """Signed calls to the regions' internal API, as the CLI holds the cluster secret."""

    def __init__(self, config: TopologyConfig, http: httpx.Client) -> None:
        self.config = config
        self.http = http

    def call(self, region: str, path: str, payload: Any, origin: str) -> Any:
        body = orjson.dumps(payload)
        headers = {"content-type": "application/json"}
        # The CLI speaks for the operator, as the control plane does.
        headers.update(
            sign(self.config.control_secret, CONTROL_NAME, region, "POST", path, body, headers)
        )
        try:
            response = self.http.post(
                self.config.region(region).base_url + path, content=body, headers=headers
            )
            answer = orjson.loads(response.content) if response.content else None
        except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
            raise DiffError(f"region {region}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 401:
            raise DiffError(f"region {region} refused the call: {answer}\nhint: {CONFIG_HINT}")
        if response.status_code >= 400:
            message = answer.get("message") if isinstance(answer, dict) else None
            raise DiffError(f"region {region} answered {response.status_code}: {message}")
        return answer

    def survey(self) -> tuple[dict[str, str], set[str]]:
        """cell name -> owner region under the rule in force (from the first region that
        answers: the configuration's owners are only rule version 1), and the regions that
        answer /healthz."""
        owners: dict[str, str] = {}
        answering: set[str] = set()
        for region in self.config.regions:
            try:
                health = self.http.get(region.base_url + "/healthz").json()
            except (httpx.HTTPError, ValueError):
                continue
            if not isinstance(health, dict):
                continue
            answering.add(region.name)
            if not owners and isinstance(health.get("owners"), dict):
                owners = {str(k): str(v) for k, v in health["owners"].items()}
        if not owners:
            raise DiffError(f"no region answered /healthz\nhint: {CONFIG_HINT}")
        return owners, answering


class Differ:
    """One pass over the chosen cells: compare (and repair) every replica copy."""

    def __init__(
        self, regions: Regions, chunk_rows: int, repair: bool, answering: set[str]
    ) -> None:
        self.regions = regions
        self.chunk_rows = chunk_rows
        self.repair = repair
        self.answering = answering  # regions that answered before the pass began
        self.tallies: dict[tuple[str, str], Tally] = {}
        self.not_compared: list[str] = []  # copies left out, and why

    def cell(self, cell: CellConfig, owner: str) -> None:
        others = [r for r in self.regions.config.region_names if r != owner]
        if owner not in self.answering:
            # Nothing to compare against: the owner's copy is the reference.
            self.not_compared += [
                f"{cell.name} at {r}: its owner {owner} does not answer" for r in others
            ]
            return
        replicas = [r for r in others if r in self.answering]
        self.not_compared += [
            f"{cell.name} at {r}: {r} does not answer" for r in others if r not in replicas
        ]
        for replica in replicas:
            self.tallies[(cell.name, replica)] = Tally()
        for table in compared_tables(cell.kind):
            self.table(cell, owner, replicas, table)

    def table(self, cell: CellConfig, owner: str, replicas: list[str], table: str) -> None:
        after: Any = None
        if table == "changelog":
            # Only what every copy compared still has: each trims its own changelog.
            trimmed = max(self.trimmed(cell, region, owner) for region in [owner, *replicas])
            after = {"position": trimmed} if trimmed else None
        chunks_max = min(CHUNKS_PER_CALL_MAX, max(1, ROWS_PER_CALL_MAX // self.chunk_rows))
        while True:
            call = {"cell": cell.id, "table": table, "after": after}
            call.update({"chunk_rows": self.chunk_rows, "chunks_max": chunks_max})
            answer = self.regions.call(owner, CHUNKS_PATH, call, origin=owner)
            chunks: list[dict[str, Any]] = answer["chunks"]
            for replica in replicas:
                self.chunks(cell, owner, replica, table, chunks)
            if answer["done"]:
                return
            after = chunks[-1]["hi"]

    def trimmed(self, cell: CellConfig, region: str, owner: str) -> int:
        answer = self.regions.call(region, TRIMMED_PATH, {"cell": cell.id}, origin=owner)
        return int(answer["trimmed_position"])

    def chunks(
        self, cell: CellConfig, owner: str, replica: str, table: str, chunks: list[dict[str, Any]]
    ) -> None:
        """Checksum the owner's chunks on the replica; compare those that differ."""
        ranges = [{"lo": c["lo"], "hi": c["hi"]} for c in chunks]
        call = {"cell": cell.id, "table": table, "ranges": ranges}
        call["rows_max"] = self.chunk_rows * REPLICA_OVERSHOOT
        answer = self.regions.call(replica, CHECKSUMS_PATH, call, origin=owner)
        tally = self.tallies[(cell.name, replica)]
        for chunk, theirs in zip(chunks, answer["checksums"], strict=True):
            tally.chunks += 1
            if Checksum.from_body(chunk) != Checksum.from_body(theirs):
                tally.mismatched_chunks += 1
                self.compare(cell, owner, replica, table, chunk["lo"], chunk["hi"])

    def compare(
        self, cell: CellConfig, owner: str, replica: str, table: str, lo: Any, hi: Any
    ) -> None:
        """Compare (and repair) one chunk on the replica, page by page."""
        tally = self.tallies[(cell.name, replica)]
        while True:
            call = {"cell": cell.id, "table": table, "lo": lo, "hi": hi}
            call.update({"limit": COMPARE_PAGE_ROWS, "repair": self.repair})
            answer = self.regions.call(replica, COMPARE_PATH, call, origin=owner)
            for mismatch in answer["mismatches"]:
                self.found(cell, replica, mismatch, answer["repaired"], tally)
            tally.in_flux += int(answer["in_flux"])
            if answer["done"]:
                return
            lo = answer["next_lo"]

    def found(
        self, cell: CellConfig, replica: str, mismatch: dict[str, Any], repaired: bool, tally: Tally
    ) -> None:
        kind = str(mismatch["kind"])
        tally.missing += kind == "missing"
        tally.extra += kind == "extra"
        tally.different += kind == "different"
        tally.repaired += repaired
        what = {"missing": "missing on replica", "extra": "extra on replica"}.get(kind, kind)
        if mismatch["columns"]:
            what += f" ({', '.join(mismatch['columns'])})"
        key = orjson.dumps(mismatch["key"]).decode()
        # One tab-separated line per key, not through rich: greppable, never wrapped.
        fields = [cell.name, replica, mismatch["table"], key, what]
        click.echo("\t".join([*fields, "repaired"] if repaired else fields))

    def run(self, cells: list[CellConfig], owners: dict[str, str]) -> None:
        for cell in cells:
            self.cell(cell, owners.get(cell.name, cell.owner))

    @property
    def differences(self) -> int:
        return sum(t.differences for t in self.tallies.values())

    @property
    def in_flux(self) -> int:
        return sum(t.in_flux for t in self.tallies.values())


def summary(tallies: dict[tuple[str, str], Tally], title: str) -> Table:
    # No vertical rules and no cut headers: fits 80 columns.
    table = Table(title=title, box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    names = [f.name for f in fields(Tally)]
    table.add_column("cell", no_wrap=True)
    table.add_column("replica", no_wrap=True, min_width=7)
    for name in names:
        header = HEADERS.get(name, name)
        table.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    for (cell, region), tally in tallies.items():
        table.add_row(cell, region, *(str(getattr(tally, n)) for n in names))
    return table


def choose_cells(config: TopologyConfig, wanted: tuple[str, ...]) -> list[CellConfig]:
    if not wanted:
        return list(config.cells)
    try:
        return [config.find_cell(text) for text in wanted]
    except KeyError as exc:
        raise click.BadParameter(str(exc.args[0]), param_hint="--cell") from exc


@contextmanager
def cluster_regions(config: TopologyConfig) -> Iterator[Regions]:
    timeout = httpx.Timeout(CALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    with httpx.Client(timeout=timeout, verify=config.http_verify) as http:
        yield Regions(config, http)


def run_diff(
    config: TopologyConfig, cells: list[CellConfig], chunk_rows: int, repair: bool, console: Console
) -> tuple[int, list[str]]:
    """Compare (and repair) the copies of the cells that can be reached: the differences
    left, and the copies that were not compared (a region down), with why."""
    with cluster_regions(config) as regions:
        owners, answering = regions.survey()
        first = Differ(regions, chunk_rows, repair, answering)
        first.run(cells, owners)
        console.print(summary(first.tallies, "repaired" if repair else "differences"))
        left = first
        if repair:
            left = Differ(regions, chunk_rows, False, answering)
            left.run(cells, owners)
            console.print(f"re-check after the repair: {left.differences} differences")
    if left.in_flux:
        console.print(f"{left.in_flux} rows changed while they were compared: run diff again")
    for reason in left.not_compared:
        click.echo(f"not compared: {reason}")
    return left.differences, left.not_compared


@click.command("diff")
@config_option
@click.option(
    "--cell",
    "cells",
    multiple=True,
    help="Cell id or name (u3, center, global); repeat for several. Default: every cell.",
)
@click.option("--repair", is_flag=True, help="Make every replica equal to its owner's copy.")
@click.option(
    "--chunk-rows",
    type=click.IntRange(10, CHUNK_ROWS_MAX),
    default=CHUNK_ROWS_DEFAULT,
    show_default=True,
    help="Rows per checksummed chunk.",
)
def diff(config_path: Path | None, cells: tuple[str, ...], repair: bool, chunk_rows: int) -> None:
    """Compare every copy of the cells with its owner's, row by row.

    Prints each mismatched primary key (cell, replica region, table, kind) and a summary.
    A region that does not answer is left out (its copies, or the cells it owns) and named
    in a `not compared:` line; the others are compared. Exit status 0: every copy equal
    (after the repair, with --repair); 1: differences; 2: no differences among the copies
    compared, but some could not be (a region down, or one failed during the pass), or a
    bad configuration.

    \b
    Examples:
      unitrade diff --cell u3 --cell center
      unitrade diff --repair
    """
    config = load(config_path)
    console = Console(highlight=False)
    left, not_compared = run_diff(config, choose_cells(config, cells), chunk_rows, repair, console)
    raise SystemExit(1 if left else 2 if not_compared else 0)
