"""Planned switchover of cells between regions (docs/architecture.md), made safe.

    precheck  target healthy and caught up; refuse before anything is banned
    ban       publish the cells banned; wait for every acknowledgement
    catch_up  read each cell's final position at its old owner; wait for the target
    publish   publish the target as owner, unbanned; wait for the acknowledgements
    verify    check that every other region now pulls the cells from the target

Each step is recorded in the control store before it is taken. Up to `publish` the
switch can be rolled back (publish the cells unbanned, under their old owners): on an
abort, on a step that fails or times out, and when a control plane that restarts finds
the switch there. Once `publish` has begun the switch only goes forward, and a restarted
control plane finishes it. Either way a cell never stays banned.

Why the order is safe: once every component of every region acknowledges the ban, no write
to the cells can be admitted anywhere and none admitted earlier is still open (the fence,
docs/architecture.md), so the old owner's position is final; the target applies up to it; only then
does any region learn that the target owns the cells. The target's order-ID sequence row is
part of what it applied, so its IDs never collide with the old owner's (storage/sequences).
The peers' failures this avoids: Vitess refusing on lag only after writes were stopped
(vitess#9525; here the lag is checked first) and a switch failing half-way with no way back
(vitess#17326; here every step before the point of no return rolls back, persistently).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from unitrade.control.board import RuleBoard
from unitrade.control.store import ControlStore, Operation
from unitrade.errors import RegionUnavailable, SwitchRefused, UnitradeError
from unitrade.rpc.client import RegionClient
from unitrade.storage.store import now_ms
from unitrade.topology.config import ControlConfig, TopologyConfig
from unitrade.topology.rule import Rule

log = logging.getLogger("unitrade.switchover")

STEPS = ("precheck", "ban", "catch_up", "publish", "verify")
FORWARD_ONLY = ("publish", "verify")  # from `publish` on, a switch only goes forward
WAIT_CHUNK_MS = 500  # one wait call to the target; between calls an abort is noticed
VERIFY_TIMEOUT_S = 5.0
VERIFY_POLL_S = 0.05
# Fault injection for tests: `UNITRADE_CONTROL_PAUSE=catch_up:30` sleeps 30 s right after
# recording the beginning of that step, so a test can kill the control plane there.
PAUSE_ENV = "UNITRADE_CONTROL_PAUSE"


class StepFailed(Exception):
    """A step before the point of no return failed: the switch rolls back."""


@dataclass
class Control:
    """What a switchover works with."""

    config: TopologyConfig
    store: ControlStore
    board: RuleBoard
    client: RegionClient  # signs as the control plane

    @property
    def limits(self) -> ControlConfig:
        return self.config.control

    async def health(self, region: str) -> dict[str, Any]:
        body = await self.client.call(region, "GET", "/healthz")
        if not isinstance(body, dict) or body.get("status") != "ok":
            raise RegionUnavailable(f"region {region} is not healthy", region=region)
        return body


def _pause(step: str) -> float:
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = spec.partition(":")
    return float(seconds) if name == step and seconds else 0.0


async def precheck(ctx: Control, cells: list[int], target: str) -> dict[str, Any]:
    """Refuse a switch that cannot succeed, before anything is banned (vitess#9525)."""
    rule = ctx.board.rule
    ahead = ctx.board.ahead()
    if ahead:
        raise SwitchRefused(
            f"the control store is behind: regions hold newer rules {ahead} than its version "
            f"{rule.version}; restore the control store before any operation"
        )
    if target not in ctx.config.region_names:
        raise SwitchRefused(f"unknown target region {target!r}")
    if not cells:
        raise SwitchRefused("no cells to switch")
    for cell in cells:
        if cell not in rule.cells:
            raise SwitchRefused(f"unknown cell {cell}")
        if rule.owner_of(cell) == target:
            raise SwitchRefused(f"cell {rule.cells[cell].name} is already owned by {target}")
        if rule.is_banned(cell):
            raise SwitchRefused(f"cell {rule.cells[cell].name} is banned by another operation")
    sources = sorted({rule.owner_of(c) for c in cells})
    health: dict[str, dict[str, Any]] = {}
    for region in [target, *sources]:
        try:
            health[region] = await ctx.health(region)
        except UnitradeError as exc:
            raise SwitchRefused(
                f"region {region} is unreachable or unhealthy: {exc.message}"
            ) from None
        if region not in ctx.board.connected():
            raise SwitchRefused(f"region {region} is not connected to the control plane")
        if ctx.board.regions[region].version < rule.version:
            raise SwitchRefused(
                f"region {region} has not acknowledged rule version {rule.version} yet"
            )
    lags: dict[str, dict[str, int]] = {}
    streams = {s["cell"]: s for s in health[target]["replication"]}
    for cell in cells:
        name = rule.cells[cell].name
        owner = rule.owner_of(cell)
        at_owner = int(health[owner]["positions"][name])
        at_target = int(health[target]["positions"][name])
        lag_ms = int(streams.get(cell, {}).get("lag_ms", 0))
        lag_positions = max(0, at_owner - at_target)
        lags[name] = {"positions": lag_positions, "ms": lag_ms}
        limits = ctx.limits
        if lag_positions > limits.lag_positions_max or lag_ms > limits.lag_ms_max:
            raise SwitchRefused(
                f"{target} is behind on cell {name}: {lag_positions} positions, {lag_ms} ms "
                f"(limits {limits.lag_positions_max} positions, {limits.lag_ms_max} ms)"
            )
    return {"lag": lags, "rule_version": rule.version}


class Workflow:
    """What an operation's steps share (switchover and failover): each step recorded in the
    control store before it is taken (`begin`) and when it is done, with its time."""

    def __init__(self, ctx: Control, op: Operation) -> None:
        self.ctx = ctx
        self.op = op
        self.abort = asyncio.Event()  # set by an abort (a failover never sets it)
        self.abort_reason = ""
        self._stamps: dict[str, float] = {}

    async def begin(self, step: str, detail: dict[str, Any] | None = None) -> None:
        self._stamps[step] = time.monotonic()
        await self.ctx.store.record(self.op, step, "begin", detail)
        log.info("%s: step %s begins", self.op.id, step)
        pause = _pause(step)
        if pause:
            log.warning("%s: pausing %.1f s at step %s (%s)", self.op.id, pause, step, PAUSE_ENV)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.abort.wait(), pause)

    async def done(self, step: str, detail: dict[str, Any] | None = None) -> None:
        took_ms = int((time.monotonic() - self._stamps.get(step, time.monotonic())) * 1000)
        await self.ctx.store.record(
            self.op, step, "done", {**(detail or {}), f"{step}_ms": took_ms}
        )


