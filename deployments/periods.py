"""Spend-cap periods in UTC: which period an instant falls in, and when it ends.

`lua/lib/calendar.lua` computes the same period ids inside the money scripts (Redis Lua has
no date library); a test runs both over the same instants. Periods: `daily` (00:00 UTC),
`weekly` (Monday 00:00 UTC), `monthly` (the 1st, 00:00 UTC); no period: a cap that never resets.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone


def _day(now_s: float) -> date:
    return datetime.fromtimestamp(int(now_s // 1), tz=timezone.utc).date()


def period_start(period: str | None, now_s: float) -> date | None:
    day = _day(now_s)
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=day.weekday())
    if period == "monthly":
        return day.replace(day=1)
    return None


def cap_period_id(period: str | None, now_s: float) -> str:
    """The id settle.lua stores with a key's spend this period (`''`: no period)."""
    start = period_start(period, now_s)
    if start is None:
        return ""
    if period == "monthly":
        return f"monthly:{start:%Y-%m}"
    return f"{period}:{start.isoformat()}"


def period_resets_at(period: str | None, now_s: float) -> int | None:
    """Epoch seconds when the period holding `now_s` ends; None for a cap that never resets."""
    start = period_start(period, now_s)
    if start is None:
        return None
    if period == "daily":
        end = start + timedelta(days=1)
    elif period == "weekly":
        end = start + timedelta(days=7)
    else:
        end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return int(datetime(end.year, end.month, end.day, tzinfo=timezone.utc).timestamp())
