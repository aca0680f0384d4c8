"""The control store in etcd (`[control] lease_authority = "etcd"`): the same promises as the
SQL store (store.py), so that every control plane member reads the same state and a new
leader carries on where the last one stopped.

Keys (etcd.py, EtcdKeys): `rule-version` (the newest version) and `rules/<version>`; a rule
is published by one txn that compares `rule-version` with the version below it, so versions
only grow and two publishers of the same version cannot both win. `ops/<created>/<id>`
(one JSON document per operation, with the count of its log entries), `op-ids/<id>` (the
operation's key), `oplog/<id>/<n>`; `blocks/<region>` (the lease blocks, also what the
regions' lease renewals compare, etcd_lease.py).

Fencing: when `leader_revision` is given (the election's), every write also compares that
the leader key is still the one this process created, so a control plane that lost its
leadership (paused, cut off) cannot write anything after a new leader took over: NotLeader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from unitrade.control.etcd import (
    EtcdClient,
    EtcdKeys,
    KeyValue,
    TxnResult,
    created,
    delete_op,
    modified,
    prefix_end,
    put_op,
    range_op,
    value_is,
)
from unitrade.control.store import (
    LOG_ROWS_MAX,
    OPERATIONS_LIST_MAX,
    Operation,
    StaleRule,
    new_operation_id,
)
from unitrade.errors import NotLeader
from unitrade.storage.store import now_ms
from unitrade.topology.config import TopologyConfig
from unitrade.topology.rule import Rule, check_rule_fits, rule_from_body

WRITE_ATTEMPTS_MAX = 5  # a read-modify-write that lost a race is tried again this often
PAGE = 200  # keys per range while scanning operations
DELETES_PER_TXN = 40  # three operations each: etcd allows 128 per txn by default
ID_CACHE_MAX = 4096


def _version_value(version: int) -> bytes:
    return f"{version:020d}".encode()


def _operation(body: dict[str, Any]) -> Operation:
    return Operation(
        id=str(body["id"]),
        kind=str(body["kind"]),
        cells=[int(c) for c in body["cells"]],
        sources={int(c): str(r) for c, r in body["sources"].items()},
        target=str(body["target"]),
        state=str(body["state"]),
        step=str(body["step"]),
        detail=dict(body.get("detail") or {}),
        error=str(body.get("error", "")),
        abort_requested=bool(body.get("abort_requested")),
        created_ms=int(body["created_ms"]),
        updated_ms=int(body["updated_ms"]),
    )


class EtcdControlStore:
    def __init__(
        self,
        client: EtcdClient,
        keys: EtcdKeys,
        leader_revision: Callable[[], int] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.leader_revision = leader_revision
        self._op_keys: dict[str, str] = {}  # operation id -> its key (never changes)

    # -- fencing -----------------------------------------------------------------------------

    def _leader(self) -> int | None:
        """The leader key's revision that every write compares (None: not fenced)."""
        if self.leader_revision is None:
            return None
        revision = self.leader_revision()
        if not revision:
            raise NotLeader("this control plane is not the leader: it writes nothing")
        return revision

    async def _write(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> TxnResult:
        """A txn fenced by the leadership: NotLeader when the fence is what failed."""
        revision = self._leader()
        if revision is None:
            return await self.client.txn(compare, success, failure)
        guard = created(self.keys.leader, revision)
        failure = [range_op(self.keys.leader), *(failure or [])]
        result = await self.client.txn([guard, *compare], success, failure)
        if result.succeeded:
            return result
        leader = result.ranges[0].kvs
        if not leader or leader[0].create_revision != revision:
            raise NotLeader("this control plane lost its leadership: nothing was written")
        return TxnResult(False, result.revision, result.ranges[1:])

    # -- rules -------------------------------------------------------------------------------

    async def open(self, config: TopologyConfig, first: Rule) -> Rule:
        keys = self.keys
        stamp = now_ms()
        entry = {
            "version": first.version,
            "body": first.body(),
            "reason": "initial rule from the topology",
            "operation_id": None,
            "created_ms": stamp,
        }
        topology = {"body": orjson.loads(config.model_dump_json()), "created_ms": stamp}
        result = await self._write(
            [created(keys.rule_version, 0)],
            [
                put_op(keys.topology, orjson.dumps(topology)),
                put_op(keys.rule(first.version), orjson.dumps(entry)),
                put_op(keys.rule_version, _version_value(first.version)),
            ],
            [range_op(keys.rule_version)],
        )
        if result.succeeded:
            return first
        version = int(result.ranges[0].kvs[0].value)
        stored = await self.client.get(keys.rule(version))
        if stored is None:
            raise RuntimeError(f"etcd: {keys.rule_version} names rule {version}, which is gone")
        rule = rule_from_body(stored.json()["body"])
        check_rule_fits(rule, config)
        return rule

    async def close(self) -> None:
        await self.client.aclose()

    async def publish(self, rule: Rule, reason: str, operation_id: str | None) -> None:
        keys = self.keys
        entry = {
            "version": rule.version,
            "body": rule.body(),
            "reason": reason[:200],
            "operation_id": operation_id,
            "created_ms": now_ms(),
        }
        result = await self._write(
            [value_is(keys.rule_version, _version_value(rule.version - 1))],
            [
                put_op(keys.rule(rule.version), orjson.dumps(entry)),
                put_op(keys.rule_version, _version_value(rule.version)),
            ],
            [range_op(keys.rule_version)],
        )
        if not result.succeeded:
            kvs = result.ranges[0].kvs
            newest = int(kvs[0].value) if kvs else 0
            raise StaleRule(f"rule version {rule.version} after {newest}: versions only grow")

    async def history(self, limit: int) -> list[dict[str, Any]]:
        found = await self.client.range(
            self.keys.rules, prefix_end(self.keys.rules), limit=limit, descending=True
        )
        history = []
        for kv in found.kvs:
            entry = kv.json()
            history.append(
                {
                    "version": entry["version"],
                    "reason": entry["reason"],
                    "operation_id": entry["operation_id"],
                    "created_ms": entry["created_ms"],
                    "rule": entry["body"],
                }
            )
        return history

    # -- operations --------------------------------------------------------------------------

    async def create_operation(
        self, kind: str, cells: list[int], sources: dict[int, str], target: str
    ) -> Operation:
        stamp = now_ms()
        op = Operation(
            id=new_operation_id(),
            kind=kind,
            cells=cells,
            sources=sources,
            target=target,
            state="running",
            step="precheck",
            created_ms=stamp,
            updated_ms=stamp,
        )
        key = self.keys.operation(stamp, op.id)
        await self._write(
            [created(key, 0)],
            [
                put_op(key, orjson.dumps({**op.body(), "log_entries": 0})),
                put_op(self.keys.operation_id(op.id), key.encode()),
            ],
        )
        self._remember(op.id, key)
        return op

    def _remember(self, operation_id: str, key: str) -> None:
        if len(self._op_keys) >= ID_CACHE_MAX:
            self._op_keys.clear()
        self._op_keys[operation_id] = key

    async def _operation_kv(self, operation_id: str) -> KeyValue | None:
        key = self._op_keys.get(operation_id)
        if key is None:
            index = await self.client.get(self.keys.operation_id(operation_id))
            if index is None:
                return None
            key = index.value.decode()
            self._remember(operation_id, key)
        return await self.client.get(key)

    async def _update(self, operation_id: str, change: Callable[[dict[str, Any]], Any]) -> None:
        """Read-modify-write of an operation's document, compared on its revision so that
        a concurrent change (an abort request) is never lost; `change` may return a txn
        operation to write with it (a log entry)."""
        for _ in range(WRITE_ATTEMPTS_MAX):
            kv = await self._operation_kv(operation_id)
            if kv is None:
                return  # deleted by the retention sweep: nothing to record on
            body = kv.json()
            extra = change(body)
            ops = [put_op(kv.key, orjson.dumps(body))]
            if extra is not None:
                ops.append(extra)
            result = await self._write([modified(kv.key, kv.mod_revision)], ops)
            if result.succeeded:
                return
        raise RuntimeError(f"operation {operation_id}: changed concurrently too often")

    async def record(
        self,
        op: Operation,
        step: str,
        event: str,
        detail: dict[str, Any] | None = None,
        state: str | None = None,
        error: str | None = None,
    ) -> None:
        stamp = now_ms()
        if event == "begin":
            op.step = step
        if detail:
            op.detail.update(detail)
        if state is not None:
            op.state = state
        if error is not None:
            op.error = error[:2000]
        op.updated_ms = stamp
        entry = orjson.dumps({"step": step, "event": event, "detail": detail or {}, "at_ms": stamp})

        def change(body: dict[str, Any]) -> Any:
            body.update(
                step=op.step, state=op.state, detail=op.detail, error=op.error, updated_ms=stamp
            )
            number = int(body.get("log_entries", 0)) + 1
            body["log_entries"] = number
            return put_op(self.keys.log_entry(op.id, number), entry)

        await self._update(op.id, change)

    async def request_abort(self, operation_id: str) -> None:
        def change(body: dict[str, Any]) -> None:
            body.update(abort_requested=True, updated_ms=now_ms())

        await self._update(operation_id, change)

    async def operation(self, operation_id: str) -> Operation | None:
        kv = await self._operation_kv(operation_id)
        return None if kv is None else _operation(kv.json())

    async def operations(self, limit: int, state: str | None = None) -> list[Operation]:
        if not 1 <= limit <= OPERATIONS_LIST_MAX:
            raise ValueError(f"limit {limit} out of 1..{OPERATIONS_LIST_MAX}")
        found: list[Operation] = []
        start, end = self.keys.operations, prefix_end(self.keys.operations)
        while len(found) < limit:
            page = await self.client.range(start, end, limit=PAGE, descending=True)
            for kv in page.kvs:
                op = _operation(kv.json())
                if state is None or op.state == state:
                    found.append(op)
            if not page.more or not page.kvs:
                break
            end = page.kvs[-1].key  # the next page: keys below the last one read
        return found[:limit]

    async def log(self, operation_id: str) -> list[dict[str, Any]]:
        prefix = self.keys.log(operation_id)
        found = await self.client.range(prefix, prefix_end(prefix), limit=LOG_ROWS_MAX)
        return [kv.json() for kv in found.kvs]

    # -- lease blocks (control/lease.py, etcd_lease.py) --------------------------------------

    async def lease_blocks(self) -> dict[str, int]:
        found = await self.client.range(self.keys.blocks, prefix_end(self.keys.blocks))
        blocks = {}
        for kv in found.kvs:
            region = kv.key.removeprefix(self.keys.blocks)
            blocks[region] = int(kv.json()["rule_version_min"])
        return blocks

    async def block_lease(self, region: str, rule_version_min: int, operation_id: str) -> None:
        """The bound only grows; the regions' renewals compare this very key."""
        key = self.keys.block(region)
        value = orjson.dumps(
            {
                "rule_version_min": rule_version_min,
                "operation_id": operation_id,
                "created_ms": now_ms(),
            }
        )
        for _ in range(WRITE_ATTEMPTS_MAX):
            kv = await self.client.get(key)
            if kv is not None and int(kv.json()["rule_version_min"]) >= rule_version_min:
                return
            revision = 0 if kv is None else kv.mod_revision
            if (await self._write([modified(key, revision)], [put_op(key, value)])).succeeded:
                return
        raise RuntimeError(f"the lease block of {region} changed concurrently too often")

    # -- retention ---------------------------------------------------------------------------

    async def sweep_operations(self, kept: int, before_ms: int, batch_rows: int) -> int:
        if kept < 1 or batch_rows < 1:
            raise ValueError("kept and batch_rows must be at least 1")
        keys = self.keys
        start, end = keys.operations, prefix_end(keys.operations)
        newest = await self.client.range(start, end, limit=kept, descending=True)
        if len(newest.kvs) < kept:
            return 0  # no more than `kept` operations
        threshold = int(newest.kvs[-1].key.removeprefix(start).split("/")[0])
        doomed: list[tuple[str, str]] = []  # (key, id), oldest first
        scan_end = keys.operation(threshold, "")  # created before the threshold
        while len(doomed) < batch_rows:
            page = await self.client.range(start, scan_end, limit=PAGE)
            for kv in page.kvs:
                op = _operation(kv.json())
                if op.state != "running" and op.updated_ms < before_ms:
                    doomed.append((kv.key, op.id))
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + "\0"  # the next page: keys above the last one read
        doomed = doomed[:batch_rows]
        for first in range(0, len(doomed), DELETES_PER_TXN):
            ops: list[dict[str, Any]] = []
            for key, operation_id in doomed[first : first + DELETES_PER_TXN]:
                log = keys.log(operation_id)
                ops += [
                    delete_op(key),
                    delete_op(keys.operation_id(operation_id)),
                    delete_op(log, prefix_end(log)),
                ]
                self._op_keys.pop(operation_id, None)
            await self._write([], ops)
        return len(doomed)

    async def count_operations(self) -> int:
        found = await self.client.range(
            self.keys.operations, prefix_end(self.keys.operations), count_only=True
        )
        return found.count
