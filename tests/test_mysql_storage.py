"""What is particular to MySQL/MariaDB cell copies: no UPDATE ... RETURNING, the cell lock's
wait, the collation; on the event loop (asyncmy) and on the store's threads (PyMySQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy import Connection, select

from tests.storage_support import make_store, mysql_row_locked
from tests.support import MYSQL_BASE, drop_mysql_databases, mysql_prefix, require_mysql
from unitrade.errors import Overloaded
from unitrade.storage import engine
from unitrade.storage.schema import carts, changelog

pytestmark = pytest.mark.mysql
KEY = {"buyer_id": 7, "sku": "A"}


@pytest.fixture(params=["mysql", "mysql+aiomysql", "mysql+pymysql"])
def mysql_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A storage URL template on MariaDB: through asyncmy or aiomysql on the loop, or PyMySQL
    on threads."""
    require_mysql()
    prefix = mysql_prefix()
    base = MYSQL_BASE.replace("mysql://", f"{request.param}://")
    yield f"{base}/{prefix}_{{cell}}"
    drop_mysql_databases(prefix)


def test_an_update_reads_its_row_image_back_by_key(mysql_url: str) -> None:
    async def scenario() -> None:
        store = make_store(mysql_url, 1)
        await store.open()
        try:
            await store.write(lambda tx: tx.insert(carts, {**KEY, "qty": 5, "updated_ms": 1}))
            # Setting a column to the value it has matches the row (CLIENT_FOUND_ROWS): the
            # image is returned and captured, as with RETURNING elsewhere.
            same = await store.write(lambda tx: tx.update(carts, KEY, {"qty": 5}))
            assert same == {**KEY, "qty": 5, "updated_ms": 1}
            added = await store.write(lambda tx: tx.update(carts, KEY, add={"qty": 2}))
            assert added is not None and added["qty"] == 7
            # A condition that does not hold changes nothing and captures nothing.
            refused = await store.write(
                lambda tx: tx.update(carts, KEY, add={"qty": -100}, at_least={"qty": 100})
            )
            assert refused is None
            rows = await store.read(
                lambda c: c.execute(select(changelog).order_by(changelog.c.position)).all()
            )
            assert [(r.position, r.op) for r in rows] == [(1, "i"), (2, "u"), (3, "u")]
            assert await store.last_position() == 3
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_write_that_waits_too_long_for_the_cell_lock_writes_nothing(
    mysql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's writer holds the cell_meta row lock past the lock wait: the write
    is refused (503 overloaded) and nothing of it is written."""
    monkeypatch.setattr(
        engine,
        "MYSQL_SESSION",
        engine.MYSQL_SESSION.replace(
            "innodb_lock_wait_timeout = 10", "innodb_lock_wait_timeout = 1"
        ),
    )

    async def scenario() -> None:
        store = make_store(mysql_url, 1)
        await store.open()
        try:
            url = store.url
            with mysql_row_locked(url):
                with pytest.raises(Overloaded) as refused:
                    await store.write(
                        lambda tx: tx.insert(carts, {**KEY, "qty": 1, "updated_ms": 0})
                    )
                assert refused.value.status == 503
            assert await store.read(lambda c: c.execute(select(carts)).all()) == []
            assert await store.last_position() == 0
            await store.write(lambda tx: tx.insert(carts, {**KEY, "qty": 1, "updated_ms": 0}))
            assert await store.last_position() == 1
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_database_that_folds_case_is_refused(mysql_url: str) -> None:
    """A database created beforehand with a case-insensitive collation would make 'A' and
    'a' one key: the copy refuses to open on it, naming the fix."""
    store = make_store(mysql_url, 1)
    name = store.url.rsplit("/", 1)[1]
    with pymysql.connect(host="127.0.0.1", user="root", autocommit=True) as conn:
        conn.cursor().execute(
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
        )

    async def scenario() -> None:
        try:
            with pytest.raises(ValueError, match="utf8mb4_general_ci") as refused:
                await store.open()
            assert "ALTER DATABASE" in str(refused.value)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_connections_the_server_dropped_are_replaced_without_an_error(mysql_url: str) -> None:
    """The server restarts or cuts idle connections: the next write and read find their
    connection dead before doing anything, and run on a new one."""

    async def scenario() -> None:
        store = make_store(mysql_url, 1)
        await store.open()
        try:
            await store.write(lambda tx: tx.insert(carts, {**KEY, "qty": 1, "updated_ms": 0}))
            assert len(await store.read(lambda c: c.execute(select(carts)).all())) == 1
            name = store.url.rsplit("/", 1)[1]
            with pymysql.connect(host="127.0.0.1", user="root", autocommit=True) as admin:
                cursor = admin.cursor()
                cursor.execute(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s", (name,)
                )
                killed = [row[0] for row in cursor.fetchall()]
                for connection_id in killed:
                    cursor.execute(f"KILL {int(connection_id)}")
            assert len(killed) >= 2, "the writer's and a reader's connections"
            await store.write(lambda tx: tx.update(carts, KEY, {"qty": 2}))
            rows = await store.read(lambda c: c.execute(select(carts)).all())
            assert [r.qty for r in rows] == [2]
            assert await store.last_position() == 2
        finally:
            await store.close()

    asyncio.run(scenario())


def test_keyset_pages_of_composite_keys_are_range_scans(mysql_url: str) -> None:
    """Snapshot chunks and diff pages after a composite key start at that key: MariaDB
    reads a row-value comparison from the start of the key instead, so the k-th page of a
    table cost k pages (storage/keys.py)."""
    from unitrade.replication.diff import _range_statement
    from unitrade.replication.snapshot import _chunk_statement
    from unitrade.storage.schema import buyer_orders, order_lines

    async def scenario() -> None:
        store = make_store(mysql_url, 1)
        await store.open()
        try:
            lines = [
                {"order_id": i // 3, "line_no": i % 3, "sku": "S", "qty": 1, "price_cents": 1}
                for i in range(3000)
            ]
            await store.write_own(lambda tx: tx.put_rows(order_lines, lines))
            statements = [
                (_chunk_statement(order_lines, True), {"a_order_id": 500, "a_line_no": 1}),
                (
                    _range_statement(buyer_orders, True, True),
                    {
                        **{f"lo_{c}": 5 for c in ("buyer_id", "created_ms", "order_id")},
                        **{f"hi_{c}": 9 for c in ("buyer_id", "created_ms", "order_id")},
                    },
                ),
            ]

            def plan(conn: Connection, statement: Any, params: dict[str, int]) -> Any:
                compiled = statement.compile(dialect=conn.dialect)
                values = compiled.construct_params({**params, "n": 1000, "upto": 0})
                bound: Any = values
                if compiled.positional:  # asyncmy: %s; PyMySQL: %(name)s
                    bound = tuple(values[name] for name in compiled.positiontup or ())
                return conn.exec_driver_sql(f"EXPLAIN {compiled}", bound).mappings().all()

            for statement, params in statements:
                rows = await store.read(lambda c, s=statement, p=params: plan(c, s, p))
                assert rows[0]["type"] == "range", (str(statement), rows)
        finally:
            await store.close()

    asyncio.run(scenario())
