"""`unitrade diff`: chunked checksums, row-by-row comparison and repair of replica copies."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import Table, select

from tests.replication_support import differences, wait_converged
from tests.storage_support import make_store
from tests.support import Api, write_topology
from tests.test_replication import burst
from unitrade.cluster import LocalCluster
from unitrade.errors import RegionUnavailable, WrongRegion
from unitrade.replication import diff
from unitrade.replication.diff import (
    Checksum,
    Chunk,
    Key,
    Page,
    compare_page,
    compared_tables,
    next_chunk,
    parse_key,
    range_checksum,
    read_page,
)
from unitrade.replication.diff_cli import diff as diff_command
from unitrade.rpc.signing import sign
from unitrade.storage.schema import carts, changelog, orders
from unitrade.storage.store import CellStore, WriteTx
from unitrade.topology.config import CellKind
from unitrade.topology.rule import initial_rule

CART_ROWS = 2_500  # more than two chunks of 1,000


def cart(buyer: int, sku: str, qty: int = 1) -> dict[str, Any]:
    return {"buyer_id": buyer, "sku": sku, "qty": qty, "updated_ms": 0}


async def replicate(owner: CellStore, replica: CellStore) -> None:
    while changes := await owner.changes_since(replica.position, 1_000):
        await replica.apply(changes)


async def owner_and_replica(url: str) -> tuple[CellStore, CellStore]:
    """hz owns u1 (2,500 cart rows, composite key), sh holds a replica copy of it."""
    owner = make_store(url.replace("{cell}", "hz-{cell}"), 1, region="hz")
    replica = make_store(url.replace("{cell}", "sh-{cell}"), 1, region="sh")
    await owner.open()
    await replica.open()
    for start in range(0, CART_ROWS, 500):

        def fill(tx: WriteTx, start: int = start) -> None:
            for i in range(start, start + 500):
                tx.insert(carts, cart(i // 2, f"S{i % 2}"))

        await owner.write(fill)
    await replicate(owner, replica)
    return owner, replica


def scenario(url: str, body: Callable[[CellStore, CellStore], Awaitable[None]]) -> None:
    async def run() -> None:
        owner, replica = await owner_and_replica(url)
        try:
            await body(owner, replica)
        finally:
            await owner.close()
            await replica.close()

    asyncio.run(run())


async def chunks_of(store: CellStore, table: Table, chunk_rows: int) -> list[Chunk]:
    found = [await store.read(lambda c: next_chunk(c, table, None, chunk_rows))]
    while (lo := found[-1].hi) is not None:
        found.append(await store.read(lambda c, lo=lo: next_chunk(c, table, lo, chunk_rows)))
    return found


def pages_of(owner: CellStore, table: Table) -> Callable[[Key | None, Key | None, int], Any]:
    """The owner's side of a compare, read from its store (what `/internal/diff/rows` does)."""

    async def page(lo: Key | None, hi: Key | None, limit: int) -> Page:
        return await owner.read(lambda c: read_page(c, table, lo, hi, limit))

    return page


async def diff_table(
    owner: CellStore, replica: CellStore, table: Table, repair: bool = False, limit: int = 100
) -> tuple[list[tuple[str, str]], int]:
    """What `unitrade diff` does for one table, in process: (key, kind) found, chunks that
    differed."""
    found: list[tuple[str, str]] = []
    mismatched = 0
    for chunk in await chunks_of(owner, table, 1_000):
        theirs = await replica.read(lambda c, k=chunk: range_checksum(c, table, k.lo, k.hi, 4_000))
        if theirs == chunk.checksum:
            continue
        mismatched += 1
        lo, done = chunk.lo, False
        while not done:
            result = await compare_page(
                replica, table, lo, chunk.hi, limit, pages_of(owner, table), repair
            )
            assert result.outcome.repaired == repair
            found += [(diff.key_text(m.key), m.kind) for m in result.outcome.mismatches]
            lo, done = result.next_lo, result.done
    return found, mismatched


async def all_rows(store: CellStore, table: Table) -> list[dict[str, Any]]:
    statement = select(table).order_by(*table.primary_key.columns)
    return await store.read(lambda c: [dict(r) for r in c.execute(statement).mappings()])


async def tamper(replica: CellStore, work: Callable[[WriteTx], None]) -> None:
    await replica.write_replica(work)


