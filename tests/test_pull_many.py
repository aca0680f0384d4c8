"""The multiplexed pull, in one process: one long poll per (follower, owner) pair carries
every cell the follower follows from that owner; each cell stays its own stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from unitrade.errors import error_from_body
from unitrade.replication import replicator as replication
from unitrade.replication import wire as wire_models
from unitrade.replication.replicator import (
    PULL_TARGET,
    Followers,
    Replicator,
    fair_shares,
    serve_pull,
    serve_pull_many,
)
from unitrade.replication.snapshot import SNAPSHOT_TARGET, serve_snapshot
from unitrade.storage.copies import CellCopies
from unitrade.storage.fence import Fence
from unitrade.storage.schema import carts, products
from unitrade.topology.config import TopologyConfig, default_config
from unitrade.topology.rule import Rule, initial_rule

CONFIG = default_config()
RULE = initial_rule(CONFIG)
CELL = {info.name: cell for cell, info in RULE.cells.items()}
HZ_CELLS = [CELL["u1"], CELL["u2"], CELL["center"], CELL["global"]]  # hz owns these


def wire(reply: Any) -> Any:
    """A reply as the other side gets it: encoded (changes arrive pre-encoded) and decoded."""
    return orjson.loads(orjson.dumps(reply))


class Regions:
    """Every region's cell copies in this process, and a client that calls their internal
    replication API directly, recording each pull."""

    def __init__(self, data_dir: Path) -> None:
        self.config: TopologyConfig = CONFIG
        self.copies = {
            r: CellCopies(CONFIG, r, data_dir, Fence(r, RULE)) for r in CONFIG.region_names
        }
        self.followers = {r: Followers() for r in CONFIG.region_names}
        self.pulls: list[tuple[str, dict[str, Any]]] = []  # (owner, payload)
        self.ahead: list[int] = []  # cells pulled after a position the copy had not reached
        self.region = ""

    def client(self, region: str) -> Any:
        regions = self

        class Client:
            config = regions.config

            async def call(self, peer: str, method: str, target: str, payload: Any) -> Any:
                assert peer != region and method == "POST"
                copies = regions.copies[peer]
                if target == PULL_TARGET:
                    regions.pulls.append((peer, payload))
                    for c in payload["cells"]:
                        if c["after"] > regions.copies[region][c["cell"]].position:
                            regions.ahead.append(c["cell"])
                    pull = wire_models.PullManyCall.model_validate(payload)
                    assert pull.region is not None
                    return wire(
                        await serve_pull_many(
                            copies,
                            [(c.cell, c.after) for c in pull.cells],
                            pull.limit,
                            pull.wait_ms,
                            regions.followers[peer],
                            (pull.region, pull.rule_version),
                        )
                    )
                assert target == SNAPSHOT_TARGET
                s = wire_models.SnapshotCall.model_validate(payload)
                return await serve_snapshot(copies, s.cell, s.table, s.after, s.limit, s.upto)

        return Client()

    async def install(self, rule: Rule) -> None:
        await asyncio.gather(*(c.fence.install(rule) for c in self.copies.values()))

    def pulls_from(self, owner: str, since: int = 0) -> list[list[int]]:
        return [[c["cell"] for c in p["cells"]] for o, p in self.pulls[since:] if o == owner]


@asynccontextmanager
async def regions_open(data_dir: Path) -> AsyncIterator[Regions]:
    regions = Regions(data_dir)
    await asyncio.gather(*(c.open() for c in regions.copies.values()))
    try:
        yield regions
    finally:
        await asyncio.gather(*(c.close() for c in regions.copies.values()))


async def write_carts(regions: Regions, region: str, cell: int, n: int, first: int = 1) -> None:
    store = regions.copies[region][cell]
    for buyer in range(first, first + n):
        row = {"buyer_id": buyer, "sku": "A", "qty": 1, "updated_ms": 0}
        await store.write(lambda tx, row=row: tx.insert(carts, row))


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_fair_shares_never_give_more_than_wanted_and_share_the_rest() -> None:
    assert fair_shares({1: 10, 2: 0, 3: 700}, 2_000) == {1: 10, 2: 0, 3: 700}
    assert fair_shares({1: 500, 2: 500, 3: 500, 4: 500, 5: 500}, 2_000) == {
        c: 400 for c in range(1, 6)
    }
    assert fair_shares({1: 100, 2: 900, 3: 2_000}, 1_000) == {1: 100, 2: 450, 3: 450}


def test_one_pull_answers_every_owned_cell_and_refuses_the_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with regions_open(tmp_path) as regions:
            hz = regions.copies["hz"]
            await write_carts(regions, "hz", CELL["u1"], 3)
            await write_carts(regions, "hz", CELL["u2"], 2)
            followers = Followers()
            wanted = [(CELL["u1"], 1), (CELL["u2"], 0), (CELL["center"], 0), (CELL["u3"], 0)]
            reply = wire(await serve_pull_many(hz, wanted, 500, 2_000, followers, ("sh", 1)))
            by_cell = {e["cell"]: e for e in reply["cells"]}
            assert [c["position"] for c in by_cell[CELL["u1"]]["changes"]] == [2, 3]
            assert [c["position"] for c in by_cell[CELL["u2"]]["changes"]] == [1, 2]
            assert by_cell[CELL["center"]] == {"cell": CELL["center"], "head": 0, "changes": []}
            (refused,) = reply["errors"]  # u3 is sh's
            assert refused["cell"] == CELL["u3"] and refused["error"] == "wrong_region"
            assert error_from_body(421, refused).details["owner"] == "sh"
            seen = followers.body({c: i.name for c, i in RULE.cells.items()})
            assert seen == {"u1": {"sh": 1}, "u2": {"sh": 1}, "center": {"sh": 1}}
            # The old single-cell pull still answers in its own shape.
            single = wire(await serve_pull(hz, CELL["u1"], 0, 2, 0))
            assert single["head"] == 3 and [c["position"] for c in single["changes"]] == [1, 2]

    asyncio.run(scenario())


def test_rows_per_reply_are_bounded_in_all_and_per_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "PULL_ROWS_MAX", 5)

    async def scenario() -> None:
        async with regions_open(tmp_path) as regions:
            await write_carts(regions, "hz", CELL["u1"], 6)
            await write_carts(regions, "hz", CELL["u2"], 1)
            wanted = [(CELL["u1"], 0), (CELL["u2"], 0)]
            reply = wire(await serve_pull_many(regions.copies["hz"], wanted, 3, 0))
            rows = {e["cell"]: len(e["changes"]) for e in reply["cells"]}
            assert rows == {CELL["u1"]: 3, CELL["u2"]: 1}  # per cell: 3
            reply = wire(await serve_pull_many(regions.copies["hz"], wanted, 500, 0))
            rows = {e["cell"]: len(e["changes"]) for e in reply["cells"]}
            assert rows == {CELL["u1"]: 4, CELL["u2"]: 1}  # in all: 5
            assert {e["head"] for e in reply["cells"]} == {6, 1}

    asyncio.run(scenario())


def test_a_caught_up_pull_waits_for_a_commit_in_any_of_its_cells(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with regions_open(tmp_path) as regions:
            hz = regions.copies["hz"]
            await write_carts(regions, "hz", CELL["u1"], 1)
            wanted = [(CELL["u1"], 1), (CELL["u2"], 0)]
            started = time.monotonic()
            quiet = wire(await serve_pull_many(hz, wanted, 500, 100))
            assert time.monotonic() - started >= 0.09
            assert all(e["changes"] == [] for e in quiet["cells"])
            pull = asyncio.ensure_future(serve_pull_many(hz, wanted, 500, 2_000))
            await asyncio.sleep(0.05)
            assert not pull.done()
            started = time.monotonic()
            await write_carts(regions, "hz", CELL["u2"], 1)
            reply = wire(await pull)
            waited = time.monotonic() - started
            # Woken by the commit, then the batch window: well before the 2 s wait ran out
            # (the bound is the wait itself, not a guess at this machine's speed).
            assert replication.BATCH_WINDOW_S <= waited < 2.0
            by_cell = {e["cell"]: e for e in reply["cells"]}
            assert len(by_cell[CELL["u2"]]["changes"]) == 1
            assert by_cell[CELL["u1"]]["changes"] == []

    asyncio.run(scenario())


def test_a_follower_pulls_every_cell_of_an_owner_at_once_and_follows_a_new_owner(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with regions_open(tmp_path) as regions:
            applied: list[tuple[int, int]] = []
            sh = Replicator(
                regions.copies["sh"],
                regions.client("sh"),
                [lambda cell, changes: applied.append((cell, len(changes)))],
            )
            names = {c: i.name for c, i in RULE.cells.items()}
            hz, sh_copies = regions.copies["hz"], regions.copies["sh"]
            sh.start()
            try:
                await write_carts(regions, "hz", CELL["u1"], 5)
                await write_carts(regions, "hz", CELL["u2"], 3)
                await write_carts(regions, "bj", CELL["u5"], 2)
                row = {"sku": "P", "title": "p", "price_cents": 1, "updated_ms": 0, "version": 1}
                await hz[CELL["global"]].write(lambda tx: tx.insert(products, row))
                await until(
                    lambda: all(
                        sh_copies[c].position == regions.copies[RULE.owner_of(c)][c].position
                        for c in sh_copies.stores
                    )
                )
                # One pull per owner, each for every cell sh follows from it.
                assert {tuple(cells) for cells in regions.pulls_from("hz")} == {tuple(HZ_CELLS)}
                assert {tuple(cells) for cells in regions.pulls_from("bj")} == {
                    (CELL["u5"], CELL["u6"])
                }
                assert (CELL["global"], 1) in applied
                seen = regions.followers["hz"].body(names)
                assert seen == {n: {"sh": 1} for n in ("u1", "u2", "center", "global")}
                status = {s["cell_name"]: s for s in sh.status()}
                assert status["u1"]["applied"] == 5 and status["u1"]["source"] == "hz"
                assert status["u1"]["applied_rows"] == 5 and status["u1"]["lag_positions"] == 0
                assert "u3" not in status  # sh's own

                # Switch: u1 from hz to bj, u5 from bj to sh (both caught up, as the
                # switchover makes sure of before it publishes).
                moved = RULE.derive(2, owners={CELL["u1"]: "bj", CELL["u5"]: "sh"})
                bj_u1 = regions.copies["bj"][CELL["u1"]]
                await bj_u1.apply(await hz[CELL["u1"]].changes_since(0, 100))
                before = len(regions.pulls)
                await regions.install(moved)
                sh.wake()
                await write_carts(regions, "bj", CELL["u1"], 2, first=100)
                await write_carts(regions, "hz", CELL["u2"], 1, first=100)
                await until(lambda: sh_copies[CELL["u1"]].position == 7)
                await until(lambda: sh_copies[CELL["u2"]].position == 4)
                after_hz = regions.pulls_from("hz", before)
                after_bj = regions.pulls_from("bj", before)
                assert after_hz and all(CELL["u1"] not in cells for cells in after_hz)
                assert after_bj and all(cells == [CELL["u1"], CELL["u6"]] for cells in after_bj)
                assert regions.followers["bj"].body(names)["u1"] == {"sh": 2}
                status = {s["cell_name"]: s for s in sh.status()}
                assert status["u1"]["source"] == "bj" and "u5" not in status
                # sh owns u5 now: it writes there, and nothing it pulls touches it.
                await write_carts(regions, "sh", CELL["u5"], 1, first=100)
                assert sh_copies[CELL["u5"]].position == 3
                assert sum(s["errors"] for s in sh.status()) == 0
            finally:
                await sh.stop()

    asyncio.run(scenario())


def test_a_stream_refused_by_its_owner_backs_off_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with regions_open(tmp_path) as regions:
            sh = Replicator(regions.copies["sh"], regions.client("sh"))
            sh_copies = regions.copies["sh"]
            await write_carts(regions, "hz", CELL["u2"], 1)
            u2 = regions.copies["hz"][CELL["u2"]]
            await sh_copies[CELL["u2"]].apply(await u2.changes_since(0, 10))
            # hz already has a rule in which u2 is bj's; sh does not know it yet.
            await regions.copies["hz"].fence.install(RULE.derive(2, owners={CELL["u2"]: "bj"}))
            sh.start()
            try:
                await write_carts(regions, "hz", CELL["u1"], 4)
                await until(lambda: sh_copies[CELL["u1"]].position == 4)
                status = {s["cell_name"]: s for s in sh.status()}
                assert status["u2"]["errors"] >= 1 and "WrongRegion" in status["u2"]["last_error"]
                assert status["u1"]["errors"] == 0 and status["u1"]["last_error"] == ""
            finally:
                await sh.stop()

    asyncio.run(scenario())


def test_a_stream_refused_by_a_new_owner_late_with_the_rule_follows_it_soon(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with regions_open(tmp_path) as regions:
            sh = Replicator(regions.copies["sh"], regions.client("sh"))
            sh_copies, bj = regions.copies["sh"], regions.copies["bj"]
            await write_carts(regions, "hz", CELL["u1"], 2)
            sh.start()
            try:
                await until(lambda: sh_copies[CELL["u1"]].position == 2)
                await bj[CELL["u1"]].apply(
                    await regions.copies["hz"][CELL["u1"]].changes_since(0, 10)
                )
                # sh has the rule that gives u1 to bj before bj does: bj refuses u1 (and
                # long-polls its own quiet cells u5 and u6) until it has it too.
                moved = RULE.derive(2, owners={CELL["u1"]: "bj"})
                await regions.copies["hz"].fence.install(moved)
                await sh_copies.fence.install(moved)
                started = time.monotonic()
                sh.wake()
                await until(lambda: sh.streams[CELL["u1"]].errors >= 1)
                await bj.fence.install(moved)
                await write_carts(regions, "bj", CELL["u1"], 1, first=100)
                await until(lambda: sh_copies[CELL["u1"]].position == 3)
                # Before the other cells' long poll (2 s) could have ended: neither the
                # refusal nor the retry waits for it.
                assert time.monotonic() - started < 2.0
                names = {c: i.name for c, i in RULE.cells.items()}
                assert regions.followers["bj"].body(names)["u1"] == {"sh": 2}
            finally:
                await sh.stop()

    asyncio.run(scenario())


def test_a_follower_behind_pulls_the_next_batch_while_it_applies_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "BATCH_ROWS_MAX", 4)
    monkeypatch.setattr(replication, "PULL_ROWS_MAX", 6)

    async def scenario() -> None:
        async with regions_open(tmp_path) as regions:
            sh = Replicator(regions.copies["sh"], regions.client("sh"))
            hz, sh_copies = regions.copies["hz"], regions.copies["sh"]
            await write_carts(regions, "hz", CELL["u1"], 40)
            await write_carts(regions, "hz", CELL["u2"], 15)
            u2 = sh_copies[CELL["u2"]]
            real_apply = u2.apply
            failures = []

            async def apply_failing_once(changes: Any) -> int:
                if not failures and u2.position >= 4:
                    failures.append(u2.position)
                    raise OSError("disk full, once")
                return await real_apply(changes)

            monkeypatch.setattr(u2, "apply", apply_failing_once)
            sh.start()
            try:
                await until(lambda: sh_copies[CELL["u1"]].position == 40)
                await until(lambda: u2.position == 15)
            finally:
                await sh.stop()
            for cell in (CELL["u1"], CELL["u2"]):
                theirs = await hz[cell].changes_since(0, 100)
                ours = await sh_copies[cell].changes_since(0, 100)
                assert ours == theirs  # every change once, in order
            status = {s["cell_name"]: s for s in sh.status()}
            assert status["u1"]["applied_rows"] == 40 and status["u1"]["errors"] == 0
            assert status["u2"]["applied_rows"] == 15 and status["u2"]["errors"] == 1
            # Batches asked for before the one before them was applied.
            assert CELL["u1"] in regions.ahead

    asyncio.run(scenario())
