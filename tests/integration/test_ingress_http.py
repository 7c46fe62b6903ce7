"""The public HTTP contract through Ray Serve, on the deterministic fake engine.

The fake engine counts prompt tokens as words + 3 per message and answers
min(max_tokens, 16) completion tokens, so every usage number and price here is exact.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import openai
import pytest

from tokenmart.deployments import auth

from ..helpers import sse_data

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "tell me about ray serve"}]  # 5 words + 3 = 8 prompt tokens
PROMPT_TOKENS = 8
CHAT_PATHS = ["/v1/chat/completions", "/api/v1/chat/completions", "/v1/inference/chat/completions"]
COMPLETION_PATHS = ["/v1/completions", "/api/v1/completions", "/v1/inference/completions"]
PREFIXES = ["/v1", "/api/v1", "/v1/inference"]


def micros(usd: float) -> int:
    return round(usd * 1_000_000)


def assert_error(
    response: httpx.Response, status: int, code: str | None, *, param: Any = ..., error_type: str | None = None
) -> dict[str, Any]:
    """The one error envelope: exactly message/type/param/code, with the expected status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    if error_type is not None:
        assert error["type"] == error_type, error
    return error


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    return list(sse_data(response))


def stream_chat(market, key: str, model: str = "alpha-chat", **body: Any) -> list[str]:
    payload = {"model": model, "messages": MESSAGES, "stream": True, **body}
    with market.http.stream("POST", "/v1/chat/completions", json=payload, headers=market.auth(key)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response)


@pytest.fixture
def key(marketplace) -> dict[str, Any]:
    return marketplace.create_key(name="http-tests", credit_usd=1)


# -- inference endpoints -------------------------------------------------------------


@pytest.mark.parametrize("path", CHAT_PATHS)
def test_every_chat_path_answers_with_usage_and_the_listing_price(marketplace, key, path):
    response = marketplace.chat(key["key"], path=path, messages=MESSAGES, max_tokens=5)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "alpha-chat"
    assert body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", " w0 w1 w2 w3 w4")
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (PROMPT_TOKENS, 5, 13)
    # 8 * 0.15 + 5 * 0.6 = 4.2 micro-USD, charged as 5
    assert marketplace.cost_micros("alpha-chat", PROMPT_TOKENS, 5) == 5
    assert usage["cost"] == 0.000005
    assert micros(marketplace.key_info(key["key"])["credit_usd"]) == 1_000_000 - 5


@pytest.mark.parametrize("path", COMPLETION_PATHS)
def test_every_completions_path_answers_with_usage_and_cost(marketplace, key, path):
    response = marketplace.http.post(
        path,
        json={"model": "beta-chat", "prompt": "one two three four", "max_tokens": 3},
        headers=marketplace.auth(key["key"]),
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["model"]) == ("text_completion", "beta-chat")
    assert body["choices"][0]["text"] == " w0 w1 w2"
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (4, 3, 7)
    assert micros(usage["cost"]) == marketplace.cost_micros("beta-chat", 4, 3) == 40


def test_request_is_routed_to_the_requested_model_and_charged_its_price(marketplace, key):
    alpha = marketplace.chat(key["key"], model="alpha-chat", messages=MESSAGES, max_tokens=10).json()
    beta = marketplace.chat(key["key"], model="beta-chat", messages=MESSAGES, max_tokens=10).json()

    assert (alpha["model"], beta["model"]) == ("alpha-chat", "beta-chat")
    assert alpha["usage"]["total_tokens"] == beta["usage"]["total_tokens"] == PROMPT_TOKENS + 10
    alpha_cost = marketplace.cost_micros("alpha-chat", PROMPT_TOKENS, 10)
    beta_cost = marketplace.cost_micros("beta-chat", PROMPT_TOKENS, 10)
    assert (alpha_cost, beta_cost) == (8, 120)
    assert (micros(alpha["usage"]["cost"]), micros(beta["usage"]["cost"])) == (alpha_cost, beta_cost)

    rows = marketplace.usage(key["key"], group_by="model")["data"]
    assert [(r["model"], r["requests"], micros(r["cost_usd"])) for r in rows] == [
        ("alpha-chat", 1, alpha_cost),
        ("beta-chat", 1, beta_cost),
    ]


