"""The changelog of every cell, read at the end from its owner's copy (the replication
pull, signed as the control plane signs): the epoch (rule version the write was admitted
under) and origin (the region that accepted it) of every row, for the ownership check."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx

from unitrade.replication.diff_cli import DiffError, cluster_regions
from unitrade.replication.routes import PULL_PATH
from unitrade.topology.config import CONTROL_NAME, TopologyConfig
from unitrade.verify.checks import Row

PAGE_ROWS = 500
ROWS_MAX = 200_000  # per cell: a bound on what one run reads back


@dataclass
class Changelogs:
    rows: list[Row] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)  # cells not read, with why


def owner_positions(config: TopologyConfig) -> dict[int, int]:
    """Each cell's changelog position at its owner now (cells whose owner does not answer
    are left out): where a run attached to a running cluster starts reading."""
    positions: dict[int, int] = {}
    with cluster_regions(config) as regions:
        owners, _answering = regions.survey()
        for cell in config.cells:
            owner = owners.get(cell.name)
            if owner is None:
                continue
            try:
                url = config.region(owner).base_url + "/healthz"
                health = regions.http.get(url).json()
                positions[cell.id] = int(health["positions"][cell.name])
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                continue
    return positions


def read_changelogs(config: TopologyConfig, since: dict[int, int] | None = None) -> Changelogs:
    """Every cell's changelog at its owner, after `since[cell]` (0 when absent)."""
    found = Changelogs()
    with cluster_regions(config) as regions:
        owners, _answering = regions.survey()
        for cell in config.cells:
            owner = owners.get(cell.name)
            if owner is None:
                found.unread.append(f"{cell.name}: no owner known")
                continue
            after = (since or {}).get(cell.id, 0)
            try:
                while after < ROWS_MAX:
                    body = {"cell": cell.id, "after": after, "limit": PAGE_ROWS, "wait_ms": 0}
                    reply = regions.call(owner, PULL_PATH, body, CONTROL_NAME)
                    changes = reply.get("changes", [])
                    for change in changes:
                        found.rows.append(
                            Row(
                                cell.id,
                                int(change["position"]),
                                int(change["epoch"]),
                                str(change["origin"]),
                                str(change.get("tbl", "")),
                            )
                        )
                    if not changes:
                        break
                    after = int(changes[-1]["position"])
            except (DiffError, KeyError, TypeError, ValueError) as exc:
                found.unread.append(f"{cell.name} at {owner} after {after}: {exc}")
    return found
