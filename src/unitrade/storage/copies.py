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
        self.stores: dict[int, CellStore] = {
            cell.id: CellStore(
                cell=rule.cells[cell.id],
                region=region,
                url=region_config.storage_url(cell.name, data_dir),
                fence=fence,
                readers=region_config.storage_readers,
            )
            for cell in config.cells
        }

    def __getitem__(self, cell: int) -> CellStore:
        return self.stores[cell]

    async def open(self) -> None:
        await asyncio.gather(*(s.open() for s in self.stores.values()))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.stores.values()))
