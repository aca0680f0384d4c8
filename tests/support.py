"""Helpers shared by the tests: free ports, topology files, PostgreSQL, MySQL/MariaDB, HTTP
clients."""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from unitrade.topology.config import TopologyConfig, default_config, parse_config
from unitrade.topology.rule import initial_rule, route_buyer
from unitrade.web.tokens import issue_token

if TYPE_CHECKING:
    from unitrade.region import RegionRuntime

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def new_secret() -> str:
    """A secret of one test cluster's own: a token or signature of any other cluster (or of
    the default secret) is refused by it, so a test never talks to a cluster not its own."""
    return "test-" + secrets.token_hex(16)


def topology_toml(
    ports: list[int],
    storage: str | Mapping[str, str] | None = None,
    control_storage: str | None = None,
    secret: str | None = None,
    control: str = "",
) -> str:
    """The default topology (hz center, sh, bj; six unit cells) on the given ports, with
    `secret` (a new one when None). With a control plane port, `control` is more of its
    `[control]` table. The health checker's synthetic orders are off unless `control` turns
    them on: the other tests need copies that stand still once their own writes stop."""
    default = default_config()
    # A top-level key: it must come before the first table.
    lines = [f'secret = "{secret or new_secret()}"']
    for region, port in zip(default.regions, ports, strict=False):
        lines += [f"[regions.{region.name}]", f'listen = "127.0.0.1:{port}"']
        if region.center:
            lines.append("center = true")
        url = storage.get(region.name) if isinstance(storage, Mapping) else storage
        if url is not None:
            lines.append(f'storage = "{url}"')
        if url is not None and not url.startswith("sqlite"):
            # 8 cells x (1 writer + 2 readers) x 3 regions = 72 connections at most: within
            # PostgreSQL's default max_connections (100) and MariaDB's (151), which the
            # tests share with each other.
            lines.append("storage_readers = 2")
    if len(ports) > len(default.regions):
        lines += ["[control]", f'listen = "127.0.0.1:{ports[len(default.regions)]}"']
        if control_storage is not None:
            lines.append(f'storage = "{control_storage}"')
        if "health_orders" not in control:
            lines.append("health_orders = false")
        lines += [line.strip() for line in control.strip().splitlines()]
    for cell in default.cells:
        lines += ["[[cells]]", f"id = {cell.id}", f'kind = "{cell.kind.value}"']
        lines.append(f'owner = "{cell.owner}"')
        if cell.buckets:
            lines.append(f'buckets = "{cell.buckets}"')
    return "\n".join(lines) + "\n"


def write_topology(
    directory: Path,
    storage: str | Mapping[str, str] | None = None,
    control_storage: str | None = None,
    control: str = "",
) -> tuple[TopologyConfig, Path]:
    path = directory / "topology.toml"
    path.write_text(topology_toml(free_ports(4), storage, control_storage, control=control))
    import tomllib

    return parse_config(tomllib.loads(path.read_text())), path


def pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", user="postgres", dbname="postgres", connect_timeout=3
        ):
            return True
    except Exception:
        return False


def require_postgres() -> None:
    """Skip without PostgreSQL, unless UNITRADE_REQUIRE_BACKENDS=1 (CI), where it fails."""
    if pg_available():
        return
    message = "PostgreSQL is not reachable on 127.0.0.1:5432"
    if os.environ.get("UNITRADE_REQUIRE_BACKENDS") == "1":
        pytest.fail(message + " and UNITRADE_REQUIRE_BACKENDS=1")
    pytest.skip(message)


REDIS_URL = "redis://127.0.0.1:6379/0"


