"""The benchmark's baseline: the same order insert in a minimal single-database shop.

One FastAPI app on ONE SQLite database (WAL, synchronous=NORMAL), served by uvicorn with the
settings of `unitrade.serve`, taking the same request body (`CreateOrder`) with the same
bearer-token check (`read_authorization`). Creating an order looks up the products' prices
and inserts the order row and its lines in one transaction, with SQLAlchemy Core (sync)
run on a writer thread, one thread hop per transaction. It is what a single-database shop
would write: no regions, no forwarding, no stock reservation, no changelog.

With `--inline` the transactions run on the event loop itself instead (no thread hop), as
unitrade's SQLite storage now does: the same app with the same trick, for an
honest second comparison.

With `--url` it runs on ONE PostgreSQL or MySQL/MariaDB database instead (created if it
does not exist), the way unitrade runs on that engine: PostgreSQL through psycopg on the
writer thread, MySQL/MariaDB through asyncmy on the event loop (one connection, SQLAlchemy's
`run_sync`), so a comparison on one engine compares the same driver the same way
(benchmarks/bench_workers.py).

    python -m benchmarks.baseline_app --port 8799 --db /tmp/baseline.db [--inline]
    python -m benchmarks.baseline_app --port 8799 --url postgresql://postgres@127.0.0.1/shop
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from unitrade.errors import Forbidden, UnitradeError, UnknownSku
from unitrade.gateway.models import SKU_PATTERN, CreateOrder, PutProduct
from unitrade.topology.config import SECRET_DEFAULT, default_config
from unitrade.web.tokens import Principal, read_authorization

metadata = MetaData()

products = Table(
    "products",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("price_cents", BigInteger, nullable=False),
    Column("stock", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

# The columns of unitrade's `orders` (storage/schema.py) less `cell_id`; the key is an
# INTEGER PRIMARY KEY, SQLite's rowid, as a single-database shop would have it.
orders = Table(
    "orders",
    metadata,
    Column("order_id", Integer, primary_key=True, autoincrement=True),
    Column("buyer_id", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("total_cents", BigInteger, nullable=False),
    Column("document", Text, nullable=False),
    Column("payment_id", String(64), nullable=True),
    Column("idempotency_key", String(128), nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("sku", String(64), nullable=False),
    Column("qty", Integer, nullable=False),
    Column("price_cents", BigInteger, nullable=False),
)

PRICES = select(products.c.sku, products.c.title, products.c.price_cents).where(
    products.c.sku.in_(bindparam("skus", expanding=True))
)
INSERT_ORDER = insert(orders)  # the key from the driver (lastrowid, RETURNING on PostgreSQL)
INSERT_LINES = insert(order_lines)
INSERT_PRODUCT = insert(products)
SELECT_PRODUCT = select(products.c.sku).where(products.c.sku == bindparam("k_sku"))
UPDATE_PRODUCT = (
    products.update()
    .where(products.c.sku == bindparam("k_sku"))
    .values(
        title=bindparam("title"),
        price_cents=bindparam("price_cents"),
        stock=bindparam("stock"),
        updated_ms=bindparam("updated_ms"),
    )
)


def now_ms() -> int:
    return int(time.time() * 1000)


def create_db_engine(db_path: Path) -> Engine:
    """One connection, WAL, synchronous=NORMAL, BEGIN IMMEDIATE (SQLAlchemy's pysqlite
    recipe, as in unitrade's storage/engine.py)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        f"sqlite:///{db_path}",
        pool_size=1,
        max_overflow=0,
        connect_args={"check_same_thread": False, "timeout": 10.0},
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def insert_order(conn: Connection, buyer_id: int, items: list[tuple[str, int]]) -> dict[str, Any]:
    """Look up the prices and insert the order and its lines (inside one transaction)."""
    found = {row.sku: row for row in conn.execute(PRICES, {"skus": [s for s, _ in items]})}
    for sku, _ in items:
        if sku not in found:
            raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
    lines = [
        {
            "sku": sku,
            "title": found[sku].title,
            "qty": qty,
            "price_cents": found[sku].price_cents,
            "line_cents": qty * found[sku].price_cents,
        }
        for sku, qty in items
    ]
    stamp = now_ms()
    row: dict[str, Any] = {
        "buyer_id": buyer_id,
        "status": "created",
        "total_cents": sum(line["line_cents"] for line in lines),
        "document": orjson.dumps({"items": lines}).decode(),
        "payment_id": None,
        "idempotency_key": None,
        "created_ms": stamp,
        "updated_ms": stamp,
        "version": 1,
    }
    order_id = conn.execute(INSERT_ORDER, row).inserted_primary_key[0]
    conn.execute(
        INSERT_LINES,
        [
            {
                "order_id": order_id,
                "line_no": n,
                "sku": line["sku"],
                "qty": line["qty"],
                "price_cents": line["price_cents"],
            }
            for n, line in enumerate(lines, start=1)
        ],
    )
    return {
        "order_id": str(order_id),
        "buyer_id": buyer_id,
        "status": "created",
        "total_cents": row["total_cents"],
        "items": lines,
        "created_ms": stamp,
        "updated_ms": stamp,
    }


def put_product(conn: Connection, sku: str, body: PutProduct) -> dict[str, Any]:
    values = {
        "title": body.title,
        "price_cents": body.price_cents,
        "stock": body.stock,
        "updated_ms": now_ms(),
    }
    if conn.execute(SELECT_PRODUCT, {"k_sku": sku}).first() is None:
        conn.execute(INSERT_PRODUCT, {"sku": sku, **values})
    else:
        conn.execute(UPDATE_PRODUCT, {"k_sku": sku, **values})
    return {"sku": sku, **values}


async def principal(request: Request) -> Principal:
    """The same bearer-token check as unitrade's gateway."""
    return read_authorization(request.app.state.token_keys, request.headers.get("authorization"))


Caller = Annotated[Principal, Depends(principal)]
SkuPath = Annotated[str, PathParam(pattern=SKU_PATTERN)]


def create_server_engine(url: str) -> Engine | AsyncEngine:
    """PostgreSQL (psycopg, for the writer thread) or MySQL/MariaDB (asyncmy, on the loop):
    one connection, the database created first, as unitrade's storage/engine.py does."""
    from unitrade.storage.engine import (
        MYSQL_ISOLATION,
        async_url,
        backend_of,
        ensure_mysql_database,
        ensure_pg_database,
        sync_url,
    )

    if backend_of(url) == "postgresql":
        ensure_pg_database(sync_url(url))
        return create_engine(sync_url(url), pool_size=1, max_overflow=0)
    ensure_mysql_database(url)
    return create_async_engine(
        async_url(url),
        pool_size=1,
        max_overflow=0,
        isolation_level=MYSQL_ISOLATION,
        connect_args={"charset": "utf8mb4"},
    )


def build_baseline_app(
    db_path: Path | None,
    secret: str = SECRET_DEFAULT,
    inline: bool = False,
    url: str | None = None,
) -> FastAPI:
    if url is None:
        assert db_path is not None, "a SQLite file or a database URL"
        engine: Engine | AsyncEngine = create_db_engine(db_path)
    else:
        engine = create_server_engine(url)
    writer = ThreadPoolExecutor(1, thread_name_prefix="db-writer")
    lock = asyncio.Lock()  # the one asyncio connection: one transaction at a time, in turn

    async def in_transaction(work: Any, *args: Any) -> Any:
        if isinstance(engine, AsyncEngine):
            async with lock, engine.begin() as conn:
                return await conn.run_sync(work, *args)

        def run() -> Any:
            with engine.begin() as conn:
                return work(conn, *args)

        if inline:
            return run()
        return await asyncio.get_running_loop().run_in_executor(writer, run)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await in_transaction(metadata.create_all)
        try:
            yield
        finally:
            writer.shutdown(wait=True)
            if isinstance(engine, AsyncEngine):
                await engine.dispose()
            else:
                engine.dispose()

    app = FastAPI(title="single-database baseline", lifespan=lifespan)
    # The keys a unitrade cluster with this secret derives: the same tokens work on both.
    app.state.token_keys = default_config().model_copy(update={"secret": secret}).token_keys

    @app.exception_handler(UnitradeError)
    async def _error(_request: Request, exc: UnitradeError) -> Response:
        return json_response(exc.body(), exc.status)

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.post("/v1/orders", status_code=201)
    async def create_order(body: CreateOrder, who: Caller) -> Response:
        if who.buyer_id is None:
            raise Forbidden("this endpoint needs a buyer token, not the admin token")
        items = [(item.sku, item.qty) for item in body.items]
        return json_response(await in_transaction(insert_order, who.buyer_id, items), 201)

    @app.put("/v1/admin/products/{sku}")
    async def put(sku: SkuPath, body: PutProduct, who: Caller) -> Response:
        if not who.admin:
            raise Forbidden("this endpoint needs the admin token")
        return json_response(await in_transaction(put_product, sku, body))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", type=Path, help="the SQLite database file")
    where.add_argument("--url", help="a PostgreSQL or MySQL/MariaDB database URL instead")
    parser.add_argument("--secret", default=SECRET_DEFAULT, help="token secret")
    parser.add_argument(
        "--inline", action="store_true", help="run transactions on the event loop, no thread"
    )
    args = parser.parse_args()
    server = uvicorn.Server(
        uvicorn.Config(  # the settings of unitrade.serve.serve_region
            build_baseline_app(
                None if args.db is None else args.db.resolve(), args.secret, args.inline, args.url
            ),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
            limit_concurrency=2000,
            backlog=2048,
        )
    )
    server.run()


if __name__ == "__main__":
    main()
