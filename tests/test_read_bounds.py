"""Reads of a cell copy have the bounds writes have: a bounded number wait for a reader
thread (past it: `overloaded` at once), and a read waits a bounded time for one (past it:
`read_timeout`, and it never runs). Both are 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, select, text
from sqlalchemy.engine import make_url

from tests.storage_support import make_store, mysql_named_lock, until
from unitrade.errors import ERRORS_BY_CODE, Overloaded, ReadTimeout, error_from_body
from unitrade.storage.engine import READ_POOL_SIZE, is_async
from unitrade.storage.schema import carts, cell_meta
from unitrade.storage.store import CellStore

WAIT_S_MAX = 10.0  # a bound on every wait; none is expected to come near it
ROW = {"buyer_id": 1, "sku": "A", "qty": 1, "updated_ms": 0}


class Readers:
    """Reads that hold a reader, inside a real read transaction, until released: a reader
    thread blocked in the read, or, on MySQL/MariaDB (whose reads run on the event loop),
    a reader connection waiting in the database for a named lock (GET_LOCK) that another
    connection holds: it stops no write, as a blocked reader thread stops none."""

    def __init__(self, url: str) -> None:
        self.in_database = is_async(url)
        self.url = url
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._held: contextlib.ExitStack | None = None
        self.started = 0
        self._named = {"name": f"ut-readers-{make_url(url).database}", "wait_s": WAIT_S_MAX}

    def blocking(self, conn: Connection) -> int:
        statement = select(cell_meta.c.last_position)
        with self._lock:
            self.started += 1
        position = int(conn.execute(statement).scalar_one())
        if self.in_database:
            taken = conn.execute(text("SELECT GET_LOCK(:name, :wait_s)"), self._named).scalar()
            assert taken == 1, "the test never released the readers"
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), self._named)
            return position
        assert self._release.wait(WAIT_S_MAX), "the test never released the readers"
        return position

    def release(self) -> None:
        self._release.set()
        if self._held is not None:
            self._held.close()
            self._held = None

    async def fill(self, store: CellStore) -> list[asyncio.Task[int]]:
        """Every reader of `store` taken by a blocking read."""
        if self.in_database:
            self._held = contextlib.ExitStack()
            self._held.enter_context(mysql_named_lock(self.url, self._named["name"]))
        tasks = [asyncio.create_task(store.read(self.blocking)) for _ in range(READ_POOL_SIZE)]
        await until(lambda: self.started == READ_POOL_SIZE, "every reader taken")
        return tasks


def _ran(flag: list[bool]) -> Callable[[Connection], int]:
    def work(conn: Connection) -> int:
        flag.append(True)
        return len(conn.execute(select(carts)).all())

    return work


async def _opened(storage_url: str) -> CellStore:
    # Every transaction on the store's threads, SQLite too: there its reads would
    # otherwise run inline on the event loop, where no reader pool is involved.
    store = make_store(storage_url, 1, inline=False)
    await store.open()
    return store


def test_reads_past_the_queue_bound_are_refused_at_once_and_the_rest_go_on(
    storage_url: str,
) -> None:
    async def scenario() -> None:
        store = await _opened(storage_url)
        readers = Readers(store.url)
        try:
            store.pending_reads_max = 2
            blocked = await readers.fill(store)
            queued_ran: list[bool] = []
            queued = [asyncio.create_task(store.read(_ran(queued_ran))) for _ in range(2)]
            await until(lambda: store.reads_open == READ_POOL_SIZE + 2, "two reads queued")
            # Refused on its very first step: it never waits on the loop or a thread.
            excess = store.read(_ran([]))
            with pytest.raises(Overloaded) as refused:
                excess.send(None)
            assert refused.value.status == 503 and refused.value.retry_after_s >= 1
            assert refused.value.body()["error"] == "overloaded"
            # Writes have their own thread and bounds: the saturated readers stop none.
            await asyncio.wait_for(store.write(lambda tx: tx.insert(carts, ROW)), WAIT_S_MAX)
            assert queued_ran == [] and not any(t.done() for t in queued)
            readers.release()
            assert await asyncio.wait_for(asyncio.gather(*blocked), WAIT_S_MAX) == [0] * 4
            assert await asyncio.wait_for(asyncio.gather(*queued), WAIT_S_MAX) == [1, 1]
            await until(lambda: store.reads_open == 0, "every read finished")
            assert await store.last_position() == 1
        finally:
            readers.release()
            await store.close()

    asyncio.run(scenario())


def test_a_read_that_waits_too_long_for_a_reader_times_out_and_never_runs(
    storage_url: str,
) -> None:
    async def scenario() -> None:
        store = await _opened(storage_url)
        readers = Readers(store.url)
        try:
            store.read_queue_wait_s_max = 0.2
            blocked = await readers.fill(store)
            late_ran: list[bool] = []
            with pytest.raises(ReadTimeout) as timed_out:
                await asyncio.wait_for(store.read(_ran(late_ran)), WAIT_S_MAX)
            assert timed_out.value.body()["error"] == "read_timeout"
            assert timed_out.value.status == 503 and timed_out.value.retry_after_s >= 1
            assert store.reads_open == READ_POOL_SIZE  # dropped from the queue at once
            # The blocked reads have run past the wait bound too, but they had a reader:
            # a read that started is answered.
            readers.release()
            assert await asyncio.wait_for(asyncio.gather(*blocked), WAIT_S_MAX) == [0] * 4
            await until(lambda: store.reads_open == 0, "every read finished")
            assert late_ran == []
            assert await store.read(_ran(late_ran)) == 0
        finally:
            readers.release()
            await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("error", [Overloaded, ReadTimeout])
def test_the_read_errors_cross_regions_typed(error: type[Any]) -> None:
    assert ERRORS_BY_CODE[error.code] is error
    rebuilt = error_from_body(503, error("busy").body())
    assert type(rebuilt) is error and rebuilt.message == "busy"


@pytest.mark.parametrize("error", [Overloaded, ReadTimeout])
def test_the_gateway_answers_503_with_retry_after(error: type[Any]) -> None:
    import orjson

    from unitrade.gateway.edge import error_response

    response = error_response(error("busy"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert orjson.loads(bytes(response.body)) == {"error": error.code, "message": "busy"}
