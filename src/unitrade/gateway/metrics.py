"""Prometheus metrics of a region, at `/metrics`.

A collector reads the region's state when scraped, so the request path pays nothing for
metrics: replication lag per stream (positions and ms), how long since its owner answered
and whether it is stale, applied rows, stream errors and rebuilds, each cell copy's
changelog position, rows kept and trim point, requests forwarded and the lost answers of
forwarded writes, the rule version each component has acknowledged, writes held while
a cell was banned, flow control (`unitrade_flow_*`, flow/metrics.py), and the sale tokens
and segments this process issued and holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from unitrade.flow.metrics import flow_families
from unitrade.gateway.routing import Dispatcher
from unitrade.region import RegionRuntime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_REFRESH_AGE_S = 0.1


class RegionCollector(Collector):
    def __init__(self, runtime: RegionRuntime, dispatcher: Dispatcher) -> None:
        self.runtime = runtime
        self.forwarder = dispatcher.forwarder
        self.holds = dispatcher.holds

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        region = self.runtime.name
        stream = ["region", "cell", "source"]
        lag_positions = GaugeMetricFamily(
            "unitrade_replication_lag_positions",
            "Changelog positions the owner has and this copy has not applied yet",
            labels=stream,
        )
        lag_ms = GaugeMetricFamily(
            "unitrade_replication_lag_ms",
            "Age of the oldest change not applied yet, on the owner's clock",
            labels=stream,
        )
        heard = GaugeMetricFamily(
            "unitrade_replication_heard_ms_ago",
            "Milliseconds since the cell's owner last answered a pull of this stream",
            labels=stream,
        )
        stale = GaugeMetricFamily(
            "unitrade_replication_stale",
            "1 when the owner has not answered a pull of this stream for over 5 s (its lag "
            "figures are then old), else 0",
            labels=stream,
        )
        applied = CounterMetricFamily(
            "unitrade_replication_applied_rows",
            "Changelog rows applied to this copy since the region started",
            labels=stream,
        )
        errors = CounterMetricFamily(
            "unitrade_replication_errors", "Failed pulls or applies of a stream", labels=stream
        )
        rebootstraps = CounterMetricFamily(
            "unitrade_replication_rebootstraps",
            "Copies rebuilt from a snapshot because the owner had trimmed past them",
            labels=stream,
        )
        lease = self.runtime.lease.status()
        for family, value in (
            (
                GaugeMetricFamily(
                    "unitrade_write_lease_valid",
                    "1 while this region holds a write lease (it writes its cells only then)",
                    labels=["region"],
                ),
                1 if lease["valid"] else 0,
            ),
            (
                GaugeMetricFamily(
                    "unitrade_write_lease_remaining_ms",
                    "How long this region's write lease lasts without another renewal",
                    labels=["region"],
                ),
                lease["remaining_ms"],
            ),
            (
                CounterMetricFamily(
                    "unitrade_write_lease_failures",
                    "Renewals of the write lease that failed or were refused",
                    labels=["region"],
                ),
                lease["failures"] + lease["refusals"],
            ),
        ):
            family.add_metric([region], value)
            yield family
        for s in self.runtime.replicator.status():
            labels = [region, s["cell_name"], s["source"]]
            lag_positions.add_metric(labels, s["lag_positions"])
            lag_ms.add_metric(labels, s["lag_ms"])
            heard.add_metric(labels, s["heard_ms_ago"])
            stale.add_metric(labels, 1 if s["stale"] else 0)
            applied.add_metric(labels, s["applied_rows"])
            errors.add_metric(labels, s["errors"])
            rebootstraps.add_metric(labels, s["rebootstraps"])
        position = GaugeMetricFamily(
            "unitrade_cell_position",
            "Last changelog position of this region's copy of a cell",
            labels=["region", "cell", "owned"],
        )
        copy = ["region", "cell", "owned"]
        kept = GaugeMetricFamily(
            "unitrade_changelog_rows",
            "Changelog rows this region's copy of a cell holds (after its trim point)",
            labels=copy,
        )
        trimmed = GaugeMetricFamily(
            "unitrade_changelog_trimmed_position",
            "Changelog positions up to this one are trimmed from this region's copy",
            labels=copy,
        )
        trimmed_rows = CounterMetricFamily(
            "unitrade_changelog_trimmed_rows",
            "Changelog rows this region trimmed from its copy since it started",
            labels=copy,
        )
        rule = self.runtime.fence.rule
        for cell, store in self.runtime.copies.stores.items():
            owned = "true" if rule.owner_of(cell) == region else "false"
            labels = [region, rule.cells[cell].name, owned]
            position.add_metric(labels, store.position)
            kept.add_metric(labels, max(0, store.position - store.trimmed_position))
            trimmed.add_metric(labels, store.trimmed_position)
            trimmed_rows.add_metric(labels, self.runtime.replicator.trimmed_rows[cell])
        forwarded = CounterMetricFamily(
            "unitrade_forwarded_requests",
            "Client requests forwarded to an owner region",
            labels=["region"],
        )
        forwarded.add_metric([region], self.forwarder.forwarded)
        rule_version = GaugeMetricFamily(
            "unitrade_rule_version", "Version of the rule in force", labels=["region"]
        )
        rule_version.add_metric([region], rule.version)
        acked = GaugeMetricFamily(
            "unitrade_rule_acked_version",
            "Rule version a component acknowledges as in force",
            labels=["region", "component"],
        )
        for component, version in self.runtime.acked().items():
            acked.add_metric([region, component], version)
        holds = self.holds
        held = GaugeMetricFamily(
            "unitrade_held_writes", "Writes to a banned cell held now", labels=["region"]
        )
        held.add_metric([region], holds.held)
        held_total = CounterMetricFamily(
            "unitrade_held_writes_total", "Writes held while a cell was banned", labels=["region"]
        )
        held_total.add_metric([region], holds.held_total)
        refused = CounterMetricFamily(
            "unitrade_write_banned_refusals",
            "Writes answered write_banned after the hold bound",
            labels=["region"],
        )
        refused.add_metric([region], holds.refused_total)
        fallbacks = CounterMetricFamily(
            "unitrade_catalog_owner_reads",
            "SKUs this region's copy of the global cell lacked, asked of its owner",
            labels=["region"],
        )
        fallbacks.add_metric([region], self.runtime.catalog.fallbacks)
        yield from (lag_positions, lag_ms, heard, stale, applied, errors, position, forwarded)
        yield rule_version
        worker = GaugeMetricFamily(
            "unitrade_worker_leader",
            "Which process of the region answered this scrape (its `worker`), and 1 if it "
            "leads the region (replication into it, retention and the outbox are counted "
            "by the leader only); every other figure is this process's own",
            labels=["region", "worker"],
        )
        worker.add_metric([region, str(self.runtime.worker)], int(self.runtime.leading))
        yield worker
        yield from self._lost_answers(region)
        yield from (acked, held, held_total, refused, fallbacks)
        yield from (rebootstraps, kept, trimmed, trimmed_rows)
        yield from self._retention(region)
        yield from flow_families(self.runtime.flow)
        yield from self._sales(region)

    def _lost_answers(self, region: str) -> Iterator[CounterMetricFamily]:
        """Forwarded writes whose answer was lost, and what became of them
        (gateway/resend.py)."""
        forwarder = self.forwarder
        for name, text, value in (
            (
                "unitrade_forward_lost_answers",
                "Forwarded writes that left and got no answer from the owner region",
                forwarder.lost,
            ),
            (
                "unitrade_forward_resends",
                "Resends of forwarded writes whose answer was lost, with the same key",
                forwarder.resent,
            ),
            (
                "unitrade_forward_resolved",
                "Forwarded writes whose lost answer a resend resolved",
                forwarder.resolved,
            ),
            (
                "unitrade_outcome_unknown",
                "Writes this gateway answered 504 outcome_unknown",
                forwarder.unknown,
            ),
            (
                "unitrade_forward_keys_added",
                "Forwarded writes given an idempotency key by this gateway",
                forwarder.keys_added,
            ),
        ):
            family = CounterMetricFamily(name, text, labels=["region"])
            family.add_metric([region], value)
            yield family

    def _retention(self, region: str) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """What the retention sweep found and did (services/retention.py); the figures are
        from the last sweep, not counted per scrape."""
        sweeper = self.runtime.retention
        cells = self.runtime.fence.rule.cells
        kept = GaugeMetricFamily(
            "unitrade_retained_rows",
            "Rows of a swept table in an owned cell copy, at the last retention sweep",
            labels=["region", "cell", "table"],
        )
        for (cell, table), rows in sorted(sweeper.kept_rows.items()):
            kept.add_metric([region, cells[cell].name, table], rows)
        deleted = CounterMetricFamily(
            "unitrade_retention_deleted_rows",
            "Rows the retention sweep deleted since the region started",
            labels=["region", "cell", "table"],
        )
        for (cell, table), rows in sorted(sweeper.deleted_rows.items()):
            deleted.add_metric([region, cells[cell].name, table], rows)
        failed = GaugeMetricFamily(
            "unitrade_outbox_failed_steps",
            "Outbox steps of an owned cell that failed for good (unitrade outbox failed)",
            labels=["region", "cell"],
        )
        for cell, steps in sorted(sweeper.failed_steps.items()):
            failed.add_metric([region, cells[cell].name], steps)
        sweeps = CounterMetricFamily(
            "unitrade_retention_sweeps", "Retention sweeps done", labels=["region"]
        )
        sweeps.add_metric([region], sweeper.sweeps)
        yield from (kept, deleted, failed, sweeps)

    def _sales(self, region: str) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Sale tokens this process issued and refused, and the segments of the sales'
        quotas it took, gave back and holds (services/sale_tokens.py)."""
        tokens = self.runtime.tokens
        issued = CounterMetricFamily(
            "unitrade_sale_tokens_issued",
            "Sale tokens this region's process issued to buyers",
            labels=["region"],
        )
        issued.add_metric([region], tokens.issued)
        refused = CounterMetricFamily(
            "unitrade_sale_tokens_refused",
            "Sale token requests this region's process refused, by error",
            labels=["region", "error"],
        )
        for code, count in sorted(tokens.refused.items()):
            refused.add_metric([region, code], count)
        segments = CounterMetricFamily(
            "unitrade_sale_segments",
            "Segments of sales' token quotas: granted to this process, given back by it, "
            "dropped (not given back: their untaken tokens are lost)",
            labels=["region", "event"],
        )
        segments.add_metric([region, "granted"], tokens.segments_granted)
        segments.add_metric([region, "given_back"], tokens.segments_given_back)
        segments.add_metric([region, "dropped"], tokens.segments_dropped)
        left = GaugeMetricFamily(
            "unitrade_sale_segment_tokens_left",
            "Tokens left in the segment this process issues from, per sale",
            labels=["region", "sale"],
        )
        for sale_id, held in sorted(tokens.held().items()):
            left.add_metric([region, sale_id], held["left"])
        yield from (issued, refused, segments, left)


def metrics_endpoint(
    runtime: RegionRuntime, dispatcher: Dispatcher
) -> Callable[[Request], Awaitable[Response]]:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RegionCollector(runtime, dispatcher))

    async def metrics(_request: Request) -> Response:
        if runtime.shared:
            # Other processes of the region write the copies too: their positions as the
            # databases have them (a read shared with pulls of the last moment).
            stores = runtime.copies.stores.values()
            await asyncio.gather(*(s.refresh(METRICS_REFRESH_AGE_S) for s in stores))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    return metrics
