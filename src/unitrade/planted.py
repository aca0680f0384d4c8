"""Bugs planted on purpose, for the verifier's own tests (tests/test_verify.py) only.

A checker that cannot fail is worse than none: each of these breaks one invariant of a
running region, and a `unitrade verify` run must report it. They are chosen by
UNITRADE_PLANTED_BUG in a region's environment; a region with one logs it loudly at start
and refuses to start in production (`[secrets] production = true`).

- drop_acked_orders: one order creation in ten is rolled back and answered 201 anyway
  (storage/store.py): acknowledged orders are lost.
- double_payment: a second payment of a paid order is applied and answered 200
  (services/orders.py): an order paid twice.
- write_banned: the fence and the gateway's hold ignore a ban (storage/fence.py,
  gateway/routing.py): a cell is written while a switch has it banned.
"""

from __future__ import annotations

import os

DROP_ACKED_ORDERS = "drop_acked_orders"
DOUBLE_PAYMENT = "double_payment"
WRITE_BANNED = "write_banned"
KNOWN = (DROP_ACKED_ORDERS, DOUBLE_PAYMENT, WRITE_BANNED)
ENV = "UNITRADE_PLANTED_BUG"

# Read once, at import: a region's bug does not change while it runs.
PLANTED = os.environ.get(ENV, "")


def planted(bug: str) -> bool:
    assert bug in KNOWN, bug
    return PLANTED == bug


def announcement() -> str | None:
    """What a region logs at start when a bug is planted in it (or an unknown one named)."""
    if not PLANTED:
        return None
    if PLANTED not in KNOWN:
        return f"{ENV}={PLANTED!r} names no planted bug (known: {', '.join(KNOWN)}); ignored"
    return f"PLANTED BUG {PLANTED}: this region is broken on purpose ({ENV}), for verify's tests"
