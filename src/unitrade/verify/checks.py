"""The checkers: each reads the history (and what the run learned at the end) and answers
how many things it checked and the violations it found, with the order IDs and the history
lines involved. Pure functions of their input, so that a crafted history proves each of
them can fail (tests/test_verify.py)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from unitrade.verify.history import FAIL, INFO, OK, Event, History

EXAMPLES_MAX = 10  # examples kept per invariant; the count is complete
TARGET = {"pay": "paid", "close": "closed", "refund": "refunded"}
TRANSITIONS = ("pay", "close", "refund")
WRITES = ("create", *TRANSITIONS)


@dataclass
class Violation:
    message: str
    order_ids: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "order_ids": self.order_ids, "lines": self.lines}


@dataclass
class Result:
    invariant: str
    checked: int = 0
    violations: int = 0
    examples: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def violate(self, violation: Violation) -> None:
        self.violations += 1
        if len(self.examples) < EXAMPLES_MAX:
            self.examples.append(violation)

    def to_json(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant,
            "checked": self.checked,
            "violations": self.violations,
            "examples": [v.to_json() for v in self.examples],
            "notes": self.notes,
        }


@dataclass(frozen=True)
class RuleVersion:
    version: int
    created_ms: int
    owners: dict[int, str]  # cell id -> owner region
    banned: frozenset[int] = frozenset()  # cells no region may write under this version


@dataclass(frozen=True)
class Row:
    """A changelog row of a cell's owner copy: the rule version it was admitted under and
    the region that accepted it."""

    cell: int
    position: int
    epoch: int
    origin: str
    table: str


@dataclass
class Ending:
    """What the run learned after quiescence, beside the history."""

    rules: list[RuleVersion] = field(default_factory=list)
    differences: int = 0
    not_compared: list[str] = field(default_factory=list)
    lagging: list[str] = field(default_factory=list)  # copies not at their owner's position
    reported: set[str] = field(default_factory=set)  # order IDs in a quarantine's report
    # A failed-over region -> wall ms when its last lease had surely ended (the failover's
    # `expire` step done): it must acknowledge nothing after.
    lease_ended_ms: dict[str, int] = field(default_factory=dict)
    changelog: list[Row] = field(default_factory=list)
    changelog_unread: list[str] = field(default_factory=list)
    quiescent: bool = True


def _ops(history: History, *fs: str) -> list[tuple[Event, Event]]:
    return [(i, c) for i, c in history.pairs() if c is not None and i.f in fs]


def check_orders(history: History, ending: Ending) -> Result:
    """set: every acknowledged order is read back from every region in the state of its last
    acknowledged transition (or of a later transition whose outcome is unknown); no order
    ID for two requests; one order per idempotency key."""
    result = Result("orders")
    by_key: dict[str, dict[str, int]] = defaultdict(dict)  # key -> order_id -> line
    for invoke, done in _ops(history, "create"):
        if done.type == OK:
            by_key[invoke.value["key"]][done.value["order_id"]] = done.index
    keys_of: dict[str, list[str]] = defaultdict(list)
    for key, orders in by_key.items():
        result.checked += 1
        if len(orders) > 1:
            result.violate(
                Violation(
                    f"idempotency key {key} made {len(orders)} orders",
                    [*orders],
                    [*orders.values()],
                )
            )
        for order_id in orders:
            keys_of[order_id].append(key)
    for order_id, keys in keys_of.items():
        if len(keys) > 1:
            lines = [by_key[k][order_id] for k in keys]
            result.violate(
                Violation(f"order ID {order_id} answered to {len(keys)} keys", [order_id], lines)
            )
    allowed = expected_statuses(history)
    finals = _ops(history, "final")
    for invoke, done in finals:
        order_id = invoke.value["order_id"]
        if order_id not in allowed:
            continue
        result.checked += 1
        status = done.value.get("status") if done.status == 200 else None
        if status in allowed[order_id]:
            continue
        if order_id in ending.reported:
            result.notes.append(f"{order_id}: in a quarantine's report (reported, not lost)")
            continue
        got = f"HTTP {done.status}" if status is None else status
        result.violate(
            Violation(
                f"acknowledged order {order_id} read at {invoke.region} as {got}, expected "
                + " or ".join(sorted(allowed[order_id])),
                [order_id],
                [invoke.index, done.index],
            )
        )
    read = {i.value["order_id"] for i, _ in finals}
    for order_id in sorted(set(allowed) - read):
        result.violate(Violation(f"acknowledged order {order_id} never read back", [order_id]))
    return result


def expected_statuses(history: History) -> dict[str, set[str]]:
    """For each acknowledged order, the statuses it may have at the end: that of its last
    acknowledged write, and the target of every write after it whose outcome is unknown."""
    last_ok: dict[str, tuple[int, str]] = {}  # order_id -> (invoke time, status)
    unknown: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for invoke, done in _ops(history, *WRITES):
        if invoke.f == "create":
            # A repeated request answers the order as it is then: a read, not a write (a
            # write of unknown outcome before it may still land after it).
            if done.type == OK and done.value["order_id"] not in last_ok:
                last_ok[done.value["order_id"]] = (invoke.time_ns, done.value["status"])
            continue
        order_id = invoke.value["order_id"]
        if done.type == OK:
            if order_id not in last_ok or last_ok[order_id][0] <= invoke.time_ns:
                last_ok[order_id] = (invoke.time_ns, done.value["status"])
        elif done.type == INFO:
            unknown[order_id].append((invoke.time_ns, TARGET[invoke.f]))
    return {
        order_id: {status} | {s for t, s in unknown.get(order_id, []) if t >= since}
        for order_id, (since, status) in last_ok.items()
    }


def check_payments(history: History, ending: Ending) -> Result:
    """No order paid by two payments, no payment applied to two orders, amounts match."""
    result = Result("payments")
    totals = {
        d.value["order_id"]: d.value["total_cents"]
        for _, d in _ops(history, "create")
        if d.type == OK
    }
    pays_of: dict[str, dict[str, int]] = defaultdict(dict)
    orders_of: dict[str, dict[str, int]] = defaultdict(dict)
    for invoke, done in _ops(history, "pay"):
        if done.type != OK:
            continue
        result.checked += 1
        order_id, payment_id = invoke.value["order_id"], invoke.value["payment_id"]
        pays_of[order_id][payment_id] = done.index
        orders_of[payment_id][order_id] = done.index
        amount = invoke.value["amount_cents"]
        if (
            amount != totals.get(order_id, amount)
            or done.value.get("total_cents", amount) != amount
        ):
            result.violate(
                Violation(
                    f"order {order_id} paid {amount} cents, its total is {totals.get(order_id)}",
                    [order_id],
                    [invoke.index, done.index],
                )
            )
    for order_id, pays in pays_of.items():
        if len(pays) > 1:
            result.violate(
                Violation(
                    f"order {order_id} paid twice ({', '.join(sorted(pays))})",
                    [order_id],
                    sorted(pays.values()),
                )
            )
    for payment_id, orders in orders_of.items():
        if len(orders) > 1:
            result.violate(
                Violation(
                    f"payment {payment_id} applied to {len(orders)} orders",
                    [*orders],
                    sorted(orders.values()),
                )
            )
    for invoke, done in _ops(history, "final"):
        paid_with = done.value.get("payment_id") if done.status == 200 else None
        order_id = invoke.value["order_id"]
        if paid_with is not None and pays_of.get(order_id) and paid_with not in pays_of[order_id]:
            tried = {
                i.value["payment_id"]
                for i, _ in _ops(history, "pay")
                if i.value["order_id"] == order_id
            }
            if paid_with not in tried:
                result.violate(
                    Violation(
                        f"order {order_id} carries payment {paid_with}, never sent",
                        [order_id],
                        [done.index],
                    )
                )
    return result


def check_stock(history: History, ending: Ending) -> Result:
    """bank: per SKU available + reserved + sold == the stock set, none below zero, sold
    never above the stock, at every read."""
    result = Result("stock")
    stock = {
        e.value["sku"]: e.value["stock"]
        for e in history.events
        if e.f == "stock-set" and e.type == "invoke"
    }
    for invoke, done in _ops(history, "inventory"):
        if done.type != OK:
            continue
        result.checked += 1
        sku, v = invoke.value["sku"], done.value
        total = v["available"] + v["reserved"] + v["sold"]
        wrong = []
        if sku in stock and total != stock[sku]:
            wrong.append(f"available + reserved + sold = {total} != stock {stock[sku]}")
        if min(v["available"], v["reserved"], v["sold"]) < 0:
            wrong.append("a level below zero")
        if sku in stock and v["sold"] > stock[sku]:
            wrong.append(f"sold {v['sold']} above stock {stock[sku]}")
        if wrong:
            result.violate(
                Violation(f"{sku} at {invoke.region}: " + "; ".join(wrong), [], [done.index])
            )
    return result


def check_isolation(history: History, ending: Ending) -> Result:
    """A buyer never reads another buyer's order or cart."""
    result = Result("isolation")
    for invoke, done in _ops(history, "read-other", "read", "cart-read", "cart-put"):
        if done.type == INFO:
            continue
        result.checked += 1
        buyer = invoke.value["buyer"]
        if invoke.f == "read-other" and done.status != 404:
            if done.status == 200:
                result.violate(
                    Violation(
                        f"buyer {buyer} read order {invoke.value['order_id']} of another buyer",
                        [invoke.value["order_id"]],
                        [invoke.index, done.index],
                    )
                )
        elif invoke.f in ("cart-read", "cart-put") and done.type == OK:
            if done.value.get("buyer_id") != buyer:
                result.violate(
                    Violation(
                        f"buyer {buyer} got the cart of buyer {done.value.get('buyer_id')}",
                        [],
                        [invoke.index, done.index],
                    )
                )
        elif invoke.f == "read" and done.status == 200 and done.value.get("buyer_id") != buyer:
            result.violate(
                Violation(
                    f"buyer {buyer} got order {invoke.value['order_id']} of buyer "
                    f"{done.value.get('buyer_id')}",
                    [invoke.value["order_id"]],
                    [invoke.index, done.index],
                )
            )
    return result


