"""Replication streams, in one process: a follower opens one stream per owner and applies
its frames as the owner's rows commit (replication/stream.py); the owner's side is
served in-process, frames encoded and decoded as on the wire."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support import Api, write_topology
from tests.test_pull_many import CELL, RULE, Regions, until, write_carts
from unitrade.cluster import LocalCluster
from unitrade.errors import NotFound
from unitrade.replication import replicator as replication
from unitrade.replication.replicator import STREAM_TARGET, Replicator, merged_frames
from unitrade.replication.stream import encode_frame, serve_stream
from unitrade.replication.wire import StreamCall
from unitrade.rpc.client import _whole_frames
from unitrade.rpc.signing import sign
from unitrade.topology.config import TopologyConfig


class StreamingRegions(Regions):
    """`Regions` whose clients open streams too, recording each opening; owners in
    `no_streams` answer a stream 404, as a region of an older version does."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.opened: list[tuple[str, dict[str, Any], float]] = []  # (owner, payload, when)
        self.no_streams: set[str] = set()

    def client(self, region: str) -> Any:
        pulls = super().client(region)
        regions = self

        class Client:
            config = regions.config

            async def call(self, peer: str, method: str, target: str, payload: Any) -> Any:
                return await pulls.call(peer, method, target, payload)

            @asynccontextmanager
            async def stream(
                self,
                peer: str,
                target: str,
                payload: Any,
                timeout_s: float,
                idle_s: float,
                frame_bytes_max: int,
            ) -> AsyncIterator[AsyncIterator[list[bytes]]]:
                assert peer != region and target == STREAM_TARGET
                assert timeout_s > 0 and idle_s > 0
                if peer in regions.no_streams:
                    raise NotFound("no route /internal/replication/stream")
                call = StreamCall.model_validate(payload)
                regions.opened.append((peer, payload, time.monotonic()))
                frames = serve_stream(
                    regions.copies[peer],
                    [(c.cell, c.after) for c in call.cells],
                    call.limit,
                    call.duration_ms,
                    regions.followers[peer],
                    (call.region, call.rule_version),
                )

                async def wire() -> AsyncIterator[list[bytes]]:
                    async for raw in frames:
                        got, used = _whole_frames(bytearray(raw), frame_bytes_max)
                        assert used == len(raw)
                        yield got

                try:
                    yield wire()
                finally:
                    await frames.aclose()

        return Client()

    def opened_to(self, owner: str) -> list[dict[str, Any]]:
        return [payload for o, payload, _ in self.opened if o == owner]


@asynccontextmanager
async def streaming_regions(data_dir: Path) -> AsyncIterator[StreamingRegions]:
    regions = StreamingRegions(data_dir)
    await asyncio.gather(*(c.open() for c in regions.copies.values()))
    try:
        yield regions
    finally:
        await asyncio.gather(*(c.close() for c in regions.copies.values()))


def test_frames_are_read_whole_and_bounded() -> None:
    one = encode_frame({"now_ms": 1, "cells": [], "errors": []})
    two = encode_frame({"now_ms": 2, "cells": [], "errors": []})
    frames, used = _whole_frames(bytearray(one + two[:5]), 1_000)
    assert [orjson.loads(f)["now_ms"] for f in frames] == [1] and used == len(one)
    frames, used = _whole_frames(bytearray(one + two), 1_000)
    assert len(frames) == 2 and used == len(one + two)
    with pytest.raises(ValueError, match="malformed"):
        _whole_frames(bytearray(b"12x\n{}"), 1_000)
    with pytest.raises(ValueError, match="malformed"):
        _whole_frames(bytearray(one), 3)  # announced larger than the bound
    with pytest.raises(ValueError, match="malformed"):
        _whole_frames(bytearray(b"1" * 40), 1_000)  # no header end in sight


def test_merged_frames_keep_order_and_the_rows_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication, "BATCH_ROWS_MAX", 3)

    def frame(now: int, rows: list[int]) -> dict[str, Any]:
        changes = [{"position": p} for p in rows]
        return {
            "now_ms": now,
            "cells": [{"cell": 1, "head": now, "changes": changes}],
            "errors": [],
        }

    merged = merged_frames([frame(1, [1]), frame(2, [2, 3]), frame(3, [4]), frame(4, [])])
    assert [[c["position"] for c in m["cells"][0]["changes"]] for m in merged] == [[1, 2, 3], [4]]
    assert [(m["now_ms"], m["cells"][0]["head"]) for m in merged] == [(2, 2), (4, 4)]


