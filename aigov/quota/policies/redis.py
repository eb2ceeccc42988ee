"""Redis quota store: one Lua script per operation, so check-and-reserve and settle are atomic
across every gateway node sharing the Redis.

Key layout for one caller (the `{tag}` hash tag puts all of them in one Redis Cluster slot, so
the multi-key scripts are Cluster-safe):
  <prefix>:{<tag>}:<metric>:<window>:<scope>:<window start>   counters (INCRBY integers)
  <prefix>:{<tag>}:res       hash   request id -> "amount key\n..." (what it reserved)
  <prefix>:{<tag>}:pending   zset   request id scored by its reservation deadline (ms)
  <prefix>:{<tag>}:done      zset   settled request ids scored by settle time (idempotency)

Every script first gives back reservations whose deadline passed (a node died before it could
settle): the budget of a crashed request returns within the reservation TTL, never leaks. The
counters such a sweep touches are named inside the reservation rather than passed in KEYS; they
share the caller's hash tag, hence the slot, so Redis Cluster serves them.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import redis

from aigov.quota.core import Counter, ReserveResult, SettleResult, meta_keys
from aigov.redis_client import RedisLayer

_SWEEP = r"""
local function sweep(res, pending, now_ms)
  local expired = redis.call('ZRANGEBYSCORE', pending, '-inf', now_ms, 'LIMIT', 0, 64)
  for _, rid in ipairs(expired) do
    local enc = redis.call('HGET', res, rid)
    if enc then
      for amount, key in string.gmatch(enc, '(%-?%d+) ([^\n]+)') do
        if redis.call('EXISTS', key) == 1 then redis.call('DECRBY', key, amount) end
      end
      redis.call('HDEL', res, rid)
    end
    redis.call('ZREM', pending, rid)
  end
end
local function keep_until(key, unix_s, now_s)
  local ttl = redis.call('TTL', key)
  local want = unix_s - now_s
  if want > 0 and ttl < want then redis.call('EXPIRE', key, want) end
end
"""

# KEYS: res, pending, done, counter...
# ARGV: now_ms, request_id, reservation_ttl_ms, then per counter: limit, amount, expire_at (unix s)
# Returns {status, blocked_index, values...}; status 1 admitted, 0 rejected, 2 duplicate.
RESERVE_LUA = _SWEEP + r"""
local now_ms = tonumber(ARGV[1])
local now_s = math.floor(now_ms / 1000)
local rid = ARGV[2]
local ttl_ms = tonumber(ARGV[3])
sweep(KEYS[1], KEYS[2], now_ms)
local n = #KEYS - 3
local out = {1, 0}
if redis.call('HEXISTS', KEYS[1], rid) == 1 or redis.call('ZSCORE', KEYS[3], rid) then
  out[1] = 2
  for i = 1, n do out[2 + i] = tonumber(redis.call('GET', KEYS[3 + i]) or '0') end
  return out
end
for i = 1, n do
  local cur = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
  out[2 + i] = cur
  if out[1] == 1 and cur + tonumber(ARGV[3 * i + 2]) > tonumber(ARGV[3 * i + 1]) then
    out[1] = 0
    out[2] = i
  end
