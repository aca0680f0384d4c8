"""`unitrade limits` and `unitrade degrade`: the flow rules (rate limits, overload
protection, circuit breakers, degradation switches) read and changed live through the
control plane. Every change is a new rule version, pushed to every region and
acknowledged; the command says which regions acknowledged it."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from unitrade.cli_options import compact_table, config_option, load
from unitrade.control.cli import ControlApi, _fail
from unitrade.topology.flow_rules import LIMITS, SWITCHES, LimitMode

console = Console()
BUSY_WAIT_S = 10.0  # how long a change waits for a running switch or failover to end
BUSY_POLL_S = 0.5


def _change(api: ControlApi, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """PUT a change; while a switch or failover runs (operation_running) try again for
    up to BUSY_WAIT_S. Exits 1 on a refusal."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        code, answer = api.call("PUT", path, body)
        busy = isinstance(answer, dict) and answer.get("error") == "operation_running"
        if code == 409 and busy and time.monotonic() < deadline:
            time.sleep(BUSY_POLL_S)
            continue
        if code != 200:
            _fail(code, answer)
        return dict(answer)


def _acknowledged(answer: dict[str, Any]) -> None:
    version = answer["rule_version"]
    acked = ", ".join(answer["acknowledged"]) or "none"
    console.print(f"flow rules at rule version {version}; acknowledged by {acked}")
    if answer["not_acknowledged"]:
        console.print(
            f"[yellow]not acknowledged yet[/] by {', '.join(answer['not_acknowledged'])} "
            "(they take it when they next reach the control plane)"
        )
        sys.exit(1)


def _print_limits(answer: dict[str, Any]) -> None:
    flow = answer["flow"]
    table = compact_table(
        f"limits (flow rules of rule version {flow['version']}, in force at rule "
        f"{answer['rule_version']})",
        "rate: per second per key; burst: at once after idle; modes: reject, warm_up "
        "(warm-up s), queue (wait ms max / waiting max)",
    )
    for column in ("limit", "on", "rate", "burst", "mode", "more", "applies to"):
        table.add_column(column, no_wrap=column != "applies to")
    for name, limit in flow["limits"].items():
        burst = limit["burst"] if limit["burst"] is not None else "1 s"
        more = []
        if limit["mode"] == "warm_up":
            more.append(f"{limit['warm_up_s']:g} s from 1/{limit['cold_factor']:g}")
        if limit["mode"] == "queue":
            more.append(f"{limit['queue_ms_max']} ms / {limit['queue_max']}")
        if limit["concurrency_max"]:
            more.append(f"at once {limit['concurrency_max']}")
        if limit["overrides"]:
            more.append(", ".join(f"{k}={v:g}" for k, v in limit["overrides"].items()))
        table.add_row(
            name,
            "yes" if limit["enabled"] else "[yellow]off[/]",
            f"{limit['rate_per_s']:g}",
            str(burst),
            limit["mode"],
            "; ".join(more) or "-",
            LIMITS[name],
        )
    console.print(table)
    overload, breakers = flow["overload"], flow["breakers"]
    console.print(
        f"overload: {'on' if overload['enabled'] else 'off'}, shed past a "
        f"{overload['loop_delay_ms_max']} ms late event loop"
        + (f", or {overload['in_flight_max']} in flight" if overload["in_flight_max"] else "")
    )
    console.print(
        f"breakers: {'on' if breakers['enabled'] else 'off'}, open at "
        f"{breakers['error_ratio_max']:g} failed or {breakers['slow_ratio_max']:g} slower than "
        f"{breakers['slow_ms']} ms of at least {breakers['calls_min']} calls in "
        f"{breakers['window_ms']} ms; open {breakers['open_ms']} ms, {breakers['probes']} "
        "probe(s) half-open"
    )


