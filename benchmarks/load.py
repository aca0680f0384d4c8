"""The load the benchmarks share: a plan of prebuilt order requests, an open loop that sends
them at a fixed rate and records every answer, a client of the control plane's API, the
products they order, and the figures (percentiles, CPU per process) their reports use.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from benchmarks.harness import (
    BenchError,
    Pool,
    cpu_seconds,
    error_code,
    machine_busy_seconds,
    order_request,
    self_cpu_seconds,
)
from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.topology.rule import initial_rule, route_buyer, rule_from_body
from unitrade.web.tokens import issue_token

PLAN_LENGTH = 4_000
REQUEST_TIMEOUT_S = 10.0  # a request not answered by then counts as a client error
OPERATION_TIMEOUT_S = 60.0  # an operation not ended by then is given up on
SEED_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 20.0
DRAIN_S = REQUEST_TIMEOUT_S + 5.0
ERRORS_PRINTED = 20


# -- the plan and the open loop ----------------------------------------------------------------


@dataclass
class Sample:
    due: float  # perf_counter seconds
    sent: float
    latency_s: float  # until the answer, or until the error when there was none
    status: int  # 0 when there was no answer
    code: str  # error code of a non-2xx answer, or the exception's name
    moved: bool  # the buyer is in the moved cell
    idle_s: float = math.nan  # how long its keep-alive connection was idle; nan: a new one

    def overlaps(self, start: float, end: float) -> bool:
        """Whether the request was outstanding at some time in [start, end)."""
        return self.sent < end and self.sent + self.latency_s >= start


@dataclass
class Plan:
    """Prebuilt requests: (port, bytes, buyer in the moved cell), taken in turn."""

    requests: list[tuple[int, bytes, bool]]

    def cycle(self) -> Iterator[tuple[int, bytes, bool]]:
        while True:
            yield from self.requests


def buyers_by_cell(config: TopologyConfig, moved_cell: int, per_side: int) -> dict[str, list[int]]:
    """`per_side` buyers of the moved cell, and as many of the other unit cells (taken from
    each of them in turn)."""
    rule = initial_rule(config)
    others = sorted(c.id for c in config.cells if c.kind is CellKind.UNIT and c.id != moved_cell)
    quota = {moved_cell: per_side} | dict.fromkeys(others, math.ceil(per_side / len(others)))
    found: dict[int, list[int]] = {cell: [] for cell in quota}
    buyer = 2_000_001
    while any(len(found[cell]) < n for cell, n in quota.items()):
        cell = route_buyer(rule, buyer).cell
        if cell in found and len(found[cell]) < quota[cell]:
            found[cell].append(buyer)
        buyer += 1
    other = [b for group in zip(*(found[c] for c in others), strict=True) for b in group]
    return {"moved": found[moved_cell], "other": other[:per_side]}


def make_plan(
    config: TopologyConfig,
    buyers: dict[str, list[int]],
    moved_share: float,
    seed: int,
    skus: Sequence[str],
    regions: Sequence[str] | None = None,
) -> Plan:
    """Order creations for buyers of `buyers["moved"]` (a share `moved_share`) and of
    `buyers["other"]`, each with one or two of `skus`, sent to a gateway of `regions`
    (default: every region) chosen at random."""
    rng = random.Random(seed)
    ports = [config.region(r).port for r in (regions or config.region_names)]
    tokens: dict[int, str] = {}
    requests: list[tuple[int, bytes, bool]] = []
    for _ in range(PLAN_LENGTH):
        moved = rng.random() < moved_share
        buyer = rng.choice(buyers["moved" if moved else "other"])
        token = tokens.get(buyer) or tokens.setdefault(
            buyer, issue_token(config.token_keys, buyer_id=buyer)
        )
        chosen = rng.sample(list(skus), rng.randint(1, 2))
        body = orjson.dumps({"items": [{"sku": s, "qty": rng.randint(1, 3)} for s in chosen]})
        port = rng.choice(ports)
        requests.append((port, order_request(port, token, body), moved))
    return Plan(requests)


async def open_loop(
    plan: Plan,
    rate: float,
    in_flight: int,
    stop: asyncio.Event,
    samples: list[Sample],
    connections: dict[str, int],
    error_bodies: dict[str, str],
) -> None:
    """Request i is due at t0 + i / rate; at most `in_flight` outstanding; until `stop`."""
    clock = time.perf_counter
    pool = Pool()
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()
    printed = [0]  # client errors printed so far

    async def one(port: int, request: bytes, moved: bool, due: float) -> None:
        connection = pool.take(port)
        idle_s = time.monotonic() - connection.last_used if connection.uses else math.nan
        sent = clock()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                reply = await connection.send(request)
        except (OSError, asyncio.IncompleteReadError, BenchError, TimeoutError) as exc:
            name = type(exc).__name__
            samples.append(Sample(due, sent, clock() - sent, 0, name, moved, idle_s))
            error_bodies.setdefault(name, str(exc)[:300])
            printed[0] += 1
            if printed[0] <= ERRORS_PRINTED:
                print(
                    f"    client error: {name}: {exc} (connection "
                    + ("new)" if math.isnan(idle_s) else f"reused after {idle_s:.2f} s idle)"),
                    flush=True,
                )
            return
        finally:
            slots.release()
            pool.give(connection)
        end = clock()
        code = "" if 200 <= reply.status < 300 else error_code(reply.body)
        samples.append(Sample(due, sent, end - sent, reply.status, code, moved, idle_s))
        if code:
            error_bodies.setdefault(
                f"{reply.status} {code}", reply.body[:300].decode("utf-8", "replace")
            )
            printed[0] += 1
            if printed[0] <= ERRORS_PRINTED:
                print(f"    client error: {reply.status} {reply.body[:200]!r}", flush=True)

    requests = plan.cycle()
    t0 = clock()
    try:
        for i in range(10**9):
            due = t0 + i / rate
            if stop.is_set():
                break
            wait = due - clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                if stop.is_set():
                    break
            await slots.acquire()
            port, request, moved = next(requests)
            task = asyncio.create_task(one(port, request, moved, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=DRAIN_S)
    finally:
        for task in tasks:
            task.cancel()
        pool.close()
        connections.update(opened=pool.opened, retired_idle=pool.retired)


# -- the control plane -----------------------------------------------------------------------


class ControlClient:
    def __init__(self, config: TopologyConfig) -> None:
        token = issue_token(config.token_keys, admin=True)
        self.http = httpx.AsyncClient(
            base_url=config.control.base_url,
            timeout=httpx.Timeout(OPERATION_TIMEOUT_S),
            headers={"authorization": f"Bearer {token}"},
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def wait_connected(self) -> None:
        """Until every region watches the control plane and acknowledges its rule."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        text = ""
        while time.monotonic() < deadline:
            answer = await self.http.get("/v1/regions")
            text = answer.text
            if answer.status_code == 200:
                body = answer.json()
                version = body["rule_version"]
                if all(r["connected"] and r["version"] == version for r in body["regions"]):
                    return
            await asyncio.sleep(0.1)
        raise BenchError(f"regions not connected to the control plane: {text[:500]}")

    async def owner(self, cell: str) -> str:
        answer = await self.http.get("/v1/rules/current")
        if answer.status_code != 200:
            raise BenchError(f"GET /v1/rules/current: {answer.status_code} {answer.text[:300]}")
        return owner_in(answer.json(), cell)

    async def switch(self, cell: str, to: str) -> dict[str, Any]:
        """Start a switch and wait until it ends; the operation, with the client's timings
        (perf_counter seconds) under `_client`."""
        clock = time.perf_counter
        started = clock()
        answer = await self.http.post("/v1/switch", json={"cells": [cell], "to": to})
        accepted = clock()
        if answer.status_code != 202:
            body = (
                answer.json()
                if answer.headers.get("content-type", "").startswith("application/json")
                else {"text": answer.text[:500]}
            )
            return {
                "state": f"http {answer.status_code}",
                "detail": {},
                "error": str(body),
                "_client": {"started": started, "accepted": accepted, "ended": clock()},
            }
        op_id = answer.json()["id"]
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            got = await self.http.get(f"/v1/operations/{op_id}", params={"wait_s": min(30, left)})
            if got.status_code != 200:
                raise BenchError(f"GET /v1/operations/{op_id}: {got.status_code} {got.text[:300]}")
            op: dict[str, Any] = got.json()
            if op["state"] != "running" or time.monotonic() >= deadline - 0.5:
                break
        op["_client"] = {"started": started, "accepted": accepted, "ended": clock()}
        return op


