from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unitrade.topology.order_id import (
    CELL_MAX,
    EPOCH_UNIX_S,
    ORDER_ID_MAX,
    SEQUENCE_MAX,
    TIME_MAX,
    decode_order_id,
    encode_order_id,
    parse_order_id,
    unix_to_id_time,
)

cells = st.integers(min_value=0, max_value=CELL_MAX)
times = st.integers(min_value=0, max_value=TIME_MAX)
sequences = st.integers(min_value=0, max_value=SEQUENCE_MAX)


@given(cells, times, sequences)
def test_encode_decode_round_trip(cell: int, time_s: int, sequence: int) -> None:
    order_id = encode_order_id(cell, time_s, sequence)
    assert 0 < order_id <= ORDER_ID_MAX  # 63 bits: a positive signed BIGINT
    parts = decode_order_id(order_id)
    assert (parts.version, parts.cell, parts.time_s, parts.sequence) == (1, cell, time_s, sequence)
    assert parse_order_id(str(order_id)) == order_id


@given(cells, times, sequences, cells, times, sequences)
def test_distinct_parts_give_distinct_ids(c1, t1, s1, c2, t2, s2) -> None:  # type: ignore[no-untyped-def]
    if (c1, t1, s1) != (c2, t2, s2):
        assert encode_order_id(c1, t1, s1) != encode_order_id(c2, t2, s2)


def test_decoding_gives_creation_time_without_lookup() -> None:
    now = time.time()
    parts = decode_order_id(encode_order_id(3, unix_to_id_time(now), 0))
    assert parts.cell == 3
    assert abs(parts.unix_s - now) < 1.01
    assert decode_order_id(encode_order_id(3, 0, 0)).unix_s == EPOCH_UNIX_S


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5", "9" * 20, "0", str(2**63)])
def test_parse_refuses_what_is_not_an_order_id(text: str) -> None:
    with pytest.raises(ValueError):
        parse_order_id(text)


def test_unknown_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        decode_order_id(encode_order_id(1, 1, 1, version=2))
