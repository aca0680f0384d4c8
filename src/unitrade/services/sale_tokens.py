"""Flash-sale tokens, the regions' side (docs/architecture.md, Flash sales).

- `SaleBook`: every sale, in memory, from this region's copy of the center cell (kept
  current by replication, and by the center's own writes where this region owns it), so
  that an order learns whether one of its SKUs is a sale's without a call anywhere.
- `TokenIssuer`: a serving process holds at most one segment of each sale's token quota
  (granted by the center, services/sales.py) and issues tokens from it, each one a row of
  the buyer's own cell written by its owner region, in the serialised write that also
  counts the buyer's tokens: "at most K per buyer" is a count inside that transaction.
  Most token requests are therefore answered by the buyer's region alone; the center is
  asked once per segment.
- The order's side: the token named by an order is read before the order reserves stock
  (a buyer without a valid token never reaches the center) and consumed in the very
  transaction that writes the order (`consume`), so a token buys one order, once.

A segment's holder counts what it took of it in memory. The count is never written
anywhere but through the tokens themselves: a process that dies loses its segment's
untaken tokens (at most a segment, never more), and the tokens it issued stay in the
buyers' cells, each naming its segment, which is how the center's accounting finds them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, func, select

from unitrade.errors import (
    InvalidRequest,
    NotFound,
    OutcomeUnknown,
    RegionUnavailable,
    SaleLimitReached,
    SaleNotFound,
    SaleSoldOut,
    SaleTokenRequired,
    SaleTokenUsed,
    UnitradeError,
)
from unitrade.services.inventory import InventoryService
from unitrade.services.remote import CenterClient
from unitrade.services.sales import (
    SALES_KEPT_MAX,
    SEGMENT_TTL_S,
    Sale,
    SaleService,
    account,
    new_grant_id,
    sale_of,
)
from unitrade.storage.copies import CellCopies
from unitrade.storage.schema import sale_tokens, sales
from unitrade.storage.store import CellStore, WriteTx, by_key, key_params, now_ms
from unitrade.topology.rule import Rule, route_buyer

log = logging.getLogger("unitrade.sales")

TOKEN_PATTERN = r"^[0-9a-f]{16}$"
TOKENS_LISTED_MAX = 100  # a buyer holds at most PER_BUYER_MAX tokens of a sale
BOOK_RELOAD_S = 5.0  # the in-memory book is read again from the copy this often
UNKNOWN_KEPT_MAX = 10_000  # sale IDs the center said it does not have, remembered ...
UNKNOWN_KEPT_S = 1.0  # ... this long, so unknown IDs do not each cost a center call
GIVE_BACK_S = 2.0  # a give-back call waits this long at most
CLOSED_KEPT_MAX = 10_000  # segments waiting to be given back (past it the oldest are lost)
# A sale the center said is sold out is answered so here for this long without asking it
# again: after the quota is gone every buyer still asks, and the center would see them all.
# (Segments given back later refill the quota: such buyers get tokens after this.)
SOLD_OUT_KEPT_S = 1.0

_ALL_SALES = select(sales).limit(SALES_KEPT_MAX)
_BUYER_COUNT = (
    select(func.count())
    .select_from(sale_tokens)
    .where(sale_tokens.c.buyer_id == bindparam("buyer_id"))
    .where(sale_tokens.c.sale_id == bindparam("sale_id"))
)
_BUYER_TOKENS = (
    select(sale_tokens)
    .where(
        sale_tokens.c.buyer_id == bindparam("buyer_id"),
        sale_tokens.c.sale_id == bindparam("sale_id"),
    )
    .order_by(sale_tokens.c.created_ms, sale_tokens.c.token_id)
    .limit(TOKENS_LISTED_MAX)
)
_ISSUED = (
    select(sale_tokens.c.segment_id, sale_tokens.c.status, func.count())
    .where(sale_tokens.c.sale_id == bindparam("sale_id"))
    .group_by(sale_tokens.c.segment_id, sale_tokens.c.status)
)


def token_body(row: Any, sku: str | None = None) -> dict[str, Any]:
    return {
        "token": row["token_id"],
        "sale_id": row["sale_id"],
        "sku": sku,
        "buyer_id": row["buyer_id"],
        "status": row["status"],
        "order_id": None if row["order_id"] is None else str(row["order_id"]),
        "created_ms": row["created_ms"],
        "sale_end_ms": row["sale_end_ms"],
    }


class SaleBook:
    """Every sale of this region's copy of the center cell, in memory (bounded by
    SALES_KEPT_MAX, the center's own bound)."""

    def __init__(self, store: CellStore, center: CenterClient) -> None:
        self.store = store
        self.center = center
        self._by_id: dict[str, Sale] = {}
        self._by_sku: dict[str, Sale] = {}  # the newest sale of each SKU (by start)
        self._unknown: dict[str, float] = {}  # sale id -> monotonic time the center said so
        self.center_reads = 0

    def __len__(self) -> int:
        return len(self._by_id)

    async def load(self) -> None:
        """Read every sale of this copy (at start, and every BOOK_RELOAD_S as a bound should
        a change ever be missed: a copy rebuilt from a snapshot is not replayed change by
        change)."""

        def work(conn: Connection) -> list[Sale]:
            return [sale_of(r._mapping) for r in conn.execute(_ALL_SALES)]

        found = await self.store.read(work)
        self._by_id = {s.sale_id: s for s in found}
        self._by_sku = {}
        for sale in found:
            self._index(sale)

    def _index(self, sale: Sale) -> None:
        current = self._by_sku.get(sale.sku)
        if current is None or (sale.start_ms, sale.sale_id) >= (current.start_ms, current.sale_id):
            self._by_sku[sale.sku] = sale

    def put(self, sale: Sale) -> None:
        self._by_id[sale.sale_id] = sale
        self._unknown.pop(sale.sale_id, None)
        self._index(sale)

    def remove(self, sale_id: str) -> None:
        gone = self._by_id.pop(sale_id, None)
        if gone is None or self._by_sku.get(gone.sku) != gone:
            return
        del self._by_sku[gone.sku]
        for sale in self._by_id.values():
            if sale.sku == gone.sku:
                self._index(sale)

    def applied(self, changes: Iterable[Mapping[str, Any]]) -> None:
        """Replicated changes of the center cell: the sales among them."""
        for change in changes:
            if change["tbl"] != sales.name:
                continue
            if change["op"] == "d":
                self.remove(str(orjson.loads(change["pk"])["sale_id"]))
            else:
                self.put(sale_of(orjson.loads(change["row_image"])))

    def of_sku(self, sku: str) -> Sale | None:
        return self._by_sku.get(sku)

    def known(self, sale_id: str) -> Sale | None:
        return self._by_id.get(sale_id)

    async def get(self, sale_id: str) -> Sale:
        """The sale, from memory; one this copy does not have yet (created a moment ago at
        the center) is asked of the center's owner, and remembered."""
        sale = self._by_id.get(sale_id)
        if sale is not None:
            return sale
        said = self._unknown.get(sale_id)
        if said is not None and time.monotonic() - said < UNKNOWN_KEPT_S:
            raise SaleNotFound(f"no sale {sale_id}", sale_id=sale_id)
        self.center_reads += 1
        try:
            sale = sale_of(await self.center.sale(sale_id))
        except SaleNotFound:
            if len(self._unknown) >= UNKNOWN_KEPT_MAX:
                self._unknown.clear()
            self._unknown[sale_id] = time.monotonic()
            raise
        self.put(sale)
        return sale


