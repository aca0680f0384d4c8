"""`unitrade sale` and `unitrade coupon`: flash sales and coupons, through the admin API of
any region (each forwards to the owner of the center cell, where sales and coupons live).
docs/operations.md, Running a sale."""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx
from rich.console import Console

from unitrade.cli_options import compact_table, config_option, load, not_the_cluster
from unitrade.topology.config import TopologyConfig

console = Console()
ADMIN_TOKEN_TTL_S = 300
_RELATIVE = re.compile(r"^\+([0-9]{1,9})([smhd])$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_time_ms(text: str, now_s: float | None = None) -> int:
    """`now`, `+30s` / `+10m` / `+2h` / `+1d` from now, unix seconds, or ISO 8601
    (`2026-11-11T00:00:00+08:00`; without an offset, this machine's local time)."""
    now = time.time() if now_s is None else now_s
    text = text.strip()
    if text == "now":
        return int(now * 1000)
    relative = _RELATIVE.match(text)
    if relative is not None:
        return int((now + int(relative.group(1)) * _UNITS_S[relative.group(2)]) * 1000)
    if text.isdigit():
        return int(text) * 1000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: use now, +30m, unix seconds or ISO 8601 (2026-11-11T00:00:00+08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return int(moment.timestamp() * 1000)


def parse_duration_s(text: str) -> int:
    """`90`, `90s`, `30m`, `12h` or `7d` in seconds."""
    found = re.fullmatch(r"([0-9]{1,9})([smhd]?)", text.strip())
    if found is None or int(found.group(1)) == 0:
        raise click.BadParameter(f"{text!r}: use e.g. 90s, 30m, 12h or 7d")
    return int(found.group(1)) * _UNITS_S[found.group(2) or "s"]


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def _window(start_ms: int, end_ms: int) -> str:
    """A sale's window in few characters (local time): the end's date only if it differs."""
    start = datetime.fromtimestamp(start_ms / 1000, UTC).astimezone()
    end = datetime.fromtimestamp(end_ms / 1000, UTC).astimezone()
    tail = "%H:%M" if end.date() == start.date() else "%m-%d %H:%M"
    return f"{start:%m-%d %H:%M}-{end.strftime(tail)}"


def admin_call(config: TopologyConfig, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Send an admin request to the regions in turn; the first that answers forwards it to
    the center cell's owner. (status, JSON body)."""
    from unitrade.web.tokens import issue_token

    token = issue_token(config.token_keys, admin=True, ttl_s=ADMIN_TOKEN_TTL_S)
    headers = {"authorization": f"Bearer {token}"}
    failures = []
    with httpx.Client(timeout=15.0, verify=config.http_verify) as client:
        for region in config.regions:
            try:
                answer = client.request(method, region.base_url + path, json=body, headers=headers)
            except httpx.HTTPError as exc:
                failures.append(f"{region.name}: {type(exc).__name__}")
                continue
            if answer.status_code == 401:
                raise not_the_cluster(f"{region.name} refused the admin token: {answer.text}")
            try:
                return answer.status_code, answer.json()
            except ValueError:
                return answer.status_code, {"error": "not_json", "message": answer.text[:200]}
    raise not_the_cluster("no region answered: " + "; ".join(failures))


def _fail(status: int, body: Any) -> None:
    error = body.get("error", status) if isinstance(body, dict) else status
    message = body.get("message", "") if isinstance(body, dict) else str(body)
    raise click.ClickException(f"{error}: {message}")


# -- sale ------------------------------------------------------------------------------------


@click.group("sale")
def sale() -> None:
    """Flash sales: a SKU sold to holders of a bounded number of tokens.

    \b
    A buyer asks for a token (POST /v1/sales/ID/tokens) and orders the SKU with it; at
    most --tokens tokens are issued, at most --per-buyer per buyer, and the SKU's stock
    (--stock units) is reserved at the center like any order's: never oversold.
    """


@sale.command("create")
@config_option
@click.option("--sku", required=True, help="The SKU on sale (a product of the catalog).")
@click.option(
    "--stock",
    type=click.IntRange(0, 10**9),
    required=True,
    help="Units for sale: the SKU's available stock becomes this.",
)
@click.option(
    "--tokens",
    type=click.IntRange(1, 10**9),
    required=True,
    help="Tokens issued at most (M); more than --stock, e.g. 10x or 100x.",
)
@click.option(
    "--per-buyer",
    type=click.IntRange(1, 100),
    default=1,
    show_default=True,
    help="Tokens one buyer may hold (K); a token buys one unit.",
)
@click.option(
    "--start",
    "start",
    default="now",
    show_default=True,
    help="When it starts: now, +10m, unix seconds or ISO 8601 (local time without offset).",
)
@click.option("--end", "end", required=True, help="When it ends (same forms as --start).")
@click.option(
    "--segment-size",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Tokens handed to a region's process at a time: what a region that dies may lose.",
)
def sale_create(
    config_path: Path | None,
    sku: str,
    stock: int,
    tokens: int,
    per_buyer: int,
    start: str,
    end: str,
    segment_size: int,
) -> None:
    """Create a sale; prints its ID.

    \b
    Example:
      unitrade sale create --sku PHONE-1 --stock 5000 --tokens 500000 --per-buyer 1 \\
          --start 2026-11-11T00:00:00+08:00 --end 2026-11-11T00:10:00+08:00
    """
    config = load(config_path)
    body = {
        "sku": sku,
        "stock": stock,
        "tokens": tokens,
        "per_buyer": per_buyer,
        "start_ms": parse_time_ms(start),
        "end_ms": parse_time_ms(end),
        "segment_size": segment_size,
    }
    status, answer = admin_call(config, "POST", "/v1/admin/sales", body)
    if status != 201:
        _fail(status, answer)
    console.print(
        f"sale [bold]{answer['sale_id']}[/]: {answer['stock']} units of {answer['sku']} for "
        f"{answer['tokens']} tokens, {answer['per_buyer']} per buyer, "
        f"{_when(answer['start_ms'])} to {_when(answer['end_ms'])} ({answer['state']})",
        soft_wrap=True,
    )
    click.echo(answer["sale_id"])


@sale.command("list")
@config_option
@click.option(
    "--limit",
    type=click.IntRange(1, 500),
    default=50,
    show_default=True,
    help="Sales listed, newest start first.",
)
def sale_list(config_path: Path | None, limit: int) -> None:
    """List sales: window, state, tokens and the quota not yet handed to any region."""
    config = load(config_path)
    status, answer = admin_call(config, "GET", f"/v1/admin/sales?limit={limit}")
    if status != 200:
        _fail(status, answer)
    table = compact_table(
        "sales",
        "window: local time; left: tokens not handed to any region yet (stock and the "
        "per-buyer limit: `unitrade sale show`)",
    )
    for column in ("sale", "sku", "state", "window", "tokens", "left"):
        table.add_column(column, no_wrap=column != "sku", overflow="fold")
    table.columns[1].min_width = 10
    for s in answer["sales"]:
        table.add_row(
            s["sale_id"],
            s["sku"],
            s["state"],
            _window(s["start_ms"], s["end_ms"]),
            str(s["tokens"]),
            str(s["remaining"]),
        )
    console.print(table)


@sale.command("show")
@config_option
@click.argument("sale_id")
def sale_show(config_path: Path | None, sale_id: str) -> None:
    """Show sale SALE_ID and where every one of its tokens is.

    Tokens: remaining at the center, issued (in buyers' cells; used: bought a unit),
    unissued in the segments regions hold now, lost (in segments of a process that died).
    The four add up to the sale's tokens: exit 0 when they do, 1 when not (named).
    Issued tokens are counted in the center region's copies of the unit cells: exact once
    replication has caught up (`unitrade status` shows the lag).
    """
    config = load(config_path)
    status, s = admin_call(config, "GET", f"/v1/admin/sales/{sale_id}")
    if status != 200:
        _fail(status, s)
    console.print(
        f"sale [bold]{s['sale_id']}[/] of {s['sku']}: {s['state']}, "
        f"{_when(s['start_ms'])} to {_when(s['end_ms'])}; {s['tokens']} tokens, "
        f"{s['per_buyer']} per buyer, segments of {s['segment_size']}",
        soft_wrap=True,
    )
    table = compact_table("tokens")
    table.add_column("where")
    table.add_column("tokens", justify="right")
    table.add_row("remaining at the center", str(s["remaining"]))
    table.add_row(f"issued to buyers ({s['used']} used)", str(s["issued"]))
    regions = ", ".join(f"{r} {n}" for r, n in sorted(s["unissued_by_region"].items()))
    table.add_row(
        "unissued in segments" + (f" ({regions})" if regions else ""),
        str(s["unissued_in_segments"]),
    )
    table.add_row("lost (a holder died)", str(s["lost"]))
    if s["issued_unknown_segments"]:
        table.add_row(
            "[yellow]issued from segments the center does not know[/]",
            str(s["issued_unknown_segments"]),
        )
    console.print(table)
    segments = s["segments"]
    console.print(
        f"segments: {segments.get('open', 0)} open, {segments.get('returned', 0)} given back, "
        f"{segments.get('expired', 0)} never given back"
    )
    levels = s.get("levels")
    if levels:
        console.print(
            f"stock of {s['sku']}: available {levels['available']}, reserved "
            f"{levels['reserved']}, sold {levels['sold']} (sale stock {s['stock']})"
        )
    if s["balanced"]:
        console.print(f"[green]every token accounted for[/]: {s['tokens']}")
        return
    accounted = s["remaining"] + s["issued"] + s["unissued_in_segments"] + s["lost"]
    console.print(
        f"[red]not balanced[/]: {accounted} accounted for (counting tokens of unknown "
        f"segments), {s['tokens']} in the sale; replication may still be catching up"
    )
    sys.exit(1)


# -- coupon ----------------------------------------------------------------------------------


@click.group("coupon")
def coupon() -> None:
    """Coupons: codes buyers claim (once each, N in all) and use at checkout.

    \b
    A buyer claims with POST /v1/coupons/CODE/claim and names the code in an order
    (`coupon`); the claim serves one order at a time and comes back when that order is
    closed or refunded.
    """


@coupon.command("create")
@config_option
@click.option("--code", required=True, help="The code buyers claim (letters, digits, - and _).")
@click.option(
    "--count", type=click.IntRange(1, 10**8), required=True, help="Claims allowed in all (N)."
)
@click.option(
    "--discount",
    required=True,
    help="Cents off (500) or a whole percent off (10%); never more than the order.",
)
@click.option(
    "--min-total",
    "min_total",
    type=click.IntRange(0, 10**12),
    default=0,
    show_default=True,
    help="Orders from this subtotal (cents) only.",
)
@click.option(
    "--valid",
    "valid",
    default="30d",
    show_default=True,
    help="How long it may be claimed and used: 90s, 30m, 12h, 7d (at most 366d).",
)
def coupon_create(
    config_path: Path | None, code: str, count: int, discount: str, min_total: int, valid: str
) -> None:
    """Create a coupon code; the same definition again answers the existing one.

    \b
    Examples:
      unitrade coupon create --code NEW500 --count 10000 --discount 500 --min-total 2000
      unitrade coupon create --code TEN --count 500 --discount 10% --valid 2h
    """
    config = load(config_path)
    body = {
        "code": code,
        "count": count,
        "discount": discount.strip(),
        "min_total_cents": min_total,
        "valid_s": parse_duration_s(valid),
    }
    status, answer = admin_call(config, "POST", "/v1/admin/coupons", body)
    if status != 201:
        _fail(status, answer)
    console.print(
        f"coupon [bold]{answer['code']}[/]: {answer['discount']} off"
        + (f" from {answer['min_total_cents']} cents" if answer["min_total_cents"] else "")
        + f", {answer['count']} claims, until {_when(answer['end_ms'])}",
        soft_wrap=True,
    )


@coupon.command("list")
@config_option
@click.option(
    "--limit",
    type=click.IntRange(1, 500),
    default=50,
    show_default=True,
    help="Coupons listed, newest first.",
)
def coupon_list(config_path: Path | None, limit: int) -> None:
    """List coupons: discount, claims made of the count, end."""
    config = load(config_path)
    status, answer = admin_call(config, "GET", f"/v1/admin/coupons?limit={limit}")
    if status != 200:
        _fail(status, answer)
    table = compact_table("coupons", "until: local time")
    for column in ("code", "discount", "min total", "claimed", "count", "until"):
        table.add_column(column, no_wrap=column != "code", overflow="fold")
    table.columns[0].min_width = 10
    for c in answer["coupons"]:
        table.add_row(
            c["code"],
            c["discount"],
            str(c["min_total_cents"]),
            str(c["claimed"]),
            str(c["count"]),
            _when(c["end_ms"])[:16],
        )
    console.print(table)


@coupon.command("show")
@config_option
@click.argument("code")
def coupon_show(config_path: Path | None, code: str) -> None:
    """Show coupon CODE and its claims: claimed (free), held by an open order, used."""
    config = load(config_path)
    status, c = admin_call(config, "GET", f"/v1/admin/coupons/{code}")
    if status != 200:
        _fail(status, c)
    claims = c["claims"]
    console.print(
        f"coupon [bold]{c['code']}[/]: {c['discount']} off, {c['claimed']} of {c['count']} "
        f"claimed (free {claims.get('claimed', 0)}, held by an order {claims.get('held', 0)}, "
        f"used {claims.get('used', 0)}), until {_when(c['end_ms'])}",
        soft_wrap=True,
    )