def test_rows_arrive_without_a_batch_window(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with streaming_regions(tmp_path) as regions:
            applied = asyncio.Event()
            sh = Replicator(
                regions.copies["sh"], regions.client("sh"), [lambda _c, _ch: applied.set()]
            )
            sh_u1 = regions.copies["sh"][CELL["u1"]]
            sh.start()
            try:
                await until(lambda: len(regions.opened_to("hz")) >= 1)
                delays = []
                for n in range(1, 21):
                    applied.clear()
                    await write_carts(regions, "hz", CELL["u1"], 1, first=n)
                    committed = time.monotonic()
                    async with asyncio.timeout(2.0):  # the deadline; a pull would take 25 ms
                        while sh_u1.position < n:
                            await applied.wait()
                            applied.clear()
                    delays.append(time.monotonic() - committed)
                    await asyncio.sleep(0.005)  # the next commit after a quiet moment
                # A pull woken by a commit waited BATCH_WINDOW_S (25 ms) more: far under it.
                assert statistics.median(delays) < 0.008, delays
                assert sorted(delays)[-3] < replication.BATCH_WINDOW_S, delays
                assert len(regions.opened_to("hz")) == 1  # one stream carried them all
                assert regions.pulls == []
            finally:
                await sh.stop()

    asyncio.run(scenario())


def test_a_stream_that_ends_is_opened_again_from_the_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "STREAM_MS_MAX", 60)
    monkeypatch.setattr(replication, "STREAM_REOPEN_S_MIN", 0.0)

    async def scenario() -> None:
        async with streaming_regions(tmp_path) as regions:
            sh = Replicator(regions.copies["sh"], regions.client("sh"))
            hz, sh_copies = regions.copies["hz"], regions.copies["sh"]
            u2 = sh_copies[CELL["u2"]]
            real_apply = u2.apply
            failures: list[int] = []

            async def apply_failing_once(changes: Any) -> int:
                if not failures and u2.position >= 10:
                    failures.append(u2.position)
                    raise OSError("disk full, once")
                return await real_apply(changes)

            monkeypatch.setattr(u2, "apply", apply_failing_once)
            sh.start()
            try:
                for n in range(60):  # writes across several streams' lives
                    await write_carts(regions, "hz", CELL["u1"], 1, first=n)
                    await write_carts(regions, "hz", CELL["u2"], 1, first=n)
                    await asyncio.sleep(0.01)
                await until(lambda: sh_copies[CELL["u1"]].position == 60)
                await until(lambda: u2.position == 60)
            finally:
                await sh.stop()
            for cell in (CELL["u1"], CELL["u2"]):
                theirs = await hz[cell].changes_since(0, 100)
                ours = await sh_copies[cell].changes_since(0, 100)
                assert ours == theirs  # every change once, in order
            status = {s["cell_name"]: s for s in sh.status()}
            assert status["u1"]["applied_rows"] == 60 and status["u1"]["errors"] == 0
            assert status["u2"]["applied_rows"] == 60 and status["u2"]["errors"] == 1
            opened = regions.opened_to("hz")
            assert len(opened) >= 5  # each ended after 60 ms and was opened again
            # Each opening starts at the copy's checkpoint: never behind an earlier one,
            # and u2 again at the position its failed apply left it.
            afters = [{c["cell"]: c["after"] for c in p["cells"]} for p in opened]
            u1_afters = [a[CELL["u1"]] for a in afters]
            assert u1_afters == sorted(u1_afters)
            assert any(a.get(CELL["u2"]) == failures[0] for a in afters)

    asyncio.run(scenario())