class Switchover(Workflow):
    def __init__(self, ctx: Control, op: Operation) -> None:
        super().__init__(ctx, op)
        self._banned_since: float | None = None

    @property
    def cells(self) -> list[int]:
        return self.op.cells

    def required(self) -> list[str]:
        """Regions whose acknowledgement a rule change waits for: the old owners, the
        target, and every region connected to the control plane. A region that is not
        connected owns none of the cells, and learns the rule when it reconnects."""
        needed = set(self.op.sources.values()) | {self.op.target} | set(self.ctx.board.connected())
        return sorted(needed)

    def _check_abort(self) -> None:
        if self.abort.is_set():
            raise StepFailed(self.abort_reason or "aborted by the operator")

    # -- the run -----------------------------------------------------------------------------

    async def run(self, resumed: bool = False) -> None:
        """Run the switch to its end: done or rolled back. `resumed`: the control plane
        restarted and found it running; before `publish` it rolls back (its pre-check, and
        what the control plane knew of the regions, are gone with the old process)."""
        try:
            if self.op.step in FORWARD_ONLY:
                await self._forward()
                return
            if resumed:
                await self._roll_back(f"the control plane restarted during step {self.op.step}")
                return
            try:
                await self._ban()
                await self._catch_up()
                self._check_abort()  # the last moment an abort can take effect
            except StepFailed as exc:
                await self._roll_back(str(exc))
                return
            await self._forward()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or the store failing: leave a trace, resume on restart
            log.exception("%s: switch stopped at step %s", self.op.id, self.op.step)
            await self.ctx.store.record(
                self.op, self.op.step, "error", {"error": f"{type(exc).__name__}: {exc}"}
            )

    async def _forward(self) -> None:
        await self._publish()
        await self._verify()
        await self._finish()

    async def _publish_rule(self, rule: Rule, reason: str) -> Rule:
        return await self.ctx.board.publish(rule, reason, self.op.id)

    async def _wait_acks(self, version: int) -> list[str]:
        timeout_s = self.ctx.limits.ack_timeout_ms / 1000
        return await self.ctx.board.wait_acks(version, self.required(), timeout_s)

    async def _ban(self) -> None:
        await self.begin("ban")
        self._check_abort()
        rule = self.ctx.board.rule
        banned = rule.derive(rule.version + 1, banned=rule.banned | set(self.cells))
        self.op.detail["banned_at_ms"] = now_ms()
        await self._publish_rule(banned, f"{self.op.id}: ban cells {self._names()}")
        await self.ctx.store.record(self.op, "ban", "note", {"ban_version": banned.version})
        self._banned_since = time.monotonic()
        missing = await self._wait_acks(banned.version)
        if missing:
            raise StepFailed(
                f"no acknowledgement of the ban (version {banned.version}) from {missing}"
            )
        await self.done("ban")

    async def _catch_up(self) -> None:
        await self.begin("catch_up")
        self._check_abort()
        rule = self.ctx.board.rule
        finals: dict[str, int] = {}
        for source in sorted(set(self.op.sources.values())):
            try:
                health = await self.ctx.health(source)
            except UnitradeError as exc:
                raise StepFailed(f"old owner {source} unreachable: {exc.message}") from exc
            for cell in self.cells:
                if self.op.sources[cell] == source:
                    finals[rule.cells[cell].name] = int(health["positions"][rule.cells[cell].name])
        # Recorded before waiting, so the log says what the target had to reach.
        await self.ctx.store.record(self.op, "catch_up", "note", {"final_positions": finals})
        deadline = time.monotonic() + self.ctx.limits.catch_up_timeout_ms / 1000
        await asyncio.gather(
            *(
                self._wait_applied(cell, finals[rule.cells[cell].name], deadline)
                for cell in self.cells
            )
        )
        await self.done("catch_up")

    async def _wait_applied(self, cell: int, position: int, deadline: float) -> None:
        target = self.op.target
        while True:
            self._check_abort()
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise StepFailed(f"{target} did not apply cell {cell} up to {position} in time")
            payload = {
                "cell": cell,
                "position": position,
                "timeout_ms": min(left_ms, WAIT_CHUNK_MS),
            }
            try:
                reached = await self.ctx.client.call(
                    target, "POST", "/internal/replication/wait", payload
                )
            except UnitradeError as exc:
                raise StepFailed(f"target {target} unreachable: {exc.message}") from exc
            if reached["reached"]:
                return

    async def _publish(self) -> None:
        # The point of no return: recorded first, so a restart finishes from here.
        await self.begin("publish")
        rule = self.ctx.board.rule
        target = self.op.target
        if all(rule.owner_of(c) == target and not rule.is_banned(c) for c in self.cells):
            published = rule  # published before a restart
        else:
            published = await self._publish_rule(
                rule.derive(
                    rule.version + 1,
                    owners={c: target for c in self.cells},
                    banned=rule.banned - set(self.cells),
                ),
                f"{self.op.id}: cells {self._names()} owned by {target}",
            )
        self.op.detail["publish_version"] = published.version
        missing = await self._wait_acks(published.version)
        banned_ms = None
        if self._banned_since is not None:
            banned_ms = int((time.monotonic() - self._banned_since) * 1000)
        detail: dict[str, Any] = {"publish_version": published.version, "banned_ms": banned_ms}
        if missing:
            # Past the point of no return: regions that have not acknowledged yet still
            # refuse the cells (banned) and pick the rule up when they reconnect.
            detail["not_acknowledged"] = missing
        await self.done("publish", detail)

    async def _verify(self) -> None:
        """The stream now runs from the new owner to every other region (step 4 of the switch):
        each of them has pulled the cells from the target under the new rule."""
        await self.begin("verify")
        version = int(self.op.detail.get("publish_version", self.ctx.board.rule.version))
        target = self.op.target
        others = [r for r in self.ctx.config.region_names if r != target]
        deadline = time.monotonic() + VERIFY_TIMEOUT_S
        lagging: list[str] = []
        while True:
            try:
                followers = (await self.ctx.health(target)).get("followers", {})
            except UnitradeError:
                followers = {}
            rule = self.ctx.board.rule
            lagging = [
                f"{region}<-{rule.cells[c].name}"
                for c in self.cells
                for region in others
                if followers.get(rule.cells[c].name, {}).get(region, 0) < version
            ]
            if not lagging or time.monotonic() > deadline:
                break
            await asyncio.sleep(VERIFY_POLL_S)
        await self.done("verify", {"streams_not_following": lagging})

    async def _finish(self) -> None:
        total_ms = now_ms() - self.op.created_ms
        await self.ctx.store.record(self.op, "done", "done", {"total_ms": total_ms}, state="done")
        log.info(
            "%s: switched %s to %s in %d ms", self.op.id, self._names(), self.op.target, total_ms
        )

    async def _roll_back(self, reason: str) -> None:
        await self.ctx.store.record(self.op, "rollback", "begin", {"reason": reason})
        log.warning("%s: rolling back: %s", self.op.id, reason)
        rule = self.ctx.board.rule
        for cell in self.cells:
            # Before `publish` nothing changed an owner; a rollback only lifts the ban.
            assert rule.owner_of(cell) == self.op.sources[cell], "rollback after the new owner"
        still_banned = [c for c in self.cells if rule.is_banned(c)]
        detail: dict[str, Any] = {}
        if still_banned:
            lifted = await self._publish_rule(
                rule.derive(rule.version + 1, banned=rule.banned - set(self.cells)),
                f"{self.op.id}: rollback, cells {self._names()} unbanned ({reason})"[:200],
            )
            missing = await self._wait_acks(lifted.version)
            detail = {"unban_version": lifted.version, "not_acknowledged": missing}
        total_ms = now_ms() - self.op.created_ms
        await self.ctx.store.record(
            self.op,
            "rollback",
            "done",
            {**detail, "total_ms": total_ms},
            state="rolled_back",
            error=reason,
        )

    def _names(self) -> str:
        rule = self.ctx.board.rule
        return ",".join(rule.cells[c].name for c in self.cells)