def test_default_max_tokens_applies_when_the_request_sets_none(marketplace, key):
    body = marketplace.chat(key["key"], messages=MESSAGES).json()
    # The fake engine stops at 16 tokens, below alpha's default_max_tokens of 64.
    assert body["usage"]["completion_tokens"] == 16


def test_stream_with_include_usage_ends_with_a_usage_chunk_then_done(marketplace, key):
    options = {"include_usage": True}
    events = stream_chat(marketplace, key["key"], "beta-chat", max_tokens=4, stream_options=options)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content, usage_chunk = chunks[:-1], chunks[-1]
    assert len(content) == 4
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "beta-chat" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == " w0 w1 w2 w3"
    assert not [c for c in content if c.get("usage")]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (PROMPT_TOKENS, 4, 12)
    cost = marketplace.cost_micros("beta-chat", PROMPT_TOKENS, 4)
    assert micros(usage["cost"]) == cost == 60
    assert micros(marketplace.key_info(key["key"])["credit_usd"]) == 1_000_000 - cost


def test_stream_without_include_usage_shows_no_usage_but_is_still_billed(marketplace, key):
    events = stream_chat(marketplace, key["key"], "alpha-chat", max_tokens=6)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 6
    assert all(c["choices"] for c in chunks)
    assert not [c for c in chunks if "usage" in c]

    cost = marketplace.cost_micros("alpha-chat", PROMPT_TOKENS, 6)
    total = marketplace.usage(key["key"])["total"]
    assert (total["requests"], total["prompt_tokens"], total["completion_tokens"]) == (1, PROMPT_TOKENS, 6)
    assert micros(total["cost_usd"]) == cost
    assert micros(marketplace.key_info(key["key"])["credit_usd"]) == 1_000_000 - cost


