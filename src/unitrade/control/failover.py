"""Failover: move every cell of a lost region to surviving regions without its cooperation
(docs/architecture.md, "Failover"; docs/operations.md, "A dead region").

    precheck  the health checker and a majority of the other regions agree the region is
              unreachable (`force` overrides, and is recorded); targets reachable
    block     the lease authority refuses the region every lease from now on
    expire    wait until every lease the region may hold has surely ended
    ban       per cell, the surviving copy with the highest applied position becomes the
              owner, banned: it stops applying from the lost region and writes nothing;
              every target acknowledges
    promote   read each promoted copy's position, now final: the promotion position
    publish   lift the ban, with a promotion record per cell (position, rule version, the
              first order-ID second the new owner may use); the others follow the new owner
    report    the loss report: per cell, the promotion position and the last position the
              lost region was known to have reached

Why two owners never accept writes for one cell at once: the lost region writes only under
a lease; after `block` it gets none, and `expire` waits until the last one it got has ended
on the authority's clock, which is later in real time than the region's own end of it
(control/lease.py). Only then does `ban` name a new owner, and the new owner writes only
after `publish`. A returning region learns the rule before it serves, gets no lease until it
holds a rule that no longer gives it the cells, and moves its divergent tail into its
quarantine (storage/quarantine.py).

Each step is recorded before it is taken and is safe to take again, so a control plane that
restarts resumes the failover where it stopped; a failover only goes forward. The peers'
failures this avoids: two primaries after an emergency reparent (vitess#7559, orchestrator
#1217: here the old owner's lease has ended first), an isolated primary that kept accepting
writes (cloudnative-pg#7407: here it stops at its lease's end), errant transactions on the
old primary missed when it came back (vitess#17254: here they are quarantined and listed),
and a data-loss figure that is only an estimate (YugabyteDB's safe time lag: here the
positions, and after the region returns, the changes themselves).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from unitrade.control.lease import LeaseAuthority
from unitrade.control.store import Operation
from unitrade.control.switchover import Control, Workflow
from unitrade.errors import FailoverRefused, UnitradeError
from unitrade.storage.sequences import AHEAD_S_MAX
from unitrade.storage.store import now_ms
from unitrade.topology.order_id import unix_to_id_time
from unitrade.topology.rule import Promotion, Rule

log = logging.getLogger("unitrade.failover")

STEPS = ("precheck", "block", "expire", "ban", "promote", "publish", "report")
EXPIRE_POLL_S_MAX = 0.2
ACK_ROUNDS_MAX = 3  # rounds of `ack_timeout_ms` a target has to acknowledge the ban
PROBE_TIMEOUT_S = 1.0  # above a peer's own probe of the lost region (gateway/internal.py)


class HealthView(Protocol):
    """What a failover asks of the control plane's health checker (control/health.py)."""

    def region_down(self, region: str) -> bool: ...

    def last_positions(self, region: str) -> tuple[dict[str, int], int] | None: ...


class FailoverStopped(Exception):
    """A step cannot go on (a target never acknowledged): the failover ends as failed."""


async def _probe(ctx: Control, region: str) -> dict[str, Any] | None:
    """The region's /healthz, or None if it does not answer in time."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            return await ctx.health(region)
    except (UnitradeError, OSError, TimeoutError):
        return None


async def _peer_says_reachable(ctx: Control, peer: str, region: str) -> bool | None:
    """Whether `peer` reaches `region`; None when `peer` itself does not answer."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reply = await ctx.client.call(
                peer, "POST", "/internal/peer/probe", {"region": region}, idempotent=False
            )
    except (UnitradeError, OSError, TimeoutError):
        return None
    return bool(reply.get("reachable"))


