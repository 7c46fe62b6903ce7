"""Client mistakes in chat content, text and template arguments are 400s that name the field.

Each case here used to reach the engine side and come back as a 5xx (which SDKs retry): a
content shape pydantic checks only lazily, a lone surrogate the tokenizer cannot encode, a
template argument that clashes with the template call. The rules run on Ray Serve LLM's /
vLLM's own request models, as the ingress does.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tokenmart.deployments.catalog import Listing
from tokenmart.deployments.errors import BadRequest
from tokenmart.deployments.ingress import create_fastapi_app
from tokenmart.deployments.ray_llm import ChatCompletionRequest, CompletionRequest, sanitize_chat_request
from tokenmart.deployments.validation import (
    MEDIA_PARTS,
    RESERVED_TEMPLATE_KWARGS,
    TEXT_PARTS,
    ChatRequest,
    TextCompletionRequest,
    object_fields,
    validate_request,
)

MODEL = "smollm2-135m-instruct"
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


def _listing(**fields: Any) -> Listing:
    return Listing.model_validate(
        {
            "id": MODEL,
            "owner": "huggingfacetb",
            "source": "builtin:smollm2-135m-instruct",
            "context_length": 2048,
            "pricing": {"prompt_usd_per_1m": "0.02", "completion_usd_per_1m": "0.04"},
            "accelerator": {"kind": "cpu"},
            **fields,
        }
    )


TEXT_ONLY = _listing()
MULTIMODAL = _listing(max_tokens_per_image=729)


def _chat(content: Any = "hi", **fields: Any) -> ChatCompletionRequest:
    """A chat body as the gateway sees it: parsed from JSON by the route's model, then materialised.

    JSON goes through `json.loads` as in FastAPI (pydantic's own JSON parser refuses lone
    surrogates, Python's does not).
    """
    raw = json.loads(json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}))
    return sanitize_chat_request(ChatRequest.model_validate(raw))


def _refused(body: Any, listing: Listing = TEXT_ONLY, *, chat: bool = True) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        validate_request(body, listing, chat=chat)
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    return info.value


# -- content shapes, checked on the raw JSON before pydantic's lazy parsing ---------------------

BAD_CONTENT = [
    pytest.param({"a": 1}, "messages.0.content", "invalid_value", id="object"),
    pytest.param({"type": "text", "text": "hi"}, "messages.0.content", "invalid_value", id="part-not-in-array"),
    pytest.param(5, "messages.0.content", "invalid_value", id="number"),
    pytest.param(True, "messages.0.content", "invalid_value", id="boolean"),
    pytest.param(["hi"], "messages.0.content.0", "invalid_value", id="bare-string-part"),
    pytest.param([None], "messages.0.content.0", "invalid_value", id="null-part"),
    pytest.param([["hi"]], "messages.0.content.0", "invalid_value", id="nested-array"),
    pytest.param([{"type": "bogus", "text": "hi"}], "messages.0.content.0.type", "invalid_value", id="unknown-type"),
    pytest.param([{"type": 7, "text": "hi"}], "messages.0.content.0.type", "invalid_value", id="numeric-type"),
    pytest.param([{"text": "hi"}], "messages.0.content.0.type", "missing_required_parameter", id="no-type"),
    pytest.param([{"type": "text"}], "messages.0.content.0.text", "invalid_value", id="text-without-text"),
    pytest.param([{"type": "text", "text": 5}], "messages.0.content.0.text", "invalid_value", id="text-not-string"),
    pytest.param([{"type": "refusal", "text": "x"}], "messages.0.content.0.refusal", "invalid_value", id="refusal"),
    pytest.param([{"type": "input_text", "text": "hi"}], "messages.0.content.0.type", "invalid_value", id="input_text"),
    pytest.param([{"type": "file", "file": {"file_id": "f"}}], "messages.0.content.0.type", "invalid_value", id="file"),
    pytest.param(
        [{"type": "image_embeds", "image_embeds": "AAAA"}], "messages.0.content.0.type", "invalid_value", id="embeds"
    ),
    pytest.param(
        [{"type": "prompt_embeds", "data": "AAAA"}], "messages.0.content.0.type", "invalid_value", id="prompt-embeds"
    ),
    pytest.param(
        [{"type": "text", "text": "ok"}, {"type": "bogus"}], "messages.0.content.1.type", "invalid_value", id="second"
    ),
]


@pytest.mark.parametrize(("content", "param", "code"), BAD_CONTENT)
def test_malformed_content_is_refused_when_the_body_is_parsed(content: Any, param: str, code: str):
    with pytest.raises(BadRequest) as info:
        ChatRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": content}]})
    assert (info.value.param, info.value.code) == (param, code)


@pytest.mark.parametrize(("content", "param", "code"), BAD_CONTENT)
def test_malformed_content_fails_the_base_model_lazily(content: Any, param: str, code: str):
    """Why the check runs on the raw JSON: the base model accepts these and fails when the gateway
    first iterates the content (a ValueError, which was a 500), or lets the part reach the engine."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    try:
        parsed = ChatCompletionRequest.model_validate(body)
        sanitize_chat_request(parsed)
    except ValueError:
        return
    assert not isinstance(parsed.messages[0]["content"], str)  # it would have reached the engine


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_null_content_is_refused_naming_the_content_not_the_role(role: str):
    message = {"role": role, "content": None, **({"tool_call_id": "call_1"} if role == "tool" else {})}
    with pytest.raises(BadRequest) as info:
        ChatRequest.model_validate({"model": MODEL, "messages": [message]})
    assert info.value.param == "messages.0.content"


def test_an_assistant_message_of_tool_calls_only_may_have_null_content():
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    validate_request(_chat(messages=messages), TEXT_ONLY, chat=True)


def test_a_bad_part_in_a_later_message_is_named_by_its_index():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}, {"kind": "x"}]},
    ]
    with pytest.raises(BadRequest) as info:
        ChatRequest.model_validate({"model": MODEL, "messages": messages})
    assert info.value.param == "messages.1.content.2.type"