def test_openai_client_reads_usage_cost_and_streams(marketplace, key):
    client = openai.OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=key["key"], max_retries=0)
    try:
        completion = client.chat.completions.create(model="beta-chat", messages=MESSAGES, max_tokens=2)
        assert completion.model == "beta-chat"
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, 2)
        assert micros(completion.usage.model_extra["cost"]) == marketplace.cost_micros("beta-chat", PROMPT_TOKENS, 2)

        chunks = list(
            client.chat.completions.create(
                model="alpha-chat",
                messages=MESSAGES,
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " w0 w1 w2"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3

        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="gamma-chat", messages=MESSAGES)
        assert unknown.value.code == "model_not_found"
    finally:
        client.close()


# -- catalog ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [prefix + "/models" for prefix in PREFIXES])
def test_models_lists_every_listing_with_owner_pricing_and_context_length(marketplace, path):
    response = marketplace.http.get(path)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    rows = [
        (m["id"], m["object"], m["owned_by"], m["parent"], m["context_length"], *m["pricing"].values())
        for m in body["data"]
    ]
    assert rows == [
        # prompt, completion and cached prompt prices (alpha sells cached prompt tokens cheaper)
        ("alpha-chat", "model", "alpha-labs", None, 4096, 0.15, 0.6, 0.03),
        # LoRA adapters are models of their own: their owner (or the base's) and price, the base's context.
        ("alpha-chat:ahoy", "model", "alpha-labs", "alpha-chat", 4096, 0.3, 1.2, 0.3),
        ("alpha-chat:legal", "model", "gamma-law", "alpha-chat", 4096, 5.0, 20.0, 5.0),
        ("beta-chat", "model", "beta-labs", None, 8192, 2.5, 10.0, 2.5),
        ("prefix-chat", "model", "prefix-labs", None, 4096, 0.1, 0.2, 0.1),
        ("embed-small", "model", "delta-labs", None, 512, 0.02, 0.0, 0.02),
        ("fair-chat", "model", "fair-labs", None, 4096, 0.1, 0.2, 0.1),
        ("tiny-chat", "model", "tiny-labs", None, 64, 0.05, 0.1, 0.05),
    ]
    assert [m["task"] for m in body["data"]] == ["generate"] * 5 + ["embed", "generate", "generate"]
    assert all(
        list(m["pricing"]) == ["prompt_usd_per_1m", "completion_usd_per_1m", "cached_prompt_usd_per_1m"]
        for m in body["data"]
    )


def test_one_model_is_described_and_an_unknown_one_is_404(marketplace):
    beta = marketplace.http.get("/v1/models/beta-chat")
    assert beta.status_code == 200
    assert (beta.json()["id"], beta.json()["context_length"]) == ("beta-chat", 8192)
    assert_error(marketplace.http.get("/v1/models/gamma-chat"), 404, "model_not_found", param="model")


def test_a_lora_adapter_is_described_with_its_base_as_parent(marketplace):
    response = marketplace.http.get("/v1/models/alpha-chat:legal")
    assert response.status_code == 200, response.text
    card = response.json()
    assert (card["id"], card["owned_by"], card["parent"]) == ("alpha-chat:legal", "gamma-law", "alpha-chat")
    assert card["pricing"] == {"prompt_usd_per_1m": 5.0, "completion_usd_per_1m": 20.0, "cached_prompt_usd_per_1m": 5.0}


# -- LoRA adapters ---------------------------------------------------------------------------


def test_a_lora_adapter_is_served_by_its_base_replicas_and_charged_its_own_price(marketplace, key):
    response = marketplace.chat(key["key"], model="alpha-chat:ahoy", messages=MESSAGES, max_tokens=3)

    assert response.status_code == 200, response.text
    body = response.json()
    # The fake engine tags tokens with the multiplexed adapter Serve handed it.
    assert body["model"] == "alpha-chat:ahoy"
    assert body["choices"][0]["message"]["content"] == " ahoy.w0 ahoy.w1 ahoy.w2"
    # 8 * 0.3 + 3 * 1.2 = 6 micro-USD: the adapter's price, not alpha's (8 * 0.15 + 3 * 0.6 = 3).
    assert marketplace.cost_micros("alpha-chat:ahoy", PROMPT_TOKENS, 3) == 6
    assert marketplace.cost_micros("alpha-chat", PROMPT_TOKENS, 3) == 3
    assert micros(body["usage"]["cost"]) == 6
    assert micros(marketplace.key_info(key["key"])["credit_usd"]) == 1_000_000 - 6
    rows = marketplace.usage(key["key"], group_by="model")["data"]
    assert [(r["model"], r["requests"], r["completion_tokens"], micros(r["cost_usd"])) for r in rows] == [
        ("alpha-chat:ahoy", 1, 3, 6)
    ]


def test_adapters_and_their_base_take_turns_on_one_replica(marketplace, key):
    """One adapter slot per replica: each request still gets the adapter it asked for."""
    order = ["alpha-chat:ahoy", "alpha-chat:legal", "alpha-chat", "alpha-chat:legal", "alpha-chat:ahoy"]
    seen = []
    for model in order:
        body = marketplace.chat(key["key"], model=model, messages=MESSAGES, max_tokens=2).json()
        seen.append((body["model"], body["choices"][0]["message"]["content"]))
    assert seen == [
        ("alpha-chat:ahoy", " ahoy.w0 ahoy.w1"),
        ("alpha-chat:legal", " legal.w0 legal.w1"),
        ("alpha-chat", " w0 w1"),
        ("alpha-chat:legal", " legal.w0 legal.w1"),
        ("alpha-chat:ahoy", " ahoy.w0 ahoy.w1"),
    ]
    spent = sum(marketplace.cost_micros(model, PROMPT_TOKENS, 2) for model in order)
    assert micros(marketplace.key_info(key["key"])["credit_usd"]) == 1_000_000 - spent


def test_a_streamed_adapter_request_names_the_adapter_and_is_billed_at_its_price(marketplace, key):
    events = stream_chat(
        marketplace, key["key"], model="alpha-chat:legal", max_tokens=4, stream_options={"include_usage": True}
    )

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"alpha-chat:legal"}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == " legal.w0 legal.w1 legal.w2 legal.w3"
    usage = chunks[-1]["usage"]
    # 8 * 5 + 4 * 20 = 120 micro-USD
    assert micros(usage["cost"]) == marketplace.cost_micros("alpha-chat:legal", PROMPT_TOKENS, 4) == 120
    assert micros(marketplace.key_info(key["key"])["credit_usd"]) == 1_000_000 - 120