def test_a_rule_change_ends_the_stream_promptly(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with streaming_regions(tmp_path) as regions:
            sh = Replicator(regions.copies["sh"], regions.client("sh"))
            hz, bj, sh_copies = regions.copies["hz"], regions.copies["bj"], regions.copies["sh"]
            await write_carts(regions, "hz", CELL["u1"], 3)
            sh.start()
            try:
                await until(lambda: sh_copies[CELL["u1"]].position == 3)
                await bj[CELL["u1"]].apply(await hz[CELL["u1"]].changes_since(0, 10))
                moved = RULE.derive(2, owners={CELL["u1"]: "bj"})
                await regions.install(moved)
                before = len(regions.opened)
                changed = time.monotonic()
                sh.wake()
                # Streams last STREAM_MS_MAX (5 s): both are opened again under the new
                # rule long before that, u1's from its new owner.
                await until(
                    lambda: any(
                        CELL["u1"] in [c["cell"] for c in p["cells"]]
                        for p in regions.opened_to("bj")
                    ),
                    timeout_s=1.0,
                )
                await until(lambda: len(regions.opened_to("hz")) >= 2, timeout_s=1.0)
                assert time.monotonic() - changed < 1.0
                again = [p for o, p, _ in regions.opened[before:] if o == "hz"]
                assert all(CELL["u1"] not in [c["cell"] for c in p["cells"]] for p in again)
                assert all(p["rule_version"] == 2 for _, p, _ in regions.opened[before:])
                await write_carts(regions, "bj", CELL["u1"], 2, first=100)
                await until(lambda: sh_copies[CELL["u1"]].position == 5)
                assert sum(s["errors"] for s in sh.status()) == 0
            finally:
                await sh.stop()

    asyncio.run(scenario())


def test_the_follower_acknowledges_its_positions_to_the_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication, "STREAM_MS_MAX", 100)

    async def scenario() -> None:
        async with streaming_regions(tmp_path) as regions:
            sh = Replicator(regions.copies["sh"], regions.client("sh"))
            followers = regions.followers["hz"]
            sh.start()
            try:
                await write_carts(regions, "hz", CELL["u1"], 7)
                await until(lambda: regions.copies["sh"][CELL["u1"]].position == 7)
                # The next opening tells hz what sh applied: retention may trim up to it.
                await until(lambda: followers.seen(CELL["u1"]).get("sh") == (1, 7))
                others = [r for r in regions.config.region_names if r != "hz"]
                assert followers.applied_min(CELL["u1"], others) == 0  # bj follows nothing
                names = {c: i.name for c, i in RULE.cells.items()}
                assert followers.body(names)["u1"] == {"sh": 1}
            finally:
                await sh.stop()

    asyncio.run(scenario())


