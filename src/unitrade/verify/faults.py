"""The nemesis: a fault schedule derived from the seed alone (the same seed gives the same
(time offset, fault, target) list), applied one fault at a time to a LocalCluster's real
processes, each recorded in the history with its start and end."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.verify.attached import Processes
from unitrade.verify.history import FAIL, OK, History
from unitrade.verify.workload import NEMESIS
from unitrade.web.tokens import issue_token

PROCESS_FAULTS = ("kill", "pause", "switch", "failover", "control-kill")
NETWORK_FAULTS = ("partition", "slow")
ALL_FAULTS = (*PROCESS_FAULTS, *NETWORK_FAULTS)
NETWORK_MODULE = "unitrade.verify.network"
SLOT_S = 5.0  # one fault per this many seconds of the run
TAIL_S = 3.0  # the end of the run is free of faults
OPERATION_WAIT_S = 45.0
DOWN_WAIT_S = 30.0
HEALTHY_WAIT_S = 60.0
SETTLE_S = 20.0
PRECHECK_RETRY_S = 0.5


class NetworkFaults(Protocol):
    """What the network-fault module provides (regions in namespaces of their own, or a
    TCP proxy between them); the nemesis applies `partition` and `slow` through it."""

    def partition(self, region: str, others: list[str], both_ways: bool) -> None: ...

    def heal(self, region: str) -> None: ...

    def slow(self, region: str, delay_ms: int) -> None: ...

    def restore(self, region: str) -> None: ...

    def cut(self, region: str) -> int: ...


class FaultError(ValueError):
    """A --faults list that cannot be run."""


def parse_faults(text: str) -> list[str]:
    faults = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in faults if f not in ALL_FAULTS]
    if unknown:
        raise FaultError(f"unknown fault {', '.join(unknown)}; known: {', '.join(ALL_FAULTS)}")
    network = [f for f in faults if f in NETWORK_FAULTS]
    if network and importlib.util.find_spec(NETWORK_MODULE) is None:
        raise FaultError(
            f"{', '.join(network)}: network faults are not built here ({NETWORK_MODULE} is "
            f"absent); use {', '.join(PROCESS_FAULTS)}"
        )
    return faults


@dataclass(frozen=True)
class Fault:
    at_s: float  # offset from the start of the workload
    kind: str
    target: str  # a region, `control`, or `CELL>REGION` / `evacuate REGION>REGION`
    hold_s: float  # how long the fault lasts before it is healed

    def to_json(self) -> dict[str, Any]:
        return {"at_s": self.at_s, "kind": self.kind, "target": self.target, "hold_s": self.hold_s}


def schedule(config: TopologyConfig, faults: list[str], seconds: float, seed: int) -> list[Fault]:
    """One fault per slot of SLOT_S seconds, every kind at least once when the run is long
    enough, kinds and targets drawn from the seed only. The last TAIL_S seconds are left
    free so that the faults end before the workload does."""
    if not faults:
        return []
    rng = random.Random(seed)
    slots = max(1, int((seconds - TAIL_S) // SLOT_S))
    kinds = list(faults)
    rng.shuffle(kinds)
    while len(kinds) < slots:
        kinds.append(rng.choice(faults))
    kinds = kinds[:slots]
    regions = config.region_names
    center = next(c.owner for c in config.cells if c.kind is CellKind.CENTER)
    # The owners as the planned switches leave them, so that each switch moves a cell to
    # a region that does not own it; the cells of a failed-over region are left alone.
    owners = {c.name: c.owner for c in config.cells if c.kind is CellKind.UNIT}
    plan: list[Fault] = []
    failed_over = False
    for n, kind in enumerate(kinds):
        at = round(n * SLOT_S + rng.uniform(0.5, 2.0), 2)
        if kind == "switch":
            owning = sorted({o for o in owners.values()})
            if owning and rng.random() < 0.25:
                source = rng.choice(owning)
                to = rng.choice([r for r in regions if r != source])
                target = f"evacuate {source}>{to}"
                owners = {c: to if o == source else o for c, o in owners.items()}
            elif owners:
                cell = rng.choice(sorted(owners))
                to = rng.choice([r for r in regions if r != owners[cell]])
                target = f"{cell}>{to}"
                owners[cell] = to
            else:
                kind, target = "kill", rng.choice(regions)
        elif kind == "control-kill":
            target = "control"
        elif kind == "failover":
            if failed_over:  # one failover per run: its reconcile ends the run
                kind = "kill"
                target = rng.choice(regions)
            else:
                target = rng.choice([r for r in regions if r != center])
                owners = {c: o for c, o in owners.items() if o != target}
                failed_over = True
        elif kind == "partition":
            # REGION|both (cut from every other region both ways) or REGION|one-way
            # (what it sends is dropped, what it receives is not).
            target = f"{rng.choice(regions)}|{rng.choice(['both', 'one-way'])}"
        elif kind == "slow":
            target = f"{rng.choice(regions)}|{rng.randrange(20, 201)}ms"
        else:
            target = rng.choice(regions)
        plan.append(Fault(at, kind, target, round(rng.uniform(1.0, 3.0), 2)))
    return plan


@dataclass
class Applied:
    fault: Fault
    start_s: float
    end_s: float | None = None
    outcome: str = "running"
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.fault.to_json(),
            "start_s": round(self.start_s, 3),
            "end_s": None if self.end_s is None else round(self.end_s, 3),
            "outcome": self.outcome,
            "detail": self.detail,
        }


class Nemesis:
    """Applies a schedule on a thread of its own; stop() ends it between faults."""

    def __init__(
        self,
        cluster: Processes,
        history: History,
        plan: list[Fault],
        network: NetworkFaults | None = None,
    ) -> None:
        self.cluster = cluster
        self.network = network
        self.config = cluster.config
        self.history = history
        self.plan = plan
        self.applied: list[Applied] = []
        self.failed_over: list[str] = []  # regions failed over: reconcile them at the end
        self.paused: dict[str, int] = {}  # name -> pid, stopped by SIGSTOP
        self._stop = threading.Event()
        token = issue_token(self.config.token_keys, admin=True)
        self.http = httpx.Client(
            base_url=self.config.control.base_url,
            timeout=OPERATION_WAIT_S + 15,
            headers={"authorization": f"Bearer {token}"},
        )

    def run(self, started: float) -> None:
        for fault in self.plan:
            wait = started + fault.at_s - time.monotonic()
            if self._stop.wait(max(0.0, wait)):
                return
            self._apply(fault, started)

    def stop(self) -> None:
        self._stop.set()

    def _apply(self, fault: Fault, started: float) -> None:
        applied = Applied(fault, time.monotonic() - started)
        self.applied.append(applied)
        value = fault.to_json()
        self.history.add("invoke", NEMESIS, "fault", fault.target, value)
        try:
            getattr(self, "_" + fault.kind.replace("-", "_"))(fault, applied)
            applied.outcome = applied.outcome if applied.outcome != "running" else "done"
        except Exception as exc:  # a fault that could not be applied is reported, not fatal
            applied.outcome = f"error: {type(exc).__name__}: {exc}"
        applied.end_s = time.monotonic() - started
        kind = OK if applied.outcome == "done" else FAIL
        self.history.add(kind, NEMESIS, "fault", fault.target, {**value, **applied.to_json()})

    def _hold(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _kill(self, fault: Fault, applied: Applied) -> None:
        self.cluster.kill_region(fault.target)
        self._hold(fault.hold_s)
        self.cluster.start_region(fault.target)
        self.cluster.wait_healthy([fault.target], HEALTHY_WAIT_S)

    def _control_kill(self, fault: Fault, applied: Applied) -> None:
        name = self.cluster.control_names()[0]
        self.cluster.kill_region(name)
        self._hold(fault.hold_s)
        self.cluster.start_region(name)
        self.cluster.wait_healthy([name], HEALTHY_WAIT_S)

    def _pause(self, fault: Fault, applied: Applied) -> None:
        pid = self.cluster.pid(fault.target)
        if pid is None:
            raise FaultError(f"pause: {fault.target} is not running")
        os.kill(pid, signal.SIGSTOP)
        self.paused[fault.target] = pid
        try:
            self._hold(fault.hold_s)
        finally:
            os.kill(pid, signal.SIGCONT)
            self.paused.pop(fault.target, None)

    def resume_all(self) -> None:
        for pid in list(self.paused.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused.clear()

    def _partition(self, fault: Fault, applied: Applied) -> None:
        if self.network is None:
            raise FaultError("partition: no network faults in this run")
        region, how = fault.target.split("|")
        others = [r for r in self.config.region_names if r != region]
        self.network.partition(region, others, how == "both")
        try:
            self._hold(fault.hold_s)
        finally:
            self.network.heal(region)

    def _slow(self, fault: Fault, applied: Applied) -> None:
        if self.network is None:
            raise FaultError("slow: no network faults in this run")
        region, delay = fault.target.split("|")
        self.network.slow(region, int(delay.removesuffix("ms")))
        try:
            # A lossy link as well as a slow one: halfway through, every connection the
            # region is an end of is reset (requests in flight then have unknown outcomes).
            self._hold(fault.hold_s / 2)
            applied.detail["connections_cut"] = self.network.cut(region)
            self._hold(fault.hold_s / 2)
        finally:
            self.network.restore(region)

    def _operation(self, answer: httpx.Response, applied: Applied) -> None:
        if answer.status_code != 202:
            applied.outcome = f"refused: {answer.status_code} {answer.text[:200]}"
            return
        op_id = answer.json()["id"]
        applied.detail["operation"] = op_id
        op = self.http.get(f"/v1/operations/{op_id}", params={"wait_s": OPERATION_WAIT_S}).json()
        applied.detail["state"] = op.get("state")
        log = op.get("log", [])
        applied.detail["log"] = log[-20:]
        for entry in log:
            if entry.get("step") == "expire" and entry.get("event") == "done":
                applied.detail["lease_ended_ms"] = entry["at_ms"]
        if op.get("state") != "done":
            applied.outcome = f"operation {op_id} {op.get('state')}"

    def _settled(self) -> None:
        """Until every region watches the control plane and acknowledges its rule (a
        region just started again would have a switch or failover refused), at most
        SETTLE_S: then the operation is tried anyway and its refusal reported."""
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                body = self.http.get("/v1/regions").json()
                if all(
                    r["connected"] and r["version"] == body["rule_version"] for r in body["regions"]
                ):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.1)

    def _switch(self, fault: Fault, applied: Applied) -> None:
        self._settled()
        what, to = fault.target.rsplit(">", 1)
        body: dict[str, Any]
        if what.startswith("evacuate "):
            path, body = "/v1/evacuate", {"region": what.removeprefix("evacuate "), "to": to}
        else:
            path, body = "/v1/switch", {"cells": [what], "to": to}
        self._operation(self._post_until_prechecked(path, body, applied), applied)

    def _post_until_prechecked(
        self, path: str, body: dict[str, Any], applied: Applied
    ) -> httpx.Response:
        """Start a switch or evacuation; one its precheck refuses (nothing was published:
        a target just started again still reports the lag of the backlog it caught up on)
        is asked again, as an operator would, at most until SETTLE_S (the report counts
        the refusals in `prechecks_refused`)."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            answer = self.http.post(path, json=body)
            refused = answer.status_code == 409 and "switch_refused" in answer.text
            if not refused or time.monotonic() > deadline or self._stop.is_set():
                return answer
            applied.detail["prechecks_refused"] = applied.detail.get("prechecks_refused", 0) + 1
            time.sleep(PRECHECK_RETRY_S)

    def _failover(self, fault: Fault, applied: Applied) -> None:
        self._settled()
        region = fault.target
        self.cluster.kill_region(region)
        deadline = time.monotonic() + DOWN_WAIT_S
        while True:
            health = self.http.get("/healthz").json().get("health", {})
            if health.get("regions", {}).get(region, {}).get("state") == "down":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{region} never marked down")
            time.sleep(0.1)
        self._operation(self.http.post("/v1/failover", json={"region": region}), applied)
        self.failed_over.append(region)
        self._hold(fault.hold_s)
        self.cluster.start_region(region)
        self.cluster.wait_healthy([region], HEALTHY_WAIT_S)

    def close(self) -> None:
        self.http.close()