def test_chunks_cover_the_table_and_an_equal_copy_has_equal_checksums(storage_url: str) -> None:
    async def body(owner: CellStore, replica: CellStore) -> None:
        chunks = await chunks_of(owner, carts, 1_000)
        assert [c.checksum.count for c in chunks] == [1_000, 1_000, 500]
        assert chunks[0].lo is None and chunks[-1].hi is None
        assert chunks[0].hi == {"buyer_id": 499, "sku": "S1"}  # composite key order
        assert chunks[1].lo == chunks[0].hi
        for chunk in chunks:
            theirs = await replica.read(
                lambda c, k=chunk: range_checksum(c, carts, k.lo, k.hi, 4_000)
            )
            assert theirs == chunk.checksum
        for table in compared_tables(CellKind.UNIT).values():
            assert await diff_table(owner, replica, table) == ([], 0)

    scenario(storage_url, body)


def test_a_corrupted_replica_is_found_key_by_key_and_repaired(storage_url: str) -> None:
    async def body(owner: CellStore, replica: CellStore) -> None:
        def corrupt(tx: WriteTx) -> None:
            tx.delete_row(carts, {"buyer_id": 10, "sku": "S0"})
            tx.put_row(carts, cart(10, "S0", qty=99))  # different
            tx.delete_row(carts, {"buyer_id": 700, "sku": "S1"})  # missing
            tx.put_row(carts, cart(5_000, "S0"))  # extra, past the owner's last key
            tx.delete_row(changelog, {"position": 3})  # the changelog is compared too

        await tamper(replica, corrupt)
        found, mismatched = await diff_table(owner, replica, carts)
        assert sorted(found) == [
            ('{"buyer_id":10,"sku":"S0"}', "different"),
            ('{"buyer_id":5000,"sku":"S0"}', "extra"),
            ('{"buyer_id":700,"sku":"S1"}', "missing"),
        ]
        assert mismatched == 3  # one per chunk: only those were read row by row
        assert await diff_table(owner, replica, changelog) == ([('{"position":3}', "missing")], 1)

        position = replica.position
        assert len((await diff_table(owner, replica, carts, repair=True))[0]) == 3
        assert len((await diff_table(owner, replica, changelog, repair=True))[0]) == 1
        for table in compared_tables(CellKind.UNIT).values():
            assert await diff_table(owner, replica, table) == ([], 0)
            assert await all_rows(replica, table) == await all_rows(owner, table)
        assert await replica.last_position() == position  # nothing was captured or applied
        assert await owner.last_position() == position

    scenario(storage_url, body)


def test_more_extra_rows_than_a_page_are_compared_in_pages(storage_url: str) -> None:
    async def body(owner: CellStore, replica: CellStore) -> None:
        def extras(tx: WriteTx) -> None:
            for sku in range(250):  # all inside the owner's first chunk, between two keys
                tx.put_row(carts, cart(20, f"S0x{sku:03d}"))

        await tamper(replica, extras)
        found, mismatched = await diff_table(owner, replica, carts, repair=True, limit=100)
        assert mismatched == 1 and len(found) == 250
        assert {kind for _, kind in found} == {"extra"}
        assert await all_rows(replica, carts) == await all_rows(owner, carts)

    scenario(storage_url, body)


def test_rows_changed_by_replication_during_the_check_are_left_aside(storage_url: str) -> None:
    async def body(owner: CellStore, replica: CellStore) -> None:
        lo, hi = {"buyer_id": 0, "sku": "S1"}, {"buyer_id": 5, "sku": "S1"}
        stale = await owner.read(lambda c: read_page(c, carts, lo, hi, 100))
        # After the owner's page was read, buyer 3's row changes at the owner and reaches
        # the replica; buyer 4's row is corrupted in the replica.
        await owner.write(lambda tx: tx.update(carts, {"buyer_id": 3, "sku": "S0"}, {"qty": 7}))
        await replicate(owner, replica)
        await tamper(replica, lambda tx: tx.delete_row(carts, {"buyer_id": 4, "sku": "S0"}))

        async def pages(_lo: Key | None, _hi: Key | None, _limit: int) -> Page:
            return stale

        result = await compare_page(replica, carts, lo, hi, 100, pages, repair=False)
        assert [(m.key, m.kind) for m in result.outcome.mismatches] == [
            ({"buyer_id": 4, "sku": "S0"}, "missing")
        ]
        assert result.outcome.in_flux == 1 and result.done

    scenario(storage_url, body)


def test_a_lagging_replica_is_refused_and_the_owner_is_never_repaired(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diff, "CATCH_UP_WAIT_S", 0.05)

    async def body(owner: CellStore, replica: CellStore) -> None:
        await owner.write(lambda tx: tx.insert(carts, cart(5_000, "S0")))  # not replicated
        with pytest.raises(RegionUnavailable):
            await compare_page(replica, carts, None, None, 100, pages_of(owner, carts), False)
        with pytest.raises(WrongRegion):
            await compare_page(owner, carts, None, None, 100, pages_of(owner, carts), True)
        with pytest.raises(WrongRegion):
            await owner.write_replica(lambda tx: tx.delete_row(carts, {"buyer_id": 1, "sku": "S0"}))
        assert len(await all_rows(owner, carts)) == CART_ROWS + 1

    scenario(storage_url, body)


