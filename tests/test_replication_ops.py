"""What operators see of replication: metrics, status, waiting for a position."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.replication_support import positions, wait_converged
from tests.support import Api
from unitrade.cluster import LocalCluster

pytestmark = pytest.mark.cluster
UNITRADE = [sys.executable, "-m", "unitrade.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*UNITRADE, *args], capture_output=True, text=True, timeout=60)


def test_metrics_export_lag_and_positions_of_every_stream(api: Api) -> None:
    api.put_product("MET-1", stock=10)
    wait_converged(api.config)
    for region in api.config.region_names:
        response = api.http.get(api.url(region, "/metrics"))
        assert response.status_code == 200
        text = response.text
        for cell in ("u1", "u3", "u5", "center", "global"):
            owner = api.rule.owner_of(api.config.find_cell(cell).id)
            if owner == region:
                assert (
                    f'unitrade_cell_position{{cell="{cell}",owned="true",region="{region}"}}'
                    in text
                )
            else:
                labels = f'cell="{cell}",region="{region}",source="{owner}"'
                assert f"unitrade_replication_lag_positions{{{labels}}} 0.0" in text, text
        assert "unitrade_replication_lag_ms" in text
        assert "unitrade_replication_applied_rows_total" in text


def test_wait_returns_when_the_region_has_the_position(cluster: LocalCluster, api: Api) -> None:
    config = str(cluster.config_path)
    buyer = api.buyer_in("sh", 7777)
    api.put_product("WAIT-1", stock=10)
    assert api.order("sh", buyer, [("WAIT-1", 1)]).status_code == 201
    cell = api.rule.cells[api.rule.bucket_cells[buyer % 100]].name
    head = positions(api.config)["sh"][cell]
    done = run(
        "wait",
        "--config",
        config,
        "--cell",
        cell,
        "--region",
        "bj",
        "--position",
        str(head),
        "--timeout",
        "10",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"bj has applied {cell}" in done.stdout
    late = run(
        "wait",
        "--config",
        config,
        "--cell",
        cell,
        "--region",
        "hz",
        "--position",
        str(head + 1000),
        "--timeout",
        "0.5",
    )
    assert late.returncode == 1 and "timed out" in late.stdout
    bad = run("wait", "--config", config, "--cell", "u99", "--region", "hz", "--position", "1")
    assert bad.returncode == 2


def test_status_shows_the_lag_of_every_stream(cluster: LocalCluster, api: Api) -> None:
    wait_converged(api.config)
    result = run("status", "--config", str(cluster.config_path))
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("replication (owner -> copy)", 1)[1]
    rows = [line.split() for line in section.splitlines() if line.split()[:1] == ["center"]]
    assert len(rows) == 2  # sh and bj follow hz's center cell
    assert all(row[5] == "0" for row in rows)  # lag positions