def owner_in(rule_body: dict[str, Any], cell: str) -> str:
    """The owner of a cell (by name) in a rule body."""
    rule = rule_from_body(rule_body)
    for info in rule.cells.values():
        if info.name == cell:
            return rule.owner_of(info.id)
    raise BenchError(f"cell {cell} not in the rule")


async def seed_products(config: TopologyConfig, skus: Sequence[str], stock: int) -> None:
    """Products with stock that never runs out, written at the global cell's owner, and
    visible in every region's copy before the load starts."""
    token = issue_token(config.token_keys, admin=True)
    headers = {"authorization": f"Bearer {token}"}
    owner = next(c.owner for c in config.cells if c.kind is CellKind.GLOBAL)
    async with httpx.AsyncClient(timeout=10.0, headers=headers) as client:
        for i, sku in enumerate(skus):
            body = {"title": f"product {i}", "price_cents": 199 + 100 * i, "stock": stock}
            url = config.region(owner).base_url + f"/v1/admin/products/{sku}"
            answer = await client.put(url, json=body)
            if answer.status_code != 200:
                raise BenchError(f"seeding {sku}: {answer.status_code} {answer.text[:300]}")
        deadline = time.monotonic() + SEED_TIMEOUT_S
        for region in config.region_names:
            for sku in skus:
                url = config.region(region).base_url + f"/v1/products/{sku}"
                while (await client.get(url)).status_code != 200:
                    if time.monotonic() > deadline:
                        raise BenchError(f"{sku} not replicated to {region}")
                    await asyncio.sleep(0.05)


