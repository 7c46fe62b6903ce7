"""Request rules checked before anything reaches an engine.

Every client mistake is answered here with a 400 in the envelope (naming the offending
`param`), so bad input never reaches an engine and never looks like an outage (a 5xx, which
SDKs retry). Engine errors that describe the request are mapped back to 4xx by
`errors.engine_error`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, Field, model_validator

from .catalog import Listing
from .errors import BadRequest
from .ray_llm import ChatCompletionRequest, CompletionRequest, EmbeddingCompletionRequest
from .tokens import prompt_count

ALLOWED_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_CHOICES = 16


def validate_request(body: Any, listing: Listing, *, chat: bool) -> None:
    """Marketplace rules checked before anything reaches an engine."""
    if chat:
        if not body.messages:
            raise BadRequest("'messages' must contain at least one message.", param="messages")
        for index, message in enumerate(body.messages):
            role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
            if role not in ALLOWED_ROLES:
                raise BadRequest(
                    f"Invalid value for 'messages[{index}].role': {role!r}. "
                    f"Supported roles: {', '.join(sorted(ALLOWED_ROLES))}.",
                    param=f"messages.{index}.role",
                )
        check_tool_choice(body, listing)
        check_messages(body.messages, listing)
        check_template_arguments(body)
    elif body.prompt is None or body.prompt == "" or body.prompt == []:
        raise BadRequest("'prompt' must not be empty.", param="prompt")
    check_text(body)

    n = body.n if body.n is not None else 1
    if not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"'n' must be between 1 and {MAX_CHOICES}.", param="n")

    fields = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for name in fields:
        value = getattr(body, name, None)
        if value is not None and not 1 <= value < listing.context_length:
            raise BadRequest(
                f"'{name}' must be between 1 and {listing.context_length - 1} for model {listing.id!r}.",
                param=name,
            )
    if all(getattr(body, name, None) is None for name in fields):
        # Every request gets a finite output budget, so what it can cost is bounded.
        setattr(body, fields[-1], listing.default_max_tokens)


def check_tool_choice(body: Any, listing: Listing) -> None:
    """Tool calls need the listing's tool parser (catalog `engine.tool_parser`).

    Without one the engine would refuse them with a message about its own flags; the customer
    gets the marketplace's reason instead, before any credit is held. `tool_choice: "none"`
    (tools as context only) is served by every listing. Requests with tools and no
    tool_choice mean "auto" (the OpenAI default, which the request model applies).
    """
    choice = getattr(body, "tool_choice", None)
    if listing.engine.tool_parser is not None or choice is None or choice == "none":
        return
    function = getattr(choice, "function", None) or (choice.get("function") if isinstance(choice, dict) else None)
    if function is not None:
        name = function.get("name") if isinstance(function, dict) else getattr(function, "name", None)
        wanted = f"a named function ({name!r})"
    else:
        wanted = repr(choice)
    raise BadRequest(
        f"Model {listing.id!r} does not support tool calling: tool_choice {wanted} needs a tool parser, "
        "which its listing does not set. Send tool_choice 'none' to pass tools as context only.",
        param="tool_choice",
    )


def max_output_tokens(body: Any, *, chat: bool) -> int:
    """The most tokens the engine may generate: the budget, for each choice of each prompt."""
    budget = getattr(body, "max_completion_tokens", None) or body.max_tokens
    return budget * (body.n or 1) * (1 if chat else prompt_count(body))


# -- message content ----------------------------------------------------------------------
# What a message's `content` may be: a string, null, or an array of typed parts. This is what
# both the request model (Ray Serve LLM's, from vLLM) and vLLM's chat renderer
# (`vllm/entrypoints/chat_utils.py`) take, narrowed to what the marketplace can price:
# text-like parts always, images only on listings that bound an image's tokens
# (`Listing.max_tokens_per_image`), and no audio or video (no listing bounds those).

# Part type -> the field holding its text.
TEXT_PARTS = {"text": "text", "refusal": "refusal", "thinking": "thinking"}
# Part type -> its modality. Images need a multimodal listing; audio and video no listing serves.
MEDIA_PARTS = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}
IMAGE_DETAILS = frozenset({"auto", "low", "high"})
# Roles whose messages must carry content (an assistant message may be only tool calls).
TEXT_REQUIRED_ROLES = frozenset({"system", "developer", "user", "tool"})


def _part_types() -> str:
    return ", ".join(sorted({**TEXT_PARTS, **MEDIA_PARTS}))


def check_messages(messages: Any, listing: Listing | None = None) -> None:
    """Refuse content the engine would fail on, or that the marketplace cannot price.

    Called twice: on the raw JSON by `ChatRequest` (before pydantic turns malformed content into
    a lazy iterator that fails later, as a 5xx), and with the listing by `validate_request`,
    which adds the modality rules. Messages that are not objects are left to the request model.
    """
    if not isinstance(messages, list):
        return
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "content" not in message:
            continue
        content, where = message["content"], f"messages.{index}.content"
        if content is None and message.get("role") in TEXT_REQUIRED_ROLES:
            # The request model refuses it too, but names the wrong field (a role in its union).
            raise BadRequest(
                f"Invalid value for '{where}': null; only assistant messages may leave out their content.",
                param=where,
            )
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise BadRequest(
                f"Invalid value for '{where}': expected a string or an array of content parts, "
                f"got {_json_kind(content)}.",
                param=where,
            )
        for number, part in enumerate(content):
            _check_part(part, f"{where}.{number}", listing)


def _check_part(part: Any, where: str, listing: Listing | None) -> None:
    if not isinstance(part, dict):
        raise BadRequest(
            f"Invalid value for '{where}': each content part must be an object with a 'type', such as "
            f'{{"type": "text", "text": "..."}}, got {_json_kind(part)}.',
            param=where,
        )
    kind = part.get("type")
    if kind is None:
        raise BadRequest(
            f"Missing required parameter: '{where}.type' (one of {_part_types()}).",
            param=f"{where}.type",
            code="missing_required_parameter",
        )
    if not isinstance(kind, str) or (kind not in TEXT_PARTS and kind not in MEDIA_PARTS):
        raise BadRequest(
            f"Invalid value for '{where}.type': {kind!r}. Supported content part types: {_part_types()}.",
            param=f"{where}.type",
        )
    if kind in TEXT_PARTS:
        field = TEXT_PARTS[kind]
        if not isinstance(part.get(field), str):
            raise BadRequest(
                f"Invalid value for '{where}.{field}': a {kind!r} part needs its text as a string.",
                param=f"{where}.{field}",
            )
        return
    if listing is not None:
        _check_modality(kind, where, listing)
    if kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
            raise BadRequest(
                f"Invalid value for '{where}.image_url': expected an object with a 'url' "
                '(https or data URL), such as {"url": "https://..."}.',
                param=f"{where}.image_url",
            )
        if "detail" in image and image["detail"] not in IMAGE_DETAILS:
            raise BadRequest(
                f"Invalid value for '{where}.image_url.detail': {image['detail']!r}. "
                f"Supported: {', '.join(sorted(IMAGE_DETAILS))}.",
                param=f"{where}.image_url.detail",
            )


def _check_modality(kind: str, where: str, listing: Listing) -> None:
    modality = MEDIA_PARTS[kind]
    if modality == "image" and listing.max_tokens_per_image is not None:
        return
    served = "no model here takes audio or video" if modality != "image" else f"model {listing.id!r} takes text only"
    raise BadRequest(
        f"Invalid content part '{where}': {kind!r} ({modality}) is not supported: {served}.",
        param=where,
    )


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", str: "a string", list: "an array", dict: "an object", type(None): "null"}
    return kinds.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


@functools.cache
def object_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The request fields whose value must be a JSON object (a model, a dataclass or a dict)."""

    def is_object(kind: Any) -> bool:
        return (
            kind is dict
            or typing.get_origin(kind) is dict
            or (isinstance(kind, type) and (issubclass(kind, BaseModel) or dataclasses.is_dataclass(kind)))
        )

    names = []
    for name, field in model.model_fields.items():
        kind = field.annotation
        options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        options = tuple(option for option in options if option is not type(None))
        if options and all(is_object(option) for option in options):
            names.append(name)
    return tuple(names)