async def precheck(
    ctx: Control,
    health: HealthView | None,
    region: str,
    targets: list[str],
    force: bool,
) -> dict[str, Any]:
    """Refuse a failover that must not or cannot run; nothing is changed by it."""
    regions = ctx.config.region_names
    rule = ctx.board.rule
    if region not in regions:
        raise FailoverRefused(f"unknown region {region!r}")
    ahead = ctx.board.ahead()
    if ahead:
        raise FailoverRefused(
            f"the control store is behind: regions hold newer rules {ahead} than its version "
            f"{rule.version}; restore the control store before any operation"
        )
    cells = rule.cells_owned_by(region)
    if not cells:
        raise FailoverRefused(f"region {region} owns no cells: nothing to fail over")
    unknown = sorted(set(targets) - set(regions))
    if unknown or region in targets:
        raise FailoverRefused(f"targets must be other regions of the cluster, not {targets}")
    survivors = [r for r in regions if r != region]
    # The health checker's view, when there is one, stands for the control plane's; without
    # it, the control plane probes the region itself.
    asked = survivors if health is not None else [region, *survivors]
    probes = dict(zip(asked, await asyncio.gather(*(_probe(ctx, r) for r in asked)), strict=True))
    lost_answers = probes.get(region) is not None
    connected = ctx.board.connected()
    usable = [r for r in survivors if probes[r] is not None and r in connected]
    candidates = targets or survivors
    missing = [t for t in candidates if t not in usable]
    if targets and missing:
        raise FailoverRefused(f"targets {missing} are unreachable or not connected")
    candidates = [c for c in candidates if c in usable]
    if not candidates:
        raise FailoverRefused(f"no surviving region can take the cells of {region}")
    votes = await asyncio.gather(*(_peer_says_reachable(ctx, p, region) for p in survivors))
    peers = {
        p: ("unreachable" if v is False else "reachable" if v else "no answer")
        for p, v in zip(survivors, votes, strict=True)
    }
    down_votes = sum(1 for v in votes if v is False)
    majority = down_votes * 2 > len(survivors)
    if health is not None:
        control_down = health.region_down(region)
    else:
        control_down = not lost_answers
    agreement = {
        "control_plane": "down" if control_down else "up",
        "health_checker": health is not None,
        "answers_healthz": lost_answers if health is None else None,
        "peers": peers,
        "majority_down": majority,
    }
    if not (control_down and majority) and not force:
        raise FailoverRefused(
            f"region {region} is not agreed to be down (control plane: "
            f"{agreement['control_plane']}; peers: {peers}): a failover of a region that "
            "serves would cut off its buyers for nothing. --force overrides, and is recorded"
        )
    return {
        "agreement": agreement,
        "forced": force and not (control_down and majority),
        "candidates": candidates,
        "rule_version": rule.version,
    }


