"""The control plane's operations: one switchover (or evacuation) at a time, started by the
API, resumed after a restart, abortable until its point of no return."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from pydantic import ValidationError

from unitrade.control.board import RuleBoard
from unitrade.control.failover import Failover
from unitrade.control.failover import precheck as failover_precheck
from unitrade.control.health import HealthChecker
from unitrade.control.lease import ControlPlaneLeases, LeaseAuthority
from unitrade.control.store import ControlStore, Operation
from unitrade.control.switchover import FORWARD_ONLY, Control, Switchover, precheck
from unitrade.errors import (
    Conflict,
    FailoverRefused,
    InvalidRequest,
    NotFound,
    OperationRunning,
    PastPointOfNoReturn,
    SwitchRefused,
)
from unitrade.rpc.client import RegionClient
from unitrade.storage.store import now_ms
from unitrade.topology.config import CONTROL_NAME, TopologyConfig
from unitrade.topology.flow_rules import FlowRules
from unitrade.topology.rule import Rule, initial_rule

log = logging.getLogger("unitrade.control")
OPERATION_BATCHES_PER_SWEEP_MAX = 100


class ControlPlane:
    def __init__(
        self, config: TopologyConfig, store: ControlStore, leases: LeaseAuthority | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.board: RuleBoard | None = None
        # The embedded authority unless another is given (etcd: control/etcd_lease.py).
        self.leases: LeaseAuthority = leases or ControlPlaneLeases(
            config.control, config.region_names, store
        )
        self.client = RegionClient(config, CONTROL_NAME)
        self.running: Switchover | Failover | None = None
        self.last_failover: float | None = None  # monotonic: automatic ones keep a distance
        self._task: asyncio.Task[None] | None = None
        self._slot = asyncio.Lock()  # taken while an operation is prechecked or started
        self._sweeper: asyncio.Task[None] | None = None
        self.operations_kept = 0  # at the last retention sweep
        self.operations_deleted = 0  # since the control plane started
        self.health = HealthChecker(config, lambda: self.ctx.board.rule)  # probes (health.py)
        # A region the checker finds down is failed over when `auto_failover` is on.
        self.health.on_region_down = self.region_down

    @property
    def ctx(self) -> Control:
        assert self.board is not None, "start() first"
        return Control(self.config, self.store, self.board, self.client)

    async def start(self) -> None:
        rule = await self.store.open(self.config, initial_rule(self.config))
        await self.leases.start()
        self.board = RuleBoard(self.store, rule, self.config.region_names)
        log.info("control plane started at rule version %s", rule.version)
        self.health.start()
        unfinished = await self.store.operations(10, state="running")
        if unfinished:
            # At most one runs at a time, so at most one was cut off. It needs the regions'
            # acknowledgements, which arrive once the API serves again: run it in the
            # background.
            op = unfinished[0]
            log.warning("%s: resuming after a restart (step %s)", op.id, op.step)
            self._launch(op, resumed=True)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="retention")

    async def sweep(self) -> int:
        """Delete finished operations past `[retention]` operations_kept and operations_s;
        the number deleted."""
        settings = self.config.retention
        before_ms = now_ms() - settings.operations_s * 1000
        deleted = 0
        for _ in range(OPERATION_BATCHES_PER_SWEEP_MAX):
            batch = await self.store.sweep_operations(
                settings.operations_kept, before_ms, settings.sweep_batch_rows
            )
            deleted += batch
            if batch < settings.sweep_batch_rows:
                break
        self.operations_deleted += deleted
        self.operations_kept = await self.store.count_operations()
        return deleted

    async def _sweep_forever(self) -> None:
        while True:
            try:
                if await self.sweep():
                    log.info("retention: %s operations kept", self.operations_kept)
            except Exception:
                log.exception("retention sweep of operations failed")
            await asyncio.sleep(self.config.retention.sweep_interval_s)

    async def stop(self) -> None:
        await self.health.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()
        await self.store.close()

    def _launch(self, op: Operation, resumed: bool = False) -> None:
        runner: Switchover | Failover
        if op.kind == "failover":
            runner = Failover(self.ctx, op, self.leases, self.health)
        else:
            runner = Switchover(self.ctx, op)
        self.running = runner

        async def run() -> None:
            try:
                await runner.run(resumed)
            finally:
                if self.running is runner:
                    self.running = None

        self._task = asyncio.create_task(run(), name=op.id)

    async def failover(
        self, region: str, targets: list[str], force: bool = False, started_by: str = "operator"
    ) -> Operation:
        """Pre-check and start the failover of `region`; FailoverRefused (nothing changed)
        when it must not or cannot run (control/failover.py)."""
        if self._slot.locked() or self.running is not None:
            raise OperationRunning(
                "another operation is running: "
                + (self.running.op.id if self.running is not None else "a pre-check")
            )
        async with self._slot:
            started = time.monotonic()
            figures = await failover_precheck(self.ctx, self.health, region, targets, force)
            rule = self.ctx.board.rule
            cells = rule.cells_owned_by(region)
            op = await self.store.create_operation(
                "failover",
                cells,
                dict.fromkeys(cells, region),
                ",".join(figures["candidates"]),
            )
            took_ms = int((time.monotonic() - started) * 1000)
            await self.store.record(op, "precheck", "begin", {"started_by": started_by})
            await self.store.record(op, "precheck", "done", {**figures, "precheck_ms": took_ms})
            if figures["forced"]:
                log.warning("%s: failover of %s FORCED by the operator", op.id, region)
            self.last_failover = time.monotonic()
            self._launch(op)
        return op

    async def switch(self, cells: list[int], target: str, kind: str = "switch") -> Operation:
        """Pre-check and start a switch; SwitchRefused (nothing banned) when it cannot run."""
        if self._slot.locked() or self.running is not None:
            raise OperationRunning(
                "another operation is running: "
                + (self.running.op.id if self.running is not None else "a pre-check")
            )
        async with self._slot:
            rule = self.ctx.board.rule
            sources = {c: rule.owners[c] for c in cells if c in rule.owners}
            op = await self.store.create_operation(kind, cells, sources, target)
            await self.store.record(op, "precheck", "begin")
            started = time.monotonic()
            try:
                figures = await precheck(self.ctx, cells, target)
            except SwitchRefused as exc:
                await self.store.record(
                    op,
                    "precheck",
                    "error",
                    {"reason": exc.message},
                    state="refused",
                    error=exc.message,
                )
                raise SwitchRefused(exc.message, operation=op.id) from exc
            took_ms = int((time.monotonic() - started) * 1000)
            await self.store.record(
                op, "precheck", "done", {"precheck": figures, "precheck_ms": took_ms}
            )
            self._launch(op)
        return op

    async def change_flow(
        self, change: Callable[[FlowRules, int], FlowRules], reason: str
    ) -> tuple[Rule, list[str]]:
        """Publish the rule with its flow rules changed by `change(flow, version)` (limits,
        switches, overload, breakers): the next rule version, pushed to every region like
        an owner change. The rule, and the connected regions that did not acknowledge it
        within ack_timeout_ms (empty: all did). An unchanged flow publishes nothing.

        It keeps the one-operation-at-a-time discipline: refused (operation_running) while
        a switch or failover runs, which publish rules of their own between steps (a
        failover's lease block names the version its ban is about to take). Only the
        publish holds the slot, not the wait for acknowledgements, so that a change never
        keeps an automatic failover waiting."""
        if self._slot.locked() or self.running is not None:
            raise OperationRunning(
                "a flow change waits for the running operation: "
                + (self.running.op.id if self.running is not None else "a pre-check")
            )
        board = self.ctx.board
        async with self._slot:
            ahead = board.ahead()
            if ahead:
                raise Conflict(
                    f"the control store is behind: regions hold newer rules {ahead} than its "
                    f"version {board.rule.version}; restore the control store first"
                )
            rule = board.rule
            version = rule.version + 1
            try:
                flow = change(rule.flow, version)
            except ValidationError as exc:
                raise InvalidRequest(
                    "; ".join(
                        f"{'.'.join(str(p) for p in e['loc']) or 'flow'}: "
                        + str(e["msg"]).removeprefix("Value error, ")
                        for e in exc.errors()
                    )
                ) from None
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            if flow.model_copy(update={"version": rule.flow.version}) == rule.flow:
                return rule, []
            published = await board.publish(rule.derive(version, flow=flow), reason[:200], None)
        log.info("flow rules changed at rule version %s: %s", published.version, reason)
        missing = await board.wait_acks(
            published.version, board.connected(), self.config.control.ack_timeout_ms / 1000
        )
        return published, missing

    async def region_down(self, region: str) -> None:
        """The health checker's call when a region turns down: with `[control]
        auto_failover` on, fail it over, at most once per `failover_interval_s` (the
        anti-flapping bound; a refused or skipped one is logged, never retried in a loop:
        the checker calls again only when the region comes up and goes down again)."""
        settings = self.config.control
        if not settings.auto_failover:
            log.warning("region %s is down; automatic failover is off", region)
            return
        if self.board is None or not self.board.rule.cells_owned_by(region):
            return
        since = None if self.last_failover is None else time.monotonic() - self.last_failover
        if since is not None and since < settings.failover_interval_s:
            log.error(
                "region %s is down; no automatic failover: the last one was %.0f s ago "
                "(failover_interval_s %d); run `unitrade failover --region %s`",
                region,
                since,
                settings.failover_interval_s,
                region,
            )
            return
        try:
            op = await self.failover(region, [], force=False, started_by="health checker")
        except (FailoverRefused, OperationRunning) as exc:
            log.error("automatic failover of %s refused: %s", region, exc.message)
            return
        log.warning("%s: automatic failover of %s started", op.id, region)

    async def abort(self, operation_id: str) -> Operation:
        op = await self.store.operation(operation_id)
        if op is None:
            raise NotFound(f"no operation {operation_id}")
        running = self.running
        if op.state != "running" or running is None or running.op.id != op.id:
            raise PastPointOfNoReturn(f"operation {op.id} is {op.state}; nothing to abort")
        if isinstance(running, Failover):
            raise PastPointOfNoReturn(
                f"operation {op.id} is a failover: it only goes forward (its region is blocked "
                "from leases); a planned switch moves the cells back afterwards"
            )
        if running.op.step in FORWARD_ONLY or running.op.step == "done":
            raise PastPointOfNoReturn(
                f"operation {op.id} has published the new owner (step {running.op.step}); "
                "it finishes, and a switch back undoes it"
            )
        await self.store.request_abort(op.id)
        running.op.abort_requested = True
        running.abort_reason = "aborted by the operator"
        running.abort.set()
        return running.op

    async def wait(self, operation_id: str, timeout_s: float) -> Operation | None:
        """The operation once it is no longer running, or as it is after `timeout_s`."""
        running = self.running
        task = self._task
        if running is not None and running.op.id == operation_id and task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        return await self.store.operation(operation_id)
