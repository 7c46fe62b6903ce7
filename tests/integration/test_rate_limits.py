"""Admission across two ingress replicas: exact limits, holds that never overspend, 429/402 shape."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from threading import Barrier

import httpx
import pytest

from tokenmart.deployments.tokens import MERGE_SLACK_TOKENS, TEMPLATE_TOKENS_FIXED, TEMPLATE_TOKENS_PER_MESSAGE

pytestmark = pytest.mark.integration

# 10 s of tokens at the fixture's 0.02 s per token: the held streams outlast every step
# that needs them running.
LONG_STREAM_TOKENS = 500
SETTLE_TIMEOUT_S = 15.0

RATE_HEADERS = {
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
}


def burst(marketplace, key: str, count: int, **body) -> list[httpx.Response]:
    """`count` requests released together from a barrier, each on its own connection."""
    barrier = Barrier(count)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=marketplace.base_url, timeout=60) as client:
            barrier.wait()
            return client.post(
                "/v1/chat/completions",
                headers=marketplace.auth(key),
                json={"model": "alpha-chat", "messages": [{"role": "user", "content": "hi"}], **body},
            )

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_exactly_rpm_requests_of_a_concurrent_burst_are_admitted(marketplace) -> None:
    key = marketplace.create_key(credit_usd=5, rpm=5)["key"]
    responses = burst(marketplace, key, 16, max_tokens=2)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 11
    for response in responses:
        assert set(response.headers) >= RATE_HEADERS, response.headers
        assert response.headers["x-ratelimit-limit-requests"] == "5"
    refused = next(r for r in responses if r.status_code == 429)
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    retry_ms = int(refused.headers["retry-after-ms"])
    assert 0 < retry_ms <= 12_000  # one request refills in 60 s / 5
    assert int(refused.headers["retry-after"]) == -(-retry_ms // 1000)


def test_a_request_larger_than_the_whole_tpm_is_never_retryable(marketplace) -> None:
    key = marketplace.create_key(credit_usd=5, tpm=100)["key"]
    response = marketplace.chat(key, max_tokens=500)
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "tokens"
    assert response.headers["x-should-retry"] == "false"


def test_tpm_is_counted_up_front_and_refunded_on_settle(marketplace) -> None:
    key = marketplace.create_key(credit_usd=5, tpm=1000)["key"]
    first = marketplace.chat(key, max_tokens=400)
    assert first.status_code == 200
    # Up front: prompt estimate + 400 were taken; after settlement the unused part is back.
    reserved_left = int(first.headers["x-ratelimit-remaining-tokens"])
    assert reserved_left <= 1000 - 400
    used = first.json()["usage"]["total_tokens"]
    second = marketplace.chat(key, max_tokens=2)
    assert second.status_code == 200
    # The fake listings have no tokenizer: the prompt is bounded by its bytes plus allowances.
    estimate = len("hello marketplace") + TEMPLATE_TOKENS_PER_MESSAGE + MERGE_SLACK_TOKENS + TEMPLATE_TOKENS_FIXED
    assert int(second.headers["x-ratelimit-remaining-tokens"]) >= 1000 - used - 2 - estimate


def test_concurrent_burst_never_spends_more_than_the_credit(marketplace) -> None:
    listing = marketplace.listing("alpha-chat")
    hold = listing.cost_micros(64, 16)  # generous: the estimate of a short prompt plus max_tokens
    credit_micros = hold * 3 + hold // 2
    credit = credit_micros / 1_000_000  # a JSON number with at most 6 decimals
    created = marketplace.create_key(credit_usd=credit, rpm=1000)
    responses = burst(marketplace, created["key"], 12, max_tokens=16)
    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert served and refused
    assert {r.status_code for r in refused} == {402}
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    spent = sum(round(r.json()["usage"]["cost"] * 1_000_000) for r in served)
    info = marketplace.key_info(created["key"])
    assert info["on_hold_usd"] == 0
    assert round(info["credit_usd"] * 1_000_000) == credit_micros - spent >= 0
    assert round(info["spent_usd"] * 1_000_000) == spent


def test_concurrency_limit_refuses_the_extra_streams(marketplace, redis_client) -> None:
    """Two streams held open take both slots of max_concurrency=2: every further request is
    refused, and both slots come back once the streams end, whether read to the end or hung up
    (a slot leaked by either ending fails the last step)."""
    created = marketplace.create_key(credit_usd=5, max_concurrency=2)
    key, inflight = created["key"], f"{{acct:{created['org_id']}}}:inflight:{created['id']}"
    ledger = f"{{acct:{created['org_id']}}}:ledger"
    long_stream = {
        "model": "alpha-chat",
        "messages": [{"role": "user", "content": f"hi [[fake-tokens={LONG_STREAM_TOKENS}]]"}],
        "max_tokens": LONG_STREAM_TOKENS,
        "stream": True,
    }
    with ExitStack() as held, httpx.Client(base_url=marketplace.base_url, timeout=60) as client:
        streams = [
            held.enter_context(
                client.stream("POST", "/v1/chat/completions", json=long_stream, headers=marketplace.auth(key))
            )
            for _ in range(2)
        ]
        assert [s.status_code for s in streams] == [200, 200]
        lines = [s.iter_lines() for s in streams]
        assert all(next(line).startswith("data: ") for line in lines)  # both are generating
        assert redis_client.zcard(inflight) == 2

        extra = burst(marketplace, key, 4, max_tokens=2, stream=True)
        assert [r.status_code for r in extra] == [429] * 4
        for response in extra:
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("requests", "concurrency_limit_exceeded")
            assert error["message"] == "Too many concurrent requests for this key (limit 2). Retry when one finishes."
            assert (response.headers["retry-after"], response.headers["retry-after-ms"]) == ("1", "1000")
        assert redis_client.zcard(inflight) == 2  # a refusal takes no slot

        # One stream is read to its end while the other is still running; then the other is hung up.
        rest = [line for line in lines[0] if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        streams[1].close()

    events = marketplace.wait_until(
        lambda: len(found := redis_client.xrange(ledger)) == 2 and found, SETTLE_TIMEOUT_S, what="both settlements"
    )
    statuses = {fields["status"]: int(fields["completion_tokens"]) for _, fields in events}
    assert sorted(statuses) == ["aborted", "completed"]
    assert statuses["completed"] == LONG_STREAM_TOKENS
    assert redis_client.zcard(inflight) == 0
    assert [r.status_code for r in burst(marketplace, key, 2, max_tokens=2, stream=True)] == [200, 200]


def test_a_key_over_its_requests_per_minute_is_refused_without_redis_until_it_may_retry(
    marketplace, redis_client
) -> None:
    """After Redis refused the key once on a replica, that replica repeats the 429 at its door
    with the time left, and asks Redis nothing: the scripts run once per replica at most."""
    key = marketplace.create_key(credit_usd=1, rpm=1)["key"]
    assert marketplace.chat(key, max_tokens=2).status_code == 200
    scripts_before = _evalsha_calls(redis_client)

    refused = [marketplace.chat(key, max_tokens=2) for _ in range(12)]

    assert [r.status_code for r in refused] == [429] * 12
    for response in refused:
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert f"Retry after {response.headers['retry-after-ms']} ms." in error["message"]
        assert set(response.headers) >= RATE_HEADERS
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    waits = [int(r.headers["retry-after-ms"]) for r in refused]
    assert all(0 < wait <= 60_000 for wait in waits)
    # Two ingress replicas: each asks Redis once (one admission script) before it remembers.
    assert _evalsha_calls(redis_client) - scripts_before <= 2
    assert marketplace.key_info(key)["on_hold_usd"] == 0


def _evalsha_calls(redis_client) -> int:
    return int(redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
