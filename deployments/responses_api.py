"""OpenAI's Responses API (`POST /v1/responses`) served through the chat completions pipeline.

The ingress parses the body with `parse_request`, sends `to_chat_request(req)` through the
billed chat path, and turns the answer back: a whole chat.completion with `chat_to_response`,
a stream of chat.completion.chunk dicts with a `ResponseStream`. Nothing here talks to Ray,
Redis or HTTP; the shapes follow `openai.types.responses` (the SDK's own models check them in
tests/unit/test_responses_api.py).

Which request fields do what:

- Served: `model`, `input` (a string, or messages of role user, assistant, system or
  developer whose content is a string or `input_text` / `output_text` parts), `instructions`
  (a system message ahead of the input), `max_output_tokens` (chat `max_tokens`),
  `temperature`, `top_p`, `stream`, `user`, `tools` (function tools), `tool_choice`,
  `parallel_tool_calls`, `text.format` (chat `response_format`), `reasoning.effort` (chat
  `reasoning_effort`), `metadata` (echoed on the response, at most 16 pairs).
- Accepted and ignored: `store` (tokenmart stores no responses: the answer is billed and
  its generation record kept, `GET /v1/generation?id=<chat id>`, but there is no
  `GET /v1/responses/{id}`), `stream_options` (no obfuscation padding is added),
  `prompt_cache_key` and `prompt_cache_retention` (the engine's prefix cache needs no key),
  `safety_identifier`, `max_tool_calls` (it counts built-in tools, which tokenmart has none
  of), `text.verbosity`, `reasoning.summary` and `reasoning.generate_summary` (no reasoning
  items are returned), and the values that mean what tokenmart does anyway: `service_tier`
  auto or default, `truncation` disabled, `background` false, an empty `include`,
  `top_logprobs` 0.
- Refused with a 400 naming the param: `previous_response_id` and `conversation` (nothing is
  stored to continue from), `prompt`, `context_management`, `moderation`,
  `access_programs`, `background_options`, `image`, `prompt_cache_options`, `background`
  true, a non-empty `include`, `truncation` auto, `top_logprobs` above 0, other service
  tiers, tools other than functions, `tool_choice` other than none/auto/required/a named
  function, input items other than messages (`function_call`, `function_call_output`,
  `reasoning`, `item_reference`, ...), content parts other than text (`input_image`,
  `input_file`, `input_audio`), and any field the API does not have ("Unknown parameter").
  A null value is taken as the field being absent.

Ids: a response's id is its chat completion's with `chatcmpl-` replaced by `resp_`
(`response_id_for`), so `chat_id_for` finds the generation record that settlement wrote
under the chat id. Output item ids are `msg_` / `fc_` + the same suffix + `_<output index>`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import BadRequest

__all__ = [
    "ResponseStream",
    "ResponsesRequest",
    "chat_id_for",
    "chat_to_response",
    "parse_request",
    "response_id_for",
    "response_usage",
    "sse",
    "to_chat_request",
]

CHAT_ID_PREFIX = "chatcmpl-"
RESPONSE_ID_PREFIX = "resp_"
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

# Fields of the real API that tokenmart refuses whenever they are set (not null): why.
REFUSED_FIELDS: dict[str, str] = {
    "previous_response_id": "tokenmart stores no responses; send the whole conversation in 'input'",
    "conversation": "tokenmart stores no conversations; send the whole conversation in 'input'",
    "prompt": "tokenmart has no stored prompts; send the text in 'instructions' and 'input'",
    "context_management": "tokenmart does not compact conversations",
    "moderation": "tokenmart does not moderate responses",
    "access_programs": "tokenmart has no access programs",
    "background_options": "tokenmart runs no background responses",
    "image": "tokenmart's Responses API takes text only",
    "prompt_cache_options": "the engine's prefix cache needs no options",
}
INPUT_ROLES = ("user", "assistant", "system", "developer")
TEXT_PART_TYPES = ("input_text", "output_text")
SERVICE_TIERS = ("auto", "default")
TOOL_CHOICE_MODES = ("none", "auto", "required")
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}
UNSUPPORTED = "unsupported_parameter"


def _unsupported(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code=UNSUPPORTED)


def _where(loc: tuple[Any, ...] | list[Any]) -> tuple[str, str]:
    """(the path as a message shows it, `input[0].content`; as `param` names it, `input.0.content`).

    pydantic puts the union member it tried (`str`, `list[TextPart]`) in a location; that is no field."""
    loc = [part for part in loc if not (isinstance(part, str) and (part == "str" or "[" in part))]
    shown = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return shown, ".".join(str(part) for part in loc)


def _kind(value: Any) -> str:
    kinds = {bool: "boolean", str: "string", list: "array", dict: "object", float: "number", int: "integer"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# -- the request ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """Text content; `output_text` parts come back when a client resends earlier output."""

    type: Literal["input_text", "output_text"]
    text: StrictStr
    # Carried by output_text parts copied from an earlier response; ignored.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: StrictStr | list[TextPart]
    # Carried by output messages copied from an earlier response; ignored.
    id: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionTool(_Strict):
    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class TextFormat(_Strict):
    """`text.format`: text, json_object, or json_schema (with its name and schema)."""

    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: StrictStr | None = None
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> TextFormat:
        if self.type == "json_schema":
            for name, value in (("name", self.name), ("schema", self.schema_)):
                if value is None:
                    raise BadRequest(
                        f"Missing required parameter: 'text.format.{name}'.",
                        param=f"text.format.{name}",
                        code="missing_required_parameter",
                    )
        else:
            for name, value in (
                ("name", self.name),
                ("schema", self.schema_),
                ("description", self.description),
                ("strict", self.strict),
            ):
                if value is not None:
                    raise BadRequest(
                        f"'text.format.{name}' is only for the json_schema format, not {self.type!r}.",
                        param=f"text.format.{name}",
                    )
        return self

    def as_dict(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        return {
            "type": "json_schema",
            "name": self.name,
            "schema": self.schema_,
            "description": self.description,
            "strict": self.strict,
        }


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # ignored


class ReasoningConfig(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # ignored: no reasoning items
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # ignored, as summary


class StreamOptions(_Strict):
    include_obfuscation: StrictBool | None = None  # ignored: no obfuscation padding


class ResponsesRequest(_Strict):
    """A `POST /v1/responses` body (see the module docstring for what each field does)."""

    model: StrictStr
    input: list[InputMessage]  # a string arrives as one user message
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    stream: StrictBool = False
    user: StrictStr | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    # Accepted and ignored.
    store: StrictBool | None = None
    stream_options: StreamOptions | None = None
    prompt_cache_key: StrictStr | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: StrictStr | None = None
    max_tool_calls: StrictInt | None = Field(default=None, ge=0)
    service_tier: StrictStr | None = None
    truncation: StrictStr | None = None
    background: StrictBool | None = None
    include: list[StrictStr] | None = None
    top_logprobs: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise BadRequest(f"The request body must be a JSON object, not {_kind(data)}.")
        for name, value in data.items():
            if name in REFUSED_FIELDS:
                if value is not None:
                    raise _unsupported(
                        f"'{name}' is not supported by tokenmart's Responses API: {REFUSED_FIELDS[name]}.", name
                    )
            elif name not in cls.model_fields:
                raise BadRequest(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
        return {name: value for name, value in data.items() if value is not None and name not in REFUSED_FIELDS}

    @field_validator("input", mode="before")
    @classmethod
    def _text_messages_only(cls, value: Any) -> Any:
        if value == "" or value == []:
            raise BadRequest("'input' must not be empty.", param="input")
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list):
            raise BadRequest(
                f"Invalid value for 'input': expected a string or an array of messages, got {_kind(value)}.",
                param="input",
            )
        for index, item in enumerate(value):
            _check_input_item(item, index)
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, list):
            for index, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if isinstance(kind, str) and kind != "function":
                    raise _unsupported(
                        f"Tools of type {kind!r} are not supported by tokenmart's Responses API: "
                        "only 'function' tools are.",
                        f"tools.{index}.type",
                    )
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise BadRequest(f"'metadata' may hold at most {MAX_METADATA_PAIRS} pairs.", param="metadata")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise BadRequest(
                    f"'metadata' keys may be at most {MAX_METADATA_KEY_CHARS} characters; {key[:20]!r}... is longer.",
                    param="metadata",
                )
            if len(text) > MAX_METADATA_VALUE_CHARS:
                raise BadRequest(
                    f"'metadata' values may be at most {MAX_METADATA_VALUE_CHARS} characters; that of {key!r} is "
                    "longer.",
                    param=f"metadata.{key}",
                )
        return value

    @model_validator(mode="after")
    def _served_values(self) -> ResponsesRequest:
        if self.service_tier is not None and self.service_tier not in SERVICE_TIERS:
            raise _unsupported(
                f"service_tier {self.service_tier!r} is not supported by tokenmart's Responses API: "
                "it serves 'auto' and 'default' (one tier).",
                "service_tier",
            )
        if self.truncation not in (None, "disabled"):
            raise _unsupported(
                f"truncation {self.truncation!r} is not supported by tokenmart's Responses API: input "
                "longer than the model's context is refused, never cut ('disabled').",
                "truncation",
            )
        if self.background:
            raise _unsupported(
                "'background' is not supported by tokenmart's Responses API: responses are answered "
                "while the request is open.",
                "background",
            )
        if self.include:
            raise _unsupported(
                f"'include' is not supported by tokenmart's Responses API: it has nothing to include "
                f"({', '.join(map(repr, self.include))}).",
                "include",
            )
        if self.top_logprobs:
            raise _unsupported("'top_logprobs' is not supported by tokenmart's Responses API.", "top_logprobs")
        self.tool_choice = _checked_tool_choice(self.tool_choice, self.tools)
        return self


def _check_input_item(item: Any, index: int) -> None:
    """Refuse, naming the param, input the chat pipeline cannot take: non-message items, non-text parts."""
    if not isinstance(item, dict):
        raise BadRequest(
            f"Invalid value for 'input[{index}]': expected a message object, got {_kind(item)}.", param=f"input.{index}"
        )
    kind = item.get("type")
    if kind is not None and kind != "message":
        raise _unsupported(
            f"Input items of type {kind!r} are not supported by tokenmart's Responses API: send messages "
            f"(roles {', '.join(INPUT_ROLES)}) only.",
            f"input.{index}.type",
        )
    role = item.get("role")
    if role not in INPUT_ROLES:
        raise BadRequest(
            f"Invalid value for 'input[{index}].role': {role!r}. Supported roles: {', '.join(INPUT_ROLES)}.",
            param=f"input.{index}.role",
        )
    # Content is checked here in full: pydantic's errors for a string-or-parts union name
    # the branch it tried, not the mistake.
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(
            f"Invalid value for 'input[{index}].content': expected a string or an array of text parts, "
            f"got {_kind(content)}.",
            param=f"input.{index}.content",
        )
    for number, part in enumerate(content):
        where, param = f"input[{index}].content[{number}]", f"input.{index}.content.{number}"
        if not isinstance(part, dict):
            raise BadRequest(
                f"Invalid value for '{where}': expected a content part object, got {_kind(part)}.", param=param
            )
        part_kind = part.get("type")
        unknown = sorted(set(part) - set(TextPart.model_fields))
        if part_kind not in TEXT_PART_TYPES:
            raise _unsupported(
                f"Content parts of type {part_kind!r} are not supported by tokenmart's Responses API: "
                f"it takes text only ({', '.join(TEXT_PART_TYPES)}).",
                f"{param}.type",
            )
        if not isinstance(part.get("text"), str):
            raise BadRequest(
                f"Invalid value for '{where}.text': expected a string, got {_kind(part.get('text'))}.",
                param=f"{param}.text",
            )
        if unknown:
            raise BadRequest(
                f"Unknown parameter: '{where}.{unknown[0]}'.", param=f"{param}.{unknown[0]}", code="unknown_parameter"
            )


def _checked_tool_choice(choice: Any, tools: list[FunctionTool]) -> Any:
    if choice is None or choice in TOOL_CHOICE_MODES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if set(choice) != {"type", "name"} or not isinstance(name, str):
            raise BadRequest(
                'A named \'tool_choice\' is {"type": "function", "name": <a function in \'tools\'>}.',
                param="tool_choice",
            )
        if name not in {tool.name for tool in tools}:
            raise BadRequest(
                f"tool_choice names the function {name!r}, which 'tools' does not have.", param="tool_choice"
            )
        return {"type": "function", "name": name}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise _unsupported(
        f"tool_choice {kind!r} is not supported by tokenmart's Responses API: use 'none', 'auto', "
        '\'required\' or {"type": "function", "name": ...}.',
        "tool_choice",
    )


def parse_request(body: Any) -> ResponsesRequest:
    """The request, or a 400 in the project's envelope naming the offending param."""
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = min(errors, key=lambda e: len(e.get("loc", ())))
        shown, param = _where(first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            raise BadRequest(f"Unknown parameter: '{shown}'.", param=param, code="unknown_parameter") from None
        if first.get("type") == "missing":
            raise BadRequest(
                f"Missing required parameter: '{shown}'.", param=param, code="missing_required_parameter"
            ) from None
        raise BadRequest(f"Invalid value for '{shown}': {first.get('msg')}.", param=param) from None


# -- request -> chat completions -----------------------------------------------------------


def _chat_content(content: str | list[TextPart]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part.text} for part in content]