def owners_between(rules: list[RuleVersion], start_ms: int, end_ms: int, cell: int) -> set[str]:
    """The owners of `cell` under every rule version in force at some moment of
    [start_ms, end_ms]."""
    ordered = sorted(rules, key=lambda r: r.version)
    found: set[str] = set()
    for n, rule in enumerate(ordered):
        until = ordered[n + 1].created_ms if n + 1 < len(ordered) else None
        if (
            rule.created_ms <= end_ms
            and (until is None or until >= start_ms)
            and cell in rule.owners
        ):
            found.add(rule.owners[cell])
    return found


def check_ownership(history: History, ending: Ending) -> Result:
    """No write acknowledged by a region that did not own the order's cell under any rule
    in force while the request was in flight (the region that served it answers in
    x-unitrade-served-by)."""
    result = Result("ownership")
    if not ending.rules:
        result.notes.append("no rule history: not checked")
        return result
    check_changelog(ending, result)
    for invoke, done in _ops(history, *WRITES):
        if done.type != OK or "served_by" not in done.value or "cell" not in done.value:
            continue
        result.checked += 1
        cell = done.value["cell"]
        owners = owners_between(ending.rules, invoke.value["wall_ms"], done.value["wall_ms"], cell)
        served_by = done.value["served_by"]
        ended = ending.lease_ended_ms.get(served_by)
        if ended is not None and done.value["wall_ms"] > ended and invoke.value["wall_ms"] < ended:
            # In flight across the end of the lease: acknowledged after it, a violation
            # unless the region got a lease again (it returns only after the reconcile).
            result.violate(
                Violation(
                    f"{invoke.f} acknowledged by {served_by} after its lease ended "
                    f"(failover expire done at {ended} ms)",
                    [done.value.get("order_id", invoke.value.get("order_id", ""))],
                    [invoke.index, done.index],
                )
            )
            continue
        if served_by not in owners:
            order_id = done.value.get("order_id", invoke.value.get("order_id", ""))
            result.violate(
                Violation(
                    f"{invoke.f} of order {order_id} in cell {cell} acknowledged by "
                    f"{done.value['served_by']}, owner then: {', '.join(sorted(owners)) or 'none'}",
                    [order_id],
                    [invoke.index, done.index],
                )
            )
    return result


