"""The internal API of `unitrade quarantine`: the changes a region's copies held beyond a
failover's promotion position (storage/quarantine.py), in business terms. Signed calls
only, like every `/internal/...` route; each region answers for its own copies.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Route

from unitrade.errors import NotFound
from unitrade.region import RegionRuntime
from unitrade.storage import quarantine
from unitrade.web.signed import internal_endpoint

LIST_PATH = "/internal/quarantine/list"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListCall(_Body):
    cell: int | None = None  # None: every copy of this region
    state: Literal["held", "reapplied", "conflict", "superseded"] | None = None
    limit: Annotated[int, Field(ge=1, le=quarantine.LIST_ROWS_MAX)] = 100


def quarantine_routes(runtime: RegionRuntime) -> list[Route]:
    async def listed(b: ListCall) -> Any:
        stores = runtime.copies.stores
        if b.cell is not None and b.cell not in stores:
            raise NotFound(f"no cell {b.cell}")
        cells = [b.cell] if b.cell is not None else sorted(stores)
        entries: list[dict[str, Any]] = []
        for cell in cells:
            if not runtime.replicator.quarantined.get(cell):
                continue  # nothing was ever quarantined in this copy: no query
            left = b.limit - len(entries)
            if left <= 0:
                break
            entries += await quarantine.entries(stores[cell], left, b.state)
        return {"region": runtime.name, "entries": entries, "summary": runtime.quarantine_summary()}

    return [Route(LIST_PATH, internal_endpoint(ListCall, listed), methods=["POST"])]