def test_a_key_allowed_only_the_base_model_cannot_call_its_adapters(marketplace):
    """Adapters are listings of their own in a key's allowed models, not part of their base."""
    base_only = marketplace.create_key(name="base-only", models=["alpha-chat"])
    adapter_only = marketplace.create_key(name="adapter-only", models=["alpha-chat:ahoy"])

    assert_error(marketplace.chat(base_only["key"], model="alpha-chat:ahoy"), 403, "model_not_allowed", param="model")
    assert marketplace.chat(adapter_only["key"], model="alpha-chat:ahoy", max_tokens=1).status_code == 200
    assert_error(marketplace.chat(adapter_only["key"], model="alpha-chat"), 403, "model_not_allowed", param="model")
    assert_error(marketplace.chat(adapter_only["key"], model="alpha-chat:nope"), 404, "model_not_found", param="model")


# -- errors ------------------------------------------------------------------------------


def test_missing_api_key_is_401(marketplace):
    response = marketplace.http.post("/v1/chat/completions", json={"model": "alpha-chat", "messages": MESSAGES})
    assert_error(response, 401, "missing_api_key", error_type="invalid_request_error")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer sk-tm-not-a-real-key", "Basic c2stdG0tYWJj", "Bearer", "sk-tm-no-scheme"],
    ids=["bad-format", "basic-scheme", "empty-bearer", "no-scheme"],
)
def test_malformed_api_key_is_401(marketplace, authorization):
    body = {"model": "alpha-chat", "messages": MESSAGES}
    response = marketplace.http.post("/v1/chat/completions", json=body, headers={"Authorization": authorization})
    assert_error(response, 401, "invalid_api_key")


def test_well_formed_but_unknown_key_is_401(marketplace):
    assert_error(marketplace.chat(auth.generate_key()), 401, "invalid_api_key")


def test_key_with_a_broken_checksum_is_401(marketplace, key):
    tampered = key["key"][:-1] + ("A" if key["key"][-1] != "A" else "B")
    assert_error(marketplace.chat(tampered), 401, "invalid_api_key")


def test_revoked_key_is_401_revoked_api_key(marketplace, key):
    assert marketplace.chat(key["key"], max_tokens=1).status_code == 200
    revoke = marketplace.http.delete(f"/admin/v1/keys/{key['id']}", headers=marketplace.admin_headers)
    assert revoke.status_code == 200
    assert_error(marketplace.chat(key["key"], max_tokens=1), 401, "revoked_api_key")
    assert_error(marketplace.http.get("/v1/key", headers=marketplace.auth(key["key"])), 401, "revoked_api_key")


def test_expired_key_is_401_expired_api_key(marketplace):
    # A key cannot be created already expired; an expiry moved into the past expires it now.
    soon = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    expired = marketplace.create_key(name="expired", expires_at=soon)
    past = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()
    moved = marketplace.http.patch(
        f"/admin/v1/keys/{expired['id']}", json={"expires_at": past}, headers=marketplace.admin_headers
    )
    assert moved.status_code == 200, moved.text
    assert_error(marketplace.chat(expired["key"]), 401, "expired_api_key")


def test_unknown_model_is_404_model_not_found(marketplace, key):
    error = assert_error(marketplace.chat(key["key"], model="gamma-chat"), 404, "model_not_found", param="model")
    assert "gamma-chat" in error["message"]


def test_model_outside_the_keys_allowed_models_is_403(marketplace):
    limited = marketplace.create_key(name="alpha-only", models=["alpha-chat"])
    assert marketplace.chat(limited["key"], model="alpha-chat", max_tokens=1).status_code == 200
    assert_error(marketplace.chat(limited["key"], model="beta-chat"), 403, "model_not_allowed", param="model")


def test_unknown_message_role_is_400_naming_the_param(marketplace, key):
    response = marketplace.chat(key["key"], messages=[{"role": "wizard", "content": "hi"}])
    assert_error(response, 400, "invalid_value", param="messages.0.role", error_type="invalid_request_error")


def test_messages_of_the_wrong_type_is_400(marketplace, key):
    assert_error(marketplace.chat(key["key"], messages="x"), 400, "invalid_value", param="messages")


def test_missing_messages_is_400(marketplace, key):
    response = marketplace.http.post(
        "/v1/chat/completions", json={"model": "alpha-chat"}, headers=marketplace.auth(key["key"])
    )
    assert_error(response, 400, "missing_required_parameter", param="messages")


