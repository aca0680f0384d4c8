"""Database engines for a cell copy: SQLite (WAL) by default, PostgreSQL by configuration.

SQLAlchemy Core (async) is the whole dialect layer: the same statements run on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 10_000
POOL_TIMEOUT_S = 10.0  # a request waits at most this long for a connection
PG_POOL_SIZE = 8
SQLITE_READ_POOL_SIZE = 4


@dataclass
class Engines:
    """One engine for writes and one for reads (the same one on PostgreSQL).

    SQLite allows one writer at a time; a write pool of exactly one connection makes the
    writers of this process queue in the pool (bounded by POOL_TIMEOUT_S) instead of
    spinning on SQLITE_BUSY, and `BEGIN IMMEDIATE` takes the write lock at the start so a
    transaction never fails half-way on lock upgrade.
    """

    write: AsyncEngine
    read: AsyncEngine
    dialect: str

    async def dispose(self) -> None:
        await self.write.dispose()
        if self.read is not self.write:
            await self.read.dispose()


def async_url(url: str) -> str:
    """`sqlite:///...` and `postgresql://...` with their async drivers."""
    parsed = make_url(url)
    if parsed.drivername == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    return url


async def create_engines(url: str) -> Engines:
    full = async_url(url)
    parsed = make_url(full)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engines(full, parsed.database)
    if parsed.get_backend_name() == "postgresql":
        await ensure_pg_database(full)
        engine = create_async_engine(
            full, pool_size=PG_POOL_SIZE, max_overflow=0, pool_timeout=POOL_TIMEOUT_S
        )
        return Engines(write=engine, read=engine, dialect="postgresql")
    raise ValueError(f"unsupported storage URL {url!r}: use sqlite:// or postgresql://")


def _sqlite_engines(url: str, database: str | None) -> Engines:
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    write = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=POOL_TIMEOUT_S)
    read = create_async_engine(
        url, pool_size=SQLITE_READ_POOL_SIZE, max_overflow=0, pool_timeout=POOL_TIMEOUT_S
    )
    _sqlite_events(write, begin="BEGIN IMMEDIATE")
    _sqlite_events(read, begin="BEGIN")
    return Engines(write=write, read=read, dialect="sqlite")


def _sqlite_events(engine: AsyncEngine, begin: str) -> None:
    # The documented SQLAlchemy recipe for pysqlite/aiosqlite: let SQLAlchemy, not the driver,
    # emit BEGIN, so that we choose IMMEDIATE for writers.
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


async def ensure_pg_database(url: str) -> None:
    """Create the cell copy's PostgreSQL database if it does not exist yet."""
    import asyncpg

    parsed = make_url(url)
    name = parsed.database
    assert name, "a PostgreSQL storage URL names a database"
    admin = parsed.set(drivername="postgresql", database="postgres")
    conn = await asyncpg.connect(admin.render_as_string(hide_password=False), timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                pass  # another region process created it first
    finally:
        await conn.close()


async def drop_pg_database(url: str) -> None:
    import asyncpg

    parsed = make_url(async_url(url))
    admin = parsed.set(drivername="postgresql", database="postgres")
    conn = await asyncpg.connect(admin.render_as_string(hide_password=False), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
    finally:
        await conn.close()
