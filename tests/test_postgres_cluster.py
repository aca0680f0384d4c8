"""The same cluster on PostgreSQL and on MySQL/MariaDB: one database per (region, cell
copy)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pymysql
import pytest

from tests.replication_support import url_rows, wait_converged
from tests.support import (
    MYSQL_BASE,
    Api,
    drop_mysql_databases,
    drop_pg_databases,
    mysql_prefix,
    pg_prefix,
    require_mysql,
    require_postgres,
    write_topology,
)
from unitrade.cluster import LocalCluster

pytestmark = [pytest.mark.cluster]
PG_BASE = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def db_api(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Api, str, str]]:
    """A cluster whose cell copies are databases on one server: (api, engine, prefix)."""
    engine = str(request.param)
    if engine == "postgresql":
        require_postgres()
        prefix, base, drop = pg_prefix(), PG_BASE, drop_pg_databases
    else:
        require_mysql()
        prefix, base, drop = mysql_prefix(), MYSQL_BASE, drop_mysql_databases
    directory: Path = tmp_path_factory.mktemp(engine)
    config, path = write_topology(directory, storage=f"{base}/{prefix}_{{region}}_{{cell}}")
    try:
        with LocalCluster(config, directory / "data", path) as cluster:
            cluster.start()
            api = Api(config)
            yield api, engine, prefix
            api.http.close()
    finally:
        drop(prefix)


def copy_url(engine: str, database: str) -> str:
    return f"{PG_BASE if engine == 'postgresql' else MYSQL_BASE}/{database}"


def db_differences(api: Api, engine: str, prefix: str) -> list[str]:
    found = []
    for cell in api.rule.cells.values():
        owner = api.rule.owner_of(cell.id)
        expected = url_rows(copy_url(engine, f"{prefix}_{owner}_{cell.name}"))
        for region in api.config.region_names:
            actual = url_rows(copy_url(engine, f"{prefix}_{region}_{cell.name}"))
            found += [
                f"{cell.name}@{region}.{t}"
                for t in expected
                if t != "cell_meta" and actual.get(t) != expected[t]
            ]
    return found


def databases(engine: str, prefix: str) -> set[str]:
    if engine == "postgresql":
        with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres") as conn:
            query = "SELECT datname FROM pg_database WHERE datname LIKE %s"
            return {r[0] for r in conn.execute(query, (prefix + "%",))}
    with pymysql.connect(host="127.0.0.1", user="root") as conn:
        cursor = conn.cursor()
        query = "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s"
        cursor.execute(query, (prefix + "%",))
        return {r[0] for r in cursor.fetchall()}


def test_orders_on_a_database_server(db_api: tuple[Api, str, str]) -> None:
    api, engine, prefix = db_api
    api.put_product("PG-1", stock=30, price_cents=700)
    buyers = [api.buyer_in(region, 100 + i) for i, region in enumerate(["hz", "sh", "bj"])]
    for gateway, buyer in zip(["sh", "bj", "hz"], buyers, strict=True):
        order = api.order(gateway, buyer, [("PG-1", 2)]).json()
        paid = api.call(
            gateway,
            "POST",
            f"/v1/orders/{order['order_id']}/pay",
            buyer,
            {"payment_id": f"pg-{order['order_id']}", "amount_cents": 1400},
        )
        assert paid.status_code == 200, paid.text
    assert api.levels("PG-1") == {"sku": "PG-1", "available": 24, "reserved": 0, "sold": 6}

    def create(i: int) -> int:
        region = ["hz", "sh", "bj"][i % 3]
        return api.order(region, api.buyer_in(region, 1000 + i * 50), [("PG-1", 1)]).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(create, range(40)))
    assert statuses.count(201) == 24 and statuses.count(409) == 16
    assert api.levels("PG-1") == {"sku": "PG-1", "available": 0, "reserved": 24, "sold": 6}

    # Replication: every copy of every cell converges to its owner's, row by row.
    wait_converged(api.config)
    assert db_differences(api, engine, prefix) == []

    # Every cell copy is a database of its own, and the changelog is in it.
    assert len(databases(engine, prefix)) == 3 * 8
    changes = url_rows(copy_url(engine, f"{prefix}_hz_center"))["changelog"]
    assert len(changes) > 0
    # Keys compare by code point on every engine: SKUs that differ only in case are two
    # products (MySQL's default collations would make them one).
    api.put_product("case-sku", stock=1, price_cents=100)
    api.put_product("CASE-SKU", stock=2, price_cents=200)
    assert api.levels("case-sku")["available"] == 1
    assert api.levels("CASE-SKU")["available"] == 2
