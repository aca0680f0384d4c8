"""Synthetic data of the control plane's health checker (control/health.py).

The checker orders through the public API like a buyer, so its orders must be told apart
from business ones everywhere they could be counted or listed. Two markers do it, both pure
functions of a value every layer already has:

- **Buyer IDs from `PROBE_BUYER_MIN` (2**62) up are reserved** for the checker. The probe
  buyer of a unit cell is the lowest reserved ID whose bucket maps to that cell under the
  rule in force (`probe_buyer`), so its orders land in that cell. `unitrade token`
  refuses these IDs; the control plane issues their tokens itself.
- **The SKU `PROBE_SKU`** is the only thing probe orders buy, one unit at a time, so a
  center reservation of a probe order holds exactly `PROBE_LINES`. It is left out of the
  product listing, and only probe buyers may order it.
"""

from __future__ import annotations

from unitrade.topology.rule import Rule

PROBE_BUYER_MIN = 2**62
PROBE_SKU = "unitrade-probe"
PROBE_QTY = 1
# The `lines` of a probe order's reservation as the center stores them (sorted [sku, qty]
# pairs as compact JSON, services/inventory.py).
PROBE_LINES = f'[["{PROBE_SKU}",{PROBE_QTY}]]'


def is_probe_buyer(buyer_id: int) -> bool:
    return buyer_id >= PROBE_BUYER_MIN


def probe_buyer(rule: Rule, cell: int) -> int | None:
    """The reserved buyer whose bucket is the lowest of `cell` under `rule`; None when no
    bucket maps to the cell (nothing can be ordered in it)."""
    bucket = next((b for b, c in enumerate(rule.bucket_cells) if c == cell), None)
    if bucket is None:
        return None
    # (MIN + (bucket - MIN) mod n) mod n == bucket, and stays below MIN + n.
    return PROBE_BUYER_MIN + (bucket - PROBE_BUYER_MIN) % rule.bucket_count
