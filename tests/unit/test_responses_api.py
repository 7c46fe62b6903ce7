"""The Responses API translation: a /v1/responses body becomes a chat completions body, and
the chat answer (whole or streamed) becomes a Response object or its streaming events.

Every Response and event is checked against the installed `openai` SDK's own types, with no
field the SDK does not know (tokenmart's `usage.cost` aside); the streams are also folded by
the SDK's own stream accumulator, and one round trip goes through the real `openai` client.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from tokenmart.deployments.errors import BadRequest
from tokenmart.deployments.ray_llm import ChatCompletionRequest
from tokenmart.deployments.responses_api import (
    ResponsesRequest,
    ResponseStream,
    chat_id_for,
    chat_to_response,
    parse_request,
    response_id_for,
    response_usage,
    to_chat_request,
)

EVENT = TypeAdapter(ResponseStreamEvent)
MODEL = "smollm2-135m-instruct"
CHAT_ID = "chatcmpl-7f3a9c"
CREATED = 1_760_000_000
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
USAGE = {
    "prompt_tokens": 21,
    "completion_tokens": 5,
    "total_tokens": 26,
    "prompt_tokens_details": {"cached_tokens": 16},
    "cost": 0.000123,
}


def _request(**fields: Any) -> ResponsesRequest:
    return parse_request({"model": MODEL, "input": "Hi", **fields})


def _refusal(body: dict[str, Any]) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse_request({"model": MODEL, **body})
    assert caught.value.status_code == 400
    return caught.value


def _unknown_to_sdk(model: Any, path: str = "") -> list[str]:
    """Fields an SDK model carries that its type does not declare (the SDK models allow extras)."""
    found: list[str] = []
    if isinstance(model, BaseModel):
        found += [f"{path}.{name}" for name in (model.model_extra or {}) if f"{path}.{name}" != ".usage.cost"]
        for name in type(model).model_fields:
            found += _unknown_to_sdk(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for index, item in enumerate(model):
            found += _unknown_to_sdk(item, f"{path}[{index}]")
    return found


def _sdk_response(response: dict[str, Any]) -> Response:
    parsed = Response.model_validate(response)
    assert _unknown_to_sdk(parsed) == []
    return parsed


def _events(lines: list[str]) -> list[dict[str, Any]]:
    """Parse SSE strings as a client does, checking each against the SDK's event union."""
    events = []
    for line in lines:
        head, data, end = line.split("\n", 2)
        assert end == "\n" and head.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: ") :])
        assert head == f"event: {event['type']}"
        parsed = EVENT.validate_python(event)
        if event["type"] in ("response.created", "response.in_progress"):
            assert _unknown_to_sdk(parsed.response) == []  # type: ignore[union-attr]
        else:
            assert _unknown_to_sdk(parsed) in ([], [".response.usage.cost"])
        events.append(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def _run_stream(chunks: list[dict[str, Any]], req: ResponsesRequest, **finish: Any) -> list[dict[str, Any]]:
    stream = ResponseStream(req, clock=lambda: CREATED + 2)
    lines = stream.start()
    for chunk in chunks:
        lines += stream.feed(chunk)
    lines += stream.finish(**finish)
    events = _events(lines)
    state = ResponseStreamState(input_tools=[WEATHER] if req.tools else [], text_format=openai.omit)
    for event in events:  # the SDK's own accumulator accepts the order and the ids
        state.handle_event(EVENT.validate_python(event))
    return events


def _chunk(delta: dict[str, Any] | None = None, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return {
        "id": CHAT_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": choices,
        **extra,
    }


def _chat(message: dict[str, Any], finish_reason: str = "stop", usage: dict[str, Any] | None = USAGE) -> dict[str, Any]:
    return {
        "id": CHAT_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}],
        "usage": usage,
    }


def _valid_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    ChatCompletionRequest.model_validate(body)  # what the chat pipeline parses
    return body


# -- request -> chat body -------------------------------------------------------------------


def test_a_string_input_is_one_user_message() -> None:
    assert _valid_chat_body(to_chat_request(_request())) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": False,
    }


