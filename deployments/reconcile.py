"""Reconciliation: the ledger, the usage counters and the balances must tell one story.

Settlement writes all of them in one Lua call, so any difference means something went wrong
(a hand edit, a restore from an old snapshot, a bug). For each organization, read in one
MULTI/EXEC so settlements cannot land between the reads, this checks:
  ledger_vs_counters     every "<day>|<key>|<model>|<metric>" counter equals the ledger's sum
                         (the events trimmed away count through the ledger's checkpoint)
  ledger_vs_spent        the organization's spent_micros equals the ledger's total cost
  credit_balance         balance + hold + spent equals every credit ever granted
  holds                  the organization's hold_micros equals the sum of its requests' holds
  key_spent              each key's spent_micros equals the ledger's cost for that key
  key_holds              each key's hold_micros equals the holds of its requests in flight
  hold_exceeded          no request cost more than it held: each `hold_exceeded` ledger event
                         (the charge was capped so the balance stays >= 0) is reported, with
                         the cost it had (expected) and what was charged (actual); those trimmed
                         into the checkpoint are reported together, by what they left uncharged
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from .keystore import key_key, org_key
from .ledger import checkpoint_totals
from .schemas import Discrepancy, OrgReconciliation, ReconciliationReport, micros_to_usd
from .scripts import account_key
from .usage import METRICS, counter_field, parse_counter

HOLD_EXCEEDED = "hold_exceeded"


def usage_events(events: list[tuple[str, dict[str, str]]]) -> list[tuple[str, dict[str, str]]]:
    """The ledger's settlements (one per request), without the operator notices beside them."""
    return [(entry_id, event) for entry_id, event in events if "event" not in event]


def ledger_totals(events: list[tuple[str, dict[str, str]]]) -> Counter[str]:
    """The counters the ledger implies: "<day>|<key>|<model>|<metric>" -> total."""
    totals: Counter[str] = Counter()
    for _, event in usage_events(events):
        totals[counter_field(event["day"], event["key_id"], event["model"], "requests")] += 1
        for metric in METRICS[1:]:
            # Events migrated from before cached-token pricing have no cached_tokens: none.
            totals[counter_field(event["day"], event["key_id"], event["model"], metric)] += int(event.get(metric) or 0)
    return totals


def _key_costs(counters: Counter[str]) -> Counter[str]:
    costs: Counter[str] = Counter()
    for name, value in counters.items():
        parsed = parse_counter(name)
        if parsed is not None and parsed[3] == "cost_micros":
            costs[parsed[1]] += value
    return costs


def reconcile_org(
    org_id: str,
    org: dict[str, str],
    keys: dict[str, dict[str, str]],
    inflight: dict[str, list[str]],
    events: list[Any],
    counters: dict[str, str],
    holds: dict[str, str],
    checkpoint: dict[str, str],
) -> tuple[OrgReconciliation, list[Discrepancy]]:
    """(OrgReconciliation, differences) for one organization's snapshot."""
    differences: list[Discrepancy] = []

    def check(name: Any, field: str, expected: int, actual: int, key_id: str | None = None) -> None:
        if expected != actual:
            differences.append(
                Discrepancy(org_id=org_id, key_id=key_id, check=name, field=field, expected=expected, actual=actual)
            )

    trimmed, trimmed_events, trimmed_cost = checkpoint_totals(checkpoint)
    implied = ledger_totals(events) + trimmed
    stored = Counter({name: int(value) for name, value in counters.items()})
    for field in sorted(set(implied) | set(stored)):
        check("ledger_vs_counters", field, implied[field], stored[field])

    balance, hold = int(org.get("balance_micros") or 0), int(org.get("hold_micros") or 0)
    spent, credited = int(org.get("spent_micros") or 0), int(org.get("credited_micros") or 0)
    settlements = usage_events(events)
    ledger_cost = sum(int(event["cost_micros"]) for _, event in settlements) + trimmed_cost
    check("ledger_vs_spent", "spent_micros", ledger_cost, spent)
    check("credit_balance", "balance_micros + hold_micros + spent_micros", credited, balance + hold + spent)
    check("holds", "hold_micros", sum(int(v) for v in holds.values()), hold)

    key_costs = _key_costs(implied)
    for key_id, record in sorted(keys.items()):
        check("key_spent", "spent_micros", key_costs[key_id], int(record.get("spent_micros") or 0), key_id)
        key_holds = sum(int(holds.get(billing_id, 0)) for billing_id in inflight.get(key_id, []))
        check("key_holds", "hold_micros", key_holds, int(record.get("hold_micros") or 0), key_id)
    trimmed_notices = int(checkpoint.get(f"{HOLD_EXCEEDED}_events") or 0)
    if trimmed_notices:
        # Trimmed by retention, so no longer one by one: what they left uncharged, together.
        uncharged = int(checkpoint.get("uncharged_micros") or 0)
        check(HOLD_EXCEEDED, f"{trimmed_notices} request(s) in the ledger's checkpoint: uncharged_micros", 0, uncharged)
    for _, event in events:
        if event.get("event") == HOLD_EXCEEDED:
            check(
                HOLD_EXCEEDED,
                f"request {event['request_id']} ({event['model']})",
                int(event["cost_micros"]),
                int(event["charged_micros"]),
                event.get("key_id"),
            )

    summary = OrgReconciliation(
        org_id=org_id,
        name=org.get("name", ""),
        keys=len(keys),
        events=len(settlements) + trimmed_events,
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


async def reconcile(redis: aioredis.Redis, org_keys: dict[str, list[str]]) -> ReconciliationReport:
    """Check each organization (id -> its key ids)."""
    summaries: list[OrgReconciliation] = []
    differences: list[Discrepancy] = []
    for org_id, key_ids in sorted(org_keys.items()):
        key_ids = sorted(key_ids)
        pipe = redis.pipeline(transaction=True)
        pipe.hgetall(org_key(org_id))
        pipe.xrange(account_key(org_id, "ledger"))
        pipe.hgetall(account_key(org_id, "usage"))
        pipe.hgetall(account_key(org_id, "holds"))
        pipe.hgetall(account_key(org_id, "ledger_checkpoint"))
        for key_id in key_ids:
            pipe.hgetall(key_key(org_id, key_id))
            pipe.zrange(account_key(org_id, f"inflight:{key_id}"), 0, -1)
        org, events, counters, holds, checkpoint, *per_key = await pipe.execute()
        if not org:
            continue
        records = {k: per_key[2 * i] for i, k in enumerate(key_ids) if per_key[2 * i]}
        inflight = {k: per_key[2 * i + 1] for i, k in enumerate(key_ids)}
        summary, found = reconcile_org(org_id, org, records, inflight, events, counters, holds, checkpoint)
        summaries.append(summary)
        differences += found
    return ReconciliationReport(ok=not differences, orgs=summaries, differences=differences)
