"""The soak benchmark's verdict rule (the benchmark itself runs on demand, not here)."""

from __future__ import annotations

from typing import Any

from benchmarks.bench_soak import kept_by_design, series_of, verdict

TIMES = [30.0 * i for i in range(20)]


def test_warm_up_then_flat_with_a_sawtooth_is_flat() -> None:
    # Rises for the first half (warm-up), then a sweep's sawtooth of +-5% around 1000.
    values = [100.0 * i for i in range(10)] + [1000.0 + (50 if i % 2 else -50) for i in range(10)]
    found = verdict(TIMES, values, tolerance=0.1, floor=10.0)
    assert found["verdict"] == "flat"
    assert found["samples"] == 20


def test_steady_growth_is_growing_with_its_slope_per_hour() -> None:
    values = [1000.0 + 2.0 * t for t in TIMES]  # 2 rows/s
    found = verdict(TIMES, values, tolerance=0.1, floor=10.0)
    assert found["verdict"] == "growing"
    assert found["slope_per_hour"] == 7200.0


def test_growth_within_the_floor_or_shrinking_is_flat() -> None:
    small = [5.0 + t / 1000 for t in TIMES]  # grows, but by less than the floor
    assert verdict(TIMES, small, tolerance=0.0, floor=1.0)["verdict"] == "flat"
    shrinking = [5000.0 - t for t in TIMES]
    assert verdict(TIMES, shrinking, tolerance=0.0, floor=1.0)["verdict"] == "flat"


def test_too_few_samples_gives_no_verdict() -> None:
    found = verdict(TIMES[:7], [1.0] * 7, tolerance=0.1, floor=1.0)
    assert found == {"verdict": "too few samples", "samples": 7}


def sample(t: float, rows: dict[str, dict[str, int]], p99: float | None) -> dict[str, Any]:
    return {
        "t_s": t,
        "rss_mb": {"hz": 100.0},
        "db_mb": {"hz/cell-u1": 1.0, "hz/cell-center": 2.0},
        "wal_mb": {"hz/cell-u1": 4.0, "hz/cell-center": 0.0},
        "rows": rows,
        "load": {"p50_ms": p99, "p99_ms": p99},
    }


def test_series_cover_every_copy_and_table_and_late_tables_start_at_zero() -> None:
    samples = [
        sample(0.0, {"hz/cell-u1": {"orders": 1}}, None),
        sample(30.0, {"hz/cell-u1": {"orders": 5, "outbox": 3}}, 4.0),
    ]
    found = series_of(samples)
    assert found["rows hz/cell-u1 outbox"] == ("rows", [0.0, 3.0])
    assert found["rows all orders"] == ("rows", [1.0, 5.0])
    assert found["db_mb all"] == ("db_mb", [3.0, 3.0])
    assert found["wal_mb all"] == ("wal_mb", [4.0, 4.0])
    assert found["rss_mb hz"] == ("rss_mb", [100.0, 100.0])
    latency = found["latency_ms p99"][1]
    assert latency[1] == 4.0 and latency[0] != latency[0]  # NaN: no answers yet


def test_business_records_and_unit_cell_databases_are_kept_by_design() -> None:
    assert kept_by_design("rows hz/cell-u1 orders")
    assert kept_by_design("rows all payments")
    assert not kept_by_design("rows hz/cell-u1 outbox")
    assert not kept_by_design("rows all idempotency_keys")
    assert kept_by_design("db_mb hz/cell-u3")
    assert kept_by_design("db_mb hz_u3")  # a PostgreSQL database
    assert not kept_by_design("db_mb hz_center")
    assert not kept_by_design("db_mb hz/cell-center")
    assert not kept_by_design("wal_mb hz/cell-u3")  # checkpoints bound it
    assert not kept_by_design("rss_mb hz")
