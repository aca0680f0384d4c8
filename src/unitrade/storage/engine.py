"""Database engines for a cell copy: SQLite (WAL) by default, PostgreSQL by configuration.

SQLAlchemy Core is the whole dialect layer: the same statements run on both. Where the
transactions run (on the event loop for SQLite, on the store's threads for PostgreSQL) is
decided in storage/store.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_MS = 10_000
# After a checkpoint resets the WAL, the file is truncated to this size (bytes).
SQLITE_WAL_BYTES_KEPT = 16 * 1024 * 1024
POOL_TIMEOUT_S = 10.0
READ_POOL_SIZE = 4


def sync_url(url: str) -> str:
    """`postgresql://` with the psycopg 3 driver; SQLite as it is."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.drivername == "sqlite+aiosqlite":
        return str(parsed.set(drivername="sqlite"))
    return url


def backend_of(url: str) -> str:
    return make_url(sync_url(url)).get_backend_name()


def create_inline_engine(url: str) -> Engine:
    """SQLite only: the one connection that runs transactions on the event loop itself.

    It never waits for a lock (busy_timeout 0): a transaction that finds the database
    locked by another process fails at BEGIN, before any work, and goes to the writer
    thread instead. It never checkpoints the WAL (the only step that fsyncs): the writer
    thread does, off the loop. Transactions are begun and ended explicitly (AUTOCOMMIT at
    the driver), so BEGIN IMMEDIATE is under the store's control.
    """
    parsed = make_url(sync_url(url))
    assert parsed.get_backend_name() == "sqlite"
    engine = create_engine(
        parsed,
        isolation_level="AUTOCOMMIT",
        pool_size=1,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args={"check_same_thread": False, "timeout": 0},
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_BYTES_KEPT}")
        cursor.close()

    return engine


def create_cell_engine(url: str, *, writer: bool) -> Engine:
    """The engine of a cell copy's writer thread (one connection) or of its readers."""
    full = sync_url(url)
    parsed = make_url(full)
    size = 1 if writer else READ_POOL_SIZE
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            full,
            pool_size=size,
            max_overflow=0,
            pool_timeout=POOL_TIMEOUT_S,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        _sqlite_events(engine, begin="BEGIN IMMEDIATE" if writer else "BEGIN")
        return engine
    if backend == "postgresql":
        ensure_pg_database(full)
        return create_engine(
            full, pool_size=size, max_overflow=0, pool_timeout=POOL_TIMEOUT_S, pool_pre_ping=True
        )
    raise ValueError(f"unsupported storage URL {url!r}: use sqlite:// or postgresql://")


def _sqlite_events(engine: Engine, begin: str) -> None:
    # SQLAlchemy's documented recipe for pysqlite: let SQLAlchemy, not the driver, emit BEGIN,
    # so that writers take the write lock up front (BEGIN IMMEDIATE) and never fail half-way
    # on a lock upgrade.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA journal_size_limit={SQLITE_WAL_BYTES_KEPT}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


def _pg_admin(url: str) -> Any:
    import psycopg

    parsed = make_url(sync_url(url))
    params: dict[str, Any] = {
        "host": parsed.host or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username or "postgres",
        "dbname": "postgres",
        "autocommit": True,
        "connect_timeout": 10,
    }
    if parsed.password:
        params["password"] = parsed.password
    return psycopg.connect(**params), parsed.database


def ensure_pg_database(url: str) -> None:
    """Create the cell copy's PostgreSQL database if it does not exist yet."""
    import psycopg

    if not make_url(sync_url(url)).database:
        # From the topology file: checked for real, an assert would vanish under `python -O`.
        raise ValueError(f"storage URL {url!r} names no database: postgresql://host/<database>")
    conn, name = _pg_admin(url)
    with conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        try:
            conn.execute(f'CREATE DATABASE "{name}"')
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            pass  # another region process created it first
