"""Checks on replication from outside: every copy's position, and row-by-row comparison of
the cell copies of a cluster's regions (SQLite files, or databases on PostgreSQL or
MySQL/MariaDB: each region's storage URL says)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from unitrade.storage.engine import backend_of, sync_url
from unitrade.storage.schema import local
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


def copy_url(config: TopologyConfig, data_dir: Path, region: str, cell: str) -> str:
    """The storage URL of `region`'s copy of `cell`."""
    return config.region(region).storage_url(cell, data_dir)


def url_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of a cell copy, rows in key order, whatever its engine."""
    if backend_of(url) == "sqlite":
        return table_rows(Path(url.removeprefix("sqlite:///")))
    engine = create_engine(sync_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            quote = conn.dialect.identifier_preparer.quote
            return {
                name: [
                    tuple(r)
                    for r in conn.execute(text(f"SELECT * FROM {quote(name)} ORDER BY 1, 2"))
                ]
                for name in inspect(conn).get_table_names()
            }
    finally:
        engine.dispose()


def differences(config: TopologyConfig, data_dir: Path) -> list[str]:
    """Every (cell, region, table) whose rows differ from the owner's copy."""
    rule = initial_rule(config)
    owners = current_owners(config)
    found = []
    for cell in rule.cells.values():
        owner = owners[cell.name]
        expected = url_rows(copy_url(config, data_dir, owner, cell.name))
        for region in config.region_names:
            if region == owner:
                continue
            actual = url_rows(copy_url(config, data_dir, region, cell.name))
            for table, rows in expected.items():
                if table == "cell_meta" or table in local.tables:
                    continue  # the copy's own: its position, quarantine, followers, workers
                if actual.get(table) != rows:
                    found.append(f"{cell.name}@{region}.{table}")
    return found


def region_positions(config: TopologyConfig, region: str) -> dict[str, int]:
    """cell name -> the position of `region`'s copy, from its health answer."""
    with httpx.Client(timeout=5) as client:
        body = client.get(config.region(region).base_url + "/healthz").json()
    return {str(cell): int(position) for cell, position in body["positions"].items()}


def disk_positions(
    config: TopologyConfig, data_dir: Path, region: str, cells: list[str]
) -> dict[str, int]:
    """cell name -> the position committed in a stopped region's copy (its database is the
    whole truth once its process is dead)."""
    found = {}
    for cell in cells:
        rows = url_rows(copy_url(config, data_dir, region, cell))["cell_meta"]
        (position,) = {row[2] for row in rows}  # cell_id, kind, last_position, ...
        found[cell] = int(position)
    return found


def wipe_copy(config: TopologyConfig, data_dir: Path, region: str, cell: str) -> None:
    """Delete a stopped region's copy of a cell: its SQLite files, or its database."""
    url = copy_url(config, data_dir, region, cell)
    if backend_of(url) == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
        return
    assert backend_of(url) == "mysql", "PostgreSQL copies are not wiped by these tests"
    name = make_url(url).database
    engine = create_engine(sync_url(url), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE `{name}`"))
    finally:
        engine.dispose()


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
