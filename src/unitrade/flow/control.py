"""A region's flow control, put together: what the gateway asks before it lets a request
in, what the services ask before an order or an admin write, and the breakers of its
calls to other regions (docs/architecture.md, Flow control)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping

from unitrade.flow.breaker import BreakerBoard
from unitrade.flow.limits import RateLimits
from unitrade.flow.overload import OverloadGuard
from unitrade.flow.redis_limiter import RedisSchedules
from unitrade.topology.flow_rules import FlowConfig, FlowRules
from unitrade.topology.probes import is_probe_buyer

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Admission:
    """A request let into the gateway: `done()` once it is answered."""

    __slots__ = ("client", "flow", "started")

    def __init__(self, flow: FlowControl, client: bool) -> None:
        self.flow = flow
        self.client = client
        self.started = flow.overload.clock()
        flow.overload.in_flight += 1
        if client:
            flow.limits.in_flight += 1

    def done(self) -> None:
        self.flow.overload.in_flight -= 1
        if self.client:
            self.flow.limits.in_flight -= 1
        self.flow.overload.completed(self.started)


class ClientAddress:
    """The client's IP for the `ip` limit: the connection's peer, or, when the peer is a
    trusted proxy and `client_ip_header` is set, the right-most address in that header
    that is not a trusted proxy (the one the proxies' own hops cannot have forged)."""

    def __init__(self, header: str | None, proxies: list[str]) -> None:
        self.header = header
        self.proxies: list[IpNetwork] = [ipaddress.ip_network(p, strict=False) for p in proxies]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def of(self, peer: str | None, headers: Mapping[str, str]) -> str:
        peer = peer or "unknown"
        if self.header is None or not self._trusted(peer):
            return peer
        hops = [h.strip() for h in headers.get(self.header, "").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # a hop that is no address: believe nothing of the header
        return peer


class FlowControl:
    def __init__(
        self,
        region: str,
        config: FlowConfig,
        rules: Callable[[], FlowRules],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.region = region
        self.rules = rules
        self.shared = (
            None
            if config.storage == "memory"
            else RedisSchedules(config.storage, config.storage_timeout_ms / 1000)
        )
        self.limits = RateLimits(region, rules, self.shared, config.key_prefix, clock)
        self.overload = OverloadGuard(region, rules, clock)
        self.breakers = BreakerBoard(lambda: rules().breakers, clock)
        self.address = ClientAddress(config.client_ip_header, config.trusted_proxies)

    def start(self) -> None:
        self.overload.loop.start()

    async def stop(self) -> None:
        await self.overload.loop.stop()
        if self.shared is not None:
            await self.shared.aclose()

    # -- the gateway ----------------------------------------------------------------------

    async def admit_client(self, ip: str, buyer_id: int | None) -> Admission:
        """A client's request at the gateway it called, before any forwarding: shed when
        the region is overloaded (503 overloaded), else the ip, buyer and region limits
        (429 rate_limited). The caller calls `done()` on the answer."""
        self.overload.check()
        wanted = [("ip", ip)]
        if buyer_id is not None:
            wanted.append(("buyer", str(buyer_id)))
        wanted.append(("region", "all"))
        self.limits.check_concurrency()
        await self.limits.admit(wanted)
        self.limits.check_concurrency()  # a queueing limit may have made it wait
        return Admission(self, client=True)

    def admit_forwarded(self) -> Admission:
        """A client's request another region forwarded here (signed): its limits were
        applied where it arrived; only overload sheds it."""
        self.overload.check()
        return Admission(self, client=False)

    # -- the services ---------------------------------------------------------------------

    async def admit_order(self, buyer_id: int, skus: list[str]) -> None:
        """An order submission where it is served: order_buyer, then order_sku per SKU
        (a hot SKU refused alone). The health checker's probe orders are not limited."""
        if is_probe_buyer(buyer_id):
            return
        wanted = [("order_buyer", str(buyer_id))]
        wanted += [("order_sku", sku) for sku in sorted(set(skus))]
        await self.limits.admit(wanted)

    async def admit_admin_write(self) -> None:
        await self.limits.admit([("admin_writes", "all")])

    def status(self) -> dict[str, object]:
        rules = self.rules()
        return {
            "version": rules.version,
            "storage": "memory" if self.shared is None else "redis",
            "switches": list(rules.switches),
            "limits": self.limits.status(),
            "storage_errors": self.limits.storage_errors,
            "overload": self.overload.status(),
            "breakers": [b.status() for b in self.breakers.all()],
        }
