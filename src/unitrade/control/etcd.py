"""A small etcd v3 client: the JSON gateway (`/v3/...`) over aiohttp, and the key layout.

Only what unitrade uses: range, txn (compare / put / range / delete), and leases (grant,
keepalive, time-to-live). Why the gateway and not a gRPC client: python-etcd3 does not
import with protobuf >= 4 (python-etcd3#1957, #2709) and is unmaintained, and aetcd (its
asyncio fork) is a release candidate that brings grpcio; the gateway is part of etcd 3.4
(served under /v3/), speaks JSON with base64 keys and values, and needs nothing beyond the
HTTP client the regions already use (rpc/client.py). int64 fields arrive as strings and
zero values are left out; both are handled here.

Several endpoints: a request goes to the member that answered last, and to the next one
on a connection error (bounded: each member once per request). A request that was sent and
got no answer is tried again elsewhere only when it is idempotent (a read, a keepalive);
otherwise the caller gets EtcdUnavailable, which says the outcome is unknown.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from unitrade.errors import EtcdUnavailable, UnitradeError

CONNECTIONS_MAX = 32
# gRPC codes etcd answers with (in the gateway's `code`): NotFound for a lease that is gone,
# Unavailable / DeadlineExceeded for a member that cannot serve (no leader, timed out).
GRPC_NOT_FOUND = 5
GRPC_UNAVAILABLE = 14
GRPC_DEADLINE_EXCEEDED = 4
NO_LEADER = "etcdserver: no leader"  # refused before anything was proposed: safe to retry


class EtcdError(UnitradeError):
    """etcd refused a request (the gateway's error answer)."""

    code = "etcd_error"
    status = 503

    def __init__(self, message: str, grpc_code: int = 0) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (ASCII keys)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    def json(self) -> Any:
        return orjson.loads(self.value)


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=unb64(raw.get("key")).decode(),
        value=unb64(raw.get("value")),
        create_revision=int(raw.get("create_revision", 0)),
        mod_revision=int(raw.get("mod_revision", 0)),
        lease=int(raw.get("lease", 0)),
    )


@dataclass(frozen=True)
class RangeResult:
    kvs: list[KeyValue]
    count: int
    more: bool


def _range_result(raw: dict[str, Any]) -> RangeResult:
    return RangeResult(
        [_kv(kv) for kv in raw.get("kvs", [])], int(raw.get("count", 0)), bool(raw.get("more"))
    )


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    ranges: list[RangeResult]  # the answers of the branch's range operations, in order


# -- operations and comparisons of a txn (request bodies) --------------------------------