def check_changelog(ending: Ending, result: Result) -> None:
    """Every changelog row's origin is the owner of its cell under the rule version that
    is its epoch, and that version does not ban the cell (a write admitted while its cell
    was banned for a switch is one the switch's catch-up may not have waited for)."""
    by_version = {rule.version: rule for rule in ending.rules}
    unknown = 0
    for row in ending.changelog:
        rule = by_version.get(row.epoch)
        if rule is None or row.cell not in rule.owners:
            unknown += 1
            continue
        result.checked += 1
        if row.cell in rule.banned:
            result.violate(
                Violation(
                    f"cell {row.cell} position {row.position} ({row.table}) written by "
                    f"{row.origin} under rule version {row.epoch}, which bans the cell"
                )
            )
        elif rule.owners[row.cell] != row.origin:
            result.violate(
                Violation(
                    f"cell {row.cell} position {row.position} ({row.table}) written by "
                    f"{row.origin} under rule version {row.epoch}, whose owner is "
                    f"{rule.owners[row.cell]}"
                )
            )
    if unknown:
        result.notes.append(f"{unknown} changelog rows under a rule version not in the history")
    for reason in ending.changelog_unread:
        result.violate(Violation(f"changelog not read: {reason}"))


def check_convergence(history: History, ending: Ending) -> Result:
    """After quiescence every copy equals its owner's and is at its owner's position."""
    result = Result("convergence", checked=1)
    if not ending.quiescent:
        result.violate(Violation("the cluster did not become quiescent within its bound"))
    if ending.differences:
        result.violate(Violation(f"{ending.differences} rows differ from their owner's copy"))
    for reason in ending.not_compared:
        result.violate(Violation(f"not compared: {reason}"))
    for copy in ending.lagging:
        result.violate(Violation(f"replication lag not zero: {copy}"))
    return result


