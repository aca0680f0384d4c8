"""The processes of a region of many (`workers`), as each reports itself in the region's
copy of the global cell: the `workers` table (schema.py, local: never replicated). Each
process writes its own row every second (unitrade/workers.py); `/healthz` of any of them
reads every row, so it can say what the others hold, which one leads and the replication
streams that one follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, select

from unitrade.storage.schema import workers
from unitrade.storage.store import CellStore, WriteTx, now_ms

_ALL = select(workers).order_by(workers.c.worker)


@dataclass(frozen=True)
class WorkerRow:
    worker: int
    pid: int
    host: str
    leader: bool
    started_ms: int
    updated_ms: int
    status: dict[str, Any]

    def body(self, now: int) -> dict[str, Any]:
        """What `/healthz` shows of a process: its own report and how old it is."""
        return {
            "worker": self.worker,
            "pid": self.pid,
            "host": self.host,
            "leader": self.leader,
            "reported_ms_ago": max(0, now - self.updated_ms),
            **{k: v for k, v in self.status.items() if k != "replication"},
        }


async def report(
    store: CellStore, worker: int, pid: int, host: str, leader: bool, started_ms: int, status: Any
) -> None:
    """Write this process's row (a local write, `write_own`)."""
    values = {
        "pid": pid,
        "host": host[:255],
        "leader": int(leader),
        "started_ms": started_ms,
        "updated_ms": now_ms(),
        "status": orjson.dumps(status).decode(),
    }

    def work(tx: WriteTx) -> None:
        if tx.update(workers, {"worker": worker}, values) is None:
            tx.insert(workers, {"worker": worker, **values})

    await store.write_own(work)


async def read(store: CellStore) -> list[WorkerRow]:
    def work(conn: Connection) -> list[WorkerRow]:
        return [
            WorkerRow(
                worker=int(r.worker),
                pid=int(r.pid),
                host=str(r.host),
                leader=bool(r.leader),
                started_ms=int(r.started_ms),
                updated_ms=int(r.updated_ms),
                status=orjson.loads(r.status),
            )
            for r in conn.execute(_ALL)
        ]

    return await store.read(work)
