"""Prompt token counts for admission: what the engine will count, or a bound above it.

Admission reserves TPM and holds credit for prompt + max output tokens before the engine has
seen the request, so the prompt must be counted up front and never under-counted. When the
listing's tokenizer is on local disk, the ingress counts exactly as vLLM does: the model's own
chat template rendered to text, then encoded without special tokens (chat) or with them
(completions). Requests the tokenizer path does not reproduce exactly (tools, a request-level
chat template, content parts...) and listings without a local tokenizer fall back to
the byte bound: byte-level BPE never yields more tokens than UTF-8 bytes, so bytes plus a
generous template allowance is an over-estimate. Settlement charges the engine's real count
either way; the estimate only sizes the hold.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("tokenmart.tokens")

# The byte bound's allowance for role markers and separators that chat templates add.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_FIXED = 16
# Prompts longer than this are tokenized on a worker thread, off the event loop.
INLINE_TOKENIZE_CHARS = 16_384

# Chat request fields that change what the engine renders; with any of them set the exact
# path is not taken.
_TEMPLATE_CHANGING_FIELDS = ("tools", "documents", "chat_template", "chat_template_kwargs", "continue_final_message")
_PLAIN_MESSAGE_KEYS = frozenset({"role", "content"})


def _text_bytes(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(part) for part in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, int):
        return 1  # a token id of a pre-tokenized prompt
    return len(str(value).encode())


def prompt_count(body: Any) -> int:
    """How many prompts a completions request carries (the engine answers each one `n` times)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def byte_bound(body: Any, *, chat: bool) -> int:
    """An upper bound on the prompt tokens, with no tokenizer."""
    if not chat:
        return _text_bytes(body.prompt) + TEMPLATE_TOKENS_FIXED * prompt_count(body)
    messages = body.messages or []
    return (
        _text_bytes(list(messages))
        + _text_bytes(getattr(body, "tools", None))
        + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
        + TEMPLATE_TOKENS_FIXED
    )


def _plain_messages(body: Any) -> list[dict[str, str]] | None:
    """The messages as role/content text, the way vLLM hands them to a string-content template.

    None when the request holds anything the exact path does not reproduce.
    """
    if any(getattr(body, name, None) for name in _TEMPLATE_CHANGING_FIELDS):
        return None
    if getattr(body, "add_generation_prompt", True) is False:
        return None
    plain = []
    for message in body.messages:
        if not isinstance(message, dict) or not _PLAIN_MESSAGE_KEYS.issuperset(k for k, v in message.items() if v):
            return None
        content = message.get("content") or ""
        if not isinstance(content, str):
            # Content parts render per the template's content format; leave them to the bound.
            return None
        plain.append({"role": message["role"], "content": content})
    return plain


class PromptCounter:
    """Counts one listing's prompts with its tokenizer, or with the byte bound if it has none."""

    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def for_source(cls, source: str | None) -> PromptCounter:
        """Load the tokenizer from a local model folder (or the local HF cache); never downloads."""
        if not source:
            return cls()
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as exc:  # any failure means: no exact counts for this listing
            where = "folder" if Path(source).is_dir() else "local Hugging Face cache entry"
            logger.warning("no tokenizer for %s (%s: %s); prompts are bounded by bytes", where, source, exc)
            return cls()
        if tokenizer.chat_template is None:
            logger.warning("tokenizer at %s has no chat template; chat prompts are bounded by bytes", source)
        return cls(tokenizer)

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, body: Any, *, chat: bool) -> int:
        if self.tokenizer is None:
            return byte_bound(body, chat=chat)
        try:
            return self._exact(body, chat=chat)
        except Exception:  # e.g. a template that refuses the roles: the engine will say why
            logger.debug("exact prompt count failed; using the byte bound", exc_info=True)
            return byte_bound(body, chat=chat)

    def _exact(self, body: Any, *, chat: bool) -> int:
        if chat:
            messages = _plain_messages(body)
            if messages is None or self.tokenizer.chat_template is None:
                return byte_bound(body, chat=chat)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        add_special = getattr(body, "add_special_tokens", True)
        total = 0
        for item in prompt:
            total += (
                len(item)
                if isinstance(item, list)
                else len(self.tokenizer.encode(item, add_special_tokens=add_special))
            )
        return total

    async def count_async(self, body: Any, *, chat: bool) -> int:
        """`count`, moved off the event loop when the prompt is long."""
        if self.tokenizer is not None and byte_bound(body, chat=chat) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.count, body, chat=chat)
        return self.count(body, chat=chat)
