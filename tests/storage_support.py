"""Cell stores for storage-level tests on SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from unitrade.storage.fence import Fence
from unitrade.storage.store import CellStore
from unitrade.topology.config import default_config
from unitrade.topology.rule import Rule, initial_rule

RULE = initial_rule(default_config())


def cell_url(template: str, cell: int) -> str:
    return template.format(cell=RULE.cells[cell].name)


def make_store(
    template: str, cell: int, region: str = "hz", rule: Rule = RULE, *, inline: bool = True
) -> CellStore:
    fence = Fence(region, rule)
    return CellStore(RULE.cells[cell], region, cell_url(template, cell), fence, inline=inline)


def sqlite_template(directory: Path) -> str:
    return f"sqlite:///{directory}/cell-{{cell}}.db"


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` on the loop until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def sqlite_path(url: str) -> str:
    """The file of a SQLite storage URL."""
    return url.removeprefix("sqlite:///")


@contextmanager
def write_lock_held(url: str) -> Iterator[Callable[[], None]]:
    """On SQLite, another connection holds the database's write lock (as another process
    would): the store's inline writes find it taken and go to its writer thread. Yields
    the function that releases it. On other engines, nothing."""
    if not url.startswith("sqlite"):
        yield lambda: None
        return
    other = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=5)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield lambda: other.execute("COMMIT") if other.in_transaction else None
    finally:
        other.close()
