"""The same cluster on PostgreSQL: one database per (region, cell copy)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from tests.replication_support import wait_converged
from tests.support import Api, drop_pg_databases, pg_prefix, require_postgres, write_topology
from unitrade.cluster import LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pg_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, str]]:
    require_postgres()
    prefix = pg_prefix()
    directory: Path = tmp_path_factory.mktemp("pg")
    config, path = write_topology(
        directory, storage=f"postgresql://postgres@127.0.0.1:5432/{prefix}_{{region}}_{{cell}}"
    )
    try:
        with LocalCluster(config, directory / "data", path) as cluster:
            cluster.start()
            api = Api(config)
            yield api, prefix
            api.http.close()
    finally:
        drop_pg_databases(prefix)


def pg_rows(database: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=database) as conn:
        names = [
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        return {
            n: conn.execute(f"SELECT * FROM {n} ORDER BY 1, 2").fetchall()
            for n in names
            if n != "cell_meta"
        }


def pg_differences(api: Api, prefix: str) -> list[str]:
    found = []
    for cell in api.rule.cells.values():
        owner = api.rule.owner_of(cell.id)
        expected = pg_rows(f"{prefix}_{owner}_{cell.name}")
        for region in api.config.region_names:
            actual = pg_rows(f"{prefix}_{region}_{cell.name}")
            found += [f"{cell.name}@{region}.{t}" for t in expected if actual.get(t) != expected[t]]
    return found


def test_orders_on_postgresql(pg_api: tuple[Api, str]) -> None:
    api, prefix = pg_api
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

    # Replication on PostgreSQL: every copy of every cell converges to its owner's, row by row.
    wait_converged(api.config)
    assert pg_differences(api, prefix) == []

    # Every cell copy is a database of its own, and the changelog is in it.
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname="postgres") as conn:
        names = {
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)
            )
        }
    assert len(names) == 3 * 8
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=f"{prefix}_hz_center") as conn:
        ops = conn.execute("SELECT count(*) FROM changelog").fetchone()
        assert ops is not None and ops[0] > 0
