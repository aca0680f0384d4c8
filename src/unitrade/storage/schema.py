"""Tables of each cell kind (docs/architecture.md). Timestamps are integer milliseconds (UTC)
so that row images are plain JSON and compare equal on every engine."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects.mysql import MEDIUMTEXT

from unitrade.topology.config import CellKind

# JSON documents and row images. MySQL's TEXT holds 64 KiB at most; MEDIUMTEXT 16 MiB, as
# much as the server's default max_allowed_packet lets one statement carry anyway.
JsonText = Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")

# Common to every cell copy --------------------------------------------------------------

common = MetaData()

# One row: the cell this database is a copy of, and the last changelog position. Every write
# transaction locks this row first: positions are then gapless and in commit order, which is
# what a replica needs to tell "nothing new" from "a hole".
cell_meta = Table(
    "cell_meta",
    common,
    Column("cell_id", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(16), nullable=False),
    Column("last_position", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    # Every changelog row at or below this position has been deleted from this copy
    # (replication/retention.py); the copy holds the positions after it, gapless.
    Column("trimmed_position", BigInteger, nullable=False, server_default="0"),
    # The database's half of the fence, for a region of many processes: the newest rule
    # version at which some process of this region saw the cell's owner or ban change. A
    # fenced write (or an apply) under an older version is refused once it holds this
    # row's lock, so no process's stale rule can commit after the region acknowledged the
    # change (storage/store.py, docs/architecture.md). Local: never replicated.
    Column("fence_epoch", BigInteger, nullable=False, server_default="0"),
)

changelog = Table(
    "changelog",
    common,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("epoch", BigInteger, nullable=False),  # rule version the write was admitted under
    Column("origin", String(16), nullable=False),  # region that accepted the write
    Column("tbl", String(64), nullable=False),
    Column("pk", JsonText, nullable=False),  # JSON object of the primary key
    Column("op", String(1), nullable=False),  # i / u / d
    Column("row_image", JsonText, nullable=True),  # JSON of the whole row after the change
    Column("created_ms", BigInteger, nullable=False),
)

# Local to a copy: never captured, replicated, snapshotted or compared ---------------------

local = MetaData()

# Changelog rows that a copy held beyond a failover's promotion position (the divergent
# tail of the lost owner, storage/quarantine.py). Kept until an operator reconciles them.
quarantine = Table(
    "quarantine",
    local,
    Column("promotion_version", BigInteger, primary_key=True, autoincrement=False),
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("epoch", BigInteger, nullable=False),
    Column("origin", String(16), nullable=False),
    Column("tbl", String(64), nullable=False),
    Column("pk", JsonText, nullable=False),
    Column("op", String(1), nullable=False),
    Column("row_image", JsonText, nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("quarantined_ms", BigInteger, nullable=False),
    # held: not reconciled yet; reapplied | conflict | superseded: what reconcile decided
    Column("state", String(16), nullable=False),
    Column("note", JsonText, nullable=False),
)

# A region of many processes (`workers`): which region pulls this cell from its owner under
# which rule version, and from which position, as seen by whichever of the owner's processes
# served the pull (storage/followers.py): the switchover's last step and the changelog trim
# read it here, whichever process asks.
followers = Table(
    "followers",
    local,
    Column("region", String(16), primary_key=True),
    Column("rule_version", BigInteger, nullable=False),
    Column("applied", BigInteger, nullable=False),
    Column("seen_ms", BigInteger, nullable=False),
)

# A region of many processes: one row per process (its worker number), written by it every
# second in the region's copy of the global cell (region/workers.py): what `/healthz` of
# any process reports about the others, and the replication streams of the one leading.
workers = Table(
    "workers",
    local,
    Column("worker", Integer, primary_key=True, autoincrement=False),
    Column("pid", Integer, nullable=False),
    Column("host", String(255), nullable=False),
    Column("leader", Integer, nullable=False),
    Column("started_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("status", JsonText, nullable=False),
)

# Unit cells: buyers' data ---------------------------------------------------------------

unit = MetaData()

orders = Table(
    "orders",
    unit,
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("buyer_id", BigInteger, nullable=False),
    Column("cell_id", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("total_cents", BigInteger, nullable=False),
    Column("document", JsonText, nullable=False),  # the whole order as JSON (001: write once)
    Column("payment_id", String(64), nullable=True),
    Column("idempotency_key", String(128), nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
)

order_lines = Table(
    "order_lines",
    unit,
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("sku", String(64), nullable=False),
    Column("qty", Integer, nullable=False),
    Column("price_cents", BigInteger, nullable=False),
)

payments = Table(
    "payments",
    unit,
    Column("payment_id", String(64), primary_key=True),
    Column("order_id", BigInteger, nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

buyer_orders = Table(
    "buyer_orders",
    unit,
    Column("buyer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("created_ms", BigInteger, primary_key=True, autoincrement=False),
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    unit,
    Column("buyer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("idempotency_key", String(128), primary_key=True),
    Column("order_id", BigInteger, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)

carts = Table(
    "carts",
    unit,
    Column("buyer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("sku", String(64), primary_key=True),
    Column("qty", Integer, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

# The order-ID segment row (storage/sequences.py): replicated with the cell, so a new owner
# continues after the old owner's last segment.
id_sequences = Table(
    "id_sequences",
    unit,
    Column("cell_id", Integer, primary_key=True, autoincrement=False),
    Column("time_s", BigInteger, nullable=False),
    Column("next_sequence", BigInteger, nullable=False),
)

# Calls to the center that must happen after an order's state changed (commit, release,
# refund), written in the same transaction as the change (cosmicpython's outbox).
outbox = Table(
    "outbox",
    unit,
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("step", String(16), primary_key=True),
    Column("status", String(16), nullable=False),  # pending / done / failed (gave up)
    Column("attempts", Integer, nullable=False),
    Column("last_error", String(256), nullable=True),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("ix_outbox_status", outbox.c.status, outbox.c.created_ms)

# Flash-sale tokens issued to the cell's buyers (services/sale_tokens.py): the per-buyer
# limit is a count of these rows inside the cell's serialised write, and an order of the
# sale's SKU consumes one in the transaction that writes the order.
sale_tokens = Table(
    "sale_tokens",
    unit,
    Column("token_id", String(32), primary_key=True),
    Column("sale_id", String(16), nullable=False),
    Column("buyer_id", BigInteger, nullable=False),
    Column("segment_id", Integer, nullable=False),  # the center's segment it came from
    Column("status", String(16), nullable=False),  # issued / used
    Column("order_id", BigInteger, nullable=True),  # the order it bought, once used
    Column("sale_end_ms", BigInteger, nullable=False),  # for retention, without the center
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("ix_sale_tokens_buyer", sale_tokens.c.buyer_id, sale_tokens.c.sale_id)
Index("ix_sale_tokens_segment", sale_tokens.c.sale_id, sale_tokens.c.segment_id)
Index("ix_sale_tokens_end", sale_tokens.c.sale_end_ms)

# Center cell: inventory and payment claims ------------------------------------------

center = MetaData()

inventory = Table(
    "inventory",
    center,
    Column("sku", String(64), primary_key=True),
    Column("available", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("sold", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

reservations = Table(
    "reservations",
    center,
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("cell_id", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # reserved/committed/released/refunded
    Column("lines", JsonText, nullable=False),  # JSON [[sku, qty], ...] sorted by sku
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("ix_reservations_status", reservations.c.status, reservations.c.created_ms)

# Which order each payment ID pays, cluster-wide (services/payments.py): a pay claims its
# payment ID here before the payment is written in the order's unit cell, whose `payments`
# table sees that cell only. Deleted once `[retention] payment_claims_s` old.
payment_claims = Table(
    "payment_claims",
    center,
    Column("payment_id", String(64), primary_key=True),
    Column("order_id", BigInteger, nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
)
Index("ix_payment_claims_created", payment_claims.c.created_ms)

# Flash sales (services/sales.py): the definition, the token quota not yet handed to a
# region (`remaining`), and the segments handed out. A segment's tokens are issued by the
# process that holds it, each recorded in the buyer's unit cell (`sale_tokens`).
sales = Table(
    "sales",
    center,
    Column("sale_id", String(16), primary_key=True),
    Column("sku", String(64), nullable=False),
    Column("stock", BigInteger, nullable=False),  # units made available at creation
    Column("tokens", BigInteger, nullable=False),  # M: tokens the sale may issue
    Column("per_buyer", Integer, nullable=False),  # K: tokens one buyer may hold
    Column("segment_size", Integer, nullable=False),
    Column("start_ms", BigInteger, nullable=False),
    Column("end_ms", BigInteger, nullable=False),
    Column("remaining", BigInteger, nullable=False),  # never granted, or given back
    Column("segments", Integer, nullable=False),  # segments granted so far (the next ID)
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("ix_sales_sku", sales.c.sku, sales.c.start_ms)
Index("ix_sales_end", sales.c.end_ms)

sale_segments = Table(
    "sale_segments",
    center,
    Column("sale_id", String(16), primary_key=True),
    Column("segment_id", Integer, primary_key=True, autoincrement=False),
    Column("grant_id", String(32), nullable=False),  # the holder's request: a retry is a replay
    Column("region", String(16), nullable=False),
    Column("holder", String(32), nullable=False),  # the process that holds it
    Column("size", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # open / returned
    Column("used", Integer, nullable=True),  # tokens its holder took from it (at return)
    Column("returned", Integer, nullable=False),  # tokens given back to `remaining`
    Column("granted_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),  # its holder stops issuing before
    Column("updated_ms", BigInteger, nullable=False),
)
Index("ix_sale_segments_grant", sale_segments.c.sale_id, sale_segments.c.grant_id)

# Coupons (services/coupons.py): the definition and every buyer's claim; a claim is held by
# one order (status held, `order_id`), used when that order is paid, and claimed again
# when it is closed or refunded: a coupon serves at most one order at a time.
coupons = Table(
    "coupons",
    center,
    Column("code", String(32), primary_key=True),
    Column("count", BigInteger, nullable=False),  # N: claims allowed in all
    Column("claimed", BigInteger, nullable=False),
    Column("discount_kind", String(8), nullable=False),  # cents / percent
    Column("discount_value", BigInteger, nullable=False),
    Column("min_total_cents", BigInteger, nullable=False),
    Column("end_ms", BigInteger, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("ix_coupons_end", coupons.c.end_ms)

coupon_claims = Table(
    "coupon_claims",
    center,
    Column("code", String(32), primary_key=True),
    Column("buyer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("status", String(16), nullable=False),  # claimed / held / used
    Column("order_id", BigInteger, nullable=True),
    Column("discount_cents", BigInteger, nullable=False),
    Column("claimed_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("ix_coupon_claims_order", coupon_claims.c.order_id)

# Global cell: master data --------------------------------------------------------------

global_ = MetaData()

products = Table(
    "products",
    global_,
    Column("sku", String(64), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("price_cents", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("version", Integer, nullable=False),
)

# Bearer tokens revoked before they expire: every region checks its copy (in memory). A row
# goes once its token has expired anyway, so the table holds at most the revocations of
# the longest token lifetime (web/tokens.py TTL_S_MAX).
revoked_tokens = Table(
    "revoked_tokens",
    global_,
    Column("token_id", String(16), primary_key=True),
    Column("expires_s", BigInteger, nullable=False),
    Column("revoked_ms", BigInteger, nullable=False),
)

METADATA_BY_KIND: dict[CellKind, MetaData] = {
    CellKind.UNIT: unit,
    CellKind.CENTER: center,
    CellKind.GLOBAL: global_,
}


def tables_of(kind: CellKind) -> dict[str, Table]:
    """Every table a cell copy of this kind holds, by name (the changelog's `tbl`)."""
    return {**common.tables, **METADATA_BY_KIND[kind].tables}
