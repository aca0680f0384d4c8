"""One active control plane among several (`[[control.members]]`), elected through etcd.

Each member runs the same process. The leader is whoever created the key `leader` (etcd.py)
with a txn "create it if absent", attached to an etcd lease it keeps alive every
`lease_renew_ms`; the others read the key as often and try again once it is gone. A leader
killed with kill -9 stops renewing, etcd deletes the key with the lease (TTL half a write
lease, at least 2 s: `election_ttl_s`), and a standby takes over within that and one poll;
one stopped cleanly revokes its lease, and a standby takes over at its next poll.

A new leader starts the control plane (ControlPlane.start: it loads the newest rule and
resumes an unfinished operation). A leader that cannot renew in time (counted, like a
region's lease, from when it sent the renewal) steps down by itself and stops its control
plane. Even before it notices, it can write nothing: every write to the control store
compares the leader key's revision (etcd_store.py). A standby answers the operator API
and the regions with 503 `not_leader`, naming the leader (LeaderGate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from unitrade.control.etcd import EtcdClient, EtcdKeys, created, put_op, range_op
from unitrade.control.etcd_lease import (
    EtcdLeases,
    counted_ttl_ms,
    election_ttl_s,
    etcd_client,
    etcd_keys,
)
from unitrade.control.etcd_store import EtcdControlStore
from unitrade.control.lease import LEASE_MARGIN_MS, drift_ratio
from unitrade.control.plane import ControlPlane
from unitrade.errors import NotLeader, UnitradeError
from unitrade.topology.config import ControlConfig, ControlMember, TopologyConfig
from unitrade.web.responses import error_response, json_response

log = logging.getLogger("unitrade.election")

START_TIMEOUT_S = 30.0  # a new leader that cannot start its control plane in this long resigns
# Paths a standby serves itself: its health, and what describes the API.
OPEN_PATHS = frozenset({"/metrics", "/openapi.json", "/docs", "/redoc"})


class Election:
    def __init__(
        self,
        client: EtcdClient,
        keys: EtcdKeys,
        member: ControlMember,
        config: ControlConfig,
    ) -> None:
        self.client = client
        self.keys = keys
        self.member = member
        self.config = config
        self.leader_revision = 0  # the leader key's create revision while this member leads
        self.serving = False  # leader, and its control plane started
        self.leader: dict[str, Any] | None = None  # the leader last seen ({member, url})
        self.elected_total = 0
        self._lease = 0
        self._valid_until = 0.0  # monotonic: the leadership as this member counts it
        self.last_error = ""

    def current_revision(self) -> int:
        """What the control store fences its writes with (0: not the leader)."""
        if self.leader_revision and time.monotonic() < self._valid_until:
            return self.leader_revision
        return 0

    def status(self) -> dict[str, Any]:
        return {
            "member": self.member.name,
            "role": "leader" if self.serving else "standby",
            "leader": self.leader,
            "elected_total": self.elected_total,
            "last_error": self.last_error,
        }

    def not_leader(self) -> NotLeader:
        url = (self.leader or {}).get("url")
        where = (
            f"the leader is {(self.leader or {}).get('member')} at {url}"
            if url
            else ("no leader is elected yet")
        )
        return NotLeader(
            f"control plane member {self.member.name} is a standby: {where}", leader=url
        )

    async def run(
        self, on_elected: Callable[[], Awaitable[None]], on_lost: Callable[[], Awaitable[None]]
    ) -> None:
        """Campaign, lead, step down, campaign again: until cancelled."""
        while True:
            try:
                if self.leader_revision:
                    await self._renew()
                else:
                    await self._campaign()
                self.last_error = ""
            except UnitradeError as exc:
                if not self.last_error:
                    log.warning("election: %s", exc)
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            except Exception as exc:  # an answer it could not read: keep campaigning
                log.exception("election step failed")
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            if self.leader_revision and time.monotonic() >= self._valid_until:
                await self._step_down(on_lost, "its leader lease was not renewed in time")
            if self.leader_revision and not self.serving:
                await self._start(on_elected, on_lost)
            await asyncio.sleep(self.config.lease_renew_ms / 1000)

    async def _campaign(self) -> None:
        current = await self.client.get(self.keys.leader)
        if current is not None:
            self.leader = current.json()
            return
        sent = time.monotonic()
        lease, granted_s = await self.client.grant(election_ttl_s(self.config))
        me = {"member": self.member.name, "url": self.member.base_url}
        result = await self.client.txn(
            [created(self.keys.leader, 0)],
            [put_op(self.keys.leader, orjson.dumps(me), lease)],
            [range_op(self.keys.leader)],
        )
        if not result.succeeded:
            kvs = result.ranges[0].kvs
            self.leader = kvs[0].json() if kvs else None
            await self.client.revoke(lease)
            return
        self._lease, self.leader_revision, self.leader = lease, result.revision, me
        self._counted(sent, granted_s)
        self.elected_total += 1
        log.info("member %s elected leader (revision %s)", self.member.name, result.revision)

    async def _renew(self) -> None:
        sent = time.monotonic()
        ttl_s = await self.client.keepalive(self._lease)
        if ttl_s <= 0:
            self._valid_until = 0.0  # the lease is gone: another member may lead by now
            return
        self._counted(sent, ttl_s)

    def _counted(self, sent: float, ttl_s: int) -> None:
        ttl = counted_ttl_ms(self.config, ttl_s) / 1000 * (1 - drift_ratio(self.config))
        self._valid_until = max(self._valid_until, sent + ttl - LEASE_MARGIN_MS / 1000)

    async def _start(
        self, on_elected: Callable[[], Awaitable[None]], on_lost: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await on_elected()
        except Exception as exc:
            log.exception("member %s could not start as the leader", self.member.name)
            self.last_error = f"start: {type(exc).__name__}: {exc}"[:200]
            await self._step_down(on_lost, "its control plane did not start")
            return
        self.serving = True
        log.info("member %s serves as the active control plane", self.member.name)

    async def _step_down(self, on_lost: Callable[[], Awaitable[None]], why: str) -> None:
        log.warning("member %s steps down: %s", self.member.name, why)
        self.serving = False
        self.leader_revision = 0
        self.leader = None
        try:
            await on_lost()  # also after a start that failed half-way
        except Exception:
            log.exception("stopping the control plane after losing the leadership failed")
        await self._revoke()

    async def _revoke(self) -> None:
        lease, self._lease = self._lease, 0
        if lease:
            with contextlib.suppress(UnitradeError, OSError):
                await self.client.revoke(lease)

    async def resign(self) -> None:
        """On a clean stop: give the leadership up at once (the control plane is stopped)."""
        self.serving = False
        self.leader_revision = 0
        await self._revoke()
        await self.client.aclose()


def etcd_control_plane(config: TopologyConfig, member: str) -> tuple[ControlPlane, Election]:
    """A control plane member on etcd: its election, and the control plane it runs while
    elected (its store and lease authority in etcd, the store's writes fenced by the
    election)."""
    control = config.control
    keys = etcd_keys(config)
    # A renewal of the leadership must fit in a third of the lease, like a region's.
    election_client = etcd_client(config, min(control.etcd_timeout_ms, control.lease_ms // 3))
    election = Election(election_client, keys, control.member(member), control)
    store = EtcdControlStore(etcd_client(config), keys, election.current_revision)
    leases = EtcdLeases(control, config.region_names, store)
    return ControlPlane(config, store, leases), election


class LeaderGate:
    """ASGI middleware: while this member is not the serving leader, every request but the
    health and the API's description is answered 503 `not_leader`, naming the leader, so
    that clients (the CLI, the regions' agents) go to the next configured address."""

    def __init__(self, app: ASGIApp, election: Election) -> None:
        self.app = app
        self.election = election

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.election.serving or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/healthz":
            response = json_response({"status": "ok", **self.election.status()})
        else:
            response = error_response(self.election.not_leader())
        await response(scope, receive, send)
