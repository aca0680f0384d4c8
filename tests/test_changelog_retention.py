"""Changelog retention: how far a copy trims, the trim on SQLite and PostgreSQL, a follower
the owner trimmed past rebuilding its copy, the bound under a long run, and diff."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, func, select

from tests.replication_support import positions, wait_converged
from tests.storage_support import make_store, sqlite_template
from tests.support import Api, free_ports, topology_toml
from tests.test_pull_many import CELL, Regions, until, wire, write_carts
from unitrade.cluster import LocalCluster
from unitrade.errors import ChangelogTrimmed
from unitrade.replication.diff import (
    CHUNK_ROWS_MAX,
    Key,
    Page,
    compare_page,
    next_chunk,
    range_checksum,
    read_page,
)
from unitrade.replication.diff_cli import diff as diff_command
from unitrade.replication.replicator import Replicator, serve_pull, serve_pull_many
from unitrade.rpc.signing import sign
from unitrade.storage.retention import TrimTargets, batch_end, trim_batch, trim_targets
from unitrade.storage.schema import carts, changelog
from unitrade.storage.store import CellStore, now_ms
from unitrade.topology.config import (
    ChangelogPolicy,
    ConfigError,
    TopologyConfig,
    parse_config,
)
from unitrade.topology.rule import route_buyer

U1 = CELL["u1"]  # hz owns it
HOUR_MS = 3_600_000


def policy(kept: int = 0, age_s: int = 0, rows_max: int = 1_000) -> ChangelogPolicy:
    return ChangelogPolicy(positions_kept=kept, age_s=age_s, positions_max=rows_max)


# -- the decision ----------------------------------------------------------------------------


def test_the_owner_keeps_what_a_follower_lacks_until_the_hard_bound() -> None:
    keep_10 = policy(kept=10, rows_max=1_000)
    assert trim_targets(100, keep_10, None) == TrimTargets(soft=90, hard=0)  # a replica
    assert trim_targets(100, keep_10, 40) == TrimTargets(soft=40, hard=0)  # a follower at 40
    assert trim_targets(100, keep_10, 0) == TrimTargets(soft=0, hard=0)  # one not seen yet
    assert trim_targets(5, keep_10, None) == TrimTargets(0, 0)
    assert trim_targets(5_000, keep_10, 40) == TrimTargets(soft=40, hard=4_000)


def test_a_batch_is_bounded_and_stops_at_the_first_young_row_unless_over_the_bound() -> None:
    assert batch_end(0, TrimTargets(soft=90, hard=0), 25, None) == 25
    assert batch_end(75, TrimTargets(soft=90, hard=0), 25, None) == 90
    assert batch_end(90, TrimTargets(soft=90, hard=0), 25, None) == 90  # nothing to do
    assert batch_end(0, TrimTargets(soft=90, hard=0), 25, 11) == 10  # rows 11.. are young
    assert batch_end(0, TrimTargets(soft=90, hard=0), 25, 1) == 0
    # Past positions_max, young rows go too, but only down to the hard target.
    assert batch_end(0, TrimTargets(soft=0, hard=20), 25, 5) == 20
    assert batch_end(0, TrimTargets(soft=90, hard=20), 25, 5) == 20
    assert batch_end(50, TrimTargets(soft=40, hard=0), 25, None) == 50  # never goes back


def test_per_cell_overrides_fall_back_to_the_retention_table() -> None:
    text = topology_toml([18701, 18702, 18703])
    text = text.replace(
        "[[cells]]\nid = 2\n",
        "[[cells]]\nid = 2\nretention = { changelog_positions_kept = 7 }\n",
    )
    text += "[retention]\nchangelog_age_s = 5\nchangelog_positions_max = 5000\n"
    text += "changelog_positions_kept = 100\n"
    config = parse_config(tomllib.loads(text))
    assert config.changelog_policy(2) == policy(kept=7, age_s=5, rows_max=5_000)
    assert config.changelog_policy(1) == policy(kept=100, age_s=5, rows_max=5_000)
    with pytest.raises(ConfigError, match=r"cells\.1\.retention: changelog_positions_kept"):
        parse_config(tomllib.loads(text.replace("kept = 7", "kept = 9000")))
    too_many = text.replace("changelog_positions_kept = 100\n", "changelog_positions_kept = 2000\n")
    with pytest.raises(ConfigError, match=r"retention: changelog_positions_kept \(2000\)"):
        parse_config(tomllib.loads(too_many.replace("max = 5000", "max = 1000")))
    with pytest.raises(ConfigError, match=r"cells\.1\.retention\.bogus"):
        parse_config(tomllib.loads(text.replace("kept = 7", "kept = 7, bogus = 1")))


# -- the trim, on both engines ---------------------------------------------------------------


def count_rows(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(changelog)).scalar_one())


def lowest(conn: Connection) -> int:
    return int(conn.execute(select(func.min(changelog.c.position))).scalar_one())


async def write_rows(store: CellStore, n: int, first: int = 1) -> None:
    for buyer in range(first, first + n):
        row = {"buyer_id": buyer, "sku": "A", "qty": 1, "updated_ms": 0}
        await store.write(lambda tx, row=row: tx.insert(carts, row))


async def trim(
    store: CellStore, rule: ChangelogPolicy, followers_min: int | None, cutoff_ms: int, rows: int
) -> int:
    work = functools.partial(
        trim_batch, policy=rule, followers_min=followers_min, cutoff_ms=cutoff_ms, rows=rows
    )
    return await store.write_local(work)


def test_the_owner_trims_in_batches_up_to_its_followers_and_keeps_young_rows(
    storage_url: str,
) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, U1)  # hz owns u1
        await store.open()
        try:
            await write_rows(store, 60)
            old = now_ms() + HOUR_MS  # every row is older than this cutoff
            # Every row is young: nothing goes, whatever the followers.
            assert await trim(store, policy(kept=10), 50, now_ms() - HOUR_MS, 20) == 0
            # Batches of 20, up to the slowest follower (at 45), not further.
            assert await trim(store, policy(kept=10), 45, old, 20) == 20
            assert await trim(store, policy(kept=10), 45, old, 20) == 40
            assert await trim(store, policy(kept=10), 45, old, 20) == 45
            assert await trim(store, policy(kept=10), 45, old, 20) == 45
            # Followers caught up: the newest 10 positions stay.
            assert await trim(store, policy(kept=10), 60, old, 100) == 50
            assert store.trimmed_position == 50 and store.position == 60
            assert await store.read(count_rows) == 10 and await store.read(lowest) == 51
            # The trim is never captured: the position did not move.
            assert await store.last_position() == 60
            # The tail and the database agree on what is left.
            sent = [orjson.loads(r)["position"] for r in await store.encoded_changes_since(50, 20)]
            assert sent == list(range(51, 61))
            # Reopened, the copy knows its trim point.
            await store.close()
            store = make_store(storage_url, U1)
            await store.open()
            assert store.trimmed_position == 50
        finally:
            await store.close()

    asyncio.run(scenario())


def test_past_positions_max_a_copy_trims_young_rows_and_past_a_dead_follower(
    storage_url: str,
) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, U1)
        await store.open()
        try:
            await write_rows(store, 30)
            young = now_ms() - HOUR_MS
            hard = policy(kept=0, age_s=3_600, rows_max=12)  # not what config allows: a unit
            # A follower stuck at 3 and young rows: the bound of 12 rows wins.
            assert await trim(store, hard, 3, young, 100) == 18
            assert await store.read(count_rows) == 12
            # The tail held rows the trim deleted: it serves nothing below the trim point.
            assert store._tail.first == 19
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_replica_trims_by_the_keep_rule_alone(storage_url: str) -> None:
    async def scenario() -> None:
        owner = make_store(storage_url.replace("{cell}", "own_{cell}"), U1)
        replica = make_store(storage_url.replace("{cell}", "rep_{cell}"), U1, region="sh")
        await asyncio.gather(owner.open(), replica.open())
        try:
            await write_rows(owner, 25)
            await replica.apply(await owner.changes_since(0, 100))
            assert await trim(replica, policy(kept=5), None, now_ms() + HOUR_MS, 100) == 20
            assert replica.trimmed_position == 20 and await replica.read(count_rows) == 5
            # It goes on applying after its trim.
            await write_rows(owner, 3, first=100)
            assert await replica.apply(await owner.changes_since(25, 100)) == 28
            assert await replica.read(count_rows) == 8
        finally:
            await asyncio.gather(owner.close(), replica.close())

    asyncio.run(scenario())


def test_a_database_from_before_retention_gets_its_trim_point(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = make_store(sqlite_template(tmp_path), U1)
        await store.open()
        await write_rows(store, 3)
        await store.close()
        path = tmp_path / "cell-u1.db"
        with sqlite3.connect(path) as conn:
            conn.execute("ALTER TABLE cell_meta DROP COLUMN trimmed_position")
        store = make_store(sqlite_template(tmp_path), U1)
        await store.open()
        try:
            assert store.trimmed_position == 0 and store.position == 3
            assert await trim(store, policy(kept=1), None, now_ms() + HOUR_MS, 10) == 2
        finally:
            await store.close()

    asyncio.run(scenario())


# -- replication: a follower the owner trimmed past ------------------------------------------


def small_retention(keep: int = 10) -> TopologyConfig:
    """The default topology with tiny changelog retention, swept every 0.1 s."""
    text = topology_toml([18701, 18702, 18703])
    text += (
        "[retention]\nchangelog_positions_kept = 100\nchangelog_age_s = 0\n"
        "changelog_positions_max = 1000\nsweep_batch_rows = 100\nsweep_interval_s = 0.1\n"
    )
    # u1 overrides the number of positions kept.
    text = text.replace(
        "[[cells]]\nid = 1\n",
        f"[[cells]]\nid = 1\nretention = {{ changelog_positions_kept = {keep} }}\n",
    )
    return parse_config(tomllib.loads(text))


@asynccontextmanager
async def replicating(
    data_dir: Path, config: TopologyConfig
) -> AsyncIterator[tuple[Regions, dict[str, Replicator]]]:
    """Every region's copies in this process, each with a started Replicator; the owner's
    side of a pull records followers where that region's Replicator trims from."""
    regions = Regions(data_dir)
    regions.config = config
    await asyncio.gather(*(c.open() for c in regions.copies.values()))
    replicators = {r: Replicator(regions.copies[r], regions.client(r)) for r in regions.copies}
    for region, replicator in replicators.items():
        regions.followers[region] = replicator.followers
        replicator.start()
    try:
        yield regions, replicators
    finally:
        await asyncio.gather(*(r.stop() for r in replicators.values()))
        await asyncio.gather(*(c.close() for c in regions.copies.values()))


