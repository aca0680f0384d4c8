"""Checks on replication from outside: every copy's position, and row-by-row comparison of
the SQLite files of a cluster's regions."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import initial_rule


def positions(config: TopologyConfig) -> dict[str, dict[str, int]]:
    """region -> cell name -> the position of that region's copy."""
    result = {}
    with httpx.Client(timeout=5) as client:
        for region in config.regions:
            result[region.name] = client.get(region.base_url + "/healthz").json()["positions"]
    return result


def current_owners(config: TopologyConfig) -> dict[str, str]:
    """cell name -> owner region under the rule in force (the first region's view)."""
    with httpx.Client(timeout=5) as client:
        health = client.get(config.regions[0].base_url + "/healthz").json()
    return {str(cell): str(owner) for cell, owner in health["owners"].items()}


def wait_converged(config: TopologyConfig, timeout_s: float = 30.0) -> dict[str, int]:
    """Wait until every copy of every cell has its owner's position; the owners' positions."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = positions(config)
        owners = current_owners(config)
        heads = {cell: seen[owner][cell] for cell, owner in owners.items()}
        if all(seen[r][c] == heads[c] for r in seen for c in heads):
            return heads
        if time.monotonic() > deadline:
            raise AssertionError(f"not converged after {timeout_s} s: {seen}")
        time.sleep(0.1)


def table_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f"SELECT * FROM {n} ORDER BY 1, 2").fetchall() for n in names}


def differences(config: TopologyConfig, data_dir: Path) -> list[str]:
    """Every (cell, region, table) whose rows differ from the owner's copy."""
    rule = initial_rule(config)
    owners = current_owners(config)
    found = []
    for cell in rule.cells.values():
        owner = owners[cell.name]
        expected = table_rows(data_dir / owner / f"cell-{cell.name}.db")
        for region in config.region_names:
            if region == owner:
                continue
            actual = table_rows(data_dir / region / f"cell-{cell.name}.db")
            for table, rows in expected.items():
                if table == "cell_meta":
                    continue  # the copy's own metadata; its position is compared above
                if actual.get(table) != rows:
                    found.append(f"{cell.name}@{region}.{table}")
    return found


def region_positions(config: TopologyConfig, region: str) -> dict[str, int]:
    """cell name -> the position of `region`'s copy, from its health answer."""
    with httpx.Client(timeout=5) as client:
        body = client.get(config.region(region).base_url + "/healthz").json()
    return {str(cell): int(position) for cell, position in body["positions"].items()}


def disk_positions(data_dir: Path, region: str, cells: list[str]) -> dict[str, int]:
    """cell name -> the position committed in a stopped region's SQLite copy (its files are
    the whole truth once its process is dead)."""
    found = {}
    for cell in cells:
        with sqlite3.connect(data_dir / region / f"cell-{cell}.db") as conn:
            (position,) = conn.execute("SELECT last_position FROM cell_meta").fetchone()
        found[cell] = int(position)
    return found


def owners_of(config: TopologyConfig) -> dict[str, str]:
    """cell name -> owner region under rule version 1."""
    rule = initial_rule(config)
    return {cell.name: rule.owner_of(cell.id) for cell in rule.cells.values()}


def owner_heads(config: TopologyConfig, owner_regions: list[str]) -> dict[str, int]:
    """cell name -> its owner's position, for the cells owned by `owner_regions`: each a
    lower bound of that owner's committed position from the moment it is read."""
    owners = owners_of(config)
    heads: dict[str, int] = {}
    for region in owner_regions:
        seen = region_positions(config, region)
        heads.update({c: p for c, p in seen.items() if owners[c] == region})
    return heads
