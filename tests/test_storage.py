"""The data access layer: changelog capture in the same transaction, and the write fence."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from tests.storage_support import (
    RULE,
    Forwarder,
    cell_url,
    make_store,
    sqlite_template,
    until,
    write_lock_held,
)
from unitrade.errors import (
    NoWriteLease,
    RegionUnavailable,
    WriteBanned,
    WriteOutcomeUnknown,
    WrongRegion,
)
from unitrade.storage.engine import backend_of, is_async, sync_url
from unitrade.storage.fence import Fence
from unitrade.storage.mysql_batch import STATEMENT_BYTES_MAX
from unitrade.storage.schema import carts, changelog
from unitrade.storage.store import CellStore, WriteTx

WAIT_S_MAX = 10.0  # a bound on every wait; none is expected to come near it


async def _changelog(store: CellStore) -> list[dict[str, Any]]:
    statement = select(changelog).order_by(changelog.c.position)
    return await store.read(lambda conn: [dict(r) for r in conn.execute(statement).mappings()])


def test_every_write_appends_changelog_rows_in_its_transaction(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:
            key = {"buyer_id": 7, "sku": "A"}
            await store.write(lambda tx: tx.insert(carts, {**key, "qty": 1, "updated_ms": 5}))
            await store.write(lambda tx: tx.update(carts, key, {"qty": 3}))
            await store.write(lambda tx: tx.delete(carts, key))
            rows = await _changelog(store)
            assert [r["position"] for r in rows] == [1, 2, 3]
            assert [r["op"] for r in rows] == ["i", "u", "d"]
            assert {r["epoch"] for r in rows} == {RULE.version}
            assert {r["origin"] for r in rows} == {"hz"}
            assert {r["tbl"] for r in rows} == {"carts"}
            assert all(orjson.loads(r["pk"]) == key for r in rows)
            assert orjson.loads(rows[0]["row_image"]) == {**key, "qty": 1, "updated_ms": 5}
            assert orjson.loads(rows[1]["row_image"])["qty"] == 3
            assert rows[2]["row_image"] is None
            assert await store.last_position() == 3
            assert [c["position"] for c in await store.changes_since(1, 10)] == [2, 3]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_failed_transaction_leaves_neither_row_nor_changelog(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:

            def work(tx: WriteTx) -> None:
                tx.insert(carts, {"buyer_id": 1, "sku": "A", "qty": 1, "updated_ms": 0})
                raise RuntimeError("fails after the insert")

            with pytest.raises(RuntimeError):
                await store.write(work)
            assert await _changelog(store) == []
            assert await store.last_position() == 0
            count = await store.read(lambda c: c.execute(select(carts)).all())
            assert count == []
        finally:
            await store.close()

    asyncio.run(scenario())


def test_write_to_a_cell_of_another_region_is_refused_with_the_owner(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, 3, region="hz")  # u3 is owned by sh
        await store.open()
        try:
            with pytest.raises(WrongRegion) as refused:
                await store.write(
                    lambda tx: tx.insert(
                        carts, {"buyer_id": 1, "sku": "A", "qty": 1, "updated_ms": 0}
                    )
                )
            assert refused.value.code == "wrong_region"
            assert refused.value.details["owner"] == "sh"
            assert await store.last_position() == 0
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_banned_cell_refuses_writes(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:
            await store.fence.install(replace(RULE, version=2, banned=frozenset({1})))
            with pytest.raises(WriteBanned):
                await store.write(lambda tx: None)
            await store.fence.install(replace(RULE, version=3))
            await store.write(
                lambda tx: tx.insert(carts, {"buyer_id": 1, "sku": "A", "qty": 1, "updated_ms": 0})
            )
            assert [r["epoch"] for r in await _changelog(store)] == [3]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_concurrent_writes_get_gapless_unique_positions(storage_url: str) -> None:
    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:

            async def one(i: int) -> None:
                await store.write(
                    lambda tx: tx.insert(
                        carts, {"buyer_id": i, "sku": "A", "qty": 1, "updated_ms": 0}
                    )
                )

            await asyncio.gather(*(one(i) for i in range(1, 201)))
            positions = [r["position"] for r in await _changelog(store)]
            assert positions == list(range(1, 201))
        finally:
            await store.close()

    asyncio.run(scenario())


def test_installing_a_rule_waits_for_writes_admitted_under_older_rules(storage_url: str) -> None:
    """The write is held in flight until the test lets it go: on the store's writer thread
    (on SQLite, another connection's lock sends it there), or, on MySQL/MariaDB, whose
    transactions run on the event loop, in the database, waiting for the cell's lock that
    another connection holds. The install must wait for it."""

    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        on_loop = is_async(store.url)
        started, proceed = threading.Event(), threading.Event()
        events: list[str] = []

        def held(tx: WriteTx) -> None:
            events.append("write started")
            started.set()
            if not on_loop:
                # Blocking here on the loop would stall the very install under test.
                assert threading.current_thread() is not threading.main_thread()
                assert proceed.wait(WAIT_S_MAX), "the test never let the write go"
            tx.insert(carts, {"buyer_id": 1, "sku": "A", "qty": 1, "updated_ms": 0})

        try:
            with write_lock_held(cell_url(storage_url, 1)) as release:
                write = asyncio.create_task(store.write(held))
                await until(lambda: store.fence.in_flight_below(2) == 1, "the write admitted")
                if not on_loop:
                    release()
                    await until(started.is_set, "the write to start on its thread")
                install = asyncio.create_task(store.fence.install(replace(RULE, version=2)))
                done, _ = await asyncio.wait([install], timeout=0.2)
                assert not done, "the rule was acknowledged while a v1 write was in flight"
                assert store.fence.rule.version == 2  # in force: new writes get epoch 2
                assert store.position == 0
                assert events == ([] if on_loop else ["write started"])
                release()  # on MySQL: the write takes the lock now
                proceed.set()
            await asyncio.wait_for(install, WAIT_S_MAX)
            assert events == ["write started"]
            assert store.position == 1  # acknowledged only once the v1 write had committed
            await asyncio.wait_for(write, WAIT_S_MAX)
            await store.write(
                lambda tx: tx.insert(carts, {"buyer_id": 2, "sku": "A", "qty": 1, "updated_ms": 0})
            )
            assert [r["epoch"] for r in await _changelog(store)] == [1, 2]
            with pytest.raises(ValueError, match="only grow"):
                await store.fence.install(RULE)
        finally:
            proceed.set()
            await store.close()

    asyncio.run(scenario())


def test_a_write_waits_for_a_lock_held_by_another_process_instead_of_failing(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        template = sqlite_template(tmp_path)
        store = make_store(template, 1)
        await store.open()
        try:
            row = {"buyer_id": 1, "sku": "A", "qty": 1, "updated_ms": 0}
            with write_lock_held(cell_url(template, 1)) as release:  # another process's
                write = asyncio.create_task(store.write(lambda tx: tx.insert(carts, row)))
                await until(lambda: store.fence.in_flight_below(2) == 1, "the write admitted")
                done, _ = await asyncio.wait([write], timeout=0.1)
                assert not done and store.position == 0  # waiting, not failed
                release()
                await asyncio.wait_for(write, WAIT_S_MAX)
            assert [r["position"] for r in await _changelog(store)] == [1]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_wal_stays_bounded_under_continuous_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from unitrade.storage.store import CHECKPOINT_EVERY_WRITES

    async def scenario() -> None:
        store = make_store(f"sqlite:///{tmp_path}/cell-{{cell}}.db", 1)
        await store.open()
        wal = tmp_path / "cell-u1.db-wal"
        sizes = []
        try:
            for i in range(CHECKPOINT_EVERY_WRITES * 16):
                row = {"buyer_id": i, "sku": "A" * 60, "qty": 1, "updated_ms": i}
                await store.write(lambda tx, row=row: tx.insert(carts, row))
                if i % 100 == 0:
                    await asyncio.sleep(0)  # let a finished checkpoint be noticed
                    sizes.append(wal.stat().st_size if wal.exists() else 0)
            assert await store.last_position() == CHECKPOINT_EVERY_WRITES * 16
        finally:
            await store.close()
        # Without working checkpoints the WAL grows by every page every write touches (91 MB
        # here); with them it levels off: the second half of the run adds nothing.
        half = len(sizes) // 2
        assert max(sizes[half:]) <= max(sizes[:half]), sizes
        assert max(sizes) < 16 * 1024 * 1024, sizes

    asyncio.run(scenario())


def _cut_sessions(url: str) -> int:
    """End every session of a copy's database from the server's side, as a restart of the
    server or a firewall cutting idle connections would; the number ended."""
    from sqlalchemy.engine import make_url

    database = make_url(sync_url(url)).database
    if backend_of(url) == "postgresql":
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
        ) as admin:
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchall()
        return sum(1 for (ended,) in rows if ended)
    import pymysql

    with pymysql.connect(host="127.0.0.1", user="root", autocommit=True) as admin:
        cursor = admin.cursor()
        cursor.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (database,))
        ids = [int(row[0]) for row in cursor.fetchall()]
        for session in ids:
            cursor.execute(f"KILL {session}")
    return len(ids)


def test_a_writer_connection_cut_while_idle_is_replaced_and_the_next_write_commits(
    storage_url: str,
) -> None:
    """The writer holds its connection between writes (no ping before each): one the server
    ended while idle is found dead at the write's first round trip, which had done nothing,
    and the write runs again on a new connection: committed, not `outcome_unknown`."""
    if backend_of(storage_url) == "sqlite":
        pytest.skip("SQLite has no server to cut a connection")

    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:
            first = {"buyer_id": 7, "sku": "A"}
            await store.write(lambda tx: tx.insert(carts, {**first, "qty": 1, "updated_ms": 5}))
            url = cell_url(storage_url, 1)
            assert await asyncio.to_thread(_cut_sessions, url) >= 1, "no session to cut"
            second = {"buyer_id": 8, "sku": "B"}
            await store.write(lambda tx: tx.insert(carts, {**second, "qty": 2, "updated_ms": 6}))
            rows = await store.read(lambda c: c.execute(select(carts.c.buyer_id)).all())
            assert sorted(r[0] for r in rows) == [7, 8]
            assert [r["position"] for r in await _changelog(store)] == [1, 2]
            assert store.position == 2
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_write_whose_database_cannot_be_reached_is_refused_not_outcome_unknown(
    storage_url: str,
) -> None:
    """The database's host goes away between two writes: the writer's connection is cut
    and no new one can be made. The next write sent nothing, so it is refused as
    unavailable (503, retry), not answered `outcome_unknown`; once the server is back the
    copy holds nothing of it and the next write takes the next position."""
    backend = backend_of(storage_url)
    if backend == "sqlite":
        pytest.skip("SQLite has no server to lose")

    async def scenario() -> None:
        forwarder = Forwarder(5432 if backend == "postgresql" else 3306)
        await forwarder.open()
        url = storage_url.replace("127.0.0.1:5432", f"127.0.0.1:{forwarder.port}")
        url = url.replace("127.0.0.1:3306", f"127.0.0.1:{forwarder.port}")
        assert str(forwarder.port) in url
        store = make_store(url, 1)
        await store.open()
        try:
            await store.write(lambda tx: tx.insert(carts, _cart(1)))
            await forwarder.close()
            with pytest.raises(RegionUnavailable) as refused:
                await store.write(lambda tx: tx.insert(carts, _cart(2)))
            assert "nothing was written" in str(refused.value)
            assert (refused.value.status, refused.value.code) == (503, "region_unavailable")
            await forwarder.open()
            await store.write(lambda tx: tx.insert(carts, _cart(3)))
            buyers = await store.read(lambda c: c.execute(select(carts.c.buyer_id)).all())
            assert sorted(b[0] for b in buyers) == [1, 3]
            assert [r["position"] for r in await _changelog(store)] == [1, 2]
        finally:
            await store.close()
            with contextlib.suppress(AssertionError):
                await forwarder.close()

    asyncio.run(scenario())


def _cart(buyer: int) -> dict[str, Any]:
    """A cart row of its own for each buyer."""
    return {"buyer_id": buyer, "sku": "A", "qty": 1, "updated_ms": buyer}


def test_a_statement_refused_mid_transaction_writes_nothing_and_the_next_write_goes_on(
    storage_url: str,
) -> None:
    """A duplicate key in the middle of a write: on PostgreSQL the insert goes to the
    database without its answer being awaited (the pipeline), so the error surfaces later,
    at the next answer read or at COMMIT; whatever the engine, the write fails as refused
    by the database (an integrity error, not a lost connection), nothing of it is kept, and
    the copy's next write takes the next position."""

    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:
            await store.write(lambda tx: tx.insert(carts, _cart(1)))

            def clashing(tx: WriteTx) -> None:
                tx.insert(carts, _cart(2))
                tx.insert(carts, _cart(1))  # the key is taken
                tx.insert(carts, _cart(3))
                tx.update(carts, {"buyer_id": 2, "sku": "A"}, {"qty": 5})

            with pytest.raises(Exception) as refused:
                await store.write(clashing)
            chain = [refused.value, refused.value.__cause__, getattr(refused.value, "orig", None)]
            assert any("IntegrityError" in type(e).__name__ for e in chain if e is not None), repr(
                refused.value
            )
            assert not isinstance(refused.value, WriteOutcomeUnknown)
            buyers = await store.read(lambda c: c.execute(select(carts.c.buyer_id)).all())
            assert sorted(b[0] for b in buyers) == [1]
            assert [r["position"] for r in await _changelog(store)] == [1]
            await store.write(lambda tx: tx.insert(carts, _cart(4)))
            assert [r["position"] for r in await _changelog(store)] == [1, 2]
            assert store.position == 2
        finally:
            await store.close()

    asyncio.run(scenario())


def test_writes_queued_together_commit_together_and_one_refused_fails_alone(
    storage_url: str,
) -> None:
    """Writes that queue for a copy's writer while it is busy commit in one transaction on
    PostgreSQL and MySQL (group commit); one refused by its own work, and one refused by
    the database, fail alone: every other write commits, with gapless positions."""
    if backend_of(storage_url) == "sqlite":
        pytest.skip("SQLite's writes run inline, one at a time: nothing queues to group")

    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:
            await store.write(lambda tx: tx.insert(carts, _cart(0)))

            def work(buyer: int) -> Callable[[WriteTx], None]:
                def body(tx: WriteTx) -> None:
                    tx.insert(carts, _cart(buyer))
                    if buyer == 7:
                        raise ValueError("refused by the work itself")
                    if buyer in (33, 40):  # 40: the last of its group, found at COMMIT
                        tx.insert(carts, _cart(0))  # the key is taken

                return body

            # Twenty at once: the writer is busy with the first while the rest queue.
            first = await asyncio.gather(
                *(store.write(work(b)) for b in range(1, 21)), return_exceptions=True
            )
            assert store.grouped_writes > 0, "no write was committed with another"
            # Twenty more, one of them refused by the database: its group runs again write
            # by write.
            second = await asyncio.gather(
                *(store.write(work(b)) for b in range(21, 41)), return_exceptions=True
            )
            outcomes = [*first, *second]
            failed = {b: o for b, o in zip(range(1, 41), outcomes, strict=True) if o is not None}
            assert set(failed) == {7, 33, 40}, failed
            assert isinstance(failed[7], ValueError)
            assert all("IntegrityError" in type(failed[b]).__name__ for b in (33, 40)), failed
            buyers = await store.read(lambda c: c.execute(select(carts.c.buyer_id)).all())
            assert sorted(b[0] for b in buyers) == [b for b in range(41) if b not in (7, 33, 40)]
            positions = [r["position"] for r in await _changelog(store)]
            assert positions == list(range(1, 39))
            assert store.position == 38
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_group_whose_lease_ends_before_its_commit_commits_nothing(storage_url: str) -> None:
    """Each write checks the write lease at its own end, but a group commits after its
    last write: if the lease ended meanwhile, none of the group may commit (the lease
    must hold at the COMMIT), and every write of it is answered `no_write_lease`."""
    backend = backend_of(storage_url)
    if backend == "sqlite":
        pytest.skip("SQLite's writes run inline, one at a time: nothing queues to group")
    lease = {"valid": True}
    started, release = threading.Event(), threading.Event()

    def holding(tx: WriteTx) -> None:
        started.set()
        assert release.wait(WAIT_S_MAX), "never released"
        tx.insert(carts, _cart(0))

    def work(buyer: int) -> Callable[[WriteTx], None]:
        def body(tx: WriteTx) -> None:
            tx.insert(carts, _cart(buyer))
            if buyer == 10:
                lease["valid"] = False  # the lease ends while the group runs

        return body

    async def scenario() -> None:
        fence = Fence("hz", RULE, lease=lambda: lease["valid"])
        store = CellStore(RULE.cells[1], "hz", cell_url(storage_url, 1), fence)
        await store.open()
        try:
            if backend == "postgresql":
                first = asyncio.create_task(store.write(holding))
                assert await asyncio.to_thread(started.wait, WAIT_S_MAX)
                # The writer thread is busy with the first write: these twenty queue, one
                # group.
                queued = [asyncio.create_task(store.write(work(b))) for b in range(1, 21)]
                await asyncio.sleep(0.05)
                release.set()
                await first
            else:
                # MySQL's writer runs on the loop: the twenty queue before it next runs.
                await store.write(lambda tx: tx.insert(carts, _cart(0)))
                queued = [asyncio.create_task(store.write(work(b))) for b in range(1, 21)]
            outcomes = await asyncio.gather(*queued, return_exceptions=True)
            assert all(isinstance(o, NoWriteLease) for o in outcomes), outcomes
            buyers = await store.read(lambda c: c.execute(select(carts.c.buyer_id)).all())
            assert [b[0] for b in buyers] == [0]
            assert store.position == 1
        finally:
            release.set()
            await store.close()

    asyncio.run(scenario())


def test_a_replica_batch_larger_than_one_statement_is_applied_and_deleted_whole(
    storage_url: str,
) -> None:
    """A replica's apply writes many rows at once: on MySQL they go as multi-row INSERTs
    and `IN (...)` DELETEs bound by the driver, split where one statement would pass
    STATEMENT_BYTES_MAX. Here 1.5 MB of changelog rows and a composite-key table: every
    row lands, and every row of the delete goes, whatever the engine."""
    images = [
        {
            "position": p,
            "epoch": 1,
            "origin": "hz",
            "tbl": "carts",
            "pk": orjson.dumps({"buyer_id": p, "sku": "A"}).decode(),
            "op": "i",
            # quotes and a percent sign: the driver's escaping, not string formatting
            "row_image": f"{p:06d} it's 100% " + "x" * 5_000,
            "created_ms": p,
        }
        for p in range(1, 301)
    ]
    assert sum(len(i["row_image"]) for i in images) > STATEMENT_BYTES_MAX
    cart_rows = [{**_cart(b), "sku": s} for b in range(1, 41) for s in ("A", "B")]

    async def scenario() -> None:
        store = make_store(storage_url.replace("{cell}", "big-{cell}"), 1, region="sh")
        await store.open()
        try:
            await store.write_replica(lambda tx: tx.append_verbatim(images))
            await store.write_replica(lambda tx: tx.put_rows(carts, cart_rows))
            stored = await _changelog(store)
            assert [(r["position"], r["row_image"]) for r in stored] == [
                (i["position"], i["row_image"]) for i in images
            ]
            gone = [{"position": p} for p in range(1, 301, 2)]
            dropped = [{"buyer_id": b, "sku": "B"} for b in range(1, 41)]

            def delete(tx: WriteTx) -> None:
                tx.delete_rows(changelog, gone)
                tx.delete_rows(carts, dropped)

            await store.write_replica(delete)
            kept = [r["position"] for r in await _changelog(store)]
            assert kept == list(range(2, 301, 2))
            rows = await store.read(
                lambda c: c.execute(select(carts.c.buyer_id, carts.c.sku)).all()
            )
            assert sorted(tuple(r) for r in rows) == [(b, "A") for b in range(1, 41)]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_position_moved_under_a_write_fails_the_write_instead_of_reusing_positions(
    storage_url: str,
) -> None:
    """On PostgreSQL and MySQL a write's changelog positions come from the position read
    with the cell's lock, moved without waiting for an answer. Should a statement of the
    same transaction have moved the position meanwhile, the move finds the row elsewhere
    and the database refuses it: the write fails, nothing of it is kept, and no position
    is handed out twice."""
    if backend_of(storage_url) == "sqlite":
        pytest.skip("SQLite bumps the position with UPDATE ... RETURNING: nothing to guard")
    from sqlalchemy import update

    from unitrade.storage.schema import cell_meta

    async def scenario() -> None:
        store = make_store(storage_url, 1)
        await store.open()
        try:
            await store.write(lambda tx: tx.insert(carts, _cart(1)))

            def moving(tx: WriteTx) -> None:
                tx.insert(carts, _cart(2))
                tx.count(update(cell_meta).values(last_position=cell_meta.c.last_position + 5), {})

            with pytest.raises(Exception) as refused:
                await store.write(moving)
            assert not isinstance(refused.value, WriteOutcomeUnknown), repr(refused.value)
            assert await store.last_position() == 1
            assert [r["position"] for r in await _changelog(store)] == [1]
            await store.write(lambda tx: tx.insert(carts, _cart(3)))
            assert [r["position"] for r in await _changelog(store)] == [1, 2]
            buyers = await store.read(lambda c: c.execute(select(carts.c.buyer_id)).all())
            assert sorted(b[0] for b in buyers) == [1, 3]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_wal_stays_bounded_while_a_replica_catches_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A catch-up applies up to a thousand rows per transaction: the WAL is checkpointed by
    the rows written, not only every so many transactions."""
    from unitrade.replication.replicator import BATCH_ROWS_MAX
    from unitrade.storage.store import to_json

    batches = 48

    def batch(first: int) -> list[dict[str, object]]:
        changes = []
        for position in range(first, first + BATCH_ROWS_MAX):
            key = {"buyer_id": position, "sku": "A"}
            image = {**key, "qty": 1, "updated_ms": position}
            changes.append(
                {
                    "position": position,
                    "epoch": 1,
                    "origin": "hz",
                    "tbl": "carts",
                    "pk": to_json(key),
                    "op": "i",
                    "row_image": to_json(image),
                    "created_ms": position,
                }
            )
        return changes

    async def scenario() -> None:
        replica = make_store(f"sqlite:///{tmp_path}/cell-{{cell}}.db", 1, region="sh")
        await replica.open()
        wal = tmp_path / "cell-u1.db-wal"
        sizes = []
        try:
            for i in range(batches):
                await replica.apply(batch(1 + i * BATCH_ROWS_MAX))
                await asyncio.sleep(0)  # let a finished checkpoint be noticed
                sizes.append(wal.stat().st_size if wal.exists() else 0)
            assert replica.position == batches * BATCH_ROWS_MAX
        finally:
            await replica.close()
        # Counted in transactions alone, no checkpoint ran: the WAL held every page written,
        # about 10 MB here. With them it levels off at about two MB (eight batches).
        assert max(sizes) < 4 * 1024 * 1024, sizes
        assert max(sizes[len(sizes) // 2 :]) < 2 * min(sizes[len(sizes) // 2 :]), sizes

    asyncio.run(scenario())
