"""A region's copy of one cell, and the unit of work that writes it.

`CellStore.write()` is the only way to change a cell copy on behalf of a client: it goes
through the fence and, in the same transaction, appends one changelog row per changed row
with the epoch, the origin region, the table, the primary key, the operation and the row
image after the change (DESIGN §7; the replication issue streams these rows).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import Table, and_, delete, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ColumnElement, Select

from unitrade.storage.engine import Engines, create_engines
from unitrade.storage.fence import Fence
from unitrade.storage.schema import METADATA_BY_KIND, cell_meta, changelog, common
from unitrade.topology.rule import CellInfo

ROWS_PER_WRITE_MAX = 1_000  # a single transaction never changes more rows than this


def now_ms() -> int:
    return int(time.time() * 1000)


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


def primary_key_of(table: Table, row: Mapping[str, Any]) -> dict[str, Any]:
    return {str(c.name): row[c.name] for c in table.primary_key.columns}


def _key_clause(table: Table, key: Mapping[str, Any]) -> ColumnElement[bool]:
    assert set(key) == {c.name for c in table.primary_key.columns}, (table.name, key)
    return and_(*(table.c[name] == value for name, value in key.items()))


class WriteTx:
    """One admitted write transaction on one cell copy."""

    def __init__(self, conn: AsyncConnection, epoch: int, origin: str, position: int) -> None:
        self.conn = conn
        self.epoch = epoch
        self.origin = origin
        self.position = position  # last changelog position used
        self.changes = 0

    async def _capture(
        self, table: Table, op: str, key: Mapping[str, Any], image: Mapping[str, Any] | None
    ) -> None:
        self.changes += 1
        assert self.changes <= ROWS_PER_WRITE_MAX, "one write transaction changes too many rows"
        self.position += 1
        await self.conn.execute(
            insert(changelog).values(
                position=self.position,
                epoch=self.epoch,
                origin=self.origin,
                tbl=table.name,
                pk=_json(dict(key)),
                op=op,
                row_image=None if image is None else _json(dict(image)),
                created_ms=now_ms(),
            )
        )

    async def insert(self, table: Table, values: Mapping[str, Any]) -> None:
        await self.conn.execute(insert(table).values(**values))
        row = {str(c.name): values.get(c.name) for c in table.columns}
        await self._capture(table, "i", primary_key_of(table, row), row)

    async def update(
        self,
        table: Table,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        *conditions: ColumnElement[bool],
    ) -> dict[str, Any] | None:
        """Update one row by primary key (and optional conditions); the new image, or None."""
        result = await self.conn.execute(
            update(table)
            .where(_key_clause(table, key), *conditions)
            .values(**values)
            .returning(*table.columns)
        )
        row = result.mappings().first()
        if row is None:
            return None
        image = dict(row)
        await self._capture(table, "u", key, image)
        return image

    async def delete(self, table: Table, key: Mapping[str, Any]) -> bool:
        result = await self.conn.execute(delete(table).where(_key_clause(table, key)))
        if result.rowcount == 0:
            return False
        await self._capture(table, "d", key, None)
        return True

    async def one(self, statement: Select[Any]) -> Row[Any] | None:
        row: Row[Any] | None = (await self.conn.execute(statement)).first()
        return row

    async def all(self, statement: Select[Any]) -> Sequence[Row[Any]]:
        rows: Sequence[Row[Any]] = (await self.conn.execute(statement)).all()
        return rows


class CellStore:
    """This region's copy of one cell: its database and the fenced write path."""

    def __init__(self, cell: CellInfo, region: str, url: str, fence: Fence) -> None:
        self.cell = cell
        self.region = region
        self.url = url
        self.fence = fence
        self._engines: Engines | None = None

    @property
    def engines(self) -> Engines:
        assert self._engines is not None, "CellStore.open() first"
        return self._engines

    async def open(self) -> None:
        self._engines = await create_engines(self.url)
        async with self.engines.write.begin() as conn:
            await conn.run_sync(common.create_all)
            await conn.run_sync(METADATA_BY_KIND[self.cell.kind].create_all)
            exists = (await conn.execute(select(cell_meta.c.cell_id))).first()
            if exists is None:
                await conn.execute(
                    insert(cell_meta).values(
                        cell_id=self.cell.id,
                        kind=self.cell.kind.value,
                        last_position=0,
                        created_ms=now_ms(),
                    )
                )
            elif exists.cell_id != self.cell.id:
                raise RuntimeError(
                    f"{self.url} holds cell {exists.cell_id}, not cell {self.cell.id}"
                )

    async def close(self) -> None:
        if self._engines is not None:
            await self._engines.dispose()
            self._engines = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only snapshot of this copy (a replica may lag its owner)."""
        async with self.engines.read.begin() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        """Admit a write through the fence and open its transaction.

        Everything done on the WriteTx commits together with its changelog rows, or nothing
        does. The cell_meta row is locked first (FOR UPDATE on PostgreSQL; SQLite's
        BEGIN IMMEDIATE already serialises writers), so changelog positions are gapless and
        follow commit order.
        """
        async with self.fence.admit(self.cell.id) as epoch, self.engines.write.begin() as conn:
            last = (
                await conn.execute(
                    select(cell_meta.c.last_position)
                    .where(cell_meta.c.cell_id == self.cell.id)
                    .with_for_update()
                )
            ).scalar_one()
            tx = WriteTx(conn, epoch=epoch, origin=self.region, position=last)
            yield tx
            if tx.position != last:
                await conn.execute(
                    update(cell_meta)
                    .where(cell_meta.c.cell_id == self.cell.id)
                    .values(last_position=tx.position)
                )

    async def last_position(self) -> int:
        async with self.read() as conn:
            return int((await conn.execute(select(cell_meta.c.last_position))).scalar_one())

    async def changes_since(self, position: int, limit: int) -> list[dict[str, Any]]:
        """Changelog rows after `position`, oldest first (what replication will stream)."""
        assert 1 <= limit <= ROWS_PER_WRITE_MAX
        async with self.read() as conn:
            rows = await conn.execute(
                select(changelog)
                .where(changelog.c.position > position)
                .order_by(changelog.c.position)
                .limit(limit)
            )
            return [dict(r) for r in rows.mappings()]
