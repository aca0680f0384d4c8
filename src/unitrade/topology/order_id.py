"""Order IDs (docs/architecture.md): a 63-bit integer `(version, cell, time, sequence)`.

    bit 62..60  version   3 bits   layout version, 1 today
    bit 59..50  cell     10 bits   the unit cell the order lives in (routing needs no lookup)
    bit 49..19  time     31 bits   seconds since 2025-01-01T00:00:00Z (good until 2093)
    bit 18..0   sequence 19 bits   per (cell, second), 524,288 a second

The top bit of the 64-bit word stays 0, so the ID is a positive signed 64-bit integer that
fits a BIGINT column; the API prints it as a decimal string because JSON numbers lose
precision above 2**53.

Uniqueness does not come from the clock. The pair (time, sequence) is handed out in
segments by a row of the cell's own storage (storage/sequences.py): the row's time never
goes backwards and its sequence never repeats within a second, and the row replicates with
the cell, so a new owner continues where the old one stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
VERSION_BITS = 3
CELL_BITS = 10
TIME_BITS = 31
SEQUENCE_BITS = 19
EPOCH_UNIX_S = 1_735_689_600  # 2025-01-01T00:00:00Z

SEQUENCE_SHIFT = 0
TIME_SHIFT = SEQUENCE_BITS
CELL_SHIFT = TIME_SHIFT + TIME_BITS
VERSION_SHIFT = CELL_SHIFT + CELL_BITS
assert VERSION_SHIFT + VERSION_BITS == 63

SEQUENCE_MAX = (1 << SEQUENCE_BITS) - 1
TIME_MAX = (1 << TIME_BITS) - 1
CELL_MAX = (1 << CELL_BITS) - 1
ORDER_ID_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class OrderIdParts:
    version: int
    cell: int
    time_s: int  # seconds since EPOCH_UNIX_S
    sequence: int

    @property
    def unix_s(self) -> int:
        return EPOCH_UNIX_S + self.time_s


def encode_order_id(cell: int, time_s: int, sequence: int, version: int = VERSION) -> int:
    assert 0 <= version < (1 << VERSION_BITS), version
    assert 0 <= cell <= CELL_MAX, cell
    assert 0 <= time_s <= TIME_MAX, time_s
    assert 0 <= sequence <= SEQUENCE_MAX, sequence
    order_id = (
        (version << VERSION_SHIFT)
        | (cell << CELL_SHIFT)
        | (time_s << TIME_SHIFT)
        | (sequence << SEQUENCE_SHIFT)
    )
    assert 0 < order_id <= ORDER_ID_MAX
    return order_id


def decode_order_id(order_id: int) -> OrderIdParts:
    if not 0 < order_id <= ORDER_ID_MAX:
        raise ValueError(f"order ID out of range: {order_id}")
    version = order_id >> VERSION_SHIFT
    if version != VERSION:
        raise ValueError(f"unknown order ID version {version}")
    return OrderIdParts(
        version=version,
        cell=(order_id >> CELL_SHIFT) & CELL_MAX,
        time_s=(order_id >> TIME_SHIFT) & TIME_MAX,
        sequence=order_id & SEQUENCE_MAX,
    )


def parse_order_id(text: str) -> int:
    """A decimal order ID from the API; ValueError names the problem."""
    if not text.isdigit() or len(text) > 19:
        raise ValueError(f"order ID must be a decimal integer, got {text[:40]!r}")
    order_id = int(text)
    decode_order_id(order_id)
    return order_id


def unix_to_id_time(unix_s: float) -> int:
    """Wall-clock seconds to the ID's time field (clamped at the epoch: never negative)."""
    return max(0, int(unix_s) - EPOCH_UNIX_S)
