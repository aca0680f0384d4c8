"""All of a region's cell copies: every region holds a copy of every cell (docs/architecture.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from unitrade.storage.fence import Fence
from unitrade.storage.store import CellStore
from unitrade.topology.config import TopologyConfig


class CellCopies:
    def __init__(self, config: TopologyConfig, region: str, data_dir: Path, fence: Fence) -> None:
        region_config = config.region(region)
        rule = fence.rule
        self.region = region
        self.fence = fence
        # Several processes of this region write these copies (`workers`): positions are
        # read from the databases, and the fence holds in them too (store.py, fence.py).
        self.shared = region_config.workers > 1
        self.stores: dict[int, CellStore] = {
            cell.id: CellStore(
                cell=rule.cells[cell.id],
                region=region,
                url=region_config.storage_url(cell.name, data_dir),
                fence=fence,
                readers=region_config.storage_readers,
                shared=self.shared,
            )
            for cell in config.cells
        }
        if self.shared:
            fence.settle = self.raise_fences

    async def raise_fences(self, cells: list[int], version: int) -> None:
        """The database's half of the fence (fence.py): every copy of `cells` refuses
        transactions under a rule older than `version` from now on."""
        await asyncio.gather(*(self.stores[c].raise_fence(version) for c in cells))

    def __getitem__(self, cell: int) -> CellStore:
        return self.stores[cell]

    async def open(self) -> None:
        await asyncio.gather(*(s.open() for s in self.stores.values()))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.stores.values()))
