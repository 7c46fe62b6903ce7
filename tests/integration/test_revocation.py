"""A revoked key is refused by every ingress replica from the next request on (README, "Keys":
nothing is cached in the ingress)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from ray import serve

from .test_metrics import REPORT_TIMEOUT_S, Series, scrape

pytestmark = pytest.mark.integration

QUIET_S = 3.0
CHATS = 20  # per phase; each goes to either replica at random, so both see some (all on one: 2 in a million)


def running_ingress_replicas() -> int:
    deployment = serve.status().applications["tokenmart"].deployments["MarketplaceIngress"]
    states = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
    return states.get("RUNNING", 0)


def per_replica(series: Series, **labels: str) -> Counter[str]:
    """alpha-chat requests with these labels, by the ingress replica that answered them."""
    counts: Counter[str] = Counter()
    for (name, sample_labels), value in series.items():
        found = dict(sample_labels)
        if name == "ray_tokenmart_requests_total" and {"model": "alpha-chat", **labels}.items() <= found.items():
            counts[found["replica"]] += int(value)
    return counts


def quiet_scrape(market) -> Series:
    """The export once it has stopped moving, so requests of earlier tests that Ray exports late
    are not counted as this test's (each replica flushes every second, Ray exports every second)."""
    last: list[Series] = [scrape(market)]

    def unchanged() -> Series | None:
        time.sleep(QUIET_S)
        now = scrape(market)
        if now == last[0]:
            return now
        last[0] = now
        return None

    return market.wait_until(unchanged, REPORT_TIMEOUT_S, interval_s=0, what="the metrics export to stop moving")


def answered_by_replica(market, before: Series, count: int, **labels: str) -> Counter[str]:
    """Waits until Ray's metrics export shows `count` more such requests, and says which replica answered each."""

    def moved() -> Counter[str] | None:
        delta = per_replica(scrape(market), **labels)
        delta.subtract(per_replica(before, **labels))
        return delta if delta.total() == count else None

    return market.wait_until(moved, REPORT_TIMEOUT_S, interval_s=0.5, what=f"{count} requests {labels} exported")


def test_revoked_key_is_refused_by_every_replica_from_the_next_request(marketplace):
    assert running_ingress_replicas() == 2, "the test needs two ingress replicas to mean anything"
    created = marketplace.create_key(name="to-revoke", credit_usd=1)
    key = created["key"]
    # Use the key through both replicas first, so any per-replica cache would be warm.
    before = quiet_scrape(marketplace)
    for _ in range(CHATS):
        assert marketplace.http.get("/v1/key", headers=marketplace.auth(key)).status_code == 200
        reply = marketplace.chat(key, max_tokens=1)
        assert reply.status_code == 200, reply.text
    served = answered_by_replica(marketplace, before, CHATS, status="200", stream="false")
    assert len(+served) == 2, served

    revoke = marketplace.http.delete(f"/admin/v1/keys/{created['id']}", headers=marketplace.admin_headers)
    assert revoke.status_code == 200, revoke.text

    before = quiet_scrape(marketplace)
    outcomes = []
    for _ in range(CHATS):
        for response in (
            marketplace.http.get("/v1/key", headers=marketplace.auth(key)),
            marketplace.chat(key, max_tokens=1),
        ):
            outcomes.append((response.status_code, response.json()["error"]["code"] if response.is_error else ""))
    assert outcomes == [(401, "revoked_api_key")] * (2 * CHATS)
    refused = answered_by_replica(marketplace, before, CHATS, status="401", code="revoked_api_key")
    # Both replicas refused it, and not one request after the revoke was served (a replica
    # that cached the key, or the DELETE answering before Redis had it, would serve one).
    assert len(+refused) == 2, refused
