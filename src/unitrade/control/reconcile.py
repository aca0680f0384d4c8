"""`unitrade quarantine reconcile`: re-apply a lost region's quarantined changes (its
divergent tail after a failover, storage/quarantine.py) at the current owners, and report
what conflicts.

The CLI reads the region's held entries (`/internal/quarantine/list`, with their row
images), reduces them per cell to business objects (an order with its lines, payment,
buyer index entry, idempotency key and outbox steps; a cart line; a reservation; a payment
claim; a SKU's stock; a product; a revoked token), each to its final images, and sends each
object to the current owner of its cell (`/internal/reconcile/...`), which decides and
re-applies through its services (services/reconcile.py). Then it marks the object's
entries in the region's quarantine with the decision (`/internal/quarantine/mark`:
reapplied, conflict or superseded, with a note). Objects go global cell first (products an
order or a cart names), then unit cells, then the center cell: whether a lost center's
reservation must hold stock depends on its order, which the unit cells' pass may just have
re-created (and re-claimed its payment ID for).

Bookkeeping the owner keeps by itself is decided here without a call: order-ID
allocation (`id_sequences`), outbox steps of an order the lost region did not otherwise
change, deletes by retention. A table with no rule is a conflict for the operator.

Safe to run again: only held entries are read and marked, and every owner decision is
made afresh (a re-created order is found the next time). `dry_run` asks every owner the
same with `dry_run` set: nothing is written anywhere, the quarantine is not marked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from unitrade.gateway.quarantine_routes import LIST_PATH, MARK_PATH
from unitrade.gateway.reconcile_routes import (
    CART_PATH,
    ORDER_PATH,
    ORDER_STATUS_PATH,
    PAYMENT_CLAIM_PATH,
    PRODUCT_PATH,
    RESERVATION_PATH,
    REVOCATION_PATH,
    STOCK_PATH,
    TOTALS_MAX,
)
from unitrade.replication.diff_cli import DiffError, Regions
from unitrade.storage.quarantine import (
    CONFLICT,
    HELD,
    LIST_ROWS_MAX,
    MARKS_MAX,
    REAPPLIED,
    SUPERSEDED,
)
from unitrade.topology.config import CellKind, TopologyConfig
from unitrade.topology.order_id import decode_order_id

ENTRIES_MAX = 100_000  # held entries read per region and run; the rest waits for the next
MARK_CALL_BYTES_MAX = 48 * 1024  # a region's edge refuses bodies over 64 KiB
ERROR = "error"  # an object whose owner could not decide: its entries stay held
KIND_ORDER = {CellKind.GLOBAL: 0, CellKind.UNIT: 1, CellKind.CENTER: 2}
ORDER_TABLES = (
    "orders",
    "order_lines",
    "payments",
    "buyer_orders",
    "idempotency_keys",
    "outbox",
    "sale_tokens",
)


@dataclass
class Change:
    """One quarantined entry: a changelog row the lost region held past the promotion."""

    cell: str
    promotion_version: int
    position: int
    table: str
    op: str  # insert | update | delete
    key: dict[str, Any]
    image: dict[str, Any] | None
    created_ms: int

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> Change:
        return cls(
            cell=str(entry["cell"]),
            promotion_version=int(entry["promotion_version"]),
            position=int(entry["position"]),
            table=str(entry["table"]),
            op=str(entry["op"]),
            key=dict(entry["key"]),
            image=entry.get("image"),
            created_ms=int(entry["created_ms"]),
        )

    @property
    def pk(self) -> str:
        return orjson.dumps(self.key, option=orjson.OPT_SORT_KEYS).decode()


@dataclass
class Item:
    """One business object of a cell's held entries, and what became of it."""

    cell: str
    # order | cart | reservation | payment_claim | stock | product | revocation | local
    kind: str
    name: str  # what an operator reads
    changes: list[Change] = field(default_factory=list)
    state: str = HELD
    note: str = ""
    status: str | None = None  # an order's status at its owner afterwards

    def finals(self, table: str) -> dict[str, dict[str, Any] | None]:
        """The final image of each row of `table` (None: deleted), by primary key."""
        found: dict[str, dict[str, Any] | None] = {}
        for change in self.changes:
            if change.table == table:
                found[change.pk] = change.image
        return found

    def first(self, table: str) -> Change | None:
        return next((c for c in self.changes if c.table == table), None)

    def last(self, table: str) -> Change | None:
        return next((c for c in reversed(self.changes) if c.table == table), None)

    def decide(self, state: str, note: str, status: str | None = None) -> None:
        self.state, self.note, self.status = state, note, status


