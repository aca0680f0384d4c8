"""Degradation switches (topology/flow_rules.py SWITCHES): each turns off what it is named
after while it is on. The switch a request needs is checked where the request is routed or
served; a switched-off write is refused with 503 `degraded`, nothing applied."""

from __future__ import annotations

from unitrade.errors import Degraded
from unitrade.topology.flow_rules import SWITCHES, FlowRules


def check_switch(rules: FlowRules, switch: str) -> None:
    """Degraded when `switch` is on."""
    if rules.switch_on(switch):
        raise Degraded(
            f"degraded: {SWITCHES[switch]} (switch {switch} is on; `unitrade degrade {switch} "
            "off` turns it back); nothing was applied",
            switch=switch,
        )
