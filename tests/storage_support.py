"""Cell stores for storage-level tests on SQLite or PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from unitrade.storage.fence import Fence
from unitrade.storage.store import CellStore
from unitrade.topology.config import default_config
from unitrade.topology.rule import Rule, initial_rule

RULE = initial_rule(default_config())


def cell_url(template: str, cell: int) -> str:
    return template.format(cell=RULE.cells[cell].name)


def make_store(template: str, cell: int, region: str = "hz", rule: Rule = RULE) -> CellStore:
    fence = Fence(region, rule)
    return CellStore(RULE.cells[cell], region, cell_url(template, cell), fence)


def sqlite_template(directory: Path) -> str:
    return f"sqlite:///{directory}/cell-{{cell}}.db"
