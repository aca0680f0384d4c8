"""The `unitrade` command, run as a user would."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import Api, write_topology
from unitrade.cluster import LocalCluster
from unitrade.topology.config import TopologyConfig

UNITRADE = [sys.executable, "-m", "unitrade.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UNITRADE, *args], capture_output=True, text=True, timeout=timeout)


def test_help_names_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("up", "demo", "status", "token"):
        assert command in result.stdout


@pytest.mark.cluster
def test_token_prints_tokens_the_cluster_accepts(cluster: LocalCluster, api: Api) -> None:
    config = str(cluster.config_path)
    buyer_token = run("token", "42", "--config", config).stdout.strip()
    response = api.http.get(
        api.url("sh", "/v1/cart"), headers={"authorization": f"Bearer {buyer_token}"}
    )
    assert response.status_code == 200 and response.json()["buyer_id"] == 42
    admin_token = run("token", "--admin", "--config", config).stdout.strip()
    assert admin_token.startswith("ut1.admin.")
    assert run("token").returncode == 2
    assert run("token", "0").returncode == 2


@pytest.mark.cluster
def test_status_shows_regions_and_cell_owners(cluster: LocalCluster) -> None:
    result = run("status", "--config", str(cluster.config_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for region in ("hz", "sh", "bj"):
        assert any(region in line and "up" in line for line in lines)
    for cell, owner in (("u1", "hz"), ("u3", "sh"), ("u6", "bj"), ("center", "hz")):
        assert any(cell in line and owner in line for line in lines), (cell, result.stdout)


def test_a_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[regions.hz]\nlisten = "127.0.0.1:1"\ncenter = true\n[[cells]]\nid = 1\n')
    result = run("status", "--config", str(path))
    assert result.returncode == 1
    assert "cells.0.kind: Field required" in result.stderr


def test_up_serves_until_sigterm_then_stops_cleanly(tmp_path: Path) -> None:
    config, path = write_topology(tmp_path)
    with subprocess.Popen(
        [*UNITRADE, "up", "--config", str(path), "--data", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        _up_then_sigterm(process, config)


def _up_then_sigterm(process: subprocess.Popen[str], config: TopologyConfig) -> None:
    try:
        deadline = time.monotonic() + 60
        output = ""
        assert process.stdout is not None
        while "cluster up" not in output and time.monotonic() < deadline:
            output += process.stdout.readline()
        assert "cluster up" in output, output
        for region in config.regions:
            assert region.base_url in output
            assert httpx.get(region.base_url + "/healthz").status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        for region in config.regions:
            with pytest.raises(httpx.TransportError):
                httpx.get(region.base_url + "/healthz", timeout=1)
    finally:
        if process.poll() is None:
            process.kill()


def test_up_refuses_ports_in_use(cluster: LocalCluster) -> None:
    result = run("up", "--config", str(cluster.config_path), "--data", "/tmp/unused-ut")
    assert result.returncode == 1
    assert "already in use" in result.stderr


def test_demo_shows_orders_in_every_cell_forwarding_and_conserved_stock(tmp_path: Path) -> None:
    _config, path = write_topology(tmp_path)
    result = run(
        "demo",
        "--config",
        str(path),
        "--data",
        str(tmp_path / "demo"),
        "--buyers",
        "60",
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stock conserved: yes" in result.stdout
    assert "orders in every unit cell: yes" in result.stdout
    assert "forwarded to the owner region" in result.stdout
    assert "every copy of every cell identical to its owner's: yes" in result.stdout
