"""Who pulls a cell from its owner, kept in the owner's copy for a region of many processes.

A follower's pull reaches whichever process of the owner region the kernel hands its
connection to, so no one process sees every pull. Each records what it saw in the copy's
own `followers` table (schema.py, local: never replicated): per follower region the newest
rule version it pulled under and the position its newest pull started after. Both only
grow here (the greater value wins), so processes that record the same region in any
order leave the newest there. The switchover's last step (every region follows the new
owner) and the changelog trim (keep what a follower still needs) read it back, whichever
process they ask.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Connection, select

from unitrade.storage.schema import followers
from unitrade.storage.store import CellStore, WriteTx, now_ms

_ALL = select(followers.c.region, followers.c.rule_version, followers.c.applied)


async def record(store: CellStore, seen: Mapping[str, tuple[int, int]]) -> None:
    """Merge `seen` (region -> (rule version, applied)) into the copy's table: a local
    write (`write_own`), serialised with the other processes' by the cell's lock."""
    if not seen:
        return
    stamp = now_ms()

    def work(tx: WriteTx) -> None:
        for region, (rule_version, applied) in seen.items():
            row = tx.get(followers, {"region": region})
            if row is None:
                values = {"rule_version": rule_version, "applied": applied, "seen_ms": stamp}
                tx.insert(followers, {"region": region, **values})
                continue
            newer = {
                "rule_version": max(int(row.rule_version), rule_version),
                "applied": max(int(row.applied), applied),
                "seen_ms": stamp,
            }
            tx.update(followers, {"region": region}, newer)

    await store.write_own(work)


async def read(store: CellStore) -> dict[str, tuple[int, int]]:
    """region -> (rule version, applied), as every process of the region recorded them."""

    def work(conn: Connection) -> dict[str, tuple[int, int]]:
        return {str(r.region): (int(r.rule_version), int(r.applied)) for r in conn.execute(_ALL)}

    return await store.read(work)
