"""Usage reports: a key's (or every key's) totals over UTC days, by model or by day.

Settlement (`lua/settle.lua`) adds each request to per-key counters `"<day>|<model>|<metric>"`
in `{acct:<id>}:usage`; reports sum them, and reconciliation checks them against the ledger.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .errors import BillingUnavailable
from .schemas import UsageReport, UsageRow, micros_to_usd
from .scripts import account_key

METRICS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros")


async def usage_report(
    redis: aioredis.Redis, key_ids: list[str], start: date, end: date, group_by: Literal["model", "day"]
) -> UsageReport:
    """Totals over [start, end] (UTC days, inclusive), grouped by model or by day."""
    pipe = redis.pipeline(transaction=False)
    for key_id in key_ids:
        pipe.hgetall(account_key(key_id, "usage"))
    try:
        counters = await pipe.execute() if key_ids else []
    except RedisError as exc:
        raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc

    first, last = start.isoformat(), end.isoformat()
    groups: dict[str, dict[str, int]] = {}
    for raw in counters:
        for name, value in raw.items():
            day, model, metric = name.split("|", 2)
            if metric not in METRICS or not (first <= day <= last):
                continue
            group = groups.setdefault(model if group_by == "model" else day, dict.fromkeys(METRICS, 0))
            group[metric] += int(value)

    def row(label: str | None, totals: dict[str, int]) -> UsageRow:
        return UsageRow(
            model=label if group_by == "model" else None,
            date=label if group_by == "day" else None,
            requests=totals["requests"],
            prompt_tokens=totals["prompt_tokens"],
            completion_tokens=totals["completion_tokens"],
            total_tokens=totals["prompt_tokens"] + totals["completion_tokens"],
            cost_usd=micros_to_usd(totals["cost_micros"]),
        )

    overall = dict.fromkeys(METRICS, 0)
    for totals in groups.values():
        for metric in METRICS:
            overall[metric] += totals[metric]
    return UsageReport(
        key_id=key_ids[0] if len(key_ids) == 1 else None,
        start=first,
        end=last,
        group_by=group_by,
        data=[row(label, groups[label]) for label in sorted(groups)],
        total=row(None, overall).model_copy(update={"model": None, "date": None}),
    )
