"""A listing without a tool parser refuses tool calls at the ingress, through Ray Serve.

The test catalog's listings set no `engine.tool_parser`, so tool_choice auto, required or a
named function is a 400 naming `tool_choice`, answered before admission: nothing is held,
charged or counted, and the engine never gets the request. `tool_choice: "none"` is served.
"""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "beta-chat"
MESSAGES = [{"role": "user", "content": "tell me about ray serve"}]  # 5 words + 3 = 8 prompt tokens
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize(
    ("tool_choice", "wanted"),
    [
        ("auto", "'auto'"),
        ("required", "'required'"),
        ({"type": "function", "function": {"name": "get_weather"}}, "a named function ('get_weather')"),
        (openai.NOT_GIVEN, "'auto'"),  # tools without tool_choice mean auto
    ],
    ids=["auto", "required", "named", "default"],
)
def test_tool_choice_on_a_listing_without_a_parser_is_a_400_before_admission(marketplace, tool_choice, wanted):
    created = marketplace.create_key(name="no-tools", credit_usd=1.0)
    client = openai.OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=created["key"], max_retries=0)

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice=tool_choice, max_tokens=8
        )

    assert refused.value.status_code == 400
    assert refused.value.body == {
        "message": (
            f"Model {MODEL!r} does not support tool calling: tool_choice {wanted} needs a tool parser, which its "
            "listing does not set. Send tool_choice 'none' to pass tools as context only."
        ),
        "type": "invalid_request_error",
        "param": "tool_choice",
        "code": "invalid_value",
    }
    info = marketplace.key_info(created["key"])
    assert (info["credit_usd"], info["on_hold_usd"]) == (1.0, 0.0)
    assert marketplace.usage(created["key"])["total"]["requests"] == 0  # never admitted


def test_tool_choice_none_passes_tools_as_context_on_any_listing(marketplace):
    created = marketplace.create_key(name="tools-as-context", credit_usd=1.0)
    client = openai.OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=created["key"], max_retries=0)

    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=8
    )

    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (8, 8)
    cost = marketplace.cost_micros(MODEL, 8, 8)
    assert round(reply.usage.model_extra["cost"] * 1_000_000) == cost
    assert round(marketplace.key_info(created["key"])["credit_usd"] * 1_000_000) == 1_000_000 - cost