def to_chat_request(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completions body that serves `req` through the billed chat pipeline."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages.extend({"role": m.role, "content": _chat_content(m.content)} for m in req.input)
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)} for tool in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice["name"]}}
        )
    text_format = req.text.format if req.text is not None else None
    if text_format is not None and text_format.type != "text":
        if text_format.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        else:
            schema = {"name": text_format.name, "schema": text_format.schema_}
            for name in ("description", "strict"):
                if getattr(text_format, name) is not None:
                    schema[name] = getattr(text_format, name)
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
    if req.reasoning is not None and req.reasoning.effort is not None:
        body["reasoning_effort"] = req.reasoning.effort
    return body


# -- chat completions -> Response ------------------------------------------------------------


def response_id_for(chat_id: str) -> str:
    """`chatcmpl-X` -> `resp_X`: stable, and `chat_id_for` turns it back."""
    return RESPONSE_ID_PREFIX + chat_id.removeprefix(CHAT_ID_PREFIX)


def chat_id_for(response_id: str) -> str:
    """The chat completion id (under which the generation record is kept) of a response id."""
    if not response_id.startswith(RESPONSE_ID_PREFIX):
        raise BadRequest(f"{response_id!r} is not a response id (they start with {RESPONSE_ID_PREFIX!r}).", param="id")
    return CHAT_ID_PREFIX + response_id.removeprefix(RESPONSE_ID_PREFIX)


