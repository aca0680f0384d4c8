"""The cluster of a run: the default topology on free ports, a secret of its own, a data
dir of its own and, on PostgreSQL or MariaDB, databases of its own (dropped after the run)."""

from __future__ import annotations

import secrets
import socket
import tomllib
import uuid
from pathlib import Path

from unitrade.topology.config import TopologyConfig, default_config, parse_config

PG_BASE = "postgresql://postgres@127.0.0.1:5432"
MYSQL_BASE = "mysql://root@127.0.0.1:3306"
# --storage: the base URL of each database server (SQLite has none).
BASES = {"postgres": PG_BASE, "mariadb": MYSQL_BASE}


def free_ports(n: int) -> list[int]:
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pg_prefix() -> str:
    return f"ut_verify_{uuid.uuid4().hex[:8]}"


def write_topology(
    directory: Path, storage: str, prefix: str | None
) -> tuple[TopologyConfig, Path]:
    """The default topology (hz center, sh, bj; six unit cells) on free ports, with the
    health checker's synthetic orders off (they would be writes the history does not hold)."""
    default = default_config()
    ports = free_ports(len(default.regions) + 1)
    lines = [f'secret = "verify-{secrets.token_hex(16)}"']
    for region, port in zip(default.regions, ports, strict=False):
        lines += [f"[regions.{region.name}]", f'listen = "127.0.0.1:{port}"']
        if region.center:
            lines.append("center = true")
        if storage in BASES and prefix is not None:
            lines.append(f'storage = "{BASES[storage]}/{prefix}_{{region}}_{{cell}}"')
            # 3 regions x 8 copies x (1 writer + 2 readers) = 72 connections: within
            # PostgreSQL's default max_connections (100) and MariaDB's (151).
            lines.append("storage_readers = 2")
    lines += ["[control]", f'listen = "127.0.0.1:{ports[-1]}"', "health_orders = false"]
    if storage in BASES and prefix is not None:
        lines.append(f'storage = "{BASES[storage]}/{prefix}_control"')
    for cell in default.cells:
        lines += ["[[cells]]", f"id = {cell.id}", f'kind = "{cell.kind.value}"']
        lines.append(f'owner = "{cell.owner}"')
        if cell.buckets:
            lines.append(f'buckets = "{cell.buckets}"')
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return parse_config(tomllib.loads(path.read_text()), str(path)), path


def drop_databases(storage: str, prefix: str) -> None:
    if storage == "mariadb":
        drop_mysql_databases(prefix)
        return
    import psycopg

    with psycopg.connect(PG_BASE + "/postgres", autocommit=True) as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",)
        ).fetchall()
        for (name,) in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
