"""Client mistakes against real vLLM: 400s through the official SDK, never a retried 5xx.

Before the ingress checked these, real vLLM turned them into server errors (a content iterator
failing after the route ran, a tokenizer that cannot encode a lone surrogate, a TypeError
inside the chat template call), which the SDK retries. `max_retries=0` makes a 5xx show up as
`InternalServerError`/`APIStatusError` instead of `BadRequestError`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e

CREDIT_USD = 1.0


def client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)


def untouched(stack: Stack, key: str) -> bool:
    """Nothing held, spent or counted: the request never reached the engine."""
    headers = {"authorization": f"Bearer {key}"}
    account = httpx.get(f"{stack.api_base}/v1/key", headers=headers, timeout=30).json()
    usage = httpx.get(f"{stack.api_base}/v1/usage", headers=headers, timeout=30).json()["total"]
    return (account["credit_usd"], account["on_hold_usd"], account["spent_usd"], usage["requests"]) == (
        CREDIT_USD,
        0.0,
        0.0,
        0,
    )


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "bogus", "text": "hi"}], "messages.0.content.0.type"),
        ([{"text": "hi"}], "messages.0.content.0.type"),
        (["hi"], "messages.0.content.0"),
        ({"a": 1}, "messages.0.content"),
        ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], "messages.0.content.0"),
    ],
    ids=["unknown-type", "no-type", "bare-string", "object", "image-on-text-only-model"],
)
def test_bad_content_parts_are_bad_request_errors(stack: Stack, content: Any, param: str) -> None:
    key = stack.new_key(credit_usd=CREDIT_USD)["key"]
    with pytest.raises(openai.BadRequestError) as refused:
        client(stack, key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=4
        )
    assert refused.value.status_code == 400
    assert (refused.value.code, refused.value.param) in {
        ("invalid_value", param),
        ("missing_required_parameter", param),
    }
    assert untouched(stack, key)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800"}]},
            "messages.0.content",
        ),
        ("/completions", {"model": MODEL, "prompt": "\udc00 once upon"}, "prompt"),
    ],
    ids=["chat", "completions"],
)
def test_a_lone_surrogate_is_a_bad_request_error(stack: Stack, path: str, body: dict[str, Any], param: str) -> None:
    """Sent as the JSON escape other SDKs produce (JavaScript's JSON.stringify does); Python's
    SDK encodes bodies as UTF-8 itself and cannot, so the raw JSON goes through its `post`."""
    key = stack.new_key(credit_usd=CREDIT_USD)["key"]
    api = client(stack, key)
    with pytest.raises(openai.BadRequestError) as refused:
        api.post(
            path,
            cast_to=httpx.Response,
            content=json.dumps({**body, "max_tokens": 4}).encode(),
            options={"headers": {"content-type": "application/json"}},
        )
    assert (refused.value.status_code, refused.value.code, refused.value.param) == (400, "invalid_value", param)
    assert untouched(stack, key)


@pytest.mark.parametrize("kwargs", [{"conversation": []}, {"return_assistant_tokens_mask": True}, {"tokenize": True}])
def test_clashing_chat_template_kwargs_are_bad_request_errors(stack: Stack, kwargs: dict[str, Any]) -> None:
    key = stack.new_key(credit_usd=CREDIT_USD)["key"]
    with pytest.raises(openai.BadRequestError) as refused:
        client(stack, key).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_body={"chat_template_kwargs": kwargs},
        )
    assert (refused.value.status_code, refused.value.param) == (400, "chat_template_kwargs")
    assert untouched(stack, key)


def test_text_parts_and_a_template_variable_are_served_by_the_real_engine(stack: Stack) -> None:
    """The rules refuse mistakes only: the accepted shapes render and run on real vLLM."""
    key = stack.new_key(credit_usd=CREDIT_USD)["key"]
    response = client(stack, key).chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
            {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
        ],
        max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert response.choices[0].message.content
    assert response.usage.completion_tokens > 0
    assert not untouched(stack, key)
