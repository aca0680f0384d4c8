"""`unitrade verify` (issue 11): each checker reports the violation a crafted history
holds (a checker that cannot fail is worse than none), the fault schedule is a function of
the seed, and one short real run under faults passes and leaves no process or port."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support import write_topology
from tests.test_supervise import Up, healthy, wait_for
from unitrade.topology.config import default_config
from unitrade.verify import elle
from unitrade.verify.checks import (
    Ending,
    Row,
    RuleVersion,
    check_convergence,
    check_isolation,
    check_orders,
    check_ownership,
    check_payments,
    check_stock,
)
from unitrade.verify.cli import verify_command
from unitrade.verify.faults import FaultError, parse_faults, schedule
from unitrade.verify.history import FAIL, INFO, OK, History, load

ORDER = "1234567890123"
OTHER = "1234567890999"


class Crafted:
    """A history written by hand, operation by operation (invoke then completion)."""

    def __init__(self) -> None:
        self.history = History()
        self.clock = 0

    def op(
        self,
        f: str,
        value: dict[str, Any],
        type_: str = OK,
        got: dict[str, Any] | None = None,
        region: str = "hz",
        status: int | None = 200,
        process: int = 1,
    ) -> None:
        self.clock += 1_000_000
        self.history.add(
            "invoke", process, f, region, {**value, "wall_ms": self.clock}, time_ns=self.clock
        )
        self.clock += 1_000_000
        done = {**(got or {}), "wall_ms": self.clock}
        self.history.add(type_, process, f, region, done, status=status, time_ns=self.clock)

    def create(self, key: str, order_id: str = ORDER, buyer: int = 7, cell: int = 1) -> None:
        got = {
            "order_id": order_id,
            "buyer_id": buyer,
            "status": "created",
            "total_cents": 300,
            "cell": cell,
            "served_by": "sh",
        }
        self.op("create", {"buyer": buyer, "cell": cell, "key": key}, got=got, status=201)

    def pay(
        self, payment_id: str, order_id: str = ORDER, type_: str = OK, amount: int = 300
    ) -> None:
        got = {
            "order_id": order_id,
            "status": "paid",
            "total_cents": 300,
            "cell": 1,
            "served_by": "sh",
            "payment_id": payment_id,
        }
        value = {
            "buyer": 7,
            "cell": 1,
            "order_id": order_id,
            "payment_id": payment_id,
            "amount_cents": amount,
        }
        self.op("pay", value, type_, got if type_ == OK else {}, status=200 if type_ == OK else 504)

    def final(self, status: str | None, order_id: str = ORDER, region: str = "bj") -> None:
        got = {} if status is None else {"order_id": order_id, "status": status, "buyer_id": 7}
        self.op(
            "final",
            {"buyer": 7, "order_id": order_id},
            OK if status is not None else FAIL,
            got=got,
            region=region,
            status=200 if status is not None else 404,
        )


def violations(result: Any) -> list[str]:
    return [v.message for v in result.examples]


def test_an_acknowledged_order_read_back_in_its_state_passes() -> None:
    h = Crafted()
    h.create("k1")
    h.pay("pay-1")
    for region in ("hz", "sh", "bj"):
        h.final("paid", region=region)
    result = check_orders(h.history, Ending())
    assert result.checked == 4 and result.violations == 0, violations(result)


def test_a_lost_acknowledged_write_is_a_violation() -> None:
    h = Crafted()
    h.create("k1")
    h.pay("pay-1")
    h.final("created")  # the acknowledged payment is gone
    h.create("k2", OTHER)
    h.final(None, OTHER)  # the acknowledged order is gone
    result = check_orders(h.history, Ending())
    assert result.violations == 2, violations(result)
    assert {tuple(v.order_ids) for v in result.examples} == {(ORDER,), (OTHER,)}
    assert all(v.lines for v in result.examples)


def test_an_unknown_outcome_may_or_may_not_have_happened_and_a_reported_one_is_not_lost() -> None:
    h = Crafted()
    h.create("k1")
    h.pay("pay-1", type_=INFO)
    h.final("created", region="hz")
    h.final("paid", region="sh")
    assert check_orders(h.history, Ending()).violations == 0
    h.create("k2", OTHER)
    h.final(None, OTHER)
    assert check_orders(h.history, Ending(reported={OTHER})).violations == 0


def test_a_repeated_creation_is_a_read_and_does_not_hide_an_unknown_payment() -> None:
    h = Crafted()
    h.create("k1")
    h.pay("pay-1", type_=INFO)
    h.create("k1")  # answered `created` while the payment was still in flight
    h.final("paid")
    assert check_orders(h.history, Ending()).violations == 0


def test_two_orders_for_one_idempotency_key_is_a_violation() -> None:
    h = Crafted()
    h.create("k1")
    h.create("k1", OTHER)
    h.final("created")
    h.final("created", OTHER)
    assert "k1 made 2 orders" in violations(check_orders(h.history, Ending()))[0]


def test_a_double_payment_is_a_violation() -> None:
    h = Crafted()
    h.create("k1")
    h.pay("pay-1")
    h.pay("pay-2")  # a second payment of a paid order, acknowledged
    result = check_payments(h.history, Ending())
    assert result.violations == 1 and "paid twice" in result.examples[0].message
    assert result.examples[0].order_ids == [ORDER]


def test_one_payment_on_two_orders_and_a_wrong_amount_are_violations() -> None:
    h = Crafted()
    h.create("k1")
    h.create("k2", OTHER)
    h.pay("pay-1")
    h.pay("pay-1", OTHER, amount=250)
    messages = violations(check_payments(h.history, Ending()))
    assert any("applied to 2 orders" in m for m in messages), messages
    assert any("paid 250 cents" in m for m in messages), messages


def test_a_write_accepted_outside_the_owner_is_a_violation() -> None:
    h = Crafted()
    h.create("k1")  # served by sh, cell 1
    rules = [RuleVersion(1, 0, {1: "sh"}), RuleVersion(2, h.clock + 1, {1: "hz"})]
    assert check_ownership(h.history, Ending(rules=rules)).violations == 0
    h.pay("pay-1")  # served by sh after the rule gave cell 1 to hz
    result = check_ownership(h.history, Ending(rules=rules))
    assert result.violations == 1 and "owner then: hz" in result.examples[0].message


def test_a_changelog_row_accepted_outside_the_owner_of_its_epoch_is_a_violation() -> None:
    h = Crafted()
    rules = [RuleVersion(1, 0, {1: "sh"}), RuleVersion(2, 10, {1: "hz"})]
    rows = [Row(1, 1, 1, "sh", "orders"), Row(1, 2, 2, "hz", "orders")]
    assert check_ownership(h.history, Ending(rules=rules, changelog=rows)).violations == 0
    rows.append(Row(1, 3, 2, "sh", "payments"))  # sh wrote cell 1 under the rule giving it to hz
    result = check_ownership(h.history, Ending(rules=rules, changelog=rows))
    assert (
        result.violations == 1
        and "written by sh under rule version 2" in result.examples[0].message
    )
    assert result.checked == 3


def test_a_changelog_row_written_while_its_cell_was_banned_is_a_violation() -> None:
    h = Crafted()
    rules = [
        RuleVersion(1, 0, {1: "sh", 2: "sh"}),
        RuleVersion(2, 10, {1: "sh", 2: "sh"}, banned=frozenset({1})),  # switch of cell 1
        RuleVersion(3, 20, {1: "hz", 2: "sh"}),
    ]
    rows = [Row(1, 1, 1, "sh", "orders"), Row(2, 1, 2, "sh", "orders"), Row(1, 2, 3, "hz", "x")]
    assert check_ownership(h.history, Ending(rules=rules, changelog=rows)).violations == 0
    rows.append(Row(1, 3, 2, "sh", "payments"))  # the old owner wrote cell 1 under the ban
    result = check_ownership(h.history, Ending(rules=rules, changelog=rows))
    assert result.violations == 1 and "which bans the cell" in result.examples[0].message


def test_a_write_acknowledged_by_a_failed_over_region_after_its_lease_is_a_violation() -> None:
    h = Crafted()
    h.create("k1")
    rules = [RuleVersion(1, 0, {1: "sh"})]
    ending = Ending(rules=rules, lease_ended_ms={"sh": h.clock - 1})
    result = check_ownership(h.history, ending)
    assert result.violations == 1 and "after its lease ended" in result.examples[0].message


def test_a_stock_total_mismatch_and_a_negative_level_are_violations() -> None:
    h = Crafted()
    h.history.add("invoke", 0, "stock-set", "hz", {"sku": "A", "stock": 100})
    h.history.add(OK, 0, "stock-set", "hz", {})
    h.op("inventory", {"sku": "A"}, got={"available": 90, "reserved": 5, "sold": 5})
    assert check_stock(h.history, Ending()).violations == 0
    h.op("inventory", {"sku": "A"}, got={"available": 90, "reserved": 5, "sold": 6})
    h.op("inventory", {"sku": "A"}, got={"available": -1, "reserved": 1, "sold": 100})
    result = check_stock(h.history, Ending())
    assert result.violations == 2, violations(result)
    assert "101 != stock 100" in result.examples[0].message
    assert "below zero" in result.examples[1].message


def test_reading_another_buyers_order_is_a_violation() -> None:
    h = Crafted()
    h.op("read-other", {"buyer": 8, "order_id": ORDER}, FAIL, status=404)
    assert check_isolation(h.history, Ending()).violations == 0
    h.op("read-other", {"buyer": 8, "order_id": ORDER}, got={"buyer_id": 7})
    result = check_isolation(h.history, Ending())
    assert result.violations == 1 and result.examples[0].order_ids == [ORDER]


def test_reading_another_buyers_cart_is_a_violation() -> None:
    h = Crafted()
    h.op("cart-read", {"buyer": 8}, got={"buyer_id": 8})
    assert check_isolation(h.history, Ending()).violations == 0
    h.op("cart-read", {"buyer": 8}, got={"buyer_id": 7})
    result = check_isolation(h.history, Ending())
    assert result.violations == 1 and "cart of buyer 7" in result.examples[0].message


def test_copies_that_differ_or_lag_are_a_violation() -> None:
    h = Crafted()
    assert check_convergence(h.history, Ending()).violations == 0
    ending = Ending(differences=3, lagging=["bj cell u1 at 5, owner at 7"])
    assert check_convergence(h.history, ending).violations == 2


def test_the_history_is_json_lines_that_load_back(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    history.add("invoke", 1, "create", "hz", {"key": "k"})
    history.add(INFO, 1, "create", "hz", {}, error="ReadTimeout")
    history.close()
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [line["type"] for line in lines] == ["invoke", "info"]
    assert load(tmp_path / "history.jsonl").pairs()[0][1] is not None


def test_the_elle_files_hold_adds_with_their_order_ids_and_one_read_per_region() -> None:
    h = Crafted()
    h.create("k1")
    h.final("created", region="hz")
    h.final(None, region="sh")
    ops = elle.set_full(h.history)
    assert [(op["type"], op["f"]) for op in ops[:2]] == [("invoke", "add"), ("ok", "add")]
    assert sorted(op["type"] for op in ops if op["f"] == "read") == ["invoke"] * 2 + ["ok"] * 2
    assert ops[0]["value"] == ops[1]["value"] == int(ORDER)
    reads = {op["process"]: op["value"] for op in ops if op["type"] == "ok" and op["f"] == "read"}
    assert sorted(reads.values()) == [[], [int(ORDER)]]
    assert [op["index"] for op in ops] == list(range(len(ops)))


def test_the_same_seed_gives_the_same_fault_schedule() -> None:
    config = default_config()
    faults = ["kill", "pause", "switch", "failover", "control-kill"]
    first = schedule(config, faults, 60, 42)
    assert first == schedule(config, faults, 60, 42)
    assert first != schedule(config, faults, 60, 43)
    assert {f.kind for f in first} == set(faults)
    assert [f.at_s for f in first] == sorted(f.at_s for f in first)
    assert sum(1 for f in first if f.kind == "failover") == 1


def test_network_faults_are_scheduled_from_the_seed_for_the_module_to_apply() -> None:
    plan = schedule(default_config(), ["partition", "slow"], 40, 3)
    assert plan == schedule(default_config(), ["partition", "slow"], 40, 3)
    assert {f.kind for f in plan} == {"partition", "slow"}
    for fault in plan:
        region, how = fault.target.split("|")
        assert region in default_config().region_names
        if fault.kind == "partition":
            assert how in ("both", "one-way")
        else:
            assert 20 <= int(how.removesuffix("ms")) <= 200


def test_unknown_faults_are_refused_and_network_faults_accepted() -> None:
    with pytest.raises(FaultError, match="unknown fault"):
        parse_faults("kill,explode")
    assert parse_faults("kill,partition,slow") == ["kill", "partition", "slow"]


def test_an_out_directory_of_something_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(verify_command, ["--out", str(tmp_path), "--faults", ""])
    assert result.exit_code == 2 and "holds no previous run" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_short_run_under_kill_and_switch_passes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "verify"
    args = ["--seconds", "20", "--faults", "kill,switch", "--seed", "5", "--out", str(out)]
    result = CliRunner().invoke(verify_command, args)
    report = json.loads((out / "report.json").read_text())
    assert result.exit_code == 0, result.output + json.dumps(report["invariants"], indent=1)
    assert report["passed"] and report["seed"] == 5
    # Both faults struck mid-flight: applied, and operations were acknowledged after each.
    kinds = {f["kind"] for f in report["faults"] if f["outcome"] == "done"}
    assert kinds == {"kill", "switch"}, report["faults"]
    history = load(out / "history.jsonl")
    last_fault = max(e.time_ns for e in history.events if e.f == "fault")
    assert any(e.type == OK and e.f == "create" and e.time_ns > last_fault for e in history.events)
    for invariant in report["invariants"]:
        assert invariant["checked"] > 0, invariant
    adds = [json.loads(line) for line in (out / "elle-set-full.json").read_text().splitlines()]
    assert any(op["f"] == "read" and op["type"] == "ok" for op in adds)
    assert (out / "elle-bank-VF-A.json").exists()
    topology = (out / "topology.toml").read_text()
    ports = [
        int(line.split(":")[-1].rstrip('"')) for line in topology.splitlines() if "listen" in line
    ]
    assert ports and not any(_listening(p) for p in ports)


def test_a_planted_bug_that_drops_acknowledged_orders_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The regions run with a real bug planted (storage/store.py: one order creation in ten
    is rolled back and answered 201 all the same): a run without any fault must fail, on the
    orders invariant, naming lost orders."""
    monkeypatch.setenv("UNITRADE_PLANTED_BUG", "drop_acked_orders")
    out = tmp_path / "verify"
    args = ["--seconds", "10", "--faults", "", "--seed", "8", "--out", str(out)]
    result = CliRunner().invoke(verify_command, args)
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    assert not report["passed"]
    failed = {i["invariant"]: i for i in report["invariants"] if i["violations"]}
    assert "orders" in failed, report["invariants"]
    assert failed["orders"]["examples"], failed["orders"]