def _object_of(change: Change, kind: CellKind) -> tuple[str, str]:
    """(kind, name) of the business object a change belongs to."""
    key, image = change.key, change.image
    if kind == CellKind.UNIT:
        if change.table in ("orders", "order_lines", "buyer_orders", "outbox"):
            return "order", f"order {key['order_id']}"
        if change.table in ("payments", "idempotency_keys") and image is not None:
            return "order", f"order {image['order_id']}"
        if change.table == "idempotency_keys":
            return "local", f"idempotency key {key.get('idempotency_key')!r} (retention)"
        if change.table == "carts":
            return "cart", f"cart of buyer {key['buyer_id']}: {key['sku']}"
        if change.table == "id_sequences":
            return "local", "order-ID allocation"
        if change.table == "sale_tokens":
            if image is not None and image.get("order_id") is not None:
                return "order", f"order {image['order_id']}"
            return "token", f"sale token {key['token_id']}"
    if kind == CellKind.CENTER:
        if change.table in ("sales", "sale_segments"):
            return "sale", f"sale {key['sale_id']}"
        if change.table in ("coupons", "coupon_claims"):
            return "coupon", f"coupon {key['code']}"
    if kind == CellKind.CENTER:
        if change.table == "reservations":
            return "reservation", f"stock reservation of order {key['order_id']}"
        if change.table == "inventory":
            return "stock", f"stock of {key['sku']}"
        if change.table == "payment_claims" and image is not None:
            return (
                "payment_claim",
                f"payment claim {key['payment_id']} of order {image['order_id']}",
            )
        if change.table == "payment_claims":
            return "local", f"payment claim {key['payment_id']} (retention)"
    if kind == CellKind.GLOBAL:
        if change.table == "products":
            return "product", f"product {key['sku']}"
        if change.table == "revoked_tokens":
            return "revocation", f"revoked token {key['token_id']}"
    return "other", f"{change.table} {key}"


def group(changes: list[Change], kinds: dict[str, CellKind]) -> list[Item]:
    """The business objects of held entries: per cell, in the order of each object's first
    change; cells global first, then unit cells, then the center."""
    items: dict[tuple[str, int, str], Item] = {}
    for change in sorted(changes, key=lambda c: (c.cell, c.promotion_version, c.position)):
        kind, name = _object_of(change, kinds[change.cell])
        # A cell's tails of two failovers are two histories: never merged into one object.
        slot = (change.cell, change.promotion_version, name)
        if slot not in items:
            items[slot] = Item(change.cell, kind, name)
        items[slot].changes.append(change)
    return sorted(
        items.values(),
        key=lambda i: (
            KIND_ORDER[kinds[i.cell]],
            i.cell,
            i.changes[0].promotion_version,
            i.changes[0].position,
        ),
    )


# -- the calls each object makes -----------------------------------------------------------


def order_call(item: Item, dry_run: bool) -> dict[str, Any] | None:
    """The body of /internal/reconcile/order, or None when decided here (on `item`)."""
    first, last = item.first("orders"), item.last("orders")
    if first is None or last is None:
        tables = sorted({c.table for c in item.changes})
        item.decide(
            SUPERSEDED,
            f"{item.name}: only its {', '.join(tables)} changed, which the new owner keeps "
            "by itself (its outbox sends its own center steps)",
        )
        return None
    order = last.image
    if order is None or first.image is None:
        item.decide(CONFLICT, f"{item.name} was deleted at the lost region: redo it by hand")
        return None
    base_version = 0 if first.op == "insert" else int(first.image["version"]) - 1
    lines = [image for image in item.finals("order_lines").values() if image is not None]
    payment = next(
        (
            image
            for image in item.finals("payments").values()
            if image is not None and image["payment_id"] == order["payment_id"]
        ),
        None,
    )
    key = next(
        (
            image
            for image in item.finals("idempotency_keys").values()
            if image is not None and image["idempotency_key"] == order["idempotency_key"]
        ),
        None,
    )
    token = next(
        (
            image
            for image in item.finals("sale_tokens").values()
            if image is not None and str(image.get("order_id")) == str(order["order_id"])
        ),
        None,
    )
    return {
        "order": order,
        "lines": sorted(lines, key=lambda line: int(line["line_no"])),
        "payment": payment,
        "key": key,
        "token": token,
        "base_version": base_version,
        "dry_run": dry_run,
    }


