"""The database connection of a cell's writer dies in the middle of an order's write: the
answer is 504 `outcome_unknown` (never a 500 claiming nothing was written), the order's
stock reservation is kept while the order may exist, and repeating the request with its
idempotency key settles it. Real servers: the writer's connection is killed by the database
(pg_terminate_backend, MariaDB's KILL) while its INSERT waits on a lock the test holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from tests.support import (
    MYSQL_BASE,
    drop_mysql_databases,
    drop_pg_databases,
    in_process_region,
    mysql_prefix,
    pg_prefix,
    require_mysql,
    require_postgres,
    write_topology,
)
from unitrade.errors import OutcomeUnknown, WriteOutcomeUnknown
from unitrade.storage.store import may_have_committed
from unitrade.topology.rule import route_buyer

BUYER_IN_U1 = 100  # bucket 0 -> cell u1, owned by hz with the center
WAIT_S_MAX = 20.0
PG_BASE = "postgresql://postgres@127.0.0.1:5432"


class PgLock:
    """A SHARE lock on a copy's `orders` table, held by a connection of the test: an
    order's INSERT waits for it. `kill_waiter` terminates the backend that waits."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.conn = psycopg.connect(host="127.0.0.1", user="postgres", dbname=database)

    def hold(self) -> None:
        self.conn.execute("LOCK TABLE orders IN SHARE MODE")

    def waiter(self) -> int | None:
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres") as admin:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND wait_event_type = "
                "'Lock' AND query ILIKE 'INSERT INTO orders%%'",
                (self.database,),
            ).fetchone()
        return None if row is None else int(row[0])

    def kill(self, pid: int) -> None:
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres") as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


class MysqlLock:
    """The same on MySQL/MariaDB: LOCK TABLES orders READ; the INSERT waits for the
    table's metadata lock; KILL ends its connection."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.conn = pymysql.connect(host="127.0.0.1", user="root", database=database)

    def hold(self) -> None:
        self.conn.cursor().execute("LOCK TABLES orders READ")

    def waiter(self) -> int | None:
        with pymysql.connect(host="127.0.0.1", user="root") as admin:
            cursor = admin.cursor()
            cursor.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND STATE LIKE "
                "'Waiting for table metadata lock%%' AND INFO LIKE '%%INSERT INTO orders%%'",
                (self.database,),
            )
            row = cursor.fetchone()
        return None if row is None else int(row[0])

    def kill(self, pid: int) -> None:
        with pymysql.connect(host="127.0.0.1", user="root", autocommit=True) as admin:
            admin.cursor().execute(f"KILL {int(pid)}")

    def release(self) -> None:
        self.conn.cursor().execute("UNLOCK TABLES")
        self.conn.close()


@pytest.fixture(
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(storage URL template, prefix) on a database server of the test's own prefix."""
    if request.param == "postgresql":
        require_postgres()
        prefix, base, drop = pg_prefix(), PG_BASE, drop_pg_databases
    else:
        require_mysql()
        prefix, base, drop = mysql_prefix(), MYSQL_BASE, drop_mysql_databases
    try:
        yield f"{base}/{prefix}_{{region}}_{{cell}}", prefix
    finally:
        drop(prefix)


async def _poll(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S_MAX
    while True:
        found = await asyncio.to_thread(check)
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_writer_connection_killed_mid_order_is_outcome_unknown_and_keeps_the_stock(
    tmp_path: Path, engine: tuple[str, str]
) -> None:
    url, prefix = engine
    config, _path = write_topology(tmp_path, storage=url)
    database = f"{prefix}_hz_u1"
    locker: type[PgLock] | type[MysqlLock] = PgLock if url.startswith("postgresql") else MysqlLock

    async def scenario() -> None:
        runtime = in_process_region(config, "hz", tmp_path / "data")
        await runtime.start()
        lock = None
        try:
            assert route_buyer(runtime.fence.rule, BUYER_IN_U1).cell == 1
            await runtime.catalog_service.put("A", "a", 100)
            await runtime.inventory.set_stock("A", 10)
            lock = await asyncio.to_thread(locker, database)
            await asyncio.to_thread(lock.hold)
            create = asyncio.create_task(runtime.orders.create(BUYER_IN_U1, [("A", 3)], "k-1"))
            # The fault strikes mid-flight: the order's INSERT is waiting inside its
            # transaction (the cell's lock taken, the stock reserved at the center).
            pid = await _poll(lock.waiter, "the order's INSERT to wait on the test's lock")
            assert not create.done()
            reserved = await runtime.inventory.levels("A")
            assert reserved["reserved"] == 3, reserved
            await asyncio.to_thread(lock.kill, pid)
            with pytest.raises(WriteOutcomeUnknown) as lost:
                await asyncio.wait_for(create, WAIT_S_MAX)
            await asyncio.to_thread(lock.release)
            lock = None
            error = lost.value
            assert isinstance(error, OutcomeUnknown)
            assert (error.status, error.code) == (504, "outcome_unknown")
            assert error.details == {"region": "hz", "call": "database", "cell": 1}
            assert may_have_committed(error.__cause__)  # type: ignore[arg-type]
            # The order may exist, so its units stay reserved: releasing them now could
            # sell them twice.
            levels = await runtime.inventory.levels("A")
            assert levels == {"sku": "A", "available": 7, "reserved": 3, "sold": 0}
            # Repeating the request with its key settles it: here the transaction died
            # before its commit, so the order is written now, once.
            again = await runtime.orders.create(BUYER_IN_U1, [("A", 3)], "k-1")
            assert not again.replayed
            replay = await runtime.orders.create(BUYER_IN_U1, [("A", 3)], "k-1")
            assert replay.replayed and replay.order["order_id"] == again.order["order_id"]
            # The first attempt's reservation (an order that was never written) is released
            # by the abandoned sweep, once it is past its grace; the order's own is not.
            store = runtime.copies[1]
            assert await runtime.orders.release_abandoned(store, grace_s=0) == 1
            levels = await runtime.inventory.levels("A")
            assert levels == {"sku": "A", "available": 7, "reserved": 3, "sold": 0}
            # The cell writes again on a new connection.
            more = await runtime.orders.create(BUYER_IN_U1, [("A", 1)], "k-2")
            assert more.order["status"] == "created"
        finally:
            if lock is not None:
                await asyncio.to_thread(lock.release)
            await runtime.stop()

    asyncio.run(scenario())
