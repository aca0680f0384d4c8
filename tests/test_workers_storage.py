"""A region of many processes, at the storage layer: the database's half of the fence, the
positions one process reads back from what another committed, the followers every process
records, and the leader lock. Two CellStores (or locks) on one database stand for two
processes of a region: each has its own fence, connections and memory, as a process has."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.storage_support import RULE, cell_url, mysql_row_locked, until
from unitrade.errors import WriteBanned
from unitrade.storage import followers
from unitrade.storage.engine import backend_of, sync_url
from unitrade.storage.fence import Fence
from unitrade.storage.leader import LeaderLock
from unitrade.storage.schema import carts
from unitrade.storage.store import CellStore, WriteTx
from unitrade.topology.rule import Rule

CELL = 1  # u1, owned by hz in the default topology


@pytest.fixture(params=["postgresql", "mysql"])
def server_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL template with `{cell}` on a database server (workers need one)."""
    from tests.support import (
        MYSQL_BASE,
        drop_mysql_databases,
        drop_pg_databases,
        mysql_prefix,
        pg_prefix,
        require_mysql,
        require_postgres,
    )

    if request.param == "mysql":
        require_mysql()
        prefix = mysql_prefix()
        yield f"{MYSQL_BASE}/{prefix}_{{cell}}"
        drop_mysql_databases(prefix)
        return
    require_postgres()
    prefix = pg_prefix()
    yield f"postgresql://postgres@127.0.0.1:5432/{prefix}_{{cell}}"
    drop_pg_databases(prefix)


def process(template: str, rule: Rule = RULE) -> CellStore:
    """One process's copy of u1 in region hz: a fence and a store of its own."""
    fence = Fence("hz", rule)
    url = cell_url(template, CELL)
    return CellStore(RULE.cells[CELL], "hz", url, fence, readers=1, shared=True)


def put_cart_line(buyer: int) -> object:
    def work(tx: WriteTx) -> None:
        tx.insert(carts, {"buyer_id": buyer, "sku": "S", "qty": 1, "updated_ms": 1})

    return work


@contextlib.contextmanager
def cell_lock_held(url: str) -> Iterator[None]:
    """Another connection holds the copy's cell_meta row lock, as a process frozen inside
    a write transaction would."""
    if backend_of(url) == "mysql":
        with mysql_row_locked(url):
            yield
        return
    import psycopg

    parsed = make_url(sync_url(url))
    with psycopg.connect(host=parsed.host, user=parsed.username, dbname=parsed.database) as conn:
        conn.execute("SELECT last_position FROM cell_meta FOR UPDATE")
        yield
        conn.rollback()


def test_a_write_under_an_older_rule_is_refused_once_another_process_raised_the_fence(
    server_url: str,
) -> None:
    async def run() -> None:
        stale, current = process(server_url), process(server_url, RULE.derive(2))
        await stale.open()
        await current.open()
        try:
            await stale.write(put_cart_line(1))  # under rule 1, before the raise: committed
            # The other process saw the cell change at rule 2 (a ban, a new owner).
            await current.raise_fence(2)
            with pytest.raises(WriteBanned, match="rule version 2"):
                await stale.write(put_cart_line(2))
            await current.write(put_cart_line(3))  # under rule 2: still written
            # The fence only grows.
            await current.raise_fence(1)
            with pytest.raises(WriteBanned):
                await stale.write(put_cart_line(5))
            # An apply under a stale rule is refused too: a process of a region where u1 is
            # a replica, which has not learnt of the change that the others have.
            url = cell_url(server_url, CELL)
            replica = CellStore(RULE.cells[CELL], "sh", url, Fence("sh", RULE), shared=True)
            await replica.open()
            try:
                with pytest.raises(WriteBanned):
                    await replica.write_replica(put_cart_line(4))  # type: ignore[arg-type]
            finally:
                await replica.close()
        finally:
            await stale.close()
            await current.close()

    asyncio.run(run())


def test_raising_the_fence_waits_for_a_transaction_holding_the_cells_lock(
    server_url: str,
) -> None:
    """A process frozen inside a write holds the cell's lock: the raise (and so the
    acknowledgement) waits until that transaction ends, whichever way it ends."""

    async def run() -> None:
        store = process(server_url)
        await store.open()
        try:
            url = cell_url(server_url, CELL)
            with cell_lock_held(url):
                raising = asyncio.ensure_future(store.raise_fence(2))
                await asyncio.sleep(1.0)
                assert not raising.done(), "the fence was raised past a held lock"
            await asyncio.wait_for(raising, 10)
        finally:
            await store.close()

    asyncio.run(run())