def _new_response_id() -> str:
    return RESPONSE_ID_PREFIX + uuid.uuid4().hex


def _item_id(kind: str, response_id: str, output_index: int) -> str:
    return f"{kind}_{response_id.removeprefix(RESPONSE_ID_PREFIX)}_{output_index}"


def response_usage(chat_usage: dict[str, Any] | None, cost: float | None = None) -> dict[str, Any] | None:
    """A chat usage as a Response's, with tokenmart's charge (`cost`, USD) when there is one."""
    if chat_usage is None:
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    prompt_details = chat_usage.get("prompt_tokens_details") or {}
    completion_details = chat_usage.get("completion_tokens_details") or {}
    usage: dict[str, Any] = {
        "input_tokens": prompt,
        # The engine reports prefix-cache hits; it does not report cache writes.
        "input_tokens_details": {
            "cached_tokens": int(prompt_details.get("cached_tokens") or 0),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": int(completion_details.get("reasoning_tokens") or 0)},
        "total_tokens": int(chat_usage.get("total_tokens") or prompt + completion),
    }
    if cost is None:
        cost = chat_usage.get("cost")
    if cost is not None:
        usage["cost"] = cost
    return usage


def _tool_echo(tool: FunctionTool) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": tool.strict,
    }


def _response(
    req: ResponsesRequest,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    completed_at: int | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    reason = INCOMPLETE_REASONS.get(finish_reason or "") if status == "incomplete" else None
    text_format = req.text.format if req.text is not None else None
    text: dict[str, Any] = {"format": text_format.as_dict() if text_format is not None else {"type": "text"}}
    if req.text is not None and req.text.verbosity is not None:
        text["verbosity"] = req.text.verbosity
    reasoning = None
    if req.reasoning is not None:
        reasoning = {"effort": req.reasoning.effort, "summary": req.reasoning.summary or req.reasoning.generate_summary}
    choice = req.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": completed_at if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": reason} if reason else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
        "previous_response_id": None,
        "reasoning": reasoning,
        "service_tier": "default",
        "temperature": req.temperature,
        "text": text,
        "tool_choice": "auto" if choice is None else choice,
        "tools": [_tool_echo(tool) for tool in req.tools],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
        "metadata": dict(req.metadata or {}),
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason in INCOMPLETE_REASONS else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [_text_part(text)]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def chat_to_response(
    chat: dict[str, Any],
    req: ResponsesRequest,
    *,
    response_id: str | None = None,
    completed_at: int | None = None,
) -> dict[str, Any]:
    """A whole chat.completion as a Response object (`completed_at` defaults to now)."""
    response_id = response_id or (response_id_for(chat["id"]) if isinstance(chat.get("id"), str) else None)
    response_id = response_id or _new_response_id()
    choices = chat.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    finish_reason = choice.get("finish_reason")
    status = _status(finish_reason)
    item_status = "completed" if status == "completed" else "incomplete"
    output: list[dict[str, Any]] = []
    calls = message.get("tool_calls") or []
    content = message.get("content")
    if content or not calls:
        output.append(_message_item(_item_id("msg", response_id, 0), content or "", item_status))
    for call in calls:
        function = call.get("function") or {}
        index = len(output)
        output.append(
            _call_item(
                _item_id("fc", response_id, index),
                call.get("id") or f"call_{response_id.removeprefix(RESPONSE_ID_PREFIX)}_{index}",
                function.get("name") or "",
                function.get("arguments") or "",
                item_status,
            )
        )
    return _response(
        req,
        response_id=response_id,
        created_at=int(chat.get("created") or time.time()),
        model=chat.get("model") or req.model,
        status=status,
        output=output,
        usage=response_usage(chat.get("usage")),
        finish_reason=finish_reason,
        completed_at=completed_at if completed_at is not None else int(time.time()),
    )


