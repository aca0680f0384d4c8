from __future__ import annotations

import time

from unitrade.services.catalog_cache import CatalogCache


def test_entries_expire_after_the_ttl() -> None:
    cache = CatalogCache(ttl_s=0.2)
    cache.put({"A": {"price_cents": 1}})
    assert cache.get(["A", "B"]) == ({"A": {"price_cents": 1}}, ["B"])
    time.sleep(0.25)
    assert cache.get(["A"]) == ({}, ["A"])


def test_size_is_bounded_oldest_out_first() -> None:
    cache = CatalogCache(entries_max=2)
    cache.put({"A": {}, "B": {}})
    cache.put({"C": {}})
    assert cache.get(["A", "B", "C"])[1] == ["A"]


def test_invalidation_of_some_or_all() -> None:
    cache = CatalogCache()
    cache.put({"A": {}, "B": {}, "C": {}})
    cache.invalidate(["A"])
    assert cache.get(["A", "B"])[1] == ["A"]
    cache.invalidate()
    assert cache.get(["B", "C"])[1] == ["B", "C"]