def test_checksums_do_not_depend_on_row_or_column_order() -> None:
    rows = [cart(1, "A"), cart(2, "B", 3), cart(3, "C")]
    flipped = [dict(reversed(list(r.items()))) for r in reversed(rows)]
    assert Checksum.of(rows) == Checksum.of(flipped)
    assert Checksum.of(rows) != Checksum.of([*rows[:2], cart(3, "C", 2)])
    assert Checksum.from_body(Checksum.of(rows).body()) == Checksum.of(rows)
    assert compared_tables(CellKind.CENTER).keys() == {
        "inventory",
        "reservations",
        "payment_claims",
        "sales",
        "sale_segments",
        "coupons",
        "coupon_claims",
        "changelog",
    }


def test_keys_from_the_wire_are_checked_against_the_table() -> None:
    assert parse_key(carts, {"buyer_id": 1, "sku": "A"}) == {"buyer_id": 1, "sku": "A"}
    assert parse_key(carts, None) is None
    for bad in ({"buyer_id": 1}, {"buyer_id": "1", "sku": "A"}, {"buyer_id": True, "sku": "A"}):
        with pytest.raises(ValueError):
            parse_key(carts, bad)
    with pytest.raises(ValueError):
        parse_key(orders, {"order_id": 1, "x": 2})


# -- a real cluster ---------------------------------------------------------------------------


