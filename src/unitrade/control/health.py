"""The health checker: the control plane's own probes of every region and every cell.

Every `[control] health_interval_ms` one round of probes runs, all of them at once, each
bounded by `health_timeout_ms` (below the interval): a frozen region costs its own probes
their timeout and delays neither the others nor the next round.

- **Region**: `GET /healthz`; good when it answers `status: ok`. Its `positions` (each
  cell copy's changelog position there) are kept with the time of that answer
  (`last_positions`): what a failover needs to know of a region that then dies.
- **Unit cell**: a synthetic order (topology/probes.py) by the cell's reserved probe buyer,
  of one unit of the probe SKU, sent to the public API of the cell's owner under the
  control plane's rule with a token the control plane issues itself, then closed so its
  stock goes back. It passes through the gateway, the unit cell (the order's write), the
  center cell (the stock reservation) and the global cell (the price). A close that gets
  no answer is made again in the next rounds. The owner deletes probe orders soon after
  (services/probe_data.py).
- **Center cell**: a read of the probe SKU's stock at its owner, and the round's
  reservations: an order refused because of the center (`insufficient_stock`, an error
  naming the center cell, the center's owner unreachable from the unit's owner) fails the
  center cell, not the unit cell.
- **Global cell**: a read of the probe SKU at its owner (its copy there is the one
  every write goes to); an order refused as `unknown_sku`, or naming the global cell or
  its unreachable owner, fails the global cell.

A unit cell whose order was stopped at the center or global cell, or timed out while one
of those failed this round, is judged by its owner's `/healthz` instead, as is one with no
bucket (no buyer can be routed to it), a banned one (a switch holds its writes) and every
unit cell while the probe SKU is not ready or `health_orders = false`.

A region or cell is **down** after `health_failures_max` failed probes in a row and **up**
again after one good probe; before its first verdict it is `unknown`. `on_region_down` is
called once each time a region turns down (from up or from unknown: a region that never
answered since the control plane started turns down too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson

from unitrade.storage.store import now_ms
from unitrade.topology.config import TopologyConfig
from unitrade.topology.probes import PROBE_QTY, PROBE_SKU, probe_buyer
from unitrade.topology.rule import Rule
from unitrade.web.tokens import issue_token

log = logging.getLogger("unitrade.health")

PROBE_STOCK = 1_000_000  # units of the probe SKU on top of what is reserved or sold
PROBE_STOCK_LOW = PROBE_STOCK // 2  # below this many available, the checker tops it up
PROBE_TITLE = "unitrade health probe (synthetic, not for sale)"
TOKEN_TTL_S = 3_600
TOKEN_RENEW_S = 600  # a cached token is issued again when it has less than this to live
ERROR_CHARS_MAX = 200
CONNECTIONS_MAX = 64
# Probe orders whose close got no answer are closed again in the next rounds (closing is
# idempotent), so their unit comes back at once rather than with the release of abandoned
# reservations a minute later. Bounded in number, in tries and per round.
UNCLOSED_MAX = 1_000
CLOSE_TRIES_MAX = 5
CLOSES_PER_ROUND_MAX = 50

UNKNOWN, UP, DOWN = "unknown", "up", "down"


@dataclass
class Probed:
    """The health of one region or cell."""

    state: str = UNKNOWN
    failures: int = 0  # failed probes in a row
    last_good_ms: int | None = None  # wall clock
    last_error: str | None = None
    probes: int = 0
    probes_failed: int = 0

    def good(self, at_ms: int) -> bool:
        """Record a good probe; True when the target turns up."""
        turned = self.state != UP
        self.state, self.failures, self.last_good_ms = UP, 0, at_ms
        self.probes += 1
        return turned

    def bad(self, error: str, failures_max: int) -> bool:
        """Record a failed probe; True when the target turns down."""
        self.failures += 1
        self.last_error = error[:ERROR_CHARS_MAX]
        self.probes += 1
        self.probes_failed += 1
        if self.state != DOWN and self.failures >= failures_max:
            self.state = DOWN
            return True
        return False

    def body(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "failures": self.failures,
            "last_good_ms": self.last_good_ms,
            "last_error": self.last_error,
            "probes": self.probes,
            "probes_failed": self.probes_failed,
        }


@dataclass(frozen=True)
class Outcome:
    """One probe's result: good when `error` is None. `blame` says which cell an order
    probe's failure belongs to (`unit`, `center` or `global`)."""

    error: str | None = None
    blame: str = "unit"
    timed_out: bool = False
    code: str | None = None  # the `error` code of a refusal
    body: Any = None


