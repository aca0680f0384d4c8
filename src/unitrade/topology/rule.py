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

from pydantic import ValidationError

from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.topology.flow_rules import FlowRules
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
class Promotion:
    """A failover of a cell (control/failover.py): from `version` on, `to` owns the cell,
    continuing from the copy it held at `position`. Any changelog row of the cell above
    `position` whose epoch is below `version` was written by the lost owner `source` after
    the last change the new owner had: the divergent tail that a returning copy moves into
    its quarantine (storage/quarantine.py). `id_time_s` is the lowest order-ID time the new
    owner may issue, past any second the lost owner can have used (storage/sequences.py)."""

    version: int
    position: int
    source: str
    to: str
    id_time_s: int

    def body(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "position": self.position,
            "from": self.source,
            "to": self.to,
            "id_time_s": self.id_time_s,
        }


PROMOTIONS_PER_CELL_MAX = 8  # older records are dropped: a copy that old is rebuilt anyway


@dataclass(frozen=True)
class Rule:
    version: int
    bucket_cells: tuple[int, ...]
    cells: Mapping[int, CellInfo]
    owners: Mapping[int, str]
    banned: frozenset[int] = field(default_factory=frozenset)
    # cell -> its failovers, oldest first (at most PROMOTIONS_PER_CELL_MAX)
    promotions: Mapping[int, tuple[Promotion, ...]] = field(default_factory=dict)
    # Rate limits, overload protection, breakers, degradation switches (flow_rules.py):
    # changed live through the control plane like owners, one version at a time.
    flow: FlowRules = field(default_factory=FlowRules)

    def __post_init__(self) -> None:
        # Real checks, not asserts: rules arrive from the wire, from files and from the
        # control plane's store, and `python -O` would strip an assert.
        problems = rule_problems(self)
        if problems:
            raise RoutingError("not a valid rule: " + "; ".join(problems))

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
        promoted: Mapping[int, Promotion] | None = None,
        flow: FlowRules | None = None,
    ) -> Rule:
        """The next rule: same cells and buckets, with new owners and/or bans, new
        promotion records (failovers) appended to the cells' histories, and/or new flow
        rules."""
        if version <= self.version:
            raise RoutingError(f"rule versions only grow: {version} after {self.version}")
        new_owners = {**self.owners, **(owners or {})}
        if set(new_owners) != set(self.owners):
            raise RoutingError(
                f"a rule cannot add cells: {sorted(set(new_owners) - set(self.owners))}"
            )
        promotions = dict(self.promotions)
        for cell, promotion in (promoted or {}).items():
            history = (*promotions.get(cell, ()), promotion)
            promotions[cell] = history[-PROMOTIONS_PER_CELL_MAX:]
        return replace(
            self,
            version=version,
            owners=new_owners,
            banned=self.banned if banned is None else frozenset(banned),
            promotions=promotions,
            flow=self.flow if flow is None else flow,
        )

    def promotions_of(self, cell: int) -> tuple[Promotion, ...]:
        return self.promotions.get(cell, ())

    def id_time_min_s(self, cell: int) -> int:
        """The lowest order-ID time this cell's owner may issue (0: no failover)."""
        return max((p.id_time_s for p in self.promotions_of(cell)), default=0)

    def moved_cells(self, other: Rule) -> list[int]:
        """Cells whose owner or ban differs between this rule and `other`."""
        return sorted(
            c
            for c in self.cells
            if self.owners[c] != other.owners.get(c) or self.is_banned(c) != other.is_banned(c)
        )

    def routing_changed(self, other: Rule) -> bool:
        """Whether anything but the flow rules differs from `other` (owners, bans,
        promotions): what replication must follow."""
        return bool(self.moved_cells(other)) or self.promotions != other.promotions

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
            "promotions": {
                str(c): [p.body() for p in history]
                for c, history in sorted(self.promotions.items())
                if history
            },
            "flow": self.flow.body(),
        }


