"""Prompt counting for admission: exact with a tokenizer, a byte bound otherwise, never under."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenmart.deployments.ray_llm import ChatCompletionRequest, CompletionRequest, sanitize_chat_request
from tokenmart.deployments.tokens import (
    INLINE_TOKENIZE_CHARS,
    MERGE_SLACK_TOKENS,
    TEMPLATE_TOKENS_FIXED,
    TEMPLATE_TOKENS_PER_MESSAGE,
    PromptCounter,
    byte_bound,
    prompt_count,
)
from tokenmart.deployments.validation import max_output_tokens


class WordTokenizer:
    """A stand-in tokenizer: one token per word, a template of `<role>: content` lines."""

    chat_template = "{% for m in messages %}...{% endfor %}"

    def __init__(self) -> None:
        self.encoded: list[tuple[str, bool]] = []

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool, tokenize: bool, **template_kwargs: Any
    ):
        assert tokenize is False and add_generation_prompt is True
        tools = " ".join(f"<tool> {t['function']['name']}" for t in template_kwargs.get("tools") or [])
        return tools + " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        self.encoded.append((text, add_special_tokens))
        return list(range(len(text.split()) + (1 if add_special_tokens else 0)))


def chat(messages: list[dict[str, Any]] | None = None, **fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": messages or [{"role": "user", "content": "hello there"}], **fields}
    return sanitize_chat_request(ChatCompletionRequest.model_validate(body))


def completion(prompt: Any, **fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": prompt, **fields})


def test_without_a_tokenizer_chat_is_bounded_by_bytes_plus_the_template_allowance() -> None:
    body = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}])
    counted = PromptCounter().count(body, chat=True)
    text_bytes = len("be brief") + len("héllo".encode())
    assert counted == text_bytes + 2 * (TEMPLATE_TOKENS_PER_MESSAGE + MERGE_SLACK_TOKENS) + TEMPLATE_TOKENS_FIXED


def test_without_a_tokenizer_images_count_their_maximum_not_their_url() -> None:
    url = {"url": "https://example.com/a.png"}
    body = chat(
        [{"role": "user", "content": [{"type": "text", "text": "what"}, {"type": "image_url", "image_url": url}]}]
    )
    counted = PromptCounter(tokens_per_image=576).count(body, chat=True)
    assert counted == 576 + len("what") + 3 * (TEMPLATE_TOKENS_PER_MESSAGE + MERGE_SLACK_TOKENS) + TEMPLATE_TOKENS_FIXED


def test_without_a_tokenizer_completions_count_bytes_and_token_ids() -> None:
    assert PromptCounter().count(completion("abc"), chat=False) == 3 + TEMPLATE_TOKENS_FIXED
    assert PromptCounter().count(completion([5, 6, 7]), chat=False) == 3 + TEMPLATE_TOKENS_FIXED
    assert PromptCounter().count(completion(["ab", "cde"]), chat=False) == 5 + 2 * TEMPLATE_TOKENS_FIXED


def test_chat_with_a_tokenizer_renders_the_template_and_encodes_without_special_tokens() -> None:
    tokenizer = WordTokenizer()
    body = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert PromptCounter(tokenizer).count(body, chat=True) == 7  # <system> be brief <user> hello there <assistant>
    assert tokenizer.encoded == [("<system> be brief <user> hello there <assistant>", False)]


def test_completions_with_a_tokenizer_encode_each_prompt_with_special_tokens() -> None:
    tokenizer = WordTokenizer()
    counter = PromptCounter(tokenizer)
    assert counter.count(completion("one two three"), chat=False) == 4
    assert counter.count(completion(["one", "two three"]), chat=False) == 2 + 3
    assert counter.count(completion([[1, 2], [3, 4, 5]]), chat=False) == 5
    assert counter.count(completion("one", add_special_tokens=False), chat=False) == 1


@pytest.mark.parametrize(
    "body",
    [
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        chat(chat_template_kwargs={"enable_thinking": True}),
        chat([{"role": "user", "content": [{"type": "text", "text": "parts"}]}]),
        chat([{"role": "user", "content": "hi", "name": "alice"}]),
        chat(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once"}],
            continue_final_message=True,
            add_generation_prompt=False,
        ),
    ],
    ids=["tools", "chat_template_kwargs", "content_parts", "name", "continue_final_message"],
)
def test_requests_the_exact_path_cannot_reproduce_get_the_measured_template_plus_their_bytes(body: Any) -> None:
    counter = PromptCounter(WordTokenizer())
    fixed, per_message = counter.template_overhead(
        [t.model_dump() for t in body.tools] if body.tools else None, None, body.chat_template_kwargs
    )
    # WordTokenizer: "<user>  <assistant>" is 2 tokens; one more empty message adds 1 (its role marker),
    # which is below the floor of TEMPLATE_TOKENS_PER_MESSAGE.
    assert (fixed, per_message) == (2 if body.tools is None else fixed, TEMPLATE_TOKENS_PER_MESSAGE)
    content = sum(
        len(part["text"]) if isinstance(part, dict) else len(part.encode())
        for message in body.messages
        for name, value in message.items()
        if name != "role" and value
        for part in (value if isinstance(value, list) else [value])
    )
    parts = sum(len(m["content"]) for m in body.messages if isinstance(m.get("content"), list))
    expected = fixed + content + len(body.messages) * (per_message + MERGE_SLACK_TOKENS) + parts * MERGE_SLACK_TOKENS
    assert counter.count(body, chat=True) == expected


def test_a_tokenizer_without_a_chat_template_bounds_chat_but_counts_completions() -> None:
    tokenizer = WordTokenizer()
    tokenizer.chat_template = None
    counter = PromptCounter(tokenizer)
    assert counter.count(chat(), chat=True) == byte_bound(chat(), chat=True)
    assert counter.count(completion("one two"), chat=False) == 3


def test_a_listing_whose_tokenizer_is_not_on_disk_falls_back_to_the_byte_bound(tmp_path) -> None:
    counter = PromptCounter.for_source(str(tmp_path / "missing-model"))
    assert not counter.exact
    assert counter.count(chat(), chat=True) == byte_bound(chat(), chat=True)


def test_long_prompts_are_counted_off_the_event_loop_with_the_same_result() -> None:
    tokenizer = WordTokenizer()
    body = chat([{"role": "user", "content": "word " * INLINE_TOKENIZE_CHARS}])
    assert asyncio.run(PromptCounter(tokenizer).count_async(body, chat=True)) == INLINE_TOKENIZE_CHARS + 2


def test_output_budget_covers_every_choice_of_every_prompt() -> None:
    assert max_output_tokens(chat(max_tokens=10, n=3), chat=True) == 30
    assert max_output_tokens(chat(max_completion_tokens=7, max_tokens=10), chat=True) == 7
    assert max_output_tokens(completion(["a", "b"], max_tokens=5, n=2), chat=False) == 20
    assert max_output_tokens(completion([1, 2, 3], max_tokens=5), chat=False) == 5
    assert (prompt_count(completion("a")), prompt_count(completion([[1], [2], [3]]))) == (1, 3)


def test_a_template_that_refuses_the_conversation_falls_back_to_the_byte_bound() -> None:
    class StrictTokenizer(WordTokenizer):
        def apply_chat_template(self, messages, **kwargs):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    body = chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert PromptCounter(StrictTokenizer()).count(body, chat=True) == byte_bound(body, chat=True)
