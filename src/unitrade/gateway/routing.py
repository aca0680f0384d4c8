"""Where a public request is served: the one routing implementation of the gateway.

Every public endpoint is declared once with its *home*: a pure function of the rule, the
caller and the request's path parameters giving the cell and owner region of what the
request touches (the buyer's cell, the cell carried in an order ID, the global cell), or
None when it is served wherever it arrives. The edge uses it to forward a request before
the framework parses anything; the handler uses the same function, through the same
`Dispatcher.run` loop, when the rule moved while the request was on its way.

`Dispatcher.run` holds writes to a banned cell, serves locally when this region owns the
cell, forwards once to the owner otherwise, and routes again when a fence refused the write
(`write_banned` / `wrong_region`: nothing was applied) within the request's hold deadline.
A signed forwarded request whose cell this region does not own is refused, never forwarded
again: a request crosses at most one hop even while regions disagree about the rule.
A forwarded write whose answer was lost is sent again where that is a replay, within a
bounded window (gateway/resend.py), before the client is told 504 `outcome_unknown`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response
from starlette.routing import compile_path

from unitrade.errors import (
    CircuitOpen,
    Forbidden,
    OutcomeUnknown,
    RegionUnavailable,
    UnitradeError,
    WriteBanned,
    WrongRegion,
)
from unitrade.flow.switches import check_switch
from unitrade.gateway.forward import (
    RETRYABLE,
    RULE_VERSION_HEADER,
    Forwarder,
    error_code,
    is_write,
)
from unitrade.gateway.hold import Holds
from unitrade.gateway.resend import RESOLVE_S, Lost, Resend, keyed_body, unresolved
from unitrade.planted import WRITE_BANNED, planted
from unitrade.topology.order_id import parse_order_id
from unitrade.topology.probes import PROBE_SKU
from unitrade.topology.rule import Route, RoutingError, Rule, route_buyer, route_cell, route_order
from unitrade.topology.rule_view import RuleView
from unitrade.web.tokens import Principal

# unitrade/planted.py: writes to a banned cell are not held (the verifier's test).
_IGNORE_BANS = planted(WRITE_BANNED)


@dataclass(frozen=True)
class Caller:
    principal: Principal | None  # None for a public read without a token
    forwarded_from: str | None  # the region that forwarded this request, if signed

    @property
    def buyer_id(self) -> int:
        if self.principal is None or self.principal.buyer_id is None:
            raise Forbidden("this endpoint needs a buyer token, not the admin token")
        return self.principal.buyer_id

    @property
    def admin(self) -> bool:
        return self.principal is not None and self.principal.admin


# (rule, caller, path parameters, query string) -> the cell and owner, or None.
Home = Callable[[Rule, Caller, Mapping[str, str], str], Route | None]


def buyer_home(rule: Rule, who: Caller, _params: Mapping[str, str], _query: str) -> Route | None:
    principal = who.principal
    if principal is None or principal.buyer_id is None:
        return None  # the handler answers 401 / 403
    return route_buyer(rule, principal.buyer_id)


def order_home(rule: Rule, who: Caller, params: Mapping[str, str], _query: str) -> Route | None:
    if who.principal is None or who.principal.buyer_id is None:
        return None
    try:
        return route_order(rule, parse_order_id(params["order_id"]))
    except (KeyError, ValueError, RoutingError):
        return None  # the handler answers 404


def order_list_home(rule: Rule, who: Caller, params: Mapping[str, str], query: str) -> Route | None:
    """A buyer's order list at the owner of the buyer's cell, unless the switch
    order_list_owner_reads is on: then from the replica of the region called."""
    if rule.flow.switch_on("order_list_owner_reads"):
        return None
    return buyer_home(rule, who, params, query)


def order_read_home(rule: Rule, who: Caller, params: Mapping[str, str], query: str) -> Route | None:
    """An order read at its owner, unless it asks for this region's replica."""
    if "consistency=replica" in query:
        return None
    return order_home(rule, who, params, query)


def global_owner_for_admin(
    rule: Rule, who: Caller, _params: Mapping[str, str], _query: str
) -> Route | None:
    return route_cell(rule, rule.global_cell) if who.admin else None