@dataclass
class Segment:
    """A segment of a sale's quota this process holds (services/sales.py)."""

    sale_id: str
    segment_id: int
    size: int
    epoch: int  # the rule version the center granted it under
    deadline: float  # monotonic: no token is taken from it after this
    taken: int = 0  # tokens handed to writes (committed, or whose outcome is unknown)
    inflight: int = 0  # token writes not finished yet
    closed: bool = False

    def usable(self, now: float) -> bool:
        return not self.closed and self.taken < self.size and now < self.deadline


class TokenIssuer:
    """Issues sale tokens from the segments this process holds."""

    def __init__(
        self, copies: CellCopies, book: SaleBook, center: CenterClient, region: str
    ) -> None:
        self.copies = copies
        self.book = book
        self.center = center
        self.region = region
        self.holder = f"{region}-{secrets.token_hex(6)}"
        self._current: dict[str, Segment] = {}  # sale -> the segment tokens come from
        self._closed: list[Segment] = []  # no more tokens from these: to be given back
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending_grants: dict[str, str] = {}  # sale -> a grant whose answer was lost
        self._sold_out: dict[str, float] = {}  # sale -> monotonic time the center said so
        self.issued = 0
        self.refused: dict[str, int] = {}
        self.segments_granted = 0
        self.segments_given_back = 0
        self.tokens_given_back = 0
        self.segments_dropped = 0

    # -- issuing -----------------------------------------------------------------------------

    async def issue(self, buyer_id: int, sale_id: str) -> dict[str, Any]:
        """A token of the sale for the buyer (at the owner of the buyer's cell)."""
        try:
            return await self._issue(buyer_id, sale_id)
        except UnitradeError as refused:
            self.refused[refused.code] = self.refused.get(refused.code, 0) + 1
            raise

    async def _issue(self, buyer_id: int, sale_id: str) -> dict[str, Any]:
        sale = await self.book.get(sale_id)
        sale.check_open(now_ms())
        route = route_buyer(self.copies.fence.rule, buyer_id)
        self.copies.fence.check(route.cell)  # wrong_region / write_banned before a token
        store = self.copies[route.cell]
        segment = await self._take(sale)
        token_id = secrets.token_hex(8)

        def work(tx: WriteTx) -> dict[str, Any]:
            params = {"buyer_id": buyer_id, "sale_id": sale.sale_id}
            ((held,),) = tx.all(_BUYER_COUNT, params)
            if int(held) >= sale.per_buyer:
                raise SaleLimitReached(
                    f"buyer {buyer_id} holds {held} tokens of sale {sale.sale_id}, the most "
                    f"one buyer may (GET /v1/sales/{sale.sale_id}/tokens lists them)",
                    sale_id=sale.sale_id,
                    per_buyer=sale.per_buyer,
                )
            stamp = now_ms()
            row = {
                "token_id": token_id,
                "sale_id": sale.sale_id,
                "buyer_id": buyer_id,
                "segment_id": segment.segment_id,
                "status": "issued",
                "order_id": None,
                "sale_end_ms": sale.end_ms,
                "created_ms": stamp,
                "updated_ms": stamp,
            }
            tx.insert(sale_tokens, row)
            return row

        try:
            row = await store.write(work)
        except OutcomeUnknown:
            raise  # the database connection failed: it may have committed, the token stays taken
        except UnitradeError:
            # A typed refusal is raised before the commit (the fence, the lease, the
            # limit): nothing was written, the token goes back to the segment. Anything
            # else may have committed: the token stays taken (counted lost if it did not).
            segment.taken -= 1
            raise
        finally:
            segment.inflight -= 1
        self.issued += 1
        return token_body(row, sale.sku)

    async def _take(self, sale: Sale) -> Segment:
        lock = self._locks.setdefault(sale.sale_id, asyncio.Lock())
        async with lock:
            segment = self._current.get(sale.sale_id)
            if segment is None or not segment.usable(time.monotonic()):
                if segment is not None:
                    self._close(segment)
                segment = await self._grant(sale)
                self._current[sale.sale_id] = segment
            segment.taken += 1
            segment.inflight += 1
            return segment

    async def _grant(self, sale: Sale) -> Segment:
        """A new segment from the center (at most one call in flight per sale: the lock)."""
        said = self._sold_out.get(sale.sale_id)
        asked = time.monotonic()
        if said is not None and asked - said < SOLD_OUT_KEPT_S:
            raise SaleSoldOut(
                f"every token of sale {sale.sale_id} is issued or held by a region",
                sale_id=sale.sale_id,
            )
        grant_id = self._pending_grants.get(sale.sale_id) or new_grant_id()
        self._pending_grants[sale.sale_id] = grant_id
        try:
            granted = await self.center.sale_segment(
                sale.sale_id, self.region, self.holder, grant_id
            )
        except SaleSoldOut:
            del self._pending_grants[sale.sale_id]  # refused: nothing was granted
            self._sold_out[sale.sale_id] = time.monotonic()
            raise
        except OutcomeUnknown as lost:
            # The segment may be granted: the next request asks again with the same grant
            # ID, which answers that segment rather than a second one.
            raise RegionUnavailable(
                f"the center did not answer a token quota request for sale {sale.sale_id}; retry",
                **lost.details,
            ) from lost
        del self._pending_grants[sale.sale_id]
        # The center's expiry, counted here from before the request: this process stops
        # issuing from the segment before the center counts it as expired.
        ttl_ms = min(int(granted["expires_ms"]) - int(granted["now_ms"]), SEGMENT_TTL_S * 1000)
        self.segments_granted += 1
        return Segment(
            sale_id=sale.sale_id,
            segment_id=int(granted["segment_id"]),
            size=int(granted["size"]),
            epoch=int(granted["epoch"]),
            deadline=asked + max(0.0, ttl_ms / 1000),
        )

    def _close(self, segment: Segment) -> None:
        if segment.closed:
            return
        segment.closed = True
        if self._current.get(segment.sale_id) is segment:
            del self._current[segment.sale_id]
        self._closed.append(segment)
        if len(self._closed) > CLOSED_KEPT_MAX:
            dropped = self._closed.pop(0)
            self.segments_dropped += 1
            log.error(
                "segment %s of sale %s not given back: %s kept waiting; its %s untaken "
                "tokens are lost",
                dropped.segment_id,
                dropped.sale_id,
                CLOSED_KEPT_MAX,
                dropped.size - dropped.taken,
            )

    # -- giving back -------------------------------------------------------------------------

    def close_due(self) -> None:
        """Close the segments no token may come from any more: used up, past their
        deadline, or of a sale that has ended."""
        now, stamp = time.monotonic(), now_ms()
        for segment in list(self._current.values()):
            sale = self.book.known(segment.sale_id)
            ended = sale is not None and stamp >= sale.end_ms
            if ended or not segment.usable(now):
                self._close(segment)

    def rule_installed(self, rule: Rule) -> None:
        """A failover of the center cell may have lost the grant of a segment (the new
        center's copy lacked it): no token comes from one granted before it. It is given
        back all the same (the new center may have it after all)."""
        center = rule.center_cell
        promoted = max((p.version for p in rule.promotions_of(center)), default=0)
        for segment in list(self._current.values()):
            if segment.epoch < promoted:
                self._close(segment)

    async def give_back_due(self) -> int:
        """Give back the closed segments whose token writes have all finished; the number
        given back (the others wait for the next round)."""
        self.close_due()
        done = 0
        for segment in list(self._closed):
            if segment.inflight > 0:
                continue
            try:
                async with asyncio.timeout(GIVE_BACK_S):
                    await self.center.sale_return(
                        segment.sale_id, segment.segment_id, segment.taken
                    )
            except NotFound:
                log.warning(
                    "segment %s of sale %s is unknown at the center (a failover lost its "
                    "grant): its %s tokens are issued from a segment the center does not know",
                    segment.segment_id,
                    segment.sale_id,
                    segment.taken,
                )
            except (UnitradeError, TimeoutError) as exc:
                log.info("segment %s not given back yet: %s", segment.segment_id, exc)
                continue
            self._closed.remove(segment)
            self.segments_given_back += 1
            self.tokens_given_back += segment.size - segment.taken
            done += 1
        return done

    async def give_back_all(self, timeout_s: float) -> None:
        """At a clean stop: close every segment and give each back (bounded); what is not
        given back in time is lost."""
        for segment in list(self._current.values()):
            self._close(segment)
        try:
            async with asyncio.timeout(timeout_s):
                while self._closed:
                    await self.give_back_due()
                    if self._closed:
                        await asyncio.sleep(0.05)
        except TimeoutError:
            log.warning("%s segments not given back at stop: lost", len(self._closed))

    def held(self) -> dict[str, dict[str, int]]:
        """Per sale, the segment this process issues from: untaken tokens, `/metrics`."""
        return {
            s.sale_id: {"segment_id": s.segment_id, "left": s.size - s.taken}
            for s in self._current.values()
        }

    # -- reading -----------------------------------------------------------------------------

    async def tokens_of(self, buyer_id: int, sale_id: str) -> list[dict[str, Any]]:
        """The buyer's tokens of a sale, oldest first, from the buyer's cell here."""
        sale = self.book.known(sale_id)
        store = self.copies[route_buyer(self.copies.fence.rule, buyer_id).cell]
        params = {"buyer_id": buyer_id, "sale_id": sale_id}
        rows = await store.read(lambda conn: conn.execute(_BUYER_TOKENS, params).all())
        if sale is None and not rows:
            await self.book.get(sale_id)  # sale_not_found for an unknown sale
        sku = sale.sku if sale is not None else None
        return [token_body(r._mapping, sku) for r in rows]