def require_redis() -> str:
    """Redis on 127.0.0.1:6379 (its URL); skip without it, unless UNITRADE_REQUIRE_BACKENDS=1
    (CI), where it fails. Each test uses a key prefix of its own."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        message = "Redis is not reachable on 127.0.0.1:6379"
        if os.environ.get("UNITRADE_REQUIRE_BACKENDS") == "1":
            pytest.fail(message + " and UNITRADE_REQUIRE_BACKENDS=1")
        pytest.skip(message)
    return REDIS_URL


def pg_prefix() -> str:
    return f"ut_test_{uuid.uuid4().hex[:8]}"


def drop_pg_databases(prefix: str) -> None:
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)
        ).fetchall()
        for (name,) in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


MYSQL_BASE = "mysql://root@127.0.0.1:3306"


def mysql_available() -> bool:
    try:
        import pymysql

        pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=3).close()
        return True
    except Exception:
        return False


def require_mysql() -> None:
    """Skip without MySQL/MariaDB, unless UNITRADE_REQUIRE_BACKENDS=1 (CI), where it fails."""
    if mysql_available():
        return
    message = "MySQL/MariaDB is not reachable on 127.0.0.1:3306 as root"
    if os.environ.get("UNITRADE_REQUIRE_BACKENDS") == "1":
        pytest.fail(message + " and UNITRADE_REQUIRE_BACKENDS=1")
    pytest.skip(message)


def mysql_prefix() -> str:
    return f"ut_test_{uuid.uuid4().hex[:8]}"


def drop_mysql_databases(prefix: str) -> None:
    import pymysql

    with pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True) as conn:
        cursor = conn.cursor()
        cursor.execute(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s",
            (prefix + "%",),
        )
        for (name,) in cursor.fetchall():
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


class Api:
    """A client of one cluster: tokens, region URLs and buyer placement."""

    def __init__(self, config: TopologyConfig) -> None:
        self.config = config
        self.rule = initial_rule(config)
        self.http = httpx.Client(timeout=30.0, verify=config.http_verify)
        self.admin_headers = {
            "authorization": "Bearer " + issue_token(config.token_keys, admin=True)
        }

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.http.close()

    def url(self, region: str, path: str) -> str:
        return self.config.region(region).base_url + path

    def buyer_headers(self, buyer_id: int) -> dict[str, str]:
        return {"authorization": "Bearer " + issue_token(self.config.token_keys, buyer_id=buyer_id)}

    def home(self, buyer_id: int) -> str:
        return route_buyer(self.rule, buyer_id).region

    def buyer_in(self, region: str, start: int = 1) -> int:
        """The first buyer ID >= start homed in `region`."""
        buyer = start
        while self.home(buyer) != region:
            buyer += 1
        return buyer

    def call(
        self,
        region: str,
        method: str,
        path: str,
        buyer: int | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = dict(self.admin_headers if buyer is None else self.buyer_headers(buyer))
        all_headers.update(headers or {})
        return self.http.request(method, self.url(region, path), json=body, headers=all_headers)

    def put_product(self, sku: str, stock: int, price_cents: int = 250, region: str = "hz") -> Any:
        """Write a product and wait until every region's copy of the catalog shows it."""
        body = {"title": f"title of {sku}", "price_cents": price_cents, "stock": stock}
        response = self.call(region, "PUT", f"/v1/admin/products/{sku}", body=body)
        assert response.status_code == 200, response.text
        self.wait_product(sku, price_cents)
        return response.json()

    def wait_product(self, sku: str, price_cents: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        for region in self.config.region_names:
            while True:
                seen = self.call(region, "GET", f"/v1/products/{sku}")
                if seen.status_code == 200 and seen.json()["price_cents"] == price_cents:
                    break
                assert time.monotonic() < deadline, f"{sku} not replicated to {region}"
                time.sleep(0.01)

    def levels(self, sku: str) -> dict[str, int]:
        response = self.call("hz", "GET", f"/v1/inventory/{sku}")
        assert response.status_code == 200, response.text
        body: dict[str, int] = response.json()
        return body

    def order(self, region: str, buyer: int, items: list[tuple[str, int]], **extra: Any) -> Any:
        body = {"items": [{"sku": s, "qty": q} for s, q in items], **extra}
        return self.call(region, "POST", "/v1/orders", buyer, body)


def in_process_region(config: TopologyConfig, region: str, data_dir: Path) -> RegionRuntime:
    """A region run in this process, with a lease authority of its own in this process
    (the control plane's lease logic, no control plane process): for tests of a region's
    services that need writes without a cluster."""
    from unitrade.control.lease import ControlPlaneLeases, InProcessLeaseSource, MemoryBlocks
    from unitrade.region import RegionRuntime

    authority = ControlPlaneLeases(config.control, config.region_names, MemoryBlocks())
    return RegionRuntime(config, region, data_dir, InProcessLeaseSource(region, authority))
