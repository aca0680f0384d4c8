"""The limiter's schedules in Redis, shared by every serving process of a region.

The same arithmetic as limiter.py, in one Lua script: all the checks of a request (client
IP, buyer, region) in one round trip, atomically per key, on Redis's clock (TIME), so that
processes on different machines agree. Each key holds next_free and stored, and expires
once it is as good as new (limiter.idle_s), so idle keys cost nothing. The checks
run in order and stop at the first refusal; the permits the earlier ones took stay taken,
as Sentinel's rule chain does.

A Redis that does not answer within `storage_timeout_ms` is not waited for: the process
falls back on its own schedules (limiter.Schedules) until Redis answers again, and counts
the fallbacks (unitrade_flow_storage_errors_total): limits stay in force, per process,
rather than every request waiting for Redis or none being limited.

Under load requests share calls: `take` queues its checks, and one sender sends every
queued request's checks in a single script call (at most BATCH_MAX requests), one call at
a time, as a database groups commits: what is queued while a call is out goes in the next.
The script takes each request's checks as it would alone, in the order they were queued,
so the answer is the same as one call per request; what changes is the cost: one round
trip and one reply to parse per batch instead of per request. What an order pays for its
limits is mostly these calls, not the checks in them (docs/benchmarks.md, Flow control).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from unitrade.flow.limiter import Shape, idle_s

# KEYS: one per check, the requests' one after the other. ARGV: the number of requests R,
# the number of shapes S; 8 values per shape: interval, stored_max, refill, threshold,
# slope, timeout, warm (0/1), the key's TTL in ms; each request's number of checks; then
# per check the index of its shape (from 0). A batch's checks share a handful of shapes,
# so a check costs its key and one small number to send and to parse, not eight floats.
# A key's state is one string, next_free and stored as two doubles (Lua's struct library:
# exact, and a tenth of what formatting and parsing them as text cost the server), set with
# its TTL in one command.
# Returns 2 values per request: {refused index (0: none), seconds}: the longest wait of the
# admitted, or the refused one's retry-after. A request's checks stop at its first refusal.
# The waits leave Lua as strings (a Lua number would be truncated), written with %.17g: Lua's
# tostring keeps 14 digits, which for a unix time is 0.1 ms, and a next-free time rounded
# up by up to 50 us refused every request that came within that of the one before, however
# many permits were stored (a 20,000/s limit refused at 500/s).
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local requests = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
local shapes = {}
for s = 1, count do
  local b = 2 + (s - 1) * 8
  shapes[s] = {
    tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
    tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6]),
    ARGV[b + 7] == '1', ARGV[b + 8]
  }
end
local counts = 2 + count * 8
local arg = counts + requests
local out = {}
local key = 0
for r = 1, requests do
  local n = tonumber(ARGV[counts + r])
  local refused = 0
  local longest = 0
  for i = 1, n do
    if refused == 0 then
      local k = KEYS[key + i]
      local shape = shapes[tonumber(ARGV[arg + i]) + 1]
      local interval = shape[1]
      local stored_max = shape[2]
      local state = redis.call('GET', k)
      local next_free = now
      local stored = stored_max
      if state then next_free, stored = struct.unpack('<dd', state) end
      if now > next_free then
        stored = stored + (now - next_free) / shape[3]
        next_free = now
      end
      if stored > stored_max then stored = stored_max end
      local wait = next_free - now
      if wait > shape[6] then
        refused = i
        longest = wait
      else
        local taken = math.min(1, stored)
        local cost = 0
        if shape[7] then
          local left = taken
          local above = stored - shape[4]
          if above > 0 then
            local from_above = math.min(above, left)
            local first = interval + above * shape[5]
            local last = interval + (above - from_above) * shape[5]
            cost = from_above * (first + last) / 2
            left = left - from_above
          end
          cost = cost + interval * left
        end
        next_free = next_free + cost + (1 - taken) * interval
        stored = stored - taken
        redis.call('SET', k, struct.pack('<dd', next_free, stored), 'PX', shape[8])
        if wait > longest then longest = wait end
      end
    end
  end
  out[#out + 1] = refused
  out[#out + 1] = string.format('%.17g', longest)
  key = key + n
  arg = arg + n
end
return out
"""

