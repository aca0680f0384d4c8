"""A region frozen mid-flight (SIGSTOP), on real processes: what clients are told is true.

503 means the write was certainly not applied; 504 `outcome_unknown` that it may have been,
and the key its body names tells which. The gateway resolves a lost answer itself where it
can (it resends the write with the same key once the owner answers again), errors name the
region whose call failed, and a stream from a frozen owner is reported stale.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.support import Api, write_topology
from unitrade.cluster import LocalCluster

pytestmark = pytest.mark.cluster
T = TypeVar("T")
WAIT_S = 40.0  # the longest any condition below may take to come true


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Api]]:
    """A cluster of this module's own: its regions are frozen."""
    directory = tmp_path_factory.mktemp("frozen")
    config, path = write_topology(directory)
    with LocalCluster(config, directory / "data", path) as cluster:
        cluster.start()
        api = Api(config)
        try:
            yield cluster, api
        finally:
            api.http.close()


@contextmanager
def frozen(cluster: LocalCluster, region: str) -> Iterator[None]:
    """The region's process stopped (SIGSTOP): its sockets still accept and buffer what is
    sent to it, and nothing answers until SIGCONT."""
    pid = cluster.processes[region].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = WAIT_S) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found:  # None, False and an empty list are "not yet"
            return found
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def health(api: Api, region: str) -> dict[str, Any]:
    body: dict[str, Any] = api.http.get(api.url(region, "/healthz"), timeout=5).json()
    return body


def orders_of(api: Api, buyer: int) -> list[dict[str, Any]]:
    """The buyer's orders, read at the owner of their cell."""
    response = api.call(api.home(buyer), "GET", "/v1/orders", buyer)
    assert response.status_code == 200, response.text
    orders: list[dict[str, Any]] = response.json()["orders"]
    return orders


def stock_is(api: Api, sku: str, expected: dict[str, int]) -> bool:
    levels = api.levels(sku)
    return {k: levels[k] for k in ("available", "reserved", "sold")} == expected


def test_streams_that_hear_their_owner_are_not_stale(fz: tuple[LocalCluster, Api]) -> None:
    _cluster, api = fz
    for region in api.config.region_names:
        streams = health(api, region)["replication"]
        assert streams and all(not s["stale"] and s["heard_ms_ago"] < 5_000 for s in streams)
    assert httpx.get(api.url("bj", "/metrics")).text.count("unitrade_replication_stale{") == 6


def test_a_lost_answer_is_resolved_by_a_resend_once_the_owner_answers(
    fz: tuple[LocalCluster, Api],
) -> None:
    cluster, api = fz
    api.put_product("FZ-A", stock=50)
    buyer = api.buyer_in("sh", 20_000)
    before = health(api, "bj")["lost_answers"]
    with ThreadPoolExecutor(1) as pool:
        with frozen(cluster, "sh"):
            # No idempotency key: bj adds one before it forwards the order to sh.
            answer = pool.submit(api.order, "bj", buyer, [("FZ-A", 2)])
            # The forward left for sh, got no answer, and bj is sending it again.
            wait_for(
                "bj resends the lost forward",
                lambda: health(api, "bj")["lost_answers"]["resent"] > before["resent"],
            )
            assert not answer.done()
        response = answer.result(timeout=WAIT_S)
    assert response.status_code == 201, response.text
    assert response.headers["x-unitrade-forwarded-by"] == "bj"
    after = health(api, "bj")["lost_answers"]
    assert after["lost"] == before["lost"] + 1
    assert after["keys_added"] > before["keys_added"]
    assert after["resolved"] == before["resolved"] + 1
    assert after["unknown"] == before["unknown"]
    # The first send and the resend both reached sh: one order, with one reservation.
    assert [o["order_id"] for o in orders_of(api, buyer)] == [response.json()["order_id"]]
    wait_for(
        "the resend's own reservation released",
        lambda: stock_is(api, "FZ-A", {"available": 48, "reserved": 2, "sold": 0}),
    )


def test_an_unresolved_lost_answer_is_504_with_the_key_that_resolves_it(
    fz: tuple[LocalCluster, Api],
) -> None:
    cluster, api = fz
    api.put_product("FZ-B", stock=50)
    buyer = api.buyer_in("sh", 21_000)
    before = health(api, "bj")["lost_answers"]
    with frozen(cluster, "sh"):
        response = api.order("bj", buyer, [("FZ-B", 3)])
        assert response.status_code == 504, response.text
        during = health(api, "bj")["lost_answers"]
    body = response.json()
    assert body["error"] == "outcome_unknown"
    assert body["region"] == "sh" and body["call"] == "forward"
    assert "sh" in body["message"]
    assert response.headers["retry-after"] == "1"
    key = body["idempotency_key"]
    assert key.startswith("gw-")
    assert during["lost"] == before["lost"] + 1
    assert during["resent"] > before["resent"]
    assert during["unknown"] == before["unknown"] + 1
    # Nobody sent the order since the thaw, yet it is written: what bj sent while sh was
    # frozen had reached sh (the fault struck with the request on its way).
    written = wait_for("the order sent while sh was frozen", lambda: orders_of(api, buyer))
    assert len(written) == 1
    # The key from the 504 tells the outcome: the same order, not a second one.
    again = api.order("bj", buyer, [("FZ-B", 3)], idempotency_key=key)
    assert again.status_code == 201, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["order_id"] == written[0]["order_id"]
    assert len(orders_of(api, buyer)) == 1
    wait_for(
        "only the written order holds stock",
        lambda: stock_is(api, "FZ-B", {"available": 47, "reserved": 3, "sold": 0}),
    )