async def issued_by_segment(copies: CellCopies, sale_id: str) -> dict[int, dict[str, int]]:
    """Per segment, the tokens of a sale in this region's copies of the unit cells, by
    status: the accounting's "issued" (copies of cells owned elsewhere may lag their owner
    by the replication lag)."""
    rule = copies.fence.rule
    counts: dict[int, dict[str, int]] = {}
    params = {"sale_id": sale_id}
    for cell in rule.unit_cells():
        rows = await copies[cell].read(lambda conn: conn.execute(_ISSUED, params).all())
        for segment_id, status, n in rows:
            by_status = counts.setdefault(int(segment_id), {})
            by_status[str(status)] = by_status.get(str(status), 0) + int(n)
    return counts


# -- orders ------------------------------------------------------------------------------


def sale_of_lines(book: SaleBook, lines: list[tuple[str, int]]) -> Sale | None:
    """The sale one of an order's SKUs belongs to (None: no sale SKU); an order buys from
    one sale, one unit (a token buys one unit)."""
    found: Sale | None = None
    for sku, qty in lines:
        sale = book.of_sku(sku)
        if sale is None:
            continue
        if found is not None:
            raise InvalidRequest(
                f"{found.sku} and {sku} are sold in sales: one sale SKU per order (a token "
                "buys one unit)"
            )
        if qty != 1:
            raise InvalidRequest(f"a sale token buys one unit of {sku}, not {qty}")
        found = sale
    return found


