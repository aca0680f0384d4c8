"""Database engines for a cell copy: SQLite (WAL) by default, PostgreSQL or MySQL/MariaDB
by configuration.

SQLAlchemy Core is the whole dialect layer: the same statements run on all three. Where the
transactions run (on the event loop for SQLite, on the store's threads for PostgreSQL, on
the event loop through an asyncio driver for MySQL/MariaDB) is decided in storage/store.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 10_000
# After a checkpoint resets the WAL, the file is truncated to this size (bytes).
SQLITE_WAL_BYTES_KEPT = 16 * 1024 * 1024
POOL_TIMEOUT_S = 10.0
READ_POOL_SIZE = 4  # reader connections per cell copy, unless the region says otherwise
READ_POOL_SIZE_MAX = 32

# MySQL/MariaDB (docs/operations.md, Running on MySQL or MariaDB). `mysql://` and
# `mariadb://` run a cell copy's transactions on the event loop through asyncmy
# (benchmarks/bench_mysql_driver.py: the asyncio drivers measured, and why this one);
# `+aiomysql` picks the other asyncio driver, `+pymysql` the store's threads as on
# PostgreSQL. Sync work (the control store, creating databases) uses PyMySQL.
MYSQL_SCHEMES = ("mysql", "mariadb")
MYSQL_ASYNC_DRIVERS = ("asyncmy", "aiomysql")
MYSQL_SYNC_DRIVERS = ("pymysql", "mysqldb")  # mysqldb (mysqlclient): the benchmark's only
MYSQL_DRIVER_DEFAULT = "asyncmy"
MYSQL_LOCK_WAIT_S = 10  # a writer waits this long for a cell's lock held by another process
# Every session: strict (a value that does not fit is an error, never silently cut, as on
# PostgreSQL), UTC, READ COMMITTED (set by SQLAlchemy, see create_cell_engine).
MYSQL_SESSION = (
    "SET SESSION sql_mode = 'TRADITIONAL,NO_ENGINE_SUBSTITUTION', "
    "SESSION time_zone = '+00:00', "
    f"SESSION innodb_lock_wait_timeout = {MYSQL_LOCK_WAIT_S}"
)
MYSQL_ISOLATION = "READ COMMITTED"
MYSQL_POOL_RECYCLE_S = 3600  # below the server's wait_timeout (8 h by default)
MYSQL_DATABASE_NAME = re.compile(r"^[A-Za-z0-9_$-]{1,64}$")


def sync_url(url: str) -> str:
    """`postgresql://` with the psycopg 3 driver; `mysql://` and `mariadb://` with PyMySQL;
    SQLite as it is."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.drivername == "sqlite+aiosqlite":
        return str(parsed.set(drivername="sqlite"))
    if _is_mysql(parsed):
        driver = _driver(parsed)
        driver = driver if driver in MYSQL_SYNC_DRIVERS else "pymysql"
        return parsed.set(drivername=f"mysql+{driver}").render_as_string(hide_password=False)
    return url


def async_url(url: str) -> str:
    """The asyncio driver's URL of a MySQL/MariaDB storage URL (asyncmy unless it names
    aiomysql); `mysql+pymysql://` has none: such a copy runs on threads."""
    parsed = make_url(url)
    assert _is_mysql(parsed) and is_async(url), url
    driver = _driver(parsed)
    if driver not in MYSQL_ASYNC_DRIVERS:
        driver = MYSQL_DRIVER_DEFAULT
    return parsed.set(drivername=f"mysql+{driver}").render_as_string(hide_password=False)


def _driver(parsed: URL) -> str:
    """The driver a URL names ("" for none: not SQLAlchemy's default, mysqldb)."""
    return parsed.drivername.partition("+")[2]


def _is_mysql(parsed: URL) -> bool:
    return parsed.get_backend_name() in MYSQL_SCHEMES


def is_async(url: str) -> bool:
    """Whether a cell copy's transactions run on the event loop through an asyncio driver:
    MySQL/MariaDB, unless the URL names a sync driver."""
    parsed = make_url(url)
    return _is_mysql(parsed) and _driver(parsed) not in MYSQL_SYNC_DRIVERS


def backend_of(url: str) -> str:
    """sqlite, postgresql or mysql (MariaDB too)."""
    name = make_url(sync_url(url)).get_backend_name()
    return "mysql" if name in MYSQL_SCHEMES else name


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