def test_body_that_is_not_json_is_400(marketplace, key):
    response = marketplace.http.post(
        "/v1/chat/completions",
        content=b'{"model": "alpha-chat", "messages": [',
        headers={**marketplace.auth(key["key"]), "content-type": "application/json"},
    )
    assert_error(response, 400, "invalid_json")


def test_stream_options_without_stream_is_400(marketplace, key):
    response = marketplace.chat(key["key"], stream_options={"include_usage": True})
    assert_error(response, 400, "invalid_value", param="stream_options")


def test_max_tokens_beyond_the_context_length_is_400(marketplace, key):
    assert_error(marketplace.chat(key["key"], max_tokens=4096), 400, "invalid_value", param="max_tokens")


def test_unknown_route_is_404_in_the_error_envelope(marketplace):
    assert_error(marketplace.http.get("/v1/nothing-here"), 404, "not_found")


def test_key_without_credit_is_402(marketplace):
    broke = marketplace.create_key(name="broke", credit_usd=0)
    assert_error(marketplace.chat(broke["key"]), 402, "insufficient_quota", error_type="insufficient_quota")


def test_refused_requests_are_not_billed(marketplace, key):
    marketplace.chat(key["key"], model="gamma-chat")
    marketplace.chat(key["key"], messages=[{"role": "wizard", "content": "hi"}])
    marketplace.chat(key["key"], stream_options={"include_usage": True})

    assert marketplace.usage(key["key"])["total"]["requests"] == 0
    assert marketplace.key_info(key["key"])["credit_usd"] == 1.0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_engine_failure_is_500_and_charges_no_completion_tokens(marketplace, key, stream):
    messages = [{"role": "user", "content": "please fail [[fake-error]] now"}]
    response = marketplace.chat(key["key"], messages=messages, stream=stream)

    assert_error(response, 500, "engine_error", error_type="server_error")
    total = marketplace.usage(key["key"])["total"]
    assert (total["requests"], total["completion_tokens"], total["cost_usd"]) == (1, 0, 0.0)
    assert marketplace.key_info(key["key"])["credit_usd"] == 1.0


# -- headers -----------------------------------------------------------------------------


def test_every_response_carries_exactly_one_request_id(marketplace, key):
    http, auth_header = marketplace.http, marketplace.auth(key["key"])
    responses = [
        marketplace.chat(key["key"], max_tokens=1),
        marketplace.chat(key["key"], model="gamma-chat"),
        marketplace.chat("sk-tm-bad"),
        marketplace.chat(key["key"], messages="x"),
        http.get("/v1/models"),
        http.get("/v1/key", headers=auth_header),
        http.get("/v1/usage", headers=auth_header),
        http.get("/healthz"),
        http.get("/nowhere"),
        http.get("/admin/v1/keys", headers={"Authorization": "Bearer wrong"}),
    ]
    payload = {"model": "alpha-chat", "messages": MESSAGES, "stream": True, "max_tokens": 2}
    with http.stream("POST", "/v1/chat/completions", json=payload, headers=auth_header) as streamed:
        streamed.read()
        responses.append(streamed)

    for response in responses:
        ids = response.headers.get_list("x-request-id")
        assert len(ids) == 1 and ids[0], (response.request.url, response.status_code, ids)
    assert len({r.headers["x-request-id"] for r in responses}) == len(responses)


RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{kind}-{unit}" for kind in ("limit", "remaining", "reset") for unit in ("requests", "tokens")
]


