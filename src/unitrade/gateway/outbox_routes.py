"""The internal API of `unitrade outbox`: outbox steps that failed for good, and a reset
of an order's failed steps. Signed calls only, like every `/internal/...` route. A region
answers for the unit cells it owns: its copy is the one the drainer works on.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Route

from unitrade.errors import InvalidRequest, NotFound, WrongRegion
from unitrade.region import RegionRuntime
from unitrade.services.orders import failed_outbox, retry_outbox
from unitrade.storage.store import now_ms
from unitrade.topology.config import CellKind
from unitrade.topology.rule import RoutingError, route_order
from unitrade.web.signed import internal_endpoint

FAILED_PATH = "/internal/outbox/failed"
RETRY_PATH = "/internal/outbox/retry"
FAILED_ROWS_MAX = 1_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FailedCall(_Body):
    cell: int | None = None  # None: every unit cell this region owns
    limit: Annotated[int, Field(ge=1, le=FAILED_ROWS_MAX)] = 100


class RetryCall(_Body):
    order_id: Annotated[str, Field(pattern=r"^[0-9]{1,19}$")]


def outbox_routes(runtime: RegionRuntime) -> list[Route]:
    """The routes of the outbox API, mounted by gateway/app.py."""

    def owned_unit_cells(cell: int | None) -> list[int]:
        rule = runtime.fence.rule
        owned = [c for c in runtime.owned_cells() if rule.cells[c].kind == CellKind.UNIT]
        if cell is None:
            return owned
        if cell not in rule.cells or rule.cells[cell].kind != CellKind.UNIT:
            raise NotFound(f"no unit cell {cell}")
        return [cell] if cell in owned else []

    async def failed(b: FailedCall) -> Any:
        now = now_ms()
        cells = owned_unit_cells(b.cell)
        steps: list[dict[str, Any]] = []
        for cell in cells:
            store = runtime.copies[cell]
            for row in await failed_outbox(store, b.limit):
                steps.append(
                    {
                        "cell": store.cell.name,
                        "order_id": str(row["order_id"]),
                        "step": row["step"],
                        "attempts": row["attempts"],
                        "last_error": row["last_error"],
                        "age_s": max(0, now - int(row["created_ms"])) // 1000,
                    }
                )
        names = [runtime.fence.rule.cells[c].name for c in cells]
        return {"region": runtime.name, "cells": names, "steps": steps[: b.limit]}

    async def retry(b: RetryCall) -> Any:
        order_id = int(b.order_id)
        try:
            route = route_order(runtime.fence.rule, order_id)
        except (ValueError, RoutingError) as exc:
            raise InvalidRequest(str(exc)) from exc
        if route.region != runtime.name:
            raise WrongRegion(
                f"cell {route.cell} is owned by {route.region}", owner=route.region, cell=route.cell
            )
        steps = await retry_outbox(runtime.copies[route.cell], order_id)
        return {"order_id": b.order_id, "reset": steps}

    routes = [
        (FAILED_PATH, internal_endpoint(FailedCall, failed)),
        (RETRY_PATH, internal_endpoint(RetryCall, retry)),
    ]
    return [Route(path, handler, methods=["POST"]) for path, handler in routes]
