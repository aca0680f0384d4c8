"""`unitrade stop` and `unitrade start`: drills against the `unitrade up` running on a data
directory, through the files of supervisor.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
from rich.console import Console

from unitrade.cli_options import DATA_DIR_DEFAULT, DATA_ENVVAR, load
from unitrade.supervisor import (
    KILL,
    TERM,
    State,
    SupervisorFiles,
    describe_exit,
    label,
    option,
    pid_alive,
)
from unitrade.topology.config import CONTROL_NAME

FC = TypeVar("FC", bound=Callable[..., Any] | click.Command)
console = Console()
POLL_S = 0.1


class NoSupervisor(click.ClickException):
    """No `unitrade up` supervises the data directory: exit status 1."""


class DrillError(click.ClickException):
    """A stop or start that did not come about in time: exit status 1."""


data_option = click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DATA_DIR_DEFAULT,
    show_default=True,
    envvar=DATA_ENVVAR,
    show_envvar=True,
    help="The data directory of the running `unitrade up` (as given to it): it is found "
    "through DIR/supervisor.json.",
)
region_option = click.option(
    "--region",
    metavar="REGION",
    help="The region to act on (a region of the topology: every one of its processes), or "
    "one process of a region of many, REGION.K (its worker K).",
)
control_option = click.option(
    "--control", is_flag=True, help="Act on the control plane instead of a region."
)


def timeout_option(default: float) -> Callable[[FC], FC]:
    return click.option(
        "--timeout",
        "timeout_s",
        type=click.FloatRange(min=0.1, max=600),
        default=default,
        show_default=True,
        help="Seconds to wait at most for the outcome; exit 1 after that.",
    )


@click.command(short_help="Take a region (or --control) down and keep it down: drills.")
@region_option
@control_option
@click.option(
    "--kill",
    is_flag=True,
    help="SIGKILL instead of SIGTERM: a crash, with no clean shutdown (a crash drill).",
)
@data_option
@timeout_option(30.0)
def stop(region: str | None, control: bool, kill: bool, data_dir: Path, timeout_s: float) -> None:
    """Take a region (or the control plane) of a running `unitrade up` down and keep it down.

    The `unitrade up` supervising --data stops it (SIGTERM, SIGKILL after 15 s; SIGKILL at
    once with --kill) and does not start it again until `unitrade start`. Waits until it
    has exited. Takes no --config: the cluster is the one `up` runs on --data.

    \b
    Exit status:
      0  it is down (or was already held down)
      1  no `unitrade up` runs on --data, or it was not down within --timeout
      2  bad usage: unknown region, neither or both of --region and --control

    \b
    Examples:
      unitrade stop --region sh                 # planned: SIGTERM, clean shutdown
      unitrade stop --region sh --kill          # crash drill: kill -9
      unitrade stop --control --data /tmp/ut    # the control plane
    """
    files = SupervisorFiles(data_dir.resolve())
    for name in _targets(_live(files), region, control):
        console.print(hold_down(files, name, kill, timeout_s))


@click.command(short_help="Start a region (or --control) stopped or left down again.")
@region_option
@control_option
@data_option
@timeout_option(60.0)
def start(region: str | None, control: bool, data_dir: Path, timeout_s: float) -> None:
    """Start a region (or the control plane) of a running `unitrade up` again.

    For a region held down by `unitrade stop`, or one the supervisor left down after too
    many restarts (its restart budget starts afresh). Waits until it answers /healthz.
    Takes no --config: the cluster is the one `up` runs on --data.

    \b
    Exit status:
      0  it answers /healthz (or already did)
      1  no `unitrade up` runs on --data, or it is not healthy within --timeout (or
         the supervisor gave up on it: see DIR/logs/REGION.log)
      2  bad usage: unknown region, neither or both of --region and --control

    \b
    Examples:
      unitrade start --region sh
      unitrade start --control --data /tmp/ut
    """
    files = SupervisorFiles(data_dir.resolve())
    for name in _targets(_live(files), region, control):
        console.print(bring_up(files, name, timeout_s))


def hold_down(files: SupervisorFiles, name: str, kill: bool, timeout_s: float) -> str:
    """Have the `unitrade up` on files' data directory stop NAME (SIGTERM, or SIGKILL with
    `kill`) and keep it down; wait until it has exited. Returns what happened; raises
    NoSupervisor or DrillError. Also the verifier's way to kill a region of a cluster it
    attached to (verify/attached.py)."""
    document = _live(files)
    what = label(name)
    entry = document["processes"][name]
    if entry["state"] == State.HELD:
        return f"{what} is already stopped by the operator"
    started = time.monotonic()
    files.hold(name, KILL if kill else TERM)
    deadline = started + timeout_s
    while True:
        document = _live(files)
        entry = document["processes"][name]
        if entry["state"] == State.HELD and not pid_alive(int(entry["pid"])):
            break
        if time.monotonic() > deadline:
            raise DrillError(
                f"{what} is not down after {timeout_s:g} s (state: {entry['state']}); "
                f"see {files.log_path}"
            )
        time.sleep(POLL_S)
    return (
        f"{what} is down ({describe_exit(entry['exit_code'])}) after "
        f"{time.monotonic() - started:.1f} s, and kept down: "
        f"`unitrade start {option(name)}` starts it again"
    )


def bring_up(files: SupervisorFiles, name: str, timeout_s: float) -> str:
    """Have the `unitrade up` on files' data directory start NAME again (held down, or
    given up on); wait until it answers /healthz. Returns what happened; raises
    NoSupervisor or DrillError."""
    document = _live(files)
    what = label(name)
    config = load(Path(document["config"]) if document.get("config") else None)
    url = str(document["processes"][name]["url"]) + "/healthz"
    started = time.monotonic()
    deadline = started + timeout_s
    with httpx.Client(timeout=2.0, verify=config.http_verify) as client:
        entry = document["processes"][name]
        if entry["state"] == State.RUNNING and _healthy(client, url):
            return f"{what} is already running (pid {entry['pid']})"
        if entry["state"] != State.RUNNING:
            files.request_start(name)
        taken_at: float | None = None  # wall clock: when the request was seen consumed
        while True:
            # The request first: a state file written before it was consumed says nothing
            # of what became of it (`up` rewrites the file at least every second).
            taken = not files.start_pending(name)
            if taken and taken_at is None:
                taken_at = time.time()
            document = _live(files)
            entry = document["processes"][name]
            fresh = taken_at is not None and files.state_path.stat().st_mtime > taken_at
            if taken and fresh and entry["state"] == State.FAILED:
                raise DrillError(
                    f"{what} failed to start: {describe_exit(entry['exit_code'])}, restarted "
                    f"{entry['restarts']} times; see {files.data_dir}/logs/{name}.log"
                )
            if taken and fresh and entry["state"] in (State.HELD, State.STOPPING):
                raise DrillError(f"{what} was stopped again meanwhile")
            if taken and entry["state"] == State.RUNNING and _healthy(client, url):
                break
            if time.monotonic() > deadline:
                raise DrillError(
                    f"{what} is not healthy after {timeout_s:g} s (state: {entry['state']}); "
                    f"see {files.data_dir}/logs/{name}.log"
                )
            time.sleep(POLL_S)
    return f"{what} is up (pid {entry['pid']}), healthy after {time.monotonic() - started:.1f} s"


def _live(files: SupervisorFiles) -> dict[str, Any]:
    document, why = files.live_state()
    if document is None:
        raise NoSupervisor(
            f"no `unitrade up` is running on {files.data_dir} ({why}); "
            f"is --data / {DATA_ENVVAR} the directory `unitrade up` was given?"
        )
    return document


def _targets(document: dict[str, Any], region: str | None, control: bool) -> list[str]:
    """The processes named: the control plane, a region's (every worker of a region of
    many), or one worker's (REGION.K)."""
    if control == (region is not None):
        raise click.UsageError("give either --region REGION or --control")
    name = CONTROL_NAME if control else str(region)
    processes = document["processes"]
    regions = [n for n, p in processes.items() if p.get("kind") == "region"]
    workers = [n for n in regions if processes[n].get("region") == name and n != name]
    if name != CONTROL_NAME and name not in regions and not workers:
        raise click.BadParameter(
            f"unknown region {name!r}; the regions of this cluster: {', '.join(regions)}",
            param_hint="--region",
        )
    if name not in processes and not workers:
        raise click.ClickException(f"the `unitrade up` on {document['data_dir']} has no {name}")
    return [name] if name in processes else workers


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(url).status_code == 200
    except httpx.TransportError:
        return False


def supervisor_notes(data_dir: Path, urls: dict[str, str]) -> dict[str, str]:
    """For `unitrade status`: the supervisor's state of each process (name -> its URL) that
    is not simply running (`stopped by operator`, `restarting`, `failed`), when a live
    `unitrade up` on data_dir runs that process at that URL."""
    document, _why = SupervisorFiles(data_dir.resolve()).live_state()
    if document is None:
        return {}
    notes = {}
    for name, url in urls.items():
        entry = document.get("processes", {}).get(name)
        if isinstance(entry, dict) and entry.get("url") == url:
            if entry.get("state") != State.RUNNING:
                notes[name] = str(entry.get("state"))
    return notes
