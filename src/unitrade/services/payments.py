"""Payment claims (docs/architecture.md, Center inventory): which order a payment ID pays,
cluster-wide. Runs only at the owner of the center cell; other regions reach it through
`center` RPC (services/remote.py).

A unit cell's `payments` table makes a payment ID pay one order of that cell only; two
orders in two cells could each take the same payment. So a pay first claims its payment
ID here, in the center cell, whose writes are serialised at one owner like every cell's:
the first order to claim a payment ID holds it, the same order claiming it again is
answered the same (pays are retried), and any other order is refused (`conflict`). Only
then is the payment written in the order's cell (services/orders.py `pay`).

A claim is never given back: one whose payment was refused afterwards (the order was
closed meanwhile) keeps the payment ID for its order until retention deletes it
(`[retention] payment_claims_s`, services/retention.py): within that window a payment ID
is unique across the cluster, and within its unit cell for ever.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from unitrade.errors import Conflict
from unitrade.storage.schema import payment_claims
from unitrade.storage.store import CellStore, WriteTx, by_key, key_params, now_ms


def claim_body(row: Any) -> dict[str, Any]:
    return {
        "payment_id": row.payment_id,
        "order_id": str(row.order_id),
        "amount_cents": row.amount_cents,
        "created_ms": row.created_ms,
    }


class PaymentClaims:
    """The center's payment claims, over this region's copy of the center cell."""

    def __init__(self, store: CellStore) -> None:
        self.store = store

    async def claim(
        self, payment_id: str, order_id: int, amount_cents: int, dry_run: bool = False
    ) -> dict[str, Any]:
        """Claim `payment_id` for `order_id`: inserted if nobody holds it, answered again if
        this order does (the first claim's amount stands), `conflict` if another order
        does. Through the fenced write path, so it is captured and replicated like every
        center write. `dry_run` decides the same in a read and writes nothing (reconcile);
        its answer then has no `created_ms` for a claim it would make."""
        assert amount_cents >= 0

        def refuse_other(row: Any) -> None:
            if row.order_id != order_id:
                raise Conflict(
                    f"payment {payment_id!r} belongs to another order",
                    payment_id=payment_id,
                )

        if dry_run:

            def look(conn: Connection) -> dict[str, Any]:
                statement, params = by_key(payment_claims), key_params({"payment_id": payment_id})
                row = conn.execute(statement, params).first()
                if row is None:
                    return {"payment_id": payment_id, "order_id": str(order_id)}
                refuse_other(row)
                return claim_body(row)

            return await self.store.read(look)

        def work(tx: WriteTx) -> dict[str, Any]:
            row = tx.get(payment_claims, {"payment_id": payment_id})
            if row is not None:
                refuse_other(row)
                return claim_body(row)
            values = {
                "payment_id": payment_id,
                "order_id": order_id,
                "amount_cents": amount_cents,
                "created_ms": now_ms(),
            }
            tx.insert(payment_claims, values)
            return {**values, "order_id": str(order_id)}

        return await self.store.write(work)

    async def holder(self, payment_id: str) -> dict[str, Any] | None:
        """The claim of `payment_id` in this copy, None if nobody holds it."""
        statement, params = by_key(payment_claims), key_params({"payment_id": payment_id})

        def look(conn: Connection) -> dict[str, Any] | None:
            row = conn.execute(statement, params).first()
            return None if row is None else claim_body(row)

        return await self.store.read(look)
