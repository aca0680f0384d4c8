from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_support import EtcdCluster
from tests.support import Api, write_topology
from unitrade.cluster import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real three-region cluster: three processes on loopback, SQLite cell copies."""
    directory: Path = tmp_path_factory.mktemp("cluster")
    config, path = write_topology(directory)
    with LocalCluster(config, directory / "data", path) as running:
        running.start()
        yield running


@pytest.fixture(scope="session")
def api(cluster: LocalCluster) -> Iterator[Api]:
    client = Api(cluster.config)
    yield client
    client.http.close()


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage URL template with `{cell}`, on SQLite, PostgreSQL or MySQL/MariaDB."""
    from tests.support import (
        MYSQL_BASE,
        drop_mysql_databases,
        drop_pg_databases,
        mysql_prefix,
        pg_prefix,
        require_mysql,
        require_postgres,
    )

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/cell-{{cell}}.db"
        return
    if request.param == "mysql":
        require_mysql()
        prefix = mysql_prefix()
        yield f"{MYSQL_BASE}/{prefix}_{{cell}}"
        drop_mysql_databases(prefix)
        return
    require_postgres()
    prefix = pg_prefix()
    yield f"postgresql://postgres@127.0.0.1:5432/{prefix}_{{cell}}"
    drop_pg_databases(prefix)


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def region_storage(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """A region's storage URL template (`{region}`, `{cell}`) for write_topology: None for
    the SQLite default, or PostgreSQL or MySQL/MariaDB databases of this test only."""
    from tests.support import (
        MYSQL_BASE,
        drop_mysql_databases,
        drop_pg_databases,
        mysql_prefix,
        pg_prefix,
        require_mysql,
        require_postgres,
    )

    if request.param == "sqlite":
        yield None
        return
    if request.param == "mysql":
        require_mysql()
        prefix = mysql_prefix()
        try:
            yield f"{MYSQL_BASE}/{prefix}_{{region}}_{{cell}}"
        finally:
            drop_mysql_databases(prefix)
        return
    require_postgres()
    prefix = pg_prefix()
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{prefix}_{{region}}_{{cell}}"
    finally:
        drop_pg_databases(prefix)


@pytest.fixture(scope="session")
def etcd_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for the session (tests/etcd_support.py); each test keeps to a key
    prefix of its own (`etcd_prefix()`)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), 1) as etcd:
        yield etcd
