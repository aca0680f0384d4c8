"""A product written at the global cell's owner a moment ago is orderable at every region
at once: a SKU a region's copy lacks is asked of the owner (services/remote.py, CatalogClient)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from unitrade.errors import RegionUnavailable
from unitrade.gateway import models
from unitrade.services.catalog import CatalogService
from unitrade.services.remote import PRODUCTS_TARGET, CatalogClient
from unitrade.storage.copies import CellCopies
from unitrade.storage.fence import Fence
from unitrade.storage.schema import products as PRODUCTS
from unitrade.topology.config import default_config
from unitrade.topology.rule import initial_rule
from unitrade.topology.rule_view import RuleView

CONFIG = default_config()
RULE = initial_rule(CONFIG)
OWNER = RULE.owner_of(RULE.global_cell)  # hz


class ToOwner:
    """The internal API of the global cell's owner, over a transport double: the request
    is validated as the endpoint does and the reply goes through JSON, as on a socket."""

    def __init__(self, owner: CatalogService) -> None:
        self.owner = owner
        self.calls: list[tuple[str, Any]] = []
        self.down = False

    async def call(
        self, region: str, method: str, target: str, payload: Any = None, idempotent: bool = True
    ) -> Any:
        self.calls.append((region, payload))
        if self.down:
            raise RegionUnavailable(f"region {region} is unreachable", region=region)
        assert (region, method, target) == (OWNER, "POST", PRODUCTS_TARGET) and not idempotent
        call = models.ProductsCall.model_validate_json(orjson.dumps(payload))
        return orjson.loads(orjson.dumps(await self.owner.get_many(call.skus)))


def test_a_sku_not_yet_replicated_is_read_from_the_owner(tmp_path: Path) -> None:
    async def scenario() -> None:
        copies = {r: CellCopies(CONFIG, r, tmp_path, Fence(r, RULE)) for r in (OWNER, "sh")}
        await asyncio.gather(*(c.open() for c in copies.values()))
        try:
            at_owner = CatalogService(copies[OWNER][RULE.global_cell])
            at_sh = CatalogService(copies["sh"][RULE.global_cell])
            transport = ToOwner(at_owner)
            catalog = CatalogClient(
                at_sh,
                rules=RuleView("rpc", RULE),
                region="sh",
                client=transport,  # type: ignore[arg-type]
            )
            await at_owner.put("NEW-1", "written a moment ago", 1_250)
            assert await at_sh.get_many(["NEW-1"]) == {}  # not replicated yet

            found = await catalog.get_cached(["NEW-1", "NEVER"])
            assert found["NEW-1"]["price_cents"] == 1_250 and "NEVER" not in found
            assert transport.calls == [(OWNER, {"skus": ["NEW-1", "NEVER"]})]
            # Cached now; an unknown SKU is asked again (it may be written any moment).
            await catalog.get_cached(["NEW-1"])
            assert len(transport.calls) == 1
            # The copy has it (replication came): the owner is not asked.
            await at_sh.store.write_replica(
                lambda tx: tx.put_row(
                    PRODUCTS,
                    {
                        "sku": "LOCAL",
                        "title": "replicated",
                        "price_cents": 5,
                        "updated_ms": 1,
                        "version": 1,
                    },
                )
            )
            assert (await catalog.get_cached(["LOCAL"]))["LOCAL"]["price_cents"] == 5
            assert len(transport.calls) == 1
            # The owner down: the SKU is unknown here, promptly, and nothing breaks.
            transport.down = True
            assert await catalog.get_cached(["NEW-2"]) == {}
        finally:
            await asyncio.gather(*(c.close() for c in copies.values()))

    asyncio.run(scenario())


def test_the_owner_never_asks_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        copies = CellCopies(CONFIG, OWNER, tmp_path, Fence(OWNER, RULE))
        await copies.open()
        try:
            at_owner = CatalogService(copies[RULE.global_cell])
            transport = ToOwner(at_owner)
            catalog = CatalogClient(
                at_owner,
                rules=RuleView("rpc", RULE),
                region=OWNER,
                client=transport,  # type: ignore[arg-type]
            )
            assert await catalog.get_cached(["NEVER"]) == {}
            assert transport.calls == []
        finally:
            await copies.close()

    asyncio.run(scenario())