def center_home(rule: Rule, who: Caller, _params: Mapping[str, str], _query: str) -> Route | None:
    """A buyer's call on the center cell (a coupon claim): served at the cell's owner."""
    if who.principal is None or who.principal.buyer_id is None:
        return None
    return route_cell(rule, rule.center_cell)


def center_owner_for_admin(
    rule: Rule, who: Caller, _params: Mapping[str, str], _query: str
) -> Route | None:
    return route_cell(rule, rule.center_cell) if who.admin else None


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # a template: /v1/orders/{order_id}/pay
    home: Home | None
    resend: Resend | None = None  # how a lost answer is resolved; None: never resent
    switch: str | None = None  # the degradation switch that turns it off (flow_rules.py)
    pattern: re.Pattern[str] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", compile_path(self.path)[0])


class EndpointTable:
    """The public endpoints that are routed, for the edge to match a raw path against."""

    def __init__(self) -> None:
        self._by_method: dict[str, list[Endpoint]] = {}

    def add(self, endpoint: Endpoint) -> None:
        self._by_method.setdefault(endpoint.method, []).append(endpoint)

    def match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]] | None:
        for endpoint in self._by_method.get(method, ()):
            found = endpoint.pattern.match(path)
            if found is not None:
                return endpoint, found.groupdict()
        return None


@dataclass
class Passage:
    """What the dispatcher needs of a request, whether the edge or a handler holds it."""

    method: str
    target: str  # path?query, as signed
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    who: Caller
    deadline: float  # monotonic: the end of this request's hold
    state: dict[str, Any]  # the ASGI scope's state: `home_region` is set here
    resend: Resend | None = None
    switch: str | None = None  # the degradation switch that turns this endpoint off
    key: str | None = None  # the idempotency key the body carries once forwarded (keyed)
    lost: Lost | None = None  # set once a forwarded send of this write lost its answer

    def keep(self) -> None:
        """Leave what the handler's own pass needs in the scope's state (the edge's pass
        forwarded, then the rule moved the request here)."""
        self.state["deadline"] = self.deadline
        self.state["idempotency_key"] = self.key
        self.state["lost"] = self.lost


RouteOf = Callable[[Rule], Route | None]
Serve = Callable[[], Awaitable[Response]]


def changing_owner(cell: int) -> str:
    return f"cell {cell} is changing owner; retry shortly"