def test_a_planted_bug_that_applies_a_second_payment_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The regions apply a second payment of a paid order and answer 200 (planted.py:
    double_payment): the workload's second payments, which must be refused, are not, and
    the payments invariant reports orders paid twice."""
    monkeypatch.setenv("UNITRADE_PLANTED_BUG", "double_payment")
    out = tmp_path / "verify"
    args = ["--seconds", "12", "--rate", "60", "--faults", "", "--seed", "9", "--out", str(out)]
    result = CliRunner().invoke(verify_command, args)
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    failed = {i["invariant"]: i for i in report["invariants"] if i["violations"]}
    assert "payments" in failed, report["invariants"]
    assert any("paid twice" in e["message"] for e in failed["payments"]["examples"]), failed


def test_a_planted_bug_that_writes_a_banned_cell_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fence and the gateway's hold ignore bans (planted.py: write_banned), and each
    switch keeps its cells banned 1.5 s (the control plane pauses at catch_up): the old
    owner goes on writing under the ban, and the ownership invariant names the changelog
    rows written under a rule version that bans their cell. Without the bug the same run
    holds those writes until the switch ends (the CI run proves that)."""
    monkeypatch.setenv("UNITRADE_PLANTED_BUG", "write_banned")
    monkeypatch.setenv("UNITRADE_CONTROL_PAUSE", "catch_up:1.5")
    out = tmp_path / "verify"
    args = ["--seconds", "14", "--rate", "80", "--faults", "switch", "--seed", "4"]
    result = CliRunner().invoke(verify_command, [*args, "--out", str(out)])
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    assert [f["outcome"] for f in report["faults"]] == ["done", "done"], report["faults"]
    failed = {i["invariant"]: i for i in report["invariants"] if i["violations"]}
    assert "ownership" in failed, report["invariants"]
    messages = [e["message"] for e in failed["ownership"]["examples"]]
    assert any("which bans the cell" in m for m in messages), messages


