"""The money path on the real engine: n choices and prompt lists billed in full, holds that bound.

vLLM's continuous usage stats put one choice's tokens (and one prompt's) on each stream chunk,
so a stream cut short must be billed the sum over its choices and prompts. Every settlement's
ledger event carries what admission reserved (`reserved_tokens`, the prompt estimate plus the
output budget); with `min_tokens` equal to `max_tokens` the output budget is used in full, so
reserved >= used holds only if the prompt estimate is at least the engine's count.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis
from openai import OpenAI

from tokenmart.cluster.state import ClusterState

from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def books(stack: Stack) -> redis.Redis:
    state = ClusterState.load(stack.state_dir)
    assert state is not None
    return redis.Redis.from_url(state.redis_url, decode_responses=True)


def client(key: str, stack: Stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=300)


def ledger(books: redis.Redis, key_id: str) -> list[dict[str, str]]:
    org_id = books.hget("tm:key_orgs", key_id)
    return [fields for _, fields in books.xrange(f"{{acct:{org_id}}}:ledger") if fields["key_id"] == key_id]


def settled(books: redis.Redis, key_id: str, count: int) -> list[dict[str, str]]:
    """The key's ledger once `count` settlements landed (a hung-up stream settles just after)."""
    deadline = time.monotonic() + 60
    while len(events := [e for e in ledger(books, key_id) if "event" not in e]) < count:
        assert time.monotonic() < deadline, f"{len(events)} of {count} settlements after 60 s"
        time.sleep(0.2)
    return events


def account(stack: Stack, key: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.api_base}/v1/key", headers={"authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def reconciles(stack: Stack, key_id: str) -> dict[str, Any]:
    report = stack.admin("GET", "/admin/v1/reconcile", params={"key_id": key_id}).json()
    assert report["ok"] and report["differences"] == [], report
    return report


def test_a_stream_of_n_choices_cut_short_is_billed_for_every_choice(stack: Stack, books: redis.Redis) -> None:
    created = stack.new_key(credit_usd=1)
    openai = client(created["key"], stack)
    messages = [{"role": "user", "content": "Count from one to one hundred."}]
    prompt_tokens = openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage.prompt_tokens

    stream = openai.chat.completions.create(
        model=MODEL, messages=messages, n=4, max_tokens=64, stream=True, extra_body={"min_tokens": 64}
    )
    with_text = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            with_text += 1  # one or more tokens of one choice
        if with_text == 40:
            break
    stream.close()

    _, event = settled(books, created["id"], 2)
    assert event["status"] == "aborted"
    assert int(event["prompt_tokens"]) == prompt_tokens  # one prompt, counted once
    # Every choice's tokens that reached the client are paid for; the last chunk alone is ~10.
    assert 40 <= int(event["completion_tokens"]) <= 4 * 64, event
    assert int(event["prompt_tokens"]) + int(event["completion_tokens"]) <= int(event["reserved_tokens"])
    assert account(stack, created["key"])["on_hold_usd"] == 0
    reconciles(stack, created["id"])


def test_a_completion_of_several_prompts_cut_short_is_billed_for_every_prompt(stack: Stack, books: redis.Redis) -> None:
    created = stack.new_key(credit_usd=1)
    openai = client(created["key"], stack)
    prompts = ["The sky is", "Once upon a time, in a land far away,", "Water boils at", "My favourite food"]
    prompt_tokens = openai.completions.create(model=MODEL, prompt=prompts, max_tokens=1).usage.prompt_tokens

    stream = openai.completions.create(
        model=MODEL, prompt=prompts, max_tokens=48, stream=True, extra_body={"min_tokens": 48}
    )
    seen: set[int] = set()
    for received, chunk in enumerate(stream, start=1):
        seen.update(choice.index for choice in chunk.choices)
        if received == 24:
            break
    stream.close()
    assert seen == {0, 1, 2, 3}

    _, event = settled(books, created["id"], 2)
    assert event["status"] == "aborted"
    assert int(event["prompt_tokens"]) == prompt_tokens  # all four prompts, not the last chunk's
    assert int(event["completion_tokens"]) >= 24 - 4, event  # the first chunk of each prompt may be empty
    reconciles(stack, created["id"])


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"enable_thinking": False}},
        {"messages": [{"role": "user", "content": "", "name": "bob"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
        {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER_TOOL], "tool_choice": "none"},
        {"messages": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Give me JSON."}], "response_format": {"type": "json_object"}},
    ],
    ids=["template_kwargs", "empty_content_with_name", "content_parts", "tools", "developer", "json_object"],
)
def test_what_admission_reserves_covers_what_the_engine_counts(
    stack: Stack, books: redis.Redis, body: dict[str, Any]
) -> None:
    created = stack.new_key(credit_usd=1)
    reply = httpx.post(
        f"{stack.base_url}/chat/completions",
        headers={"authorization": f"Bearer {created['key']}"},
        json={"model": MODEL, "max_tokens": 4, "min_tokens": 4, **body},
        timeout=300,
    )
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    (event,) = settled(books, created["id"], 1)
    assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= int(event["reserved_tokens"]), event
    assert not [e for e in ledger(books, created["id"]) if e.get("event") == "hold_exceeded"]
    reconciles(stack, created["id"])


def test_a_key_with_one_micro_dollar_never_goes_below_zero(stack: Stack, books: redis.Redis) -> None:
    created = stack.new_key(credit_usd=0.000001)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "", "name": "bob"}],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 1,
        "min_tokens": 1,
    }
    reply = httpx.post(
        f"{stack.base_url}/chat/completions",
        headers={"authorization": f"Bearer {created['key']}"},
        json=body,
        timeout=300,
    )
    info = account(stack, created["key"])
    if reply.status_code == 200:  # the hold (estimate included) fit in 1 micro-USD, and so did the cost
        assert reply.json()["usage"]["cost"] == 0.000001
        assert (info["credit_usd"], info["on_hold_usd"]) == (0, 0)
    else:
        assert (reply.status_code, reply.json()["error"]["code"]) == (402, "insufficient_quota"), reply.text
        assert (info["credit_usd"], info["on_hold_usd"]) == (0.000001, 0)
    # A cost above the hold would show here as a hold_exceeded difference.
    reconciles(stack, created["id"])