def put_op(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def range_op(key: str, range_end: str | None = None) -> dict[str, Any]:
    body = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_range": body}


def delete_op(key: str, range_end: str | None = None) -> dict[str, Any]:
    body = {"key": b64(key)}
    if range_end is not None:
        body["range_end"] = b64(range_end)
    return {"request_delete_range": body}


def created(key: str, revision: int) -> dict[str, Any]:
    """Compare: `key` was created at `revision` (0: the key does not exist)."""
    return {
        "target": "CREATE",
        "result": "EQUAL",
        "key": b64(key),
        "create_revision": str(revision),
    }


def modified(key: str, revision: int) -> dict[str, Any]:
    """Compare: `key` was last written at `revision` (0: the key does not exist)."""
    return {"target": "MOD", "result": "EQUAL", "key": b64(key), "mod_revision": str(revision)}


def lease_is(key: str, lease: int) -> dict[str, Any]:
    """Compare: `key` is attached to `lease` (false when the key does not exist)."""
    return {"target": "LEASE", "result": "EQUAL", "key": b64(key), "lease": str(lease)}


def value_is(key: str, value: bytes) -> dict[str, Any]:
    """Compare: `key` holds exactly `value` (false when the key does not exist)."""
    return {"target": "VALUE", "result": "EQUAL", "key": b64(key), "value": b64(value)}


class EtcdClient:
    def __init__(
        self,
        endpoints: list[str],
        timeout_s: float,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout_s = timeout_s
        self.verify = verify
        self._preferred = 0  # the member that answered last
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=CONNECTIONS_MAX, keepalive_timeout=30, ssl=self.verify
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, path: str, body: dict[str, Any], idempotent: bool) -> dict[str, Any]:
        """POST `body` to `path` at one member after another (each once at most)."""
        payload = orjson.dumps(body)
        problems: list[str] = []
        count = len(self.endpoints)
        for attempt in range(count):
            index = (self._preferred + attempt) % count
            endpoint = self.endpoints[index]
            try:
                async with self.session.post(endpoint + path, data=payload) as response:
                    status, raw = response.status, await response.read()
            except aiohttp.ClientConnectorError as exc:
                problems.append(f"{endpoint}: {type(exc).__name__}")  # never sent: next
                continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{endpoint}: {type(exc).__name__}")
                if idempotent:
                    continue
                raise EtcdUnavailable(
                    f"etcd did not answer {path} (it may have been applied): " + "; ".join(problems)
                ) from exc
            answer = _decode(raw)
            if status == 200 and "error" not in answer:
                self._preferred = index
                return answer
            message = str(answer.get("message") or answer.get("error") or f"HTTP {status}")
            grpc_code = int(answer.get("code", 0) or 0)
            member_down = grpc_code in (GRPC_UNAVAILABLE, GRPC_DEADLINE_EXCEEDED)
            if member_down and (idempotent or message == NO_LEADER):
                problems.append(f"{endpoint}: {message}")
                continue
            if member_down:
                raise EtcdUnavailable(f"etcd: {message} on {path} (it may have been applied)")
            raise EtcdError(f"etcd: {message}", grpc_code)
        raise EtcdUnavailable("no etcd member answered: " + "; ".join(problems))

    # -- key-value ---------------------------------------------------------------------------

    async def range(
        self,
        key: str,
        range_end: str | None = None,
        *,
        limit: int = 0,
        descending: bool = False,
        count_only: bool = False,
    ) -> RangeResult:
        body: dict[str, Any] = {"key": b64(key)}
        if range_end is not None:
            body["range_end"] = b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if descending:
            body.update(sort_order="DESCEND", sort_target="KEY")
        if count_only:
            body["count_only"] = True
        return _range_result(await self.call("/v3/kv/range", body, idempotent=True))

    async def get(self, key: str) -> KeyValue | None:
        found = await self.range(key)
        return found.kvs[0] if found.kvs else None

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> TxnResult:
        body = {"compare": compare, "success": success, "failure": failure or []}
        read_only = all("request_range" in op for op in body["success"] + body["failure"])
        answer = await self.call("/v3/kv/txn", body, idempotent=read_only)
        ranges = [
            _range_result(r["response_range"])
            for r in answer.get("responses", [])
            if "response_range" in r
        ]
        revision = int(answer.get("header", {}).get("revision", 0))
        return TxnResult(bool(answer.get("succeeded")), revision, ranges)

    # -- leases ------------------------------------------------------------------------------

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd granted (it may raise a short one)."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl_s)}, idempotent=True)
        lease = int(answer.get("ID", 0))
        if not lease:
            raise EtcdError(f"etcd granted no lease: {answer.get('error', answer)}")
        return lease, int(answer.get("TTL", 0))

    async def keepalive(self, lease: int) -> int:
        """Renew a lease for its whole TTL again; the TTL, 0 when the lease is gone."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)
        return int(answer.get("result", {}).get("TTL", 0))

    async def time_to_live(self, lease: int) -> int:
        """The lease's remaining seconds (etcd rounds down), -1 when it is gone."""
        answer = await self.call("/v3/lease/timetolive", {"ID": str(lease)}, idempotent=True)
        return int(answer.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True)
        except EtcdError as exc:
            if exc.grpc_code != GRPC_NOT_FOUND:
                raise


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"error": raw[:200].decode(errors="replace")}
    return answer if isinstance(answer, dict) else {"error": "not a JSON object"}


@dataclass(frozen=True)
class EtcdKeys:
    """Where unitrade keeps what in etcd, under one prefix (clusters may share an etcd)."""

    prefix: str

    @property
    def leader(self) -> str:
        """The active control plane: attached to its lease (control/election.py)."""
        return self.prefix + "leader"

    def lease(self, region: str, worker: int = 0) -> str:
        """A region process's write lease: attached to that process's etcd lease
        (etcd_lease.py). Worker 0's is the region's name, as before regions of many
        processes; worker k's is under it, `leases/<region>/<k>`."""
        key = self.prefix + "leases/" + region
        return key if worker == 0 else f"{key}/{worker}"

    def worker_leases(self, region: str) -> str:
        """The prefix of the leases of a region's workers but 0 (`lease`)."""
        return self.prefix + "leases/" + region + "/"

    def block(self, region: str) -> str:
        """A failover's block of a region's leases: the rule version it must hold."""
        return self.prefix + "blocks/" + region

    @property
    def blocks(self) -> str:
        return self.prefix + "blocks/"

    @property
    def leases(self) -> str:
        return self.prefix + "leases/"

    @property
    def topology(self) -> str:
        return self.prefix + "topology"

    @property
    def rule_version(self) -> str:
        """The newest rule version: every publish compares it (versions only grow)."""
        return self.prefix + "rule-version"

    @property
    def rules(self) -> str:
        return self.prefix + "rules/"

    def rule(self, version: int) -> str:
        return f"{self.rules}{version:020d}"

    @property
    def operations(self) -> str:
        return self.prefix + "ops/"

    def operation(self, created_ms: int, operation_id: str) -> str:
        """Keyed by creation time first, so that a range lists operations in order."""
        return f"{self.operations}{created_ms:015d}/{operation_id}"

    def operation_id(self, operation_id: str) -> str:
        """An operation's id -> its key under `operations`."""
        return self.prefix + "op-ids/" + operation_id

    def log(self, operation_id: str) -> str:
        return f"{self.prefix}oplog/{operation_id}/"

    def log_entry(self, operation_id: str, number: int) -> str:
        return f"{self.log(operation_id)}{number:08d}"
