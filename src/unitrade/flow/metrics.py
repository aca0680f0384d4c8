"""`unitrade_flow_*` metrics of a region, read from its FlowControl when /metrics is scraped
(gateway/metrics.py): the request path only increments integers."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from unitrade.flow.breaker import STATE_VALUES, BreakerState
from unitrade.flow.control import FlowControl
from unitrade.topology.flow_rules import LIMITS, SWITCHES

Family = GaugeMetricFamily | CounterMetricFamily


def flow_families(flow: FlowControl) -> Iterator[Family]:
    region = flow.region
    rules = flow.rules()
    limits = flow.limits
    labels = ["region", "limit"]
    families: list[tuple[Family, dict[str, int]]] = [
        (
            CounterMetricFamily(
                "unitrade_flow_admitted", "Requests a rate limit admitted", labels=labels
            ),
            limits.admitted,
        ),
        (
            CounterMetricFamily(
                "unitrade_flow_refused",
                "Requests a rate limit refused (429 rate_limited)",
                labels=labels,
            ),
            limits.refused,
        ),
        (
            CounterMetricFamily(
                "unitrade_flow_queued",
                "Requests a queueing limit admitted after they waited their turn",
                labels=labels,
            ),
            limits.queued,
        ),
        (
            GaugeMetricFamily(
                "unitrade_flow_waiting", "Requests waiting in a queueing limit now", labels=labels
            ),
            limits.waiting,
        ),
    ]
    for family, counts in families:
        for name in LIMITS:
            family.add_metric([region, name], counts.get(name, 0))
        yield family
    shed = CounterMetricFamily(
        "unitrade_flow_shed",
        "Requests shed by overload protection (503 overloaded), by reason",
        labels=["region", "reason"],
    )
    for reason in ("loop_delay", "in_flight_max"):
        shed.add_metric([region, reason], flow.overload.shed.get(reason, 0))
    yield shed
    for name, text, value in (
        (
            "unitrade_flow_in_flight",
            "Requests in this region's gateway now",
            flow.overload.in_flight,
        ),
        (
            "unitrade_flow_loop_delay_ms",
            "How late this process's event loop runs (worst of the last 200 ms)",
            flow.overload.loop.delay_s() * 1000,
        ),
        (
            "unitrade_flow_capacity",
            "Requests in flight when the region runs best (max qps x min latency)",
            flow.overload.capacity(),
        ),
        (
            "unitrade_flow_rules_version",
            "The rule version at which the flow rules in force last changed",
            rules.version,
        ),
    ):
        gauge = GaugeMetricFamily(name, text, labels=["region"])
        gauge.add_metric([region], value)
        yield gauge
    errors = CounterMetricFamily(
        "unitrade_flow_storage_errors",
        "Limit checks Redis did not answer in time, made in this process instead",
        labels=["region"],
    )
    errors.add_metric([region], limits.storage_errors)
    yield errors
    switch = GaugeMetricFamily(
        "unitrade_flow_switch", "1 while a degradation switch is on", labels=["region", "switch"]
    )
    for name in SWITCHES:
        switch.add_metric([region, name], 1 if rules.switch_on(name) else 0)
    yield switch
    yield from _breakers(flow)


def _breakers(flow: FlowControl) -> Iterator[Family]:
    labels = ["region", "target", "call"]
    state = GaugeMetricFamily(
        "unitrade_flow_breaker_state",
        "A circuit breaker's state: 0 closed, 1 open, 2 half-open",
        labels=labels,
    )
    counters = {
        "calls": CounterMetricFamily(
            "unitrade_flow_breaker_calls", "Calls a breaker let through", labels=labels
        ),
        "failed": CounterMetricFamily(
            "unitrade_flow_breaker_failed", "Calls that failed (no answer, or 5xx)", labels=labels
        ),
        "slow": CounterMetricFamily(
            "unitrade_flow_breaker_slow", "Calls slower than slow_ms", labels=labels
        ),
        "rejected": CounterMetricFamily(
            "unitrade_flow_breaker_rejected",
            "Calls failed fast while the breaker was open (503 circuit_open)",
            labels=labels,
        ),
        "opened": CounterMetricFamily(
            "unitrade_flow_breaker_opened", "Times the breaker opened", labels=labels
        ),
    }
    for breaker in flow.breakers.all():
        key = [flow.region, breaker.region, breaker.call]
        state.add_metric(key, STATE_VALUES[BreakerState(breaker.status()["state"])])
        counters["calls"].add_metric(key, breaker.calls_total)
        counters["failed"].add_metric(key, breaker.failed_total)
        counters["slow"].add_metric(key, breaker.slow_total)
        counters["rejected"].add_metric(key, breaker.rejected_total)
        counters["opened"].add_metric(key, breaker.opened_total)
    yield state
    yield from counters.values()
