"""The history: every operation of a run as an invoke line and a completion line (JSON
lines), numbered, in the shape of a Jepsen history (`process`, `type`, `f`, `value`), so that
Elle's set-full and bank models can read it once converted (docs/operations.md)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# type of a completion: ok (done), fail (certainly not done), info (outcome unknown: a 504,
# a timeout or a connection broken after the request was sent).
OK = "ok"
FAIL = "fail"
INFO = "info"
MAX_LINES = 2_000_000  # a bound on a run's history; a longer run stops recording


@dataclass
class Event:
    index: int
    type: str  # invoke | ok | fail | info
    process: int
    f: str  # create | pay | close | refund | read | read-other | inventory | fault
    time_ns: int
    region: str = ""
    value: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        line: dict[str, Any] = {
            "index": self.index,
            "type": self.type,
            "process": self.process,
            "f": self.f,
            "time": self.time_ns,
            "region": self.region,
            "value": self.value,
        }
        if self.status is not None:
            line["status"] = self.status
        if self.error is not None:
            line["error"] = self.error
        return line

    @staticmethod
    def from_json(line: dict[str, Any]) -> Event:
        return Event(
            index=line["index"],
            type=line["type"],
            process=line["process"],
            f=line["f"],
            time_ns=line["time"],
            region=line.get("region", ""),
            value=line.get("value", {}),
            status=line.get("status"),
            error=line.get("error"),
        )


class History:
    """Events in memory (the checkers read them) and in `path` as JSON lines."""

    def __init__(self, path: Path | None = None) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(path, "w") if path is not None else None
        self._start = time.monotonic_ns()

    def now_ns(self) -> int:
        """Nanoseconds since the run began (a monotonic clock: faults and operations share it)."""
        return time.monotonic_ns() - self._start

    def add(
        self,
        type_: str,
        process: int,
        f: str,
        region: str = "",
        value: dict[str, Any] | None = None,
        status: int | None = None,
        error: str | None = None,
        time_ns: int | None = None,
    ) -> Event:
        with self._lock:
            event = Event(
                len(self.events),
                type_,
                process,
                f,
                self.now_ns() if time_ns is None else time_ns,
                region,
                value or {},
                status,
                error,
            )
            if len(self.events) < MAX_LINES:
                self.events.append(event)
                if self._file is not None:
                    self._file.write(json.dumps(event.to_json()) + "\n")
            return event

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def pairs(self) -> list[tuple[Event, Event | None]]:
        """Each invoke with its completion (None if the run ended before it completed)."""
        open_: dict[int, Event] = {}
        found: list[tuple[Event, Event | None]] = []
        slot: dict[int, int] = {}
        for event in self.events:
            if event.type == "invoke":
                open_[event.process] = event
                slot[event.process] = len(found)
                found.append((event, None))
            elif event.process in open_:
                found[slot[event.process]] = (open_.pop(event.process), event)
        return found


def load(path: Path) -> History:
    history = History()
    with open(path) as lines:
        history.events = [Event.from_json(json.loads(line)) for line in lines if line.strip()]
    return history