def check_objects(model: type[BaseModel], data: dict) -> None:
    """Refuse a non-object where the request takes an object, before vLLM's own model validators
    run: some of them call `.get` on such a field and raised AttributeError, a 500."""
    for name in object_fields(model):
        value = data.get(name)
        if value is not None and not isinstance(value, dict | BaseModel) and not dataclasses.is_dataclass(value):
            raise BadRequest(
                f"Invalid type for '{name}': expected an object, but got {_json_kind(value)} instead.",
                param=name,
                code="invalid_type",
            )


MODELS_FIELD = (
    "Models that serve the request, in order, when `model` cannot (overloaded, unavailable, or the prompt "
    "longer than its context); replaces the listing's own fallbacks. Billed at the price of the one that served."
)


class ChatRequest(ChatCompletionRequest):
    """Ray Serve LLM's chat request with the content rules applied to the raw JSON.

    The base model types `content` as `Iterable[...]`, which pydantic checks lazily: malformed
    content parses, then fails when first iterated, after the route has run, as a 500. Checking
    the raw body first answers 400 with the offending part named instead. Object fields are
    checked first too (`check_objects`).
    """

    # OpenRouter's fallback list: models to serve the request, in order, when `model` cannot.
    models: list[str] | None = Field(default=None, description=MODELS_FIELD)

    @model_validator(mode="before")
    @classmethod
    def _content_parts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_objects(ChatCompletionRequest, data)
            check_messages(data.get("messages"))
        return data


