"""A local cluster: every region of a configuration as a separate local process.

Used by `unitrade up`, `unitrade demo`, the integration tests and the benchmarks, so that
all of them exercise real processes talking over real sockets.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from unitrade.topology.config import CONTROL_NAME, TopologyConfig

HEALTHY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class ClusterError(RuntimeError):
    pass


class LocalCluster:
    def __init__(
        self, config: TopologyConfig, data_dir: Path, config_path: Path | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.data_dir = data_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}

    def log_path(self, region: str) -> Path:
        return self.data_dir / "logs" / f"{region}.log"

    def start(self, regions: list[str] | None = None) -> None:
        """Start the control plane (unless it runs) and the regions; wait until healthy."""
        names = regions or self.config.region_names
        if not self.running(CONTROL_NAME):
            self.start_control()
            names = [CONTROL_NAME, *names]
        for name in names:
            if name != CONTROL_NAME:
                self.start_region(name)
        self.wait_healthy(names)

    def ports_in_use(self) -> list[str]:
        """The control plane and regions whose listen address something already answers
        on: checked before starting anything, so that nothing is half started."""
        busy = []
        for name in [CONTROL_NAME, *self.config.region_names]:
            listen = self.config.control if name == CONTROL_NAME else self.config.region(name)
            if not self.running(name) and _port_busy(listen.host, listen.port):
                what = "the control plane" if name == CONTROL_NAME else f"region {name}"
                busy.append(f"port {listen.port} ({what}, {listen.host}:{listen.port})")
        return busy

    def running(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def base_url(self, name: str) -> str:
        if name == CONTROL_NAME:
            return self.config.control.base_url
        return self.config.region(name).base_url

    def start_control(self, env: dict[str, str] | None = None) -> None:
        """The control plane; `env` adds environment variables (fault injection in tests)."""
        control = self.config.control
        self._spawn(CONTROL_NAME, control.host, control.port, ["serve-control"], env)

    def start_region(self, region: str, env: dict[str, str] | None = None) -> None:
        """A region; `env` adds environment variables (fault injection in tests)."""
        listen = self.config.region(region)
        self._spawn(region, listen.host, listen.port, ["serve", "--region", region], env)

    def _spawn(
        self, name: str, host: str, port: int, args: list[str], env: dict[str, str] | None
    ) -> None:
        assert not self.running(name)
        if _port_busy(host, port):
            raise ClusterError(
                f"{name}: {host}:{port} is already in use (another cluster running?)"
            )
        self.log_path(name).parent.mkdir(parents=True, exist_ok=True)
        log = self._logs.get(name) or open(self.log_path(name), "ab")
        self._logs[name] = log
        command = [sys.executable, "-m", "unitrade.cli", *args, "--data", str(self.data_dir)]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        self.processes[name] = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def wait_healthy(
        self, regions: list[str] | None = None, timeout_s: float = HEALTHY_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(regions or [CONTROL_NAME, *self.config.region_names])
        with httpx.Client(timeout=2.0, verify=self.config.http_verify) as client:
            while pending:
                region = pending[0]
                process = self.processes.get(region)
                if process is not None and process.poll() is not None:
                    raise ClusterError(
                        f"region {region} exited with {process.returncode}; "
                        f"see {self.log_path(region)}"
                    )
                try:
                    url = self.base_url(region) + "/healthz"
                    if client.get(url).status_code == 200:
                        pending.pop(0)
                        continue
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"region {region} not healthy after {timeout_s:.0f} s")
                time.sleep(0.1)

    def kill_region(self, region: str) -> None:
        """kill -9, for fault tests (`control` kills the control plane)."""
        process = self.processes[region]
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
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

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
