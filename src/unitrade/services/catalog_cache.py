"""A region's cache of products (the global cell), for pricing orders and showing carts.

Every region reads products from its own copy of the global cell. The cache saves that read
on the order path; it is invalidated at once by every change of a product, whether written
here (the owner) or applied by replication (docs/architecture.md), and entries also expire after
`ttl_s` as a bound on staleness should an invalidation ever be missed (a copy repaired by
`unitrade diff --repair`, say).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

TTL_S_DEFAULT = 1.0
ENTRIES_MAX_DEFAULT = 100_000


class CatalogCache:
    def __init__(
        self,
        ttl_s: float = TTL_S_DEFAULT,
        entries_max: int = ENTRIES_MAX_DEFAULT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert ttl_s >= 0 and entries_max >= 1
        self.ttl_s = ttl_s
        self._clock = clock  # seconds, monotonic; a test's own clock makes expiry exact
        self.entries_max = entries_max
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, skus: Iterable[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The cached products, and the SKUs to fetch."""
        now = self._clock()
        found: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        for sku in skus:
            entry = self._entries.get(sku)
            if entry is not None and entry[0] > now:
                found[sku] = entry[1]
            else:
                missing.append(sku)
        self.hits += len(found)
        self.misses += len(missing)
        return found, missing

    def put(self, products: dict[str, dict[str, Any]]) -> None:
        expires = self._clock() + self.ttl_s
        for sku, product in products.items():
            self._entries[sku] = (expires, product)
            self._entries.move_to_end(sku)
        while len(self._entries) > self.entries_max:
            self._entries.popitem(last=False)

    def invalidate(self, skus: Iterable[str] | None = None) -> None:
        """Forget some SKUs, or everything."""
        if skus is None:
            self._entries.clear()
            return
        for sku in skus:
            self._entries.pop(sku, None)