def test_a_message_list_follows_the_instructions_as_a_system_message() -> None:
    req = _request(
        instructions="Answer in French.",
        input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
            {  # an output message of an earlier response, sent back as it came
                "id": "msg_abc_0",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Bonjour", "annotations": [], "logprobs": []}],
            },
            {"role": "system", "content": "Stay polite."},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "How"}, {"type": "input_text", "text": " are you?"}],
            },
        ],
    )
    assert _valid_chat_body(to_chat_request(req))["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
        {"role": "system", "content": "Stay polite."},
        {"role": "user", "content": [{"type": "text", "text": "How"}, {"type": "text", "text": " are you?"}]},
    ]


def test_limits_sampling_user_and_reasoning_effort_reach_the_chat_body() -> None:
    req = _request(
        max_output_tokens=64,
        temperature=0.2,
        top_p=1,
        user="end-user-7",
        parallel_tool_calls=False,
        reasoning={"effort": "low", "summary": "auto"},
        metadata={"ticket": "T-1"},
    )
    assert _valid_chat_body(to_chat_request(req)) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": False,
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 1.0,
        "user": "end-user-7",
        "parallel_tool_calls": False,
        "reasoning_effort": "low",
    }


def test_a_stream_asks_the_chat_pipeline_for_its_usage() -> None:
    assert _valid_chat_body(to_chat_request(_request(stream=True))) == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


@pytest.mark.parametrize(
    ("text_format", "response_format"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "name": "reply", "schema": SCHEMA, "strict": True},
            {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}},
        ),
        (
            {"type": "json_schema", "name": "reply", "schema": SCHEMA, "description": "One answer."},
            {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "description": "One answer."}},
        ),
    ],
)
def test_text_format_becomes_the_chat_response_format(text_format: dict, response_format: dict | None) -> None:
    body = _valid_chat_body(to_chat_request(_request(text={"format": text_format})))
    assert body.get("response_format") == response_format
    echoed = chat_to_response(_chat({"content": "{}"}), _request(text={"format": text_format}))["text"]
    assert echoed["format"]["type"] == text_format["type"]
    _sdk_response(chat_to_response(_chat({"content": "{}"}), _request(text={"format": text_format})))


def test_function_tools_and_tool_choice_become_chat_tools() -> None:
    req = _request(tools=[{**WEATHER, "strict": True}], tool_choice={"type": "function", "name": "get_weather"})
    body = _valid_chat_body(to_chat_request(req))
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city.",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    for mode in ("none", "auto", "required"):
        assert to_chat_request(_request(tools=[WEATHER], tool_choice=mode))["tool_choice"] == mode
    assert "tool_choice" not in to_chat_request(_request(tools=[WEATHER]))


ACCEPTED_AND_IGNORED = [
    {"store": False},
    {"store": True},
    {"stream_options": {"include_obfuscation": False}},
    {"prompt_cache_key": "tenant-9"},
    {"prompt_cache_retention": "24h"},
    {"safety_identifier": "u-hash"},
    {"max_tool_calls": 3},
    {"service_tier": "auto"},
    {"service_tier": "default"},
    {"truncation": "disabled"},
    {"background": False},
    {"include": []},
    {"top_logprobs": 0},
    {"previous_response_id": None},
    {"conversation": None},
    {"text": {"verbosity": "low"}},
    {"reasoning": {"summary": "concise"}},
    {"reasoning": {"generate_summary": "auto"}},
    {"instructions": None, "temperature": None},
]


@pytest.mark.parametrize("fields", ACCEPTED_AND_IGNORED, ids=lambda f: ",".join(f))
def test_fields_accepted_and_ignored_leave_the_chat_body_as_it_was(fields: dict[str, Any]) -> None:
    assert to_chat_request(_request(**fields)) == to_chat_request(_request())


# -- refusals -------------------------------------------------------------------------------

