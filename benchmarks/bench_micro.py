"""Micro-benchmarks behind the storage and RPC design choices (docs/benchmarks.md).

    .venv/bin/python -m benchmarks.bench_micro [--n 2000]

1. A thread hop: `run_in_executor` of a no-op against calling it on the loop.
2. The center's reservation transaction (select, conditional update with RETURNING, insert,
   position bump with RETURNING, changelog insert) on SQLite, five ways: statements built
   per call and executed by SQLAlchemy; prebuilt statements executed by SQLAlchemy; the same
   on a writer thread (one hop per transaction); SQL compiled once by SQLAlchemy and run on
   the driver cursor (what unitrade's inline path does); hand-written SQL on sqlite3.
3. One HTTP request from httpx and from aiohttp to a minimal asyncio HTTP/1.1 server on
   127.0.0.1 (client and server share the process, so this is the round trip's CPU).

Everything is local, bounded by --n, and leaves only a temporary directory it removes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from unitrade.storage.engine import create_cell_engine
from unitrade.storage.schema import cell_meta, center, changelog, common, inventory, reservations


def per_call_us(total_s: float, n: int) -> float:
    return total_s / n * 1e6


async def thread_hop(n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        for _ in range(100):
            await loop.run_in_executor(pool, lambda: None)
        started = time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(pool, lambda: None)
        hop = per_call_us(time.perf_counter() - started, n)
    started = time.perf_counter()
    for _ in range(n):
        (lambda: None)()
    return {
        "thread hop (run_in_executor of a no-op)": hop,
        "the same call on the loop": per_call_us(time.perf_counter() - started, n),
    }


SELECT_RESERVATION = select(reservations).where(reservations.c.order_id == bindparam("id"))
MOVE = (
    update(inventory)
    .where(inventory.c.sku == bindparam("k_sku"), inventory.c.available >= bindparam("q"))
    .values(
        available=inventory.c.available - bindparam("q"),
        reserved=inventory.c.reserved + bindparam("q"),
        updated_ms=bindparam("t"),
    )
    .returning(*inventory.c)
)
INSERT_RESERVATION = insert(reservations)
BUMP = (
    update(cell_meta)
    .where(cell_meta.c.cell_id == bindparam("k_cell"))
    .values(last_position=cell_meta.c.last_position + bindparam("n"))
    .returning(cell_meta.c.last_position)
)
INSERT_CHANGES = insert(changelog)


def reservation(order_id: int) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "cell_id": 1,
        "status": "reserved",
        "lines": "[]",
        "created_ms": 0,
        "updated_ms": 0,
    }


def changes(last: int) -> list[dict[str, Any]]:
    return [
        {
            "position": last - 1 + i,
            "epoch": 1,
            "origin": "hz",
            "tbl": "t",
            "pk": "{}",
            "op": "u",
            "row_image": "{}",
            "created_ms": 0,
        }
        for i in range(2)
    ]


def built_per_call(conn: Connection, order_id: int) -> None:
    conn.execute(select(reservations).where(reservations.c.order_id == order_id)).first()
    conn.execute(
        update(inventory)
        .where(inventory.c.sku == "A", inventory.c.available >= 1)
        .values(
            available=inventory.c.available - 1, reserved=inventory.c.reserved + 1, updated_ms=0
        )
        .returning(*inventory.c)
    ).first()
    conn.execute(insert(reservations).values(**reservation(order_id)))
    last = conn.execute(
        update(cell_meta)
        .where(cell_meta.c.cell_id == 1000)
        .values(last_position=cell_meta.c.last_position + 2)
        .returning(cell_meta.c.last_position)
    ).scalar_one()
    conn.execute(insert(changelog), changes(last))


def prebuilt(conn: Connection, order_id: int) -> None:
    conn.execute(SELECT_RESERVATION, {"id": order_id}).first()
    conn.execute(MOVE, {"k_sku": "A", "q": 1, "t": 0}).first()
    conn.execute(INSERT_RESERVATION, reservation(order_id))
    last = conn.execute(BUMP, {"k_cell": 1000, "n": 2}).scalar_one()
    conn.execute(INSERT_CHANGES, changes(last))


NAMED = sqlite_dialect(paramstyle="named")
SQL = {
    s: str(s.compile(dialect=NAMED))
    for s in (SELECT_RESERVATION, MOVE, INSERT_RESERVATION, BUMP, INSERT_CHANGES)
}


def compiled_on_cursor(cursor: Any, order_id: int) -> None:
    cursor.execute(SQL[SELECT_RESERVATION], {"id": order_id}).fetchall()
    cursor.execute(SQL[MOVE], {"k_sku": "A", "q": 1, "t": 0}).fetchall()
    cursor.execute(SQL[INSERT_RESERVATION], reservation(order_id))
    (last,) = cursor.execute(SQL[BUMP], {"k_cell": 1000, "n": 2}).fetchone()
    cursor.executemany(SQL[INSERT_CHANGES], changes(last))


def hand_written(cursor: Any, order_id: int) -> None:
    cursor.execute("SELECT * FROM reservations WHERE order_id = ?", (order_id,)).fetchall()
    cursor.execute(
        "UPDATE inventory SET available = available - 1, reserved = reserved + 1, "
        "updated_ms = 0 WHERE sku = 'A' AND available >= 1 RETURNING *"
    ).fetchall()
    cursor.execute("INSERT INTO reservations VALUES (?, 1, 'reserved', '[]', 0, 0)", (order_id,))
    (last,) = cursor.execute(
        "UPDATE cell_meta SET last_position = last_position + 2 WHERE cell_id = 1000 "
        "RETURNING last_position"
    ).fetchone()
    cursor.executemany(
        "INSERT INTO changelog VALUES (?, 1, 'hz', 't', '{}', 'u', '{}', 0)", [(last - 1,), (last,)]
    )


async def transactions(directory: Path, n: int) -> dict[str, float]:
    engine = create_cell_engine(f"sqlite:///{directory}/center.db", writer=True)
    with engine.begin() as conn:
        common.create_all(conn)
        center.create_all(conn)
        conn.execute(
            insert(cell_meta).values(cell_id=1000, kind="center", last_position=0, created_ms=0)
        )
        conn.execute(
            insert(inventory).values(sku="A", available=10**9, reserved=0, sold=0, updated_ms=0)
        )
    ids = iter(range(1, 10**9))
    results: dict[str, float] = {}

    def with_engine(body: Callable[[Connection, int], None]) -> Callable[[], None]:
        def run() -> None:
            with engine.begin() as conn:
                body(conn, next(ids))

        return run

    raw = sqlite3.connect(directory / "center.db", isolation_level=None, check_same_thread=False)
    raw.execute("PRAGMA synchronous=NORMAL")
    cursor = raw.cursor()

    def with_cursor(body: Callable[[Any, int], None]) -> Callable[[], None]:
        def run() -> None:
            cursor.execute("BEGIN IMMEDIATE")
            body(cursor, next(ids))
            cursor.execute("COMMIT")

        return run

    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)

    async def on_thread(run: Callable[[], None]) -> None:
        await loop.run_in_executor(pool, run)

    async def inline(run: Callable[[], None]) -> None:
        run()

    cases: list[tuple[str, Callable[[Callable[[], None]], Awaitable[None]], Callable[[], None]]]
    cases = [
        ("SQLAlchemy, statements built per call, on the loop", inline, with_engine(built_per_call)),
        ("SQLAlchemy, prebuilt statements, on the loop", inline, with_engine(prebuilt)),
        ("SQLAlchemy, prebuilt statements, on a writer thread", on_thread, with_engine(prebuilt)),
        (
            "SQL compiled once by SQLAlchemy, driver cursor, on the loop (unitrade inline)",
            inline,
            with_cursor(compiled_on_cursor),
        ),
        ("hand-written SQL, sqlite3, on the loop", inline, with_cursor(hand_written)),
    ]
    for name, where, run in cases:
        for _ in range(100):
            await where(run)
        started = time.perf_counter()
        for _ in range(n):
            await where(run)
        results[name] = per_call_us(time.perf_counter() - started, n)
    pool.shutdown()
    raw.close()
    engine.dispose()
    return results


async def http_clients(n: int) -> dict[str, float]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b'content-length: 11\r\n\r\n{"ok":true}'
                )
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/internal/center/reserve"
    body = orjson.dumps({"order_id": "1", "cell": 1, "lines": [["A", 1]]})
    headers = {"content-type": "application/json"}
    results: dict[str, float] = {}
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            await client.post(url, content=body, headers=headers)
        started = time.perf_counter()
        for _ in range(n):
            orjson.loads((await client.post(url, content=body, headers=headers)).content)
        results["httpx AsyncClient, one POST (keep-alive)"] = per_call_us(
            time.perf_counter() - started, n
        )
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
        started = time.perf_counter()
        for _ in range(n):
            async with session.post(url, data=body, headers=headers) as response:
                orjson.loads(await response.read())
        results["aiohttp ClientSession, one POST (keep-alive)"] = per_call_us(
            time.perf_counter() - started, n
        )
    server.close()
    await server.wait_closed()
    return results


async def main(n: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="unitrade-micro-"))
    try:
        sections = [
            ("thread hop", await thread_hop(n)),
            (
                "reservation transaction (5 statements, SQLite WAL)",
                await transactions(directory, n),
            ),
            ("HTTP client round trip on 127.0.0.1", await http_clients(n)),
        ]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for title, rows in sections:
        print(f"\n{title}\n| what | us per call |\n|---|---:|")
        for name, value in rows.items():
            print(f"| {name} | {value:,.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per measurement")
    asyncio.run(main(parser.parse_args().n))
