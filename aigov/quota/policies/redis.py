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

A settle that cannot reach Redis (timeout, connection error, breaker open) is kept in a bounded
in-process queue of deferred settles and replayed by retry_deferred() once the layer is healthy:
settles are idempotent per request id (the `done` zset), so a replay of one that did land late
is a "duplicate" and charges nothing twice. The quota handler queues the real usage of fail_open
requests (reserved in local memory during an outage) the same way (defer_settle): with no
reservation in Redis the replay is an "orphan" settle, which charges the usage and marks the id
settled, so the shared counters converge to the real usage once Redis is back.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import redis

from aigov import metrics
from aigov.quota.core import Counter, ReserveResult, SettleResult, meta_keys
from aigov.redis_client import RedisLayer, RedisUnavailable

log = logging.getLogger("aigov.quota")

DEFERRED_CAP = 1024   # deferred settles kept per store; the oldest is dropped beyond it
RETRY_BATCH = 8       # deferred settles replayed per retry_deferred() call (one round trip)

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


@dataclass
class DeferredSettle:
    """A settle Redis did not confirm, kept to be replayed (same request id, same amounts)."""

    tag: str
    request_id: str
    counters: tuple[Counter, ...]
    amounts: tuple[int, ...]
    reservation_ttl_s: int
    sent_at: float        # the `now` of the original call: the score a landed original has in `done`


