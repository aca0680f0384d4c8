"""The control plane's own store (docs/architecture.md): the topology it was started with, the rule
history (versions only grow; a version, once written, never changes), the operations and
their log, the failovers' lease blocks. `ControlStore` is the interface; `SqlControlStore`
keeps it in SQLite by default, PostgreSQL or MySQL/MariaDB by configuration (`[control]
storage`), and `EtcdControlStore` (etcd_store.py) in etcd when `[control] lease_authority = "etcd"`.

The SQL store is written rarely (a rule change, a workflow step), so every call is one
short transaction on one connection, run on a worker thread.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)

from unitrade.storage.engine import create_cell_engine
from unitrade.storage.schema import JsonText
from unitrade.storage.store import now_ms
from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import Rule, check_rule_fits, rule_from_body

T = TypeVar("T")
LOG_ROWS_MAX = 500
OPERATIONS_LIST_MAX = 200

metadata = MetaData()
topology = Table(
    "topology",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("body", JsonText, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)
rules = Table(
    "rules",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("body", JsonText, nullable=False),
    Column("reason", String(200), nullable=False),
    Column("operation_id", String(40)),
    Column("created_ms", BigInteger, nullable=False),
)
operations = Table(
    "operations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("kind", String(20), nullable=False),
    Column("cells", Text, nullable=False),  # JSON list of cell ids
    Column("sources", Text, nullable=False),  # JSON {cell id: owner before the switch}
    Column("target", String(16), nullable=False),
    Column("state", String(20), nullable=False),  # running | done | rolled_back | refused
    Column("step", String(20), nullable=False),  # the step last begun
    Column("detail", JsonText, nullable=False),  # JSON: versions, positions, figures
    Column("error", Text, nullable=False, default=""),
    Column("abort_requested", Integer, nullable=False, default=0),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
operation_log = Table(
    "operation_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("operation_id", String(40), nullable=False, index=True),
    Column("step", String(20), nullable=False),
    Column("event", String(20), nullable=False),  # begin | done | note | error
    Column("detail", JsonText, nullable=False),
    Column("at_ms", BigInteger, nullable=False),
)
lease_blocks = Table(
    "lease_blocks",
    metadata,
    Column("region", String(16), primary_key=True),
    Column("rule_version_min", BigInteger, nullable=False),
    Column("operation_id", String(40), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)


@dataclass
class Operation:
    id: str
    kind: str
    cells: list[int]
    sources: dict[int, str]
    target: str
    state: str
    step: str
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    abort_requested: bool = False
    created_ms: int = 0
    updated_ms: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "cells": self.cells,
            "sources": {str(c): r for c, r in self.sources.items()},
            "target": self.target,
            "state": self.state,
            "step": self.step,
            "detail": self.detail,
            "error": self.error,
            "abort_requested": self.abort_requested,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
        }


def new_operation_id() -> str:
    return f"op-{uuid.uuid4().hex[:12]}"


def _operation(row: Any) -> Operation:
    return Operation(
        id=row.id,
        kind=row.kind,
        cells=[int(c) for c in orjson.loads(row.cells)],
        sources={int(c): str(r) for c, r in orjson.loads(row.sources).items()},
        target=row.target,
        state=row.state,
        step=row.step,
        detail=orjson.loads(row.detail),
        error=row.error,
        abort_requested=bool(row.abort_requested),
        created_ms=row.created_ms,
        updated_ms=row.updated_ms,
    )


class StaleRule(RuntimeError):
    """A rule was published that is not exactly one version above the newest."""


class ControlStore(Protocol):
    """What the control plane keeps: the rule history (a rule is written exactly one version
    above the newest, never changed), the operations and their step log, the lease blocks
    of failovers. Every implementation keeps the same promises (tests/test_control_store.py
    runs the same expectations on each)."""

    async def open(self, config: TopologyConfig, first: Rule) -> Rule:
        """On first start record the topology and `first`; the newest rule."""
        ...

    async def close(self) -> None: ...

    async def publish(self, rule: Rule, reason: str, operation_id: str | None) -> None:
        """Store `rule`; StaleRule unless it is exactly one version above the newest."""
        ...

    async def history(self, limit: int) -> list[dict[str, Any]]: ...

    async def create_operation(
        self, kind: str, cells: list[int], sources: dict[int, str], target: str
    ) -> Operation: ...

    async def record(
        self,
        op: Operation,
        step: str,
        event: str,
        detail: dict[str, Any] | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> None: ...

    async def request_abort(self, operation_id: str) -> None: ...

    async def operation(self, operation_id: str) -> Operation | None: ...

    async def operations(self, limit: int, state: str | None = None) -> list[Operation]: ...

    async def log(self, operation_id: str) -> list[dict[str, Any]]: ...

    async def lease_blocks(self) -> dict[str, int]: ...

    async def block_lease(self, region: str, rule_version_min: int, operation_id: str) -> None: ...

    async def sweep_operations(self, kept: int, before_ms: int, batch_rows: int) -> int: ...

    async def count_operations(self) -> int: ...


class SqlControlStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = create_cell_engine(url, writer=True)
        self._lock = asyncio.Lock()  # one transaction at a time: one connection

    async def _run(self, work: Callable[[Connection], T]) -> T:
        def run() -> T:
            with self._engine.begin() as conn:
                return work(conn)

        async with self._lock:
            return await asyncio.to_thread(run)

    async def open(self, config: TopologyConfig, first: Rule) -> Rule:
        """Create the tables; on first start record the topology and rule version 1.
        The newest rule."""

        def work(conn: Connection) -> Rule:
            metadata.create_all(conn)
            if conn.execute(select(topology.c.id)).first() is None:
                conn.execute(
                    insert(topology).values(
                        id=1, body=config.model_dump_json(), created_ms=now_ms()
                    )
                )
            newest = conn.execute(
                select(rules.c.body).order_by(rules.c.version.desc()).limit(1)
            ).first()
            if newest is not None:
                stored = rule_from_body(orjson.loads(newest.body))
                check_rule_fits(stored, config)
                return stored
            conn.execute(
                insert(rules).values(
                    version=first.version,
                    body=orjson.dumps(first.body()).decode(),
                    reason="initial rule from the topology",
                    created_ms=now_ms(),
                )
            )
            return first

        return await self._run(work)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.dispose)

    # -- rules -------------------------------------------------------------------------------

    async def publish(self, rule: Rule, reason: str, operation_id: str | None) -> None:
        def work(conn: Connection) -> None:
            newest = conn.execute(select(func.max(rules.c.version))).scalar_one()
            if rule.version != int(newest or 0) + 1:
                raise StaleRule(f"rule version {rule.version} after {newest}: versions only grow")
            conn.execute(
                insert(rules).values(
                    version=rule.version,
                    body=orjson.dumps(rule.body()).decode(),
                    reason=reason[:200],
                    operation_id=operation_id,
                    created_ms=now_ms(),
                )
            )

        await self._run(work)

    async def history(self, limit: int) -> list[dict[str, Any]]:
        def work(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(select(rules).order_by(rules.c.version.desc()).limit(limit)).all()
            return [
                {
                    "version": r.version,
                    "reason": r.reason,
                    "operation_id": r.operation_id,
                    "created_ms": r.created_ms,
                    "rule": orjson.loads(r.body),
                }
                for r in rows
            ]

        return await self._run(work)

    # -- operations --------------------------------------------------------------------------

    async def create_operation(
        self, kind: str, cells: list[int], sources: dict[int, str], target: str
    ) -> Operation:
        stamp = now_ms()
        op = Operation(
            id=new_operation_id(),
            kind=kind,
            cells=cells,
            sources=sources,
            target=target,
            state="running",
            step="precheck",
            created_ms=stamp,
            updated_ms=stamp,
        )

        def work(conn: Connection) -> None:
            conn.execute(
                insert(operations).values(
                    id=op.id,
                    kind=kind,
                    cells=orjson.dumps(cells).decode(),
                    sources=orjson.dumps({str(c): r for c, r in sources.items()}).decode(),
                    target=target,
                    state=op.state,
                    step=op.step,
                    detail="{}",
                    error="",
                    abort_requested=0,
                    created_ms=stamp,
                    updated_ms=stamp,
                )
            )

        await self._run(work)
        return op

    async def record(
        self,
        op: Operation,
        step: str,
        event: str,
        detail: dict[str, Any] | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record a step event and the operation's new state in one transaction: a step is
        recorded before it is taken (event `begin`), so a restarted control plane knows
        how far the operation got."""
        stamp = now_ms()
        if event == "begin":
            op.step = step
        if detail:
            op.detail.update(detail)
        if state is not None:
            op.state = state
        if error is not None:
            op.error = error[:2000]
        op.updated_ms = stamp

        def work(conn: Connection) -> None:
            conn.execute(
                insert(operation_log).values(
                    operation_id=op.id,
                    step=step,
                    event=event,
                    detail=orjson.dumps(detail or {}).decode(),
                    at_ms=stamp,
                )
            )
            conn.execute(
                update(operations)
                .where(operations.c.id == op.id)
                .values(
                    step=op.step,
                    state=op.state,
                    detail=orjson.dumps(op.detail).decode(),
                    error=op.error,
                    updated_ms=stamp,
                )
            )

        await self._run(work)

    async def request_abort(self, operation_id: str) -> None:
        def work(conn: Connection) -> None:
            conn.execute(
                update(operations)
                .where(operations.c.id == operation_id)
                .values(abort_requested=1, updated_ms=now_ms())
            )

        await self._run(work)

    async def operation(self, operation_id: str) -> Operation | None:
        def work(conn: Connection) -> Operation | None:
            row = conn.execute(select(operations).where(operations.c.id == operation_id)).first()
            return None if row is None else _operation(row)

        return await self._run(work)

    async def operations(self, limit: int, state: str | None = None) -> list[Operation]:
        assert 1 <= limit <= OPERATIONS_LIST_MAX

        def work(conn: Connection) -> list[Operation]:
            query = select(operations).order_by(operations.c.created_ms.desc()).limit(limit)
            if state is not None:
                query = query.where(operations.c.state == state)
            return [_operation(r) for r in conn.execute(query).all()]

        return await self._run(work)

    async def log(self, operation_id: str) -> list[dict[str, Any]]:
        def work(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                select(operation_log)
                .where(operation_log.c.operation_id == operation_id)
                .order_by(operation_log.c.id)
                .limit(LOG_ROWS_MAX)
            ).all()
            return [
                {
                    "step": r.step,
                    "event": r.event,
                    "detail": orjson.loads(r.detail),
                    "at_ms": r.at_ms,
                }
                for r in rows
            ]

        return await self._run(work)

    # -- lease blocks (control/lease.py) -----------------------------------------------------

    async def lease_blocks(self) -> dict[str, int]:
        def work(conn: Connection) -> dict[str, int]:
            rows = conn.execute(select(lease_blocks)).all()
            return {r.region: int(r.rule_version_min) for r in rows}

        return await self._run(work)

    async def block_lease(self, region: str, rule_version_min: int, operation_id: str) -> None:
        """Record that `region` gets no lease until it holds `rule_version_min` (a failover
        took its cells). One row per region: the bound only grows."""

        def work(conn: Connection) -> None:
            row = conn.execute(
                select(lease_blocks.c.rule_version_min).where(lease_blocks.c.region == region)
            ).first()
            values = {
                "rule_version_min": rule_version_min,
                "operation_id": operation_id,
                "created_ms": now_ms(),
            }
            if row is None:
                conn.execute(insert(lease_blocks).values(region=region, **values))
            elif int(row.rule_version_min) < rule_version_min:
                conn.execute(
                    update(lease_blocks).where(lease_blocks.c.region == region).values(**values)
                )

        await self._run(work)

    # -- retention ---------------------------------------------------------------------------

    async def sweep_operations(self, kept: int, before_ms: int, batch_rows: int) -> int:
        """Delete a batch of finished operations (and their log) that are not among the
        newest `kept` and were last changed before `before_ms`; never a running one. The
        number of operations deleted."""
        assert kept >= 1 and batch_rows >= 1

        def work(conn: Connection) -> int:
            newest = (
                select(operations.c.created_ms)
                .order_by(operations.c.created_ms.desc())
                .offset(kept - 1)
                .limit(1)
            )
            threshold = conn.execute(newest).scalar()
            if threshold is None:
                return 0  # no more than `kept` operations
            ids = [
                r.id
                for r in conn.execute(
                    select(operations.c.id)
                    .where(
                        operations.c.state != "running",
                        operations.c.created_ms < threshold,
                        operations.c.updated_ms < before_ms,
                    )
                    .order_by(operations.c.created_ms)
                    .limit(batch_rows)
                )
            ]
            if ids:
                conn.execute(delete(operation_log).where(operation_log.c.operation_id.in_(ids)))
                conn.execute(delete(operations).where(operations.c.id.in_(ids)))
            return len(ids)

        return await self._run(work)

    async def count_operations(self) -> int:
        def work(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(operations)).scalar_one())

        return await self._run(work)
