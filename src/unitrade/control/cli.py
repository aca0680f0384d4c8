"""`unitrade switch`, `unitrade evacuate` and `unitrade operations`: the operator's side of
the control plane API, with the steps shown as they happen."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console

from unitrade.cli_options import compact_table, config_option, load, not_the_cluster
from unitrade.topology.config import TopologyConfig

console = Console()
POLL_S = 0.1
STEP_TITLES = {
    "precheck": "pre-check: target healthy, lag under the limits",
    "ban": "ban the cells; every component acknowledges",
    "catch_up": "final positions at the old owner; target applies them",
    "publish": "publish the new owner; every component acknowledges",
    "verify": "streams run from the new owner to every other region",
    "rollback": "roll back: lift the ban under the old owner",
    "block": "the lost region gets no more write leases",
    "expire": "wait until its last lease has surely ended",
    "promote": "promotion positions (final: the new owners write nothing yet)",
    "report": "the loss report",
    "done": "done",
}


class ControlApi:
    """The operator API of the control plane. With several members (`[[control.members]]`)
    it tries them in turn: a standby answers 503 `not_leader` naming the leader, which is
    asked next; a member that does not answer is skipped."""

    def __init__(self, config: TopologyConfig, timeout_s: float = 10.0) -> None:
        from unitrade.web.tokens import issue_token

        token = issue_token(config.token_keys, admin=True)
        self.urls = config.control.urls
        self.base = self.urls[0]
        self.cell_names = {cell.id: cell.name for cell in config.cells}
        self.http = httpx.Client(
            timeout=timeout_s,
            headers={"authorization": f"Bearer {token}"},
            verify=config.http_verify,
        )

    def __enter__(self) -> ControlApi:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> tuple[int, Any]:
        problems: list[str] = []
        for _ in range(len(self.urls)):
            try:
                answer = self.http.request(
                    method, self.base + path, json=body, params=params or None
                )
            except httpx.HTTPError as exc:
                if len(self.urls) == 1:
                    raise not_the_cluster(
                        f"the control plane at {self.base} is unreachable: {exc}"
                    ) from exc
                problems.append(f"{self.base}: {exc}")
                self.base = self._next()
                continue
            if answer.status_code == 503 and len(self.urls) > 1:
                leader = _not_leader(answer)
                if leader is not None:
                    problems.append(f"{self.base}: a standby")
                    self.base = (
                        leader if leader in self.urls and leader != self.base else (self._next())
                    )
                    continue
            return self._decode(answer)
        raise not_the_cluster(f"no control plane member answered: {'; '.join(problems)}")

    def _next(self) -> str:
        return self.urls[(self.urls.index(self.base) + 1) % len(self.urls)]

    def _decode(self, answer: httpx.Response) -> tuple[int, Any]:
        if answer.status_code == 401:
            raise not_the_cluster(f"the control plane at {self.base} refused: {answer.text}")
        try:
            return answer.status_code, answer.json()
        except ValueError:
            raise click.ClickException(f"control plane answered {answer.status_code}") from None


def _not_leader(answer: httpx.Response) -> str | None:
    """The leader's URL named by a standby's `not_leader` answer ("" when it knows none);
    None when the answer is something else."""
    try:
        body = answer.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("error") != "not_leader":
        return None
    return str(body.get("leader") or "")


def _fail(status: int, body: Any) -> None:
    if isinstance(body, dict) and "error" in body:
        console.print(f"[red]{body['error']}[/]: {body.get('message', '')}")
        if body.get("operation"):
            console.print(f"operation {body['operation']} (see `unitrade operations`)")
    else:
        console.print(f"[red]control plane answered {status}[/]: {body}")
    sys.exit(1)


def follow(api: ControlApi, operation_id: str, timeout_s: float) -> dict[str, Any]:
    """Print the operation's steps as they happen; the operation once it has ended."""
    shown = 0
    deadline = time.monotonic() + timeout_s
    with console.status(f"{operation_id} running...") as status:
        while True:
            code, op = api.call("GET", f"/v1/operations/{operation_id}", wait_s=0.2)
            if code != 200:
                _fail(code, op)
            for entry in op["log"][shown:]:
                _print_event(entry)
            shown = len(op["log"])
            status.update(f"{operation_id}: step {op['step']}...")
            if op["state"] != "running" or time.monotonic() > deadline:
                return dict(op)
            time.sleep(POLL_S)


