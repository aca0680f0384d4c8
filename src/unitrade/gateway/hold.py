"""Holding writes to a banned cell (docs/architecture.md, "Holds").

While a switchover bans a cell, no region may write it. Rather than fail those writes, a
gateway holds them until a rule lifts the ban (the switch finished, or rolled back) and then
sends them to the owner of that rule: clients see added latency, not errors. A hold is
bounded twice: in time (`hold_ms`, 2 s by default; the switch itself takes well under
that) and in number (`hold_requests_max` held at once: each held request keeps a client
connection and a task). Past either bound the client gets `write_banned`, HTTP 503 with
Retry-After.

Vitess users saw overlapping buffering windows stall traffic under high QPS
(vitess#15707); here each request has its own deadline, taken when it arrived, and the
count bound refuses at once instead of queueing.
"""

from __future__ import annotations

import time

from unitrade.errors import WriteBanned
from unitrade.topology.rule import Rule
from unitrade.topology.rule_view import RuleView

RETRY_POLL_S = 0.05  # after a refusal by another region, how soon to look again


class Holds:
    def __init__(self, view: RuleView, hold_ms: int, held_max: int) -> None:
        assert hold_ms >= 0 and held_max >= 0
        self.view = view
        self.hold_s = hold_ms / 1000
        self.held_max = held_max
        self.held = 0  # requests waiting now
        self.held_total = 0  # requests that ever waited
        self.refused_total = 0  # requests answered write_banned after a hold or at the bound

    def deadline(self) -> float:
        return time.monotonic() + self.hold_s

    def refuse(self, cell: int, message: str) -> WriteBanned:
        """The error a write gets past the hold (counted); the caller raises it."""
        self.refused_total += 1
        return WriteBanned(message, cell=cell)

    async def until_unbanned(self, cell: int, rule: Rule, deadline: float) -> Rule:
        """Wait until a rule no longer bans `cell`; WriteBanned past the deadline or bound."""
        if not rule.is_banned(cell):
            return rule
        if self.held >= self.held_max:
            raise self.refuse(
                cell,
                f"cell {cell} is banned for a switch and {self.held} writes are already held; "
                "retry shortly",
            )
        self.held += 1
        self.held_total += 1
        try:
            while rule.is_banned(cell):
                left = deadline - time.monotonic()
                if left <= 0:
                    held_s = f"{self.hold_s:g}"
                    raise self.refuse(
                        cell, f"cell {cell} is banned for a switch; held {held_s} s, retry shortly"
                    )
                rule = await self.view.changed(rule.version, left)
        finally:
            self.held -= 1
        return rule

    async def after_refusal(self, version: int, deadline: float) -> bool:
        """A region refused a write under rule `version` (banned or not the owner there):
        wait briefly for a newer rule; False when the deadline has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.held += 1
        self.held_total += 1
        try:
            await self.view.changed(version, min(left, RETRY_POLL_S))
        finally:
            self.held -= 1
        return True