def create_cell_engine(url: str, *, writer: bool, readers: int = READ_POOL_SIZE) -> Engine:
    """The engine of a cell copy's writer thread (one connection) or of its `readers`."""
    assert 1 <= readers <= READ_POOL_SIZE_MAX
    full = sync_url(url)
    parsed = make_url(full)
    size = 1 if writer else readers
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
        if writer:
            return create_engine(
                full,
                pool_size=size,
                max_overflow=0,
                pool_timeout=POOL_TIMEOUT_S,
                pool_pre_ping=True,
            )
        # Readers: each statement in its own snapshot, as READ COMMITTED gives a transaction
        # anyway, without the BEGIN and COMMIT round trips around it; and no ping before
        # each use (a read that finds its connection dead runs once more, CellStore.read).
        return create_engine(
            full,
            pool_size=size,
            max_overflow=0,
            pool_timeout=POOL_TIMEOUT_S,
            isolation_level="AUTOCOMMIT",
        )
    if backend == "mysql":
        ensure_mysql_database(full)
        engine = create_engine(full, **_mysql_pool(size))
        _mysql_events(engine)
        return engine
    raise ValueError(
        f"unsupported storage URL {url!r}: use sqlite://, postgresql://, mysql:// or mariadb://"
    )


def create_async_cell_engine(
    url: str, *, writer: bool, readers: int = READ_POOL_SIZE
) -> AsyncEngine:
    """MySQL/MariaDB through an asyncio driver: the engine of a cell copy's writer (one
    connection) or of its `readers`. Creates the database first if it does not exist (a
    blocking call: run it off the loop, as CellStore.open does)."""
    assert 1 <= readers <= READ_POOL_SIZE_MAX
    ensure_mysql_database(url)
    # Each round trip counts (a cell's writes are serial, storage/mysql_batch.py): no ping
    # before each use and no ROLLBACK when a connection goes back to the pool. Every use is
    # a transaction that commits or rolls back, and the store retries, once, a transaction
    # whose connection turns out dead before it did anything (storage/store.py).
    engine = create_async_engine(
        async_url(url),
        **_mysql_pool(1 if writer else readers, pre_ping=False),
        pool_reset_on_return=None,
    )
    _mysql_events(engine.sync_engine)
    return engine


def _mysql_pool(size: int, pre_ping: bool = True) -> dict[str, Any]:
    return {
        "pool_size": size,
        "max_overflow": 0,
        "pool_timeout": POOL_TIMEOUT_S,
        "pool_pre_ping": pre_ping,
        "pool_recycle": MYSQL_POOL_RECYCLE_S,
        # Every write of a cell copy takes the cell_meta row lock first, so writers are
        # serialised and REPEATABLE READ's snapshot would add nothing but next-key locks;
        # READ COMMITTED is also what PostgreSQL runs by default, which the reads were
        # written against (docs/architecture.md, Storage).
        "isolation_level": MYSQL_ISOLATION,
        "connect_args": {"charset": "utf8mb4", "connect_timeout": int(POOL_TIMEOUT_S)},
    }


def _mysql_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(MYSQL_SESSION)
        cursor.close()


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


def _mysql_admin(url: str) -> tuple[Any, str]:
    """A PyMySQL connection to the server of a MySQL storage URL, and its database name."""
    import pymysql

    parsed = make_url(sync_url(url))
    name = parsed.database or ""
    if not MYSQL_DATABASE_NAME.match(name):
        # From the topology file: checked for real, an assert would vanish under `python -O`.
        raise ValueError(
            f"storage URL {parsed.render_as_string(hide_password=True)!r} must name a "
            "database of 1-64 letters, digits, _, $ or -: "
            "mysql://user:password@host:port/<database>"
        )
    conn = pymysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        charset="utf8mb4",
        connect_timeout=int(POOL_TIMEOUT_S),
        autocommit=True,
    )
    return conn, name


def mysql_binary_collation(version: str) -> str:
    """The utf8mb4 collation that compares and orders strings by code point, without
    padding: as SQLite and PostgreSQL (C collation) do, so keys are case-sensitive, and
    every copy of a cell orders them the same way (snapshots and diff page by key)."""
    return "utf8mb4_nopad_bin" if "mariadb" in version.lower() else "utf8mb4_0900_bin"


def ensure_mysql_database(url: str) -> None:
    """Create the cell copy's MySQL/MariaDB database if it does not exist yet (utf8mb4, a
    binary collation), and refuse one whose collation would fold case or pad."""
    conn, name = _mysql_admin(url)
    with conn:
        cursor = conn.cursor()
        cursor.execute("SELECT VERSION()")
        collation = mysql_binary_collation(str(cursor.fetchone()[0]))
        # IF NOT EXISTS: another region process may create it at the same moment.
        cursor.execute(
            f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE {collation}"
        )
        cursor.execute(
            "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
            "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
            (name,),
        )
        charset, found = cursor.fetchone()
    if charset != "utf8mb4" or found != collation:
        raise ValueError(
            f"database {name!r} has character set {charset} and collation {found}: a cell "
            f"copy needs utf8mb4 with a binary collation ({collation}), or keys would compare "
            f"without case; ALTER DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE "
            f"{collation} before any table is created, or let unitrade create it"
        )