def _print_event(entry: dict[str, Any]) -> None:
    step, event, detail = entry["step"], entry["event"], entry["detail"]
    title = STEP_TITLES.get(step, step)
    if event == "begin":
        console.print(f"[cyan]>[/] {step:9} {title}")
    elif event == "done":
        took = detail.get(f"{step}_ms")
        extra = f" ({took} ms)" if took is not None else ""
        console.print(f"[green]v[/] {step:9} done{extra}")
    elif event == "note":
        notes = ", ".join(f"{k}={v}" for k, v in detail.items())
        console.print(f"  {'':9} {notes}")
    else:
        console.print(f"[red]x[/] {step:9} {detail.get('reason') or detail.get('error') or detail}")


def cell_list(api: ControlApi, cells: list[Any]) -> str:
    """Cells by name (u3), as everywhere else; the control plane's API gives their ids."""
    return ", ".join(api.cell_names.get(int(c), str(c)) for c in cells)


def print_figures(api: ControlApi, op: dict[str, Any]) -> None:
    if op["kind"] == "failover":
        from unitrade.control.failover_cli import print_failover

        print_failover(api, op)
        return
    detail = op["detail"]
    table = compact_table(f"{op['kind']} {op['id']}: {op['state']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("cells", cell_list(api, op["cells"])),
        ("from", ", ".join(sorted(set(op["sources"].values())))),
        ("to", op["target"]),
        ("total ms", detail.get("total_ms")),
        ("cells banned ms", detail.get("banned_ms")),
        ("pre-check ms", detail.get("precheck_ms")),
        ("ban + acks ms", detail.get("ban_ms")),
        ("catch-up ms", detail.get("catch_up_ms")),
        ("publish + acks ms", detail.get("publish_ms")),
        ("verify ms", detail.get("verify_ms")),
        ("final positions", detail.get("final_positions")),
        (
            "rule versions",
            f"ban {detail.get('ban_version')}, new owner {detail.get('publish_version')}",
        ),
    ]
    add_figures(table, rows, op["error"])
    console.print(table)


def add_figures(table: Any, rows: list[tuple[str, Any]], error: str) -> None:
    """The rows of an operation's figures that it has, then the reason it failed."""
    for name, value in rows:
        if value is not None:
            table.add_row(name, str(value))
    if error:
        table.add_row("reason", error)


@click.command()
@config_option
@click.option(
    "--cell", "cells", help="Cells to move: names or ids, comma-separated (u3 or u3,u4 or 3)."
)
@click.option("--to", "target", help="The region that will own the cells (hz).")
@click.option(
    "--abort",
    "abort_id",
    metavar="OP",
    help="Roll back the running switch OP (its id, from `unitrade operations`).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(1, 3600),
    default=120.0,
    show_default=True,
    help="Seconds to follow the switch (it goes on in the control plane after that).",
)
def switch(
    config_path: Path | None,
    cells: str | None,
    target: str | None,
    abort_id: str | None,
    timeout_s: float,
) -> None:
    """Move cells to another region; no acknowledged write lost.

    Pre-check (the target is healthy and its lag under the limits; refused before anything
    is banned), ban the cells, wait until the target has applied the old owner's final
    position, publish the new owner, and check that replication now runs from it. Writes
    to the cells are held by the gateways meanwhile: clients see latency, not errors.
    Exit 0 when switched; 1 when refused or rolled back.

    `--abort OP` rolls a running switch back (before its new owner is published).

    \b
    Examples:
      unitrade switch --cell u3 --to hz
      unitrade switch --abort op-1f2e3d4c5b6a
    """
    with ControlApi(load(config_path)) as api:
        _switch(api, cells, target, abort_id, timeout_s)