class Dispatcher:
    def __init__(self, region: str, view: RuleView, holds: Holds, forwarder: Forwarder) -> None:
        self.region = region
        self.view = view
        self.holds = holds
        self.forwarder = forwarder
        self.resolve_s = RESOLVE_S  # how long a lost answer is resolved by resends

    async def run(
        self, passage: Passage, route_of: RouteOf, serve: Serve | None
    ) -> Response | None:
        """Serve here (`serve`), or forward to the owner, until the request is answered.
        With `serve` None (the edge), None means "this region serves it"."""
        try:
            response = await self._run(passage, route_of, serve)
        except OutcomeUnknown:
            self.forwarder.unknown += 1
            raise
        except UnitradeError as error:
            if passage.lost is None or error.status < 500:
                raise
            # A later try was not applied; the lost send may have been all the same.
            self.forwarder.unknown += 1
            raise unresolved(passage.lost, passage.key) from error
        if passage.lost is not None and response is not None:
            self.forwarder.resolved += 1
        return response

    async def _run(
        self, passage: Passage, route_of: RouteOf, serve: Serve | None
    ) -> Response | None:
        write = is_write(passage.method)
        while True:
            rule = self.view.rule
            if passage.switch is not None and PROBE_SKU not in passage.target:
                # Refused where it arrives, before a hop; the health checker's probe SKU
                # is never switched off.
                check_switch(rule.flow, passage.switch)
            route = route_of(rule)
            if route is not None:
                passage.state["home_region"] = route.region
                if write and rule.is_banned(route.cell) and not _IGNORE_BANS:
                    await self.holds.until_unbanned(route.cell, rule, passage.deadline)
                    continue
            if route is None or route.region == self.region:
                if serve is None:
                    return None
                try:
                    return await serve()
                except (WriteBanned, WrongRegion) as refused:
                    if await self.holds.after_refusal(rule.version, passage.deadline):
                        continue
                    local = passage.who.forwarded_from is None
                    if isinstance(refused, WrongRegion) and route is not None and local:
                        raise self.holds.refuse(route.cell, changing_owner(route.cell)) from refused
                    raise
            if passage.who.forwarded_from is not None:
                if await self._newer_rule_at_sender(passage, rule.version):
                    continue
                raise WrongRegion(
                    f"forwarded by {passage.who.forwarded_from} to {self.region}, but the "
                    f"owner of cell {route.cell} is {route.region}",
                    owner=route.region,
                    cell=route.cell,
                )
            response = await self._forward(passage, rule, route, write)
            if response is not None:
                return response

    async def _forward(
        self, passage: Passage, rule: Rule, route: Route, write: bool
    ) -> Response | None:
        """One hop to the owner; None when it is to be sent again: the owner refused because
        the rule moved under the request (nothing was applied there) and the hold allows
        another try, or the answer was lost and may be resolved by a resend."""
        if write and passage.resend is not None and passage.resend.keyed is not None:
            self._add_key(passage)
        timeout_s = None if passage.lost is None else passage.lost.left_s()
        try:
            # A resend of a lost answer passes the breaker: it is how the outcome is
            # learnt, bounded in number and time already (gateway/resend.py).
            reply = await self.forwarder.send(
                passage.method,
                passage.target,
                passage.headers,
                passage.body,
                route.region,
                timeout_s,
                guarded=passage.lost is None,
            )
        except (OutcomeUnknown, RegionUnavailable, CircuitOpen) as failed:
            await self._lost(passage, failed)
            return None
        if passage.lost is not None and (reply.status >= 500 or reply.status == 429):
            # A resend the owner could not serve, or refused by a rate limit before
            # looking at it, says nothing of the lost send.
            await self._lost(passage, None)
            return None
        expected = RETRYABLE.get(reply.status)
        if expected is None or error_code(reply.body) != expected:
            return self.forwarder.response(reply)
        if await self.holds.after_refusal(rule.version, passage.deadline):
            self.forwarder.retried += 1
            return None
        if expected == "wrong_region":
            # The regions still disagree about the owner after the whole hold: to the
            # client this is the switch taking too long, and it gets what the hold
            # promises (503 with Retry-After), never the internal 421.
            if write:
                raise self.holds.refuse(route.cell, changing_owner(route.cell))
            raise RegionUnavailable(changing_owner(route.cell), region=route.region)
        return self.forwarder.response(reply)

    def _add_key(self, passage: Passage) -> None:
        """Give a keyed write its idempotency key before it first leaves this region."""
        if passage.key is not None:
            return
        keyed = keyed_body(passage.body)
        if keyed is None:
            return  # the owner refuses this body as it is; it is never sent again
        body, passage.key = keyed
        if body is not passage.body:
            passage.body = body
            passage.headers = {**passage.headers, "content-type": "application/json"}
            self.forwarder.keys_added += 1

    async def _lost(self, passage: Passage, failed: UnitradeError | None) -> None:
        """A forwarded send got no answer, or a resend an answer that tells nothing: wait
        before the next resend, or raise what the client is told (module docstring)."""
        lost = passage.lost
        if lost is None:
            assert failed is not None
            if not isinstance(failed, OutcomeUnknown):
                raise failed  # nothing left this region: 503, nothing was written
            self.forwarder.lost += 1
            resend = passage.resend
            if resend is None or (resend.keyed is not None and passage.key is None):
                raise failed
            lost = Lost(str(failed.details.get("region", "")), self.resolve_s)
            passage.lost = lost
            # Holds and refusals of the resends have the window, not the spent hold.
            passage.deadline = max(passage.deadline, lost.until)
        backoff = lost.next_backoff()
        if backoff is None:
            raise unresolved(lost, passage.key)
        await asyncio.sleep(backoff)
        lost.resends += 1
        self.forwarder.resent += 1

    async def _newer_rule_at_sender(self, passage: Passage, version: int) -> bool:
        """The forwarding region routed under a newer rule than this one holds: wait for
        it (within the hold); True if a newer rule arrived."""
        sent = passage.headers.get(RULE_VERSION_HEADER, "")
        if not sent.isdigit() or int(sent) <= version:
            return False
        left = passage.deadline - time.monotonic()
        if left <= 0:
            return False
        return (await self.view.changed(version, left)).version > version