# -- chat completion chunks -> Responses streaming events -------------------------------------


def sse(event: dict[str, Any]) -> str:
    """One streaming event as OpenAI sends it: its type on the `event:` line, then its JSON."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


@dataclass
class _Item:
    kind: Literal["message", "function_call"]
    output_index: int
    id: str
    call_id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)  # the text, or the arguments
    done: bool = False
    status: str = "in_progress"

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "message":
            return _message_item(self.id, self.text, self.status)
        return _call_item(self.id, self.call_id, self.name, self.text, self.status)


class ResponseStream:
    """Turns a chat.completion.chunk stream into Responses streaming events (SSE strings).

    `start()`, then `feed()` each chunk (usage-only chunks and `{"error": ...}` events too),
    then `finish()`. An output item is closed (its `.done` events sent) when the next one
    begins, as OpenAI orders them; the last one is closed by `finish()`.

    Without a `response_id`, the id comes from the first chunk's (`response_id_for`), so it
    finds the generation record; `start()` then returns nothing and the first `feed()` (or
    `finish()`) sends response.created and response.in_progress ahead of its own events.
    """

    def __init__(
        self,
        req: ResponsesRequest,
        *,
        response_id: str | None = None,
        created_at: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.req = req
        self.response_id = response_id
        self.created_at = created_at
        self.model = req.model
        self._clock = clock
        self._sequence = 0
        self._announced = False
        self._finished = False
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._error: str | None = None

    def _event(self, type_: str, **fields: Any) -> str:
        event = {"type": type_, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse(event)

    def _snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        assert self.response_id is not None and self.created_at is not None
        return _response(
            self.req,
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=[item.as_dict() for item in self._items],
            **extra,
        )

    def _announce(self) -> list[str]:
        self._announced = True
        if self.response_id is None:
            self.response_id = _new_response_id()
        if self.created_at is None:
            self.created_at = int(self._clock())
        return [
            self._event("response.created", response=self._snapshot("in_progress")),
            self._event("response.in_progress", response=self._snapshot("in_progress")),
        ]

    def start(self) -> list[str]:
        if self._announced or self.response_id is None:
            return []
        return self._announce()

    def feed(self, chunk: dict[str, Any]) -> list[str]:
        if self._finished:
            raise RuntimeError("the stream has finished; feed() after finish()")
        if "error" in chunk:
            error = chunk["error"]
            self._error = (error.get("message") if isinstance(error, dict) else None) or str(error)
            return []
        events: list[str] = []
        if not self._announced:
            if self.response_id is None and isinstance(chunk.get("id"), str):
                self.response_id = response_id_for(chunk["id"])
            if self.created_at is None and isinstance(chunk.get("created"), int):
                self.created_at = chunk["created"]
            if isinstance(chunk.get("model"), str):
                self.model = chunk["model"]
            events += self._announce()
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if (choice.get("index") or 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def _begin(self, item: _Item, first_part: dict[str, Any] | None = None) -> list[str]:
        events = self._close("completed")
        self._items.append(item)
        self._open = item
        added = item.as_dict()
        if item.kind == "message":
            added["content"] = []  # its part is announced next, by content_part.added
        events.append(self._event("response.output_item.added", output_index=item.output_index, item=added))
        if first_part is not None:
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=item.output_index,
                    content_index=0,
                    part=first_part,
                )
            )
        return events

    def _message(self) -> _Item:
        assert self.response_id is not None
        index = len(self._items)
        return _Item("message", index, _item_id("msg", self.response_id, index))

    def _text(self, text: str) -> list[str]:
        events: list[str] = []
        item = self._open
        if item is None or item.kind != "message":
            item = self._message()
            events += self._begin(item, _text_part(""))
        item.parts.append(text)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item.id,
                output_index=item.output_index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _call(self, call: dict[str, Any]) -> list[str]:
        events: list[str] = []
        function = call.get("function") or {}
        number = int(call.get("index") or 0)
        item = self._calls.get(number)
        if item is None:
            assert self.response_id is not None
            index = len(self._items)
            item = _Item(
                "function_call",
                index,
                _item_id("fc", self.response_id, index),
                call_id=call.get("id") or f"call_{self.response_id.removeprefix(RESPONSE_ID_PREFIX)}_{index}",
                name=function.get("name") or "",
            )
            self._calls[number] = item
            events += self._begin(item)
        elif function.get("name") and not item.name:
            item.name = function["name"]
        arguments = function.get("arguments")
        if arguments:
            item.parts.append(arguments)
            # An engine never goes back to an earlier call; if one did, the final response
            # still carries its whole arguments, but no event follows that item's `.done`.
            if not item.done:
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=item.id,
                        output_index=item.output_index,
                        delta=arguments,
                    )
                )
        return events

    def _close(self, status: str) -> list[str]:
        item, self._open = self._open, None
        if item is None:
            return []
        item.done, item.status = True, status
        where = {"item_id": item.id, "output_index": item.output_index}
        if item.kind == "message":
            events = [
                self._event("response.output_text.done", **where, content_index=0, text=item.text, logprobs=[]),
                self._event("response.content_part.done", **where, content_index=0, part=_text_part(item.text)),
            ]
        else:
            events = [self._event("response.function_call_arguments.done", **where, arguments=item.text)]
        events.append(self._event("response.output_item.done", output_index=item.output_index, item=item.as_dict()))
        return events

    def finish(
        self, usage: dict[str, Any] | None = None, *, cost: float | None = None, failed: str | None = None
    ) -> list[str]:
        """The closing events. `usage` (the chat usage) defaults to that of a usage chunk fed,
        `cost` to that usage's `cost`; `failed` (a message), or an error event fed, makes it
        response.failed. An answer cut at max_output_tokens is response.incomplete."""
        if self._finished:
            raise RuntimeError("the stream has finished already")
        self._finished = True
        events = [] if self._announced else self._announce()
        failure = failed or self._error
        status = "failed" if failure else _status(self._finish_reason)
        item_status = "completed" if status == "completed" else "incomplete"
        if not self._items and not failure:
            events += self._begin(self._message(), _text_part(""))  # an empty answer is one empty message
        events += self._close(item_status)
        snapshot = self._snapshot(
            status,
            usage=response_usage(usage if usage is not None else self._usage, cost),
            finish_reason=self._finish_reason,
            completed_at=int(self._clock()),
            error={"code": "server_error", "message": failure} if failure else None,
        )
        events.append(self._event(f"response.{status}", response=snapshot))
        return events