REFUSALS = [
    (
        {"input": "Hi", "previous_response_id": "resp_123"},
        "'previous_response_id' is not supported by tokenmart's Responses API: tokenmart stores no responses; "
        "send the whole conversation in 'input'.",
        "previous_response_id",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "conversation": "conv_1"},
        "'conversation' is not supported by tokenmart's Responses API: tokenmart stores no conversations; "
        "send the whole conversation in 'input'.",
        "conversation",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "prompt": {"id": "pmpt_1"}},
        "'prompt' is not supported by tokenmart's Responses API: tokenmart has no stored prompts; send the text "
        "in 'instructions' and 'input'.",
        "prompt",
        "unsupported_parameter",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/cat.png"}]}]},
        "Content parts of type 'input_image' are not supported by tokenmart's Responses API: it takes text only "
        "(input_text, output_text).",
        "input.0.content.0.type",
        "unsupported_parameter",
    ),
    (
        {
            "input": [
                {"role": "user", "content": "Read this."},
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "x"}, {"type": "input_file", "file_id": "f"}],
                },
            ]
        },
        "Content parts of type 'input_file' are not supported by tokenmart's Responses API: it takes text only "
        "(input_text, output_text).",
        "input.1.content.1.type",
        "unsupported_parameter",
    ),
    (
        {"input": [{"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}]},
        "Input items of type 'function_call' are not supported by tokenmart's Responses API: send messages "
        "(roles user, assistant, system, developer) only.",
        "input.0.type",
        "unsupported_parameter",
    ),
    (
        {"input": [{"role": "user", "content": "Hi"}, {"type": "function_call_output", "call_id": "c", "output": "9"}]},
        "Input items of type 'function_call_output' are not supported by tokenmart's Responses API: send "
        "messages (roles user, assistant, system, developer) only.",
        "input.1.type",
        "unsupported_parameter",
    ),
    (
        {"input": [{"role": "tool", "content": "9"}]},
        "Invalid value for 'input[0].role': 'tool'. Supported roles: user, assistant, system, developer.",
        "input.0.role",
        "invalid_value",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        "Invalid value for 'input[0].content[0].text': expected a string, got null.",
        "input.0.content.0.text",
        "invalid_value",
    ),
    (
        {"input": [{"role": "user", "content": 7}]},
        "Invalid value for 'input[0].content': expected a string or an array of text parts, got integer.",
        "input.0.content",
        "invalid_value",
    ),
    ({"input": ""}, "'input' must not be empty.", "input", "invalid_value"),
    ({"input": []}, "'input' must not be empty.", "input", "invalid_value"),
    ({}, "Missing required parameter: 'input'.", "input", "missing_required_parameter"),
    (
        {"input": "Hi", "tools": [{"type": "web_search"}]},
        "Tools of type 'web_search' are not supported by tokenmart's Responses API: only 'function' tools are.",
        "tools.0.type",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "tools": [{**WEATHER, "defer_loading": True}]},
        "Unknown parameter: 'tools[0].defer_loading'.",
        "tools.0.defer_loading",
        "unknown_parameter",
    ),
    (
        {"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "file_search"}},
        "tool_choice 'file_search' is not supported by tokenmart's Responses API: use 'none', 'auto', 'required' "
        'or {"type": "function", "name": ...}.',
        "tool_choice",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_time"}},
        "tool_choice names the function 'get_time', which 'tools' does not have.",
        "tool_choice",
        "invalid_value",
    ),
    (
        {"input": "Hi", "reasoning": {"effort": "high", "context": "auto"}},
        "Unknown parameter: 'reasoning.context'.",
        "reasoning.context",
        "unknown_parameter",
    ),
    ({"input": "Hi", "seed": 7}, "Unknown parameter: 'seed'.", "seed", "unknown_parameter"),
    (
        {"input": "Hi", "include": ["message.output_text.logprobs"]},
        "'include' is not supported by tokenmart's Responses API: it has nothing to include "
        "('message.output_text.logprobs').",
        "include",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "truncation": "auto"},
        "truncation 'auto' is not supported by tokenmart's Responses API: input longer than the model's context "
        "is refused, never cut ('disabled').",
        "truncation",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "background": True},
        "'background' is not supported by tokenmart's Responses API: responses are answered while the request is open.",
        "background",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "service_tier": "priority"},
        "service_tier 'priority' is not supported by tokenmart's Responses API: it serves 'auto' and 'default' "
        "(one tier).",
        "service_tier",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "top_logprobs": 3},
        "'top_logprobs' is not supported by tokenmart's Responses API.",
        "top_logprobs",
        "unsupported_parameter",
    ),
    (
        {"input": "Hi", "text": {"format": {"type": "json_schema", "schema": SCHEMA}}},
        "Missing required parameter: 'text.format.name'.",
        "text.format.name",
        "missing_required_parameter",
    ),
    (
        {"input": "Hi", "temperature": 2.5},
        "Invalid value for 'temperature': Input should be less than or equal to 2.",
        "temperature",
        "invalid_value",
    ),
    (
        {"input": "Hi", "max_output_tokens": "64"},
        "Invalid value for 'max_output_tokens': Input should be a valid integer.",
        "max_output_tokens",
        "invalid_value",
    ),
    (
        {"input": "Hi", "metadata": {f"k{i}": "v" for i in range(17)}},
        "'metadata' may hold at most 16 pairs.",
        "metadata",
        "invalid_value",
    ),
]


