"""The newest committed changelog rows of a cell its owner wrote, each encoded once.

Every follower pulls the same rows from an owner, a few milliseconds apart. Reading them
back from the database and encoding them again for each follower was most of what a pull
cost the owner (docs/benchmarks.md, Replication), and the owner's CPU is what bounds the
lag under load. The rows are at hand when the write commits, so the owner keeps the newest
ones, encoded as JSON, and serves a pull from here when it asks for nothing older.

The tail holds contiguous positions ending at the copy's position, or nothing: whatever
changes the changelog other than the owner's own writes (a replica's apply, a snapshot, a
repair) clears it, a trim of the changelog drops the rows it deleted, and a pull the tail
cannot answer goes to the database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

TAIL_ROWS_MAX = 4_096  # ~0.6 s of an owner's changes at 1,000 orders/s; up to 1.25x held
TAIL_BYTES_MAX = 8 * 1024 * 1024  # row images can be large: a bound on memory too


def encode_change(row: Mapping[str, Any]) -> bytes:
    return orjson.dumps(row)


def encoded_array(rows: Sequence[bytes]) -> orjson.Fragment:
    """A JSON array of encoded rows, for orjson to put in a reply as it is."""
    return orjson.Fragment(b"[" + b",".join(rows) + b"]")


class ChangelogTail:
    """A list trimmed by a quarter of its bound at a time: slicing the newest rows for a
    pull costs what it returns, and trimming is amortised over the rows added (a deque
    cost a walk over the rows skipped on every pull)."""

    def __init__(self, rows_max: int = TAIL_ROWS_MAX, bytes_max: int = TAIL_BYTES_MAX) -> None:
        assert rows_max >= 1 and bytes_max >= 1
        self.rows_max = rows_max
        self.bytes_max = bytes_max
        self._rows: list[bytes] = []
        self._bytes = 0
        self.first = 0  # position of the oldest row held; 0 when empty

    @property
    def last(self) -> int:
        """Position of the newest row held; 0 when empty."""
        return self.first + len(self._rows) - 1 if self._rows else 0

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rows of one committed transaction, in position order. Rows that do not follow
        the newest held start the tail again: it never holds a gap."""
        if not rows:
            return
        first = int(rows[0]["position"])
        if not self._rows or first != self.last + 1:
            self.clear()
            self.first = first
        encoded = [encode_change(row) for row in rows]
        self._rows.extend(encoded)
        self._bytes += sum(map(len, encoded))
        assert int(rows[-1]["position"]) == self.last, "a transaction's positions are gapless"
        if len(self._rows) > self.rows_max + self.rows_max // 4 or self._bytes > self.bytes_max:
            self._trim()

    def _trim(self) -> None:
        """Keep at most rows_max rows and bytes_max bytes, the newest."""
        drop = max(0, len(self._rows) - self.rows_max)
        dropped = sum(map(len, self._rows[:drop]))
        while drop < len(self._rows) and self._bytes - dropped > self.bytes_max:
            dropped += len(self._rows[drop])
            drop += 1
        del self._rows[:drop]
        self._bytes -= dropped
        self.first = self.first + drop if self._rows else 0

    def drop_through(self, position: int) -> None:
        """Forget the rows at or below `position`: the copy's changelog was trimmed there,
        and a pull must never be served a row the database no longer has."""
        if not self._rows or position < self.first:
            return
        if position >= self.last:
            self.clear()
            return
        drop = position + 1 - self.first
        self._bytes -= sum(map(len, self._rows[:drop]))
        del self._rows[:drop]
        self.first = position + 1

    def clear(self) -> None:
        self._rows.clear()
        self._bytes = 0
        self.first = 0

    def since(self, after: int, limit: int, position: int) -> list[bytes] | None:
        """The encoded rows after `after`, at most `limit`, if the tail holds every one of
        them up to the copy's `position`; None if the database must answer."""
        assert limit >= 1
        if not self._rows or self.last != position or after + 1 < self.first:
            return None
        if after >= position:
            return []
        start = after + 1 - self.first
        return self._rows[start : start + limit]
