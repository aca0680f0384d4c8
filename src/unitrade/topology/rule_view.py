"""A component's view of the rule (docs/architecture.md).

Every component of a region that routes or writes holds the rule it acts on and the version
it has acknowledged, meaning "in force here". For the gateway and the RPC client a rule is
in force as soon as it is held: each decision reads the rule once. The data access layer's
view is the fence (storage/fence.py), which acknowledges only when the writes admitted
under older versions have finished.
"""

from __future__ import annotations

import asyncio

from unitrade.topology.rule import Rule


class RuleView:
    def __init__(self, component: str, rule: Rule) -> None:
        self.component = component
        self._rule = rule
        self.acked = rule.version
        self._changed = asyncio.Event()

    @property
    def rule(self) -> Rule:
        return self._rule

    async def install(self, rule: Rule) -> None:
        if rule.version < self._rule.version:
            raise ValueError(f"rule versions only grow: {rule.version} < {self._rule.version}")
        self._rule = rule
        self.acked = rule.version
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, after_version: int, timeout_s: float) -> Rule:
        """The rule once its version is above `after_version`, or the current one when
        `timeout_s` passes first."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._rule.version <= after_version:
                    await self._changed.wait()
        except TimeoutError:
            pass
        return self._rule
