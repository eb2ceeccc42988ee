"""Fixed UTC windows: epoch-aligned minute/hour/day, Monday weeks, calendar months."""
from __future__ import annotations

import calendar

import pytest

from aigov.quota.windows import window_at


def ts(*parts: int) -> int:
    return calendar.timegm((*parts, 0, 0, 0)[:6])


def test_minute_hour_day_align_to_the_epoch() -> None:
    t = ts(2026, 3, 4, 10, 17, 42) + 0.5
    assert window_at("minute", t).start == ts(2026, 3, 4, 10, 17, 0)
    assert window_at("hour", t).start == ts(2026, 3, 4, 10, 0, 0)
    day = window_at("day", t)
    assert (day.start, day.end) == (ts(2026, 3, 4, 0, 0, 0), ts(2026, 3, 5, 0, 0, 0))
    assert window_at("minute", t).reset_in(t) == 18


def test_week_starts_monday_utc() -> None:
    w = window_at("week", ts(2026, 3, 4, 10, 0, 0))  # a Wednesday
    assert (w.start, w.end) == (ts(2026, 3, 2, 0, 0, 0), ts(2026, 3, 9, 0, 0, 0))
    assert window_at("week", ts(2026, 3, 9, 0, 0, 0)).start == ts(2026, 3, 9, 0, 0, 0)


@pytest.mark.parametrize("moment, start, end", [
    ((2026, 12, 31, 23, 59, 59), (2026, 12, 1), (2027, 1, 1)),
    ((2028, 2, 29, 12, 0, 0), (2028, 2, 1), (2028, 3, 1)),
    ((2026, 1, 1, 0, 0, 0), (2026, 1, 1), (2026, 2, 1)),
])
def test_month_is_the_utc_calendar_month(moment: tuple, start: tuple, end: tuple) -> None:
    w = window_at("month", ts(*moment))
    assert (w.start, w.end) == (ts(*start, 0, 0, 0), ts(*end, 0, 0, 0))


def test_the_next_window_starts_where_the_last_ended() -> None:
    t = ts(2026, 5, 31, 23, 59, 59)
    for name in ("minute", "hour", "day", "week", "month"):
        w = window_at(name, t)
        assert window_at(name, w.end).start == w.end
        assert window_at(name, w.end - 0.001).start == w.start


def test_unknown_window_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown quota window"):
        window_at("fortnight", 0)
