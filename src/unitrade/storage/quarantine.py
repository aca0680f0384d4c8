"""The quarantine: a copy's divergent tail after a failover (docs/architecture.md).

A failover promotes a surviving copy of a cell at changelog position P under rule version V
(topology/rule.py `Promotion`). The lost owner may have committed more after P before its
lease ended; those changes exist only in its own copy (and in a copy that pulled them
from it before the failover). In such a copy they are the changelog rows above P whose
epoch is below V: under any one rule version exactly one region owns a cell, so
(position, epoch) names one change in one lineage, as (index, term) does in Raft.

Before a copy pulls from a cell's owner, the replicator checks it against every promotion
of the cell in the rule. A copy that has diverged moves the rows from the first divergent
position on into its `quarantine` table and empties itself, in one transaction: its
tables hold the effects of those rows, which cannot be undone row by row, and a copy that
is empty is rebuilt from the owner (snapshot and stream) like a new one. A crash at any
point leaves either the diverged copy (checked again at the next start) or the empty copy
and the quarantine. Nothing is silently applied or dropped: the rows stay in the
quarantine until `unitrade quarantine reconcile` re-applies what does not conflict
through the normal write path at the current owner (control/reconcile.py) and reports the
rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from unitrade.storage.schema import cell_meta, changelog, quarantine, tables_of
from unitrade.storage.store import CellStore, WriteTx, now_ms
from unitrade.topology.rule import Promotion

LIST_ROWS_MAX = 1_000
HELD = "held"
# What `unitrade quarantine reconcile` decided for an entry (control/reconcile.py).
REAPPLIED, CONFLICT, SUPERSEDED = "reapplied", "conflict", "superseded"
STATES = (HELD, REAPPLIED, CONFLICT, SUPERSEDED)
MARKS_MAX = 1_000  # entries marked in one transaction
NOTE_CHARS_MAX = 500

# Only a held entry takes a decision: marking again (a second reconcile, a retried call)
# changes nothing, and a decision is never overwritten.
_MARK = (
    update(quarantine)
    .where(
        quarantine.c.promotion_version == bindparam("k_promotion_version"),
        quarantine.c.position == bindparam("k_position"),
        quarantine.c.state == HELD,
    )
    .values(state=bindparam("s_state"), note=bindparam("s_note"))
)


def first_divergent(conn: Connection, promotions: Sequence[Promotion]) -> int | None:
    """The lowest changelog position of this copy that no promoted owner ever had."""
    first: int | None = None
    for promotion in promotions:
        found = conn.execute(
            select(func.min(changelog.c.position)).where(
                changelog.c.position > promotion.position,
                changelog.c.epoch < promotion.version,
            )
        ).scalar()
        if found is not None and (first is None or int(found) < first):
            first = int(found)
    return first


def _promotion_of(row: Any, promotions: Sequence[Promotion]) -> int:
    """The failover a divergent row is reported under: the newest one it diverges from."""
    matching = [
        p.version for p in promotions if row.position > p.position and row.epoch < p.version
    ]
    return max(matching, default=max(p.version for p in promotions))


def move_divergent_tail(tx: WriteTx, kind: Any, promotions: Sequence[Promotion]) -> int:
    """In one transaction: move this copy's divergent tail into the quarantine and empty
    the copy (it is rebuilt from its owner); the number of rows quarantined (0: the copy
    has not diverged and nothing changed)."""
    assert tx.conn is not None or tx.cursor is not None
    conn = _connection(tx)
    first = first_divergent(conn, promotions)
    if first is None:
        return 0
    rows = conn.execute(
        select(changelog).where(changelog.c.position >= first).order_by(changelog.c.position)
    ).all()
    stamp = now_ms()
    already = {
        (int(r.promotion_version), int(r.position))
        for r in conn.execute(select(quarantine.c.promotion_version, quarantine.c.position))
    }
    moved = []
    for row in rows:
        key = (_promotion_of(row, promotions), int(row.position))
        if key in already:
            continue
        moved.append(
            {
                "promotion_version": key[0],
                "position": key[1],
                "epoch": row.epoch,
                "origin": row.origin,
                "tbl": row.tbl,
                "pk": row.pk,
                "op": row.op,
                "row_image": row.row_image,
                "created_ms": row.created_ms,
                "quarantined_ms": stamp,
                "state": HELD,
                "note": "",
            }
        )
    if moved:
        conn.execute(insert(quarantine), moved)
    for name, table in tables_of(kind).items():
        if name != "cell_meta":
            conn.execute(delete(table))
    conn.execute(update(cell_meta).values(last_position=0, trimmed_position=0))
    return len(rows)


def _connection(tx: WriteTx) -> Connection:
    """Replica transactions (`write_replica`) run on a SQLAlchemy connection."""
    if tx.conn is None:
        raise RuntimeError("the quarantine runs on the store's writer connection")
    return tx.conn


async def settle(store: CellStore, promotions: Sequence[Promotion]) -> int:
    """Check this replica copy against the cell's promotions; quarantine and empty it if
    it has diverged. The rows quarantined."""
    if not promotions:
        return 0
    kind = store.cell.kind
    moved = await store.write_replica(
        lambda tx: move_divergent_tail(tx, kind, promotions), inline=False
    )
    if moved:
        store.wiped()
    return moved


async def counts(store: CellStore) -> dict[str, int]:
    """Quarantined rows of this copy by state."""

    def work(conn: Connection) -> dict[str, int]:
        rows = conn.execute(
            select(quarantine.c.state, func.count()).group_by(quarantine.c.state)
        ).all()
        return {str(state): int(n) for state, n in rows}

    return await store.read(work)


async def entries(
    store: CellStore,
    limit: int,
    state: str | None = None,
    after: tuple[int, int] | None = None,
    images: bool = False,
) -> list[dict[str, Any]]:
    """Quarantined rows in business terms, oldest position first; after the entry
    (promotion_version, position) `after`, for paging; with the row images if `images`."""
    assert 1 <= limit <= LIST_ROWS_MAX

    def work(conn: Connection) -> list[dict[str, Any]]:
        query = select(quarantine).order_by(quarantine.c.promotion_version, quarantine.c.position)
        if state is not None:
            query = query.where(quarantine.c.state == state)
        if after is not None:
            version, position = after
            query = query.where(
                or_(
                    quarantine.c.promotion_version > version,
                    and_(
                        quarantine.c.promotion_version == version,
                        quarantine.c.position > position,
                    ),
                )
            )
        rows = conn.execute(query.limit(limit))
        return [entry(store.cell.name, dict(r._mapping), images) for r in rows]

    return await store.read(work)


async def mark(store: CellStore, marks: Sequence[Mapping[str, Any]]) -> int:
    """Record reconcile's decisions: each mark names an entry (promotion_version, position)
    and gives its `state` (reapplied, conflict, superseded) and `note`. Held entries only;
    the number marked. A local write on this copy (`write_own`), like the quarantine itself:
    the region may own the cell or not, and nothing of it replicates."""
    assert len(marks) <= MARKS_MAX
    params = [
        {
            "k_promotion_version": int(m["promotion_version"]),
            "k_position": int(m["position"]),
            "s_state": m["state"],
            "s_note": str(m["note"])[:NOTE_CHARS_MAX],
        }
        for m in marks
    ]
    for p in params:
        assert p["s_state"] in (REAPPLIED, CONFLICT, SUPERSEDED), p["s_state"]
    if not params:
        return 0
    return await store.write_own(lambda tx: sum(tx.count(_MARK, p) for p in params))


def entry(cell_name: str, row: Mapping[str, Any], images: bool = False) -> dict[str, Any]:
    key = orjson.loads(row["pk"])
    image = orjson.loads(row["row_image"]) if row["row_image"] else None
    extra = {"image": image} if images else {}
    return {
        "cell": cell_name,
        "promotion_version": int(row["promotion_version"]),
        "position": int(row["position"]),
        "epoch": int(row["epoch"]),
        "origin": row["origin"],
        "table": row["tbl"],
        "op": {"i": "insert", "u": "update", "d": "delete"}.get(row["op"], row["op"]),
        "key": key,
        "what": describe(row["tbl"], row["op"], key, image),
        "created_ms": int(row["created_ms"]),
        "state": row["state"],
        "note": row["note"],
        **extra,
    }


def describe(table: str, op: str, key: Mapping[str, Any], image: Mapping[str, Any] | None) -> str:
    """One line an operator can act on: which order, buyer, payment, cart or SKU changed."""
    row = image or {}
    gone = op == "d"
    if table == "orders":
        if gone:
            return f"order {key.get('order_id')} deleted"
        return (
            f"order {row.get('order_id')} of buyer {row.get('buyer_id')}: "
            f"{row.get('status')}, {row.get('total_cents')} cents"
        )
    if table == "order_lines":
        return f"order {key.get('order_id')} line {key.get('line_no')}: " + (
            "deleted" if gone else f"{row.get('qty')} x {row.get('sku')}"
        )
    if table == "payments":
        return f"payment {key.get('payment_id')}" + (
            " deleted"
            if gone
            else f" of {row.get('amount_cents')} cents for order {row.get('order_id')}"
        )
    if table == "carts":
        return f"cart of buyer {key.get('buyer_id')}: {key.get('sku')} " + (
            "removed" if gone else f"x {row.get('qty')}"
        )
    if table == "inventory":
        return f"stock of {key.get('sku')}" + (
            " deleted"
            if gone
            else (
                f": available {row.get('available')}, reserved {row.get('reserved')}, "
                f"sold {row.get('sold')}"
            )
        )
    if table == "reservations":
        return f"stock reservation of order {key.get('order_id')}" + (
            " deleted" if gone else f": {row.get('status')} {row.get('lines')}"
        )
    if table == "payment_claims":
        return f"payment claim {key.get('payment_id')}" + (
            " deleted" if gone else f" of order {row.get('order_id')}"
        )
    if table == "products":
        return f"product {key.get('sku')}" + (
            " deleted" if gone else f": {row.get('title')!r} at {row.get('price_cents')} cents"
        )
    if table == "sale_tokens":
        return f"sale token {key.get('token_id')}" + (
            " deleted"
            if gone
            else (
                f" of sale {row.get('sale_id')} for buyer {row.get('buyer_id')}: "
                f"{row.get('status')}"
                + (f" by order {row.get('order_id')}" if row.get("order_id") else "")
            )
        )
    if table == "sales":
        return f"sale {key.get('sale_id')}" + (
            " deleted"
            if gone
            else f" of {row.get('sku')}: {row.get('remaining')} of {row.get('tokens')} tokens left"
        )
    if table == "sale_segments":
        return f"segment {key.get('segment_id')} of sale {key.get('sale_id')}" + (
            " deleted"
            if gone
            else f": {row.get('size')} tokens to {row.get('region')}, {row.get('status')}"
        )
    if table == "coupons":
        return f"coupon {key.get('code')}" + (
            " deleted" if gone else f": {row.get('claimed')} of {row.get('count')} claimed"
        )
    if table == "coupon_claims":
        return f"claim of coupon {key.get('code')} by buyer {key.get('buyer_id')}" + (
            " deleted"
            if gone
            else f": {row.get('status')}"
            + (f" by order {row.get('order_id')}" if row.get("order_id") else "")
        )
    return f"{table} {dict(key)} ({'deleted' if gone else 'written'})"


_DECIDED: Select[Any] = (
    select(quarantine.c.promotion_version, quarantine.c.position)
    .where(quarantine.c.state != HELD, quarantine.c.quarantined_ms < bindparam("before_ms"))
    .limit(bindparam("n"))
)
_DELETE_ONE = delete(quarantine).where(
    quarantine.c.promotion_version == bindparam("k_version"),
    quarantine.c.position == bindparam("k_position"),
)


async def sweep(store: CellStore, before_ms: int, batch_rows: int) -> int:
    """Delete a batch of entries reconcile has decided (not held) that were quarantined
    before `before_ms`: `[retention] quarantine_decided_s`. Held entries stay until they
    are decided. A local write (`write_own`); the number deleted."""
    assert batch_rows >= 1

    def work(tx: WriteTx) -> int:
        keys = tx.all(_DECIDED, {"before_ms": before_ms, "n": batch_rows})
        for key in keys:
            found = key._mapping
            params = {
                "k_version": int(found["promotion_version"]),
                "k_position": int(found["position"]),
            }
            tx.count(_DELETE_ONE, params)
        return len(keys)

    return await store.write_own(work)