def test_every_response_carries_the_rate_limit_headers_of_the_calling_key(marketplace):
    # rpm=2 refills one request per 30 s, so "1 remaining" holds for the whole test.
    created = marketplace.create_key(name="headers", rpm=2, tpm=50_000)
    key, http, auth_header = created["key"], marketplace.http, marketplace.auth(created["key"])
    assert marketplace.chat(key, max_tokens=5).status_code == 200
    keyed = {
        "key": http.get("/v1/key", headers=auth_header),
        "usage": http.get("/v1/usage", headers=auth_header),
        "models": http.get("/v1/models", headers=auth_header),
        "unknown model": marketplace.chat(key, model="gamma-chat"),
        "bad body": marketplace.chat(key, messages="x"),
    }
    for label, response in keyed.items():
        headers = response.headers
        assert all(len(headers.get_list(name)) == 1 for name in RATE_LIMIT_HEADERS), (label, headers)
        # The key's own limits and the one request it made; these calls consume nothing.
        assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-limit-tokens"]) == ("2", "50000"), label
        assert headers["x-ratelimit-remaining-requests"] == "1", label
        assert 0 < int(headers["x-ratelimit-remaining-tokens"]) <= 50_000, label

    anonymous = {
        "no key": http.post("/v1/chat/completions", json={"model": "alpha-chat", "messages": MESSAGES}),
        "bad key": marketplace.chat("sk-tm-bad"),
        "models": http.get("/v1/models"),
        "healthz": http.get("/healthz"),
        "unknown route": http.get("/nowhere"),
    }
    for label, response in anonymous.items():
        headers = response.headers
        # No key to report on: the operator's defaults, untouched.
        assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("600", "600")
        assert headers["x-ratelimit-limit-tokens"] == "1000000", label


def test_a_client_request_id_is_echoed(marketplace, key):
    response = marketplace.http.get(
        "/v1/key", headers={**marketplace.auth(key["key"]), "x-request-id": "client-chosen-id-42"}
    )
    assert response.headers.get_list("x-request-id") == ["client-chosen-id-42"]


# -- the calling key's account -----------------------------------------------------------


def test_balance_and_usage_equal_the_sum_of_reported_costs(marketplace):
    created = marketplace.create_key(name="ledger-check", credit_usd=0.5)
    key = created["key"]
    reported: list[dict[str, Any]] = []

    for model, max_tokens in [("alpha-chat", 3), ("beta-chat", 7), ("alpha-chat", 16), ("beta-chat", 1)]:
        response = marketplace.chat(key, model=model, messages=MESSAGES, max_tokens=max_tokens)
        assert response.status_code == 200, response.text
        reported.append(response.json()["usage"])
    completion = marketplace.http.post(
        "/api/v1/completions",
        json={"model": "beta-chat", "prompt": "count these five words", "max_tokens": 9},
        headers=marketplace.auth(key),
    )
    reported.append(completion.json()["usage"])
    events = stream_chat(marketplace, key, "alpha-chat", max_tokens=5, stream_options={"include_usage": True})
    reported.append(json.loads(events[-2])["usage"])

    spent = sum(micros(u["cost"]) for u in reported)
    assert spent > 0
    info = marketplace.key_info(key)
    assert (info["id"], info["name"], info["prefix"]) == (created["id"], "ledger-check", created["prefix"])
    assert micros(info["credit_usd"]) == 500_000 - spent
    assert micros(info["spent_usd"]) == spent
    assert info["on_hold_usd"] == 0.0

    today = datetime.now(timezone.utc).date().isoformat()
    for group_by in ("model", "day"):
        usage = marketplace.usage(key, group_by=group_by)
        assert usage["group_by"] == group_by
        total = usage["total"]
        assert total["requests"] == len(reported)
        assert total["prompt_tokens"] == sum(u["prompt_tokens"] for u in reported)
        assert total["completion_tokens"] == sum(u["completion_tokens"] for u in reported)
        assert total["total_tokens"] == sum(u["total_tokens"] for u in reported)
        assert micros(total["cost_usd"]) == spent
    by_day = marketplace.usage(key, group_by="day")["data"]
    assert [row["date"] for row in by_day] == [today]

    alias = marketplace.http.get("/api/v1/usage", headers=marketplace.auth(key)).json()
    assert alias["total"] == marketplace.usage(key)["total"]
    yesterday = (datetime.now(timezone.utc).date() - timedelta(days=1)).isoformat()
    past = marketplace.usage(key, start="2000-01-01", end=yesterday)
    assert (past["data"], past["total"]["requests"]) == ([], 0)
    bad_range = marketplace.http.get(
        "/v1/usage", params={"start": today, "end": yesterday}, headers=marketplace.auth(key)
    )
    assert_error(bad_range, 400, "invalid_value", param="start")