class RedisQuotaStore:
    name = "redis"

    def __init__(self, layer: RedisLayer, prefix: str, deferred_cap: int = DEFERRED_CAP) -> None:
        self.layer = layer
        self.prefix = prefix
        client = layer.client
        self._reserve = client.register_script(RESERVE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._values = client.register_script(VALUES_LUA)
        self.deferred_cap = deferred_cap
        self._deferred: "OrderedDict[tuple[str, str], DeferredSettle]" = OrderedDict()
        self._deferred_lock = threading.Lock()

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
        """settle() in two steps, like reserve_begin(). A settle that fails with RedisUnavailable
        (from here or from result()) is also queued for retry_deferred() before the error is raised."""
        now = time.time() if now is None else now
        keys, args = self._settle_args(tag, request_id, counters, amounts, now, reservation_ttl_s)

        def defer() -> None:
            self.defer_settle(tag, request_id, counters, amounts, reservation_ttl_s, now)

        try:
            return PendingScript(self, self._settle, keys, args, self._settle_result, on_unavailable=defer)
        except RedisUnavailable:
            defer()
            raise

    # ------------------------------------------------------------ deferred settles
    def defer_settle(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                     reservation_ttl_s: int = 600, now: float | None = None) -> None:
        """Queue a settle for retry_deferred(). A request id already queued keeps its first entry
        (in Redis too the first settle of an id is the one that counts)."""
        item = DeferredSettle(tag, request_id, tuple(counters), tuple(int(a) for a in amounts),
                              int(reservation_ttl_s), time.time() if now is None else now)
        with self._deferred_lock:
            if (tag, request_id) in self._deferred:
                return
            self._deferred[(tag, request_id)] = item
            dropped = self._trim_locked()
        metrics.QUOTA_STORE_FAILURES.labels("settle_deferred").inc()
        self._warn_dropped(dropped, "the deferred-settle queue is full")

    def deferred_count(self) -> int:
        return len(self._deferred)

    def deferred(self) -> list[DeferredSettle]:
        """The queued settles, oldest first (a copy)."""
        with self._deferred_lock:
            return list(self._deferred.values())

    def _trim_locked(self) -> list[DeferredSettle]:
        dropped = []
        while len(self._deferred) > self.deferred_cap:
            dropped.append(self._deferred.popitem(last=False)[1])
        return dropped

    @staticmethod
    def _warn_dropped(dropped: list[DeferredSettle], why: str) -> None:
        for item in dropped:
            metrics.QUOTA_STORE_FAILURES.labels("settle_deferred_dropped").inc()
            log.warning("llm-token-quota: %s; dropped the deferred settle of request %s (%s, amounts %s): "
                        "Redis will not get this usage", why, item.request_id, item.tag, list(item.amounts))

    def _requeue(self, items: list[DeferredSettle]) -> None:
        """Put back settles a retry could not deliver, at the front (oldest first)."""
        with self._deferred_lock:
            for item in reversed(items):
                key = (item.tag, item.request_id)
                if key not in self._deferred:
                    self._deferred[key] = item
                    self._deferred.move_to_end(key, last=False)
            dropped = self._trim_locked()
        self._warn_dropped(dropped, "the deferred-settle queue is full")

    def retry_deferred(self, max_items: int = RETRY_BATCH) -> list[tuple[str, SettleResult]]:
        """Replay up to `max_items` deferred settles (oldest first) in one round trip, when any are
        queued and the layer is healthy. Returns (request id, result) of each one Redis answered;
        undelivered ones go back to the queue. Never raises RedisUnavailable.

        The replay is evaluated at the time of the retry (window checks, the reservation sweep): a
        window that ended is not recreated, and a reservation that expired meanwhile was already
        given back, so the replay charges the real usage as an orphan.
        """
        if not self._deferred or not self.layer.healthy:
            return []  # the common case: no lock, no round trip
        now = time.time()
        batch: list[DeferredSettle] = []
        expired: list[DeferredSettle] = []
        with self._deferred_lock:
            while self._deferred and len(batch) < max_items:
                item = self._deferred.popitem(last=False)[1]
                # Settled ids are remembered 2 x TTL (SETTLE_LUA's done_ttl). Past 1.5 x TTL (clock
                # skew margin) a replay of a settle that did land could find no marker and charge twice.
                (expired if now - item.sent_at > 1.5 * item.reservation_ttl_s else batch).append(item)
        self._warn_dropped(expired, "deferred settle too old to replay safely")
        if not batch:
            return []
        calls = [self._settle_args(d.tag, d.request_id, d.counters, d.amounts, now, d.reservation_ttl_s)
                 for d in batch]
        try:
            replies = self.layer.send(*(("EVALSHA", self._settle.sha, len(k), *k, *a) for k, a in calls)).replies()
        except RedisUnavailable:
            self._requeue(batch)
            return []
        out: list[tuple[str, SettleResult]] = []
        for i, (item, (keys, args), reply) in enumerate(zip(batch, calls, replies)):
            try:
                if isinstance(reply, redis.exceptions.NoScriptError):
                    reply = self.layer.run(lambda client: self._settle(keys=keys, args=args, client=client))
                elif isinstance(reply, redis.exceptions.ResponseError):
                    def fail(_client: Any, err: Exception = reply) -> Any:
                        raise err
                    self.layer.run(fail)  # LOADING / READONLY: an outage, retried later
                result = self._settle_result(reply)
            except RedisUnavailable:
                self._requeue(batch[i:])
                break
            except Exception as exc:  # noqa: BLE001 - a script error: replaying cannot fix it
                metrics.QUOTA_STORE_FAILURES.labels("settle_deferred_failed").inc()
                log.error("llm-token-quota: deferred settle of request %s failed (%s: %s); dropped",
                          item.request_id, type(exc).__name__, exc)
                continue
            metrics.QUOTA_STORE_FAILURES.labels(f"settle_replayed_{result.status}").inc()
            out.append((item.request_id, result))
        return out

    def values(self, tag: str, counters: Sequence[Counter], now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        res, pending, _ = meta_keys(self.prefix, tag)
        keys = [res, pending, *(c.key for c in counters)]
        out = self.layer.run(lambda client: self._values(keys=keys, args=[int(now * 1000)], client=client))
        return [int(v) for v in out]


class PendingScript:
    """One script call in flight (RedisLayer.send): result() parses it, cancel() drops it.

    `on_unavailable` runs when result() fails with RedisUnavailable (the settle's deferral)."""

    def __init__(self, store: RedisQuotaStore, script: Any, keys: list[str], args: list[Any],
                 parse: Callable[[Any], Any], on_unavailable: Callable[[], None] | None = None) -> None:
        self.store, self.script, self.keys, self.args, self.parse = store, script, keys, args, parse
        self.on_unavailable = on_unavailable
        self._pending = store.layer.send(("EVALSHA", script.sha, len(keys), *keys, *args))

    def result(self) -> Any:
        """The parsed answer (ReserveResult / SettleResult); errors as the one-step call raises."""
        try:
            out = self._pending.replies()[0]
            if isinstance(out, redis.exceptions.NoScriptError):
                # The server lost its script cache (restart, SCRIPT FLUSH): the normal path loads it.
                out = self.store.layer.run(lambda client: self.script(keys=self.keys, args=self.args, client=client))
            elif isinstance(out, redis.exceptions.ResponseError):
                def fail(_client: Any) -> Any:
                    raise out
                self.store.layer.run(fail)  # LOADING / READONLY map to an outage, as in the one-step call
        except RedisUnavailable:
            if self.on_unavailable is not None:
                self.on_unavailable()
            raise
        return self.parse(out)

    def cancel(self) -> None:
        """Give up on the answer (the caller failed in between): drop the connection."""
        self._pending.cancel()
