"""Reconciliation: the ledger stream, the usage counters and the balances must tell one story.

Settlement writes all three in one Lua call, so any difference means something went wrong
(a hand edit, a restore from an old snapshot, a bug). For each key, read in one MULTI/EXEC
so settlements cannot land between the reads, this checks:
  ledger_vs_counters     every "<day>|<model>|<metric>" counter equals the ledger's sum
  ledger_vs_spent        spent_micros equals the ledger's total cost
  credit_balance         balance + hold + spent equals every credit ever granted
  holds                  hold_micros equals the sum of the in-flight requests' holds
  hold_exceeded          no request cost more than it held: each `hold_exceeded` ledger event
                         (the charge was capped so the balance stays >= 0) is reported, with
                         the cost it had (expected) and what was charged (actual)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from .schemas import Discrepancy, KeyReconciliation, ReconciliationReport, micros_to_usd
from .scripts import account_key
from .usage import METRICS

HOLD_EXCEEDED = "hold_exceeded"


def usage_events(events: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    """The ledger's settlements (one per request), without the operator notices beside them."""
    return [(entry_id, event) for entry_id, event in events if "event" not in event]


def ledger_totals(events: list[tuple[str, dict[str, str]]]) -> Counter[str]:
    """The counters the ledger implies: "<day>|<model>|<metric>" -> total."""
    totals: Counter[str] = Counter()
    for _, event in usage_events(events):
        group = f"{event['day']}|{event['model']}|"
        totals[group + "requests"] += 1
        for metric in METRICS[1:]:
            totals[group + metric] += int(event[metric])
    return totals


def reconcile_key(
    key_id: str, record: dict[str, str], events: list[Any], counters: dict[str, str], holds: dict[str, str]
) -> tuple[KeyReconciliation, list[Discrepancy]]:
    """(KeyReconciliation, differences) for one key's snapshot."""
    differences: list[Discrepancy] = []

    def check(name: str, field: str, expected: int, actual: int) -> None:
        if expected != actual:
            differences.append(Discrepancy(key_id=key_id, check=name, field=field, expected=expected, actual=actual))

    implied = ledger_totals(events)
    stored = Counter({name: int(value) for name, value in counters.items()})
    for field in sorted(set(implied) | set(stored)):
        check("ledger_vs_counters", field, implied[field], stored[field])

    balance, hold = int(record.get("balance_micros") or 0), int(record.get("hold_micros") or 0)
    spent, credited = int(record.get("spent_micros") or 0), int(record.get("credited_micros") or 0)
    settlements = usage_events(events)
    ledger_cost = sum(int(event["cost_micros"]) for _, event in settlements)
    check("ledger_vs_spent", "spent_micros", ledger_cost, spent)
    check("credit_balance", "balance_micros + hold_micros + spent_micros", credited, balance + hold + spent)
    check("holds", "hold_micros", sum(int(v) for v in holds.values()), hold)
    for _, event in events:
        if event.get("event") == HOLD_EXCEEDED:
            check(
                HOLD_EXCEEDED,
                f"request {event['request_id']} ({event['model']})",
                int(event["cost_micros"]),
                int(event["charged_micros"]),
            )

    summary = KeyReconciliation(
        key_id=key_id,
        name=record.get("name", ""),
        events=len(settlements),
        ledger_cost_usd=micros_to_usd(ledger_cost),
        counters_cost_usd=micros_to_usd(sum(v for k, v in stored.items() if k.endswith("|cost_micros"))),
        spent_usd=micros_to_usd(spent),
        credited_usd=micros_to_usd(credited),
        balance_usd=micros_to_usd(balance),
        on_hold_usd=micros_to_usd(hold),
        in_flight=len(holds),
        ok=not differences,
    )
    return summary, differences


async def reconcile(redis: aioredis.Redis, key_ids: list[str]) -> ReconciliationReport:
    summaries: list[KeyReconciliation] = []
    differences: list[Discrepancy] = []
    for key_id in key_ids:
        pipe = redis.pipeline(transaction=True)
        pipe.hgetall(account_key(key_id, "key"))
        pipe.xrange(account_key(key_id, "ledger"))
        pipe.hgetall(account_key(key_id, "usage"))
        pipe.hgetall(account_key(key_id, "holds"))
        record, events, counters, holds = await pipe.execute()
        if not record:
            continue
        summary, found = reconcile_key(key_id, record, events, counters, holds)
        summaries.append(summary)
        differences += found
    return ReconciliationReport(ok=not differences, keys=summaries, differences=differences)
