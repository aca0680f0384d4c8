"""The report of a run: on screen (rich) and as report.json in --out."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from unitrade.verify.checks import Ending, Result, availability, errors_by_kind
from unitrade.verify.faults import Applied, Fault
from unitrade.verify.history import History

if TYPE_CHECKING:
    from unitrade.verify.run import Options


def build(
    options: Options,
    plan: list[Fault],
    applied: list[Applied],
    history: History,
    ending: Ending,
    results: list[Result],
) -> dict[str, Any]:
    operations = [(i, c) for i, c in history.pairs() if i.f not in ("fault", "final")]
    return {
        "seed": options.seed,
        "options": {**asdict(options), "out": str(options.out), "attach": _attach(options)},
        "passed": all(r.violations == 0 for r in results),
        "invariants": [r.to_json() for r in results],
        "schedule": [f.to_json() for f in plan],
        "faults": [a.to_json() for a in applied],
        "operations": {
            "total": len(operations),
            "ok": sum(1 for _, c in operations if c is not None and c.type == "ok"),
            "fail": sum(1 for _, c in operations if c is not None and c.type == "fail"),
            "info": sum(1 for _, c in operations if c is not None and c.type == "info"),
        },
        "errors": errors_by_kind(history),
        "availability": availability(history),
        "reported_in_quarantine": sorted(ending.reported),
    }


def write(out: Path, document: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(document, indent=2) + "\n")


def show(console: Console, document: dict[str, Any], results: list[Result]) -> None:
    table = Table(title="invariants")
    for column in ("invariant", "checked", "violations", "examples"):
        table.add_column(column)
    for result in results:
        examples = "; ".join(
            f"{v.message} (lines {', '.join(map(str, v.lines)) or '-'})"
            for v in result.examples[:3]
        )
        style = "red" if result.violations else "green"
        table.add_row(
            result.invariant,
            str(result.checked),
            f"[{style}]{result.violations}[/]",
            examples or ("; ".join(result.notes[:2]) or "-"),
        )
    console.print(table)
    faults = Table(title="faults applied")
    for column in ("fault", "target", "start s", "end s", "outcome"):
        faults.add_column(column)
    for fault in document["faults"]:
        end = "-" if fault["end_s"] is None else f"{fault['end_s']:.1f}"
        faults.add_row(
            fault["kind"], fault["target"], f"{fault['start_s']:.1f}", end, fault["outcome"][:60]
        )
    console.print(faults)
    errors = Table(title="client-visible errors")
    errors.add_column("kind")
    errors.add_column("by region")
    for kind, regions in sorted(document["errors"].items()):
        errors.add_row(kind, ", ".join(f"{r} {n}" for r, n in sorted(regions.items())))
    console.print(errors)
    for cell, ratios in document["availability"].items():
        low = min(ratios) if ratios else 1.0
        console.print(f"cell {cell}: ok ratio per second, lowest {low:.2f} ({len(ratios)} s)")
    ops = document["operations"]
    console.print(
        f"operations {ops['total']}: ok {ops['ok']}, fail {ops['fail']}, info {ops['info']}"
    )
    verdict = "[green]PASSED[/]" if document["passed"] else "[red]FAILED[/]"
    console.print(f"{verdict}  seed {document['seed']} (run again with --seed {document['seed']})")


def _attach(options: Options) -> dict[str, Any] | None:
    """The cluster a run attached to, by its files (None: the run's own cluster)."""
    attach = options.attach
    if attach is None:
        return None
    return {
        "config": None if attach.config_path is None else str(attach.config_path),
        "data": None if attach.data_dir is None else str(attach.data_dir),
        "regions": attach.config.region_names,
    }