def cpu_snapshot(
    pids: dict[str, int],
) -> tuple[float, dict[str, float], float, tuple[float, float]]:
    return (
        time.perf_counter(),
        {n: cpu_seconds(p) for n, p in pids.items()},
        self_cpu_seconds(),
        machine_busy_seconds(),
    )


def cpu_between(
    before: tuple[float, dict[str, float], float, tuple[float, float]],
    after: tuple[float, dict[str, float], float, tuple[float, float]],
) -> tuple[dict[str, float], float]:
    wall = max(after[0] - before[0], 1e-9)
    cores = {n: round((after[1][n] - before[1][n]) / wall, 3) for n in before[1]}
    cores["client"] = round((after[2] - before[2]) / wall, 3)
    busy = (after[3][0] - before[3][0]) / max(after[3][1] - before[3][1], 1e-9)
    # Busy CPU not used by the cluster or the load generator: other processes, the kernel.
    cores["other"] = round(max(0.0, busy * (os.cpu_count() or 1) - sum(cores.values())), 3)
    return cores, round(busy, 3)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def r3(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def latency_figures(samples: Sequence[Sample]) -> dict[str, Any]:
    ok = [s.latency_s * 1000 for s in samples if 200 <= s.status < 300]
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "p50_ms": r3(pct(ok, 0.5)),
        "p99_ms": r3(pct(ok, 0.99)),
        "max_ms": r3(max(ok)) if ok else None,
    }


def between(samples: Sequence[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.sent < end]


def minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)
