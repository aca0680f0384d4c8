"""The switchover pre-check against a test double of the regions' health answers: lag over
either limit, an unhealthy or disconnected region, and bad requests are refused."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from unitrade.control.board import RuleBoard
from unitrade.control.switchover import Control, precheck
from unitrade.errors import RegionUnavailable, SwitchRefused
from unitrade.topology.config import default_config
from unitrade.topology.rule import initial_rule

CONFIG = default_config()
RULE = initial_rule(CONFIG)


class FakeRegions(Control):
    """Canned /healthz answers per region; None for a region that does not answer."""

    def __init__(self, answers: dict[str, dict[str, Any] | None]) -> None:
        board = RuleBoard(store=None, rule=RULE, regions=CONFIG.region_names)  # type: ignore[arg-type]
        now = time.monotonic()
        for seen in board.regions.values():
            process = seen.worker(0)  # a region of one process
            process.acked = {"gateway": 1, "rpc": 1, "dal": 1}
            process.last_seen = now
        super().__init__(CONFIG, None, board, None)  # type: ignore[arg-type]
        self.answers = answers

    async def health(self, region: str) -> dict[str, Any]:
        answer = self.answers.get(region)
        if answer is None:
            raise RegionUnavailable(f"region {region} is unreachable", region=region)
        return answer


def healthz(u3: int, lag_ms: int = 0) -> dict[str, Any]:
    return {
        "status": "ok",
        "positions": {"u3": u3},
        "replication": [{"cell": 3, "lag_ms": lag_ms}],
    }


def run(ctx: Control, cells: list[int], target: str) -> dict[str, Any]:
    return asyncio.run(precheck(ctx, cells, target))


def test_caught_up_target_passes_with_the_lag_figures() -> None:
    ctx = FakeRegions({"sh": healthz(100), "hz": healthz(98, lag_ms=12)})
    figures = run(ctx, [3], "hz")
    assert figures["lag"] == {"u3": {"positions": 2, "ms": 12}}


def test_lag_in_positions_over_the_limit_is_refused() -> None:
    limit = CONFIG.control.lag_positions_max
    ctx = FakeRegions({"sh": healthz(limit + 101), "hz": healthz(100)})
    with pytest.raises(SwitchRefused, match="behind on cell u3"):
        run(ctx, [3], "hz")


def test_lag_in_ms_over_the_limit_is_refused() -> None:
    ctx = FakeRegions({"sh": healthz(10), "hz": healthz(10, CONFIG.control.lag_ms_max + 1)})
    with pytest.raises(SwitchRefused, match="ms"):
        run(ctx, [3], "hz")


def test_unreachable_target_or_owner_is_refused() -> None:
    with pytest.raises(SwitchRefused, match="hz is unreachable"):
        run(FakeRegions({"sh": healthz(1), "hz": None}), [3], "hz")
    with pytest.raises(SwitchRefused, match="sh is unreachable"):
        run(FakeRegions({"sh": None, "hz": healthz(1)}), [3], "hz")


def test_disconnected_target_is_refused() -> None:
    ctx = FakeRegions({"sh": healthz(1), "hz": healthz(1)})
    ctx.board.regions["hz"].worker(0).last_seen = 0.0
    with pytest.raises(SwitchRefused, match="not connected"):
        run(ctx, [3], "hz")


def test_bad_requests_are_refused() -> None:
    ctx = FakeRegions({"sh": healthz(1), "hz": healthz(1)})
    with pytest.raises(SwitchRefused, match="already owned"):
        run(ctx, [3], "sh")
    with pytest.raises(SwitchRefused, match="unknown target"):
        run(ctx, [3], "nowhere")
    with pytest.raises(SwitchRefused, match="unknown cell"):
        run(ctx, [77], "hz")
