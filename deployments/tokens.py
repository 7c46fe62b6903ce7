"""Prompt token counts for admission: what the engine will count, or a bound above it.

Admission reserves TPM and holds credit for prompt + max output tokens before the engine has
seen the request, so the prompt must be counted up front and never under-counted. When the
listing's tokenizer is on local disk, the ingress counts exactly as vLLM does: the model's own
chat template rendered to text, then encoded without special tokens (chat) or with them
(completions). Requests the exact path does not reproduce (tools, template kwargs, content
parts, names, tool calls...) get an upper bound instead:

    the template's own tokens, measured once per listing (and per distinct tools/kwargs):
      the rendering of one empty user message (role markers, a default system prompt,
      the generation prompt, the tools' JSON), plus the most one more empty message of any
      role adds
  + the UTF-8 bytes of every text the messages carry (byte-level BPE never yields more
    tokens than bytes), structured fields counted as indented JSON
  + `max_tokens_per_image` for each image part of a multimodal listing (never its URL's bytes)

Listings without a local tokenizer get bytes plus a fixed allowance; that cannot see a
template's default system prompt, so settlement caps the charge at the hold and the
operator sees every miss (`hold_exceeded`). Settlement charges the engine's real count either
way; the estimate only sizes the hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

logger = logging.getLogger("tokenmart.tokens")

# The byte bound's allowance for role markers and separators that chat templates add, for
# listings whose template cannot be measured (no local tokenizer). The fixed part covers a
# short default system prompt as well.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_FIXED = 64
# Slack per message and per content part on the measured bound: where a template joins a
# message's text to its markup, BPE may split differently than either alone.
MERGE_SLACK_TOKENS = 2
# Template measurements kept per listing (keyed by the request's tools and template kwargs).
OVERHEAD_CACHE_SIZE = 256
# Roles whose markup is measured; the largest is charged for every message.
MEASURED_ROLES = ("system", "developer", "user", "assistant", "tool")
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
        return len(value.encode(errors="surrogatepass"))
    if isinstance(value, (list, tuple)):
        return sum(_text_bytes(part) for part in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, int):
        return 1  # a token id of a pre-tokenized prompt
    return len(str(value).encode(errors="surrogatepass"))


def _json_bytes(value: Any) -> int:
    """Bytes of a structured value as a template may print it (`tojson`, indented or not)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return len(json.dumps(value, indent=4, ensure_ascii=False, default=str).encode(errors="surrogatepass"))


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and (part.get("type") in ("image_url", "image", "image_pil", "image_embeds"))


def prompt_count(body: Any) -> int:
    """How many prompts a completions request carries (the engine answers each one `n` times)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _message_bound(message: Any, tokens_per_image: int) -> tuple[int, int]:
    """(tokens at most, content parts) of one message's own text, template markup excluded."""
    if not isinstance(message, dict):
        return _json_bytes(message), 0
    total, parts = 0, 0
    for name, value in message.items():
        if value is None or name == "role":
            continue
        if name == "content" and isinstance(value, list):
            for part in value:
                parts += 1
                if _is_image(part):
                    total += tokens_per_image
                elif isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += _text_bytes(part["text"])
                else:
                    total += _json_bytes(part)
        elif isinstance(value, str):
            total += _text_bytes(value)
        else:
            total += _json_bytes(value)  # tool_calls and the like, printed by the template
    return total, parts


