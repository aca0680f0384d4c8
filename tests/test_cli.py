"""The `unitrade` command, run as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner

from tests.support import Api, free_ports, topology_toml, write_topology
from unitrade.cli import _print_regions, main
from unitrade.cli_options import mask_password
from unitrade.cluster import LocalCluster
from unitrade.topology.config import TopologyConfig, default_config, load_config
from unitrade.web.tokens import read_claims

UNITRADE = [sys.executable, "-m", "unitrade.cli"]


def run(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*UNITRADE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _commands(group: click.Group) -> list[click.Command]:
    found: list[click.Command] = []
    context = click.Context(group)
    for name in group.list_commands(context):  # the lazily imported commands too
        command = group.get_command(context, name)
        assert command is not None, name
        found.append(command)
        if isinstance(command, click.Group):
            found += _commands(command)
    return found


def test_every_command_option_and_argument_is_documented() -> None:
    commands = _commands(main)
    assert {"up", "status", "switch", "operations", "diff", "demo", "serve"} <= {
        c.name for c in commands
    }
    for command in commands:
        assert command.help and command.help.strip(), command.name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), (command.name, param.name)
            else:  # click arguments have no help: the command's text must explain them
                assert param.human_readable_name in command.help, (command.name, param.name)


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
    admin_token = run("token", "--admin", "--ttl", "15m", "--config", config).stdout.strip()
    claims = read_claims(cluster.config.token_keys, admin_token)
    assert claims.principal.admin and 840 <= claims.expires_s - time.time() <= 900
    assert run("token").returncode == 2
    assert run("token", "0").returncode == 2
    assert run("token", "42", "--ttl", "31d", "--config", config).returncode == 2
    assert run("token", "42", "--ttl", "soon", "--config", config).returncode == 2
    # Revoked from the command line: refused by every region from then on.
    revoked = run("token", "--revoke", buyer_token, "--config", config)
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 10
    for region in ("hz", "sh", "bj"):
        while True:
            answer = api.http.get(
                api.url(region, "/v1/cart"), headers={"authorization": f"Bearer {buyer_token}"}
            )
            if answer.status_code == 401 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert answer.status_code == 401, (region, answer.text)


def test_up_production_refuses_the_development_secret(tmp_path: Path) -> None:
    assert default_config().development_secrets()  # the built-in topology's secret
    result = run("up", "--production", "--data", str(tmp_path))
    assert result.returncode != 0
    assert "development" in result.stderr and "Traceback" not in result.stderr


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
    assert result.returncode == 2
    assert "cells.0.kind: Field required" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_with_everything_down_exits_1_and_names_what_is_down(tmp_path: Path) -> None:
    _config, path = write_topology(tmp_path)  # free ports: nothing listens there
    result = CliRunner().invoke(main, ["status", "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert "down: the control plane, region hz, region sh, region bj" in result.output
    assert "regions keep serving" not in result.output
    assert "is UNITRADE_CONFIG / --config the file the cluster was started with?" in (result.output)
    # No owner from the configuration file shown as if it were current.
    cell_rows = [line.split() for line in result.output.splitlines()]
    cell_rows = [row for row in cell_rows if row[:1] in (["u1"], ["u3"], ["center"])]
    assert len(cell_rows) == 3
    assert all("unknown:" in row and "hz" not in row and "sh" not in row for row in cell_rows)


@pytest.mark.cluster
def test_status_with_the_control_plane_down_exits_1_and_shows_live_owners(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    # The cluster's regions, but a control plane address where nothing listens.
    ports = [r.port for r in cluster.config.regions] + free_ports(1)
    path = tmp_path / "no-control.toml"
    path.write_text(topology_toml(ports))
    result = CliRunner().invoke(main, ["status", "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert "down: the control plane" in result.output.splitlines()[-1]
    assert "region hz" not in result.output.splitlines()[-1]
    assert "keep serving" in result.output
    assert "(owners: rule " in result.output


@pytest.mark.cluster
def test_unitrade_config_in_the_environment_is_honoured(cluster: LocalCluster) -> None:
    env = {"UNITRADE_CONFIG": str(cluster.config_path)}
    result = CliRunner().invoke(main, ["status"], env=env)
    assert result.exit_code == 0, result.output
    assert cluster.config.control.base_url in result.output
    assert "all up: the control plane and 3 regions" in result.output
    assert "UNITRADE_CONFIG" in CliRunner().invoke(main, ["status", "--help"]).output


@pytest.mark.cluster
def test_a_config_with_another_secret_gets_a_hint(cluster: LocalCluster, tmp_path: Path) -> None:
    path = tmp_path / "other-secret.toml"
    lines = Path(str(cluster.config_path)).read_text().splitlines()
    others = [line for line in lines if not line.startswith("secret = ")]
    path.write_text('secret = "not-the-secret-of-this-cluster"\n' + "\n".join(others) + "\n")
    for command in (["operations"], ["diff", "--cell", "u1"]):
        result = CliRunner().invoke(main, [*command, "--config", str(path)])
        assert result.exit_code in (1, 2), result.output
        assert "hint: is UNITRADE_CONFIG / --config the file" in result.output, command


@pytest.mark.cluster
def test_operations_at_80_columns_keep_full_ids_and_cell_names(cluster: LocalCluster) -> None:
    config = str(cluster.config_path)
    owner = load_config(cluster.config_path).cells[0].owner
    refused = run("switch", "--cell", "u1", "--to", owner, "--config", config)
    assert refused.returncode == 1 and "already owned" in refused.stdout, refused.stdout
    op_id = refused.stdout.split("operation ", 1)[1].split()[0]
    assert op_id.startswith("op-")
    listed = run("operations", "--config", config, env={"COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80
    row = next(line for line in listed.stdout.splitlines() if op_id in line)
    assert row.split()[:3] == [op_id, "switch", "u1"]  # the full id; the cell by its name
    shown = run("operations", op_id, "--config", config, env={"COLUMNS": "80"})
    assert any(line.split()[:2] == ["cells", "u1"] for line in shown.stdout.splitlines())


def test_storage_urls_are_printed_without_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = "postgresql://unitrade:s3cret-pw@db.example:5432/ut_{cell}"
    path = tmp_path / "pg.toml"
    control = storage.replace("{cell}", "control")
    path.write_text(topology_toml(free_ports(4), storage=storage, control_storage=control))
    _print_regions(load_config(path), tmp_path)
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert out.count("postgresql://unitrade:***@db.example:5432/ut_") == 4  # control + 3
    assert mask_password("sqlite:////tmp/x/cell-{cell}.db") == "sqlite:////tmp/x/cell-{cell}.db"
    assert mask_password("postgresql://u@h/db") == "postgresql://u@h/db"


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


@pytest.mark.cluster
@pytest.mark.parametrize("command", ["up", "demo"])
def test_up_and_demo_refuse_ports_in_use(
    cluster: LocalCluster, tmp_path: Path, command: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep").write_text("a file demo would have wiped")
    result = run(command, "--config", str(cluster.config_path), "--data", str(data))
    assert result.returncode == 2, result.stdout + result.stderr
    control_port = cluster.config.control.port
    assert f"in use: port {control_port} (the control plane" in result.stderr
    assert "Is `unitrade up` (or `unitrade demo`) already running?" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "stopped" not in result.stdout  # nothing was started
    assert (data / "keep").exists()


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
    # A flash sale: its units sold out to token holders, never oversold.
    assert "no unit oversold: yes; orders placed = units sold: yes" in result.stdout
    assert "tokens issued" in result.stdout and "units sold 30 of 30" in result.stdout
    assert "every token accounted for: yes" in result.stdout
    # The last act: a region killed, failed over, brought back and reconciled.
    assert "failover op-" in result.stdout and ": done in" in result.stdout
    assert "orders in the loss report: reapplied" in result.stdout
    assert "stock conserved after the failover and the reconcile: yes" in result.stdout
    assert "identical to its owner's after sh came back: yes" in result.stdout


def test_sale_times_and_durations_are_read_as_an_operator_writes_them() -> None:
    from unitrade.sale_cli import parse_duration_s, parse_time_ms

    now = 1_800_000_000.0
    assert parse_time_ms("now", now) == 1_800_000_000_000
    assert parse_time_ms("+10m", now) == 1_800_000_600_000
    assert parse_time_ms("1800000123", now) == 1_800_000_123_000
    assert parse_time_ms("2027-01-15T16:00:00+08:00", now) == 1_800_000_000_000
    for bad in ("soon", "+10x", "-5m", ""):
        with pytest.raises(click.BadParameter):
            parse_time_ms(bad, now)
    assert parse_duration_s("2h") == 7_200 and parse_duration_s("90") == 90
    with pytest.raises(click.BadParameter):
        parse_duration_s("0d")


def test_the_cli_imports_a_region_only_for_the_commands_that_run_one() -> None:
    """`unitrade status` or `unitrade switch` in an incident does not wait for the whole
    region's imports (services, storage, the web stack): the other modules' commands are
    imported when run."""
    probe = (
        "import sys; from click import Context; from unitrade.cli import main; "
        "main.get_command(Context(main), 'switch'); "
        "print(sorted(m for m in ('unitrade.region', 'unitrade.storage.store', 'fastapi') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