class TextCompletionRequest(CompletionRequest):
    """Ray Serve LLM's completions request, with its object fields checked on the raw JSON."""

    models: list[str] | None = Field(default=None, description=MODELS_FIELD)

    @model_validator(mode="before")
    @classmethod
    def _objects(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_objects(CompletionRequest, data)
        return data


# -- text and template arguments --------------------------------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in a request field, with its dotted path (keys of objects included)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key, path)
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}.{index}")
    elif isinstance(value, BaseModel):
        for name in value.model_fields_set:
            yield from _strings(getattr(value, name), f"{path}.{name}")


def check_text(body: Any) -> None:
    """Refuse lone UTF-16 surrogates ("\\ud800" in the JSON) anywhere in what the client sent.

    JSON may escape them, but they are not Unicode text: encoding one to UTF-8 raises, in the
    prompt counter or in the engine's tokenizer, which made each of them a 5xx.
    """
    for name in sorted(body.model_fields_set):
        for path, text in _strings(getattr(body, name), name):
            if _SURROGATE.search(text):
                raise BadRequest(
                    f"Invalid value for '{path}': the text contains a lone UTF-16 surrogate, which is not "
                    "valid Unicode. Send text as UTF-8 (in JSON, a \\ud800-\\udfff escape must be half of a pair).",
                    param=path,
                )


# The keyword arguments vLLM's renderer passes to the tokenizer's `apply_chat_template` itself,
# and that call's own parameters (transformers' `apply_chat_template`; a unit test keeps this
# list complete). In `chat_template_kwargs` they clash with the call (a TypeError in the
# engine, which was a 5xx) or change what it returns; the request fields of the same name are
# the way to set the ones that are meant to be set.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "self",
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "tokenizer",
        "tokenizer_kwargs",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
    }
)


def check_template_arguments(body: Any) -> None:
    """Only the listing's own chat template renders, with only the template's own variables.

    vLLM refuses a request-level template unless the engine trusts request templates (the
    marketplace never does: a template is code that runs on the engine), and a clashing kwarg
    fails inside the tokenizer; both are refused here, before any credit is held.
    """
    if getattr(body, "chat_template", None) is not None:
        raise BadRequest(
            "'chat_template' is not accepted: every model renders with its own chat template. "
            "Pass template variables in 'chat_template_kwargs'.",
            param="chat_template",
        )
    kwargs = getattr(body, "chat_template_kwargs", None) or {}
    clashing = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if clashing:
        raise BadRequest(
            f"Invalid value for 'chat_template_kwargs': {', '.join(map(repr, clashing))} "
            f"{'is an argument' if len(clashing) == 1 else 'are arguments'} of the template call itself, "
            "not a template variable (use the request fields: messages, tools, documents, "
            "add_generation_prompt, continue_final_message).",
            param="chat_template_kwargs",
        )


# The most inputs one embeddings request may carry (OpenAI's limit).
MAX_EMBEDDING_INPUTS = 2048


class EmbeddingsRequest(EmbeddingCompletionRequest):
    """Ray Serve LLM's embeddings request (vLLM's), with its input checked before anything is held."""

    @model_validator(mode="before")
    @classmethod
    def _objects(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_objects(EmbeddingCompletionRequest, data)
        return data


def validate_embeddings(body: Any, listing: Listing) -> None:
    """Marketplace rules of an embeddings request: an embedding listing, and input to embed."""
    if listing.task != "embed":
        raise BadRequest(
            f"The model {listing.id!r} does not create embeddings; see GET /v1/models for embedding models.",
            param="model",
        )
    inputs = (
        body.input
        if isinstance(body.input, list) and body.input and not isinstance(body.input[0], int)
        else [body.input]
    )
    if not 1 <= len(inputs) <= MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"'input' must hold 1 to {MAX_EMBEDDING_INPUTS} items.", param="input")
    for index, item in enumerate(inputs):
        if item == "" or item == []:
            raise BadRequest(f"'input[{index}]' must not be empty.", param=f"input.{index}")
    check_text(body)