# Part of every key's limit digest (limits.py): keys written in another state format are
# never read (a hash of the format before this one would answer GET with WRONGTYPE).
STATE_FORMAT = "d2"

BATCH_MAX = 256  # requests per script call
SHAPES_MAX = 10_000  # shapes whose script arguments are kept encoded
PENDING_MAX = 10_000  # requests queued for the next calls; past it, checked in the process


class RedisUnavailable(Exception):
    """Redis did not answer in time, or answered with an error."""


class RedisSchedules:
    def __init__(self, url: str, timeout_s: float) -> None:
        self.client: Redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.script = self.client.register_script(SCRIPT)
        self.timeout_s = timeout_s
        self._pending: list[tuple[Sequence[tuple[str, Shape]], asyncio.Future[tuple[int, float]]]]
        self._pending = []
        self._sender: asyncio.Task[None] | None = None
        self.calls = 0  # script calls made (each for one batch of requests)
        self._encoded: dict[Shape, list[str]] = {}  # a shape's 8 script arguments

    async def aclose(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        for _, future in self._pending:
            if not future.done():
                future.set_exception(RedisUnavailable("the limiter is closing"))
        self._pending = []
        await self.client.aclose()

    async def take(self, checks: Sequence[tuple[str, Shape]]) -> tuple[int, float]:
        """(refused index from 1, or 0; seconds): see SCRIPT. RedisUnavailable when Redis
        does not answer within the timeout."""
        assert checks, "a request with no checks asks Redis nothing"
        if len(self._pending) >= PENDING_MAX:
            raise RedisUnavailable(f"{PENDING_MAX} requests already wait for Redis")
        answer: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()
        self._pending.append((checks, answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="flow-redis-sender")
        return await answer

    async def _send(self) -> None:
        """Send what is queued, a batch at a time, until nothing is."""
        # No wait for more: this task's first step runs after the callbacks already queued
        # in this loop pass, so requests that came together join the first batch; under
        # load a batch is in flight and the next gathers whatever came meanwhile. An extra
        # loop pass here cost every request one more turn of a busy loop (twice per order).
        while self._pending:
            batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
            try:
                answers = await self._call([checks for checks, _ in batch])
            except BaseException as exc:  # every waiter gets an answer, even on cancel
                failed = exc if isinstance(exc, RedisUnavailable) else RedisUnavailable(repr(exc))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failed)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():  # its request may have been cancelled meanwhile
                    future.set_result(answer)

    def _shape_args(self, shape: Shape) -> list[str]:
        args = self._encoded.get(shape)
        if args is None:
            if len(self._encoded) >= SHAPES_MAX:  # overrides are bounded; this bounds the rest
                self._encoded.clear()
            args = self._encoded[shape] = [
                repr(shape.interval_s),
                repr(shape.stored_max),
                repr(shape.refill_s),
                repr(shape.threshold),
                repr(shape.slope),
                repr(shape.timeout_s),
                "1" if shape.warm else "0",
                str(max(1, int(idle_s(shape) * 1000) + 1000)),
            ]
        return args

    async def _call(self, batch: list[Sequence[tuple[str, Shape]]]) -> list[tuple[int, float]]:
        keys: list[str] = []
        shapes: dict[Shape, int] = {}
        indices: list[int] = []
        for checks in batch:
            for key, shape in checks:
                keys.append(key)
                index = shapes.get(shape)
                if index is None:
                    index = shapes[shape] = len(shapes)
                indices.append(index)
        args: list[Any] = [len(batch), len(shapes)]
        for shape in shapes:
            args += self._shape_args(shape)
        args += [len(checks) for checks in batch]
        args += indices
        self.calls += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                flat = await self.script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
        assert len(flat) == 2 * len(batch), "two values per request"
        return [(int(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]
