"""`GET /healthz` of a region: what it holds, acknowledges, forwards, holds and follows.

In a region of many processes (`workers`) any process may answer; it says which
(`worker`, `leader`) and tells the truth about the region: positions, trim points,
quarantine and followers are read from the databases (every process writes them), the
replication streams are the leader's (it alone follows the other regions: its own, or its
last report in the `workers` table with its age), and `processes` lists what every process
last reported of itself (storage/workers.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from unitrade.gateway.models import Health
from unitrade.gateway.routing import Dispatcher
from unitrade.region import RegionRuntime
from unitrade.replication.replicator import STALE_AFTER_S
from unitrade.storage import quarantine
from unitrade.storage import workers as workers_table
from unitrade.storage.store import CellStore, now_ms
from unitrade.web.responses import json_response


def health_router(runtime: RegionRuntime, dispatcher: Dispatcher) -> APIRouter:
    router = APIRouter()
    forwarder, holds = dispatcher.forwarder, dispatcher.holds

    @router.get("/healthz", tags=["operations"], responses={200: {"model": Health}})
    async def healthz() -> Response:
        rule = runtime.fence.rule
        names = {c: info.name for c, info in rule.cells.items()}
        stores = runtime.copies.stores
        body: dict[str, Any] = {
            "status": "ok",
            "region": runtime.name,
            "worker": runtime.worker,
            "workers": runtime.workers,
            "leader": runtime.leading,
            "development_secrets": runtime.config.development_secrets(),
            "rule_version": rule.version,
            "acked": runtime.acked(),
            "control": runtime.agent.status(),
            "lease": runtime.lease.status(),
            "quarantine": runtime.quarantine_summary(),
            "owned_cells": [names[c] for c in runtime.owned_cells()],
            "owners": {names[c]: owner for c, owner in sorted(rule.owners.items())},
            "banned": [names[c] for c in sorted(rule.banned)],
            "forwarded": forwarder.forwarded,
            "held": {
                "now": holds.held,
                "total": holds.held_total,
                "refused": holds.refused_total,
                "retried": forwarder.retried,
            },
            "lost_answers": {
                "lost": forwarder.lost,
                "resent": forwarder.resent,
                "resolved": forwarder.resolved,
                "unknown": forwarder.unknown,
                "keys_added": forwarder.keys_added,
            },
            "positions": {names[c]: store.position for c, store in stores.items()},
            # This copy's changelog holds the positions after these (retention).
            "trimmed": {names[c]: store.trimmed_position for c, store in stores.items()},
            "replication": runtime.replicator.status(),
            "followers": runtime.replicator.followers.body(names),
            "flow": runtime.flow.status(),
        }
        if runtime.shared:
            body.update(await _shared(runtime, names))
        return json_response(body)

    return router


async def _shared(runtime: RegionRuntime, names: dict[int, str]) -> dict[str, Any]:
    """What the region's processes share, read from the databases."""
    stores = runtime.copies.stores

    async def copy(store: CellStore) -> tuple[tuple[int, int], dict[str, int]]:
        return await asyncio.gather(store.read_meta(), quarantine.counts(store))

    cells = sorted(stores)
    copies = await asyncio.gather(*(copy(stores[c]) for c in cells))
    global_store = stores[runtime.fence.rule.global_cell]
    rows = await workers_table.read(global_store)
    now = now_ms()
    body: dict[str, Any] = {
        "positions": {names[c]: meta[0] for c, (meta, _q) in zip(cells, copies, strict=True)},
        "trimmed": {names[c]: meta[1] for c, (meta, _q) in zip(cells, copies, strict=True)},
        "quarantine": {
            names[c]: counts for c, (_m, counts) in zip(cells, copies, strict=True) if counts
        },
        "followers": await runtime.replicator.followers.shared_body(runtime.copies, names),
        "processes": [row.body(now) for row in rows],
    }
    if not runtime.leading:
        leaders = [r for r in rows if r.leader and r.status.get("replication") is not None]
        leader = max(leaders, key=lambda r: r.updated_ms, default=None)
        body["replication"] = (
            [] if leader is None else _aged(leader.status["replication"], now - leader.updated_ms)
        )
        body["replication_from"] = (
            None
            if leader is None
            else {"worker": leader.worker, "reported_ms_ago": max(0, now - leader.updated_ms)}
        )
    else:
        body["replication_from"] = {"worker": runtime.worker, "reported_ms_ago": 0}
    return body


def _aged(streams: list[dict[str, Any]], age_ms: int) -> list[dict[str, Any]]:
    """The leader's streams as of its report, `age_ms` ago: heard that much longer ago."""
    aged = []
    for stream in streams:
        heard = int(stream.get("heard_ms_ago", 0)) + max(0, age_ms)
        aged.append({**stream, "heard_ms_ago": heard, "stale": heard > STALE_AFTER_S * 1000})
    return aged
