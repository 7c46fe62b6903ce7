"""Bursts released together from a barrier, through the HTTP API and both ingress replicas,
never spend more than an organization's credit or a key's spend cap (docs/accounts.md: one
admission holds at the organization's balance and the key's cap at once, so replicas admitting
side by side cannot overspend either), and the books agree to the micro-USD afterwards.

Every request is the same: the fake engine counts 5 prompt tokens (2 words + 3 for the message)
and writes exactly 40 (the `[[fake-tokens=40]]` marker, with max_tokens 40), so each one served
costs the same known amount, and a hold (the prompt estimate plus 40 tokens) is a bit more.
At 0.02 s per token, every request of a burst is still in flight when the last is admitted.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from threading import Barrier, Event, Thread
from typing import Any

import httpx
import pytest

from .test_metrics import REPORT_TIMEOUT_S, Series, scrape
from .test_revocation import QUIET_S, running_ingress_replicas

pytestmark = pytest.mark.integration

MODEL = "beta-chat"
PROMPT_TOKENS, OUTPUT_TOKENS = 5, 40
BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": f"burst [[fake-tokens={OUTPUT_TOKENS}]]"}],
    "max_tokens": OUTPUT_TOKENS,
}


def micros(usd: float) -> int:
    return round(usd * 1_000_000)


def burst(marketplace, keys: list[str], count: int) -> list[httpx.Response]:
    """`count` requests released together, each on its own connection; request i uses keys[i % len]."""
    barrier = Barrier(count)

    def one(index: int) -> httpx.Response:
        with httpx.Client(base_url=marketplace.base_url, timeout=60) as client:
            barrier.wait()
            return client.post("/v1/chat/completions", headers=marketplace.auth(keys[index % len(keys)]), json=BODY)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


@contextmanager
def watching(marketplace, org_id: str) -> Iterator[list[dict[str, Any]]]:
    """GET /admin/v1/orgs/{id} over and over while the block runs; yields the views seen."""
    samples: list[dict[str, Any]] = []
    done = Event()

    def poll() -> None:
        with httpx.Client(base_url=marketplace.base_url, timeout=30) as client:
            while not done.is_set():
                response = client.get(f"/admin/v1/orgs/{org_id}", headers=marketplace.admin_headers)
                samples.append(response.json() if response.status_code == 200 else {"failed": response.text})

    watcher = Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield samples
    finally:
        done.set()
        watcher.join(timeout=30)


def by_replica(series: Series) -> Counter[str]:
    """Requests for MODEL, whatever their answer, by the ingress replica that answered them."""
    counts: Counter[str] = Counter()
    for (name, labels), value in series.items():
        found = dict(labels)
        if name == "ray_tokenmart_requests_total" and found.get("model") == MODEL:
            counts[found["replica"]] += int(value)
    return counts


def settled_counts(marketplace) -> Counter[str]:
    """by_replica once the export has stopped moving, so requests of earlier tests that Ray
    exports late are not counted as this test's (replicas flush each second, Ray exports each second)."""
    last = [by_replica(scrape(marketplace))]

    def unchanged() -> tuple[Counter[str]] | None:  # a tuple: no requests yet is an (empty, falsy) answer too
        time.sleep(QUIET_S)
        now = by_replica(scrape(marketplace))
        if now == last[0]:
            return (now,)
        last[0] = now
        return None

    (counts,) = marketplace.wait_until(unchanged, REPORT_TIMEOUT_S, interval_s=0, what="the request counts to settle")
    return counts


def answered_by_replica(marketplace, before: Counter[str], count: int) -> Counter[str]:
    """Waits until Ray's metrics export shows `count` more requests for MODEL; which replica answered them."""

    def moved() -> Counter[str] | None:
        delta = by_replica(scrape(marketplace))
        delta.subtract(before)
        return +delta if delta.total() == count else None

    return marketplace.wait_until(moved, REPORT_TIMEOUT_S, interval_s=0.5, what=f"{count} requests exported")


def refusal(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["type"], error["code"]


def served_cost(marketplace, response: httpx.Response) -> int:
    """The micro-USD a 200 says it cost, after checking it is exactly its tokens at the list price."""
    usage = response.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, OUTPUT_TOKENS), usage
    assert micros(usage["cost"]) == marketplace.cost_micros(MODEL, PROMPT_TOKENS, OUTPUT_TOKENS), usage
    return micros(usage["cost"])


def admin_get(marketplace, path: str, **params: str) -> dict[str, Any]:
    response = marketplace.http.get(path, params=params, headers=marketplace.admin_headers)
    assert response.status_code == 200, response.text
    return response.json()


