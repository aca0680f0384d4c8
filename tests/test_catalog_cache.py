from __future__ import annotations

from unitrade.services.catalog_cache import CatalogCache


class Clock:
    """A clock the test moves: expiry is then exact, whatever the machine's load."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = CatalogCache(ttl_s=2.0, clock=clock)
    cache.put({"A": {"price_cents": 1}})
    clock.now_s += 1.5
    assert cache.get(["A", "B"]) == ({"A": {"price_cents": 1}}, ["B"])
    clock.now_s += 0.5  # exactly the TTL: expired
    assert cache.get(["A"]) == ({}, ["A"])


def test_a_new_put_restarts_the_ttl() -> None:
    clock = Clock()
    cache = CatalogCache(ttl_s=2.0, clock=clock)
    cache.put({"A": {"price_cents": 1}})
    clock.now_s += 1.5
    cache.put({"A": {"price_cents": 2}})
    clock.now_s += 1.5
    assert cache.get(["A"]) == ({"A": {"price_cents": 2}}, [])


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
