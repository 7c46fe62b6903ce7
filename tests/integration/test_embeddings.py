"""`/v1/embeddings` on an embedding listing (catalog `task: embed`), through the official SDK
(which asks for base64 vectors and decodes them), billed per prompt token."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

from tokenmart.doubles.fake_engine import fake_embedding

pytestmark = pytest.mark.integration


def test_the_sdk_gets_one_vector_per_input_billed_per_prompt_token(marketplace):
    created = marketplace.create_key(name="embeddings", credit_usd=1)
    with OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=created["key"], max_retries=0) as client:
        result = client.embeddings.create(model="embed-small", input=["hello world", "a second input here"])
    assert [item.index for item in result.data] == [0, 1]
    expected = [fake_embedding("hello world"), fake_embedding("a second input here")]
    assert [item.embedding for item in result.data] == expected
    assert result.usage.prompt_tokens == 6  # the fake engine's words
    cost = marketplace.cost_micros("embed-small", 6, 0)
    assert round(result.usage.model_extra["cost"] * 1_000_000) == cost
    account = marketplace.key_info(created["key"])
    assert (round(account["spent_usd"] * 1_000_000), account["prompt_tokens"], account["on_hold_usd"]) == (cost, 6, 0)


def test_float_vectors_every_prefix_and_the_refusals(marketplace):
    key = marketplace.create_key(name="embeddings-http", credit_usd=1)["key"]
    for path in ("/v1/embeddings", "/api/v1/embeddings", "/v1/inference/embeddings"):
        body = {"model": "embed-small", "input": "one", "encoding_format": "float"}
        answer = marketplace.http.post(path, json=body, headers=marketplace.auth(key))
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"][0]["embedding"] == fake_embedding("one")
        assert answer.headers["x-tokenmart-served-by"] == "embed-small"

    def refused(path: str, body: dict) -> dict:
        answer = marketplace.http.post(path, json=body, headers=marketplace.auth(key))
        assert answer.status_code == 400, answer.text
        return answer.json()["error"]

    assert refused("/v1/embeddings", {"model": "alpha-chat", "input": "x"})["param"] == "model"
    assert refused("/v1/embeddings", {"model": "embed-small", "input": ""})["param"] == "input.0"
    assert (
        refused("/v1/chat/completions", {"model": "embed-small", "messages": [{"role": "user", "content": "x"}]})[
            "message"
        ]
        == "The model 'embed-small' is an embedding model; send it to /v1/embeddings."
    )
    with (
        OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=key, max_retries=0) as client,
        pytest.raises(BadRequestError),
    ):
        client.embeddings.create(model="embed-small", input=[])
    spent = marketplace.key_info(key)["spent_usd"]
    assert round(spent * 1_000_000) == 3 * marketplace.cost_micros("embed-small", 1, 0)