def assert_books_agree(marketplace, org_id: str, credit: int, costs: dict[str, int]) -> None:
    """Nothing on hold, spent == what the 200s said (per key too), the usage report and
    reconciliation agree. `costs`: key id -> the summed cost of its 200s."""
    spent = sum(costs.values())
    org = marketplace.org_info(org_id)
    assert (micros(org["credit_usd"]), micros(org["on_hold_usd"]), micros(org["spent_usd"])) == (
        credit - spent,
        0,
        spent,
    )
    assert micros(org["credited_usd"]) == credit
    usage = admin_get(marketplace, "/admin/v1/usage", org_id=org_id, group_by="key")
    assert micros(usage["total"]["cost_usd"]) == spent
    assert {row["key_id"]: micros(row["cost_usd"]) for row in usage["data"]} == {k: c for k, c in costs.items() if c}
    report = admin_get(marketplace, "/admin/v1/reconcile", org_id=org_id)
    assert (report["ok"], report["differences"]) == (True, []), report
    (summary,) = report["orgs"]
    assert (summary["in_flight"], micros(summary["ledger_cost_usd"]), micros(summary["spent_usd"])) == (0, spent, spent)


def test_a_burst_across_keys_and_replicas_never_spends_more_than_the_organization_has(marketplace):
    assert running_ingress_replicas() == 2, "the test needs two ingress replicas to mean anything"
    cost = marketplace.cost_micros(MODEL, PROMPT_TOKENS, OUTPUT_TOKENS)
    credit = 5 * cost  # each hold is a bit more than a request's cost: fewer than 5 fit at once
    org = marketplace.create_org("burst", credit / 1_000_000)
    keys = [marketplace.create_key(name=f"burst-{i}", credit_usd=0, org_id=org["id"]) for i in range(3)]
    before = settled_counts(marketplace)

    with watching(marketplace, org["id"]) as samples:
        responses = burst(marketplace, [k["key"] for k in keys], 30)

    served = [i for i, r in enumerate(responses) if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert [refusal(r) for r in refused] == [(402, "insufficient_quota", "insufficient_quota")] * len(refused)
    # The credit pays for 5 whole requests at most, so at least 25 of 30 are refused.
    assert 1 <= len(served) <= 5, [r.status_code for r in responses]
    costs = Counter({k["id"]: 0 for k in keys})
    for index in served:
        costs[keys[index % 3]["id"]] += served_cost(marketplace, responses[index])

    # Watched while the burst ran: holds were out, the balance never went below zero, and the
    # organization's figures always added up to its credit.
    assert any(micros(s.get("on_hold_usd", 0)) > 0 for s in samples), len(samples)
    for sample in samples:
        assert "failed" not in sample, sample
        assert sample["credit_usd"] >= 0, sample
        assert micros(sample["credit_usd"]) + micros(sample["on_hold_usd"]) + micros(sample["spent_usd"]) == credit
    assert_books_agree(marketplace, org["id"], credit, dict(costs))
    for key in keys:
        info = marketplace.key_info(key["key"])
        assert (micros(info["spent_usd"]), micros(info["on_hold_usd"])) == (costs[key["id"]], 0)
    assert len(answered_by_replica(marketplace, before, 30)) == 2


def test_a_burst_on_one_key_never_passes_its_daily_spend_cap(marketplace):
    assert running_ingress_replicas() == 2, "the test needs two ingress replicas to mean anything"
    cost = marketplace.cost_micros(MODEL, PROMPT_TOKENS, OUTPUT_TOKENS)
    cap, credit = 4 * cost, 1_000_000  # the organization could pay for thousands
    org = marketplace.create_org("capped-burst", credit / 1_000_000)
    capped = marketplace.create_key(
        name="capped", credit_usd=0, org_id=org["id"], spend_cap_usd=cap / 1_000_000, spend_cap_period="daily"
    )
    before = settled_counts(marketplace)

    responses = burst(marketplace, [capped["key"]], 20)

    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert [refusal(r) for r in refused] == [(402, "insufficient_quota", "spend_cap_reached")] * len(refused)
    assert 1 <= len(served) <= 4, [r.status_code for r in responses]
    spent = sum(served_cost(marketplace, r) for r in served)
    info = marketplace.key_info(capped["key"])
    now = datetime.now(timezone.utc)
    midnight = datetime(now.year, now.month, now.day, tzinfo=timezone.utc) + timedelta(days=1)
    assert (micros(info["spend_cap_usd"]), info["spend_cap_period"], info["period_resets_at"]) == (
        cap,
        "daily",
        int(midnight.timestamp()),
    )
    assert (micros(info["spent_this_period_usd"]), micros(info["spent_usd"]), micros(info["on_hold_usd"])) == (
        spent,
        spent,
        0,
    )
    assert spent <= cap
    assert_books_agree(marketplace, org["id"], credit, {capped["id"]: spent})
    assert len(answered_by_replica(marketplace, before, 20)) == 2

    # The cap is the key's: another key of the organization is still served.
    other = marketplace.create_key(name="uncapped", credit_usd=0, org_id=org["id"])
    reply = marketplace.chat(other["key"], model=MODEL, messages=BODY["messages"], max_tokens=OUTPUT_TOKENS)
    assert reply.status_code == 200, reply.text