def _describe(status: int, body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return f"HTTP {status} {body['error']}: {str(body.get('message', ''))[:120]}"
    return f"HTTP {status}"


class HealthChecker:
    def __init__(self, config: TopologyConfig, rule: Callable[[], Rule]) -> None:
        limits = config.control
        self.config = config
        self._rule = rule  # the control plane's newest rule
        self.interval_s = limits.health_interval_ms / 1000
        self.timeout_s = limits.health_timeout_ms / 1000
        self.failures_max = limits.health_failures_max
        self.orders = limits.health_orders
        self.regions = {name: Probed() for name in config.region_names}
        self.cells = {cell.id: Probed() for cell in config.cells}
        self.judged_by: dict[int, str] = {}  # cell -> order / healthz / read, last round
        self.owners: dict[int, str] = {}  # cell -> the owner it was last probed at
        self.on_region_down: Callable[[str], Awaitable[None]] | None = None
        self.rounds = 0
        self.last_round_ms: int | None = None
        self.sku_ready = False
        self._positions: dict[str, tuple[dict[str, int], int]] = {}
        self._unclosed: dict[str, tuple[int, int, int]] = {}  # order -> (cell, buyer, tries)
        self._tokens: dict[int, tuple[str, float]] = {}  # buyer -> (token, expires, unix s)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()

    # -- the interface the failover workflow calls -------------------------------------------

    def region_down(self, region: str) -> bool:
        probed = self.regions.get(region)
        return probed is not None and probed.state == DOWN

    def cell_down(self, cell: int) -> bool:
        probed = self.cells.get(cell)
        return probed is not None and probed.state == DOWN

    def last_positions(self, region: str) -> tuple[dict[str, int], int] | None:
        """Cell name -> changelog position of each copy at `region`, from its last good
        `/healthz`, and that answer's wall-clock ms; None if it never answered."""
        found = self._positions.get(region)
        return None if found is None else (dict(found[0]), found[1])

    def status(self) -> dict[str, Any]:
        rule = self._rule()
        regions = {}
        for name, probed in self.regions.items():
            positions = self._positions.get(name)
            regions[name] = {
                **probed.body(),
                "positions_ms": positions[1] if positions else None,
            }
        cells = {}
        for cell_id, probed in sorted(self.cells.items()):
            info = rule.cells[cell_id]
            cells[info.name] = {
                "id": cell_id,
                "kind": info.kind.value,
                "owner": self.owners.get(cell_id, rule.owner_of(cell_id)),
                "judged_by": self.judged_by.get(cell_id),
                **probed.body(),
            }
        return {
            "now_ms": now_ms(),
            "interval_ms": int(self.interval_s * 1000),
            "timeout_ms": int(self.timeout_s * 1000),
            "failures_max": self.failures_max,
            "orders": self.orders,
            "probe_sku_ready": self.sku_ready,
            "rounds": self.rounds,
            "last_round_ms": self.last_round_ms,
            "regions": regions,
            "cells": cells,
        }

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="health")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._hooks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe_once()
            except Exception:
                log.exception("a round of health probes failed")
            await asyncio.sleep(max(0.0, started + self.interval_s - time.monotonic()))

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running loop. Plain client
        # requests: a probe goes through the public API as a buyer's would.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=CONNECTIONS_MAX, ssl=self.config.http_verify, keepalive_timeout=30
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    # -- one round -------------------------------------------------------------------------

    async def probe_once(self) -> None:
        """Probe every region and cell once, all at once, and record the verdicts."""
        rule = self._rule()
        center, global_ = rule.center_cell, rule.global_cell
        region_jobs = {name: (name, self._probe_region(name)) for name in self.regions}
        order_jobs: dict[int, tuple[str, Coroutine[Any, Any, Outcome]]] = {}
        if self.orders and self.sku_ready:
            for cell in rule.unit_cells():
                buyer = probe_buyer(rule, cell)
                if buyer is not None and not rule.is_banned(cell):
                    owner = rule.owner_of(cell)
                    order_jobs[cell] = (owner, self._probe_order(rule, cell, owner, buyer))
        read_jobs = {
            cell: (rule.owner_of(cell), self._read(rule.owner_of(cell), path))
            for cell, path in (
                (center, f"/v1/inventory/{PROBE_SKU}"),
                (global_, f"/v1/products/{PROBE_SKU}"),
            )
        }
        jobs = [*region_jobs.values(), *order_jobs.values(), *read_jobs.values()]
        jobs += self._close_jobs(rule)  # last: their outcomes decide nothing
        outcomes = await asyncio.gather(*(self._bounded(region, job) for region, job in jobs))
        by_region = dict(zip(region_jobs, outcomes[: len(region_jobs)], strict=True))
        rest = outcomes[len(region_jobs) :]
        by_order = dict(zip(order_jobs, rest[: len(order_jobs)], strict=True))
        by_read = dict(zip(read_jobs, rest[len(order_jobs) :][: len(read_jobs)], strict=True))
        at_ms = now_ms()
        for name, outcome in by_region.items():
            self._record_region(name, outcome, at_ms)
        verdicts = self._judge_cells(rule, by_region, by_order, by_read)
        for cell, (how, error) in verdicts.items():
            self._record_cell(rule, cell, how, error, at_ms)
        if self.orders:
            await self._keep_sku(rule, by_order, by_read)
        self.rounds += 1
        self.last_round_ms = at_ms

    async def _bounded(self, region: str, job: Coroutine[Any, Any, Outcome]) -> Outcome:
        """Run one probe within the timeout; its error names the region it went to."""
        try:
            async with asyncio.timeout(self.timeout_s):
                outcome = await job
        except TimeoutError:
            waited = f"no answer within {self.timeout_s * 1000:.0f} ms"
            return Outcome(error=f"region {region}: {waited}", timed_out=True)
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(error=f"region {region}: unreachable: {type(exc).__name__}")
        except Exception as exc:
            # An answer this checker cannot read is a failed probe, never a lost round.
            log.warning("probe of region %s: unexpected %r", region, exc, exc_info=True)
            return Outcome(error=f"region {region}: unreadable answer: {type(exc).__name__}")
        if outcome.error is None:
            return outcome
        return replace(outcome, error=f"region {region}: {outcome.error}")

    async def _request(
        self, region: str, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["content-type"] = "application/json"
        url = self.config.region(region).base_url + path
        async with self.session.request(method, url, data=data, headers=headers) as reply:
            raw = await reply.read()
        try:
            return reply.status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return reply.status, None

    async def _probe_region(self, region: str) -> Outcome:
        status, body = await self._request(region, "GET", "/healthz")
        if status != 200 or not isinstance(body, dict) or body.get("status") != "ok":
            return Outcome(error=f"/healthz: {_describe(status, body)}")
        positions = body.get("positions")
        if not isinstance(positions, dict):
            return Outcome(error="/healthz: no positions")
        return Outcome(body={str(c): int(p) for c, p in positions.items()})

    async def _read(self, region: str, path: str) -> Outcome:
        """A read of the probe SKU at the owner of the center or global cell: good when that
        region answers from its copy, whether or not the SKU is there yet."""
        status, body = await self._request(region, "GET", path)
        if status == 200:
            return Outcome(body=body)
        if status == 404 and isinstance(body, dict) and body.get("error") == "not_found":
            return Outcome(body=None)
        return Outcome(error=f"GET {path}: {_describe(status, body)}")

    async def _probe_order(self, rule: Rule, cell: int, owner: str, buyer: int) -> Outcome:
        token = self._token(buyer)
        items = {"items": [{"sku": PROBE_SKU, "qty": PROBE_QTY}]}
        status, body = await self._request(owner, "POST", "/v1/orders", token, items)
        if status != 201 or not isinstance(body, dict):
            code = body.get("error") if isinstance(body, dict) else None
            return Outcome(
                error=f"order: {_describe(status, body)}",
                blame=_blame(rule, cell, body),
                code=code if isinstance(code, str) else None,
            )
        order_id = str(body.get("order_id"))
        if len(self._unclosed) < UNCLOSED_MAX:
            self._unclosed[order_id] = (cell, buyer, 0)  # until the close is answered
        status, closed = await self._request(owner, "POST", f"/v1/orders/{order_id}/close", token)
        if status != 200:
            return Outcome(error=f"close: {_describe(status, closed)}")
        self._unclosed.pop(order_id, None)
        return Outcome(body=body)

    def _close_jobs(self, rule: Rule) -> list[tuple[str, Coroutine[Any, Any, Outcome]]]:
        """Close again probe orders of earlier rounds whose close got no answer."""
        jobs: list[tuple[str, Coroutine[Any, Any, Outcome]]] = []
        for order_id, (cell, buyer, tries) in list(self._unclosed.items()):
            if len(jobs) == CLOSES_PER_ROUND_MAX:
                break
            if tries >= CLOSE_TRIES_MAX or cell not in rule.cells:
                del self._unclosed[order_id]  # the owner's sweep and release take over
                continue
            self._unclosed[order_id] = (cell, buyer, tries + 1)
            owner = rule.owner_of(cell)
            jobs.append((owner, self._close_again(owner, order_id, buyer)))
        return jobs

    async def _close_again(self, owner: str, order_id: str, buyer: int) -> Outcome:
        path = f"/v1/orders/{order_id}/close"
        status, body = await self._request(owner, "POST", path, self._token(buyer))
        # Closed now, or no longer there to close (swept, or never written).
        if status == 200 or (status == 404 and isinstance(body, dict)):
            self._unclosed.pop(order_id, None)
            return Outcome()
        return Outcome(error=f"close again: {_describe(status, body)}")

    def _token(self, buyer: int) -> str:
        cached = self._tokens.get(buyer)
        if cached is not None and cached[1] - time.time() > TOKEN_RENEW_S:
            return cached[0]
        if len(self._tokens) > 4 * len(self.cells):
            self._tokens.clear()  # a bound: one buyer per unit cell is all it needs
        token = issue_token(self.config.token_keys, buyer_id=buyer, ttl_s=TOKEN_TTL_S)
        self._tokens[buyer] = (token, time.time() + TOKEN_TTL_S)
        return token

    # -- verdicts --------------------------------------------------------------------------

    def _judge_cells(
        self,
        rule: Rule,
        regions: dict[str, Outcome],
        orders: dict[int, Outcome],
        reads: dict[int, Outcome],
    ) -> dict[int, tuple[str, str | None]]:
        """cell -> (how it was judged, error or None when good) for every cell."""
        center, global_ = rule.center_cell, rule.global_cell
        verdicts = {center: ("read", reads[center].error), global_: ("read", reads[global_].error)}
        for outcome in orders.values():
            kind = outcome.blame
            if outcome.error is not None and kind in ("center", "global"):
                blamed = center if kind == "center" else global_
                if verdicts[blamed][1] is None:
                    verdicts[blamed] = ("order", outcome.error)
        upstream_failed = any(verdicts[c][1] is not None for c in (center, global_))
        for cell in rule.unit_cells():
            tried = orders.get(cell)
            if tried is not None and (
                tried.error is None
                or (tried.blame == "unit" and not (tried.timed_out and upstream_failed))
            ):
                verdicts[cell] = ("order", tried.error)
                continue
            # No order reached this cell's write: its owner's health is all there is.
            verdicts[cell] = ("healthz", regions[rule.owner_of(cell)].error)
        return verdicts

    def _record_region(self, region: str, outcome: Outcome, at_ms: int) -> None:
        probed = self.regions[region]
        if outcome.error is None:
            self._positions[region] = (outcome.body, at_ms)
            if probed.good(at_ms):
                log.info("region %s is up", region)
            return
        if probed.bad(outcome.error, self.failures_max):
            log.warning(
                "region %s is down after %s failed probes: %s",
                region,
                probed.failures,
                probed.last_error,
            )
            self._region_turned_down(region)

    def _region_turned_down(self, region: str) -> None:
        hook = self.on_region_down
        if hook is None:
            return

        async def call() -> None:
            try:
                await hook(region)
            except Exception:
                log.exception("on_region_down(%s) failed", region)

        task = asyncio.create_task(call(), name=f"region-down-{region}")
        self._hooks.add(task)  # at most one per region turning down; each ends by itself
        task.add_done_callback(self._hooks.discard)

    def _record_cell(self, rule: Rule, cell: int, how: str, error: str | None, at_ms: int) -> None:
        probed = self.cells[cell]
        self.judged_by[cell] = how
        self.owners[cell] = rule.owner_of(cell)
        name = rule.cells[cell].name
        if error is None:
            if probed.good(at_ms):
                log.info("cell %s is up (judged by %s)", name, how)
        elif probed.bad(error, self.failures_max):
            log.warning("cell %s is down after %s failed probes: %s", name, probed.failures, error)

    # -- the probe SKU ---------------------------------------------------------------------

    async def _keep_sku(
        self, rule: Rule, orders: dict[int, Outcome], reads: dict[int, Outcome]
    ) -> None:
        """Create the probe SKU, or top its stock up, when this round found it missing or
        short (idempotent: the admin API sets absolute values)."""
        stock, product = reads[rule.center_cell], reads[rule.global_cell]
        if stock.error is not None or product.error is not None:
            return  # its owners are failing: nothing to decide from
        levels = stock.body if isinstance(stock.body, dict) else None
        short = any(o.code in ("unknown_sku", "insufficient_stock") for o in orders.values())
        if (
            product.body is not None
            and levels is not None
            and int(levels.get("available", 0)) >= PROBE_STOCK_LOW
            and not short
        ):
            self.sku_ready = True
            return
        committed = 0 if levels is None else int(levels.get("reserved", 0) + levels.get("sold", 0))
        body = {"title": PROBE_TITLE, "price_cents": 0, "stock": committed + PROBE_STOCK}
        admin = issue_token(self.config.token_keys, admin=True, ttl_s=60)
        owner = rule.owner_of(rule.global_cell)
        path = f"/v1/admin/products/{PROBE_SKU}"
        put = self._request(owner, "PUT", path, admin, body)
        try:
            async with asyncio.timeout(self.timeout_s):
                status, answer = await put
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("probe SKU not written at %s: %s", owner, type(exc).__name__)
            return
        if status != 200:
            log.warning("probe SKU not written at %s: %s", owner, _describe(status, answer))
            return
        log.info("probe SKU %s written at %s with stock %s", PROBE_SKU, owner, body["stock"])
        self.sku_ready = True

    # -- metrics ---------------------------------------------------------------------------

    def metrics_lines(self) -> list[str]:
        rule = self._rule()
        lines = [
            "# HELP unitrade_region_up 1 when the health checker finds the region up",
            "# TYPE unitrade_region_up gauge",
        ]
        lines += [f'unitrade_region_up{{region="{r}"}} {_up(p)}' for r, p in self.regions.items()]
        lines += [
            "# HELP unitrade_cell_up 1 when the health checker finds the cell up at its owner",
            "# TYPE unitrade_cell_up gauge",
        ]
        for cell, probed in sorted(self.cells.items()):
            owner = self.owners.get(cell, rule.owner_of(cell))
            labels = f'cell="{rule.cells[cell].name}",region="{owner}"'
            lines.append(f"unitrade_cell_up{{{labels}}} {_up(probed)}")
        targets = [(f'kind="region",target="{r}"', p) for r, p in self.regions.items()] + [
            (f'kind="cell",target="{rule.cells[c].name}"', p) for c, p in sorted(self.cells.items())
        ]
        series: list[tuple[str, str, str, Callable[[Probed], int]]] = [
            (
                "unitrade_probe_last_good_ms",
                "gauge",
                "Wall-clock ms of the last good probe (0: none yet)",
                lambda p: p.last_good_ms or 0,
            ),
            ("unitrade_probe_failures", "gauge", "Failed probes in a row", lambda p: p.failures),
            ("unitrade_probes_total", "counter", "Probes made", lambda p: p.probes),
            (
                "unitrade_probe_failures_total",
                "counter",
                "Probes that failed",
                lambda p: p.probes_failed,
            ),
        ]
        for metric, kind, help_text, value in series:
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
            lines += [f"{metric}{{{labels}}} {value(p)}" for labels, p in targets]
        return lines


def _up(probed: Probed) -> int:
    return 1 if probed.state == UP else 0


def _blame(rule: Rule, cell: int, body: Any) -> str:
    """Which cell a refused probe order points at: the center for a failed reservation,
    the global cell for a price that could not be read, else the unit cell itself."""
    if not isinstance(body, dict):
        return "unit"
    code = body.get("error")
    if code == "insufficient_stock":
        return "center"
    if code == "unknown_sku":
        return "global"
    named = body.get("cell")
    if named == rule.center_cell:
        return "center"
    if named == rule.global_cell:
        return "global"
    region, owner = body.get("region"), rule.owner_of(cell)
    if code == "region_unavailable" and region != owner:
        if region == rule.owner_of(rule.center_cell):
            return "center"
        if region == rule.owner_of(rule.global_cell):
            return "global"
    return "unit"
