"""The buyer's cart, in the buyer's unit cell."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, select

from unitrade.errors import Conflict, UnknownSku
from unitrade.services.orders import CART_OF, orderable
from unitrade.services.remote import CatalogClient
from unitrade.storage.copies import CellCopies
from unitrade.storage.schema import carts
from unitrade.storage.store import CellStore, WriteTx, now_ms
from unitrade.topology.rule import route_buyer

CART_LINES_MAX = 100
_CART_LINES = (
    select(func.count()).select_from(carts).where(carts.c.buyer_id == bindparam("buyer_id"))
)


class CartService:
    def __init__(self, copies: CellCopies, catalog: CatalogClient) -> None:
        self.copies = copies
        self.catalog = catalog

    def _store(self, buyer_id: int) -> CellStore:
        return self.copies[route_buyer(self.copies.fence.rule, buyer_id).cell]

    async def put(self, buyer_id: int, sku: str, qty: int) -> dict[str, Any]:
        assert qty > 0
        if not orderable(sku, buyer_id) or sku not in await self.catalog.get_cached([sku]):
            raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
        key = {"buyer_id": buyer_id, "sku": sku}

        def work(tx: WriteTx) -> None:
            if tx.update(carts, key, {"qty": qty, "updated_ms": now_ms()}) is not None:
                return
            count = tx.one(_CART_LINES, {"buyer_id": buyer_id})
            assert count is not None
            if count[0] >= CART_LINES_MAX:
                raise Conflict(f"a cart holds at most {CART_LINES_MAX} SKUs")
            tx.insert(carts, {**key, "qty": qty, "updated_ms": now_ms()})

        await self._store(buyer_id).write(work)
        return await self.get(buyer_id)

    async def put_if_older(
        self, buyer_id: int, sku: str, qty: int | None, changed_ms: int
    ) -> dict[str, Any]:
        """Reconcile one cart line (control/reconcile.py): set it to `qty` (None: remove
        it) unless this copy's line is as new as `changed_ms` (the time the lost region
        changed it) or newer; in one transaction, so a buyer's change in between wins.
        Answers the line's `qty` now (None: no line) and whether it `changed`."""
        if qty is not None and sku not in await self.catalog.get_cached([sku]):
            raise UnknownSku(f"unknown SKU {sku!r}", sku=sku)
        key = {"buyer_id": buyer_id, "sku": sku}

        def work(tx: WriteTx) -> dict[str, Any]:
            row = tx.get(carts, key)
            if row is not None and row.updated_ms >= changed_ms:
                return {"qty": row.qty, "changed": False}
            if qty is None:
                return {"qty": None, "changed": row is not None and tx.delete(carts, key)}
            if row is not None:
                tx.update(carts, key, {"qty": qty, "updated_ms": now_ms()})
            else:
                count = tx.one(_CART_LINES, {"buyer_id": buyer_id})
                assert count is not None
                if count[0] >= CART_LINES_MAX:
                    raise Conflict(f"a cart holds at most {CART_LINES_MAX} SKUs")
                tx.insert(carts, {**key, "qty": qty, "updated_ms": now_ms()})
            return {"qty": qty, "changed": True}

        return await self._store(buyer_id).write(work)

    async def remove(self, buyer_id: int, sku: str) -> dict[str, Any]:
        key = {"buyer_id": buyer_id, "sku": sku}
        await self._store(buyer_id).write(lambda tx: tx.delete(carts, key))
        return await self.get(buyer_id)

    async def get(self, buyer_id: int) -> dict[str, Any]:
        params = {"buyer_id": buyer_id}
        rows = await self._store(buyer_id).read(lambda conn: conn.execute(CART_OF, params).all())
        catalog = await self.catalog.get_cached([r.sku for r in rows]) if rows else {}
        items = []
        for row in rows:
            product = catalog.get(row.sku)
            price = product["price_cents"] if product else None
            items.append(
                {
                    "sku": row.sku,
                    "qty": row.qty,
                    "title": product["title"] if product else None,
                    "price_cents": price,
                    "line_cents": None if price is None else price * row.qty,
                }
            )
        total = sum(i["line_cents"] or 0 for i in items)
        return {"buyer_id": buyer_id, "items": items, "total_cents": total}
