"""In-process quota store: the single-node default, and the fail_open fallback when Redis is down.

Same semantics as the Redis scripts (aigov.quota.policies.redis): check-and-reserve of every
counter under one lock, settle-by-request-id exactly once, and reservations that expire by
themselves (their amounts are given back) when nobody settles them.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

from aigov.quota.core import Counter, ReserveResult, SettleResult

MAX_SWEEP = 256  # bounded work per call, like the Lua scripts


@dataclass
class _Reservation:
    deadline: float
    amounts: dict[str, int]


class MemoryQuotaStore:
    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, tuple[int, float]] = {}     # key -> (value, expire_at)
        self._reservations: dict[str, _Reservation] = {}      # "tag|rid" -> reservation
        self._settled: dict[str, float] = {}                  # "tag|rid" -> forget_at
        self._last_gc = 0.0

    # All helpers below run with self._lock held.
    def _get(self, key: str, now: float) -> int:
        item = self._counters.get(key)
        if item is None or item[1] <= now:
            self._counters.pop(key, None)
            return 0
        return item[0]

    def _add(self, key: str, delta: int, expire_at: float, now: float, create: bool = True) -> int:
        item = self._counters.get(key)
        if item is None or item[1] <= now:
            if not create:
                self._counters.pop(key, None)
                return 0
            item = (0, expire_at)
        value = item[0] + delta
        self._counters[key] = (value, item[1])
        return value

    def _sweep(self, now: float) -> None:
        expired = [rid for rid, r in self._reservations.items() if r.deadline <= now][:MAX_SWEEP]
        for rid in expired:
            for key, amount in self._reservations.pop(rid).amounts.items():
                self._add(key, -amount, 0, now, create=False)
        if now - self._last_gc > 30:  # drop dead counters and old settled markers now and then
            self._last_gc = now
            for key in [k for k, (_, exp) in self._counters.items() if exp <= now]:
                del self._counters[key]
            for rid in [r for r, t in self._settled.items() if t <= now]:
                del self._settled[rid]

    def reserve(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
                now: float | None = None, reservation_ttl_s: int = 600) -> ReserveResult:
        now = time.time() if now is None else now
        rid = f"{tag}|{request_id}"
        with self._lock:
            self._sweep(now)
            values = [self._get(c.key, now) for c in counters]
            if rid in self._reservations or rid in self._settled:
                return ReserveResult(True, values, duplicate=True)
            for i, (c, amount) in enumerate(zip(counters, amounts)):
                if values[i] + amount > c.limit:
                    return ReserveResult(False, values, blocked=i)
            reserved: dict[str, int] = {}
            for i, (c, amount) in enumerate(zip(counters, amounts)):
                values[i] = self._add(c.key, int(amount), c.expire_at, now)
                reserved[c.key] = reserved.get(c.key, 0) + int(amount)
            self._reservations[rid] = _Reservation(now + reservation_ttl_s, reserved)
            return ReserveResult(True, values)

    def settle(self, tag: str, request_id: str, counters: Sequence[Counter], amounts: Sequence[int],
               now: float | None = None, reservation_ttl_s: int = 600) -> SettleResult:
        now = time.time() if now is None else now
        rid = f"{tag}|{request_id}"
        with self._lock:
            self._sweep(now)
            if rid in self._settled:
                return SettleResult("duplicate", [self._get(c.key, now) for c in counters])
            reservation = self._reservations.pop(rid, None)
            reserved = dict(reservation.amounts) if reservation else {}
            values = []
            for c, amount in zip(counters, amounts):
                delta = int(amount) - reserved.pop(c.key, 0)
                values.append(self._add(c.key, delta, c.expire_at, now, create=delta > 0))
            for key, amount in reserved.items():  # reserved on a counter the caller no longer lists
                self._add(key, -amount, 0, now, create=False)
            self._settled[rid] = now + 2 * reservation_ttl_s
            return SettleResult("settled" if reservation else "orphan", values)

    def observe(self, counters: Sequence[Counter], values: Sequence[int], now: float | None = None) -> None:
        """Raise each counter to a value the shared store (Redis) reported, never lower it: the
        fail_open fallback then decides from the usage this node last saw in Redis, not from 0
        (an exhausted caller would get a fresh budget for the whole outage)."""
        now = time.time() if now is None else now
        with self._lock:
            for c, v in zip(counters, values):
                item = self._counters.get(c.key)
                if item is None or item[1] <= now:
                    item = (0, c.expire_at)
                if int(v) > item[0]:
                    self._counters[c.key] = (int(v), item[1])

    def values(self, tag: str, counters: Sequence[Counter], now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        with self._lock:
            self._sweep(now)
            return [self._get(c.key, now) for c in counters]
