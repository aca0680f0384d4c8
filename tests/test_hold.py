"""Holding writes to a banned cell: released by the rule that lifts the ban, refused with
write_banned past the hold time or past the number of held writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import pytest

from unitrade.errors import RegionUnavailable, WriteBanned
from unitrade.gateway.forward import Forwarder
from unitrade.gateway.hold import Holds
from unitrade.gateway.routing import Caller, Dispatcher, Passage
from unitrade.rpc.client import RegionClient, Reply
from unitrade.topology.config import default_config
from unitrade.topology.rule import initial_rule, route_cell
from unitrade.topology.rule_view import RuleView

RULE = initial_rule(default_config())
WAIT_S_MAX = 10.0  # a bound on every wait below; none is expected to come near it
BANNED = RULE.derive(2, banned={3})
MOVED = BANNED.derive(3, owners={3: "hz"}, banned=set())


async def held(holds: Holds, count: int) -> None:
    """Wait until `count` writes are held."""
    deadline = time.monotonic() + WAIT_S_MAX
    while holds.held < count:
        assert time.monotonic() < deadline, f"{holds.held} writes held, not {count}"
        await asyncio.sleep(0.001)


def test_a_held_write_goes_on_under_the_rule_that_lifts_the_ban() -> None:
    async def scenario() -> None:
        view = RuleView("gateway", BANNED)
        holds = Holds(view, hold_ms=2000, held_max=10)
        waiting = asyncio.create_task(holds.until_unbanned(3, BANNED, holds.deadline()))
        await held(holds, 1)
        assert not waiting.done()
        await view.install(MOVED)
        rule = await asyncio.wait_for(waiting, WAIT_S_MAX)
        assert rule.version == 3 and rule.owner_of(3) == "hz"
        assert holds.held == 0 and holds.held_total == 1 and holds.refused_total == 0

    asyncio.run(scenario())


def test_past_the_hold_time_the_write_is_refused() -> None:
    async def scenario() -> None:
        holds = Holds(RuleView("gateway", BANNED), hold_ms=200, held_max=10)
        deadline = holds.deadline()
        with pytest.raises(WriteBanned) as refused:
            await asyncio.wait_for(holds.until_unbanned(3, BANNED, deadline), WAIT_S_MAX)
        assert time.monotonic() >= deadline  # held until its hold time, not refused before
        assert refused.value.status == 503 and refused.value.retry_after_s == 1
        assert holds.refused_total == 1 and holds.held == 0

    asyncio.run(scenario())


def test_past_the_number_bound_a_write_is_refused_at_once() -> None:
    async def scenario() -> None:
        view = RuleView("gateway", BANNED)
        holds = Holds(view, hold_ms=5000, held_max=2)
        waiting = [
            asyncio.create_task(holds.until_unbanned(3, BANNED, holds.deadline())) for _ in range(2)
        ]
        await held(holds, 2)
        # Refused at once: on its very first step, without ever waiting on the loop.
        attempt = holds.until_unbanned(3, BANNED, holds.deadline())
        with pytest.raises(WriteBanned, match="already held"):
            attempt.send(None)
        assert holds.held == 2 and holds.refused_total == 1
        await view.install(MOVED)
        await asyncio.wait_for(asyncio.gather(*waiting), WAIT_S_MAX)

    asyncio.run(scenario())


def test_a_write_to_a_cell_that_is_not_banned_is_not_held() -> None:
    async def scenario() -> None:
        holds = Holds(RuleView("gateway", BANNED), hold_ms=2000, held_max=0)
        assert await holds.until_unbanned(4, BANNED, holds.deadline()) is BANNED
        assert holds.held_total == 0

    asyncio.run(scenario())


class _Refusing(Forwarder):
    """A transport whose owner always answers that it is not the owner (the regions
    disagree about the rule for longer than the hold)."""

    def __init__(self, view: RuleView) -> None:
        super().__init__(view, "hz", RegionClient(default_config(), "hz"))
        self.sent = 0

    async def send(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        owner: str,
        timeout_s: float | None = None,
        guarded: bool = True,
    ) -> Reply:
        self.sent += 1
        refusal = b'{"error": "wrong_region", "message": "not the owner", "owner": "bj"}'
        return Reply(421, {"content-type": "application/json"}, refusal)


@pytest.mark.parametrize(
    ("method", "expected"), [("POST", WriteBanned), ("GET", RegionUnavailable)]
)
def test_past_the_hold_a_client_gets_503_never_the_internal_421(
    method: str, expected: type[Exception]
) -> None:
    async def scenario() -> None:
        view = RuleView("gateway", RULE)
        holds = Holds(view, hold_ms=200, held_max=10)
        forwarder = _Refusing(view)
        dispatcher = Dispatcher("hz", view, holds, forwarder)
        who = Caller(principal=None, forwarded_from=None)
        passage = Passage(method, "/v1/cart", {}, b"", who, holds.deadline(), {})
        sh_cell = next(c for c, owner in RULE.owners.items() if owner == "sh")
        with pytest.raises(expected) as refused:
            await asyncio.wait_for(
                dispatcher.run(passage, lambda rule: route_cell(rule, sh_cell), None), WAIT_S_MAX
            )
        assert getattr(refused.value, "status", None) == 503
        assert forwarder.sent >= 2  # sent again while the hold lasted

    asyncio.run(scenario())
