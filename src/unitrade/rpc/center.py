"""`center` and `global` route types: inventory and catalog calls go to the owner region of
the center or global cell; when that is this region they run in-process."""

from __future__ import annotations

from typing import Any

from unitrade.rpc.client import RegionClient
from unitrade.services.catalog import CatalogService
from unitrade.services.catalog_cache import CatalogCache
from unitrade.services.inventory import InventoryService, Lines
from unitrade.storage.fence import Fence


class CenterClient:
    def __init__(self, fence: Fence, local: InventoryService, client: RegionClient) -> None:
        self.fence = fence
        self.local = local
        self.client = client

    @property
    def owner(self) -> str:
        rule = self.fence.rule
        return rule.owner_of(rule.center_cell)

    def is_local(self) -> bool:
        return self.owner == self.fence.region

    async def reserve(self, order_id: int, cell: int, lines: Lines) -> dict[str, Any]:
        if self.is_local():
            return await self.local.reserve(order_id, cell, lines)
        payload = {"order_id": str(order_id), "cell": cell, "lines": lines}
        result: dict[str, Any] = await self.client.call(
            self.owner, "POST", "/internal/center/reserve", payload
        )
        return result

    async def step(self, order_id: int, step: str) -> dict[str, Any]:
        if self.is_local():
            return await self.local.step(order_id, step)
        payload = {"order_id": str(order_id), "step": step}
        result: dict[str, Any] = await self.client.call(
            self.owner, "POST", "/internal/center/step", payload
        )
        return result

    async def set_stock(self, sku: str, total: int) -> dict[str, Any]:
        if self.is_local():
            return await self.local.set_stock(sku, total)
        payload = {"sku": sku, "total": total}
        result: dict[str, Any] = await self.client.call(
            self.owner, "POST", "/internal/center/stock", payload
        )
        return result

    async def stale(self, cell: int, older_than_ms: int, limit: int) -> list[int]:
        if self.is_local():
            return await self.local.stale(cell, older_than_ms, limit)
        payload = {"cell": cell, "older_than_ms": older_than_ms, "limit": limit}
        result = await self.client.call(self.owner, "POST", "/internal/center/stale", payload)
        return [int(order_id) for order_id in result]

    async def levels(self, sku: str) -> dict[str, Any]:
        if self.is_local():
            return await self.local.levels(sku)
        result: dict[str, Any] = await self.client.call(
            self.owner, "POST", "/internal/center/levels", {"sku": sku}
        )
        return result


class CatalogClient:
    """Reads of the global cell, from this region's own copy (replicated from the owner,
    DESIGN §3), with a cache that every replicated product change invalidates."""

    def __init__(self, local: CatalogService, cache: CatalogCache | None = None) -> None:
        self.local = local
        self.cache = cache or CatalogCache()
        local.on_write.append(self.cache.invalidate)

    async def get_cached(self, skus: list[str]) -> dict[str, dict[str, Any]]:
        """Products for pricing and carts: cached (see services/catalog_cache.py)."""
        found, missing = self.cache.get(skus)
        if missing:
            fetched = await self.local.get_many(missing)
            self.cache.put(fetched)
            found.update(fetched)
        return found

    async def get_many(self, skus: list[str]) -> dict[str, dict[str, Any]]:
        return await self.local.get_many(skus)

    async def page(self, limit: int, after: str | None) -> list[dict[str, Any]]:
        return await self.local.page(limit, after)
