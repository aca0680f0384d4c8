"""A cluster `unitrade verify --attach` did not start: one already running, reached through
its topology file and, for the process faults, the `unitrade up` that supervises it.

The nemesis needs the same few things of either kind of cluster (`Processes`): kill a
region or the control plane and keep it down, start it again, its pid (to pause it), and
whether it runs. verify's own cluster is a LocalCluster; here they go through the
supervisor's request files (supervisor.py), exactly as `unitrade stop --kill` and `unitrade
start` do, so the supervisor never races the nemesis by restarting what it killed.
Without a supervised data directory only the faults that go through the control plane
(switch) can be applied: verify refuses the others before anything starts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import httpx

from unitrade.supervisor import State, SupervisorFiles
from unitrade.supervisor_cli import DrillError, NoSupervisor, bring_up, hold_down
from unitrade.topology.config import CONTROL_NAME, TopologyConfig

STOP_WAIT_S = 30.0
START_WAIT_S = 60.0
# The faults an attached cluster can take without a supervisor: through the control plane.
CONTROL_PLANE_FAULTS = ("switch",)


class Processes(Protocol):
    """What the nemesis and the quiescence wait need of a cluster's processes."""

    config: TopologyConfig

    def control_names(self) -> list[str]: ...

    def kill_region(self, region: str) -> None: ...

    def start_region(self, region: str) -> None: ...

    def wait_healthy(self, regions: list[str] | None = None, timeout_s: float = ...) -> None: ...

    def running(self, name: str) -> bool: ...

    def pid(self, name: str) -> int | None: ...


class AttachError(RuntimeError):
    """An attached cluster that cannot take what was asked of it."""


def attach_problems(config: TopologyConfig, data_dir: Path | None, faults: list[str]) -> str:
    """Why verify cannot attach to this cluster with these faults, or "" if it can."""
    network = [f for f in faults if f in ("partition", "slow")]
    if network:
        return (
            f"{', '.join(network)}: network faults need the servers behind a network of the "
            "run's own; with --attach use kill, pause, switch, failover, control-kill"
        )
    process = [f for f in faults if f not in CONTROL_PLANE_FAULTS]
    if not process:
        return ""
    if data_dir is None:
        return (
            f"{', '.join(process)}: these faults stop and start processes, which needs the "
            "`unitrade up` supervising the cluster: give its --data (or only --faults switch)"
        )
    document, why = SupervisorFiles(data_dir).live_state()
    if document is None:
        return f"no `unitrade up` supervises {data_dir} ({why})"
    known = set(document.get("processes", {}))
    wanted = {*config.region_names, *control_names(config)}
    if not wanted <= known:
        missing = ", ".join(sorted(wanted - known))
        return f"the `unitrade up` on {data_dir} does not run {missing} of this topology"
    return ""


def control_names(config: TopologyConfig) -> list[str]:
    if not config.control.members:
        return [CONTROL_NAME]
    return [f"{CONTROL_NAME}-{m.name}" for m in config.control.members]


class AttachedCluster:
    """Processes of a running cluster: those of the `unitrade up` on data_dir, if any."""

    def __init__(self, config: TopologyConfig, data_dir: Path | None) -> None:
        self.config = config
        self.files = SupervisorFiles(data_dir) if data_dir is not None else None
        self.held: set[str] = set()  # what this run holds down: started again at the end

    def control_names(self) -> list[str]:
        return control_names(self.config)

    def _supervised(self) -> SupervisorFiles:
        if self.files is None:
            raise AttachError("no supervised data directory: process faults cannot be applied")
        return self.files

    def kill_region(self, region: str) -> None:
        """kill -9 by the supervisor, which keeps it down until start_region."""
        files = self._supervised()
        self.held.add(region)
        try:
            hold_down(files, region, kill=True, timeout_s=STOP_WAIT_S)
        except (DrillError, NoSupervisor) as exc:
            raise AttachError(exc.message) from exc

    def start_region(self, region: str) -> None:
        files = self._supervised()
        try:
            bring_up(files, region, timeout_s=START_WAIT_S)
        except (DrillError, NoSupervisor) as exc:
            raise AttachError(exc.message) from exc
        self.held.discard(region)

    def _entry(self, name: str) -> dict[str, object]:
        if self.files is None:
            return {}
        document, _why = self.files.live_state()
        entry = (document or {}).get("processes", {}).get(name)
        return entry if isinstance(entry, dict) else {}

    def running(self, name: str) -> bool:
        if self.files is None:
            return True  # not ours to know: the quiescence wait asks /healthz
        return self._entry(name).get("state") == State.RUNNING

    def pid(self, name: str) -> int | None:
        pid = self._entry(name).get("pid")
        return pid if isinstance(pid, int) else None

    def base_url(self, name: str) -> str:
        if name in self.control_names():
            member = (
                self.config.control.member_list[0]
                if name == CONTROL_NAME
                else self.config.control.member(name.removeprefix(f"{CONTROL_NAME}-"))
            )
            return member.base_url
        return self.config.region(name).base_url

    def wait_healthy(self, regions: list[str] | None = None, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(regions or [*self.control_names(), *self.config.region_names])
        with httpx.Client(timeout=2.0, verify=self.config.http_verify) as client:
            while pending:
                try:
                    if client.get(self.base_url(pending[0]) + "/healthz").status_code == 200:
                        pending.pop(0)
                        continue
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AttachError(f"{pending[0]} not healthy after {timeout_s:.0f} s")
                time.sleep(0.1)

    def release(self) -> None:
        """Start again whatever this run still holds down (a run cut short)."""
        for name in sorted(self.held):
            try:
                self.start_region(name)
            except AttachError:
                pass  # reported by the quiescence wait, which finds it down
