"""Supervision of a local cluster: a process that dies is started again, within a limit,
and `unitrade stop` / `unitrade start` hold one down and bring it back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.support import Api, write_topology
from unitrade.cli import main
from unitrade.cluster import LocalCluster
from unitrade.supervisor import RestartPolicy, State
from unitrade.topology.config import CONTROL_NAME, TopologyConfig

# Quick backoff and a small limit: the limit is reached in a second or two.
POLICY = RestartPolicy(backoff_s=0.05, backoff_max_s=0.2, restarts_max=3, window_s=60.0)
WAIT_S = 60.0
UNITRADE = [sys.executable, "-m", "unitrade.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*UNITRADE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def healthy(config: TopologyConfig, name: str) -> bool:
    url = config.control.base_url if name == CONTROL_NAME else config.region(name).base_url
    try:
        return httpx.get(url + "/healthz", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


class Events:
    """What the supervisor reported, as `up` prints it."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, bool]] = []
        self._lock = threading.Lock()

    def __call__(self, message: str, loud: bool) -> None:
        with self._lock:
            self.lines.append((message, loud))

    def loud(self) -> list[str]:
        with self._lock:
            return [m for m, loud in self.lines if loud]


@pytest.fixture(scope="module")
def supervised(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalCluster, Api, Events]]:
    directory = tmp_path_factory.mktemp("supervised")
    config, path = write_topology(directory)
    events = Events()
    with LocalCluster(config, directory / "data", path) as cluster:
        cluster.start()
        cluster.supervise(POLICY, on_event=events)
        api = Api(config)
        try:
            yield cluster, api, events
        finally:
            api.http.close()


def pids(cluster: LocalCluster) -> dict[str, int]:
    return {name: process.pid for name, process in cluster.processes.items()}


@pytest.mark.cluster
def test_a_region_killed_comes_back_and_serves_with_nothing_else_restarted(
    supervised: tuple[LocalCluster, Api, Events],
) -> None:
    cluster, api, _events = supervised
    api.put_product("SUP-1", stock=10)
    buyer = api.buyer_in("sh")
    before = pids(cluster)

    code = cluster.stop_region("sh", kill=True, keep_down=False)

    assert code == -signal.SIGKILL  # the kill struck a live process
    wait_for(lambda: cluster.watches["sh"].restarts == 1, "sh started again")
    cluster.wait_healthy(["sh"])
    assert cluster.processes["sh"].pid != before["sh"]
    answer = api.call("sh", "PUT", "/v1/cart/items/SUP-1", buyer, {"qty": 2})
    assert answer.status_code == 200, answer.text
    after = pids(cluster)
    for name in ("control", "hz", "bj"):
        assert after[name] == before[name], name
        assert cluster.watches[name].restarts == 0, name
    log = cluster.files.log_path.read_text()
    assert "region sh killed by SIGKILL; starting it again" in log
    assert f"region sh: started again, pid {after['sh']}" in log
    state = json.loads(cluster.files.state_path.read_text())
    assert state["processes"]["sh"]["pid"] == after["sh"]
    assert state["processes"]["sh"]["state"] == "running"


