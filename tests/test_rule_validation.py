"""A rule built from input (the wire, a file, the control plane's store) is checked for real:
the checks hold under `python -O`, which strips asserts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from unitrade.control.board import RuleBoard
from unitrade.control.store import SqlControlStore, StaleRule
from unitrade.region import RegionRuntime
from unitrade.topology.config import default_config
from unitrade.topology.rule import RoutingError, check_rule_fits, initial_rule, rule_from_body

CONFIG = default_config()
RULE = initial_rule(CONFIG)


def _body(**changes: Any) -> dict[str, Any]:
    return {**RULE.body(), **changes}


BAD_BODIES = {
    "version 0, no owners": _body(version=0, owners={}),
    "version 0": _body(version=0),
    "no owners": _body(owners={}),
    "a float version": _body(version=2.5),
    "a boolean version": _body(version=True),
    "no buckets": _body(bucket_cells=[]),
    "a bucket on an unknown cell": _body(bucket_cells=[99] * 100),
    "a bucket on the center cell": _body(bucket_cells=[RULE.center_cell] * 100),
    "a banned cell that is not a cell": _body(banned=[99]),
    "an owner that is not a name": _body(owners={**RULE.body()["owners"], "1": 7}),
    "no center cell": _body(cells=[c for c in RULE.body()["cells"] if c["kind"] != "center"]),
    "cells not a list of objects": _body(cells=[1, 2]),
    "not an object": [1, 2, 3],
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_a_bad_rule_body_is_a_routing_error(name: str) -> None:
    with pytest.raises(RoutingError, match="not a valid rule"):
        rule_from_body(BAD_BODIES[name])


def test_a_good_body_round_trips() -> None:
    assert rule_from_body(orjson.loads(orjson.dumps(RULE.body()))) == RULE


def test_the_checks_hold_under_python_dash_o() -> None:
    """The assert-based checks accepted version 0 with no owners under -O."""
    program = (
        "import sys, orjson\n"
        "assert False, 'asserts are stripped under -O'\n"
        "from unitrade.topology.rule import RoutingError, rule_from_body, Rule\n"
        "bodies = orjson.loads(sys.stdin.buffer.read())\n"
        "for name, body in bodies.items():\n"
        "    try:\n"
        "        rule_from_body(body)\n"
        "    except RoutingError:\n"
        "        continue\n"
        "    sys.exit('accepted: ' + name)\n"
        "try:\n"
        "    Rule(version=0, bucket_cells=(), cells={}, owners={})\n"
        "except RoutingError:\n"
        "    print('all refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-O", "-c", program],
        input=orjson.dumps(BAD_BODIES),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "all refused"


def test_a_rule_that_does_not_fit_the_topology_is_refused() -> None:
    check_rule_fits(RULE, CONFIG)
    stranger = RULE.derive(2, owners={1: "nowhere"})
    with pytest.raises(RoutingError, match="not regions of the topology"):
        check_rule_fits(stranger, CONFIG)
    fewer_buckets = rule_from_body(_body(bucket_cells=RULE.body()["bucket_cells"][:10]))
    with pytest.raises(RoutingError, match="buckets"):
        check_rule_fits(fewer_buckets, CONFIG)


def test_deriving_a_rule_checks_for_real() -> None:
    with pytest.raises(RoutingError, match="only grow"):
        RULE.derive(1)
    with pytest.raises(RoutingError, match="cannot add cells"):
        RULE.derive(2, owners={99: "hz"})
    with pytest.raises(RoutingError, match="not cells of the rule"):
        RULE.derive(2, banned={99})


def test_a_stored_rule_for_another_topology_stops_the_region(tmp_path: Path) -> None:
    rule_path = tmp_path / "hz" / "rule.json"
    rule_path.parent.mkdir(parents=True)
    rule_path.write_bytes(orjson.dumps(RULE.derive(2, owners={1: "nowhere"}).body()))
    with pytest.raises(RuntimeError, match="unreadable rule"):
        RegionRuntime(CONFIG, "hz", tmp_path)


def test_the_control_plane_publishes_only_rules_the_regions_can_install(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SqlControlStore(f"sqlite:///{tmp_path}/control.db")
        first = await store.open(CONFIG, RULE)
        board = RuleBoard(store, first, CONFIG.region_names)
        try:
            with pytest.raises(StaleRule, match="one at a time"):
                await board.publish(RULE.derive(3), "skips a version", None)
            with pytest.raises(RoutingError, match="unknown regions"):
                await board.publish(RULE.derive(2, owners={1: "nowhere"}), "a stranger", None)
            assert board.rule == RULE
            published = await board.publish(RULE.derive(2, banned={1}), "a ban", None)
            assert board.rule == published and published.version == 2
        finally:
            await store.close()

    asyncio.run(scenario())