@pytest.mark.parametrize(
    "content",
    [
        "hi",
        [],
        [{"type": "text", "text": "hi"}],
        [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
        [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    ],
)
def test_well_formed_text_content_passes_both_checks(content: Any):
    validate_request(_chat(content), TEXT_ONLY, chat=True)


@pytest.mark.parametrize("kind", sorted(TEXT_PARTS))
def test_every_text_part_type_is_accepted_in_assistant_history(kind: str):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": kind, TEXT_PARTS[kind]: "earlier"}]},
        {"role": "user", "content": "and now?"},
    ]
    body = ChatRequest.model_validate({"model": MODEL, "messages": messages})
    validate_request(sanitize_chat_request(body), TEXT_ONLY, chat=True)


def test_the_accepted_part_types_all_parse_in_the_engines_request_model():
    """Nothing accepted here may fail the request model later (each passes its lazy validation)."""
    parts = [{"type": kind, field: "x"} for kind, field in TEXT_PARTS.items()]
    parts += [
        IMAGE,
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
    ]
    assert {part["type"] for part in parts} == set(TEXT_PARTS) | set(MEDIA_PARTS)
    body = _chat(parts)
    assert body.messages[0]["content"] == parts


# -- what the listing can take ------------------------------------------------------------------


def test_a_text_only_listing_refuses_an_image_part_naming_it():
    error = _refused(_chat([{"type": "text", "text": "what is this?"}, IMAGE]))
    assert error.param == "messages.0.content.1"
    assert "'image_url'" in error.message and "text only" in error.message


def test_a_multimodal_listing_accepts_image_parts():
    body = _chat([{"type": "text", "text": "what is this?"}, IMAGE, {**IMAGE, "image_url": {"url": "data:,x"}}])
    validate_request(body, MULTIMODAL, chat=True)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}},
        {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}},
    ],
)
@pytest.mark.parametrize("listing", [TEXT_ONLY, MULTIMODAL], ids=["text-only", "multimodal"])
def test_audio_and_video_parts_are_refused_on_every_listing(part: dict[str, Any], listing: Listing):
    error = _refused(_chat([part]), listing)
    assert error.param == "messages.0.content.0"
    assert repr(part["type"]) in error.message


@pytest.mark.parametrize(
    ("image_url", "param"),
    [
        ("https://example.com/cat.png", "messages.0.content.0.image_url"),  # a bare string
        ({}, "messages.0.content.0.image_url"),
        ({"url": ""}, "messages.0.content.0.image_url"),
        ({"url": 5}, "messages.0.content.0.image_url"),
        ({"url": "https://example.com/cat.png", "detail": "ultra"}, "messages.0.content.0.image_url.detail"),
    ],
)
def test_a_malformed_image_part_is_refused_when_the_body_is_parsed(image_url: Any, param: str):
    """The base model would accept these and fail later, lazily; so the shape is checked at parsing."""
    with pytest.raises(BadRequest) as info:
        _chat([{"type": "image_url", "image_url": image_url}])
    assert info.value.param == param


# -- lone surrogates ---------------------------------------------------------------------------


def test_a_lone_surrogate_cannot_be_encoded_which_is_why_it_is_refused():
    with pytest.raises(UnicodeEncodeError):
        json.loads('"\\ud800"').encode()
    assert json.loads('"\\ud83d\\ude00"').encode() == "😀".encode()  # a pair is fine


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ("\ud800", "messages.0.content"),
        ("abc \udfff def", "messages.0.content"),
        ([{"type": "text", "text": "ok"}, {"type": "text", "text": "x\ud800"}], "messages.0.content.1.text"),
    ],
)
def test_a_lone_surrogate_in_a_chat_message_is_400_naming_the_field(content: Any, param: str):
    error = _refused(_chat(content))
    assert error.param == param
    assert "surrogate" in error.message
    assert "\ud800" not in error.message and "\udfff" not in error.message  # the message itself encodes


