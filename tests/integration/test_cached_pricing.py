"""Prompt tokens the engine read from its prefix cache are billed at the listing's cached price
(issue 16, part 1: pricing). The fake engine reports them as vLLM does with prompt token
details on (`[[fake-cached=N]]`: up to N tokens of each prompt)."""

from __future__ import annotations

import json

import pytest

from ..helpers import sse_data

pytestmark = pytest.mark.integration


def expected_cost(marketplace, model: str, prompt: int, completion: int, cached: int) -> int:
    """The price math done here, independently: integer micro-USD per 1M tokens, rounded up once."""
    prices = marketplace.listing(model).pricing
    per_1m = {
        "prompt": int(prices.prompt_usd_per_1m * 1_000_000),
        "cached": int((prices.cached_prompt_usd_per_1m or prices.prompt_usd_per_1m) * 1_000_000),
        "completion": int(prices.completion_usd_per_1m * 1_000_000),
    }
    numerator = (prompt - cached) * per_1m["prompt"] + cached * per_1m["cached"] + completion * per_1m["completion"]
    return -(-numerator // 1_000_000)


def test_cached_prompt_tokens_cost_the_cached_price_in_the_answer_the_ledger_and_the_usage(marketplace, redis_client):
    created = marketplace.create_key(name="cached", credit_usd=1)
    key = created["key"]
    content = "a long shared system prompt, again [[fake-cached=6]]"
    answer = marketplace.chat(key, messages=[{"role": "user", "content": content}], max_tokens=8)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 6 < usage["prompt_tokens"]
    cost = expected_cost(marketplace, "alpha-chat", usage["prompt_tokens"], usage["completion_tokens"], 6)
    assert round(usage["cost"] * 1_000_000) == cost
    assert cost < expected_cost(marketplace, "alpha-chat", usage["prompt_tokens"], usage["completion_tokens"], 0)

    generation = marketplace.http.get(
        "/v1/generation", params={"id": answer.json()["id"]}, headers=marketplace.auth(key)
    ).json()
    assert (generation["cached_tokens"], round(generation["cost_usd"] * 1_000_000)) == (6, cost)

    # A stream: the final usage chunk carries the cached tokens and the same price rule.
    body = {
        "model": "alpha-chat",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with marketplace.http.stream("POST", "/v1/chat/completions", json=body, headers=marketplace.auth(key)) as stream:
        events = list(sse_data(stream))
    assert events[-1] == "[DONE]"
    streamed = json.loads(events[-2])["usage"]
    assert streamed["prompt_tokens_details"]["cached_tokens"] == 6
    streamed_cost = expected_cost(
        marketplace, "alpha-chat", streamed["prompt_tokens"], streamed["completion_tokens"], 6
    )
    assert round(streamed["cost"] * 1_000_000) == streamed_cost

    total = marketplace.usage(key)["total"]
    assert (total["requests"], total["cached_tokens"]) == (2, 12)
    account = marketplace.key_info(key)
    assert (account["prompt_tokens"], account["cached_tokens"], account["completion_tokens"]) == (
        usage["prompt_tokens"] + streamed["prompt_tokens"],
        12,
        usage["completion_tokens"] + streamed["completion_tokens"],
    )
    assert round(total["cost_usd"] * 1_000_000) == cost + streamed_cost
    ledger = [event for _, event in redis_client.xrange(f"{{acct:{created['org_id']}}}:ledger")]
    assert [int(event["cached_tokens"]) for event in ledger] == [6, 6]
    assert [int(event["cost_micros"]) for event in ledger] == [cost, streamed_cost]
    report = marketplace.http.get(
        "/admin/v1/reconcile", params={"org_id": created["org_id"]}, headers=marketplace.admin_headers
    ).json()
    assert report["ok"], report["differences"]


def test_a_listing_without_a_cached_price_charges_cached_tokens_the_prompt_price(marketplace):
    key = marketplace.create_key(name="uncached-price", credit_usd=1)["key"]
    answer = marketplace.chat(
        key, model="beta-chat", messages=[{"role": "user", "content": "hello [[fake-cached=4]]"}], max_tokens=3
    )
    usage = answer.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 4
    plain = marketplace.cost_micros("beta-chat", usage["prompt_tokens"], usage["completion_tokens"])
    assert round(usage["cost"] * 1_000_000) == plain