def test_attaching_refuses_what_it_cannot_do_before_anything_starts(tmp_path: Path) -> None:
    _config, path = write_topology(tmp_path)
    runner = CliRunner()
    out = str(tmp_path / "out")
    cases = [
        (["--faults", "partition"], "network faults need the servers behind a network"),
        (["--faults", "kill,switch"], "give its --data"),
        (["--faults", "pause", "--data", str(tmp_path / "none")], "no `unitrade up` supervises"),
    ]
    for extra, message in cases:
        result = runner.invoke(verify_command, ["--attach", "--config", str(path), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    alone = runner.invoke(verify_command, ["--config", str(path), "--out", out])
    assert alone.exit_code == 2 and "add --attach" in alone.output
    assert not (tmp_path / "out").exists()


@pytest.mark.cluster
def test_a_run_attached_to_a_supervised_cluster_passes_and_leaves_it_running(
    tmp_path: Path,
) -> None:
    """`unitrade up` runs a cluster; verify --attach takes traffic through it while it kills,
    pauses and switches through that `up` (its supervisor never races the nemesis), checks,
    and leaves every process of the cluster running; its products and buyers are its own."""
    config, path = write_topology(tmp_path)
    data = tmp_path / "data"
    up = Up(path, data)
    try:
        wait_for(lambda: "cluster up" in up.text(), "unitrade up started")
        out = tmp_path / "verify"
        args = ["--attach", "--config", str(path), "--data", str(data), "--out", str(out)]
        args += ["--seconds", "20", "--faults", "kill,pause,switch", "--seed", "12"]
        result = CliRunner().invoke(verify_command, args)
        report = json.loads((out / "report.json").read_text())
        assert result.exit_code == 0, result.output + json.dumps(report["invariants"], indent=1)
        assert {f["kind"] for f in report["faults"] if f["outcome"] == "done"} == {
            "kill",
            "pause",
            "switch",
        }, report["faults"]
        for invariant in report["invariants"]:
            assert invariant["checked"] > 0, invariant
        history = load(out / "history.jsonl")
        skus = {e.value["sku"] for e in history.events if e.f == "stock-set" and e.type == "invoke"}
        assert len(skus) == 3 and all(s.startswith("VF-") and s.count("-") == 2 for s in skus)
        buyers = {
            e.value["buyer"] for e in history.events if e.f == "create" and e.type == "invoke"
        }
        assert buyers and min(buyers) >= 2**61
        assert not (out / "data").exists()  # the cluster's data is the cluster's, not the run's
        for name in ("hz", "sh", "bj", "control"):
            assert healthy(config, name), name
        states = {n: p["state"] for n, p in up.state()["processes"].items()}
        assert set(states.values()) == {"running"}, states
    finally:
        up.close()
    # `up` stopped everything it ran: nothing of the cluster outlives the test.
    for name in ("hz", "sh", "bj", "control"):
        assert not healthy(config, name), name
