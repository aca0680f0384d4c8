"""Supervision of a local cluster's processes: the restart policy, what is known of each
process, and the files through which `unitrade stop` / `unitrade start` reach the
`unitrade up` running on a data directory.

The files, all under the data directory:

- `supervisor.json`: written by the supervising process (atomically, at least every
  HEARTBEAT_S): its pid, the configuration file, and each process with its pid and state.
  A reader trusts it only while that pid is alive and the heartbeat is fresh.
- `supervisor/down/NAME`: NAME is held down by the operator; the file holds the signal
  to stop it with (`term` or `kill`). The supervisor stops NAME when the file appears and
  never starts it again while it is there.
- `supervisor/start/NAME`: a one-shot request to start NAME (held down or given up); the
  supervisor removes it, with `down/NAME`, when it acts on it.

Files are the channel because they need no port and no protocol, survive nothing they
should not (a new supervisor clears what it did not write) and can be read with `ls`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from unitrade.topology.config import CONTROL_NAME

STATE_FILE = "supervisor.json"
HEARTBEAT_S = 1.0
# A state file older than this is from a supervisor that is gone or hung.
STALE_S = 5.0
KILL = "kill"
TERM = "term"


@dataclass(frozen=True)
class RestartPolicy:
    """How a process that exits is started again: after backoff_s, doubling with each exit
    in a row that came less than stable_s after its start, up to backoff_max_s (a crash
    after a stable run waits backoff_s again: the control plane must be back well within
    the regions' write lease); after restarts_max restarts within window_s the next exit
    leaves it down."""

    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    restarts_max: int = 5
    window_s: float = 60.0
    stable_s: float = 10.0
    poll_s: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.backoff_s <= self.backoff_max_s and self.restarts_max >= 0):
            raise ValueError(f"bad restart policy {self}")
        if not (0 < self.poll_s <= 1.0 and self.window_s > 0):
            raise ValueError(f"bad restart policy {self}")

    def delay_s(self, quick_exits: int) -> float:
        """The backoff after the quick_exits-th exit in a row (0: the first, which is
        restarted at once: a single crash of the control plane must cost the regions'
        leases nothing, and a process that keeps dying backs off from the second exit)."""
        if quick_exits == 0:
            return 0.0
        return float(min(self.backoff_max_s, self.backoff_s * 2 ** min(quick_exits - 1, 30)))


class State(StrEnum):
    RUNNING = "running"
    RESTARTING = "restarting"  # exited; started again when its backoff is over
    STOPPING = "stopping"  # the operator asked it to stop; not exited yet
    HELD = "stopped by operator"  # down, and kept down until started
    FAILED = "failed"  # exited more often than the policy allows: left down


@dataclass
class Watch:
    """What supervision knows of one process."""

    state: State = State.RUNNING
    exit_code: int | None = None
    restarts: int = 0  # restarts by the supervisor since the operator last started it
    recent: deque[float] = field(default_factory=deque)  # monotonic times, within window_s
    restart_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    quick_exits: int = 0  # exits in a row, each less than stable_s after its start
    stop_deadline: float = 0.0  # STOPPING: SIGKILL when still running after this
    since: float = field(default_factory=time.time)  # wall time of the last state change

    def set(self, state: State) -> None:
        self.state = state
        self.since = time.time()

    def reset(self) -> None:
        """Started by the operator (or the cluster): a fresh restart budget."""
        self.set(State.RUNNING)
        self.restarts = 0
        self.recent.clear()
        self.quick_exits = 0
        self.started_at = time.monotonic()

    def exited(self, code: int | None, now: float, policy: RestartPolicy) -> float | None:
        """Note an exit nobody asked for: the delay before it is started again, or None when
        the restarts allowed within the window are used up (the process stays down)."""
        while self.recent and now - self.recent[0] > policy.window_s:
            self.recent.popleft()
        self.exit_code = code
        if len(self.recent) >= policy.restarts_max:
            self.set(State.FAILED)
            return None
        if now - self.started_at >= policy.stable_s:
            self.quick_exits = 0
        delay = policy.delay_s(self.quick_exits)
        self.quick_exits += 1
        self.set(State.RESTARTING)
        self.restart_at = now + delay
        return delay

    def restarted(self, now: float) -> None:
        self.recent.append(now)
        self.restarts += 1
        self.started_at = now
        self.set(State.RUNNING)


def label(name: str) -> str:
    """How logs and the CLI name a supervised process."""
    return "the control plane" if name == CONTROL_NAME else f"region {name}"


def option(name: str) -> str:
    """The options of `unitrade stop` / `start` that name a supervised process."""
    return "--control" if name == CONTROL_NAME else f"--region {name}"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "did not start"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"killed by signal {-code}"
        # uvicorn ends a graceful shutdown by raising the signal it got again.
        return f"exited on {name}" if name in ("SIGTERM", "SIGINT") else f"killed by {name}"
    return f"exit code {code}"


class SupervisorFiles:
    """The state file and the request files of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.state_path = data_dir / STATE_FILE
        self.down_dir = data_dir / "supervisor" / "down"
        self.start_dir = data_dir / "supervisor" / "start"
        self.log_path = data_dir / "logs" / "supervisor.log"

    # -- written by the supervisor -------------------------------------------------------

    def write_state(self, document: dict[str, Any]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}")
        temporary.write_text(json.dumps(document, indent=1))
        os.replace(temporary, self.state_path)  # readers never see half a file

    def remove_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    def reset_requests(self, held: dict[str, str]) -> None:
        """Make the request files say what this supervisor holds, and no more: stale files
        from an earlier run must not stop anything."""
        for directory in (self.down_dir, self.start_dir):
            directory.mkdir(parents=True, exist_ok=True)
            for path in directory.iterdir():
                path.unlink(missing_ok=True)
        for name, how in held.items():
            self.hold(name, how)

    def held(self) -> dict[str, str]:
        """NAME -> `term` or `kill` for every process the operator holds down."""
        found = {}
        for path in _listing(self.down_dir):
            with contextlib.suppress(OSError):
                found[path.name] = KILL if path.read_text().strip() == KILL else TERM
        return found

    def take_start_requests(self) -> list[str]:
        names = []
        for path in _listing(self.start_dir):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                names.append(path.name)
        return names

    # -- written by either ---------------------------------------------------------------

    def hold(self, name: str, how: str) -> None:
        self.down_dir.mkdir(parents=True, exist_ok=True)
        (self.down_dir / name).write_text(how + "\n")

    def release(self, name: str) -> None:
        (self.down_dir / name).unlink(missing_ok=True)

    # -- written by `unitrade start` -----------------------------------------------------

    def request_start(self, name: str) -> None:
        self.start_dir.mkdir(parents=True, exist_ok=True)
        (self.start_dir / name).write_text("start\n")

    def start_pending(self, name: str) -> bool:
        return (self.start_dir / name).exists()

    # -- read by the CLI -----------------------------------------------------------------

    def read_state(self) -> dict[str, Any] | None:
        try:
            document = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def live_state(self) -> tuple[dict[str, Any] | None, str]:
        """The state file when its supervisor is alive, else None and why not."""
        document = self.read_state()
        if document is None:
            return None, f"no {self.state_path}"
        pid = document.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return None, f"{self.state_path} names pid {pid}, which is not running"
        age = time.time() - float(document.get("heartbeat", 0))
        if age > STALE_S:
            return None, f"{self.state_path} was last written {age:.0f} s ago"
        return document, ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _listing(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []


def policy_document(policy: RestartPolicy) -> dict[str, Any]:
    return asdict(policy)
