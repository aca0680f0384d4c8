from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unitrade.topology.config import default_config
from unitrade.topology.order_id import ORDER_ID_MAX, encode_order_id
from unitrade.topology.rule import (
    BUYER_ID_MAX,
    RoutingError,
    bucket_of,
    initial_rule,
    route_buyer,
    route_order,
)

RULE = initial_rule(default_config())


def test_bucket_is_buyer_id_mod_bucket_count() -> None:
    assert bucket_of(1, 100) == 1
    assert bucket_of(100, 100) == 0
    assert bucket_of(12345, 100) == 45
    assert bucket_of(7, 10) == 7


def test_default_rule_routes_buckets_to_cells_to_regions() -> None:
    assert route_buyer(RULE, 100).cell == 1 and route_buyer(RULE, 100).region == "hz"
    assert route_buyer(RULE, 15).cell == 1  # cell u1 holds buckets 0-15
    assert route_buyer(RULE, 16).cell == 2
    assert route_buyer(RULE, 40).region == "sh"
    assert route_buyer(RULE, 99).region == "bj"
    assert {route_buyer(RULE, b).cell for b in range(1, 101)} == set(range(1, 7))


@given(st.integers(min_value=1, max_value=BUYER_ID_MAX))
def test_buyer_route_is_the_rule_applied_to_the_bucket(buyer: int) -> None:
    route = route_buyer(RULE, buyer)
    assert route.cell == RULE.bucket_cells[buyer % 100]
    assert route.region == RULE.owners[route.cell]
    assert route_buyer(RULE, buyer) == route  # a pure function


@pytest.mark.parametrize("buyer", [0, -1, BUYER_ID_MAX + 1])
def test_buyer_ids_are_positive_63_bit(buyer: int) -> None:
    with pytest.raises(RoutingError):
        route_buyer(RULE, buyer)


@given(
    st.sampled_from([1, 2, 3, 4, 5, 6]),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.integers(min_value=0, max_value=2**19 - 1),
)
def test_order_routes_to_the_cell_it_carries(cell: int, time_s: int, sequence: int) -> None:
    order_id = encode_order_id(cell, time_s, sequence)
    route = route_order(RULE, order_id)
    assert route.cell == cell
    assert route.region == RULE.owners[cell]


def test_orders_naming_unknown_or_non_unit_cells_do_not_route() -> None:
    for cell in (7, 1000, 1001):
        with pytest.raises(RoutingError):
            route_order(RULE, encode_order_id(cell, 1, 1))
    for bad in (0, -5, ORDER_ID_MAX + 1):
        with pytest.raises(RoutingError):
            route_order(RULE, bad)