CHECKERS = (
    check_orders,
    check_payments,
    check_stock,
    check_isolation,
    check_ownership,
    check_convergence,
)


def check_all(history: History, ending: Ending) -> list[Result]:
    return [checker(history, ending) for checker in CHECKERS]


def errors_by_kind(history: History) -> dict[str, dict[str, int]]:
    """Client-visible errors: kind (HTTP status and error code, or exception) -> region -> n."""
    found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for invoke, done in history.pairs():
        if done is None or done.type == OK or invoke.f in ("read-other", "final", "fault"):
            continue
        if done.type in (FAIL, INFO):
            kind = done.error or str(done.status)
            found[f"{invoke.f} {kind}"][invoke.region] += 1
    return {k: dict(v) for k, v in found.items()}


def availability(history: History, bucket_s: float = 1.0) -> dict[str, list[float]]:
    """Per cell, the ratio of acknowledged writes per second of the run."""
    counts: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for invoke, done in _ops(history, *WRITES):
        cell = invoke.value.get("cell")
        if cell is None:
            continue
        second = int(invoke.time_ns / 1e9 / bucket_s)
        counts[str(cell)][second][1] += 1
        counts[str(cell)][second][0] += done.type == OK
    out: dict[str, list[float]] = {}
    for cell, seconds in sorted(counts.items()):
        last = max(seconds)
        out[cell] = [
            round(seconds[s][0] / seconds[s][1], 2) if seconds[s][1] else 1.0
            for s in range(last + 1)
        ]
    return out
