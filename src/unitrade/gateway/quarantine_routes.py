"""The internal API of `unitrade quarantine`: the changes a region's copies held beyond a
failover's promotion position (storage/quarantine.py), in business terms, and the marks
`unitrade quarantine reconcile` leaves on them. Signed calls only, like every
`/internal/...` route; each region answers for its own copies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Route

from unitrade.errors import InvalidRequest, NotFound
from unitrade.region import RegionRuntime
from unitrade.storage import quarantine
from unitrade.web.signed import internal_endpoint

LIST_PATH = "/internal/quarantine/list"
MARK_PATH = "/internal/quarantine/mark"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


Position = Annotated[int, Field(ge=0, le=2**63 - 1)]
Decided = Literal["reapplied", "conflict", "superseded"]


class ListCall(_Body):
    cell: int | None = None  # None: every copy of this region
    state: Literal["held", "reapplied", "conflict", "superseded"] | None = None
    limit: Annotated[int, Field(ge=1, le=quarantine.LIST_ROWS_MAX)] = 100
    # Paging (with `cell`): entries after this (promotion_version, position).
    after: tuple[Position, Position] | None = None
    images: bool = False  # each entry with its row image (reconcile needs them)


class Mark(_Body):
    promotion_version: Position
    position: Position
    state: Decided
    note: Annotated[str, Field(max_length=quarantine.NOTE_CHARS_MAX)]


class MarkCall(_Body):
    cell: int
    marks: Annotated[list[Mark], Field(min_length=1, max_length=quarantine.MARKS_MAX)]


def quarantine_routes(runtime: RegionRuntime) -> list[Route]:
    async def listed(b: ListCall) -> Any:
        stores = runtime.copies.stores
        if b.cell is not None and b.cell not in stores:
            raise NotFound(f"no cell {b.cell}")
        cells = [b.cell] if b.cell is not None else sorted(stores)
        entries: list[dict[str, Any]] = []
        if b.after is not None and b.cell is None:
            raise InvalidRequest("`after` pages through one cell: give `cell` too")
        for cell in cells:
            if not runtime.replicator.quarantined.get(cell):
                continue  # nothing was ever quarantined in this copy: no query
            left = b.limit - len(entries)
            if left <= 0:
                break
            entries += await quarantine.entries(stores[cell], left, b.state, b.after, b.images)
        return {"region": runtime.name, "entries": entries, "summary": runtime.quarantine_summary()}

    async def marked(b: MarkCall) -> Any:
        """Record reconcile's decisions in this region's quarantine (held entries only)."""
        stores = runtime.copies.stores
        if b.cell not in stores:
            raise NotFound(f"no cell {b.cell}")
        store = stores[b.cell]
        n = await quarantine.mark(store, [m.model_dump() for m in b.marks])
        runtime.replicator.quarantined[b.cell] = await quarantine.counts(store)
        return {"region": runtime.name, "marked": n, "summary": runtime.quarantine_summary()}

    return [
        Route(LIST_PATH, internal_endpoint(ListCall, listed), methods=["POST"]),
        Route(MARK_PATH, internal_endpoint(MarkCall, marked), methods=["POST"]),
    ]
