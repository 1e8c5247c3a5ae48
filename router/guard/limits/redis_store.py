"""Bucket states in Redis, shared by every router replica.

One call is one round trip: a Lua script checks and charges all of the call's buckets (and takes
its stream slot) atomically, so concurrent calls from any number of replicas can never admit more
than a limit, and a call rejected by one bucket charges none. The scripts read Redis's own clock
(`TIME`), never a replica's, so replicas with skewed clocks agree. Scripts are replicated by
their effects (Redis >= 5), so `TIME` inside them is safe.

Open streams are a sorted set per tenant rather than a plain counter: each slot is a member
scored with its own deadline (now + stream_slot_ttl_s). A replica that crashes between acquire
and release leaks its slots only until their deadlines, when the next acquire prunes them; a
counter with one TTL would never expire while the tenant stays busy, and its leaked slots would
lock the tenant out for good. Releasing removes the call's own member, so a double release cannot
free someone else's slot.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from router.guard.limits.buckets import SLACK_S, WINDOW_S, Bucket, Rejection, StreamSlot

logger = logging.getLogger(__name__)

_EPOCH = 1_767_225_600
"""2026-01-01 UTC. Times are µs since then rather than since 1970: doubles then keep fractions
of a µs (non-integer intervals such as 60 s / 7 add up without rounding), and every replica and
the scripts in Redis must agree on it, so it never changes."""

# KEYS: n bucket keys, then the tenant's open-stream set if the call streams.
# ARGV: n, window_us, slack_us, n x (interval_us, amount), then [limit, member, slot_ttl_us].
# Reply: {1} when admitted and charged; else {0, streams_full, wait_us_1, ..., wait_us_n} and
# nothing was written. Numbers are formatted with %.17g because Redis turns Lua numbers into
# strings with 14 digits, which would round microsecond timestamps (16 digits).
CHARGE_LUA = """
local EPOCH = @EPOCH@
local t = redis.call('TIME')
local now = (tonumber(t[1]) - EPOCH) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local slack = tonumber(ARGV[3])
local new_tats, waits, rejected = {}, {}, false
for i = 1, n do
  local interval = tonumber(ARGV[2 + 2 * i])
  local amount = tonumber(ARGV[3 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + amount * interval
  local wait = new_tat - now - window
  if wait > slack then
    rejected = true
    waits[i] = math.ceil(wait)
  else
    waits[i] = 0
  end
  new_tats[i] = new_tat
end
local slot = 4 + 2 * n
local streams_full = 0
if #KEYS > n then
  redis.call('ZREMRANGEBYSCORE', KEYS[n + 1], '-inf', string.format('%.17g', now))
  if redis.call('ZCARD', KEYS[n + 1]) >= tonumber(ARGV[slot]) then streams_full = 1 end
end
if rejected or streams_full == 1 then
  local reply = {0, streams_full}
  for i = 1, n do reply[i + 2] = waits[i] end
  return reply
end
for i = 1, n do
  local ttl_ms = string.format('%d', math.ceil((new_tats[i] - now) / 1000) + 1)
  redis.call('SET', KEYS[i], string.format('%.17g', new_tats[i]), 'PX', ttl_ms)
end
if #KEYS > n then
  local ttl = tonumber(ARGV[slot + 2])
  redis.call('ZADD', KEYS[n + 1], string.format('%.17g', now + ttl), ARGV[slot + 1])
  redis.call('PEXPIRE', KEYS[n + 1], string.format('%d', math.ceil(ttl / 1000)))
end
return {1}
"""

# KEYS: n bucket keys, then the open-stream set if the call streamed.
# ARGV: n, n x (interval_us, amount), then [member]. A negative amount charges without a check
# (a call that used more than it reserved). Mirrors buckets.gcra_refund.
REFUND_LUA = """
local EPOCH = @EPOCH@
local t = redis.call('TIME')
local now = (tonumber(t[1]) - EPOCH) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local amount = tonumber(ARGV[1 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat ~= nil or amount < 0 then
    if tat == nil or tat < now then tat = now end
    local new_tat = tat - amount * interval
    if new_tat > now then
      local ttl_ms = string.format('%d', math.ceil((new_tat - now) / 1000) + 1)
      redis.call('SET', KEYS[i], string.format('%.17g', new_tat), 'PX', ttl_ms)
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
if #KEYS > n then redis.call('ZREM', KEYS[n + 1], ARGV[2 + 2 * n]) end
return 1
"""

CHARGE_LUA = CHARGE_LUA.replace("@EPOCH@", str(_EPOCH))
REFUND_LUA = REFUND_LUA.replace("@EPOCH@", str(_EPOCH))
_WINDOW_US = repr(WINDOW_S * 1e6)
_SLACK_US = repr(SLACK_S * 1e6)


class _Script:
    """A Lua script run by EVALSHA (its body travels once); EVAL when the server lacks it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: list[str], args: list[str | int]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # SCRIPT FLUSH, a restarted server or a failover to a replica that never saw it:
            # EVAL sends the body and caches it again, so the next EVALSHA succeeds.
            logger.info("redis lacks rate-limit script %s; sending it again", self.sha[:12])
            return await client.eval(self.source, len(keys), *keys, *args)


_CHARGE = _Script(CHARGE_LUA)
_REFUND = _Script(REFUND_LUA)


class RedisStore:
    """GCRA states as Redis strings (`tat` in µs of Redis time, expiring when the bucket is
    full again) and open streams as a sorted set per tenant."""

    def __init__(self, url: str, *, timeout_s: float = 0.05, slot_ttl_s: float = 3600.0) -> None:
        # No client-side retries: the limiter decides what a failure means (fail open or closed)
        # and a retry would only multiply the time a call waits on a dead server.
        self._client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._slot_ttl_us = repr(slot_ttl_s * 1e6)

    @property
    def client(self) -> Redis:
        return self._client

    async def charge(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> Rejection | None:
        keys, args = self._request(buckets, amounts, [_WINDOW_US, _SLACK_US])
        if slot is not None:
            keys.append(slot.key)
            args += (slot.limit, slot.member, self._slot_ttl_us)
        reply = await _CHARGE(self._client, keys, args)
        if reply[0] == 1:
            return None
        return Rejection(tuple(int(w) / 1e6 for w in reply[2:]), reply[1] == 1)

    async def refund(
        self, buckets: Sequence[Bucket], amounts: Sequence[int], slot: StreamSlot | None
    ) -> None:
        keys, args = self._request(buckets, amounts, [])
        if slot is not None:
            keys.append(slot.key)
            args.append(slot.member)
        await _REFUND(self._client, keys, args)

    @staticmethod
    def _request(
        buckets: Sequence[Bucket], amounts: Sequence[int], extra: list[str | int]
    ) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of a script: n, [extra...], then (interval_us, amount) per bucket."""
        args: list[str | int] = [len(buckets), *extra]
        for (_, interval), amount in zip(buckets, amounts, strict=True):
            args += (repr(interval * 1e6), amount)
        return [key for key, _ in buckets], args

    async def close(self) -> None:
        await self._client.aclose()
