"""Flash sales, the center's side (docs/architecture.md, Flash sales): the sale's definition,
its token quota and the segments of it handed to regions. Runs at the owner of the center
cell; other regions reach it through `center` RPC (services/remote.py).

A sale sells `stock` units of one SKU to holders of its tokens, at most `tokens` (M) of
them, at most `per_buyer` (K) per buyer, within `[start_ms, end_ms)`. The center never
issues a token itself: it hands the quota to the serving processes of the regions in
**segments** (at most `segment_size` tokens each, like order-ID segments), and each token
is issued by the process holding a segment, in the buyer's own cell
(services/sale_tokens.py). So a token request is answered by the buyer's region, and the
center sees one call per segment, not one per buyer.

What makes every token accountable: `remaining` plus the sizes of the segments granted is
M, always (one transaction moves tokens from one to the other). A segment's holder takes
tokens from it in memory; every token issued is a row in a buyer's cell carrying its
segment; when the holder is done with a segment (used up, expired, the sale over, the
process stopping) it gives back what it never took, and only then, so nothing is given
back that may still be issued. A holder that dies gives nothing back: its segment's
untaken tokens are lost, and no more than a segment. Stock is not the tokens' business:
an order of the sale's SKU reserves its unit here like any order (services/inventory.py),
conditional on `available >= 1`, so however many tokens were issued, no more than the
sale's units are sold.

Peers: JD sells a quota rather than stock, deducted atomically in Redis; Alibaba splits a
promotion's budget into sub-buckets by user ID (about 30k QPS per shard). Here the quota's
sub-buckets are the segments, taken by whichever process serves the buyers (so a hot
region takes more of them, and nobody has to guess the split in advance), and the
deduction that must be atomic per buyer (K) is the buyer's own cell's serialised write,
which the sale needs no Redis for.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.sql import Executable

from unitrade.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    SaleClosed,
    SaleNotFound,
    SaleSoldOut,
    SaleTokenRequired,
    SaleWindowInvalid,
)
from unitrade.storage.schema import inventory, sale_segments, sales
from unitrade.storage.store import CellStore, WriteTx, by_key, key_params, now_ms

SALES_KEPT_MAX = 10_000  # sales the center holds at once; every region keeps them in memory
TOKENS_MAX = 10**9
PER_BUYER_MAX = 100
SEGMENT_SIZE_DEFAULT = 100
SEGMENT_SIZE_MAX = 100_000
SALE_LENGTH_S_MAX = 30 * 86_400
LIST_LIMIT_MAX = 500
SEGMENTS_LISTED_MAX = 100_000  # segments an accounting reads at most
# A segment is issued from for at most this long after its holder asked for it, then given
# back: a region that stops getting buyers does not sit on tokens other regions could issue.
SEGMENT_TTL_S = 10.0
# The center counts a segment not given back as lost this long after its expiry (a holder
# gives it back within a second of it; clocks of two regions may differ).
SEGMENT_GRACE_MS = 5_000
SALE_ID_PATTERN = r"^[0-9a-f]{12}$"

_NEWEST_OF_SKU = (
    select(sales).where(sales.c.sku == bindparam("sku")).order_by(sales.c.start_ms.desc()).limit(1)
)
_SALE_COUNT = select(func.count()).select_from(sales)
_GRANT = select(sale_segments).where(
    sale_segments.c.sale_id == bindparam("sale_id"),
    sale_segments.c.grant_id == bindparam("grant_id"),
)
_SEGMENTS_OF = (
    select(sale_segments)
    .where(sale_segments.c.sale_id == bindparam("sale_id"))
    .order_by(sale_segments.c.segment_id)
    .limit(bindparam("n"))
)
_PAGE = select(sales).order_by(sales.c.start_ms.desc(), sales.c.sale_id).limit(bindparam("n"))


@dataclass(frozen=True)
class Sale:
    sale_id: str
    sku: str
    stock: int
    tokens: int
    per_buyer: int
    segment_size: int
    start_ms: int
    end_ms: int

    def state(self, now: int) -> str:
        if now < self.start_ms:
            return "scheduled"
        return "open" if now < self.end_ms else "ended"

    def check_open(self, now: int) -> None:
        """Refuse unless the sale runs at `now` (this region's wall clock, ms)."""
        state = self.state(now)
        if state != "open":
            when = "has not started" if state == "scheduled" else "has ended"
            raise SaleClosed(
                f"sale {self.sale_id} {when}",
                sale_id=self.sale_id,
                start_ms=self.start_ms,
                end_ms=self.end_ms,
            )

    def body(self) -> dict[str, Any]:
        return {
            "sale_id": self.sale_id,
            "sku": self.sku,
            "stock": self.stock,
            "tokens": self.tokens,
            "per_buyer": self.per_buyer,
            "segment_size": self.segment_size,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "state": self.state(now_ms()),
        }


def sale_of(row: Any) -> Sale:
    return Sale(
        sale_id=str(row["sale_id"]),
        sku=str(row["sku"]),
        stock=int(row["stock"]),
        tokens=int(row["tokens"]),
        per_buyer=int(row["per_buyer"]),
        segment_size=int(row["segment_size"]),
        start_ms=int(row["start_ms"]),
        end_ms=int(row["end_ms"]),
    )


def sale_reads(lines: list[tuple[str, int]]) -> list[tuple[Executable, dict[str, Any]]]:
    """The reads of `check_sale_rows`: each line's newest sale (for WriteTx.each)."""
    return [(_NEWEST_OF_SKU, {"sku": sku}) for sku, _ in lines]


def check_sale_rows(
    lines: list[tuple[str, int]], found: Sequence[Sequence[Any]], sale_id: str | None
) -> None:
    """In the center's stock reservation, on the rows of `sale_reads`: a line of a SKU
    that has a sale is accepted only from an order that names that sale (its buyer's
    region found and checked a token of it, and consumes it in the order's own
    transaction), for one unit.

    The center checks this although the buyer's region did: a region that has not yet
    learned of a sale created a moment ago (its copy of the center cell lags) would
    otherwise let an order without a token take a unit of the sale."""
    matched = False
    for (sku, qty), rows in zip(lines, found, strict=True):
        row = rows[0] if rows else None
        if row is None:
            continue
        if row.sale_id != sale_id:
            raise SaleTokenRequired(
                f"{sku} is sold in sale {row.sale_id}: order it with a token of that sale "
                "(`sale_token`; POST /v1/sales/{id}/tokens)",
                sale_id=row.sale_id,
                sku=sku,
            )
        if qty != 1:
            raise InvalidRequest(f"a sale token buys one unit of {sku}, not {qty}")
        matched = True
    if sale_id is not None and not matched:
        raise InvalidRequest(f"the order has no SKU of sale {sale_id}")


def _check_definition(
    stock: int, tokens: int, per_buyer: int, start_ms: int, end_ms: int, segment_size: int
) -> None:
    """Real checks (the CLI and the API validate too, but the service is the last word)."""
    if not 0 <= stock <= TOKENS_MAX:
        raise InvalidRequest(f"stock must be 0 to {TOKENS_MAX}")
    if not 1 <= tokens <= TOKENS_MAX:
        raise InvalidRequest(f"tokens must be 1 to {TOKENS_MAX}")
    if not 1 <= per_buyer <= PER_BUYER_MAX:
        raise InvalidRequest(f"per_buyer must be 1 to {PER_BUYER_MAX}")
    if not 1 <= segment_size <= SEGMENT_SIZE_MAX:
        raise InvalidRequest(f"segment_size must be 1 to {SEGMENT_SIZE_MAX}")
    if end_ms <= start_ms:
        raise SaleWindowInvalid("the sale must end after it starts")
    if end_ms - start_ms > SALE_LENGTH_S_MAX * 1000:
        raise SaleWindowInvalid(f"a sale lasts at most {SALE_LENGTH_S_MAX // 86_400} days")
    if end_ms <= now_ms():
        raise SaleWindowInvalid("the sale would end in the past")


class SaleService:
    """The center's side of flash sales; every write goes through the center cell's fence."""

    def __init__(self, store: CellStore) -> None:
        self.store = store
        # Called with each sale this region created, after it committed (the region's
        # SaleBook; other regions learn of it by replication).
        self.on_write: list[Callable[[Sale], None]] = []

    async def create(
        self,
        sku: str,
        stock: int,
        tokens: int,
        per_buyer: int,
        start_ms: int,
        end_ms: int,
        segment_size: int = SEGMENT_SIZE_DEFAULT,
    ) -> dict[str, Any]:
        """A new sale of `sku`; its units are the SKU's stock from now on: `stock` units
        available (reserved and sold units of earlier orders are kept apart), in the same
        transaction. Refused while another sale of the SKU has not ended (`conflict`,
        naming it: also what a repeated create whose answer was lost gets)."""
        _check_definition(stock, tokens, per_buyer, start_ms, end_ms, segment_size)
        sale_id = secrets.token_hex(6)

        def work(tx: WriteTx) -> dict[str, Any]:
            stamp = now_ms()
            newest = tx.one(_NEWEST_OF_SKU, {"sku": sku})
            if newest is not None and newest.end_ms > stamp:
                raise Conflict(
                    f"{sku} has sale {newest.sale_id} until {newest.end_ms}: one sale of a "
                    "SKU at a time",
                    sale_id=newest.sale_id,
                )
            (count,) = tx.all(_SALE_COUNT)
            if int(count[0]) >= SALES_KEPT_MAX:
                raise Conflict(
                    f"{SALES_KEPT_MAX} sales are kept already: wait for retention to delete "
                    "ended ones ([retention] sales_ended_s)"
                )
            level = tx.get(inventory, {"sku": sku})
            if level is None:
                tx.insert(
                    inventory,
                    {"sku": sku, "available": stock, "reserved": 0, "sold": 0, "updated_ms": stamp},
                )
            else:
                tx.update(inventory, {"sku": sku}, {"available": stock, "updated_ms": stamp})
            row = {
                "sale_id": sale_id,
                "sku": sku,
                "stock": stock,
                "tokens": tokens,
                "per_buyer": per_buyer,
                "segment_size": segment_size,
                "start_ms": start_ms,
                "end_ms": end_ms,
                "remaining": tokens,
                "segments": 0,
                "created_ms": stamp,
                "updated_ms": stamp,
            }
            tx.insert(sales, row)
            return row

        row = await self.store.write(work)
        sale = sale_of(row)
        for listener in self.on_write:
            listener(sale)
        return {**sale.body(), "remaining": row["remaining"], "segments": 0}

    async def get(self, sale_id: str) -> Sale:
        statement, params = by_key(sales), key_params({"sale_id": sale_id})
        row = await self.store.read(lambda conn: conn.execute(statement, params).first())
        if row is None:
            raise SaleNotFound(f"no sale {sale_id}", sale_id=sale_id)
        return sale_of(row._mapping)

    async def page(self, limit: int) -> list[dict[str, Any]]:
        """The newest sales first (by start), with their remaining quota."""
        assert 1 <= limit <= LIST_LIMIT_MAX
        rows = await self.store.read(lambda conn: conn.execute(_PAGE, {"n": limit}).all())
        return [
            {**sale_of(r._mapping).body(), "remaining": r.remaining, "segments": r.segments}
            for r in rows
        ]

    async def grant(self, sale_id: str, region: str, holder: str, grant_id: str) -> dict[str, Any]:
        """Hand a segment of the sale's quota to `holder` (a serving process of `region`):
        min(remaining, segment_size) tokens, moved from `remaining` in one transaction.
        `grant_id` names the request: the same one again answers the same segment (a
        retry after a lost answer grants nothing twice). The answer carries the epoch of
        the grant (a holder drops a segment the center's failover may have lost)."""

        def work(tx: WriteTx) -> dict[str, Any]:
            granted = tx.one(_GRANT, {"sale_id": sale_id, "grant_id": grant_id})
            if granted is not None:
                return {**_segment_body(granted._mapping), "epoch": tx.epoch, "now_ms": now_ms()}
            row = tx.get(sales, {"sale_id": sale_id})
            if row is None:
                raise SaleNotFound(f"no sale {sale_id}", sale_id=sale_id)
            stamp = now_ms()
            sale_of(row._mapping).check_open(stamp)
            if row.remaining <= 0:
                raise SaleSoldOut(
                    f"every token of sale {sale_id} is issued or held by a region",
                    sale_id=sale_id,
                )
            size = min(int(row.remaining), int(row.segment_size))
            segment_id = int(row.segments) + 1
            image = tx.update(
                sales,
                {"sale_id": sale_id},
                {"segments": segment_id, "updated_ms": stamp},
                add={"remaining": -size},
                at_least={"remaining": size},
            )
            assert image is not None, "remaining was read in this transaction"
            segment = {
                "sale_id": sale_id,
                "segment_id": segment_id,
                "grant_id": grant_id,
                "region": region,
                "holder": holder,
                "size": size,
                "status": "open",
                "used": None,
                "returned": 0,
                "granted_ms": stamp,
                "expires_ms": stamp + int(SEGMENT_TTL_S * 1000),
                "updated_ms": stamp,
            }
            tx.insert(sale_segments, segment)
            return {**_segment_body(segment), "epoch": tx.epoch, "now_ms": stamp}

        result: dict[str, Any] = await self.store.write(work)
        return result

    async def give_back(self, sale_id: str, segment_id: int, used: int) -> dict[str, Any]:
        """The holder is done with a segment and took `used` tokens of it: the rest goes
        back to `remaining`, once (a repeat answers the same). The holder calls this only
        after it has stopped issuing from the segment for good."""

        def work(tx: WriteTx) -> dict[str, Any]:
            key = {"sale_id": sale_id, "segment_id": segment_id}
            row = tx.get(sale_segments, key)
            if row is None:
                # A center promoted by a failover may never have had it (the holder drops
                # it; its tokens show as issued from an unknown segment).
                raise NotFound(f"sale {sale_id} has no segment {segment_id} here")
            if row.status == "returned":
                return _segment_body(row._mapping)
            if not 0 <= used <= row.size:
                raise InvalidRequest(f"segment {segment_id} has {row.size} tokens, not {used}")
            stamp = now_ms()
            back = int(row.size) - used
            values = {"status": "returned", "used": used, "returned": back, "updated_ms": stamp}
            image = tx.update(sale_segments, key, values)
            assert image is not None
            if back:
                key = {"sale_id": sale_id}
                tx.update(sales, key, {"updated_ms": stamp}, add={"remaining": back})
            return _segment_body(image)

        result: dict[str, Any] = await self.store.write(work)
        return result

    async def quota(self, sale_id: str) -> tuple[Sale, int, list[dict[str, Any]], int]:
        """The sale, its remaining quota, its segments (at most SEGMENTS_LISTED_MAX) and how
        many segments it has, in one read of the center cell."""

        def work(conn: Connection) -> tuple[Any, Any]:
            row = conn.execute(by_key(sales), key_params({"sale_id": sale_id})).first()
            segments = conn.execute(
                _SEGMENTS_OF, {"sale_id": sale_id, "n": SEGMENTS_LISTED_MAX}
            ).all()
            return row, segments

        row, segments = await self.store.read(work)
        if row is None:
            raise SaleNotFound(f"no sale {sale_id}", sale_id=sale_id)
        listed = [_segment_body(s._mapping) for s in segments]
        return sale_of(row._mapping), int(row.remaining), listed, int(row.segments)


def _segment_body(row: Any) -> dict[str, Any]:
    return {
        "sale_id": row["sale_id"],
        "segment_id": int(row["segment_id"]),
        "region": row["region"],
        "holder": row["holder"],
        "size": int(row["size"]),
        "status": row["status"],
        "used": None if row["used"] is None else int(row["used"]),
        "returned": int(row["returned"]),
        "granted_ms": int(row["granted_ms"]),
        "expires_ms": int(row["expires_ms"]),
    }


def account(
    sale: Sale,
    remaining: int,
    segments: list[dict[str, Any]],
    issued: Mapping[int, Mapping[str, int]],
    now: int | None = None,
) -> dict[str, Any]:
    """Where every token of a sale is (`unitrade sale show`). `issued` is, per segment, the
    tokens the buyers' cells hold by status (`issued`: not used yet, `used`: bought a
    unit). Every token is in exactly one of: `remaining` at the center; issued (in a buyer's
    cell); unissued in a segment a live holder still issues from; lost: untaken in a
    segment its holder never gave back (it died: past its expiry), or taken by a holder
    whose token write never committed. So remaining + issued + unissued + lost = tokens.
    Tokens issued from a segment the center does not know (a center failover lost its
    grant; reconcile it) are counted apart, in `issued_unknown_segments`."""
    stamp = now_ms() if now is None else now
    known = {s["segment_id"] for s in segments}
    in_cells = {seg: sum(by_status.values()) for seg, by_status in issued.items()}
    unissued = lost = 0
    by_region: dict[str, int] = {}
    lost_by_region: dict[str, int] = {}
    states = {"open": 0, "returned": 0, "expired": 0}
    for segment in segments:
        taken = in_cells.get(segment["segment_id"], 0)
        region = segment["region"]
        if segment["status"] == "returned":
            states["returned"] += 1
            gone = max(0, int(segment["used"] or 0) - taken)
        elif stamp > segment["expires_ms"] + SEGMENT_GRACE_MS:
            states["expired"] += 1
            gone = max(0, segment["size"] - taken)
        else:
            states["open"] += 1
            left = max(0, segment["size"] - taken)
            unissued += left
            if left:
                by_region[region] = by_region.get(region, 0) + left
            continue
        if gone:
            lost += gone
            lost_by_region[region] = lost_by_region.get(region, 0) + gone
    issued_known = sum(n for seg, n in in_cells.items() if seg in known)
    used = sum(by_status.get("used", 0) for by_status in issued.values())
    total_issued = sum(in_cells.values())
    return {
        **sale.body(),
        "remaining": remaining,
        "issued": total_issued,
        "used": used,
        "unissued_in_segments": unissued,
        "unissued_by_region": by_region,
        "lost": lost,
        "lost_by_region": lost_by_region,
        "issued_unknown_segments": total_issued - issued_known,
        "segments": states,
        "segments_counted": len(segments),
        "balanced": remaining + issued_known + unissued + lost == sale.tokens,
        "as_of_ms": stamp,
    }


def new_grant_id() -> str:
    return secrets.token_hex(8)


def monotonic_deadline(ttl_s: float = SEGMENT_TTL_S) -> float:
    """When a holder stops issuing from a segment it asks for now: counted from before the
    request, so that it stops before the center's expiry (counted from its receipt)."""
    return time.monotonic() + ttl_s