@pytest.mark.parametrize(("body", "message", "param", "code"), REFUSALS, ids=lambda v: v if isinstance(v, str) else "")
def test_what_tokenmart_cannot_serve_is_a_400_naming_the_param(
    body: dict[str, Any], message: str, param: str, code: str
) -> None:
    error = _refusal(body)
    assert error.body() == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(["model"])
    assert caught.value.message == "The request body must be a JSON object, not array."


# -- chat.completion -> Response ------------------------------------------------------------


def test_a_chat_completion_becomes_a_response() -> None:
    req = _request(instructions="Be brief.", metadata={"ticket": "T-1"}, temperature=0.5, max_output_tokens=32)
    response = chat_to_response(_chat({"content": "Hello there."}), req, completed_at=CREATED + 1)
    assert response == {
        "id": "resp_7f3a9c",
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "background": False,
        "completed_at": CREATED + 1,
        "error": None,
        "incomplete_details": None,
        "instructions": "Be brief.",
        "max_output_tokens": 32,
        "model": MODEL,
        "output": [
            {
                "id": "msg_7f3a9c_0",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello there.", "annotations": [], "logprobs": []}],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": None,
        "service_tier": "default",
        "temperature": 0.5,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": None,
        "truncation": "disabled",
        "usage": {
            "input_tokens": 21,
            "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 26,
            "cost": 0.000123,
        },
        "user": None,
        "metadata": {"ticket": "T-1"},
    }
    parsed = _sdk_response(response)
    assert parsed.output_text == "Hello there."
    assert parsed.usage is not None and parsed.usage.input_tokens_details.cached_tokens == 16


def test_an_answer_cut_at_max_output_tokens_is_incomplete() -> None:
    response = chat_to_response(_chat({"content": "One, two, thr"}, "length"), _request(max_output_tokens=5))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["completed_at"] is None
    assert response["output"][0]["status"] == "incomplete"
    assert _sdk_response(response).output_text == "One, two, thr"


def test_tool_calls_become_function_call_items() -> None:
    calls = [
        {"id": "call_a1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_b2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
    ]
    req = _request(tools=[WEATHER], tool_choice="required")
    response = chat_to_response(_chat({"content": None, "tool_calls": calls}, "tool_calls"), req)
    assert response["status"] == "completed"
    assert response["output"] == [
        {
            "id": "fc_7f3a9c_0",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_a1",
            "name": "get_weather",
            "arguments": '{"city": "Oslo"}',
        },
        {
            "id": "fc_7f3a9c_1",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_b2",
            "name": "get_weather",
            "arguments": '{"city": "Rome"}',
        },
    ]
    assert response["tool_choice"] == "required"
    assert response["tools"] == [{**WEATHER, "strict": None}]
    assert _sdk_response(response).output_text == ""


def test_text_before_tool_calls_stays_a_message_ahead_of_them() -> None:
    calls = [{"id": "call_a1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    output = chat_to_response(_chat({"content": "Checking.", "tool_calls": calls}, "tool_calls"), _request())["output"]
    assert [(item["type"], item["id"]) for item in output] == [
        ("message", "msg_7f3a9c_0"),
        ("function_call", "fc_7f3a9c_1"),
    ]


def test_usage_without_cache_details_or_cost() -> None:
    plain = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert response_usage(plain) == {
        "input_tokens": 4,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 6,
    }
    assert response_usage({**plain, "prompt_tokens_details": None}, 0.5)["cost"] == 0.5  # type: ignore[index]
    assert response_usage(None) is None
    assert chat_to_response(_chat({"content": "x"}, usage=None), _request())["usage"] is None


def test_response_ids_come_from_chat_ids_and_lead_back_to_them() -> None:
    assert response_id_for("chatcmpl-7f3a9c") == "resp_7f3a9c"
    assert chat_id_for("resp_7f3a9c") == "chatcmpl-7f3a9c"
    assert chat_id_for(response_id_for("chatcmpl-req-42")) == "chatcmpl-req-42"
    with pytest.raises(BadRequest) as caught:
        chat_id_for("chatcmpl-7f3a9c")
    assert caught.value.param == "id"
    given = chat_to_response(_chat({"content": "x"}), _request(), response_id="resp_given")
    assert given["id"] == "resp_given" and given["output"][0]["id"] == "msg_given_0"


# -- chat.completion.chunk stream -> Responses events ---------------------------------------

FIVE_CHUNKS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hello"}),
    _chunk({"content": ", wor"}),
    _chunk({"content": "ld!"}, "stop"),
    _chunk(None, usage=USAGE),
]


def test_a_chat_stream_becomes_responses_events_whose_deltas_make_the_text() -> None:
    events = _run_stream(FIVE_CHUNKS, _request(stream=True))
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "Hello, world!"
    assert events[0]["response"]["id"] == "resp_7f3a9c" and events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == [] and events[0]["response"]["usage"] is None
    assert events[2]["item"] == {
        "id": "msg_7f3a9c_0",
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    assert events[7]["text"] == "Hello, world!"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["completed_at"] == CREATED + 2
    assert final["usage"] == {
        "input_tokens": 21,
        "input_tokens_details": {"cached_tokens": 16, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 26,
        "cost": 0.000123,
    }
    assert _sdk_response(final).output_text == "Hello, world!"


def test_stream_events_are_sent_as_openai_sends_them() -> None:
    stream = ResponseStream(_request(stream=True), response_id="resp_s1", created_at=CREATED)
    stream.start()
    lines = stream.feed(_chunk({"content": "Hi"}))
    assert lines[-1] == (
        "event: response.output_text.delta\n"
        'data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_s1_0","output_index":0,'
        '"content_index":0,"delta":"Hi","logprobs":[]}\n\n'
    )


def test_a_given_response_id_is_announced_by_start() -> None:
    stream = ResponseStream(_request(stream=True), response_id="resp_given", created_at=CREATED)
    started = _events(stream.start())
    assert [(event["type"], event["response"]["id"]) for event in started] == [
        ("response.created", "resp_given"),
        ("response.in_progress", "resp_given"),
    ]
    without_id = ResponseStream(_request(stream=True))
    assert without_id.start() == []  # announced by the first chunk, whose id names the response
    assert _events(without_id.feed(FIVE_CHUNKS[0]))[0]["response"]["id"] == "resp_7f3a9c"


def test_a_stream_cut_at_max_output_tokens_ends_incomplete() -> None:
    chunks = [_chunk({"content": "One, two, "}), _chunk({"content": "thr"}, "length"), _chunk(None, usage=USAGE)]
    events = _run_stream(chunks, _request(stream=True, max_output_tokens=5))
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["completed_at"] is None
    assert events[-2]["type"] == "response.output_item.done" and events[-2]["item"]["status"] == "incomplete"
    assert _sdk_response(final).output_text == "One, two, thr"


def _call_delta(index: int, **function: str) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": function}
    if "name" in function:
        call.update(id=f"call_{index}", type="function")
    return {"tool_calls": [call]}


def test_streamed_tool_calls_become_function_call_items() -> None:
    chunks = [
        _chunk({"role": "assistant", "content": "Checking."}),
        _chunk(_call_delta(0, name="get_weather", arguments="")),
        _chunk(_call_delta(0, arguments='{"city": ')),
        _chunk(_call_delta(0, arguments='"Oslo"}')),
        _chunk(_call_delta(1, name="get_weather", arguments='{"city": "Rome"}')),
        _chunk({}, "tool_calls"),
        _chunk(None, usage=USAGE),
    ]
    events = _run_stream(chunks, _request(stream=True, tools=[WEATHER]))
    assert [(event["type"], event.get("output_index")) for event in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.completed", None),
    ]
    assert events[8]["item"] == {
        "id": "fc_7f3a9c_1",
        "type": "function_call",
        "status": "in_progress",
        "call_id": "call_0",
        "name": "get_weather",
        "arguments": "",
    }
    assert events[11]["arguments"] == '{"city": "Oslo"}'
    final = events[-1]["response"]
    assert [(item["type"], item.get("call_id"), item.get("arguments")) for item in final["output"]] == [
        ("message", None, None),
        ("function_call", "call_0", '{"city": "Oslo"}'),
        ("function_call", "call_1", '{"city": "Rome"}'),
    ]
    assert final["status"] == "completed"
    assert _sdk_response(final).output_text == "Checking."


def test_a_failed_stream_ends_with_response_failed() -> None:
    error = {"error": {"message": "The model stopped while streaming; retry the request.", "type": "x", "code": "y"}}
    events = _run_stream([_chunk({"content": "Hel"}), error], _request(stream=True))
    assert [event["type"] for event in events][-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    final = events[-1]["response"]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "server_error",
        "message": "The model stopped while streaming; retry the request.",
    }
    assert final["output"][0]["status"] == "incomplete"
    told = _run_stream([_chunk({"content": "Hel"})], _request(stream=True), failed="Client went away.")
    assert told[-1]["response"]["error"]["message"] == "Client went away."


def test_finish_takes_the_usage_and_cost_it_is_given() -> None:
    given = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    events = _run_stream(FIVE_CHUNKS, _request(stream=True), usage=given, cost=0.25)
    assert events[-1]["response"]["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 1,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 4,
        "cost": 0.25,
    }
    without_usage = _run_stream(FIVE_CHUNKS[:-1], _request(stream=True))
    assert without_usage[-1]["response"]["usage"] is None


def test_an_empty_stream_is_one_empty_message() -> None:
    events = _run_stream([_chunk({"role": "assistant", "content": ""}, "stop")], _request(stream=True))
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert _sdk_response(events[-1]["response"]).output_text == ""


def test_nothing_is_fed_after_finish() -> None:
    stream = ResponseStream(_request(stream=True))
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed(FIVE_CHUNKS[1])
    with pytest.raises(RuntimeError):
        stream.finish()


# -- the official client, end to end over an in-process transport --------------------------


def _serve(request: httpx.Request) -> httpx.Response:
    """A stand-in for the ingress: parse, translate, answer with a fake chat pipeline's output."""
    try:
        req = parse_request(json.loads(request.content))
    except BadRequest as exc:
        return httpx.Response(exc.status_code, json=exc.body())
    assert _valid_chat_body(to_chat_request(req))["messages"][-1]["content"] == "Say hello."
    if not req.stream:
        return httpx.Response(200, json=chat_to_response(_chat({"content": "Hello, world!"}), req))
    stream = ResponseStream(req)
    lines = stream.start()
    for chunk in FIVE_CHUNKS:
        lines += stream.feed(chunk)
    lines += stream.finish()
    return httpx.Response(200, content="".join(lines).encode(), headers={"content-type": "text/event-stream"})


@pytest.fixture
def client() -> openai.OpenAI:
    transport = httpx.MockTransport(_serve)
    return openai.OpenAI(
        api_key="tm-test", base_url="http://tokenmart.test/v1", http_client=httpx.Client(transport=transport)
    )


def test_the_openai_client_reads_a_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Say hello.", instructions="Be kind.", store=False)
    assert response.id == "resp_7f3a9c" and response.output_text == "Hello, world!"
    assert response.usage is not None and response.usage.total_tokens == 26


def test_the_openai_client_reads_a_stream(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=[{"role": "user", "content": "Say hello."}]) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello, world!"
    assert final.status == "completed" and final.output_text == "Hello, world!"


def test_the_openai_client_gets_the_refusal_as_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="Say hello.", previous_response_id="resp_1")
    assert caught.value.param == "previous_response_id" and caught.value.code == "unsupported_parameter"