def test_a_lone_surrogate_in_a_message_name_or_tool_call_is_refused():
    messages = [{"role": "user", "content": "hi", "name": "bob\ud800"}]
    assert _refused(_chat(**{"messages": messages})).param == "messages.0.name"


@pytest.mark.parametrize(
    ("prompt", "param"),
    [("\ud800", "prompt"), (["fine", "bad \ud800"], "prompt.1")],
)
def test_a_lone_surrogate_in_a_completions_prompt_is_400_naming_the_field(prompt: Any, param: str):
    body = CompletionRequest.model_validate(json.loads(json.dumps({"model": MODEL, "prompt": prompt})))
    error = _refused(body, chat=False)
    assert error.param == param


def test_a_lone_surrogate_in_another_field_is_refused_too():
    assert _refused(_chat(stop=["ok", "\ud800"])).param == "stop.1"
    assert _refused(_chat(chat_template_kwargs={"persona": "\udc00"})).param == "chat_template_kwargs.persona"


def test_valid_unicode_passes():
    validate_request(_chat("héllo wörld 😀 你好"), TEXT_ONLY, chat=True)
    validate_request(CompletionRequest.model_validate({"model": MODEL, "prompt": "😀"}), TEXT_ONLY, chat=False)


# -- template arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    sorted(
        {
            "conversation",
            "return_assistant_tokens_mask",
            "tools",
            "documents",
            "chat_template",
            "add_generation_prompt",
            "continue_final_message",
            "tokenize",
            "return_dict",
            "messages",
            "tokenizer",
            "padding",
            "truncation",
            "max_length",
            "return_tensors",
        }
    ),
)
def test_template_kwargs_that_clash_with_the_template_call_are_400(key: str):
    error = _refused(_chat(chat_template_kwargs={"enable_thinking": False, key: []}))
    assert error.param == "chat_template_kwargs"
    assert repr(key) in error.message


def test_the_reserved_template_kwargs_cover_every_argument_of_the_template_call():
    """Parity with transformers: each named parameter of apply_chat_template would clash."""
    from transformers import PythonBackend

    parameters = inspect.signature(PythonBackend.apply_chat_template).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    assert named <= RESERVED_TEMPLATE_KWARGS, named - RESERVED_TEMPLATE_KWARGS


def test_template_variables_pass():
    validate_request(_chat(chat_template_kwargs={"enable_thinking": False, "persona": "pirate"}), TEXT_ONLY, chat=True)


def test_a_request_level_chat_template_is_400():
    error = _refused(_chat(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"))
    assert error.param == "chat_template"


# -- over HTTP: the envelope -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = create_fastapi_app()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> dict:
        return {"messages": len(body.messages)}

    @app.post("/v1/completions")
    async def completions(body: TextCompletionRequest) -> dict:
        return {"prompt": body.prompt}

    return TestClient(app, raise_server_exceptions=False)


NOT_OBJECTS = [(True, "a boolean"), ([1], "an array"), ("json", "a string"), (3, "a number")]


@pytest.mark.parametrize("field", ["structured_outputs", "response_format", "stream_options", "logit_bias"])
@pytest.mark.parametrize(("value", "kind"), NOT_OBJECTS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_non_object_where_an_object_goes_is_400_naming_the_field(
    client: TestClient, path: str, field: str, value: Any, kind: str
):
    """vLLM's own validators call `.get` on `structured_outputs` before pydantic checks its type:
    a boolean or a list there was an AttributeError, a 500."""
    content = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    response = client.post(path, json={"model": MODEL, **content, field: value})
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {
            "message": f"Invalid type for '{field}': expected an object, but got {kind} instead.",
            "type": "invalid_request_error",
            "param": field,
            "code": "invalid_type",
        }
    }


def test_every_object_field_of_both_requests_is_checked():
    assert {"structured_outputs", "response_format", "stream_options", "logit_bias"} <= set(
        object_fields(CompletionRequest)
    )
    assert {"structured_outputs", "chat_template_kwargs", "stream_options"} <= set(object_fields(ChatCompletionRequest))
    assert "messages" not in object_fields(ChatCompletionRequest) and "prompt" not in object_fields(CompletionRequest)


@pytest.mark.parametrize(("content", "param", "code"), BAD_CONTENT)
def test_malformed_content_over_http_is_the_400_envelope(client: TestClient, content: Any, param: str, code: str):
    response = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": content}]}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