def test_every_customer_route_answers_the_same_under_every_prefix(marketplace, key):
    """The README's customer routes under /v1, /api/v1 and /v1/inference: one answer each."""
    auth = marketplace.auth(key["key"])
    answer = marketplace.chat(key["key"], max_tokens=2)
    assert answer.status_code == 200
    routes = ["/models", "/models/alpha-chat", "/key", "/usage", f"/generation?id={answer.json()['id']}"]
    for route in routes:
        bodies = []
        for prefix in PREFIXES:
            response = marketplace.http.get(prefix + route, headers=auth)
            assert response.status_code == 200, (prefix + route, response.text)
            assert response.headers["x-ratelimit-limit-requests"]
            bodies.append(response.json())
        assert bodies[0] == bodies[1] == bodies[2], route


def test_key_info_alias_shows_the_same_record_without_secrets(marketplace, key):
    info = marketplace.http.get("/api/v1/key", headers=marketplace.auth(key["key"])).json()
    assert info == marketplace.key_info(key["key"])
    assert info["object"] == "api_key"
    assert "key" not in info and "key_hash" not in info


# -- admin API ------------------------------------------------------------------------------


def test_admin_creates_a_key_that_is_shown_only_once(marketplace, redis_client):
    response = marketplace.http.post(
        "/admin/v1/keys",
        json={"name": "admin-made", "credit_usd": 1.25, "models": ["beta-chat"], "rpm": 100, "tpm": 5000},
        headers=marketplace.admin_headers,
    )

    assert response.status_code == 201, response.text
    created = response.json()
    key = created["key"]
    assert auth.is_well_formed(key)
    # The id is the key's own, not derived from its secret (a rotation keeps it); the secrets
    # index maps the secret's hash to it.
    assert re.fullmatch(r"key_[0-9a-f]{20}", created["id"]) and created["id"] not in key
    index = redis_client.get(f"tm:auth:{hashlib.sha256(key.encode()).hexdigest()}")
    assert index == f"{created['org_id']} {created['id']}"
    assert created["prefix"] == auth.display_prefix(key)
    assert (created["name"], created["status"], created["credit_usd"]) == ("admin-made", "active", 1.25)
    assert created["models"] == ["beta-chat"]
    assert (created["limits"]["rpm"], created["limits"]["tpm"]) == (100, 5000)
    assert "key_hash" not in created

    secret_hash = hashlib.sha256(key.encode()).hexdigest()
    listed = marketplace.http.get("/admin/v1/keys", headers=marketplace.admin_headers)
    assert listed.status_code == 200
    assert created["id"] in [k["id"] for k in listed.json()["data"]]
    one = marketplace.http.get(f"/admin/v1/keys/{created['id']}", headers=marketplace.admin_headers)
    assert one.status_code == 200
    assert one.json() == {k: v for k, v in created.items() if k != "key"}
    for shown in (listed, one):
        assert key not in shown.text and key[len(auth.KEY_PREFIX) :] not in shown.text
        assert secret_hash not in shown.text and "key_hash" not in shown.text


def test_admin_patch_changes_limits_and_models(marketplace, key):
    headers = marketplace.admin_headers
    patched = marketplace.http.patch(
        f"/admin/v1/keys/{key['id']}", json={"rpm": 60, "max_concurrency": 2, "models": ["alpha-chat"]}, headers=headers
    )

    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["limits"] == {"rpm": 60, "tpm": None, "max_concurrency": 2, "max_tokens_per_request": None}
    assert (body["models"], body["credit_usd"]) == (["alpha-chat"], 1.0)
    assert_error(marketplace.chat(key["key"], model="beta-chat"), 403, "model_not_allowed", param="model")
    allowed = marketplace.chat(key["key"], model="alpha-chat", max_tokens=1)
    assert allowed.status_code == 200, allowed.text
    spent = micros(allowed.json()["usage"]["cost"])

    unknown = marketplace.http.patch(f"/admin/v1/keys/{key['id']}", json={"models": ["gamma-chat"]}, headers=headers)
    assert_error(unknown, 400, "invalid_value", param="models")
    extra = marketplace.http.patch(f"/admin/v1/keys/{key['id']}", json={"balance_micros": 10**9}, headers=headers)
    assert_error(extra, 400, "invalid_value", param="balance_micros")
    assert micros(marketplace.key_info(key["key"])["credit_usd"]) == 1_000_000 - spent


