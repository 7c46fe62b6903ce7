"""Billing exact under every request shape: n choices, prompt lists, holds that bound the cost.

The fake engine reports usage on stream chunks exactly as vLLM does with continuous usage
stats: each chunk counts its own choice's tokens and its own prompt's tokens, not the totals.
A stream cut short has no final usage chunk, so the ingress must sum over every choice and
every prompt; billing the last chunk's usage gave (n-1)/n of the output away for free.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from decimal import Decimal

import httpx
import pytest

from tokenmart.deployments.billing import LEASE_MS
from tokenmart.deployments.catalog import Listing
from tokenmart.deployments.keystore import account_key
from tokenmart.deployments.reconcile import reconcile
from tokenmart.deployments.schemas import CreateKeyRequest

from ..helpers import sse_data
from .test_keystore import BETA, run

pytestmark = pytest.mark.integration

SETTLE_TIMEOUT_S = 15.0
LONG = "[[fake-tokens=400]]"  # the fake engine streams 400 tokens per choice for this prompt


def read_then_hang_up(marketplace, key: str, path: str, payload: dict, chunks_to_read: int) -> list[dict]:
    """Open a stream, read some chunks, and close the connection."""
    chunks: list[dict] = []
    with (
        httpx.Client(base_url=marketplace.base_url, timeout=30.0) as client,
        client.stream("POST", path, json=payload, headers=marketplace.auth(key)) as response,
    ):
        assert response.status_code == 200, response.read()
        for event in sse_data(response):
            chunks.append(json.loads(event))
            if len(chunks) == chunks_to_read:
                break
    return chunks


def settled(marketplace, redis_client, key_id: str) -> dict[str, str]:
    ledger = account_key(redis_client.hget("tm:key_orgs", key_id), "ledger")  # the key's own organization
    ((_, event),) = marketplace.wait_until(lambda: redis_client.xrange(ledger), SETTLE_TIMEOUT_S, what="settlement")
    return event


def assert_books_balance(marketplace, key: str, event: dict[str, str], credit_micros: int) -> None:
    info = marketplace.key_info(key)
    assert info["on_hold_usd"] == 0.0
    assert round(info["credit_usd"] * 1_000_000) == credit_micros - int(event["cost_micros"])


def test_an_aborted_stream_with_n_choices_bills_every_choice(marketplace, redis_client):
    created = marketplace.create_key(name="n-choices", credit_usd=1)
    payload = {
        "model": "beta-chat",
        "messages": [{"role": "user", "content": f"count {LONG}"}],  # 2 words + 3 = 5 prompt tokens
        "stream": True,
        "n": 4,
        "max_tokens": 400,
    }
    chunks = read_then_hang_up(marketplace, created["key"], "/v1/chat/completions", payload, chunks_to_read=80)
    received = Counter(chunk["choices"][0]["index"] for chunk in chunks)
    assert set(received) == {0, 1, 2, 3} and sum(received.values()) == 80

    event = settled(marketplace, redis_client, created["id"])
    assert event["status"] == "aborted"
    assert int(event["prompt_tokens"]) == 5  # one prompt, counted once
    completion = int(event["completion_tokens"])
    # Every token any choice sent is paid for (the last chunk alone covers one choice: ~20).
    assert 80 <= completion < 4 * 400, event
    assert int(event["cost_micros"]) == marketplace.cost_micros("beta-chat", 5, completion)
    assert_books_balance(marketplace, created["key"], event, 1_000_000)


def test_an_aborted_completion_with_several_prompts_bills_every_prompt(marketplace, redis_client):
    created = marketplace.create_key(name="prompt-list", credit_usd=1)
    prompts = [f"one {LONG}", f"one two {LONG}", f"one two three {LONG}", f"one two three four {LONG}"]
    payload = {"model": "beta-chat", "prompt": prompts, "stream": True, "max_tokens": 400}
    chunks = read_then_hang_up(marketplace, created["key"], "/v1/completions", payload, chunks_to_read=40)
    assert {chunk["choices"][0]["index"] for chunk in chunks} == {0, 1, 2, 3}

    event = settled(marketplace, redis_client, created["id"])
    assert event["status"] == "aborted"
    # Each prompt's own words (the fake engine's count): 2 + 3 + 4 + 5, not the last chunk's prompt.
    assert int(event["prompt_tokens"]) == 14
    assert 40 <= int(event["completion_tokens"]) < 4 * 400, event
    assert_books_balance(marketplace, created["key"], event, 1_000_000)


@pytest.mark.parametrize(
    ("path", "body", "prompt_tokens", "completion_tokens"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}], "n": 3}, 5, 3 * 6),
        ("/v1/completions", {"prompt": ["a", "b c", "d e f"], "n": 2}, 6, 3 * 2 * 6),
    ],
    ids=["chat_n3", "completions_3_prompts_n2"],
)
def test_completed_streams_bill_the_engine_totals(
    marketplace, redis_client, path, body, prompt_tokens, completion_tokens
):
    created = marketplace.create_key(name="complete", credit_usd=1)
    payload = {"model": "beta-chat", "stream": True, "max_tokens": 6, "stream_options": {"include_usage": True}, **body}
    response = marketplace.http.post(path, json=payload, headers=marketplace.auth(created["key"]))
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    usage = events[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, completion_tokens)

    event = settled(marketplace, redis_client, created["id"])
    assert (event["status"], int(event["prompt_tokens"]), int(event["completion_tokens"])) == (
        "completed",
        prompt_tokens,
        completion_tokens,
    )
    assert round(usage["cost"] * 1_000_000) == int(event["cost_micros"])
    assert_books_balance(marketplace, created["key"], event, 1_000_000)


def test_tokens_per_minute_get_back_only_what_was_not_produced(marketplace, redis_client):
    tpm = 6_000  # refills 0.1 token per ms
    created = marketplace.create_key(name="tpm-refund", credit_usd=1, tpm=tpm)
    payload = {
        "model": "beta-chat",
        "messages": [{"role": "user", "content": f"count {LONG}"}],
        "stream": True,
        "n": 4,
        "max_tokens": 400,
    }
    started = time.monotonic()
    read_then_hang_up(marketplace, created["key"], "/v1/chat/completions", payload, chunks_to_read=80)
    event = settled(marketplace, redis_client, created["id"])
    billed = int(event["prompt_tokens"]) + int(event["completion_tokens"])
    response = marketplace.http.get("/v1/key", headers=marketplace.auth(created["key"]))
    refill = int((time.monotonic() - started) * 1000 * tpm / 60_000) + 1
    remaining = int(response.headers["x-ratelimit-remaining-tokens"])
    # The reservation (5 + 4 x 400) came back except what the stream produced.
    assert tpm - billed <= remaining <= tpm - billed + refill, (remaining, billed, refill)


def test_requests_beyond_the_per_request_output_bound_are_refused_before_the_engine(marketplace):
    created = marketplace.create_key(name="reach", credit_usd=1)
    # 8 prompts x n=16 x 2000 = 256,000 output tokens, over the built-in default of 131,072.
    body = {"model": "alpha-chat", "prompt": ["p"] * 8, "n": 16, "max_tokens": 2000}
    response = marketplace.http.post("/v1/completions", json=body, headers=marketplace.auth(created["key"]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", "max_tokens")
    assert "256000" in error["message"] and "131072" in error["message"]
    info = marketplace.key_info(created["key"])
    assert (info["credit_usd"], info["on_hold_usd"]) == (1.0, 0.0)
    assert marketplace.usage(created["key"])["total"]["requests"] == 0

    # A key's own bound is tighter: 2 choices x 30 tokens = 60 > 50.
    strict = marketplace.create_key(name="reach-strict", credit_usd=1, max_tokens_per_request=50)
    refused = marketplace.chat(strict["key"], n=2, max_tokens=30)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "max_tokens")
    assert marketplace.chat(strict["key"], n=2, max_tokens=25).status_code == 200


def _cost_above_the_hold(redis_url: str, *, lease_lapsed: bool):
    """Admit with a prompt estimate below what the engine then reports, and settle."""

    async def scenario(keys, meter):
        record, _ = await keys.create(CreateKeyRequest(name="under-held", credit_usd=Decimal("0.001")))
        admission = await meter.admit(record.key_hash, BETA, 10, 10)
        if lease_lapsed:
            # Another admission after the lease: the lapsed hold goes back to the balance first.
            await meter.admit(record.key_hash, BETA, 1, 1, now_ms=int(time.time() * 1000) + LEASE_MS + 1)
        settlement = await meter.settle(admission, 500, 10, "completed")
        return record.org_id, admission, settlement, await reconcile(meter.redis, {record.org_id: [record.id]})

    return run(redis_url, scenario)


def test_a_cost_above_its_hold_charges_the_hold_and_the_operator_sees_it(redis_server, redis_client):
    org_id, admission, settlement, report = _cost_above_the_hold(redis_server.url, lease_lapsed=False)
    listing: Listing = BETA
    full_cost = listing.cost_micros(500, 10)
    assert admission.hold_micros == listing.cost_micros(10, 10) < full_cost
    assert (settlement.cost_micros, settlement.uncharged_micros) == (
        admission.hold_micros,
        full_cost - admission.hold_micros,
    )
    org = redis_client.hgetall(account_key(org_id, "org"))
    assert int(org["balance_micros"]) == 1_000 - admission.hold_micros >= 0
    events = [event for _, event in redis_client.xrange(account_key(org_id, "ledger"))]
    assert [e.get("event", "settlement") for e in events] == ["settlement", "hold_exceeded"]
    assert int(events[0]["cost_micros"]) == admission.hold_micros
    assert (int(events[1]["cost_micros"]), int(events[1]["charged_micros"]), int(events[1]["uncharged_micros"])) == (
        full_cost,
        admission.hold_micros,
        full_cost - admission.hold_micros,
    )
    # The books balance, but reconcile reports the request that cost more than it held.
    assert not report.ok
    assert [(d.check, d.expected, d.actual) for d in report.differences] == [
        ("hold_exceeded", full_cost, admission.hold_micros)
    ]
    assert report.orgs[0].events == 1


def test_a_late_settlement_after_its_lease_never_takes_the_balance_below_zero(redis_server, redis_client):
    org_id, _, settlement, report = _cost_above_the_hold(redis_server.url, lease_lapsed=True)
    org = redis_client.hgetall(account_key(org_id, "org"))
    balance, hold = int(org["balance_micros"]), int(org["hold_micros"])
    assert balance >= 0
    # The second admission's hold is still out; everything else the balance had was charged.
    assert settlement.cost_micros == 1_000 - hold - balance
    assert settlement.uncharged_micros == BETA.cost_micros(500, 10) - settlement.cost_micros > 0
    assert [d.check for d in report.differences] == ["hold_exceeded"]
