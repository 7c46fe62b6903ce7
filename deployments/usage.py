"""Usage reports: totals over UTC days, grouped by model, day, key or organization.

Settlement (`lua/settle.lua`) adds each request to its organization's counters
`"<day>|<key>|<model>|<metric>"` in `{acct:<org>}:usage`; reports sum them, and
reconciliation checks them against the ledger.
"""

from __future__ import annotations

from datetime import date

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .errors import BillingUnavailable
from .schemas import UsageGroup, UsageReport, UsageRow, micros_to_usd
from .scripts import account_key

METRICS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros", "cached_tokens")


def counter_field(day: str, key_id: str, model: str, metric: str) -> str:
    return f"{day}|{key_id}|{model}|{metric}"


def parse_counter(name: str) -> tuple[str, str, str, str] | None:
    """(day, key, model, metric) of a counter name, or None for one that is not a usage counter
    (catalog ids cannot hold '|', so the name splits in four)."""
    parts = name.split("|")
    if len(parts) != 4 or parts[3] not in METRICS:
        return None
    day, key_id, model, metric = parts
    return day, key_id, model, metric


async def usage_report(
    redis: aioredis.Redis,
    org_ids: list[str],
    start: date,
    end: date,
    group_by: UsageGroup,
    *,
    key_id: str | None = None,
) -> UsageReport:
    """Totals over [start, end] (UTC days, inclusive) of the organizations (of one key of
    them, with `key_id`), grouped by model, day, key or organization."""
    pipe = redis.pipeline(transaction=False)
    for org_id in org_ids:
        pipe.hgetall(account_key(org_id, "usage"))
    try:
        counters = await pipe.execute() if org_ids else []
    except RedisError as exc:
        raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc

    first, last = start.isoformat(), end.isoformat()
    groups: dict[str, dict[str, int]] = {}
    for org_id, raw in zip(org_ids, counters, strict=True):
        for name, value in raw.items():
            parsed = parse_counter(name)
            if parsed is None:
                continue
            day, key, model, metric = parsed
            if not (first <= day <= last) or (key_id is not None and key != key_id):
                continue
            label = {"model": model, "day": day, "key": key, "org": org_id}[group_by]
            group = groups.setdefault(label, dict.fromkeys(METRICS, 0))
            group[metric] += int(value)

    def row(label: str | None, totals: dict[str, int]) -> UsageRow:
        return UsageRow(
            model=label if group_by == "model" else None,
            date=label if group_by == "day" else None,
            key_id=label if group_by == "key" else None,
            org_id=label if group_by == "org" else None,
            requests=totals["requests"],
            prompt_tokens=totals["prompt_tokens"],
            completion_tokens=totals["completion_tokens"],
            cached_tokens=totals["cached_tokens"],
            total_tokens=totals["prompt_tokens"] + totals["completion_tokens"],
            cost_usd=micros_to_usd(totals["cost_micros"]),
        )

    overall = dict.fromkeys(METRICS, 0)
    for totals in groups.values():
        for metric in METRICS:
            overall[metric] += totals[metric]
    return UsageReport(
        key_id=key_id,
        org_id=org_ids[0] if len(org_ids) == 1 else None,
        start=first,
        end=last,
        group_by=group_by,
        data=[row(label, groups[label]) for label in sorted(groups)],
        total=row(None, overall),
    )
