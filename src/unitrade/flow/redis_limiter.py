"""The limiter's schedules in Redis, shared by every serving process of a region.

The same arithmetic as limiter.py, in one Lua script: all the checks of a request (client
IP, buyer, region) in one round trip, atomically per key, on Redis's clock (TIME), so that
processes on different machines agree. Each key is a hash {n: next_free, s: stored} that
expires once it is as good as new (limiter.idle_s), so idle keys cost nothing. The checks
run in order and stop at the first refusal; the permits the earlier ones took stay taken,
as Sentinel's rule chain does.

A Redis that does not answer within `storage_timeout_ms` is not waited for: the process
falls back on its own schedules (limiter.Schedules) until Redis answers again, and counts
the fallbacks (unitrade_flow_storage_errors_total): limits stay in force, per process,
rather than every request waiting for Redis or none being limited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from unitrade.flow.limiter import Shape, idle_s

# KEYS: one per check. ARGV: 7 numbers per check (interval, stored_max, refill, threshold,
# slope, timeout, warm 0/1), then the TTL in ms per check.
# Returns {refused index (0: none), seconds}: the longest wait of the admitted, or the
# refused one's retry-after. Floats leave Lua as strings (a Lua number would be truncated),
# written with %.17g: Lua's tostring keeps 14 digits, which for a unix time is 0.1 ms, and
# a next-free time rounded up by up to 50 us refused every request that came within that
# of the one before, however many permits were stored (a 20,000/s limit refused at 500/s).
SCRIPT = """
local function num(x) return string.format('%.17g', x) end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #KEYS
local longest = 0
for i = 1, n do
  local base = (i - 1) * 7
  local interval = tonumber(ARGV[base + 1])
  local stored_max = tonumber(ARGV[base + 2])
  local refill = tonumber(ARGV[base + 3])
  local threshold = tonumber(ARGV[base + 4])
  local slope = tonumber(ARGV[base + 5])
  local timeout = tonumber(ARGV[base + 6])
  local warm = ARGV[base + 7] == '1'
  local ttl = tonumber(ARGV[n * 7 + i])
  local state = redis.call('HMGET', KEYS[i], 'n', 's')
  local next_free = tonumber(state[1]) or now
  local stored = tonumber(state[2]) or stored_max
  if now > next_free then
    stored = stored + (now - next_free) / refill
    next_free = now
  end
  stored = math.min(stored_max, stored)
  local wait = next_free - now
  if wait > timeout then
    return {i, num(wait)}
  end
  local taken = math.min(1, stored)
  local cost = 0
  if warm then
    local left = taken
    local above = stored - threshold
    if above > 0 then
      local from_above = math.min(above, left)
      local first = interval + above * slope
      local last = interval + (above - from_above) * slope
      cost = from_above * (first + last) / 2
      left = left - from_above
    end
    cost = cost + interval * left
  end
  next_free = next_free + cost + (1 - taken) * interval
  stored = stored - taken
  redis.call('HSET', KEYS[i], 'n', num(next_free), 's', num(stored))
  redis.call('PEXPIRE', KEYS[i], ttl)
  if wait > longest then longest = wait end
end
return {0, num(longest)}
"""


class RedisUnavailable(Exception):
    """Redis did not answer in time, or answered with an error."""


class RedisSchedules:
    def __init__(self, url: str, timeout_s: float) -> None:
        self.client: Redis = Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.script = self.client.register_script(SCRIPT)
        self.timeout_s = timeout_s

    async def aclose(self) -> None:
        await self.client.aclose()

    async def take(self, checks: Sequence[tuple[str, Shape]]) -> tuple[int, float]:
        """(refused index from 1, or 0; seconds): see SCRIPT. RedisUnavailable when Redis
        does not answer within the timeout."""
        args: list[Any] = []
        for _, shape in checks:
            args += [
                repr(shape.interval_s),
                repr(shape.stored_max),
                repr(shape.refill_s),
                repr(shape.threshold),
                repr(shape.slope),
                repr(shape.timeout_s),
                "1" if shape.warm else "0",
            ]
        args += [str(max(1, int(idle_s(shape) * 1000) + 1000)) for _, shape in checks]
        try:
            async with asyncio.timeout(self.timeout_s):
                refused, seconds = await self.script(keys=[k for k, _ in checks], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return int(refused), float(seconds)