def cart_call(item: Item, cell_id: int, dry_run: bool) -> dict[str, Any]:
    last = item.changes[-1]
    image = last.image
    return {
        "cell": cell_id,
        "buyer_id": int(last.key["buyer_id"]),
        "sku": str(last.key["sku"]),
        "qty": None if image is None else int(image["qty"]),
        # A removal has no row image: the time the lost region committed it stands in.
        "changed_ms": last.created_ms if image is None else int(image["updated_ms"]),
        "dry_run": dry_run,
    }


def stock_call(item: Item) -> dict[str, Any] | None:
    totals: list[int] = []
    for change in item.changes:
        if change.image is not None:
            image = change.image
            total = int(image["available"]) + int(image["reserved"]) + int(image["sold"])
            if not totals or totals[-1] != total:
                totals.append(total)
    if not totals:
        item.decide(SUPERSEDED, f"{item.name}: deleted rows only")
        return None
    if len(totals) > TOTALS_MAX:  # the first (against the new center's) and the newest
        totals = totals[: TOTALS_MAX // 2] + totals[-(TOTALS_MAX // 2) :]
    return {"sku": str(item.changes[0].key["sku"]), "totals": totals}


def product_call(item: Item, dry_run: bool) -> dict[str, Any]:
    first, last = item.changes[0], item.changes[-1]
    base = 0 if first.op == "insert" or first.image is None else int(first.image["version"]) - 1
    return {
        "sku": str(last.key["sku"]),
        "image": last.image,
        "base_version": base,
        "dry_run": dry_run,
    }


def _unused_token(item: Item) -> tuple[str, str]:
    return (
        SUPERSEDED,
        f"{item.name}: issued by the lost region and not used; not issued again (the "
        "segment it came from counts it lost); its buyer may ask for another",
    )


def _lost_sale(item: Item) -> tuple[str, str]:
    """A sale the lost center created or whose quota it handed out past the promotion."""
    grants = [c for c in item.changes if c.table == "sale_segments" and c.op == "insert"]
    tokens = sum(int((c.image or {}).get("size", 0)) for c in grants)
    created = any(c.table == "sales" and c.op == "insert" for c in item.changes)
    what = "created at the lost center: create it again if still wanted; " if created else ""
    return (
        CONFLICT,
        f"{item.name}: {what}{len(grants)} segments ({tokens} tokens) granted by the lost "
        "center are not at the new one: tokens their holders issued show in `unitrade sale "
        "show` as issued_unknown_segments, on top of the new center's quota (stock is "
        "reserved at the center as ever: no unit is oversold)",
    )


def _lost_coupon(item: Item) -> tuple[str, str]:
    """A coupon, or claims of it, that only the lost center had."""
    claims = {c.pk for c in item.changes if c.table == "coupon_claims" and c.op == "insert"}
    created = any(c.table == "coupons" and c.op == "insert" for c in item.changes)
    what = "created at the lost center: create it again if still wanted; " if created else ""
    return (
        CONFLICT,
        f"{item.name}: {what}{len(claims)} claims made at the lost center are not at the new "
        "one: those buyers claim again (the new center counts claims against the coupon's "
        "count afresh)",
    )


# Objects decided here, for the operator (docs/operations.md, Running a sale).
SALE_KINDS: dict[str, Callable[[Item], tuple[str, str]]] = {
    "token": _unused_token,
    "sale": _lost_sale,
    "coupon": _lost_coupon,
}


def _chunks(marks: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Marks in calls of at most MARKS_MAX marks and MARK_CALL_BYTES_MAX bytes."""
    chunks: list[list[dict[str, Any]]] = []
    size = 0
    for mark in marks:
        length = len(orjson.dumps(mark)) + 1
        if not chunks or len(chunks[-1]) >= MARKS_MAX or size + length > MARK_CALL_BYTES_MAX:
            chunks.append([])
            size = 0
        chunks[-1].append(mark)
        size += length
    return chunks


class Reconcile:
    """One reconcile of one region's quarantine."""

    def __init__(
        self,
        regions: Regions,
        region: str,
        owners: dict[str, str],
        answering: set[str],
        dry_run: bool,
        progress: Callable[[Item], None] | None = None,
    ) -> None:
        self.regions = regions
        self.config: TopologyConfig = regions.config
        self.region = region
        self.owners = owners
        self.answering = answering
        self.dry_run = dry_run
        self.progress = progress
        self.items: list[Item] = []
        self.truncated = False
        self.order_status: dict[int, str | None] = {}  # what this run learned or made
        self._marks: dict[str, list[dict[str, Any]]] = {}

    # -- reading ---------------------------------------------------------------------------

    def summary(self) -> dict[str, dict[str, int]]:
        answer = self.regions.call(self.region, LIST_PATH, {"limit": 1}, self.region)
        summary: dict[str, dict[str, Any]] = answer["summary"]
        return {str(c): {str(s): int(n) for s, n in v.items()} for c, v in summary.items()}

    def held(self) -> list[Change]:
        """Every held entry of the region, with its image (at most ENTRIES_MAX)."""
        changes: list[Change] = []
        for name, states in sorted(self.summary().items()):
            if not states.get(HELD):
                continue
            cell = self.config.find_cell(name).id
            after: list[int] | None = None
            while len(changes) < ENTRIES_MAX:
                limit = min(LIST_ROWS_MAX, ENTRIES_MAX - len(changes))
                call = {"cell": cell, "state": HELD, "limit": limit, "after": after}
                call["images"] = True
                page = self.regions.call(self.region, LIST_PATH, call, self.region)["entries"]
                changes += [Change.from_entry(e) for e in page]
                if len(page) < limit:
                    break
                after = [page[-1]["promotion_version"], page[-1]["position"]]
            else:
                self.truncated = True
        return changes

    # -- deciding --------------------------------------------------------------------------

    def run(self) -> list[Item]:
        kinds = {cell.name: cell.kind for cell in self.config.cells}
        self.items = group(self.held(), kinds)
        for item in self.items:
            try:
                self.one(item)
            except DiffError as exc:
                item.decide(ERROR, exc.message)
            if item.state != ERROR:
                self._mark(item)
            if self.progress is not None:
                self.progress(item)
        self._flush_all()
        return self.items

    def one(self, item: Item) -> None:
        cell = self.config.find_cell(item.cell)
        if item.kind == "local":
            if item.name == "order-ID allocation":
                note = "the new owner allocates order IDs after the failover's id_time_s"
            else:
                note = "a retention delete: the new owner's sweep deletes its own"
            item.decide(SUPERSEDED, f"{item.name}: {note}")
            return
        if item.kind == "other":
            item.decide(CONFLICT, f"{item.name}: no reconcile rule for this table; redo by hand")
            return
        if item.kind in SALE_KINDS:
            state, note = SALE_KINDS[item.kind](item)
            item.decide(state, note)
            return
        body: dict[str, Any] | None
        if item.kind == "order":
            body = order_call(item, self.dry_run)
            if body is not None:
                answer = self.call(item.cell, ORDER_PATH, body)
                order_id = int(body["order"]["order_id"])
                self.order_status[order_id] = answer.get("status")
                item.decide(answer["state"], answer["note"], answer.get("status"))
        elif item.kind == "cart":
            answer = self.call(item.cell, CART_PATH, cart_call(item, cell.id, self.dry_run))
            item.decide(answer["state"], answer["note"])
        elif item.kind == "reservation":
            self.reservation(item)
        elif item.kind == "payment_claim":
            image = item.changes[-1].image
            assert image is not None  # a delete is "local" (retention)
            body = {
                "payment_id": str(image["payment_id"]),
                "order_id": str(image["order_id"]),
                "amount_cents": int(image["amount_cents"]),
                "dry_run": self.dry_run,
            }
            answer = self.call(item.cell, PAYMENT_CLAIM_PATH, body)
            item.decide(answer["state"], answer["note"])
        elif item.kind == "stock":
            body = stock_call(item)
            if body is not None:
                answer = self.call(item.cell, STOCK_PATH, body)
                item.decide(answer["state"], answer["note"])
        elif item.kind == "product":
            answer = self.call(item.cell, PRODUCT_PATH, product_call(item, self.dry_run))
            item.decide(answer["state"], answer["note"])
        elif item.kind == "revocation":
            last = item.changes[-1]
            body = {
                "token_id": str(last.key["token_id"]),
                "expires_s": None if last.image is None else int(last.image["expires_s"]),
                "dry_run": self.dry_run,
            }
            answer = self.call(item.cell, REVOCATION_PATH, body)
            item.decide(answer["state"], answer["note"])

    def reservation(self, item: Item) -> None:
        last = item.changes[-1]
        order_id = int(last.key["order_id"])
        if last.image is None:
            item.decide(SUPERSEDED, f"{item.name}: deleted by retention, finished")
            return
        lines = [(str(sku), int(qty)) for sku, qty in orjson.loads(last.image["lines"])]
        if order_id not in self.order_status:
            self.order_status[order_id] = self._order_status(order_id)
        body = {
            "order_id": str(order_id),
            "lines": lines,
            "order_status": self.order_status[order_id],
            "dry_run": self.dry_run,
        }
        answer = self.call(item.cell, RESERVATION_PATH, body)
        item.decide(answer["state"], answer["note"])

    def _order_status(self, order_id: int) -> str | None:
        """The order's status at the owner of its cell now (None: it has no such order)."""
        try:
            cell = self.config.cell(decode_order_id(order_id).cell)
        except (ValueError, KeyError):
            return None  # no such cell: no such order anywhere
        answer = self.call(cell.name, ORDER_STATUS_PATH, {"order_id": str(order_id)})
        status = answer.get("status")
        return None if status is None else str(status)

    def call(self, cell: str, path: str, body: dict[str, Any]) -> Any:
        owner = self.owners.get(cell, "")
        if owner not in self.answering:
            raise DiffError(f"the owner of cell {cell}, {owner or 'unknown'}, does not answer")
        return self.regions.call(owner, path, body, owner)

    # -- marking ---------------------------------------------------------------------------

    def _mark(self, item: Item) -> None:
        if self.dry_run:
            return
        marks = self._marks.setdefault(item.cell, [])
        marks += [
            {
                "promotion_version": c.promotion_version,
                "position": c.position,
                "state": item.state,
                "note": item.note,
            }
            for c in item.changes
        ]
        if len(marks) >= MARKS_MAX:
            self._flush(item.cell)

    def _flush(self, cell: str) -> None:
        marks = self._marks.pop(cell, [])
        cell_id = self.config.find_cell(cell).id
        for chunk in _chunks(marks):
            body = {"cell": cell_id, "marks": chunk}
            self.regions.call(self.region, MARK_PATH, body, self.region)

    def _flush_all(self) -> None:
        for cell in list(self._marks):
            self._flush(cell)

    # -- what is left ----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        found = dict.fromkeys((REAPPLIED, CONFLICT, SUPERSEDED, ERROR), 0)
        for item in self.items:
            found[item.state] = found.get(item.state, 0) + 1
        return found

    def left(self) -> dict[str, int]:
        """Entries of the region held or in conflict now (in a dry run: would be)."""
        summary = self.summary()
        held = sum(states.get(HELD, 0) for states in summary.values())
        conflicts = sum(states.get(CONFLICT, 0) for states in summary.values())
        if self.dry_run:
            decided = [i for i in self.items if i.state != ERROR]
            held -= sum(len(i.changes) for i in decided)
            conflicts += sum(len(i.changes) for i in decided if i.state == CONFLICT)
        return {HELD: held, CONFLICT: conflicts}