def test_admin_patch_status_revokes_a_key_for_good(marketplace, key):
    url, headers = f"/admin/v1/keys/{key['id']}", marketplace.admin_headers
    assert_error(marketplace.http.patch(url, json={"status": "paused"}, headers=headers), 400, "invalid_value")

    revoked = marketplace.http.patch(url, json={"status": "revoked"}, headers=headers)
    assert (revoked.status_code, revoked.json()["status"]) == (200, "revoked")
    assert_error(marketplace.chat(key["key"], max_tokens=1), 401, "revoked_api_key")

    # Revocation is final (see test_client_mistakes.py for every way back that is refused).
    reinstated = marketplace.http.patch(url, json={"status": "active"}, headers=headers)
    assert_error(reinstated, 409, "key_revoked", param="status")
    assert_error(marketplace.chat(key["key"], max_tokens=1), 401, "revoked_api_key")


def test_admin_delete_revokes_the_key(marketplace, key):
    deleted = marketplace.http.delete(f"/admin/v1/keys/{key['id']}", headers=marketplace.admin_headers)

    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["status"] == "revoked"
    fetched = marketplace.http.get(f"/admin/v1/keys/{key['id']}", headers=marketplace.admin_headers)
    assert fetched.json()["status"] == "revoked"
    assert_error(marketplace.chat(key["key"]), 401, "revoked_api_key")


def test_admin_credit_adds_exactly_the_amount(marketplace):
    created = marketplace.create_key(name="topup", credit_usd=0)
    assert_error(marketplace.chat(created["key"]), 402, "insufficient_quota")

    credited = marketplace.http.post(
        f"/admin/v1/keys/{created['id']}/credit", json={"amount_usd": 0.123456}, headers=marketplace.admin_headers
    )

    assert credited.status_code == 200, credited.text
    assert credited.json()["credit_usd"] == 0.123456
    assert marketplace.chat(created["key"], max_tokens=1).status_code == 200
    too_precise = marketplace.http.post(
        f"/admin/v1/keys/{created['id']}/credit", json={"amount_usd": 0.0000001}, headers=marketplace.admin_headers
    )
    assert_error(too_precise, 400, "invalid_value", param="amount_usd")


def test_admin_unknown_key_id_is_404(marketplace):
    response = marketplace.http.get("/admin/v1/keys/key_doesnotexist", headers=marketplace.admin_headers)
    assert_error(response, 404, "key_not_found")


def test_admin_usage_for_one_key_matches_the_keys_own_usage(marketplace, key):
    for model in ("alpha-chat", "beta-chat", "beta-chat"):
        assert marketplace.chat(key["key"], model=model, max_tokens=2).status_code == 200

    response = marketplace.http.get(
        "/admin/v1/usage", params={"key_id": key["id"], "group_by": "model"}, headers=marketplace.admin_headers
    )

    assert response.status_code == 200, response.text
    admin_view = response.json()
    own_view = marketplace.usage(key["key"], group_by="model")
    assert admin_view["key_id"] == key["id"]
    assert admin_view["data"] == own_view["data"]
    assert admin_view["total"] == own_view["total"]
    assert [(r["model"], r["requests"]) for r in admin_view["data"]] == [("alpha-chat", 1), ("beta-chat", 2)]
    everyone = marketplace.http.get("/admin/v1/usage", headers=marketplace.admin_headers).json()
    assert everyone["total"]["requests"] >= 3


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer not-the-admin-token"}, "invalid_admin_token"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
    ],
    ids=["missing", "wrong", "wrong-scheme"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/v1/keys"), ("POST", "/admin/v1/keys"), ("GET", "/admin/v1/usage"), ("DELETE", "/admin/v1/keys/x")],
)
def test_admin_api_refuses_a_missing_or_wrong_admin_token(marketplace, headers, code, method, path):
    body = {"name": "nope", "credit_usd": 1} if method == "POST" else None
    response = marketplace.http.request(method, path, json=body, headers=headers)
    assert_error(response, 401, code)


def test_an_api_key_is_not_an_admin_token(marketplace, key):
    response = marketplace.http.get("/admin/v1/keys", headers=marketplace.auth(key["key"]))
    assert_error(response, 401, "invalid_admin_token")