class Failover(Workflow):
    def __init__(
        self,
        ctx: Control,
        op: Operation,
        leases: LeaseAuthority,
        health: HealthView | None,
    ) -> None:
        super().__init__(ctx, op)
        self.leases = leases
        self.health = health

    @property
    def lost(self) -> str:
        return next(iter(self.op.sources.values()))

    @property
    def cells(self) -> list[int]:
        return self.op.cells

    @property
    def candidates(self) -> list[str]:
        return [str(c) for c in self.op.detail.get("candidates", [])]

    def _names(self) -> str:
        rule = self.ctx.board.rule
        return ",".join(rule.cells[c].name for c in self.cells)

    def _done(self, step: str) -> bool:
        return f"{step}_ms" in self.op.detail

    async def run(self, resumed: bool = False) -> None:
        if resumed:
            log.warning("%s: resuming the failover of %s", self.op.id, self.lost)
        try:
            for step, action in (
                ("block", self._block),
                ("expire", self._expire),
                ("ban", self._ban),
                ("promote", self._promote),
                ("publish", self._publish),
                ("report", self._report),
            ):
                if not self._done(step):
                    await action()
        except FailoverStopped as exc:
            await self.ctx.store.record(
                self.op, self.op.step, "error", {"reason": str(exc)}, state="failed", error=str(exc)
            )
            log.error("%s: failover stopped: %s", self.op.id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or the store failing: leave a trace, resume on restart
            log.exception("%s: failover stopped at step %s", self.op.id, self.op.step)
            await self.ctx.store.record(
                self.op, self.op.step, "error", {"error": f"{type(exc).__name__}: {exc}"}
            )

    # -- the steps ---------------------------------------------------------------------------

    async def _block(self) -> None:
        version_min = int(self.op.detail.get("block_version", self.ctx.board.rule.version + 1))
        await self.begin("block", {"block_version": version_min})
        await self.leases.block(self.lost, version_min, self.op.id)
        known = await self._known_positions()
        await self.done("block", {"known_positions": known})

    async def _known_positions(self) -> dict[str, dict[str, int]]:
        """Per cell of the lost region, the positions it was last known to have: each
        survivor's stream head (what the lost owner last told it) and the health checker's
        last good probe."""
        rule = self.ctx.board.rule
        lost = self.lost
        known: dict[str, dict[str, int]] = {rule.cells[c].name: {} for c in self.cells}
        survivors = [r for r in self.ctx.config.region_names if r != lost]
        bodies = await asyncio.gather(*(_probe(self.ctx, r) for r in survivors))
        for region, body in zip(survivors, bodies, strict=True):
            for stream in (body or {}).get("replication", []):
                name = stream.get("cell_name")
                if stream.get("source") == lost and name in known:
                    known[name][region] = int(stream.get("head", 0))
        if self.health is not None:
            last = self.health.last_positions(lost)
            if last is not None:
                positions, _at_ms = last
                for name, position in positions.items():
                    if name in known:
                        known[name]["health_probe"] = int(position)
        return known

    async def _expire(self) -> None:
        await self.begin("expire")
        waited_ms = 0
        while True:
            left_ms = await self.leases.expires_in_ms(self.lost)
            if left_ms <= 0:
                break
            waited_ms += left_ms
            await asyncio.sleep(min(left_ms / 1000, EXPIRE_POLL_S_MAX))
        await self.done("expire")

    async def _positions(self, regions: list[str]) -> dict[str, dict[str, int]]:
        """Each region's positions by cell name; regions that do not answer are left out."""
        bodies = await asyncio.gather(*(_probe(self.ctx, r) for r in regions))
        return {
            r: {str(k): int(v) for k, v in body["positions"].items()}
            for r, body in zip(regions, bodies, strict=True)
            if body is not None
        }

    def _assign(self, positions: dict[str, dict[str, int]]) -> dict[int, str]:
        """Per cell, the candidate with the highest applied position; ties go to the one
        given the fewest cells so far (a lost region's load is spread)."""
        rule = self.ctx.board.rule
        given: dict[str, int] = dict.fromkeys(self.candidates, 0)
        chosen: dict[int, str] = {}
        for cell in self.cells:
            name = rule.cells[cell].name
            answering = [c for c in self.candidates if c in positions]
            if not answering:
                raise FailoverStopped("no candidate region answers: nothing can be promoted")
            best = max(
                answering,
                key=lambda r: (positions[r].get(name, 0), -given[r], -self.candidates.index(r)),
            )
            chosen[cell] = best
            given[best] += 1
        return chosen

    async def _ban(self) -> None:
        await self.begin("ban")
        rule = self.ctx.board.rule
        if "assignment" in self.op.detail:
            assignment = {int(c): str(r) for c, r in self.op.detail["assignment"].items()}
        else:
            positions = await self._positions(self.candidates)
            assignment = self._assign(positions)
            await self.ctx.store.record(
                self.op,
                "ban",
                "note",
                {
                    "assignment": {str(c): r for c, r in assignment.items()},
                    "positions_before": positions,
                },
            )
        published = all(rule.owner_of(c) == r and rule.is_banned(c) for c, r in assignment.items())
        if "ban_version" in self.op.detail or published:
            version = int(self.op.detail.get("ban_version", rule.version))
        else:
            banned = rule.derive(
                rule.version + 1, owners=assignment, banned=rule.banned | set(assignment)
            )
            await self.ctx.board.publish(
                banned, f"{self.op.id}: failover of {self.lost}: cells {self._names()}", self.op.id
            )
            version = banned.version
            await self.ctx.store.record(self.op, "ban", "note", {"ban_version": version})
        targets = sorted(set(assignment.values()))
        timeout_s = self.ctx.limits.ack_timeout_ms / 1000
        missing = targets
        for _ in range(ACK_ROUNDS_MAX):
            missing = await self.ctx.board.wait_acks(version, targets, timeout_s)
            if not missing:
                break
        if missing:
            raise FailoverStopped(
                f"targets {missing} did not acknowledge rule version {version}: the cells "
                f"stay banned under them; fail them over in turn (unitrade failover --region)"
            )
        await self.done("ban", {"ban_version": version})

    async def _promote(self) -> None:
        """The targets own the cells, banned, and have acknowledged: they apply nothing more
        from the lost region and write nothing, so their positions are final."""
        await self.begin("promote")
        rule = self.ctx.board.rule
        assignment = {int(c): str(r) for c, r in self.op.detail["assignment"].items()}
        positions = await self._positions(sorted(set(assignment.values())))
        promoted: dict[str, int] = {}
        for cell, target in assignment.items():
            name = rule.cells[cell].name
            if target not in positions:
                raise FailoverStopped(f"target {target} does not answer: cell {name} waits")
            promoted[name] = positions[target][name]
        await self.done("promote", {"promoted_positions": promoted})

    async def _publish(self) -> None:
        await self.begin("publish")
        rule = self.ctx.board.rule
        version = int(self.op.detail["ban_version"])
        assignment = {int(c): str(r) for c, r in self.op.detail["assignment"].items()}
        promoted = self.op.detail["promoted_positions"]
        # A second past any the lost region can have issued order IDs in: its lease has
        # ended, its wall clock is within clock_offset_ms_max of this one, and it borrows
        # at most AHEAD_S_MAX seconds (storage/sequences.py).
        id_time_s = int(
            self.op.detail.get("id_time_s")
            or unix_to_id_time(
                time.time() + self.ctx.limits.clock_offset_ms_max / 1000 + AHEAD_S_MAX
            )
            + 1
        )
        records = {
            cell: Promotion(
                version=version,
                position=int(promoted[rule.cells[cell].name]),
                source=self.lost,
                to=target,
                id_time_s=id_time_s,
            )
            for cell, target in assignment.items()
        }
        done = all(
            any(p.version == version for p in rule.promotions_of(c)) and not rule.is_banned(c)
            for c in assignment
        )
        if done:
            published: Rule = rule
        else:
            published = await self.ctx.board.publish(
                rule.derive(
                    rule.version + 1,
                    banned=rule.banned - set(assignment),
                    promoted=records,
                ),
                f"{self.op.id}: failover of {self.lost}: cells {self._names()} promoted",
                self.op.id,
            )
        survivors = [r for r in self.ctx.board.connected() if r != self.lost]
        missing = await self.ctx.board.wait_acks(
            published.version, survivors, self.ctx.limits.ack_timeout_ms / 1000
        )
        await self.done(
            "publish",
            {
                "publish_version": published.version,
                "id_time_s": id_time_s,
                "not_acknowledged": missing,
            },
        )

    async def _report(self) -> None:
        await self.begin("report")
        rule = self.ctx.board.rule
        assignment = {int(c): str(r) for c, r in self.op.detail["assignment"].items()}
        known = self.op.detail.get("known_positions", {})
        before = self.op.detail.get("positions_before", {})
        cells: list[dict[str, Any]] = []
        missing_total = 0
        for cell, target in sorted(assignment.items()):
            name = rule.cells[cell].name
            promoted = int(self.op.detail["promoted_positions"][name])
            seen = {k: int(v) for k, v in known.get(name, {}).items()}
            highest = max(seen.values(), default=promoted)
            missing_total += max(0, highest - promoted)
            cells.append(
                {
                    "cell": name,
                    "from": self.lost,
                    "to": target,
                    "promoted_position": promoted,
                    "known_position": max(highest, promoted),
                    "known_from": seen,
                    "missing_at_least": max(0, highest - promoted),
                    "survivor_positions": {r: int(p[name]) for r, p in before.items() if name in p},
                }
            )
        report = {
            "region": self.lost,
            "rule_version": int(self.op.detail["ban_version"]),
            "cells": cells,
            "missing_at_least": missing_total,
            "exact": (
                f"changes {self.lost} made past each promotion position are listed, once it "
                f"runs again, by `unitrade quarantine list --region {self.lost}`"
            ),
        }
        total_ms = now_ms() - self.op.created_ms
        await self.ctx.store.record(
            self.op,
            "report",
            "done",
            {"loss_report": report, "total_ms": total_ms, "report_ms": 0},
            state="done",
        )
        log.warning(
            "%s: failed over %s (cells %s) in %d ms; at least %d changes missing",
            self.op.id,
            self.lost,
            self._names(),
            total_ms,
            report["missing_at_least"],
        )
