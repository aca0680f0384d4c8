"""Flow rules: the rate limits, overload protection, circuit breakers and degradation
switches a region applies (docs/architecture.md, Flow control). They are part of the rule
(topology/rule.py), so that every change is a new rule version, published by the control
plane, pushed to every region and acknowledged like an owner change, persisted with the
rule in `rule.json` and in the control plane's rule history. Their first values come from
the topology file's `[flow]` table; after the first start they change only through the
control plane (`unitrade limits set`, `unitrade degrade`).

This module is data and validation only; `unitrade.flow` applies the rules.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SKU_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OVERRIDES_MAX = 1_000
RATE_PER_S_MAX = 10_000_000.0


class LimitMode(StrEnum):
    REJECT = "reject"  # refuse at once when the rate is used up
    WARM_UP = "warm_up"  # a cold limit admits a third of its rate, rising to all of it
    QUEUE = "queue"  # a burst waits its turn, up to queue_ms_max, at most queue_max waiting


# Every limit a region applies, and where (docs/architecture.md, Flow control).
LIMITS: dict[str, str] = {
    "ip": "requests per client IP, at the gateway a client calls, before any forwarding",
    "buyer": "requests per buyer token, at the gateway a client calls, before any forwarding",
    "region": "requests a region's gateway admits in all (rate, and concurrency_max at once)",
    "order_buyer": "order submissions (orders and checkouts) per buyer, where they are served",
    "order_sku": "order submissions per SKU (hot SKUs are limited on their own), where served",
    "admin_writes": "admin writes (products, stock, token revocation, sales and coupons), "
    "where they are served",
}

# Degradation switches: each is named after what it turns off when it is on.
SWITCHES: dict[str, str] = {
    "order_list_owner_reads": "buyers' order lists are read from the region called (its "
    "replica, which may lag), never forwarded to the owner region",
    "catalog_owner_reads": "a SKU missing from a region's replica of the catalog is not asked "
    "of the global cell's owner: it is unknown there until replication brings it",
    "cart_writes": "adding and removing cart lines is refused (503 degraded); carts are still "
    "read and checked out",
    "admin_writes": "admin product and stock writes, and creating sales and coupons, are "
    "refused (503 degraded); token revocation still works",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limit(_Strict):
    """One rate limit. `rate_per_s` is the sustained rate per key; `burst` how many a key
    may use at once after being idle (default: one second's worth). A limit that is not
    `enabled` admits everything and counts nothing."""

    enabled: bool = True
    rate_per_s: Annotated[float, Field(gt=0, le=RATE_PER_S_MAX)]
    burst: Annotated[int | None, Field(ge=1, le=10_000_000)] = None
    mode: LimitMode = LimitMode.REJECT
    # warm_up: from cold (idle for warm_up_s) the limit admits rate / cold_factor, rising
    # to the full rate over about warm_up_s of traffic near it (Guava's SmoothWarmingUp).
    warm_up_s: Annotated[float, Field(gt=0, le=3_600)] = 10.0
    cold_factor: Annotated[float, Field(ge=1, le=10)] = 3.0
    # queue: a request whose turn comes within queue_ms_max waits for it; at most
    # queue_max wait at once per serving process.
    queue_ms_max: Annotated[int, Field(ge=1, le=10_000)] = 500
    queue_max: Annotated[int, Field(ge=1, le=100_000)] = 1_000
    # region only: requests in the gateway at once (0: no bound), per serving process.
    concurrency_max: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    # order_sku only: the rate of a hot SKU of its own (a hot-parameter limit).
    overrides: Annotated[dict[str, float], Field(max_length=OVERRIDES_MAX)] = {}

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, float]) -> dict[str, float]:
        for sku, rate in value.items():
            if not SKU_KEY.match(sku):
                raise ValueError(f"{sku!r} is not a SKU")
            if not 0 < rate <= RATE_PER_S_MAX:
                raise ValueError(f"{sku}: a rate is above 0 and at most {RATE_PER_S_MAX:g}")
        return dict(sorted(value.items()))

    @property
    def burst_size(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate_per_s))

    def rate_for(self, value: str) -> float:
        return self.overrides.get(value, self.rate_per_s)

    def burst_for(self, rate_per_s: float) -> int:
        """The burst at `rate_per_s`: the limit's own, or one second's worth of a hot
        value's override rate."""
        if rate_per_s == self.rate_per_s:
            return self.burst_size
        return max(1, math.ceil(rate_per_s))


DEFAULT_LIMITS: dict[str, Limit] = {
    # Generous: a shop sets its own for a sale (docs/operations.md); the defaults only stop
    # a runaway client and leave ordinary traffic, the tests and the demo alone.
    "ip": Limit(rate_per_s=20_000, burst=40_000),
    "buyer": Limit(rate_per_s=1_000, burst=2_000),
    "region": Limit(rate_per_s=100_000, burst=100_000, concurrency_max=10_000),
    "order_buyer": Limit(rate_per_s=200, burst=400),
    "order_sku": Limit(rate_per_s=50_000, burst=50_000),
    "admin_writes": Limit(rate_per_s=1_000, burst=2_000),
}


class Overload(_Strict):
    """Overload protection (unitrade.flow.overload): a region sheds new client requests
    (503 overloaded) while its event loop is late by more than loop_delay_ms_max and it has
    more requests in flight than it completes within its best latency; and always past
    in_flight_max (0: no hard bound)."""

    enabled: bool = True
    loop_delay_ms_max: Annotated[int, Field(ge=1, le=60_000)] = 100
    in_flight_max: Annotated[int, Field(ge=0, le=1_000_000)] = 0


class Breakers(_Strict):
    """Circuit breakers on calls to other regions (center and catalog RPC, forwarding): a
    breaker opens when, over the last window_ms with at least calls_min calls, the share of
    failed calls reaches error_ratio_max or the share of calls slower than slow_ms reaches
    slow_ratio_max; it fails fast for open_ms, then lets `probes` calls through
    (half-open): all good closes it, one bad opens it again."""

    enabled: bool = True
    window_ms: Annotated[int, Field(ge=100, le=600_000)] = 2_000
    calls_min: Annotated[int, Field(ge=1, le=100_000)] = 5
    error_ratio_max: Annotated[float, Field(gt=0, le=1)] = 0.5
    slow_ratio_max: Annotated[float, Field(gt=0, le=1)] = 1.0
    slow_ms: Annotated[int, Field(ge=1, le=600_000)] = 3_000
    open_ms: Annotated[int, Field(ge=10, le=600_000)] = 5_000
    probes: Annotated[int, Field(ge=1, le=100)] = 1


class FlowRules(_Strict):
    """The flow part of a rule. `version` is the rule version at which it last changed:
    the "limits version" `unitrade status` shows."""

    version: Annotated[int, Field(ge=1)] = 1
    limits: dict[str, Limit] = dict(DEFAULT_LIMITS)
    switches: Annotated[list[str], Field(max_length=len(SWITCHES))] = []
    overload: Overload = Overload()
    breakers: Breakers = Breakers()

    @field_validator("limits")
    @classmethod
    def _limits(cls, value: dict[str, Limit]) -> dict[str, Limit]:
        unknown = sorted(set(value) - set(LIMITS))
        if unknown:
            raise ValueError(f"unknown limits {unknown}; the limits are {sorted(LIMITS)}")
        for name, limit in value.items():
            check_limit(name, limit)
        return {name: value.get(name, DEFAULT_LIMITS[name]) for name in LIMITS}

    @field_validator("switches")
    @classmethod
    def _switches(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SWITCHES))
        if unknown:
            raise ValueError(f"unknown switches {unknown}; the switches are {sorted(SWITCHES)}")
        return sorted(set(value))

    def switch_on(self, switch: str) -> bool:
        return switch in self.switches

    def limit(self, name: str) -> Limit:
        return self.limits[name]

    def with_limit(self, name: str, changes: dict[str, Any], version: int) -> FlowRules:
        """These rules with limit `name` changed by `changes` (field -> value); a rate given
        without a burst resets the burst to one second's worth. ValueError naming the
        field for a bad name or value."""
        if name not in LIMITS:
            raise ValueError(f"unknown limit {name!r}; the limits are {sorted(LIMITS)}")
        fields = self.limits[name].model_dump()
        if "rate_per_s" in changes and "burst" not in changes:
            fields["burst"] = None
        limit = Limit.model_validate({**fields, **changes})
        check_limit(name, limit)
        return self.model_copy(update={"limits": {**self.limits, name: limit}, "version": version})

    def with_switch(self, switch: str, on: bool, version: int) -> FlowRules:
        if switch not in SWITCHES:
            raise ValueError(f"unknown switch {switch!r}; the switches are {sorted(SWITCHES)}")
        switches = set(self.switches)
        if on:
            switches.add(switch)
        else:
            switches.discard(switch)
        return self.model_copy(update={"switches": sorted(switches), "version": version})

    def with_section(self, section: str, changes: dict[str, Any], version: int) -> FlowRules:
        """These rules with `overload` or `breakers` changed by `changes`."""
        current: BaseModel
        if section == "overload":
            current = self.overload
            changed: BaseModel = Overload.model_validate({**current.model_dump(), **changes})
        elif section == "breakers":
            current = self.breakers
            changed = Breakers.model_validate({**current.model_dump(), **changes})
        else:
            raise ValueError(f"unknown section {section!r}: overload or breakers")
        return self.model_copy(update={section: changed, "version": version})

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def check_limit(name: str, limit: Limit) -> None:
    """ValueError for settings that mean nothing on this limit."""
    if limit.concurrency_max and name != "region":
        raise ValueError(f"{name}: concurrency_max is a setting of the region limit only")
    if limit.overrides and name != "order_sku":
        raise ValueError(f"{name}: overrides (per-value rates) belong to order_sku only")