def _switch(
    api: ControlApi, cells: str | None, target: str | None, abort_id: str | None, timeout_s: float
) -> None:
    if abort_id is not None:
        if cells or target:
            raise click.UsageError("--abort takes no --cell or --to")
        code, body = api.call("POST", f"/v1/operations/{abort_id}/abort")
        if code != 202:
            _fail(code, body)
        console.print(f"abort of {abort_id} requested")
        _finish(api, follow(api, abort_id, timeout_s))
        return
    if not cells or not target:
        raise click.UsageError("give --cell and --to (or --abort OP)")
    names = [c.strip() for c in cells.split(",") if c.strip()]
    code, body = api.call("POST", "/v1/switch", {"cells": names, "to": target})
    if code != 202:
        _fail(code, body)
    console.print(f"switch {body['id']}: cells {', '.join(names)} to {target}")
    _finish(api, follow(api, body["id"], timeout_s))


@click.command()
@config_option
@click.option("--region", required=True, help="The region to empty of owned cells.")
@click.option("--to", "target", required=True, help="The region that takes them.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(1, 3600),
    default=300.0,
    show_default=True,
    help="Seconds to follow the evacuation (it goes on in the control plane after that).",
)
def evacuate(config_path: Path | None, region: str, target: str, timeout_s: float) -> None:
    """Switch every cell a region owns to another region.

    The steps, limits and exit status are those of `unitrade switch`.

    \b
    Example:
      unitrade evacuate --region sh --to hz
    """
    with ControlApi(load(config_path)) as api:
        _evacuate(api, region, target, timeout_s)


def _evacuate(api: ControlApi, region: str, target: str, timeout_s: float) -> None:
    code, body = api.call("POST", "/v1/evacuate", {"region": region, "to": target})
    if code != 202:
        _fail(code, body)
    cells = cell_list(api, body["cells"])
    console.print(f"evacuate {body['id']}: cells {cells} of {region} to {target}")
    _finish(api, follow(api, body["id"], timeout_s))


def _finish(api: ControlApi, op: dict[str, Any]) -> None:
    print_figures(api, op)
    if op["state"] == "running":
        console.print("[yellow]still running[/]; follow it with `unitrade operations " + op["id"])
        sys.exit(1)
    sys.exit(0 if op["state"] == "done" else 1)


@click.command()
@config_option
@click.argument("operation_id", required=False)
@click.option(
    "--limit",
    type=click.IntRange(1, 200),
    default=20,
    show_default=True,
    help="Operations to list, newest first.",
)
def operations(config_path: Path | None, operation_id: str | None, limit: int) -> None:
    """List the switchovers, or show one with its log and figures.

    Without OPERATION_ID: the newest operations, one per row, with their full ids (what
    `unitrade switch --abort` takes). With OPERATION_ID (op-...): its steps as logged and
    its figures.

    \b
    Examples:
      unitrade operations --limit 5
      unitrade operations op-1f2e3d4c5b6a
    """
    with ControlApi(load(config_path)) as api:
        _operations(api, operation_id, limit)


def _operations(api: ControlApi, operation_id: str | None, limit: int) -> None:
    if operation_id is not None:
        code, op = api.call("GET", f"/v1/operations/{operation_id}")
        if code != 200:
            _fail(code, op)
        for entry in op["log"]:
            _print_event(entry)
        print_figures(api, op)
        return
    code, body = api.call("GET", "/v1/operations", limit=limit)
    if code != 200:
        _fail(code, body)
    # The id is never cut (it is what --abort takes): the reason wraps instead.
    table = compact_table("operations (newest first)")
    table.add_column(
        "id", no_wrap=True, min_width=max([2, *(len(o["id"]) for o in body["operations"])])
    )
    for column in ("kind", "cells", "to", "state", "step", "total ms"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason", overflow="fold")
    for op in body["operations"]:
        table.add_row(
            op["id"],
            op["kind"],
            ",".join(api.cell_names.get(int(c), str(c)) for c in op["cells"]),
            op["target"],
            op["state"],
            op["step"],
            str(op["detail"].get("total_ms", "-")),
            op["error"][:60],
        )
    console.print(table)