end
if out[1] == 0 then return out end
local enc = {}
local last_expire = 0
for i = 1, n do
  local key = KEYS[3 + i]
  local amount = tonumber(ARGV[3 * i + 2])
  local expire_at = tonumber(ARGV[3 * i + 3])
  out[2 + i] = redis.call('INCRBY', key, amount)
  keep_until(key, expire_at, now_s)
  enc[#enc + 1] = string.format('%d %s', amount, key)
  if expire_at > last_expire then last_expire = expire_at end
end
redis.call('HSET', KEYS[1], rid, table.concat(enc, '\n'))
redis.call('ZADD', KEYS[2], now_ms + ttl_ms, rid)
-- the bookkeeping lives as long as the counters it can give back to
keep_until(KEYS[1], last_expire, now_s)
keep_until(KEYS[2], last_expire, now_s)
return out
"""

# KEYS: res, pending, done, counter...
# ARGV: now_ms, request_id, done_ttl_ms, then per counter: amount, expire_at (unix s)
# Returns {status, values...}; status 1 settled, 2 duplicate, 3 orphan (no reservation: charged).
SETTLE_LUA = _SWEEP + r"""
local now_ms = tonumber(ARGV[1])
local now_s = math.floor(now_ms / 1000)
local rid = ARGV[2]
local done_ttl_ms = tonumber(ARGV[3])
sweep(KEYS[1], KEYS[2], now_ms)
local n = #KEYS - 3
local out = {1}
if redis.call('ZSCORE', KEYS[3], rid) then
  out[1] = 2
  for i = 1, n do out[1 + i] = tonumber(redis.call('GET', KEYS[3 + i]) or '0') end
  return out
end
local reserved = {}
local enc = redis.call('HGET', KEYS[1], rid)
if enc then
  for amount, key in string.gmatch(enc, '(%-?%d+) ([^\n]+)') do
    reserved[key] = (reserved[key] or 0) + tonumber(amount)
  end
else
  out[1] = 3
end
for i = 1, n do
  local key = KEYS[3 + i]
  local delta = tonumber(ARGV[2 * i + 2]) - (reserved[key] or 0)
  reserved[key] = nil
  local exists = redis.call('EXISTS', key) == 1
  -- A settle that lands after its window ended must not recreate the counter: INCRBY would
  -- make a key that keep_until cannot give a TTL (the window is over), and it would live forever.
  local window_open = tonumber(ARGV[2 * i + 3]) > now_s
  if delta ~= 0 and (exists or (delta > 0 and window_open)) then
    out[1 + i] = redis.call('INCRBY', key, delta)
    keep_until(key, tonumber(ARGV[2 * i + 3]), now_s)
  else
    out[1 + i] = tonumber(redis.call('GET', key) or '0')
  end
end
for key, amount in pairs(reserved) do
  if redis.call('EXISTS', key) == 1 then redis.call('DECRBY', key, amount) end
end
redis.call('HDEL', KEYS[1], rid)
redis.call('ZREM', KEYS[2], rid)
redis.call('ZADD', KEYS[3], now_ms, rid)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms - done_ttl_ms)
redis.call('PEXPIRE', KEYS[3], done_ttl_ms)
return out
"""

# KEYS: res, pending, counter...; ARGV: now_ms. Returns the counter values after the sweep.
VALUES_LUA = _SWEEP + r"""
sweep(KEYS[1], KEYS[2], tonumber(ARGV[1]))
local out = {}
for i = 3, #KEYS do out[#out + 1] = tonumber(redis.call('GET', KEYS[i]) or '0') end
return out
"""


class RedisQuotaStore:
    name = "redis"

    def __init__(self, layer: RedisLayer, prefix: str) -> None:
        self.layer = layer
        self.prefix = prefix
        client = layer.client
        self._reserve = client.register_script(RESERVE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._values = client.register_script(VALUES_LUA)

    def _reserve_args(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                      now: float, reservation_ttl_s: int) -> tuple[list[str], list[Any]]:
        keys = [*meta_keys(self.prefix, tag), *(c.key for c in counters)]
        args: list[Any] = [int(now * 1000), request_id, int(reservation_ttl_s * 1000)]
        for c, amount in zip(counters, amounts):
            args += [int(c.limit), int(amount), int(c.expire_at)]
        return keys, args

    @staticmethod
    def _reserve_result(out: Any) -> ReserveResult:
        status, blocked, values = int(out[0]), int(out[1]), [int(v) for v in out[2:]]
        if status == 0:
            return ReserveResult(False, values, blocked=blocked - 1)
        return ReserveResult(True, values, duplicate=status == 2)

    def reserve(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                now: float | None = None, reservation_ttl_s: int = 600) -> ReserveResult:
        return self.reserve_begin(tag, request_id, counters, amounts, now, reservation_ttl_s).result()

    def reserve_begin(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                      now: float | None = None, reservation_ttl_s: int = 600) -> "PendingScript":
        """Send the reserve script now and read its answer later (PendingScript.result()).

        Why: the caller has a PDK round trip to make meanwhile (kong.ctx.shared.set), so Redis
        runs the script while Kong answers, instead of one wait after the other. Failures raise
        the same errors as reserve(), from here or from result().
        """
        now = time.time() if now is None else now
        keys, args = self._reserve_args(tag, request_id, counters, amounts, now, reservation_ttl_s)
        return PendingScript(self, self._reserve, keys, args, self._reserve_result)

    def _settle_args(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                     now: float, reservation_ttl_s: int) -> tuple[list[str], list[Any]]:
        keys = [*meta_keys(self.prefix, tag), *(c.key for c in counters)]
        # Settled ids are remembered well past the longest possible request.
        args: list[Any] = [int(now * 1000), request_id, int(2 * reservation_ttl_s * 1000)]
        for c, amount in zip(counters, amounts):
            args += [int(amount), int(c.expire_at)]
        return keys, args

    @staticmethod
    def _settle_result(out: Any) -> SettleResult:
        status = {1: "settled", 2: "duplicate", 3: "orphan"}[int(out[0])]
        return SettleResult(status, [int(v) for v in out[1:]])

    def settle(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
               now: float | None = None, reservation_ttl_s: int = 600) -> SettleResult:
        return self.settle_begin(tag, request_id, counters, amounts, now, reservation_ttl_s).result()

    def settle_begin(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                     now: float | None = None, reservation_ttl_s: int = 600) -> "PendingScript":
        """settle() in two steps, like reserve_begin()."""
        now = time.time() if now is None else now
        keys, args = self._settle_args(tag, request_id, counters, amounts, now, reservation_ttl_s)
        return PendingScript(self, self._settle, keys, args, self._settle_result)

    def values(self, tag: str, counters: Sequence[Counter], now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        res, pending, _ = meta_keys(self.prefix, tag)
        keys = [res, pending, *(c.key for c in counters)]
        out = self.layer.run(lambda client: self._values(keys=keys, args=[int(now * 1000)], client=client))
        return [int(v) for v in out]


class PendingScript:
    """One script call in flight (RedisLayer.send): result() parses it, cancel() drops it."""

    def __init__(self, store: RedisQuotaStore, script: Any, keys: list[str], args: list[Any],
                 parse: Callable[[Any], Any]) -> None:
        self.store, self.script, self.keys, self.args, self.parse = store, script, keys, args, parse
        self._pending = store.layer.send(("EVALSHA", script.sha, len(keys), *keys, *args))

    def result(self) -> Any:
        """The parsed answer (ReserveResult / SettleResult); errors as the one-step call raises."""
        out = self._pending.replies()[0]
        if isinstance(out, redis.exceptions.NoScriptError):
            # The server lost its script cache (restart, SCRIPT FLUSH): the normal path loads it.
            out = self.store.layer.run(lambda client: self.script(keys=self.keys, args=self.args, client=client))
        elif isinstance(out, redis.exceptions.ResponseError):
            def fail(_client: Any) -> Any:
                raise out
            self.store.layer.run(fail)  # LOADING / READONLY map to an outage, as in the one-step call
        return self.parse(out)

    def cancel(self) -> None:
        """Give up on the answer (the caller failed in between): drop the connection."""
        self._pending.cancel()
