"""etcd members for the tests: real etcd processes (Debian's etcd-server, 3.4) on free ports,
each with its own data directory; one member or a cluster of three."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.support import free_ports

HEALTHY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def require_etcd() -> str:
    """The etcd binary; skip without it, unless UNITRADE_REQUIRE_BACKENDS=1 (CI: fail)."""
    binary = shutil.which("etcd")
    if binary is not None:
        return binary
    message = "etcd is not installed (apt-get install etcd-server)"
    if os.environ.get("UNITRADE_REQUIRE_BACKENDS") == "1":
        pytest.fail(message + " and UNITRADE_REQUIRE_BACKENDS=1")
    pytest.skip(message)


def etcd_prefix() -> str:
    """A key prefix of one test's own: tests share an etcd and never see each other."""
    return f"/ut-test-{uuid.uuid4().hex[:8]}/"


class EtcdCluster:
    """`size` etcd members on loopback. Elections are quick (heartbeat 50 ms, election
    timeout 500 ms) so that a member's loss is over in about a second."""

    def __init__(self, directory: Path, size: int = 1) -> None:
        self.binary = require_etcd()
        self.directory = directory
        self.names = [f"m{i}" for i in range(size)]
        ports = free_ports(2 * size)
        self.client_ports = ports[:size]
        self.peer_ports = ports[size:]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self.token = f"ut-{uuid.uuid4().hex[:8]}"

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.client_ports]

    def start(self) -> None:
        for index in range(len(self.names)):
            self.start_member(index, wait=False)
        self.wait_healthy()

    def start_member(self, index: int, wait: bool = True) -> None:
        assert not self.running(index)
        name = self.names[index]
        peers = ",".join(
            f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports, strict=True)
        )
        client = f"http://127.0.0.1:{self.client_ports[index]}"
        peer = f"http://127.0.0.1:{self.peer_ports[index]}"
        command = [
            self.binary,
            f"--name={name}",
            f"--data-dir={self.directory / name}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={peers}",
            f"--initial-cluster-token={self.token}",
            "--initial-cluster-state=new",  # ignored once the data directory exists
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-level=warn",
        ]
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self._logs.get(index) or open(self.directory / f"{name}.log", "ab")
        self._logs[index] = log
        self.processes[index] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        if wait:
            self.wait_healthy([index])

    def running(self, index: int) -> bool:
        process = self.processes.get(index)
        return process is not None and process.poll() is None

    def wait_healthy(
        self, members: list[int] | None = None, timeout_s: float = HEALTHY_TIMEOUT_S
    ) -> None:
        """Until each member answers that the cluster has a leader."""
        deadline = time.monotonic() + timeout_s
        for index in members if members is not None else range(len(self.names)):
            url = self.endpoints[index] + "/health"
            while True:
                process = self.processes[index]
                assert process.poll() is None, f"etcd {self.names[index]} exited; see its log"
                try:
                    if httpx.get(url, timeout=1.0).json().get("health") == "true":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                assert time.monotonic() < deadline, f"etcd {self.names[index]} not healthy"
                time.sleep(0.05)

    def leader(self) -> int:
        """The index of the member that is the etcd (raft) leader now."""
        for index in range(len(self.names)):
            if not self.running(index):
                continue
            try:
                status = httpx.post(
                    self.endpoints[index] + "/v3/maintenance/status", json={}, timeout=1.0
                ).json()
            except (httpx.HTTPError, ValueError):
                continue
            if status.get("leader") == status.get("header", {}).get("member_id"):
                return index
        raise AssertionError("no etcd member is the leader")

    def kill_member(self, index: int) -> None:
        """kill -9: a member lost, for fault tests."""
        process = self.processes[index]
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