def tamper_file(path: Path) -> list[str]:
    """Corrupt a replica copy behind its region's back: one order's status changed, one order
    line deleted (composite key), one cart row added. The keys, as `diff` prints them."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        ids = [r[0] for r in conn.execute("SELECT order_id FROM orders ORDER BY order_id")]
        with conn:
            conn.execute("UPDATE orders SET status = 'tampered' WHERE order_id = ?", (ids[0],))
            conn.execute("DELETE FROM order_lines WHERE order_id = ? AND line_no = 1", (ids[1],))
            conn.execute("INSERT INTO carts VALUES (999999999, 'EXTRA', 1, 0)")
    finally:
        conn.close()
    return [
        f'orders\t{{"order_id":{ids[0]}}}\tdifferent (status)',
        f'order_lines\t{{"order_id":{ids[1]},"line_no":1}}\tmissing on replica',
        'carts\t{"buyer_id":999999999,"sku":"EXTRA"}\textra on replica',
    ]


def replica_with_orders(data_dir: Path, api: Api) -> tuple[str, str]:
    """A (cell name, replica region) whose copy holds at least two orders."""
    rule = initial_rule(api.config)
    for cell in rule.cells.values():
        for region in api.config.region_names:
            if region == rule.owner_of(cell.id) or cell.kind is not CellKind.UNIT:
                continue
            path = data_dir / region / f"cell-{cell.name}.db"
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                (count,) = conn.execute("SELECT count(*) FROM orders").fetchone()
            if count >= 2:
                return cell.name, region
    raise AssertionError("no replica copy with two orders")


@pytest.fixture(scope="module")
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Api, Path, Path, LocalCluster]]:
    """A three-region cluster with orders in every cell: (api, topology file, data dir,
    the cluster)."""
    directory = tmp_path_factory.mktemp("diff")
    config, path = write_topology(directory)
    with LocalCluster(config, directory / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            api.put_product("D1", stock=100_000)
            assert burst(api, ["D1"], 40, seed=7) == 40
            yield api, path, directory / "data", cluster
        finally:
            api.http.close()


@pytest.fixture
def running(running_cluster: tuple[Api, Path, Path, LocalCluster]) -> tuple[Api, Path, Path]:
    return running_cluster[:3]


@pytest.mark.cluster
def test_diff_finds_a_corrupted_replica_and_repair_fixes_it(
    running: tuple[Api, Path, Path],
) -> None:
    api, path, data_dir = running
    wait_converged(api.config)
    cell, region = replica_with_orders(data_dir, api)
    expected = tamper_file(data_dir / region / f"cell-{cell}.db")
    runner = CliRunner()
    base = ["--config", str(path), "--chunk-rows", "10"]

    found = runner.invoke(diff_command, base)
    assert found.exit_code == 1, found.output
    for line in expected:
        assert f"{cell}\t{region}\t{line}\n" in found.output
    assert found.output.count("on replica") + found.output.count("different (") == 3

    repaired = runner.invoke(diff_command, [*base, "--cell", cell, "--repair"])
    assert repaired.exit_code == 0, repaired.output
    assert repaired.output.count("\trepaired\n") == 3
    assert "re-check after the repair: 0 differences" in repaired.output

    assert differences(api.config, data_dir) == []
    again = runner.invoke(diff_command, base)
    assert again.exit_code == 0, again.output


@pytest.mark.cluster
def test_diff_while_orders_go_on_reports_no_false_differences(
    running: tuple[Api, Path, Path],
) -> None:
    api, path, data_dir = running
    runner = CliRunner()
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(burst, api, ["D1"], 400, 8)
        while_writing = runner.invoke(diff_command, ["--config", str(path), "--chunk-rows", "20"])
        assert load.result() == 400
    # Replicas lag their owners all along: the rows they had not caught up with are compared
    # once they have, or left aside as changed meanwhile; none is reported as a difference.
    assert while_writing.exit_code == 0, while_writing.output
    wait_converged(api.config)
    assert differences(api.config, data_dir) == []


@pytest.mark.cluster
def test_the_internal_diff_api_checks_signatures_keys_and_roles(
    running: tuple[Api, Path, Path],
) -> None:
    api = running[0]
    u1 = api.config.find_cell("u1")  # owned by hz

    def post(region: str, path: str, payload: Any, signed: bool = True) -> httpx.Response:
        body = orjson.dumps(payload)
        # As the CLI signs: for the operator, with the control plane's secret.
        secret = api.config.control_secret
        headers = sign(secret, "control", region, "POST", path, body) if signed else {}
        return api.http.post(api.url(region, path), content=body, headers=headers)

    call = {"cell": u1.id, "table": "carts", "lo": None, "hi": None, "limit": 10}
    assert post("sh", diff.ROWS_PATH, call, signed=False).status_code == 401
    assert post("sh", diff.ROWS_PATH, call).status_code == 200
    bad_key = {**call, "lo": {"buyer_id": "1", "sku": "A"}}
    assert post("sh", diff.ROWS_PATH, bad_key).json()["error"] == "invalid_request"
    no_table = {**call, "table": "cell_meta"}
    assert post("sh", diff.ROWS_PATH, no_table).json()["error"] == "invalid_request"
    on_owner = post("hz", diff.COMPARE_PATH, {**call, "repair": True})
    assert on_owner.status_code == 421 and on_owner.json()["error"] == "wrong_region"


@pytest.mark.cluster
def test_with_a_region_down_diff_compares_the_copies_it_can_reach(
    running_cluster: tuple[Api, Path, Path, LocalCluster],
) -> None:
    api, path, data_dir, cluster = running_cluster
    wait_converged(api.config)
    cell, region = replica_with_orders(data_dir, api)
    down = next(
        r
        for r in api.config.region_names
        if r not in (region, api.rule.owner_of(api.config.find_cell(cell).id))
    )
    expected = tamper_file(data_dir / region / f"cell-{cell}.db")
    cluster.kill_region(down)
    try:
        found = CliRunner().invoke(diff_command, ["--config", str(path), "--chunk-rows", "10"])
        # The tampered copy is still found; every copy at the region that is down, and
        # every cell it owns, is named as not compared.
        assert found.exit_code == 1, found.output
        for line in expected:
            assert f"{cell}\t{region}\t{line}\n" in found.output
        owned = [c.name for c in api.config.cells if api.rule.owner_of(c.id) == down]
        for other in api.config.cells:
            if other.name in owned:
                assert f"not compared: {other.name} at {region}: its owner {down}" in found.output
            else:
                assert f"not compared: {other.name} at {down}: {down} does not answer" in (
                    found.output
                )
        repaired = CliRunner().invoke(
            diff_command, ["--config", str(path), "--cell", cell, "--repair"]
        )
        # Nothing differs any more among the copies compared, but one was not: exit 2.
        assert repaired.exit_code == 2, repaired.output
        assert "re-check after the repair: 0 differences" in repaired.output
    finally:
        cluster.start_region(down)
        cluster.wait_healthy([down])
    wait_converged(api.config)
    assert differences(api.config, data_dir) == []


def test_unknown_cell_and_unreachable_regions_exit_2(tmp_path: Path) -> None:
    _config, path = write_topology(tmp_path)  # nothing listens on its ports
    runner = CliRunner()
    unknown = runner.invoke(diff_command, ["--config", str(path), "--cell", "u99"])
    assert unknown.exit_code == 2 and "unknown cell" in unknown.output
    down = runner.invoke(diff_command, ["--config", str(path)])
    assert down.exit_code == 2 and "no region answered" in down.output