def unitrade_status(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "unitrade.cli", "status", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def reservation_ids(cluster: LocalCluster) -> set[int]:
    path = cluster.data_dir / "hz" / "cell-center.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {int(row[0]) for row in conn.execute("SELECT order_id FROM reservations")}


def test_center_frozen_during_order_creation_no_503_for_a_written_order(
    fz: tuple[LocalCluster, Api],
) -> None:
    cluster, api = fz
    api.put_product("FZ-C", stock=100)
    payer = api.buyer_in("sh", 22_000)
    existing = api.order("sh", payer, [("FZ-C", 1)]).json()
    reserved_before = reservation_ids(cluster)
    # (region called, buyer): owners sh and bj called directly, and sh's buyers through bj.
    calls = [
        ("sh", api.buyer_in("sh", 23_000)),
        ("sh", api.buyer_in("sh", 23_100)),
        ("bj", api.buyer_in("sh", 23_200)),
        ("bj", api.buyer_in("sh", 23_300)),
        ("bj", api.buyer_in("bj", 23_400)),
    ]
    stale_rows: list[str] = []
    with ThreadPoolExecutor(len(calls)) as pool, frozen(cluster, "hz"):
        pending = [
            pool.submit(api.order, region, buyer, [("FZ-C", 1)], idempotency_key=f"fz-c-{i}")
            for i, (region, buyer) in enumerate(calls)
        ]
        # A payment claims its payment ID at the center first (services/payments.py): no
        # answer, so the payment is not written (503), and the same payment ID pays later.
        pay = {"payment_id": "fz-pay", "amount_cents": existing["total_cents"]}
        pay_target = f"/v1/orders/{existing['order_id']}/pay"
        unpaid = api.call("bj", "POST", pay_target, payer, pay)
        answers = [future.result(timeout=WAIT_S) for future in pending]

        # sh's streams from hz: stale in /healthz, /metrics and `unitrade status`.
        def stale_from_hz() -> list[dict[str, Any]] | None:
            found = [s for s in health(api, "sh")["replication"] if s["source"] == "hz"]
            return found if found and all(s["stale"] for s in found) else None

        streams = wait_for("sh's streams from hz stale", stale_from_hz)
        assert {s["cell_name"] for s in streams} == {"center", "global", "u1", "u2"}
        assert all(s["heard_ms_ago"] > 5_000 for s in streams)
        metrics = api.http.get(api.url("sh", "/metrics")).text
        assert 'unitrade_replication_stale{cell="center",region="sh",source="hz"} 1.0' in metrics
        status = unitrade_status(cluster.config_path or Path())
        section = status.stdout.split("replication (owner -> copy)", 1)[1]
        stale_rows = [line for line in section.splitlines() if " stale " in line]
    assert status.returncode == 1  # hz does not answer its /healthz
    assert any(row.split()[1:3] == ["hz", "sh"] for row in stale_rows), status.stdout
    assert unpaid.status_code == 503, unpaid.text
    assert (unpaid.json()["region"], unpaid.json()["call"]) == ("hz", "center")
    assert "no answer" in unpaid.json()["message"]
    assert "was not applied" in unpaid.json()["message"]
    assert [o["status"] for o in orders_of(api, payer)] == ["created"]

    def pay_again() -> httpx.Response | None:
        response = api.call("bj", "POST", pay_target, payer, pay)
        return None if response.status_code == 503 else response

    paid = wait_for("the payment once hz answers (its write lease back)", pay_again)
    assert paid.status_code == 200 and paid.json()["status"] == "paid", paid.text

    created = 0
    refused = 0
    for (region, buyer), answer in zip(calls, answers, strict=True):
        assert answer.status_code in (201, 503, 504), answer.text
        if answer.status_code == 503:
            refused += 1
            body = answer.json()
            # The center region failed, not the region the buyer's order lives in.
            assert body["error"] == "region_unavailable", body
            assert body["region"] == "hz" and body["call"] == "center", body
            assert "center region hz" in body["message"] and "no answer" in body["message"]
            assert "retry-after" in answer.headers
            assert orders_of(api, buyer) == [], f"a 503 from {region}, yet the order exists"
        elif answer.status_code == 504:
            key = answer.json()["idempotency_key"]
            resolved = api.order(region, buyer, [("FZ-C", 1)], idempotency_key=key)
            assert resolved.status_code == 201, resolved.text
            assert [o["order_id"] for o in orders_of(api, buyer)] == [resolved.json()["order_id"]]
            created += 1
        else:
            assert [o["order_id"] for o in orders_of(api, buyer)] == [answer.json()["order_id"]]
            created += 1
    assert refused >= 1  # the center was frozen for longer than an order waits for it
    # Each refused order's reserve had reached the center, but hz was frozen for longer
    # than its write lease: when it runs again it refuses what was queued until it has
    # renewed its lease, or writes it and the release that overtook it undoes it. Either
    # way no stock stays held for an order that does not exist (below).
    assert len(reservation_ids(cluster) - reserved_before) <= refused + created
    wait_for(
        "the refused orders' reservations released and the payment committed",
        lambda: stock_is(
            api, "FZ-C", {"available": 100 - 1 - created, "reserved": created, "sold": 1}
        ),
    )
    wait_for(
        "sh hears from hz again",
        lambda: not any(s["stale"] for s in health(api, "sh")["replication"]),
    )
