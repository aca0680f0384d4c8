"""One region's process: its cell copies, services, RPC clients and background work.

A region may run several such processes (`workers`, unitrade/workers.py): each serves
requests with its own views of the rule, fence, lease, holds, order-ID segments and rule
agent, over the region's shared databases; one of them, the leader, does the background
work (docs/architecture.md, A region of many processes)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from unitrade.control.agent import RuleAgent
from unitrade.control.etcd_lease import region_lease_source
from unitrade.control.lease import LeaseHolder, LeaseSource
from unitrade.errors import WriteBanned, WrongRegion
from unitrade.flow.control import FlowControl
from unitrade.replication.replicator import Replicator
from unitrade.rpc.client import RegionClient
from unitrade.services.cart import CartService
from unitrade.services.catalog import CatalogService
from unitrade.services.coupons import CouponService
from unitrade.services.inventory import InventoryService
from unitrade.services.orders import OrderService
from unitrade.services.payments import PaymentClaims
from unitrade.services.remote import CatalogClient, CenterClient
from unitrade.services.retention import RetentionSweeper
from unitrade.services.revocations import Revocations
from unitrade.services.sale_tokens import BOOK_RELOAD_S, SaleBook, TokenIssuer
from unitrade.services.sales import SaleService
from unitrade.storage.copies import CellCopies
from unitrade.storage.fence import Fence
from unitrade.storage.leader import LeaderLock
from unitrade.storage.sequences import OrderIdAllocator
from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import (
    RoutingError,
    Rule,
    check_rule_fits,
    initial_rule,
    rule_from_body,
)
from unitrade.topology.rule_view import RuleView
from unitrade.workers import ChangeFeed, Leadership, StatusReporter

log = logging.getLogger("unitrade.region")

START_SYNC_S = 2.0
OUTBOX_INTERVAL_S = 1.0
ABANDONED_INTERVAL_S = 15.0
SEGMENTS_INTERVAL_S = 1.0  # closed sale segments are given back this often
GIVE_BACK_AT_STOP_S = 2.0


class RegionRuntime:
    def __init__(
        self,
        config: TopologyConfig,
        region: str,
        data_dir: Path,
        lease_source: LeaseSource | None = None,
        worker: int = 0,
    ) -> None:
        self.config = config
        self.name = region
        self.data_dir = data_dir
        # This process's number among the region's `workers` (0 .. workers - 1).
        self.workers = config.region(region).workers
        if not 0 <= worker < self.workers:
            raise ValueError(f"region {region} runs workers 0..{self.workers - 1}, not {worker}")
        self.worker = worker
        self.rule_path = data_dir / region / "rule.json"
        rule = self._load_rule()
        # Each component that routes or writes holds its own view of the rule and
        # acknowledges versions separately (docs/architecture.md): the data access layer
        # (the fence), the gateway (edge routing, forwarding, holds) and the RPC client
        # (center calls).
        self.fence: Fence
        if lease_source is None:
            # From the control plane, or from etcd directly (`[control] lease_authority`).
            lease_source = region_lease_source(config, region, worker)
        self.lease = LeaseHolder(
            region,
            lease_source,
            config.control,
            lambda: self.fence.rule.version,
        )
        self.fence = Fence(region, rule, self.lease.valid)
        self.gateway = RuleView("gateway", rule)
        self.rpc = RuleView("rpc", rule)
        self._install_lock = asyncio.Lock()
        self.copies = CellCopies(config, region, data_dir, self.fence)
        self.client = RegionClient(config, region)
        # Rate limits, overload protection, breakers, switches: the flow rules of the
        # gateway's rule (topology/flow_rules.py), in force as soon as the gateway holds it.
        self.flow = FlowControl(region, config.flow, lambda: self.gateway.rule.flow)
        self.inventory = InventoryService(
            self.copies[rule.center_cell], config.retention.reserve_window_s
        )
        self.catalog_service = CatalogService(self.copies[rule.global_cell])
        self.revocations = Revocations(self.copies[rule.global_cell])
        self.payment_claims = PaymentClaims(self.copies[rule.center_cell])
        self.sales = SaleService(self.copies[rule.center_cell])
        self.coupons = CouponService(self.copies[rule.center_cell])
        self.center = CenterClient(
            self.rpc,
            region,
            self.inventory,
            self.client,
            self.flow.breakers,
            claims=self.payment_claims,
            sales=self.sales,
        )
        self.sale_book = SaleBook(self.copies[rule.center_cell], self.center)
        self.sales.on_write.append(self.sale_book.put)
        self.tokens = TokenIssuer(self.copies, self.sale_book, self.center, region)
        self.catalog = CatalogClient(
            self.catalog_service,
            rules=self.rpc,
            region=region,
            client=self.client,
            breakers=self.flow.breakers,
        )
        self.allocators = {cell: OrderIdAllocator(self.copies[cell]) for cell in rule.unit_cells()}
        self.orders = OrderService(
            self.copies, self.center, self.catalog, self.allocators, self.sale_book
        )
        self.orders.admit = self.flow.admit_order  # business limits, where orders are served
        self.cart = CartService(self.copies, self.catalog)
        self.retention = RetentionSweeper(self.copies, config.retention, self.owned_cells)
        self.replicator = Replicator(self.copies, self.client, [self._applied])
        self.agent = RuleAgent(
            self.client,
            region,
            lambda: self.fence.rule.version,
            self.acked,
            self.install_rule,
            worker=worker,
        )
        self._tasks: list[asyncio.Task[None]] = []  # the leader's background work
        # A region of many processes: the leader lock, the global cell's changes read back,
        # this process's row in the `workers` table (unitrade/workers.py).
        self.shared = self.copies.shared
        self.leadership: Leadership | None = None
        self.feeds: list[ChangeFeed] = []
        self.reporter: StatusReporter | None = None
        self._sales: asyncio.Task[None] | None = None
        if self.shared:
            global_store = self.copies[rule.global_cell]
            self.leadership = Leadership(LeaderLock(global_store.url), self._lead, self._unlead)
            # The global cell's changes (revocations, products) and the center's (sales),
            # whoever wrote or applied them, for this process's in-memory state.
            self.feeds = [
                ChangeFeed(global_store, self._fed_global, self._reload_global),
                ChangeFeed(self.copies[rule.center_cell], self._fed_center, self.sale_book.load),
            ]
            self.reporter = StatusReporter(
                global_store, worker, lambda: self.leading, self.worker_status
            )

    # -- the rule ----------------------------------------------------------------------------

    def _load_rule(self) -> Rule:
        """The newest rule this region ever acknowledged, else version 1 of the config."""
        rule = initial_rule(self.config)
        try:
            stored = rule_from_body(orjson.loads(self.rule_path.read_bytes()))
            check_rule_fits(stored, self.config)
        except FileNotFoundError:
            return rule
        except (OSError, ValueError, RoutingError) as exc:
            raise RuntimeError(f"{self.rule_path}: unreadable rule: {exc}") from exc
        return stored if stored.version >= rule.version else rule

    def _persist_rule(self, rule: Rule) -> None:
        """Write atomically and durably: a restart must never go back to an older rule.
        The processes of a region on one host share the file: each writes under a lock of
        the directory, and only a rule newer than the file's, so a process late with an
        older rule never overwrites a newer one another has persisted."""
        self.rule_path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.rule_path.parent, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError, OSError, ValueError, RoutingError):
                stored = rule_from_body(orjson.loads(self.rule_path.read_bytes()))
                if stored.version >= rule.version:
                    return
            temporary = self.rule_path.with_name(f".{self.rule_path.name}.{os.getpid()}")
            with open(temporary, "wb") as out:
                out.write(orjson.dumps(rule.body()))
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.rule_path)
            os.fsync(lock)  # the rename itself survives a power loss
        finally:
            os.close(lock)  # and the lock with it

    def acked(self) -> dict[str, int]:
        return {view.component: view.acked for view in (self.gateway, self.rpc, self.fence)}

    async def install_rule(self, rule: Rule) -> None:
        """Put `rule` in force in every component; returns when all of them acknowledge it
        (the data access layer once the writes admitted under older versions are done)."""
        async with self._install_lock:
            previous = self.fence.rule
            if rule.version <= previous.version:
                return
            await asyncio.to_thread(self._persist_rule, rule)
            moved = rule.moved_cells(previous)
            for cell in moved:
                if cell in self.allocators:
                    self.allocators[cell].drop_segment(rule.version)
            self.tokens.rule_installed(rule)
            # The fence first: it refuses writes under the new rule at once, then waits for
            # the older ones to finish while the gateway and RPC views move too.
            try:
                await asyncio.gather(
                    self.fence.install(rule), self.gateway.install(rule), self.rpc.install(rule)
                )
            finally:
                # Even when the fence's drain outlasts its timeout, the rule is in force:
                # streams must follow a moved cell's new owner now. A rule that changed
                # only the flow rules (limits, switches) leaves the streams alone.
                if rule.routing_changed(previous):
                    self.replicator.wake()
            # A cell this region now owns takes no more applies from its old owner: wait
            # for one still in flight, so that the copy's position is final (a failover
            # reads it as the promotion position).
            if rule.routing_changed(previous):
                await self.replicator.quiesce(rule.cells_owned_by(self.name))
            log.info(
                "rule version %s in force (moved cells %s, banned %s, owns %s, flow rules of "
                "version %s, switches on %s)",
                rule.version,
                moved,
                sorted(rule.banned),
                self.owned_cells(),
                rule.flow.version,
                rule.flow.switches,
            )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this process does the region's background work: the only process of its
        region, or the one holding the leader lock."""
        return self.leadership is None or self.leadership.leader

    async def start(self) -> None:
        await self.copies.open()
        fed_from: dict[int, int] = {}
        if self.shared:
            # The rule this process starts under may have been persisted by a process that
            # died before it raised the database fence for it (fence.py): raise every
            # copy's to it now, before anything is acknowledged or written.
            await self.copies.raise_fences(sorted(self.copies.stores), self.fence.rule.version)
            # Before the revocations and sales are read: what is written meanwhile comes by
            # the feeds.
            for feed in self.feeds:
                fed_from[feed.store.cell.id] = await feed.store.refresh()
        await self.revocations.load()
        await self.sale_book.load()
        await self.replicator.load_quarantine()
        # Learn the newest rule and take a write lease before serving (bounded: with the
        # control plane down the region serves reads, and refuses writes until it is back).
        await self.agent.sync(START_SYNC_S)
        self.lease.start()
        if not await self.lease.first(START_SYNC_S):
            log.warning("no write lease yet: writes are refused until one is granted")
        self.agent.start()
        self.flow.start()
        # This process's own sale segments, whichever process leads (unitrade/workers.py).
        self._sales = asyncio.create_task(self._sales_forever(), name="sale-segments")
        if self.leadership is None:
            await self._lead()
        else:
            assert self.feeds and self.reporter is not None
            self.replicator.start_recording()
            for feed in self.feeds:
                feed.start(fed_from[feed.store.cell.id])
            self.reporter.start()
            self.leadership.start()
        log.info(
            "region %s started under rule version %s: owns cells %s%s",
            self.name,
            self.fence.rule.version,
            self.owned_cells(),
            f" (worker {self.worker} of {self.workers})" if self.shared else "",
        )

    async def stop(self) -> None:
        # First, while the lease still holds: what this process did not issue of its sale
        # segments goes back to the center (else it is counted lost).
        await self.tokens.give_back_all(GIVE_BACK_AT_STOP_S)
        if self._sales is not None:
            self._sales.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sales
        await self.flow.stop()
        if self.leadership is None:
            await self._unlead()
        else:
            await self.leadership.stop()
        for part in (*self.feeds, self.reporter):
            if part is not None:
                await part.stop()
        await self.lease.stop()
        await self.agent.stop()
        await self.replicator.close()
        await self.client.aclose()
        await self.copies.close()

    async def _lead(self) -> None:
        """Start the region's background work in this process."""
        if self.shared:
            # Another process may have led until now: the copies' positions (where the
            # streams resume; a copy at 0 is rebuilt from a snapshot) and quarantines as
            # the databases have them, not as this process last saw them.
            await asyncio.gather(*(s.refresh() for s in self.copies.stores.values()))
            await self.replicator.load_quarantine()
        self.replicator.start()
        self._tasks.append(asyncio.create_task(self._drain_outbox_forever(), name="outbox"))
        self._tasks.append(asyncio.create_task(self.retention.run_forever(), name="retention"))

    async def _unlead(self) -> None:
        await self.replicator.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def _fed_global(self, changes: list[dict[str, Any]]) -> None:
        """Changes of the region's copy of the global cell, whoever wrote them."""
        self._applied(self.fence.rule.global_cell, changes)

    def _fed_center(self, changes: list[dict[str, Any]]) -> None:
        """Changes of the region's copy of the center cell, whoever wrote them."""
        self._applied(self.fence.rule.center_cell, changes)

    async def _reload_global(self) -> None:
        await self.revocations.load()
        self.catalog.cache.invalidate()

    def worker_status(self) -> dict[str, Any]:
        """What this process reports of itself to the others (unitrade/workers.py)."""
        lease = self.lease.status()
        return {
            "rule_version": self.fence.rule.version,
            "acked": self.acked(),
            "lease": {"valid": lease["valid"], "remaining_ms": lease["remaining_ms"]},
            "control": self.agent.status(),
            "replication": self.replicator.status() if self.leading else None,
        }

    def _applied(self, cell: int, changes: list[dict[str, Any]]) -> None:
        """A replicated change of the global cell invalidates the catalog cache and updates
        the revoked tokens; one of the center cell updates the sales."""
        if cell == self.fence.rule.center_cell:
            self.sale_book.applied(changes)
            return
        if cell != self.fence.rule.global_cell:
            return
        self.revocations.applied(changes)
        skus = [orjson.loads(c["pk"])["sku"] for c in changes if c["tbl"] == "products"]
        self.catalog.cache.invalidate(skus)

    def quarantine_summary(self) -> dict[str, dict[str, int]]:
        """Per cell (by name), the rows of this region's copy held in the quarantine, by
        state (storage/quarantine.py); cells with none are left out."""
        names = {c: info.name for c, info in self.fence.rule.cells.items()}
        return {names[c]: n for c, n in sorted(self.replicator.quarantined.items()) if n}

    def owned_cells(self) -> list[int]:
        return self.fence.rule.cells_owned_by(self.name)

    async def _sales_forever(self) -> None:
        """Give back the sale segments this process is done with; read the sales again
        from this region's copy of the center cell now and then (a bound should a change
        ever be missed: a copy rebuilt from a snapshot is not replayed row by row)."""
        rounds_per_reload = max(1, int(BOOK_RELOAD_S / SEGMENTS_INTERVAL_S))
        for round_no in itertools.count(1):
            await asyncio.sleep(SEGMENTS_INTERVAL_S)
            try:
                await self.tokens.give_back_due()
                if round_no % rounds_per_reload == 0:
                    await self.sale_book.load()
            except Exception:
                log.exception("sale segments: background work failed")

    async def _drain_outbox_forever(self) -> None:
        """Retry center steps that failed (outbox), and release reservations whose order
        was never written, for every unit cell this region owns."""
        rounds_per_sweep = max(1, int(ABANDONED_INTERVAL_S / OUTBOX_INTERVAL_S))
        for round_no in itertools.count(1):
            await asyncio.sleep(OUTBOX_INTERVAL_S)
            for cell in self.owned_cells():
                if cell not in self.allocators:
                    continue
                store = self.copies[cell]
                try:
                    await self.orders.drain_outbox(store)
                    if round_no % rounds_per_sweep == 0:
                        await self.orders.release_abandoned(store)
                except (WriteBanned, WrongRegion) as exc:
                    # The cell is being switched: its next owner does this work.
                    log.info("background work on cell %s paused: %s", cell, exc.code)
                except Exception:
                    log.exception("background work on cell %s failed", cell)