def byte_bound(body: Any, *, chat: bool, tokens_per_image: int = 0) -> int:
    """An upper bound on the prompt tokens, with no tokenizer."""
    if not chat:
        return _text_bytes(body.prompt) + TEMPLATE_TOKENS_FIXED * prompt_count(body)
    messages = body.messages or []
    content, parts = 0, 0
    for message in messages:
        counted, message_parts = _message_bound(message, tokens_per_image)
        content, parts = content + counted, parts + message_parts
    return (
        content
        + sum(_json_bytes(tool) for tool in getattr(body, "tools", None) or [])
        + (_json_bytes(body.documents) if getattr(body, "documents", None) else 0)
        + (TEMPLATE_TOKENS_PER_MESSAGE + MERGE_SLACK_TOKENS) * (len(messages) + parts)
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

    def __init__(self, tokenizer: Any | None = None, *, tokens_per_image: int | None = None) -> None:
        self.tokenizer = tokenizer
        # The most tokens one image becomes on a multimodal listing (None: a text listing).
        self.tokens_per_image = tokens_per_image or 0
        # (fixed, per message) template tokens, by the tools/documents/kwargs that shape them.
        self._overheads: OrderedDict[str, tuple[int, int] | None] = OrderedDict()

    @classmethod
    def for_source(cls, source: str | None, *, tokens_per_image: int | None = None) -> PromptCounter:
        """Load the tokenizer from a local model folder (or the local HF cache); never downloads."""
        if not source:
            return cls(tokens_per_image=tokens_per_image)
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except Exception as exc:  # any failure means: no exact counts for this listing
            where = "folder" if Path(source).is_dir() else "local Hugging Face cache entry"
            logger.warning("no tokenizer for %s (%s: %s); prompts are bounded by bytes", where, source, exc)
            return cls(tokens_per_image=tokens_per_image)
        if tokenizer.chat_template is None:
            logger.warning("tokenizer at %s has no chat template; chat prompts are bounded by bytes", source)
        counter = cls(tokenizer, tokens_per_image=tokens_per_image)
        counter.template_overhead(None, None, None)  # measured once, at start, for plain requests
        return counter

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, body: Any, *, chat: bool) -> int:
        if self.tokenizer is None:
            return byte_bound(body, chat=chat, tokens_per_image=self.tokens_per_image)
        try:
            return self._exact(body, chat=chat)
        except Exception:  # e.g. a template that refuses the roles: the engine will say why
            logger.debug("exact prompt count failed; using the byte bound", exc_info=True)
            return byte_bound(body, chat=chat, tokens_per_image=self.tokens_per_image)

    def _exact(self, body: Any, *, chat: bool) -> int:
        if chat:
            if self.tokenizer.chat_template is None:
                return byte_bound(body, chat=chat, tokens_per_image=self.tokens_per_image)
            messages = _plain_messages(body)
            if messages is None:
                return self.measured_bound(body)
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

    def measured_bound(self, body: Any) -> int:
        """An upper bound for a chat request the exact path does not reproduce: the template's
        measured tokens plus the bytes of everything the messages carry."""
        tools = [t.model_dump() if hasattr(t, "model_dump") else t for t in getattr(body, "tools", None) or []]
        overhead = self.template_overhead(tools or None, getattr(body, "documents", None), body.chat_template_kwargs)
        if overhead is None:  # the template cannot be measured with these: bytes and allowances
            return byte_bound(body, chat=True, tokens_per_image=self.tokens_per_image)
        fixed, per_message = overhead
        total = fixed
        for message in body.messages:
            counted, parts = _message_bound(message, self.tokens_per_image)
            total += counted + per_message + MERGE_SLACK_TOKENS * (1 + parts)
        return total

    def template_overhead(
        self, tools: list[Any] | None, documents: Any, kwargs: dict[str, Any] | None
    ) -> tuple[int, int] | None:
        """(fixed, per message): the tokens this listing's template adds around message text.

        Fixed is one empty user message rendered with the generation prompt (the markup, any
        default system prompt, the tools); per message is the most that one more empty message
        of any role adds. None when the template does not render with these arguments.
        """
        cache_key = json.dumps([tools, documents, kwargs], sort_keys=True, default=str)
        if cache_key in self._overheads:
            self._overheads.move_to_end(cache_key)
            return self._overheads[cache_key]
        extra: dict[str, Any] = dict(kwargs or {})
        if tools:
            extra["tools"] = tools
        if documents:
            extra["documents"] = documents

        def tokens(messages: list[dict[str, str]]) -> int:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
            return len(self.tokenizer.encode(text, add_special_tokens=False))

        user = {"role": "user", "content": ""}
        try:
            fixed = tokens([user])
        except Exception:
            logger.debug("the chat template does not render with %s", cache_key, exc_info=True)
            measured = None
        else:
            per_message = 0
            for role in MEASURED_ROLES:
                other = {"role": role, "content": ""}
                for pair in ([other, user], [user, other]):
                    try:
                        per_message = max(per_message, tokens(pair) - fixed)
                    except Exception:  # the template refuses this order or role
                        continue
            measured = (fixed, max(per_message, TEMPLATE_TOKENS_PER_MESSAGE))
        self._overheads[cache_key] = measured
        if len(self._overheads) > OVERHEAD_CACHE_SIZE:
            self._overheads.popitem(last=False)
        return measured

    async def count_async(self, body: Any, *, chat: bool) -> int:
        """`count`, moved off the event loop when the prompt is long."""
        if self.tokenizer is not None and byte_bound(body, chat=chat) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.count, body, chat=chat)
        return self.count(body, chat=chat)
