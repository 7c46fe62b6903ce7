"""Fallbacks across listings: `tiny-chat` (one request at a time, one waiting, a 64-token
context) names `beta-chat` as its fallback in the catalog; a request may name its own with
`models` (OpenRouter's field). Whoever serves, the request is held once at the dearest
candidate, settled once at the price of the listing that served, and says which one did."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tokenmart.deployments.catalog import TOKENS_PER_PRICE_UNIT

pytestmark = pytest.mark.integration

SERVED_BY = "x-tokenmart-served-by"


def cost_at(marketplace, model: str, usage: dict) -> int:
    return marketplace.cost_micros(model, usage["prompt_tokens"], usage["completion_tokens"])


def ledger(redis_client, org_id: str) -> list[dict]:
    return [event for _, event in redis_client.xrange(f"{{acct:{org_id}}}:ledger") if "event" not in event]


def test_an_overloaded_listing_passes_requests_to_its_fallback_at_the_fallback_price(marketplace, redis_client):
    created = marketplace.create_key(name="flood", credit_usd=1)
    key = created["key"]

    def one(turn: int):
        return marketplace.chat(
            key, model="tiny-chat", messages=[{"role": "user", "content": f"flood {turn} [[fake-tokens=12]]"}],
            max_tokens=12,
        )  # fmt: skip

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))

    assert [answer.status_code for answer in answers] == [200] * 8, [a.text for a in answers]
    served = [answer.headers[SERVED_BY] for answer in answers]
    assert {"tiny-chat", "beta-chat"} == set(served), served
    costs = []
    for answer, model in zip(answers, served, strict=True):
        body = answer.json()
        assert body["model"] == model  # the listing that served, not the one asked for
        cost = cost_at(marketplace, model, body["usage"])
        assert round(body["usage"]["cost"] * 1_000_000) == cost
        costs.append(cost)

    # One ledger event per request, at the listing that served, held at the dearest candidate.
    events = ledger(redis_client, created["org_id"])
    assert sorted(event["model"] for event in events) == sorted(served)
    assert sorted(int(event["cost_micros"]) for event in events) == sorted(costs)
    beta = marketplace.listing("beta-chat")
    for event in events:
        prompt = int(event["reserved_tokens"]) - 12
        assert (
            int(event["hold_micros"])
            == beta.hold_micros(prompt, 12)
            > marketplace.listing("tiny-chat").hold_micros(prompt, 12)
        )
    account = marketplace.key_info(key)
    assert round(account["spent_usd"] * 1_000_000) == sum(costs)
    assert account["on_hold_usd"] == 0
    report = marketplace.http.get(
        "/admin/v1/reconcile", params={"org_id": created["org_id"]}, headers=marketplace.admin_headers
    ).json()
    assert report["ok"], report["differences"]


def test_a_prompt_longer_than_the_context_is_served_by_the_fallback(marketplace):
    key = marketplace.create_key(name="long-prompt", credit_usd=1)["key"]
    long_prompt = " ".join(f"word{i}" for i in range(60))  # 63 prompt tokens + 10 > 64
    messages = [{"role": "user", "content": long_prompt}]
    answer = marketplace.chat(key, model="tiny-chat", messages=messages, max_tokens=10)
    assert answer.status_code == 200, answer.text
    assert (answer.headers[SERVED_BY], answer.json()["model"]) == ("beta-chat", "beta-chat")
    usage = answer.json()["usage"]
    assert round(usage["cost"] * 1_000_000) == cost_at(marketplace, "beta-chat", usage)

    # Naming only tiny-chat in `models` replaces the catalog's fallbacks: nothing else may serve.
    alone = marketplace.chat(
        key, model="tiny-chat", models=["tiny-chat"], messages=[{"role": "user", "content": long_prompt}], max_tokens=10
    )
    assert alone.status_code == 400, alone.text
    error = alone.json()["error"]
    assert (error["code"], error["type"]) == ("context_length_exceeded", "invalid_request_error")
    assert "maximum context length is 64 tokens" in error["message"]
    assert marketplace.key_info(key)["on_hold_usd"] == 0


def test_the_models_field_names_fallbacks_and_the_keys_allow_list_applies_to_each(marketplace):
    alpha_only = marketplace.create_key(name="alpha-only", credit_usd=1, models=["alpha-chat"])["key"]
    # beta-chat is not allowed for this key, so alpha-chat (its `models` fallback) serves.
    answer = marketplace.chat(alpha_only, model="beta-chat", models=["alpha-chat"], max_tokens=3)
    assert answer.status_code == 200, answer.text
    assert (answer.headers[SERVED_BY], answer.json()["model"]) == ("alpha-chat", "alpha-chat")
    usage = answer.json()["usage"]
    assert round(usage["cost"] * 1_000_000) == cost_at(marketplace, "alpha-chat", usage)

    # No candidate allowed: 403, nothing held.
    prefix_only = marketplace.create_key(name="prefix-only", credit_usd=1, models=["prefix-chat"])["key"]
    refused = marketplace.chat(prefix_only, model="tiny-chat", max_tokens=3)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert marketplace.key_info(prefix_only)["on_hold_usd"] == 0

    # `models` alone picks the first as the model; an unknown one is the client's mistake.
    first = marketplace.chat(alpha_only, model=None, models=["alpha-chat"], max_tokens=2)
    assert (first.status_code, first.headers[SERVED_BY]) == (200, "alpha-chat")
    unknown = marketplace.chat(alpha_only, model="alpha-chat", models=["no-such-model"], max_tokens=2)
    assert unknown.status_code == 404, unknown.text
    assert (unknown.json()["error"]["param"], unknown.json()["error"]["code"]) == ("models", "model_not_found")


def test_the_openai_sdk_sends_models_in_extra_body_and_streams_from_the_fallback(marketplace):
    from openai import OpenAI

    key = marketplace.create_key(name="sdk-fallback", credit_usd=1)["key"]
    long_prompt = " ".join(f"token{i}" for i in range(70))
    with OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": long_prompt}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"models": ["alpha-chat"]},
        )
        assert raw.headers[SERVED_BY] == "alpha-chat"
        chunks = list(raw.parse())
    assert {chunk.model for chunk in chunks} == {"alpha-chat"}
    usage = chunks[-1].usage
    assert usage.completion_tokens == 4
    expected = -(
        -(usage.prompt_tokens * 150_000 + usage.completion_tokens * 600_000) // TOKENS_PER_PRICE_UNIT
    )  # alpha-chat's prices, 0.15 and 0.6 per 1M
    assert round(usage.cost * 1_000_000) == expected
