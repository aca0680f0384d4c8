"""Helpers for switchover tests: the control plane API and a load generator that records
every acknowledged order, so that a test can check that none was lost or duplicated."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support import Api
from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import initial_rule, route_buyer
from unitrade.web.tokens import issue_token


class Control:
    """The control plane's admin API."""

    def __init__(self, config: TopologyConfig) -> None:
        token = issue_token(config.token_keys, admin=True)
        self.http = httpx.Client(
            base_url=config.control.base_url,
            timeout=60.0,
            headers={"authorization": f"Bearer {token}"},
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def switch(self, cells: list[str], to: str) -> httpx.Response:
        return self.http.post("/v1/switch", json={"cells": cells, "to": to})

    def operation(self, op_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        answer = self.http.get(f"/v1/operations/{op_id}", params={"wait_s": wait_s})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def switch_and_wait(self, cells: list[str], to: str) -> dict[str, Any]:
        answer = self.switch(cells, to)
        assert answer.status_code == 202, answer.text
        op = self.operation(answer.json()["id"], wait_s=30)
        assert op["state"] == "done", op
        return op

    def wait_step(self, op_id: str, step: str, timeout_s: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            op = self.operation(op_id)
            if op["step"] == step:
                return op
            assert time.monotonic() < deadline, f"{op_id} never reached {step}: {op}"
            time.sleep(0.05)

    def wait_connected(self, timeout_s: float = 15.0) -> None:
        """Until every region watches the control plane and acknowledges its rule."""
        self.wait_connected_except(None, timeout_s)

    def wait_connected_except(self, down: str | None, timeout_s: float = 15.0) -> None:
        """Until every region but `down` watches the control plane and acknowledges its
        rule."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.http.get("/v1/regions")
            if answer.status_code == 200:
                body = answer.json()
                if all(
                    r["connected"] and r["version"] == body["rule_version"]
                    for r in body["regions"]
                    if r["region"] != down
                ):
                    return
            assert time.monotonic() < deadline, f"regions not connected: {answer.text}"
            time.sleep(0.05)

    def rule(self) -> dict[str, Any]:
        answer = self.http.get("/v1/rules/current")
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body


def buyers_of_cell(config: TopologyConfig, cell: int, n: int, start: int = 1) -> list[int]:
    rule = initial_rule(config)
    found: list[int] = []
    buyer = start
    while len(found) < n:
        if route_buyer(rule, buyer).cell == cell:
            found.append(buyer)
        buyer += 1
    return found


@dataclass
class Acked:
    buyer: int
    order_id: str
    sku: str
    paid: bool = False


@dataclass
class Load:
    """Threads that create and pay orders through every gateway until stopped. Every
    answer that is not a success is a client error (the switch promises none)."""

    config: TopologyConfig
    buyers: list[int]
    skus: list[str]
    threads: int = 4
    pause_s: float = 0.0
    gateways: list[str] | None = None  # the regions whose gateways it uses (default: all)
    acked: list[Acked] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_times: list[float] = field(default_factory=list)  # monotonic, one per error
    latencies_ms: list[tuple[float, float, int]] = field(default_factory=list)  # (at, ms, buyer)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)
            assert not worker.is_alive(), "a load worker did not stop"

    def wait_acked(self, buyers: list[int], more: int, timeout_s: float = 30.0) -> None:
        """Wait until `more` further orders of `buyers` are acknowledged."""
        wanted = set(buyers)

        def count() -> int:
            with self._lock:
                return sum(1 for a in self.acked if a.buyer in wanted)

        target = count() + more
        deadline = time.monotonic() + timeout_s
        while count() < target:
            assert time.monotonic() < deadline, f"no {more} orders acknowledged: {self.errors[-3:]}"
            time.sleep(0.01)

    def _run(self, seed: int) -> None:
        api = Api(self.config)
        rng = random.Random(seed)
        regions = self.gateways or self.config.region_names
        try:
            while not self._stop.is_set():
                self._one(api, rng, rng.choice(self.buyers), regions)
                if self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            api.http.close()

    def _one(self, api: Api, rng: random.Random, buyer: int, regions: list[str]) -> None:
        sku = rng.choice(self.skus)
        started = time.monotonic()
        try:
            created = api.order(rng.choice(regions), buyer, [(sku, 1)])
        except httpx.HTTPError as exc:
            self._error(f"create: {type(exc).__name__}: {exc}")
            return
        took_ms = (time.monotonic() - started) * 1000
        if created.status_code != 201:
            self._error(f"create: {created.status_code} {created.text[:200]}")
            return
        order = created.json()
        acked = Acked(buyer, order["order_id"], sku)
        with self._lock:
            self.acked.append(acked)
            self.latencies_ms.append((started, took_ms, buyer))
        if rng.random() < 0.5:
            return
        body = {"payment_id": f"pay-{order['order_id']}", "amount_cents": order["total_cents"]}
        try:
            paid = api.call(
                rng.choice(regions), "POST", f"/v1/orders/{order['order_id']}/pay", buyer, body
            )
        except httpx.HTTPError as exc:
            self._error(f"pay: {type(exc).__name__}: {exc}")
            return
        if paid.status_code != 200:
            self._error(f"pay: {paid.status_code} {paid.text[:200]}")
            return
        acked.paid = True

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)
            self.error_times.append(time.monotonic())
