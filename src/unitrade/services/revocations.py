"""Revoked bearer tokens, kept in the global cell: written at its owner, replicated to every
region, held by each region as an in-memory set that the edge checks on every request.

A revocation is kept until the token it names has expired anyway: the global cell's owner
deletes the row then (services/retention.py), and every region forgets the id itself, so
the set stays bounded by the revocations of one token lifetime.
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


class Revocations:
    def __init__(self, store: CellStore) -> None:
        self.store = store
        self._expires_s: dict[str, int] = {}  # token id -> when its token expires

    def __contains__(self, token_id: object) -> bool:
        return token_id in self._expires_s

    def __len__(self) -> int:
        return len(self._expires_s)

    def forget_expired(self, now_s: float | None = None) -> int:
        """Drop ids whose tokens have expired (a replica's rows go by replication, the
        owner's own deletes are not applied to it): how many."""
        now = time.time() if now_s is None else now_s
        expired = [t for t, expires in self._expires_s.items() if expires < now]
        for token_id in expired:
            del self._expires_s[token_id]
        return len(expired)

    async def load(self) -> None:
        """This copy's revocations, at start (replication keeps them current after)."""

        columns = select(revoked_tokens.c.token_id, revoked_tokens.c.expires_s)

        def work(conn: Connection) -> dict[str, int]:
            return {row.token_id: row.expires_s for row in conn.execute(columns)}

        self._expires_s = await self.store.read(work)

    def applied(self, changes: Iterable[dict[str, Any]]) -> None:
        """Replicated changes of `revoked_tokens` (inserts and the sweep's deletes)."""
        for change in changes:
            if change["tbl"] != revoked_tokens.name:
                continue
            token_id = orjson.loads(change["pk"])["token_id"]
            if change["op"] == "d":
                self._expires_s.pop(token_id, None)
            else:
                self._expires_s[token_id] = orjson.loads(change["row_image"])["expires_s"]

    async def revoke(self, token_id: str, expires_s: int) -> bool:
        """Revoke a token (at the global cell's owner, through the fence); False if it was
        revoked already."""
        self.forget_expired()  # revocations are rare: this keeps the set bounded
        if len(self._expires_s) >= REVOKED_MAX:
            raise Conflict("too many revoked tokens: rotate the token key instead")

        def work(tx: WriteTx) -> bool:
            if tx.get(revoked_tokens, {"token_id": token_id}) is not None:
                return False
            values = {"token_id": token_id, "expires_s": expires_s, "revoked_ms": now_ms()}
            tx.insert(revoked_tokens, values)
            return True

        added = await self.store.write(work)
        self._expires_s[token_id] = expires_s
        return added
