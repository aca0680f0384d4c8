"""A local cluster: every region of a configuration as a separate local process.

Used by `unitrade up`, `unitrade demo`, the integration tests and the benchmarks, so that
all of them exercise real processes talking over real sockets. `supervise()` starts a
thread that starts a process again when it exits (supervisor.py has the policy and the
files through which `unitrade stop` / `unitrade start` reach it).

A region of many processes (`workers` > 1) runs as processes named `REGION.K` (K = 0 ..
workers - 1), each supervised on its own, all bound to the region's one address
(serve.py). The region's name stands for all of them: `start_region("hz")`,
`stop_region("hz")`, `kill_region("hz")` act on every worker, `pid("hz")` is worker 0's,
`running("hz")` whether any runs; a worker's name acts on that process alone. `unitrade
serve --region R` uses the same machinery to run and supervise a region's workers on its
own host (`regions_only`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx

from unitrade.supervisor import (
    HEARTBEAT_S,
    KILL,
    TERM,
    RestartPolicy,
    State,
    SupervisorFiles,
    Watch,
    describe_exit,
    label,
    option,
    policy_document,
)
from unitrade.topology.config import CONTROL_NAME, ControlMember, RegionConfig, TopologyConfig

HEALTHY_TIMEOUT_S = 60.0
WORKER_TRIES_MAX = 16  # new connections to find one worker of a region behind its address
STOP_TIMEOUT_S = 15.0

# (message, loud): loud for a process left down.
EventSink = Callable[[str, bool], None]


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class _Spec:
    """How a process was last started: the supervisor starts it again the same way."""

    host: str
    port: int
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


class LocalCluster:
    def __init__(
        self,
        config: TopologyConfig,
        data_dir: Path,
        config_path: Path | None = None,
        launcher: Callable[[str], list[str]] | None = None,
        health_at_listen: bool = False,
    ) -> None:
        self.config = config
        # Check health at each server's `listen` address, not its `advertise`d one: a
        # region's own host (`unitrade serve`), which may not reach its public address.
        self.health_at_listen = health_at_listen
        self.config_path = config_path
        self.data_dir = data_dir
        # A command prefix per process name (the control plane is `control`): e.g. to run
        # each region in a network namespace of its own (unitrade/netns.py).
        self.launcher = launcher
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.watches: dict[str, Watch] = {}
        self.policy = RestartPolicy()
        self.files = SupervisorFiles(data_dir)
        self._logs: dict[str, IO[bytes]] = {}
        self._specs: dict[str, _Spec] = {}
        # Guards processes, watches and specs against the supervising thread; never held
        # while waiting for a process to exit.
        self._lock = threading.RLock()
        self._halt = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._on_event: EventSink | None = None
        self._event_log: IO[str] | None = None
        self._dirty = False  # changed by a call, not by the supervisor: write the state file

    def log_path(self, region: str) -> Path:
        return self.data_dir / "logs" / f"{region}.log"

    # -- the processes of a region -----------------------------------------------------------

    def worker_names(self, region: str) -> list[str]:
        """The processes of a region: its name with one worker, REGION.K with several."""
        workers = self.config.region(region).workers
        return [region] if workers == 1 else [f"{region}.{k}" for k in range(workers)]

    def _process_names(self, name: str) -> list[str]:
        """The processes a name stands for: a region's every worker, else itself."""
        if name in self.config.region_names:
            return self.worker_names(name)
        return [name]

    def _region_of(self, name: str) -> tuple[str, int]:
        """The region and worker number of a region's process name."""
        region, dot, worker = name.rpartition(".")
        if dot and region in self.config.region_names and worker.isdigit():
            return region, int(worker)
        return name, 0

    def start(self, regions: list[str] | None = None) -> None:
        """Start the control plane (unless it runs) and the regions; wait until healthy."""
        names = regions or self.config.region_names
        controls = [n for n in self.control_names() if not self.running(n)]
        for name in controls:
            self.start_control(name=name)
        for name in names:
            if name not in self.control_names():
                self.start_region(name)
        self.wait_healthy([*controls, *names])

    def control_names(self) -> list[str]:
        """The control plane's processes: `control`, or `control-NAME` per member when
        `[[control.members]]` lists several (one of them active, elected through etcd)."""
        if not self.config.control.members:
            return [CONTROL_NAME]
        return [f"{CONTROL_NAME}-{m.name}" for m in self.config.control.members]

    def _listening(self, name: str) -> ControlMember | RegionConfig:
        if name == CONTROL_NAME:
            return self.config.control.member_list[0]
        if name in self.control_names():
            return self.config.control.member(name.removeprefix(f"{CONTROL_NAME}-"))
        return self.config.region(self._region_of(name)[0])

    def ports_in_use(self) -> list[str]:
        """The control plane and regions whose listen address something already answers
        on: checked before starting anything, so that nothing is half started."""
        busy = []
        for name in [*self.control_names(), *self.config.region_names]:
            listen = self._listening(name)
            if not self.running(name) and _port_busy(listen.host, listen.port):
                what = f"region {name}" if name in self.config.region_names else name
                if name == CONTROL_NAME:
                    what = "the control plane"
                busy.append(f"port {listen.port} ({what}, {listen.host}:{listen.port})")
        return busy

    def running(self, name: str) -> bool:
        """Whether the process runs (a region of many: any of its workers)."""
        return any(self._running(n) for n in self._process_names(name))

    def _running(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def base_url(self, name: str) -> str:
        return self._listening(name).base_url

    def _health_url(self, name: str) -> str:
        listen = self._listening(name)
        if not self.health_at_listen:
            return listen.base_url
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(
            listen.host, listen.host
        )
        scheme = "https" if listen.tls_cert else "http"
        return f"{scheme}://{host}:{listen.port}"

    def pid(self, name: str) -> int | None:
        """The pid of a running process of the cluster (a region or the control plane; a
        region of many processes: worker 0's, or its worker's by REGION.K)."""
        process = self.processes.get(self._process_names(name)[0])
        return process.pid if process is not None and process.poll() is None else None

    def start_control(self, env: dict[str, str] | None = None, name: str | None = None) -> None:
        """The control plane (with members: `name`, else every member that is not running);
        `env` adds environment variables (fault injection in tests). Supervision starts it
        again with the same `env`."""
        for process in [name] if name is not None else self.control_names():
            if name is None and self.running(process):
                continue
            self.start_region(process, env)

    def start_region(self, region: str, env: dict[str, str] | None = None) -> None:
        """Start a region (or `control`), releasing an operator's hold on it; `env` adds
        environment variables, kept for the restarts. Does not wait until it is healthy.
        A region of many processes: every worker that is not running (REGION.K: that one)."""
        names = self._process_names(region)
        if len(names) > 1:
            if all(self._running(n) for n in names):
                raise ClusterError(f"{label(region)} is running already")
            for name in names:
                if not self._running(name):
                    self.start_region(name, env)
            return
        if region in self.control_names():
            listen = self._listening(region)
            host, port = listen.host, listen.port
            args: tuple[str, ...] = ("serve-control",)
            if self.config.control.members:
                args += ("--member", region.removeprefix(f"{CONTROL_NAME}-"))
        else:
            name, worker = self._region_of(region)
            config = self.config.region(name)
            host, port = config.host, config.port
            args = ("serve", "--region", name)
            if config.workers > 1:
                args += ("--worker", str(worker), "--workers", str(config.workers))
        spec = _Spec(host, port, args, tuple(sorted((env or {}).items())))
        with self._lock:
            if self._running(region):
                raise ClusterError(f"{label(region)} is running already")
            self.files.release(region)
            self._spawn(region, spec)
            self.watches.setdefault(region, Watch()).reset()
            self._dirty = True
            self._event(f"{label(region)}: started, pid {self.processes[region].pid}")

    def _spawn(self, name: str, spec: _Spec) -> None:
        assert not self._running(name)
        self._specs[name] = spec
        # A worker of a region of many shares the port with its siblings (SO_REUSEPORT).
        if "--worker" not in spec.args and _port_busy(spec.host, spec.port):
            raise ClusterError(
                f"{name}: {spec.host}:{spec.port} is already in use (another cluster running?)"
            )
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        log = self._logs.get(name) or open(self.log_path(name), "ab")
        self._logs[name] = log
        command = [sys.executable, "-m", "unitrade.cli", *spec.args, "--data", str(self.data_dir)]
        if self.launcher is not None:
            command = [*self.launcher(name), *command]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        self.processes[name] = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **dict(spec.env)},
            # Its own session: a Ctrl-C at the terminal reaches only the supervising
            # process, which stops the others in order, instead of killing every process
            # at once while the supervisor is still watching.
            start_new_session=True,
        )

    def wait_healthy(
        self, regions: list[str] | None = None, timeout_s: float = HEALTHY_TIMEOUT_S
    ) -> None:
        """Wait until every process named answers /healthz (a region of many: each of its
        workers has answered itself)."""
        deadline = time.monotonic() + timeout_s
        names = regions or [*self.control_names(), *self.config.region_names]
        pending = [n for name in names for n in self._process_names(name)]
        with httpx.Client(timeout=2.0, verify=self.config.http_verify) as client:
            while pending:
                region = pending[0]
                process = self.processes.get(region)
                if process is not None and process.poll() is not None:
                    if not self._will_restart(region):
                        raise ClusterError(
                            f"region {region} exited with {process.returncode}; "
                            f"see {self.log_path(region)}"
                        )
                elif self.answers(client, region):
                    pending.pop(0)
                    continue
                if time.monotonic() > deadline:
                    raise ClusterError(f"region {region} not healthy after {timeout_s:.0f} s")
                time.sleep(0.1)

    def answers(self, client: httpx.Client, name: str) -> bool:
        """Whether the process answers /healthz. A worker of a region of many shares the
        region's address: each try is a new connection, which the kernel hands to one of
        the region's processes, until this one answers (or WORKER_TRIES_MAX tries)."""
        url = self._health_url(name) + "/healthz"
        region, worker = self._region_of(name)
        shared = name not in self.config.region_names and region in self.config.region_names
        try:
            if not shared:
                return client.get(url).status_code == 200
            for _ in range(WORKER_TRIES_MAX):
                reply = client.get(url, headers={"connection": "close"})
                if reply.status_code == 200 and reply.json().get("worker") == worker:
                    return True
        except (httpx.TransportError, ValueError):
            pass
        return False

    def _will_restart(self, name: str) -> bool:
        watch = self.watches.get(name)
        return (
            self.supervising
            and watch is not None
            and watch.state in (State.RUNNING, State.RESTARTING)
        )

    def kill_region(self, region: str) -> None:
        """kill -9, for fault tests (`control` kills the control plane). The region stays
        down, supervised or not, until start_region."""
        self.stop_region(region, kill=True, keep_down=True)

    def stop_region(
        self,
        name: str,
        kill: bool = False,
        keep_down: bool = True,
        timeout_s: float = STOP_TIMEOUT_S,
    ) -> int | None:
        """Stop a region (or `control`): SIGTERM, SIGKILL after timeout_s (at once with
        `kill`); wait until it has exited and answer its exit code (None if it was not
        running). With `keep_down` supervision leaves it down until start_region; without,
        the exit counts as a crash and supervision starts it again. A region of many
        processes: every worker (the first one's exit code)."""
        names = self._process_names(name)
        if len(names) > 1:
            codes = [self.stop_region(n, kill, keep_down, timeout_s) for n in names]
            return codes[0]
        with self._lock:
            process = self.processes[name]
            watch = self.watches.setdefault(name, Watch())
            if keep_down:
                self.files.hold(name, KILL if kill else TERM)
                watch.set(State.STOPPING if process.poll() is None else State.HELD)
                watch.stop_deadline = time.monotonic() + timeout_s
                self._dirty = True
            if process.poll() is not None:
                return None
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            how = "SIGKILL" if kill else "SIGTERM"
            self._event(
                f"{label(name)}: stopped ({how}), "
                + ("kept down until started" if keep_down else "to be started again")
            )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(timeout=STOP_TIMEOUT_S)
        with self._lock:
            if keep_down and watch.state is State.STOPPING:
                watch.exit_code = code
                watch.set(State.HELD)
                self._dirty = True
        return code

    # -- supervision ---------------------------------------------------------------------

    @property
    def supervising(self) -> bool:
        return self._supervisor is not None and self._supervisor.is_alive()

    def supervise(
        self, policy: RestartPolicy | None = None, on_event: EventSink | None = None
    ) -> None:
        """Start the supervising thread (stopped by stop()): a process that exits is
        started again on its data dir, with backoff, until the policy's restart limit;
        `unitrade stop` / `start` on this data dir hold processes down and start them.
        Every event goes to DATA/logs/supervisor.log and to `on_event`."""
        if self.supervising:
            return
        self.policy = policy or self.policy
        self._on_event = on_event
        self.files.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._event_log = open(self.files.log_path, "a", buffering=1)
        with self._lock:
            held = {n: TERM for n, w in self.watches.items() if w.state is State.HELD}
            self.files.reset_requests(held)
            self._write_state()
        self._halt.clear()
        self._supervisor = threading.Thread(
            target=self._supervise, name="unitrade-supervisor", daemon=True
        )
        self._supervisor.start()
        self._event(
            f"supervising {', '.join(self.processes)} (restarts: at most "
            f"{self.policy.restarts_max} within {self.policy.window_s:g} s, after "
            f"{self.policy.backoff_s:g} s doubling to {self.policy.backoff_max_s:g} s "
            f"while it exits within {self.policy.stable_s:g} s of its start)"
        )

    def _supervise(self) -> None:
        written = time.monotonic()
        while not self._halt.wait(self.policy.poll_s):
            try:
                with self._lock:
                    changed = self._requests() | self._reconcile() | self._dirty
                    if changed or time.monotonic() - written >= HEARTBEAT_S:
                        self._dirty = False
                        self._write_state()
                        written = time.monotonic()
            except Exception as exc:  # one bad step must not end supervision
                self._event(f"supervisor error: {type(exc).__name__}: {exc}", loud=True)

    def _requests(self) -> bool:
        """Act on `unitrade stop` / `unitrade start` (the files in supervisor/)."""
        changed = False
        for name in self.files.take_start_requests():
            if name not in self.processes:
                continue
            self.files.release(name)
            watch = self.watches[name]
            if self.running(name) and watch.state is not State.STOPPING:
                watch.reset()
                continue
            if self.running(name):  # still stopping: start it when it has exited
                self.processes[name].kill()
                self.processes[name].wait(timeout=STOP_TIMEOUT_S)
            self._event(f"{label(name)}: started by the operator")
            self._respawn(name, operator=True)
            changed = True
        for name, how in self.files.held().items():
            if name not in self.watches:
                continue
            watch = self.watches[name]
            if watch.state in (State.STOPPING, State.HELD):
                continue
            changed = True
            signal_name = "SIGKILL" if how == KILL else "SIGTERM"
            if not self.running(name):
                self._event(f"{label(name)}: held down by the operator (was {watch.state})")
                watch.set(State.HELD)
                continue
            self._event(f"{label(name)}: stopped by the operator ({signal_name})")
            watch.set(State.STOPPING)
            watch.stop_deadline = time.monotonic() + STOP_TIMEOUT_S
            self.processes[name].send_signal(signal.SIGKILL if how == KILL else signal.SIGTERM)
        held = self.files.held()
        for name, watch in self.watches.items():
            if watch.state in (State.STOPPING, State.HELD) and name not in held:
                # The hold file was removed by hand: the same as `unitrade start`.
                self._event(f"{label(name)}: hold removed; starting it")
                if self.running(name):
                    self.processes[name].kill()
                    self.processes[name].wait(timeout=STOP_TIMEOUT_S)
                self._respawn(name, operator=True)
                changed = True
        return changed

    def _reconcile(self) -> bool:
        """Notice exits, start again what is due, escalate stops that take too long."""
        changed = False
        now = time.monotonic()
        for name, watch in self.watches.items():
            process = self.processes[name]
            if watch.state is State.STOPPING:
                if process.poll() is not None:
                    watch.exit_code = process.returncode
                    watch.set(State.HELD)
                    self._event(
                        f"{label(name)}: down ({describe_exit(process.returncode)}); "
                        "kept down until started"
                    )
                    changed = True
                elif now > watch.stop_deadline:
                    process.kill()
            elif watch.state is State.RESTARTING and now >= watch.restart_at:
                self._respawn(name, operator=False)
                changed = True
            elif watch.state is State.RUNNING and process.poll() is not None:
                self._exited(name, watch, process.returncode, now)
                changed = True
        return changed

    def _exited(self, name: str, watch: Watch, code: int | None, now: float) -> None:
        delay = watch.exited(code, now, self.policy)
        if delay is None:
            self._event(
                f"{label(name)} {describe_exit(code)}; restarted {len(watch.recent)} times "
                f"within {self.policy.window_s:g} s, the limit: LEFT DOWN "
                f"(see {self.log_path(name)}; `unitrade start {option(name)}` starts it "
                "again)",
                loud=True,
            )
            return
        self._event(
            f"{label(name)} {describe_exit(code)}; starting it again in {delay:g} s "
            f"(restart {len(watch.recent) + 1} of at most {self.policy.restarts_max} "
            f"within {self.policy.window_s:g} s)"
        )

    def _respawn(self, name: str, operator: bool) -> None:
        watch = self.watches[name]
        log = self._logs.get(name)
        if log is not None:  # where one run ends and the next starts in the region's log
            stamp = datetime.now().isoformat(sep=" ", timespec="milliseconds")
            by = "the operator" if operator else f"the supervisor ({watch.restarts + 1})"
            log.write(f"--- {stamp} started again by {by} ---\n".encode())
            log.flush()
        try:
            self._spawn(name, self._specs[name])
        except (ClusterError, OSError) as exc:
            self._event(f"{label(name)}: could not start: {exc}", loud=True)
            # A failed start counts as a restart, so that it too ends at the limit.
            if operator:
                watch.reset()
            watch.restarted(time.monotonic())
            self._exited(name, watch, None, time.monotonic())
            return
        if operator:
            watch.reset()
        else:
            watch.restarted(time.monotonic())
            self._event(
                f"{label(name)}: started again, pid {self.processes[name].pid} "
                f"(restart {watch.restarts})"
            )

    def _event(self, message: str, loud: bool = False) -> None:
        stamp = datetime.now().isoformat(sep=" ", timespec="milliseconds")
        if self._event_log is not None:
            self._event_log.write(f"{stamp} {'ALERT ' if loud else ''}{message}\n")
        if self._on_event is not None:
            self._on_event(message, loud)

    def _write_state(self) -> None:
        processes: dict[str, Any] = {}
        for name, process in self.processes.items():
            watch = self.watches.get(name, Watch())
            region, worker = self._region_of(name)
            processes[name] = {
                "kind": "control" if name == CONTROL_NAME else "region",
                "region": None if name in self.control_names() else region,
                "worker": worker,
                "url": self.base_url(name),
                "pid": process.pid,
                "alive": process.poll() is None,
                "state": str(watch.state),
                "exit_code": watch.exit_code,
                "restarts": watch.restarts,
                "since": watch.since,
            }
        config = None if self.config_path is None else str(self.config_path.resolve())
        self.files.write_state(
            {
                "pid": os.getpid(),
                "heartbeat": time.time(),
                "data_dir": str(self.data_dir),
                "config": config,
                "policy": policy_document(self.policy),
                "processes": processes,
            }
        )

    # -- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        if self._supervisor is not None:
            self._halt.set()
            self._supervisor.join(timeout=STOP_TIMEOUT_S)
            self._supervisor = None
            self.files.remove_state()
            self._event("supervision stopped; stopping every process")
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        if self._event_log is not None:
            self._event_log.close()
            self._event_log = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
