"""Fixed quota windows in UTC.

minute/hour/day are aligned to the Unix epoch (floor(t / size) * size). week starts on Monday
00:00 UTC (ISO weeks; the epoch itself was a Thursday, which nobody budgets by). month is the
UTC calendar month. Every node computes the same window from its clock, so the window start is
part of the counter key and a new window starts from a fresh (full) budget.
"""
from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass

WINDOWS = ("minute", "hour", "day", "week", "month")
_FIXED_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
_MONDAY_OFFSET = 4 * 86400  # 1970-01-01 was a Thursday; 1970-01-05 was the first Monday


@dataclass(frozen=True)
class Window:
    name: str
    start: int  # unix seconds, inclusive
    end: int    # unix seconds, exclusive

    def reset_in(self, now: float) -> int:
        """Whole seconds until the window resets (at least 1 while it is current)."""
        return max(1, int(self.end - now + 0.999))


def window_at(name: str, now: float) -> Window:
    """The window named `name` that contains unix time `now`."""
    t = int(now // 1)
    if name in _FIXED_SECONDS:
        size = _FIXED_SECONDS[name]
        start = t - t % size
        return Window(name, start, start + size)
    if name == "week":
        size = 7 * 86400
        start = t - (t - _MONDAY_OFFSET) % size
        return Window(name, start, start + size)
    if name == "month":
        d = dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)
        start = calendar.timegm((d.year, d.month, 1, 0, 0, 0))
        year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
        return Window(name, start, calendar.timegm((year, month, 1, 0, 0, 0)))
    raise ValueError(f"unknown quota window {name!r}; expected one of {', '.join(WINDOWS)}")
