"""The lock that makes one process of a region its leader, held in the region's database.

A region of many processes does its background work once, in the process holding this
lock (unitrade/workers.py). The lock is the database server's own, on a connection of its
own, so it dies with its holder: a process killed, or cut off from the database, loses its
connection and the server releases the lock at once, and another process takes it at its
next try.

- PostgreSQL: `pg_try_advisory_lock(key)`, a session lock, in the region's copy of the
  global cell (advisory locks are per database, so the key needs nothing else).
- MySQL/MariaDB: `GET_LOCK(name, 0)`, a named lock of the whole server, so the name holds
  the database's (the region's copy of the global cell, unique per region and cluster).

Both through the sync drivers on a thread of its own: one statement a second, and a driver
call that hangs (a server that stopped answering) holds up nothing but this lock, whose
check then times out and counts as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.engine import make_url

from unitrade.storage.engine import backend_of, sync_url

log = logging.getLogger("unitrade.workers")

# The advisory lock key of a region's leader (PostgreSQL): any constant, one per database.
PG_LEADER_KEY = 0x756E6974726164  # "unitrad"
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_S = 2.0  # a check that takes longer counts as a lost lock


class LeaderLock:
    """Try, hold and check the leader lock of a region in the database at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = backend_of(url)
        if self.backend not in ("postgresql", "mysql"):
            raise ValueError(f"no leader lock on {self.backend}: one process per region there")
        parsed = make_url(sync_url(url))
        self.database = parsed.database or ""
        self.name = f"unitrade-leader:{self.database}"[:64]  # MySQL's limit on lock names
        self._conn: Any = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="leader-lock")
        self._lock = threading.Lock()  # the connection, between a timed-out call and the next
        self._closed = False

    @property
    def held(self) -> bool:
        return self._conn is not None

    async def try_acquire(self) -> bool:
        """Take the lock if it is free; whether this process holds it now."""
        if self._closed:
            return False
        if self._conn is not None:
            return await self.check()
        return await self._call(self._acquire_sync)

    async def check(self) -> bool:
        """Whether this process still holds the lock: its connection answers. False (and
        the connection dropped) if it does not, within STATEMENT_TIMEOUT_S."""
        if self._conn is None:
            return False
        return await self._call(self._check_sync)

    async def drop(self) -> None:
        """Give the lock up (another process takes it at its next try)."""
        await self._call(self._drop_sync)

    async def release(self) -> None:
        """Give the lock up for good: this process stops (again: nothing)."""
        if self._closed:
            return
        self._closed = True
        await self.drop()
        self._thread.shutdown(wait=False)

    async def _call(self, work: Any) -> bool:
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._thread, work)
        try:
            async with asyncio.timeout(STATEMENT_TIMEOUT_S + CONNECT_TIMEOUT_S):
                return bool(await asyncio.shield(job))
        except TimeoutError:
            # The call hangs on a server that stopped answering: treat the lock as lost
            # now; the thread drops the connection when (if) the call returns.
            log.warning("the leader lock's database does not answer: leadership given up")
            threading.Thread(target=self._forget, daemon=True).start()
            return False

    def _forget(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- on the lock's thread ---------------------------------------------------------------

    def _connect(self) -> Any:
        parsed = make_url(sync_url(self.url))
        if self.backend == "postgresql":
            import psycopg

            params: dict[str, Any] = {
                "host": parsed.host or "127.0.0.1",
                "port": parsed.port or 5432,
                "user": parsed.username or "postgres",
                "dbname": self.database,
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_S,
                # A dead peer is noticed by the kernel too, not only by the next check.
                "keepalives": 1,
                "keepalives_idle": 5,
                "keepalives_interval": 2,
                "keepalives_count": 2,
            }
            if parsed.password:
                params["password"] = parsed.password
            return psycopg.connect(**params)
        import pymysql

        return pymysql.connect(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 3306,
            user=parsed.username or "root",
            password=parsed.password or "",
            database=self.database,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=int(STATEMENT_TIMEOUT_S) + 1,
            write_timeout=int(STATEMENT_TIMEOUT_S) + 1,
        )

    def _scalar(self, conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
        if self.backend == "postgresql":
            return conn.execute(sql, params).fetchone()[0]
        cursor = conn.cursor()
        try:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]
        finally:
            cursor.close()

    def _acquire_sync(self) -> bool:
        with self._lock:
            if self._conn is not None:
                return True
            conn = self._connect()
            try:
                if self.backend == "postgresql":
                    got = self._scalar(conn, "SELECT pg_try_advisory_lock(%s)", (PG_LEADER_KEY,))
                else:
                    got = self._scalar(conn, "SELECT GET_LOCK(%s, 0)", (self.name,)) == 1
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            if not got:
                conn.close()
                return False
            self._conn = conn
            return True

    def _check_sync(self) -> bool:
        with self._lock:
            conn = self._conn
            if conn is None:
                return False
            try:
                if self.backend == "postgresql":
                    held = self._scalar(
                        conn,
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND pid = pg_backend_pid() AND granted",
                    )
                else:
                    held = self._scalar(
                        conn, "SELECT IS_USED_LOCK(%s) = CONNECTION_ID()", (self.name,)
                    )
                if held:
                    return True
            except Exception as exc:
                log.warning("the leader lock's connection failed: %s", exc)
            self._conn = None
            with contextlib.suppress(Exception):
                conn.close()
            return False

    def _drop_sync(self) -> bool:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()  # the server releases the lock with the session
        return False
