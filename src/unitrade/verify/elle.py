"""The history in the shapes elle-cli's `set-full` and `bank` models read (JSON, one
operation per line): written beside history.jsonl so that a run can be checked by Jepsen's
checkers as well where Java 21 is at hand (docs/operations.md, "Verifying a cluster").

set-full: each order creation is an `add` of its order ID (the ID from the answer, on the
invoke too; a creation that failed or whose outcome is unknown has no ID and is left out),
and the reads of every acknowledged order from one region at the end are one `read` of the
set of IDs that region answered.
bank: per SKU, one file whose accounts are 0 available, 1 reserved, 2 sold, each stock poll
a `read` of the three; their total is the stock set (`--total-amount`)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from unitrade.verify.history import OK, History


def set_full(history: History) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    reads: dict[str, list[int]] = defaultdict(list)
    read_times: dict[str, list[int]] = defaultdict(list)
    for invoke, done in history.pairs():
        if done is None:
            continue
        if invoke.f == "create" and "order_id" in done.value:
            element = int(done.value["order_id"])
            for event in (invoke, done):
                ops.append(_op(event.type, "add", event.process, event.time_ns, element))
        elif invoke.f == "final":
            read_times[invoke.region] += [invoke.time_ns, done.time_ns]
            if done.type == OK:
                reads[invoke.region].append(int(invoke.value["order_id"]))
    for n, (region, times) in enumerate(sorted(read_times.items())):
        process = 10_000 + n
        ops.append(_op("invoke", "read", process, min(times), None))
        ops.append(_op("ok", "read", process, max(times), sorted(reads[region])))
    return _indexed(ops)


def bank(history: History) -> dict[str, list[dict[str, Any]]]:
    per_sku: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for invoke, done in history.pairs():
        if done is None or invoke.f != "inventory":
            continue
        sku = invoke.value["sku"]
        per_sku[sku].append(_op("invoke", "read", invoke.process, invoke.time_ns, None))
        value = None
        if done.type == OK:
            value = {0: done.value["available"], 1: done.value["reserved"], 2: done.value["sold"]}
        per_sku[sku].append(_op(done.type, "read", done.process, done.time_ns, value))
    return {sku: _indexed(ops) for sku, ops in per_sku.items()}


def _op(type_: str, f: str, process: int, time_ns: int, value: Any) -> dict[str, Any]:
    return {"type": type_, "f": f, "process": process, "time": time_ns, "value": value}


def _indexed(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ops.sort(key=lambda op: op["time"])
    for n, op in enumerate(ops):
        op["index"] = n
    return ops


def write(out: Path, history: History) -> list[Path]:
    """elle-set-full.json and elle-bank-SKU.json in `out`; the paths written."""
    written = [out / "elle-set-full.json"]
    _lines(written[0], set_full(history))
    for sku, ops in sorted(bank(history).items()):
        written.append(out / f"elle-bank-{sku}.json")
        _lines(written[-1], ops)
    return written


def _lines(path: Path, ops: list[dict[str, Any]]) -> None:
    with open(path, "w") as file:
        for op in ops:
            file.write(json.dumps(op) + "\n")