@click.group(invoke_without_command=True)
@config_option
@click.pass_context
def limits(ctx: click.Context, config_path: Path | None) -> None:
    """Rate limits, overload protection and circuit breakers, changed live.

    Without a subcommand: list them (as `limits list`). Each change is a new rule version
    that the control plane pushes to every region; the command prints which regions
    acknowledged it, and exits 1 if some connected region did not in time.

    \b
    Examples:
      unitrade limits
      unitrade limits set buyer --rate 5 --burst 10
      unitrade limits set order_sku --override phone-1=50
      unitrade limits set region --mode warm_up --warm-up-s 10 --concurrency-max 256
      unitrade limits set order_buyer --mode queue --queue-ms-max 300
      unitrade limits overload --loop-delay-ms-max 50
      unitrade limits breakers --error-ratio-max 0.3 --open-ms 10000
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    if ctx.invoked_subcommand is None:
        with ControlApi(load(config_path)) as api:
            code, answer = api.call("GET", "/v1/flow")
            if code != 200:
                _fail(code, answer)
            _print_limits(answer)


def _config(ctx: click.Context, config_path: Path | None) -> Path | None:
    return config_path if config_path is not None else ctx.obj.get("config_path")


@limits.command("list")
@config_option
@click.pass_context
def list_limits(ctx: click.Context, config_path: Path | None) -> None:
    """List every limit, overload protection and the breakers."""
    with ControlApi(load(_config(ctx, config_path))) as api:
        code, answer = api.call("GET", "/v1/flow")
        if code != 200:
            _fail(code, answer)
        _print_limits(answer)


@limits.command("set")
@config_option
@click.argument("name", type=click.Choice(sorted(LIMITS)))
@click.option("--rate", "rate_per_s", type=float, help="Requests per second per key.")
@click.option("--burst", type=int, help="How many at once after an idle spell.")
@click.option("--mode", type=click.Choice([m.value for m in LimitMode]), help="What a burst gets.")
@click.option("--warm-up-s", type=float, help="warm_up: seconds from cold to the full rate.")
@click.option("--cold-factor", type=float, help="warm_up: a cold limit admits rate / this.")
@click.option("--queue-ms-max", type=int, help="queue: the longest a request waits its turn.")
@click.option("--queue-max", type=int, help="queue: at most this many wait at once.")
@click.option("--concurrency-max", type=int, help="region: requests in the gateway at once.")
@click.option(
    "--override",
    "overrides",
    multiple=True,
    metavar="VALUE=RATE",
    help="order_sku: a hot SKU's own rate (repeat; replaces the overrides given before).",
)
@click.option("--clear-overrides", is_flag=True, help="order_sku: drop every override.")
@click.option("--enable/--disable", "enabled", default=None, help="Turn the limit on or off.")
@click.pass_context
def set_limit(
    ctx: click.Context,
    /,
    config_path: Path | None,
    name: str,
    overrides: tuple[str, ...],
    clear_overrides: bool,
    **fields: Any,
) -> None:
    """Change the limit NAME live (the fields not given stay; a new --rate without --burst
    makes the burst one second's worth)."""
    body = {k: v for k, v in fields.items() if v is not None}
    if overrides or clear_overrides:
        parsed: dict[str, float] = {}
        for text in overrides:
            value, sep, rate = text.partition("=")
            try:
                parsed[value] = float(rate)
            except ValueError:
                sep = ""
            if not sep or not value:
                raise click.BadParameter(f"{text!r}: give VALUE=RATE", param_hint="--override")
        body["overrides"] = parsed
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    with ControlApi(load(_config(ctx, config_path))) as api:
        answer = _change(api, f"/v1/flow/limits/{name}", body)
        _print_limits(answer)
        _acknowledged(answer)


@limits.command("overload")
@config_option
@click.option("--loop-delay-ms-max", type=int, help="Shed past an event loop this late.")
@click.option("--in-flight-max", type=int, help="Shed past this many in flight (0: no bound).")
@click.option("--enable/--disable", "enabled", default=None, help="Turn shedding on or off.")
@click.pass_context
def set_overload(ctx: click.Context, /, config_path: Path | None, **fields: Any) -> None:
    """Change overload protection live."""
    body = {k: v for k, v in fields.items() if v is not None}
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    with ControlApi(load(_config(ctx, config_path))) as api:
        answer = _change(api, "/v1/flow/overload", body)
        _print_limits(answer)
        _acknowledged(answer)


@limits.command("breakers")
@config_option
@click.option("--window-ms", type=int, help="The window calls are judged over.")
@click.option("--calls-min", type=int, help="Fewer calls in the window never open it.")
@click.option("--error-ratio-max", type=float, help="Open at this share of failed calls.")
@click.option("--slow-ratio-max", type=float, help="Open at this share of slow calls.")
@click.option("--slow-ms", type=int, help="A call slower than this is slow.")
@click.option("--open-ms", type=int, help="How long it fails fast before probing.")
@click.option("--probes", type=int, help="Half-open: calls let through to decide.")
@click.option("--enable/--disable", "enabled", default=None, help="Turn the breakers on or off.")
@click.pass_context
def set_breakers(ctx: click.Context, /, config_path: Path | None, **fields: Any) -> None:
    """Change the circuit breakers' settings live."""
    body = {k: v for k, v in fields.items() if v is not None}
    if not body:
        raise click.UsageError("nothing to change: give at least one option")
    with ControlApi(load(_config(ctx, config_path))) as api:
        answer = _change(api, "/v1/flow/breakers", body)
        _print_limits(answer)
        _acknowledged(answer)


def _print_switches(answer: dict[str, Any]) -> None:
    table = compact_table(
        f"degradation switches (rule version {answer['rule_version']})",
        "on: what the switch names is turned off",
    )
    for column in ("switch", "state", "when on"):
        table.add_column(column, no_wrap=column != "when on")
    for name, switch in answer["switches"].items():
        state = "[yellow]on[/]" if switch["on"] else "off"
        table.add_row(name, state, switch["turns_off"])
    console.print(table)


@click.command()
@config_option
@click.argument("switch", required=False, type=click.Choice(sorted(SWITCHES)))
@click.argument("state", required=False, type=click.Choice(["on", "off"]))
def degrade(config_path: Path | None, switch: str | None, state: str | None) -> None:
    """Degradation switches: turn off what is not essential during a sale.

    Without arguments, list them. `unitrade degrade SWITCH STATE`: STATE `on` turns off
    what SWITCH names in every region (a new rule version, pushed and acknowledged); `off`
    turns it back.

    \b
    Switches:
      order_list_owner_reads  order lists from the region called (its replica), not the owner
      catalog_owner_reads     no read of the global owner for a SKU the replica lacks
      cart_writes             cart lines cannot be added or removed (checkout still works)
      admin_writes            admin product and stock writes are refused
    """
    with ControlApi(load(config_path)) as api:
        if switch is None:
            code, answer = api.call("GET", "/v1/flow")
            if code != 200:
                _fail(code, answer)
            _print_switches(answer)
            return
        if state is None:
            raise click.UsageError("give on or off after the switch")
        answer = _change(api, f"/v1/flow/switches/{switch}", {"on": state == "on"})
        _print_switches(answer)
        _acknowledged(answer)
