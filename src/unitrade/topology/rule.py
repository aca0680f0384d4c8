"""The rule: versioned routing state, and the pure routing functions over it.

A rule maps bucket -> cell and cell -> owner region, and says which cells are banned (no
region may write them, during a switch). Every change makes a new version; versions only
grow. The version under which a write is admitted is that write's epoch (docs/architecture.md).

The bucket function (documented in docs/architecture.md): a buyer's routing key is the
buyer ID, and `bucket = buyer_id mod bucket_count`. Modulo over a fixed, large number of
buckets (AWS cell-based architecture, Ant LDC's 100 shards) keeps the function stable forever;
moving load means moving buckets between cells or cells between regions, never rehashing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.topology.order_id import decode_order_id

BUYER_ID_MAX = 2**63 - 1


class RoutingError(ValueError):
    """A key that cannot be routed (not a valid buyer ID, unknown cell)."""


@dataclass(frozen=True)
class CellInfo:
    id: int
    name: str
    kind: CellKind
    partition: str = "normal"


@dataclass(frozen=True)
class Route:
    """Where a key's data lives: its cell and the cell's owner region."""

    cell: int
    region: str


@dataclass(frozen=True)
class Rule:
    version: int
    bucket_cells: tuple[int, ...]
    cells: Mapping[int, CellInfo]
    owners: Mapping[int, str]
    banned: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        assert self.version >= 1, "rule versions start at 1"
        assert self.bucket_cells, "a rule has at least one bucket"
        assert set(self.owners) == set(self.cells), "every cell has exactly one owner"
        for cell in self.bucket_cells:
            assert self.cells[cell].kind is CellKind.UNIT, "buckets map to unit cells only"

    @property
    def bucket_count(self) -> int:
        return len(self.bucket_cells)

    def owner_of(self, cell: int) -> str:
        try:
            return self.owners[cell]
        except KeyError:
            raise RoutingError(f"unknown cell {cell}") from None

    def is_banned(self, cell: int) -> bool:
        return cell in self.banned

    def cell_of_kind(self, kind: CellKind) -> int:
        return next(c.id for c in self.cells.values() if c.kind is kind)

    @property
    def center_cell(self) -> int:
        return self.cell_of_kind(CellKind.CENTER)

    @property
    def global_cell(self) -> int:
        return self.cell_of_kind(CellKind.GLOBAL)

    def unit_cells(self) -> list[int]:
        return sorted(c.id for c in self.cells.values() if c.kind is CellKind.UNIT)

    def cells_owned_by(self, region: str) -> list[int]:
        return sorted(c for c, owner in self.owners.items() if owner == region)

    def derive(
        self,
        version: int,
        owners: Mapping[int, str] | None = None,
        banned: Iterable[int] | None = None,
    ) -> Rule:
        """The next rule: same cells and buckets, with new owners and/or bans."""
        assert version > self.version, "rule versions only grow"
        new_owners = {**self.owners, **(owners or {})}
        assert set(new_owners) == set(self.owners), "a rule cannot add cells"
        return replace(
            self,
            version=version,
            owners=new_owners,
            banned=self.banned if banned is None else frozenset(banned),
        )

    def moved_cells(self, other: Rule) -> list[int]:
        """Cells whose owner or ban differs between this rule and `other`."""
        return sorted(
            c
            for c in self.cells
            if self.owners[c] != other.owners.get(c) or self.is_banned(c) != other.is_banned(c)
        )

    def body(self) -> dict[str, Any]:
        """The JSON form pushed to regions and kept in the rule history."""
        return {
            "version": self.version,
            "bucket_cells": list(self.bucket_cells),
            "cells": [
                {"id": c.id, "name": c.name, "kind": c.kind.value, "partition": c.partition}
                for c in sorted(self.cells.values(), key=lambda c: c.id)
            ],
            "owners": {str(c): owner for c, owner in sorted(self.owners.items())},
            "banned": sorted(self.banned),
        }


def rule_from_body(body: Mapping[str, Any]) -> Rule:
    """Inverse of `Rule.body`; RoutingError for a body that is not a valid rule."""
    try:
        cells = {
            int(c["id"]): CellInfo(
                int(c["id"]), str(c["name"]), CellKind(c["kind"]), c["partition"]
            )
            for c in body["cells"]
        }
        return Rule(
            version=int(body["version"]),
            bucket_cells=tuple(int(b) for b in body["bucket_cells"]),
            cells=cells,
            owners={int(c): str(owner) for c, owner in body["owners"].items()},
            banned=frozenset(int(c) for c in body["banned"]),
        )
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise RoutingError(f"not a valid rule: {type(exc).__name__}: {exc}") from exc


def bucket_of(buyer_id: int, bucket_count: int) -> int:
    """The documented bucket function: `buyer_id mod bucket_count`."""
    if not 1 <= buyer_id <= BUYER_ID_MAX:
        raise RoutingError(f"buyer ID must be a positive 63-bit integer, got {buyer_id}")
    assert bucket_count >= 1
    return buyer_id % bucket_count


def route_buyer(rule: Rule, buyer_id: int) -> Route:
    """buyer -> bucket -> cell -> owner region."""
    cell = rule.bucket_cells[bucket_of(buyer_id, rule.bucket_count)]
    return Route(cell=cell, region=rule.owner_of(cell))


def route_order(rule: Rule, order_id: int) -> Route:
    """order ID -> cell (carried in the ID) -> owner region."""
    try:
        cell = decode_order_id(order_id).cell
    except ValueError as exc:
        raise RoutingError(str(exc)) from exc
    if cell not in rule.cells or rule.cells[cell].kind is not CellKind.UNIT:
        raise RoutingError(f"order ID names cell {cell}, which is not a unit cell")
    return Route(cell=cell, region=rule.owner_of(cell))


def route_cell(rule: Rule, cell: int) -> Route:
    return Route(cell=cell, region=rule.owner_of(cell))


def initial_rule(config: TopologyConfig) -> Rule:
    """Rule version 1: the owners and bucket assignment written in the configuration."""
    bucket_cells = [0] * config.bucket_count
    for cell in config.cells:
        for bucket in cell.bucket_list():
            bucket_cells[bucket] = cell.id
    return Rule(
        version=1,
        bucket_cells=tuple(bucket_cells),
        cells={c.id: CellInfo(c.id, c.name, c.kind, c.partition) for c in config.cells},
        owners={c.id: c.owner for c in config.cells},
    )