async def rows_of(store: CellStore, table: Any, above: int = 0) -> list[tuple[Any, ...]]:
    def work(conn: Connection) -> list[tuple[Any, ...]]:
        statement = select(table).order_by(*table.primary_key.columns)
        if table is changelog:
            statement = statement.where(changelog.c.position > above)
        return [tuple(row) for row in conn.execute(statement)]

    return await store.read(work)


async def same_copies(owner: CellStore, replica: CellStore) -> None:
    """Business rows equal, and the changelog rows both copies still have."""
    assert await rows_of(replica, carts) == await rows_of(owner, carts)
    above = max(owner.trimmed_position, replica.trimmed_position)
    assert await rows_of(replica, changelog, above) == await rows_of(owner, changelog, above)
    assert replica.position == owner.position


def test_a_follower_trimmed_past_rebuilds_from_a_snapshot_and_streams_on(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with replicating(tmp_path, small_retention()) as (regions, replicators):
            hz, sh = regions.copies["hz"][U1], regions.copies["sh"][U1]
            await write_carts(regions, "hz", U1, 50)
            await until(lambda: sh.position == 50 and regions.copies["bj"][U1].position == 50)
            # Every follower has applied 50: the owner keeps its newest 10.
            await until(lambda: hz.trimmed_position == 40)
            await until(lambda: sh.trimmed_position == 40)  # sh's own sweep, keep rule only

            await replicators["sh"].stop()
            stopped_at = sh.position
            await write_carts(regions, "hz", U1, 1_100, first=1_000)
            # Over 1,000 rows: the owner trims past the stopped follower.
            await until(lambda: hz.trimmed_position > stopped_at)
            with pytest.raises(ChangelogTrimmed):
                await serve_pull(regions.copies["hz"], U1, stopped_at, 10, 0)
            reply = wire(await serve_pull_many(regions.copies["hz"], [(U1, stopped_at)], 10, 0))
            (refused,) = reply["errors"]
            assert refused["error"] == "changelog_trimmed" and refused["cell"] == U1
            assert refused["trimmed_position"] == hz.trimmed_position

            replicators["sh"].start()
            await until(lambda: replicators["sh"].streams[U1].rebootstraps == 1)
            await write_carts(regions, "hz", U1, 20, first=5_000)  # streaming goes on
            bj = regions.copies["bj"][U1]
            await until(lambda: sh.position == bj.position == hz.position == 1_170)
            state = replicators["sh"].streams[U1]
            assert state.rebootstraps == 1 and state.trimmed_by == ""
            assert sh.trimmed_position > stopped_at  # the rebuilt copy's changelog is short
            await same_copies(hz, sh)
            await same_copies(hz, bj)
            # The cells sh never fell behind in were not rebuilt.
            others = [s for c, s in replicators["sh"].streams.items() if c != U1]
            assert all(s.rebootstraps == 0 for s in others)

    asyncio.run(scenario())


def test_a_long_run_with_a_dead_follower_stays_under_the_bound(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with replicating(tmp_path, small_retention()) as (regions, replicators):
            await replicators["bj"].stop()  # dead for the whole run: only the bound trims
            hz = regions.copies["hz"][U1]
            sweeper = replicators["hz"]
            await sweeper.stop()  # sweeps by hand, to check the bound after each
            rows_max = regions.config.changelog_policy(U1).positions_max
            highest = 0
            for first in range(1, 6_001, 500):
                await write_carts(regions, "hz", U1, 500, first=first)
                await sweeper.sweep_cell(U1)
                held = await hz.read(count_rows)
                assert held <= rows_max
                assert held == hz.position - hz.trimmed_position  # gapless
                highest = max(highest, held)
            assert hz.position == 6_000 and highest == rows_max
            assert sweeper.trimmed_rows[U1] == 6_000 - rows_max

    asyncio.run(scenario())


# -- diff ------------------------------------------------------------------------------------


async def diff_changelog(owner: CellStore, replica: CellStore, above: int) -> list[Any]:
    """What `unitrade diff` does for the changelog, in process: chunks of the owner above
    `above`, the replica's checksums of the same ranges, a comparison of those that differ."""
    lo: Key | None = {"position": above} if above else None
    mismatches: list[Any] = []

    async def owner_page(lo: Key | None, hi: Key | None, limit: int) -> Page:
        return await owner.read(lambda c: read_page(c, changelog, lo, hi, limit))

    while True:
        chunk = await owner.read(lambda c, lo=lo: next_chunk(c, changelog, lo, 50))
        theirs = await replica.read(
            lambda c, chunk=chunk: range_checksum(c, changelog, chunk.lo, chunk.hi, CHUNK_ROWS_MAX)
        )
        start: Key | None = chunk.lo
        while theirs != chunk.checksum:
            page = await compare_page(replica, changelog, start, chunk.hi, 500, owner_page, False)
            mismatches += page.outcome.mismatches
            if page.done:
                break
            start = page.next_lo
        if chunk.hi is None:
            return mismatches
        lo = chunk.hi


def test_diff_of_copies_trimmed_to_different_points_finds_no_difference(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with replicating(tmp_path, small_retention(keep=1_000)) as (regions, _):
            hz, sh = regions.copies["hz"][U1], regions.copies["sh"][U1]
            await write_carts(regions, "hz", U1, 300)
            await until(lambda: sh.position == 300)
            old = now_ms() + HOUR_MS
            await trim(hz, policy(kept=200), None, old, 1_000)  # the owner at 100
            await trim(sh, policy(kept=50), None, old, 1_000)  # the replica further, at 250
            assert (hz.trimmed_position, sh.trimmed_position) == (100, 250)
            # From the highest trim point, as the command does: nothing differs.
            assert await diff_changelog(hz, sh, 250) == []
            # From the lower one, the rows only the owner has are set aside, not reported.
            assert await diff_changelog(hz, sh, 100) == []
            assert await diff_changelog(hz, sh, 0) == []
            # A real difference above the trim points is still found.
            await sh.write_replica(lambda tx: tx.delete_row(changelog, {"position": 280}))
            (missing,) = await diff_changelog(hz, sh, 250)
            assert missing.key == {"position": 280} and missing.kind == "missing"

    asyncio.run(scenario())


# -- a real cluster: a region down while its owner trims, then `unitrade diff` ---------------


def metric(api: Api, region: str, name: str, labels: dict[str, str]) -> float:
    text = api.http.get(api.url(region, "/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no {name} {labels} at {region}")


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def signed_pull(api: Api, follower: str, cell: int, after: int) -> httpx.Response:
    target = "/internal/replication/pull"
    payload = {"cell": cell, "after": after, "limit": 10, "wait_ms": 0, "region": follower}
    body = orjson.dumps(payload)
    headers = {"content-type": "application/json"}
    headers.update(sign(api.config.region_secret, follower, "hz", "POST", target, body, headers))
    return api.http.post(api.url("hz", target), content=body, headers=headers)


@pytest.mark.cluster
def test_a_region_back_after_its_owner_trimmed_past_it_rebuilds_and_diff_is_clean(
    tmp_path: Path,
) -> None:
    ports = free_ports(4)
    text = topology_toml(ports) + (
        "[retention]\nchangelog_positions_kept = 10\nchangelog_age_s = 0\n"
        "changelog_positions_max = 1000\nsweep_batch_rows = 200\nsweep_interval_s = 0.2\n"
    )
    path = tmp_path / "topology.toml"
    path.write_text(text)
    config = parse_config(tomllib.loads(text))
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            api.put_product("T1", stock=10)
            buyer = api.buyer_in("hz")
            cell_id = route_buyer(api.rule, buyer).cell
            cell = api.rule.cells[cell_id].name

            def cart(qty: int) -> None:
                response = api.call("hz", "PUT", "/v1/cart/items/T1", buyer, {"qty": qty})
                assert response.status_code == 200, response.text

            for qty in range(1, 21):
                cart(qty)
            wait_converged(config)
            behind = positions(config)["bj"][cell]
            cluster.kill_region("bj")
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(cart, [1 + i % 50 for i in range(1_300)]))
            owned = {"region": "hz", "cell": cell, "owned": "true"}
            trimmed = "unitrade_changelog_trimmed_position"
            # The owner kept bj's rows as long as it could, then trimmed past them.
            # Rows past the bound are trimmed at the next sweep (every 0.2 s here).
            wait_for(lambda: metric(api, "hz", trimmed, owned) > behind, "the owner's trim")
            rows = "unitrade_changelog_rows"
            wait_for(lambda: metric(api, "hz", rows, owned) <= 1_000, "the bound")
            # What bj will be told, over HTTP: a typed 410, not a 500.
            refused = signed_pull(api, "bj", cell_id, behind)
            assert refused.status_code == 410, refused.text
            assert refused.json()["error"] == "changelog_trimmed"

            cluster.start_region("bj")
            cluster.wait_healthy(["bj"])
            cart(7)  # the stream carries on after the rebuild
            wait_converged(config)
            stream = {"region": "bj", "cell": cell, "source": "hz"}
            rebuilt = "unitrade_replication_rebootstraps_total"
            assert metric(api, "bj", rebuilt, stream) == 1
            assert "rebuilding the copy from a snapshot" in cluster.log_path("bj").read_text()
            for region in ("sh", "bj"):
                replica = {"region": region, "cell": cell, "owned": "false"}
                assert metric(api, region, trimmed, replica) > 0
            found = CliRunner().invoke(diff_command, ["--config", str(path), "--chunk-rows", "50"])
            assert found.exit_code == 0, found.output
        finally:
            api.http.close()