class FlowConfig(_Strict):
    """`[flow]` in the topology file: how limits are kept (`storage`: `memory`, in each
    serving process, or a `redis://` URL shared by every process of a region), which
    header names the client's IP behind a trusted proxy, and the first flow rules."""

    storage: str = "memory"
    # Keys in Redis start with this, then the region's name (regions may share a Redis).
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "unitrade"
    # How long a check may wait for Redis before the process falls back on its own.
    storage_timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = 50
    # Behind a load balancer: the header (e.g. x-forwarded-for) that names the client's
    # IP, believed only from the peers listed in trusted_proxies.
    client_ip_header: Annotated[str | None, Field(pattern=r"^[a-z0-9-]{1,64}$")] = None
    trusted_proxies: Annotated[list[str], Field(max_length=64)] = []
    limits: dict[str, dict[str, Any]] = {}
    switches: list[str] = []
    overload: Overload = Overload()
    breakers: Breakers = Breakers()

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must be memory or a redis:// URL, got {value!r}")
        return value

    @field_validator("client_ip_header")
    @classmethod
    def _header(cls, value: str | None) -> str | None:
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _rules(self) -> FlowConfig:
        if self.client_ip_header is not None and not self.trusted_proxies:
            raise ValueError("client_ip_header needs trusted_proxies: whom to believe it from")
        self.rules(1)  # every problem named now, at load time
        return self

    def rules(self, version: int) -> FlowRules:
        rules = FlowRules(version=version, switches=list(self.switches))
        for name, changes in self.limits.items():
            rules = rules.with_limit(name, dict(changes), version)
        return rules.model_copy(update={"overload": self.overload, "breakers": self.breakers})