@pytest.mark.cluster
def test_the_control_plane_killed_comes_back(
    supervised: tuple[LocalCluster, Api, Events], capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, _api, _events = supervised
    assert healthy(cluster.config, CONTROL_NAME)
    killed = time.monotonic()
    assert cluster.stop_region(CONTROL_NAME, kill=True, keep_down=False) == -signal.SIGKILL
    wait_for(lambda: healthy(cluster.config, CONTROL_NAME), "the control plane healthy again")
    took = time.monotonic() - killed
    assert cluster.watches[CONTROL_NAME].restarts == 1
    with capsys.disabled():  # measured, not asserted: the machine's load decides it
        print(f"\ncontrol plane: kill -9 to /healthz 200 again in {took:.2f} s")


@pytest.mark.cluster
def test_a_region_held_down_stays_down_until_started(
    supervised: tuple[LocalCluster, Api, Events],
) -> None:
    cluster, _api, _events = supervised
    assert cluster.stop_region("hz") is not None
    assert cluster.watches["hz"].state is State.HELD
    assert (cluster.files.down_dir / "hz").exists()
    written = json.loads(cluster.files.state_path.read_text())["heartbeat"]

    # Two heartbeats later (each after many supervisor polls) it is still down.
    def heartbeats(n: int) -> bool:
        return json.loads(cluster.files.state_path.read_text())["heartbeat"] >= written + n

    wait_for(lambda: heartbeats(2), "two heartbeats of the supervisor")
    assert not cluster.running("hz") and not healthy(cluster.config, "hz")
    assert json.loads(cluster.files.state_path.read_text())["processes"]["hz"]["state"] == (
        "stopped by operator"
    )

    cluster.start_region("hz")
    cluster.wait_healthy(["hz"])
    assert not (cluster.files.down_dir / "hz").exists()
    assert cluster.watches["hz"].state is State.RUNNING


@pytest.mark.cluster
def test_a_region_that_dies_at_once_is_left_down_after_the_limit(
    supervised: tuple[LocalCluster, Api, Events],
) -> None:
    cluster, _api, events = supervised
    cluster.stop_region("bj")
    others = {n: p for n, p in pids(cluster).items() if n != "bj"}
    # Python cannot even start with this: the process exits at once, every time.
    cluster.start_region("bj", env={"PYTHONHOME": "/nonexistent"})

    wait_for(lambda: cluster.watches["bj"].state is State.FAILED, "bj given up")

    watch = cluster.watches["bj"]
    assert watch.restarts == POLICY.restarts_max
    assert watch.exit_code not in (None, 0)
    assert not cluster.running("bj")
    assert any("region bj exit code" in m and "LEFT DOWN" in m for m in events.loud())
    assert "ALERT region bj" in cluster.files.log_path.read_text()
    for name, pid in others.items():  # the rest keep running, none restarted
        assert cluster.processes[name].pid == pid and healthy(cluster.config, name), name
    state = json.loads(cluster.files.state_path.read_text())
    assert state["processes"]["bj"]["state"] == "failed"

    cluster.start_region("bj")  # fixed: the operator starts it, with a fresh budget
    cluster.wait_healthy(["bj"])
    assert cluster.watches["bj"].restarts == 0


# -- `unitrade stop` / `unitrade start` against a real `unitrade up` ---------------------


UP_STOP_S_MAX = 40  # `up` gives each process 15 s after SIGTERM, then kills it


class Up:
    """`unitrade up` as a subprocess, its output collected by a thread."""

    def __init__(self, config_path: Path, data: Path) -> None:
        self.data = data
        self.process = subprocess.Popen(
            [*UNITRADE, "up", "--config", str(config_path), "--data", str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)

    def close(self) -> None:
        """Stop `up` as an operator does (SIGTERM: it stops every process it started, which
        run in sessions of their own and would outlive a SIGKILL of `up`)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=UP_STOP_S_MAX)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.wait()
        self._reader.join(timeout=10)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def text(self) -> str:
        return "".join(self.output)

    def state(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.data / "supervisor.json").read_text())
        return document


@pytest.mark.cluster
def test_stop_and_start_drills_against_unitrade_up(tmp_path: Path) -> None:
    config, path = write_topology(tmp_path)
    data = tmp_path / "data"
    up = Up(path, data)
    try:
        wait_for(lambda: "cluster up" in up.text(), "unitrade up started")
        wait_for(lambda: (data / "supervisor.json").exists(), "supervisor.json written")
        _drills(config, path, data, up)
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(timeout=30) == 0
        assert not (data / "supervisor.json").exists()
        gone = run("start", "--region", "sh", "--data", str(data))
        assert gone.returncode == 1 and "no `unitrade up` is running" in gone.stderr
    finally:
        up.close()


def _drills(config: TopologyConfig, path: Path, data: Path, up: Up) -> None:
    on = ["--data", str(data)]

    # A planned stop: down, and kept down.
    stopped = run("stop", "--region", "sh", *on)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "region sh is down" in stopped.stdout and "kept down" in stopped.stdout
    assert not healthy(config, "sh")
    written = up.state()["heartbeat"]
    wait_for(lambda: up.state()["heartbeat"] >= written + 2, "two heartbeats of `up`")
    assert up.state()["processes"]["sh"]["state"] == "stopped by operator"
    assert not healthy(config, "sh")
    status = CliRunner().invoke(main, ["status", "--config", str(path), *on])
    assert status.exit_code == 1
    # The control plane's probes may find sh's cells down too by now.
    last = status.output.splitlines()[-1]
    assert last.startswith("down: region sh (stopped by operator)"), last
    assert "region sh (probes)" not in last

    # Back, found through UNITRADE_DATA this time.
    started = run("start", "--region", "sh", env={"UNITRADE_DATA": str(data)})
    assert started.returncode == 0, started.stdout + started.stderr
    assert "region sh is up" in started.stdout and healthy(config, "sh")

    # A crash under `up`: started again, said on its console.
    bj = up.state()["processes"]["bj"]["pid"]
    os.kill(bj, signal.SIGKILL)
    wait_for(lambda: up.state()["processes"]["bj"]["pid"] != bj, "bj started again")
    wait_for(lambda: healthy(config, "bj"), "bj healthy again")
    wait_for(lambda: "region bj killed by SIGKILL" in up.text(), "the restart printed")
    assert "restart 1 of at most 5" in up.text()

    # A crash drill of the control plane.
    killed = run("stop", "--control", "--kill", *on)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert "killed by SIGKILL" in killed.stdout and not healthy(config, CONTROL_NAME)
    back = run("start", "--control", *on)
    assert back.returncode == 0, back.stdout + back.stderr
    assert healthy(config, CONTROL_NAME)

    # Bad requests: clear errors, nothing changed.
    cli = CliRunner()
    unknown = cli.invoke(main, ["stop", "--region", "xx", *on])
    assert unknown.exit_code == 2 and "unknown region 'xx'" in unknown.output
    neither = cli.invoke(main, ["start", *on])
    assert neither.exit_code == 2 and "--region REGION or --control" in neither.output
    both = cli.invoke(main, ["stop", "--region", "sh", "--control", *on])
    assert both.exit_code == 2
    nothing = cli.invoke(main, ["stop", "--region", "sh", "--data", str(data.parent / "else")])
    assert nothing.exit_code == 1 and "no `unitrade up` is running" in nothing.output
    for result in (unknown, neither, both, nothing):  # a clear message, no traceback
        assert isinstance(result.exception, SystemExit), result.exception
    for name in ("hz", "sh", "bj", CONTROL_NAME):
        assert healthy(config, name), name
