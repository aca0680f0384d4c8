"""One region's process: its cell copies, services, RPC clients and background work."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from pathlib import Path
from typing import Any

import orjson

from unitrade.replication.replicator import Replicator
from unitrade.rpc.center import CatalogClient, CenterClient
from unitrade.rpc.client import RegionClient
from unitrade.services.cart import CartService
from unitrade.services.catalog import CatalogService
from unitrade.services.inventory import InventoryService
from unitrade.services.orders import OrderService
from unitrade.storage.copies import CellCopies
from unitrade.storage.fence import Fence
from unitrade.storage.sequences import OrderIdAllocator
from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import initial_rule

log = logging.getLogger("unitrade.region")

OUTBOX_INTERVAL_S = 1.0
ABANDONED_INTERVAL_S = 15.0


class RegionRuntime:
    def __init__(self, config: TopologyConfig, region: str, data_dir: Path) -> None:
        self.config = config
        self.name = region
        self.data_dir = data_dir
        # Until the control plane lands, the rule in force is version 1 from the config.
        self.fence = Fence(region, initial_rule(config))
        rule = self.fence.rule
        self.copies = CellCopies(config, region, data_dir, self.fence)
        self.client = RegionClient(config, region)
        self.inventory = InventoryService(self.copies[rule.center_cell])
        self.catalog_service = CatalogService(self.copies[rule.global_cell])
        self.center = CenterClient(self.fence, self.inventory, self.client)
        self.catalog = CatalogClient(self.catalog_service)
        self.allocators = {cell: OrderIdAllocator(self.copies[cell]) for cell in rule.unit_cells()}
        self.orders = OrderService(self.copies, self.center, self.catalog, self.allocators)
        self.cart = CartService(self.copies, self.catalog)
        self.replicator = Replicator(self.copies, self.client, [self._applied])
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.copies.open()
        self.replicator.start()
        self._tasks.append(asyncio.create_task(self._drain_outbox_forever()))
        log.info("region %s started: owns cells %s", self.name, self.owned_cells())

    async def stop(self) -> None:
        await self.replicator.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.client.aclose()
        await self.copies.close()

    def _applied(self, cell: int, changes: list[dict[str, Any]]) -> None:
        """A replicated change of the global cell invalidates the catalog cache (DESIGN §7)."""
        if cell != self.fence.rule.global_cell:
            return
        skus = [orjson.loads(c["pk"])["sku"] for c in changes if c["tbl"] == "products"]
        self.catalog.cache.invalidate(skus)

    def owned_cells(self) -> list[int]:
        return self.fence.rule.cells_owned_by(self.name)

    async def _drain_outbox_forever(self) -> None:
        """Retry center steps that failed (outbox), and release reservations whose order
        was never written, for every unit cell this region owns."""
        rounds_per_sweep = max(1, int(ABANDONED_INTERVAL_S / OUTBOX_INTERVAL_S))
        for round_no in itertools.count(1):
            await asyncio.sleep(OUTBOX_INTERVAL_S)
            for cell in self.owned_cells():
                if cell not in self.allocators:
                    continue
                store = self.copies[cell]
                try:
                    await self.orders.drain_outbox(store)
                    if round_no % rounds_per_sweep == 0:
                        await self.orders.release_abandoned(store)
                except Exception:
                    log.exception("background work on cell %s failed", cell)