def _check_token(row: Any, buyer_id: int, sale: Sale, token_id: str) -> None:
    if row is None or row.buyer_id != buyer_id or row.sale_id != sale.sale_id:
        raise SaleTokenRequired(
            f"no token {token_id} of sale {sale.sale_id} for this buyer "
            f"(POST /v1/sales/{sale.sale_id}/tokens)",
            sale_id=sale.sale_id,
        )
    if row.status != "issued":
        raise SaleTokenUsed(
            f"token {token_id} bought order {row.order_id} already",
            order_id=None if row.order_id is None else str(row.order_id),
        )


def require_token(sale: Sale, token_id: str | None) -> str:
    """The order's token, which an order of a sale SKU must carry, within the sale."""
    if token_id is None:
        raise SaleTokenRequired(
            f"{sale.sku} is sold in sale {sale.sale_id}: order it with a token of that sale "
            f"(`sale_token`; POST /v1/sales/{sale.sale_id}/tokens)",
            sale_id=sale.sale_id,
            sku=sale.sku,
        )
    sale.check_open(now_ms())
    return token_id


async def precheck_token(store: CellStore, buyer_id: int, sale: Sale, token_id: str) -> None:
    """Before the order reserves stock: a request without a valid token never reaches the
    center (what the tokens are for). The order's own transaction checks again."""
    statement, params = by_key(sale_tokens), key_params({"token_id": token_id})
    row = await store.read(lambda conn: conn.execute(statement, params).first())
    _check_token(row, buyer_id, sale, token_id)


def consume(tx: WriteTx, buyer_id: int, sale: Sale, token_id: str, order_id: int) -> None:
    """In the transaction that writes the order: the token buys this order, once."""
    sale.check_open(now_ms())
    row = tx.get(sale_tokens, {"token_id": token_id})
    _check_token(row, buyer_id, sale, token_id)
    image = tx.update(
        sale_tokens,
        {"token_id": token_id},
        {"status": "used", "order_id": order_id, "updated_ms": now_ms()},
        where={"status": "issued"},
    )
    assert image is not None, "the token was read as issued in this transaction"


async def sale_account(
    sales_service: SaleService, inventory: InventoryService, copies: CellCopies, sale_id: str
) -> dict[str, Any]:
    """`unitrade sale show`: the center's quota and segments, the tokens in this region's
    copies of the unit cells, and the SKU's stock (services/sales.py `account`)."""
    sale, remaining, segments, _count = await sales_service.quota(sale_id)
    issued = await issued_by_segment(copies, sale_id)
    body = account(sale, remaining, segments, issued)
    try:
        body["levels"] = await inventory.levels(sale.sku)
    except NotFound:
        body["levels"] = None
    return body