def rule_from_body(body: Mapping[str, Any]) -> Rule:
    """Inverse of `Rule.body`; RoutingError for a body that is not a valid rule."""
    try:
        cells = {
            _integer(c["id"]): CellInfo(
                _integer(c["id"]), _text(c["name"]), CellKind(c["kind"]), _text(c["partition"])
            )
            for c in body["cells"]
        }
        return Rule(
            version=_integer(body["version"]),
            bucket_cells=tuple(_integer(b) for b in body["bucket_cells"]),
            cells=cells,
            owners={_integer(c): _text(owner) for c, owner in body["owners"].items()},
            banned=frozenset(_integer(c) for c in body["banned"]),
            promotions={
                _integer(c): tuple(_promotion(p) for p in history)
                for c, history in body.get("promotions", {}).items()
            },
            # A rule written before flow rules existed has the defaults.
            flow=FlowRules.model_validate(body["flow"]) if "flow" in body else FlowRules(),
        )
    except RoutingError:
        raise
    except ValidationError as exc:
        problems = "; ".join(
            f"flow.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise RoutingError(f"not a valid rule: {problems}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RoutingError(f"not a valid rule: {type(exc).__name__}: {exc}") from exc


def _promotion(body: Mapping[str, Any]) -> Promotion:
    return Promotion(
        version=_integer(body["version"]),
        position=_integer(body["position"]),
        source=_text(body["from"]),
        to=_text(body["to"]),
        id_time_s=_integer(body["id_time_s"]),
    )


def _integer(value: Any) -> int:
    """An integer as JSON carries it (owners' keys are decimal strings); nothing rounded."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def rule_problems(rule: Rule) -> list[str]:
    """What makes `rule` invalid on its own: empty when it is a rule a region may install."""
    problems: list[str] = []
    if isinstance(rule.version, bool) or not isinstance(rule.version, int) or rule.version < 1:
        problems.append(f"version must be an integer >= 1, got {rule.version!r}")
    if not rule.bucket_cells:
        problems.append("a rule has at least one bucket")
    if not rule.cells:
        problems.append("a rule has at least one cell")
    for cell_id, cell in rule.cells.items():
        if cell.id != cell_id:
            problems.append(f"cell {cell_id} is described as cell {cell.id}")
    for kind in (CellKind.CENTER, CellKind.GLOBAL):
        count = sum(1 for c in rule.cells.values() if c.kind is kind)
        if count != 1:
            problems.append(f"exactly one {kind.value} cell is required, found {count}")
    if set(rule.owners) != set(rule.cells):
        problems.append("every cell has exactly one owner")
    if any(not isinstance(o, str) or not o for o in rule.owners.values()):
        problems.append("owners are region names")
    not_units = sorted(
        {
            c
            for c in rule.bucket_cells
            if c not in rule.cells or rule.cells[c].kind is not CellKind.UNIT
        }
    )
    if not_units:
        problems.append(f"buckets map to unit cells only, not to {not_units}")
    unknown_banned = sorted(rule.banned - set(rule.cells))
    if unknown_banned:
        problems.append(f"banned cells {unknown_banned} are not cells of the rule")
    for promoted, history in rule.promotions.items():
        if promoted not in rule.cells:
            problems.append(f"promotions of cell {promoted}, which is not a cell of the rule")
        if len(history) > PROMOTIONS_PER_CELL_MAX:
            problems.append(f"cell {promoted} has more than {PROMOTIONS_PER_CELL_MAX} promotions")
        for promotion in history:
            if promotion.version > rule.version or promotion.position < 0:
                problems.append(f"cell {promoted}: promotion {promotion.body()} is not valid")
    if not isinstance(rule.flow, FlowRules) or rule.flow.version > rule.version:
        problems.append("flow rules must be of a version no newer than the rule")
    return problems


def check_rule_fits(rule: Rule, config: TopologyConfig) -> None:
    """RoutingError unless `rule` routes the configured topology: the same cells of the
    same kinds, the same bucket count, and owners that are configured regions. A rule from
    the wire or a file that fails this would route buyers to cells or regions that do not
    exist here."""
    problems: list[str] = []
    if rule.bucket_count != config.bucket_count:
        problems.append(f"{rule.bucket_count} buckets, the topology has {config.bucket_count}")
    configured = {c.id: c.kind for c in config.cells}
    if {c: info.kind for c, info in rule.cells.items()} != configured:
        problems.append("its cells differ from the topology's")
    unknown = sorted({o for o in rule.owners.values()} - set(config.region_names))
    if unknown:
        problems.append(f"owners {unknown} are not regions of the topology")
    if problems:
        raise RoutingError(f"rule version {rule.version} does not fit: " + "; ".join(problems))


def bucket_of(buyer_id: int, bucket_count: int) -> int:
    """The documented bucket function: `buyer_id mod bucket_count`."""
    if not 1 <= buyer_id <= BUYER_ID_MAX:
        raise RoutingError(f"buyer ID must be a positive 63-bit integer, got {buyer_id}")
    if bucket_count < 1:
        raise RoutingError(f"bucket count must be >= 1, got {bucket_count}")
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
        flow=config.flow.rules(1),
    )
