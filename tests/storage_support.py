"""Cell stores for storage-level tests on SQLite, PostgreSQL or MySQL/MariaDB."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unitrade.storage.engine import backend_of, sync_url
from unitrade.storage.fence import Fence
from unitrade.storage.store import CellStore
from unitrade.topology.config import default_config
from unitrade.topology.rule import Rule, initial_rule

RULE = initial_rule(default_config())


def cell_url(template: str, cell: int) -> str:
    return template.format(cell=RULE.cells[cell].name)


def make_store(
    template: str, cell: int, region: str = "hz", rule: Rule = RULE, *, inline: bool = True
) -> CellStore:
    fence = Fence(region, rule)
    return CellStore(RULE.cells[cell], region, cell_url(template, cell), fence, inline=inline)


def sqlite_template(directory: Path) -> str:
    return f"sqlite:///{directory}/cell-{{cell}}.db"


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `condition` on the loop until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def sqlite_path(url: str) -> str:
    """The file of a SQLite storage URL."""
    return url.removeprefix("sqlite:///")


@contextmanager
def write_lock_held(url: str) -> Iterator[Callable[[], None]]:
    """Another connection holds the cell copy's write lock, as another process's writer
    would: on SQLite the database's (the store's inline writes find it taken and go to its
    writer thread), on MySQL/MariaDB the cell_meta row lock every writer takes first (the
    store's writes wait for it in the database). Yields the function that releases it. On
    PostgreSQL, nothing."""
    if backend_of(url) == "mysql":
        with mysql_row_locked(url) as release:
            yield release
        return
    if not url.startswith("sqlite"):
        yield lambda: None
        return
    other = sqlite3.connect(sqlite_path(url), isolation_level=None, timeout=5)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield lambda: other.execute("COMMIT") if other.in_transaction else None
    finally:
        other.close()


def _mysql_connection(url: str) -> Any:
    import pymysql
    from sqlalchemy.engine import make_url

    parsed = make_url(sync_url(url))
    return pymysql.connect(
        host=parsed.host, port=parsed.port or 3306, user=parsed.username, database=parsed.database
    )


@contextmanager
def mysql_named_lock(url: str, name: str) -> Iterator[None]:
    """A connection of its own holds the MySQL named lock `name` (GET_LOCK) until the
    block ends."""
    other = _mysql_connection(url)
    try:
        cursor = other.cursor()
        cursor.execute("SELECT GET_LOCK(%s, 0)", (name,))
        assert cursor.fetchone() == (1,), f"the lock {name} is taken"
        yield
    finally:
        other.close()


@contextmanager
def mysql_row_locked(url: str) -> Iterator[Callable[[], None]]:
    """A PyMySQL connection of its own holds the cell_meta row lock of a MySQL copy (FOR
    UPDATE in an open transaction) until released."""
    other = _mysql_connection(url)
    try:
        other.begin()
        other.cursor().execute("SELECT last_position FROM cell_meta FOR UPDATE")
        yield other.commit
    finally:
        other.close()


class Forwarder:
    """A TCP forwarder of the test's own in front of a database server, on the test's
    loop: `close` refuses new connections and cuts the open ones (the server unreachable,
    as when its host is down), `open` serves again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while chunk := await src.read(65_536):
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()
                self._writers.discard(dst)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
