"""Order-ID sequences, allocated per cell in segments from the cell's own storage (Leaf's
segment mode, docs/architecture.md).

The cell's `id_sequences` row holds `(time_s, next_sequence)`: the second the cell is issuing
in and the next free sequence number of that second. Allocating a segment is a fenced write
transaction on that row:

    t = max(clock, row.time_s)                # the row's time never goes backwards
    if t == row.time_s: start = row.next_sequence, else start = 0
    if the second is used up: t = row.time_s + 1 (borrow a second from the future), start = 0
    row := (t, start + n); the segment is (t, [start, start + n))

Every (time, sequence) pair is therefore handed out once, whatever the clocks of the
processes do: concurrent allocators are serialised by the write transaction, a restart
continues from the stored row, and a clock that goes backwards only makes IDs carry the
stored time (Leaf#216 shows what goes wrong when the clock is trusted across restarts).
Borrowing from the future is bounded by `ahead_s_max`; past it allocation refuses with
`clock_behind` instead of waiting without limit.

A segment is used for at most `age_s_max` seconds so that the time an ID carries stays
within that of its real creation time (cold/hot separation reads it).

A segment belongs to one stint of ownership. When a switchover moves the cell away, the
rest of the segment must never be used: the new owner continues from the replicated row,
and if the cell comes back the row has moved past it (docs/architecture.md). The
region calls `drop_segment(version)` when it installs a rule that changes the cell's
owner or ban, and a segment allocated under an older epoch is never handed out again,
even one whose allocation was still in flight when the rule changed.

A failover cannot continue from the lost owner's row: the promoted copy may not have its
last allocations. The failover's promotion record (topology/rule.py) carries `id_time_s`,
a second beyond any the lost owner can have used (its lease had ended, its clock is within
`clock_offset_ms_max` of the control plane's, and it borrows at most `ahead_s_max` seconds
from the future); the new owner allocates no earlier than that second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from unitrade.errors import ClockBehind, WriteBanned
from unitrade.storage.schema import id_sequences
from unitrade.storage.store import CellStore, WriteTx
from unitrade.topology.order_id import SEQUENCE_MAX, encode_order_id, unix_to_id_time

SEGMENT_SIZE_DEFAULT = 256
SEGMENT_AGE_S_MAX = 2.0
AHEAD_S_MAX = 5


@dataclass
class Segment:
    time_s: int
    next_sequence: int
    end_sequence: int  # exclusive
    taken_monotonic: float
    epoch: int = 0  # the rule version its allocation was admitted under

    def exhausted(self) -> bool:
        return self.next_sequence >= self.end_sequence


async def allocate_segment(
    store: CellStore,
    size: int,
    clock: Callable[[], float] = time.time,
    ahead_s_max: int = AHEAD_S_MAX,
) -> Segment:
    assert 1 <= size <= SEQUENCE_MAX + 1
    cell = store.cell.id

    def work(tx: WriteTx) -> tuple[int, int, int, int]:
        row = tx.get(id_sequences, {"cell_id": cell})
        # After a failover the promoted owner's row may be behind the lost owner's: the
        # rule names a second past any the lost owner can have issued IDs in.
        now_s = max(unix_to_id_time(clock()), store.fence.rule.id_time_min_s(cell))
        if row is None:
            time_s, start = now_s, 0
        elif now_s > row.time_s:
            time_s, start = now_s, 0
        else:
            time_s, start = row.time_s, row.next_sequence
        if start > SEQUENCE_MAX:
            time_s, start = time_s + 1, 0
            if time_s > now_s + ahead_s_max:
                raise ClockBehind(
                    f"cell {cell} has used every order ID up to {ahead_s_max} s ahead of the "
                    "clock; the clock is behind or the cell is overloaded"
                )
        end = min(start + size, SEQUENCE_MAX + 1)
        values = {"time_s": time_s, "next_sequence": end}
        if row is None:
            tx.insert(id_sequences, {"cell_id": cell, **values})
        else:
            tx.update(id_sequences, {"cell_id": cell}, values)
        return time_s, start, end, tx.epoch

    time_s, start, end, epoch = await store.write(work)
    assert start < end
    return Segment(time_s, start, end, time.monotonic(), epoch)


class OrderIdAllocator:
    """Hands out order IDs of one cell from segments; safe for concurrent tasks."""

    def __init__(
        self,
        store: CellStore,
        segment_size: int = SEGMENT_SIZE_DEFAULT,
        clock: Callable[[], float] = time.time,
        segment_age_s_max: float = SEGMENT_AGE_S_MAX,
    ) -> None:
        self.store = store
        self.segment_size = segment_size
        self.clock = clock
        self.segment_age_s_max = segment_age_s_max
        self._segment: Segment | None = None
        self._epoch_min = 0  # segments allocated under an older epoch are void
        self._lock = asyncio.Lock()

    def drop_segment(self, epoch_min: int = 0) -> None:
        """Forget the current segment, and void every segment allocated under an epoch
        below `epoch_min` (the cell changed owner or ban at that rule version)."""
        self._segment = None
        self._epoch_min = max(self._epoch_min, epoch_min)

    async def next_id(self) -> int:
        async with self._lock:
            segment = self._segment
            if (
                segment is None
                or segment.exhausted()
                or segment.epoch < self._epoch_min
                or time.monotonic() - segment.taken_monotonic > self.segment_age_s_max
            ):
                segment = await allocate_segment(self.store, self.segment_size, self.clock)
                if segment.epoch < self._epoch_min:
                    # The rule changed while this allocation was in flight.
                    raise WriteBanned(
                        f"cell {self.store.cell.id} changed owner; retry", cell=self.store.cell.id
                    )
                self._segment = segment
            sequence = segment.next_sequence
            segment.next_sequence += 1
        return encode_order_id(self.store.cell.id, segment.time_s, sequence)
