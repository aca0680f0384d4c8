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

from unitrade.topology.config import TopologyConfig

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
        for name in regions or self.config.region_names:
            self.start_region(name)
        self.wait_healthy(regions)

    def start_region(self, region: str) -> None:
        assert region not in self.processes or self.processes[region].poll() is not None
        listen = self.config.region(region)
        if _port_busy(listen.host, listen.port):
            raise ClusterError(
                f"region {region}: {listen.listen} is already in use (another cluster running?)"
            )
        self.log_path(region).parent.mkdir(parents=True, exist_ok=True)
        log = self._logs.get(region) or open(self.log_path(region), "ab")
        self._logs[region] = log
        command = [sys.executable, "-m", "unitrade.cli", "serve", "--region", region]
        command += ["--data", str(self.data_dir)]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        self.processes[region] = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_healthy(
        self, regions: list[str] | None = None, timeout_s: float = HEALTHY_TIMEOUT_S
    ) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(regions or self.config.region_names)
        with httpx.Client(timeout=2.0) as client:
            while pending:
                region = pending[0]
                process = self.processes.get(region)
                if process is not None and process.poll() is not None:
                    raise ClusterError(
                        f"region {region} exited with {process.returncode}; "
                        f"see {self.log_path(region)}"
                    )
                try:
                    url = self.config.region(region).base_url + "/healthz"
                    if client.get(url).status_code == 200:
                        pending.pop(0)
                        continue
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterError(f"region {region} not healthy after {timeout_s:.0f} s")
                time.sleep(0.1)

    def kill_region(self, region: str) -> None:
        """kill -9, for fault tests."""
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
