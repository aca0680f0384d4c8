"""`GET /healthz` of a region: what it holds, acknowledges, forwards, holds and follows."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from unitrade.gateway.models import Health
from unitrade.gateway.routing import Dispatcher
from unitrade.region import RegionRuntime
from unitrade.web.responses import json_response


def health_router(runtime: RegionRuntime, dispatcher: Dispatcher) -> APIRouter:
    router = APIRouter()
    forwarder, holds = dispatcher.forwarder, dispatcher.holds

    @router.get("/healthz", tags=["operations"], responses={200: {"model": Health}})
    async def healthz() -> Response:
        rule = runtime.fence.rule
        names = {c: info.name for c, info in rule.cells.items()}
        return json_response(
            {
                "status": "ok",
                "region": runtime.name,
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
                "positions": {
                    names[c]: store.position for c, store in runtime.copies.stores.items()
                },
                # This copy's changelog holds the positions after these (retention).
                "trimmed": {
                    names[c]: store.trimmed_position for c, store in runtime.copies.stores.items()
                },
                "replication": runtime.replicator.status(),
                "followers": runtime.replicator.followers.body(names),
                "flow": runtime.flow.status(),
            }
        )

    return router
