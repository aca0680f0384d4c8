"""The catalog: products and prices in the global cell (written at its owner, read anywhere;
docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, bindparam, select

from unitrade.storage.schema import products
from unitrade.storage.store import CellStore, WriteTx, now_ms
from unitrade.topology.probes import PROBE_SKU

PAGE_LIMIT_MAX = 500
_PRODUCTS_IN = select(products).where(products.c.sku.in_(bindparam("skus", expanding=True)))


def product_body(row: Any) -> dict[str, Any]:
    return {
        "sku": row["sku"],
        "title": row["title"],
        "price_cents": row["price_cents"],
        "updated_ms": row["updated_ms"],
    }


class CatalogService:
    def __init__(self, store: CellStore) -> None:
        self.store = store
        # Called with the SKUs a write changed, after it committed (cache invalidation).
        self.on_write: list[Callable[[list[str]], None]] = []

    async def put(self, sku: str, title: str, price_cents: int) -> dict[str, Any]:
        def work(tx: WriteTx) -> dict[str, Any]:
            row = tx.get(products, {"sku": sku})
            values = {"title": title, "price_cents": price_cents, "updated_ms": now_ms()}
            if row is None:
                tx.insert(products, {"sku": sku, "version": 1, **values})
                return product_body({"sku": sku, **values})
            image = tx.update(products, {"sku": sku}, {**values, "version": row.version + 1})
            assert image is not None
            return product_body(image)

        product = await self.store.write(work)
        for listener in self.on_write:
            listener([sku])
        return product

    async def put_unless_newer(
        self, sku: str, title: str, price_cents: int, base_version: int
    ) -> dict[str, Any] | None:
        """Reconcile a product write of a lost region (control/reconcile.py): write it if
        this copy has no product `sku` or one of at most `base_version` (the version the
        lost region's write started from), in one transaction. The product written, or
        None when this copy has a newer version (nothing written)."""

        def work(tx: WriteTx) -> dict[str, Any] | None:
            row = tx.get(products, {"sku": sku})
            values = {"title": title, "price_cents": price_cents, "updated_ms": now_ms()}
            if row is None:
                tx.insert(products, {"sku": sku, "version": 1, **values})
                return product_body({"sku": sku, **values})
            if row.version > base_version:
                return None
            image = tx.update(products, {"sku": sku}, {**values, "version": row.version + 1})
            assert image is not None
            return product_body(image)

        product = await self.store.write(work)
        if product is not None:
            for listener in self.on_write:
                listener([sku])
        return product

    async def get_many(self, skus: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = sorted(set(skus))

        def work(conn: Connection) -> dict[str, dict[str, Any]]:
            rows = conn.execute(_PRODUCTS_IN, {"skus": wanted})
            return {r["sku"]: product_body(r) for r in rows.mappings()}

        return await self.store.read(work)

    async def page(self, limit: int, after: str | None) -> list[dict[str, Any]]:
        assert 1 <= limit <= PAGE_LIMIT_MAX
        # The health checker's SKU is no product anyone shops for (topology/probes.py).
        statement = (
            select(products)
            .where(products.c.sku != PROBE_SKU)
            .order_by(products.c.sku)
            .limit(limit)
        )
        if after is not None:
            statement = statement.where(products.c.sku > after)

        def work(conn: Connection) -> list[dict[str, Any]]:
            return [product_body(r) for r in conn.execute(statement).mappings()]

        return await self.store.read(work)