def test_an_owner_without_streams_is_pulled_from(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with streaming_regions(tmp_path) as regions:
            regions.no_streams = {"hz"}  # hz runs a version without streams: 404
            sh = Replicator(regions.copies["sh"], regions.client("sh"))
            sh_copies = regions.copies["sh"]
            sh.start()
            try:
                await write_carts(regions, "hz", CELL["u1"], 4)
                await write_carts(regions, "bj", CELL["u5"], 3)
                await until(lambda: sh_copies[CELL["u1"]].position == 4)
                await until(lambda: sh_copies[CELL["u5"]].position == 3)
                assert regions.pulls_from("hz") and not regions.pulls_from("bj")
                assert regions.opened_to("bj") and not regions.opened_to("hz")
                assert sum(s["errors"] for s in sh.status()) == 0
            finally:
                await sh.stop()

    asyncio.run(scenario())


def test_the_owner_ends_a_stream_at_its_duration_a_rule_change_or_a_stop(
    tmp_path: Path,
) -> None:
    async def frames_until_end(stream: AsyncIterator[bytes], timeout_s: float) -> int:
        count = 0
        async with asyncio.timeout(timeout_s):
            async for _frame in stream:
                count += 1
        return count

    async def scenario() -> None:
        async with streaming_regions(tmp_path) as regions:
            hz = regions.copies["hz"]
            cells = [(CELL["u1"], 0), (CELL["u2"], 0)]
            started = time.monotonic()
            assert await frames_until_end(serve_stream(hz, cells, 100, 300), 2.0) >= 1
            assert 0.3 <= time.monotonic() - started < 1.5  # its duration, not more
            # A rule change at the owner: ended at the next commit, whatever the duration.
            stream = serve_stream(hz, cells, 100, 5_000)
            first = orjson.loads((await anext(stream)).split(b"\n", 1)[1])
            assert {e["cell"]: e["head"] for e in first["cells"]} == {CELL["u1"]: 0, CELL["u2"]: 0}
            await hz.fence.install(RULE.derive(2, owners={CELL["u2"]: "bj"}))
            started = time.monotonic()
            await write_carts(regions, "hz", CELL["u1"], 1)
            assert await frames_until_end(stream, 2.0) == 0
            assert time.monotonic() - started < 0.5
            # The server stops: ended at the next heartbeat (1 s) at the latest.
            stopping = False
            stream = serve_stream(hz, [(CELL["u1"], 0)], 100, 5_000, stopping=lambda: stopping)
            await anext(stream)
            stopping = True
            started = time.monotonic()
            assert await frames_until_end(stream, 3.0) == 0
            assert time.monotonic() - started < 1.5

    asyncio.run(scenario())


def signed_stream(config: TopologyConfig, cells: list[dict[str, int]]) -> tuple[bytes, Any]:
    """A stream of `cells` from hz as region bj would open it."""
    body = orjson.dumps(
        {"cells": cells, "limit": 1000, "duration_ms": 3000, "region": "bj", "rule_version": 1}
    )
    headers = {"content-type": "application/json"}
    secret = config.link_secret("bj", "hz")
    assert secret is not None
    return body, {**headers, **sign(secret, "bj", "hz", "POST", STREAM_TARGET, body, headers)}


def global_position(api: Api, region: str) -> int:
    return int(api.call(region, "GET", "/healthz").json()["positions"]["global"])


@pytest.mark.cluster
def test_a_region_streams_signed_frames_and_follows_by_stream(tmp_path: Path) -> None:
    config, path = write_topology(tmp_path)
    with LocalCluster(config, tmp_path / "data", path) as cluster, Api(config) as api:
        cluster.start()
        hz = config.region("hz").base_url + STREAM_TARGET
        cells = [{"cell": CELL["global"], "after": 0}]
        unsigned = httpx.post(hz, json={"cells": cells, "limit": 10, "duration_ms": 0})
        assert unsigned.status_code == 401, unsigned.text
        body, headers = signed_stream(config, cells)
        with (
            httpx.Client(timeout=10) as http,
            http.stream("POST", hz, content=body, headers=headers) as reply,
        ):
            assert reply.status_code == 200
            received = bytearray()
            frames: list[dict[str, Any]] = []
            chunks = reply.iter_bytes()
            while not frames:
                received += next(chunks)
                got, used = _whole_frames(received, 1 << 20)
                del received[:used]
                frames += [orjson.loads(f) for f in got]
            assert frames[0]["cells"] == [{"cell": CELL["global"], "head": 0, "changes": []}]
            written = api.call(
                "hz",
                "PUT",
                "/v1/admin/products/S1",
                body={"title": "s", "price_cents": 1, "stock": 1},
            )
            assert written.status_code == 200, written.text
            while not any(e["changes"] for f in frames for e in f["cells"]):
                received += next(chunks)
                got, used = _whole_frames(received, 1 << 20)
                del received[:used]
                frames += [orjson.loads(f) for f in got]
            changes = [c for f in frames for e in f["cells"] for c in e["changes"]]
            assert [c["position"] for c in changes] == list(range(1, len(changes) + 1))
        # sh follows hz by stream: each product is in its copy far sooner than the 25 ms a
        # pull woken by the commit would wait before it is even answered.
        delays = []
        for n in range(2, 12):
            written = api.call(
                "hz",
                "PUT",
                f"/v1/admin/products/S{n}",
                body={"title": "s", "price_cents": 1, "stock": 1},
            )
            committed = time.monotonic()
            assert written.status_code == 200, written.text
            head = global_position(api, "hz")
            deadline = time.monotonic() + 5
            while global_position(api, "sh") < head:  # one connection: a poll costs ~1 ms
                assert time.monotonic() < deadline
            delays.append(time.monotonic() - committed)
        assert statistics.median(delays) < replication.BATCH_WINDOW_S, delays
