"""Marketplace request rules (`validate_request`) on real Ray Serve LLM / vLLM request models."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmart.deployments.catalog import Listing
from tokenmart.deployments.errors import BadRequest
from tokenmart.deployments.ray_llm import ChatCompletionRequest, CompletionRequest
from tokenmart.deployments.validation import MAX_CHOICES, validate_request

CONTEXT = 2048
DEFAULT_MAX = 256


@pytest.fixture(scope="module")
def listing() -> Listing:
    return Listing.model_validate(
        {
            "id": "smollm2-135m-instruct",
            "owner": "huggingfacetb",
            "source": "builtin:smollm2-135m-instruct",
            "context_length": CONTEXT,
            "default_max_tokens": DEFAULT_MAX,
            "pricing": {"prompt_usd_per_1m": "0.02", "completion_usd_per_1m": "0.04"},
            "accelerator": {"kind": "cpu"},
        }
    )


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "smollm2-135m-instruct", "prompt": "Once upon", **fields})


def _rejects(body: Any, listing: Listing, *, chat: bool) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        validate_request(body, listing, chat=chat)
    assert info.value.status_code == 400
    assert info.value.type == "invalid_request_error"
    return info.value


# -- chat -----------------------------------------------------------------------------------


def test_valid_chat_request_passes(listing: Listing):
    body = chat(max_tokens=10)
    validate_request(body, listing, chat=True)
    assert body.max_tokens == 10


def test_empty_messages_is_400_param_messages(listing: Listing):
    error = _rejects(chat(messages=[]), listing, chat=True)
    assert error.param == "messages"
    assert "at least one message" in error.message


def test_unknown_role_is_400_with_indexed_param(listing: Listing):
    body = chat(messages=[{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}])
    error = _rejects(body, listing, chat=True)
    assert error.param == "messages.1.role"
    assert "'wizard'" in error.message
    assert "messages[1].role" in error.message
    assert "user" in error.message and "assistant" in error.message


def test_first_bad_role_is_reported(listing: Listing):
    body = chat(messages=[{"role": "oracle", "content": "a"}, {"role": "wizard", "content": "b"}])
    assert _rejects(body, listing, chat=True).param == "messages.0.role"


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant"])
def test_standard_roles_are_accepted(listing: Listing, role: str):
    messages = [{"role": role, "content": "x"}, {"role": "user", "content": "hi"}]
    validate_request(chat(messages=messages), listing, chat=True)


def test_tool_conversation_roles_are_accepted(listing: Listing):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    validate_request(chat(messages=messages), listing, chat=True)


@pytest.mark.parametrize("n", [0, MAX_CHOICES + 1, 17, 100])
def test_n_out_of_range_is_400_param_n(listing: Listing, n: int):
    error = _rejects(chat(n=n), listing, chat=True)
    assert error.param == "n"
    assert "between 1 and 16" in error.message


@pytest.mark.parametrize("n", [1, 16])
def test_n_within_range_is_accepted(listing: Listing, n: int):
    assert MAX_CHOICES == 16
    validate_request(chat(n=n), listing, chat=True)


@pytest.mark.parametrize("max_tokens", [CONTEXT, CONTEXT + 1, 0, 100_000])
def test_chat_max_tokens_outside_context_is_400_param_max_tokens(listing: Listing, max_tokens: int):
    error = _rejects(chat(max_tokens=max_tokens), listing, chat=True)
    assert error.param == "max_tokens"
    assert f"between 1 and {CONTEXT - 1}" in error.message
    assert "'smollm2-135m-instruct'" in error.message


def test_chat_max_tokens_just_below_context_is_accepted(listing: Listing):
    body = chat(max_tokens=CONTEXT - 1)
    validate_request(body, listing, chat=True)
    assert body.max_tokens == CONTEXT - 1


@pytest.mark.parametrize("value", [0, CONTEXT, CONTEXT * 10])
def test_max_completion_tokens_out_of_range_is_400_param_max_completion_tokens(listing: Listing, value: int):
    error = _rejects(chat(max_completion_tokens=value), listing, chat=True)
    assert error.param == "max_completion_tokens"


def test_max_completion_tokens_in_range_is_kept_and_no_default_added(listing: Listing):
    body = chat(max_completion_tokens=64)
    validate_request(body, listing, chat=True)
    assert body.max_completion_tokens == 64
    assert body.max_tokens is None


def test_chat_without_max_tokens_gets_listing_default(listing: Listing):
    body = chat()
    assert body.max_tokens is None and body.max_completion_tokens is None
    validate_request(body, listing, chat=True)
    assert body.max_tokens == DEFAULT_MAX == listing.default_max_tokens


def test_chat_with_explicit_null_max_tokens_gets_listing_default(listing: Listing):
    body = chat(max_tokens=None, max_completion_tokens=None)
    validate_request(body, listing, chat=True)
    assert body.max_tokens == DEFAULT_MAX


# -- completions --------------------------------------------------------------------------------


def test_valid_completion_request_passes(listing: Listing):
    body = completion(max_tokens=32)
    validate_request(body, listing, chat=False)
    assert body.max_tokens == 32


@pytest.mark.parametrize("empty", ["", []])
def test_completion_with_empty_prompt_is_400_param_prompt(listing: Listing, empty: Any):
    body = completion()
    # vLLM's own validator already refuses an empty prompt at parse time; the marketplace rule
    # also holds for a request whose prompt is emptied after parsing.
    body.prompt = empty
    error = _rejects(body, listing, chat=False)
    assert error.param == "prompt"
    assert "must not be empty" in error.message


def test_completion_with_missing_prompt_is_400_param_prompt(listing: Listing):
    body = completion()
    body.prompt = None
    assert _rejects(body, listing, chat=False).param == "prompt"


@pytest.mark.parametrize("n", [0, 17])
def test_completion_n_out_of_range_is_400_param_n(listing: Listing, n: int):
    assert _rejects(completion(n=n), listing, chat=False).param == "n"


@pytest.mark.parametrize("max_tokens", [0, CONTEXT])
def test_completion_max_tokens_outside_context_is_400(listing: Listing, max_tokens: int):
    error = _rejects(completion(max_tokens=max_tokens), listing, chat=False)
    assert error.param == "max_tokens"
    assert f"between 1 and {CONTEXT - 1}" in error.message


@pytest.mark.parametrize("fields", [{}, {"max_tokens": None}])
def test_completion_without_max_tokens_has_a_finite_budget(listing: Listing, fields: dict[str, Any]):
    # vLLM's CompletionRequest fills a missing or null max_tokens with OpenAI's completions
    # default (16) while parsing, so the marketplace default never sees None here; what the
    # customer relies on is that the output (and so the cost) is bounded and fits the context.
    body = completion(**fields)
    validate_request(body, listing, chat=False)
    assert isinstance(body.max_tokens, int)
    assert 1 <= body.max_tokens < CONTEXT


def test_completion_with_no_budget_after_parsing_gets_listing_default(listing: Listing):
    body = completion()
    body.max_tokens = None
    validate_request(body, listing, chat=False)
    assert body.max_tokens == DEFAULT_MAX


def test_completion_explicit_max_tokens_is_not_replaced_by_default(listing: Listing):
    body = completion(max_tokens=16)
    validate_request(body, listing, chat=False)
    assert body.max_tokens == 16


def test_completion_token_id_prompt_is_accepted(listing: Listing):
    body = completion(prompt=[1, 2, 3])
    validate_request(body, listing, chat=False)