def test_the_fence_acknowledges_a_rule_only_once_the_database_fence_is_raised(
    server_url: str,
) -> None:
    async def run() -> None:
        store = process(server_url)
        await store.open()
        store.fence.settle = lambda cells, version: store.raise_fence(version)
        banned = RULE.derive(2, banned=[CELL])
        try:
            url = cell_url(server_url, CELL)
            with cell_lock_held(url):
                with pytest.raises(TimeoutError):
                    await store.fence.install(banned, timeout_s=1.0)
                assert store.fence.rule.version == 2  # in force: refuses writes already
                assert store.fence.acked == 1  # but not acknowledged
            await until(lambda: store.fence.acked == 2, "the acknowledgement", 10)
            # A rule that changes nothing of the cell needs no raise.
            await store.fence.install(banned.derive(3))
            assert store.fence.acked == 3
        finally:
            await store.close()

    asyncio.run(run())


def test_a_process_sees_what_another_committed_and_its_wait_is_woken_promptly(
    server_url: str,
) -> None:
    async def run() -> None:
        writer, reader = process(server_url), process(server_url)
        await writer.open()
        await reader.open()
        try:
            await writer.write(put_cart_line(1))
            assert reader.position == 0  # nothing tells it but the database
            assert await reader.refresh() == writer.position == 1
            delays = []
            for buyer in range(2, 12):
                waiting = asyncio.ensure_future(reader.wait_beyond(reader.position, 5.0))
                await asyncio.sleep(0.2)  # the poll has backed off to its slowest
                committed = time.monotonic()
                await writer.write(put_cart_line(buyer))
                assert await waiting == writer.position
                delays.append(time.monotonic() - committed)
            # Polled every 5-50 ms while waiting: far below the 2 s long poll (generous
            # bound for a busy machine).
            assert max(delays) < 1.0, delays
        finally:
            await writer.close()
            await reader.close()

    asyncio.run(run())


def test_followers_recorded_by_several_processes_keep_the_newest(server_url: str) -> None:
    async def run() -> None:
        one, two = process(server_url), process(server_url)
        await one.open()
        await two.open()
        try:
            await followers.record(one, {"sh": (3, 100), "bj": (2, 50)})
            await followers.record(two, {"sh": (2, 120)})  # an older rule, a newer position
            await followers.record(two, {"bj": (4, 40)})
            assert await followers.read(one) == {"sh": (3, 120), "bj": (4, 50)}
        finally:
            await one.close()
            await two.close()

    asyncio.run(run())


def test_one_leader_at_a_time_and_its_lock_dies_with_it(server_url: str) -> None:
    async def run() -> None:
        store = process(server_url)
        await store.open()  # the database exists
        await store.close()
        url = cell_url(server_url, CELL)
        first, second = LeaderLock(url), LeaderLock(url)
        try:
            assert await first.try_acquire()
            assert not await second.try_acquire()
            assert await first.check()
            # The leader's connection dies (a process killed, the server cut it off): the
            # server releases the lock, the old leader finds out at its next check.
            kill_session(first)
            assert await second.try_acquire()
            assert not await first.check()
            assert not await first.try_acquire()
            await second.release()  # a process that stops gives it back at once
            assert await first.try_acquire()
        finally:
            await first.release()
            await second.release()

    asyncio.run(run())


def kill_session(lock: LeaderLock) -> None:
    """End the lock holder's database session from another connection."""
    conn = lock._conn  # the connection holding the lock
    assert conn is not None
    if lock.backend == "postgresql":
        import psycopg

        pid = conn.info.backend_pid
        parsed = make_url(sync_url(lock.url))
        with psycopg.connect(
            host=parsed.host, user=parsed.username, dbname="postgres", autocommit=True
        ) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return
    import pymysql

    parsed = make_url(sync_url(lock.url))
    thread_id = conn.thread_id()
    admin = pymysql.connect(host=parsed.host, port=parsed.port or 3306, user=parsed.username)
    try:
        admin.cursor().execute(f"KILL {int(thread_id)}")
    finally:
        admin.close()
