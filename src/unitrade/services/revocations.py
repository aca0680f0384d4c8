"""Revoked bearer tokens, kept in the global cell: written at its owner, replicated to every
region, held by each region as an in-memory set that the edge checks on every request.

A revocation is kept until the token it names has expired anyway; the global cell's owner
deletes it then (`sweep`), so the set stays bounded by the revocations of one token
lifetime.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
from sqlalchemy import Connection, select

from unitrade.errors import Conflict
from unitrade.storage.schema import revoked_tokens
from unitrade.storage.store import CellStore, WriteTx, now_ms

REVOKED_MAX = 1_000_000  # a bound on the in-memory set; past it, revoking is refused
SWEEP_ROWS_MAX = 1_000


class Revocations:
    def __init__(self, store: CellStore) -> None:
        self.store = store
        self._ids: set[str] = set()

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    async def load(self) -> None:
        """This copy's revocations, at start (replication keeps them current after)."""

        def work(conn: Connection) -> set[str]:
            return set(conn.execute(select(revoked_tokens.c.token_id)).scalars())

        self._ids = await self.store.read(work)

    def applied(self, changes: Iterable[dict[str, Any]]) -> None:
        """Replicated changes of `revoked_tokens` (inserts and the sweep's deletes)."""
        for change in changes:
            if change["tbl"] != revoked_tokens.name:
                continue
            token_id = orjson.loads(change["pk"])["token_id"]
            if change["op"] == "d":
                self._ids.discard(token_id)
            else:
                self._ids.add(token_id)

    async def revoke(self, token_id: str, expires_s: int) -> bool:
        """Revoke a token (at the global cell's owner, through the fence); False if it was
        revoked already."""
        if len(self._ids) >= REVOKED_MAX:
            raise Conflict("too many revoked tokens: rotate the token key instead")

        def work(tx: WriteTx) -> bool:
            if tx.get(revoked_tokens, {"token_id": token_id}) is not None:
                return False
            values = {"token_id": token_id, "expires_s": expires_s, "revoked_ms": now_ms()}
            tx.insert(revoked_tokens, values)
            return True

        added = await self.store.write(work)
        self._ids.add(token_id)
        return added

    async def sweep(self) -> int:
        """Delete revocations of tokens that have expired (at the owner); how many."""
        now_s = int(time.time())
        expired = (
            select(revoked_tokens.c.token_id)
            .where(revoked_tokens.c.expires_s < now_s)
            .limit(SWEEP_ROWS_MAX)
        )

        def work(tx: WriteTx) -> list[str]:
            ids = [row.token_id for row in tx.all(expired)]
            for token_id in ids:
                tx.delete(revoked_tokens, {"token_id": token_id})  # captured: replicas follow
            return ids

        ids = await self.store.write(work)
        self._ids.difference_update(ids)
        return len(ids)
