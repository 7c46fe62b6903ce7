"""A small stand-in for an LLMServer deployment, for tests and load tests without vLLM.

It speaks the same handle protocol as Ray Serve LLM's LLMServer (`chat` / `completions`
returning an async stream: one response, or batches of SSE strings) and answers with a
deterministic token stream and plausible usage, so the ingress, billing, placement and
autoscaling can be exercised on machines with no engine and no GPU. Requests arrive as
plain dicts and responses leave as dicts and strings, so a fake replica never imports vLLM
and starts in seconds. (With `typed=True`, for Ray Serve LLM's own ingress in benchmarks,
it answers with Ray Serve LLM's response types instead.)

Deterministic rules (tests rely on them):
  prompt tokens     = words in all message contents + 3 per message (chat), or the words
                      (token ids) of each prompt of a completions request, summed
  completion tokens = min(max_tokens, `reply_tokens`) per choice, one token (" w<i>") per
                      stream chunk, times `n` choices, times the prompts of a completions batch
Usage on stream chunks follows vLLM's `continuous_usage_stats` exactly: each chunk carries one
choice, and its usage counts that choice's tokens and its own prompt's tokens (not the totals);
choice `index` is `prompt_index * n + choice`, and only the final usage chunk has the sums.
A prompt containing `[[fake-error]]` makes the engine fail before producing output, and
`[[fake-tokens=N]]` replaces `reply_tokens` for that request (long streams on demand);
`[[fake-cached=N]]` reports up to N of each prompt's tokens as read from the prefix cache.
Every answer's `system_fingerprint` is the id of the replica that produced it. A prompt whose
tokens plus max_tokens exceed the listing's context is refused with vLLM's 400 message.
`embeddings` answers each input with an 8-number unit vector derived from its text (its
words are its prompt tokens).

LoRA adapters are loaded as LLMServer loads them: through `serve.multiplexed`, keyed by the
multiplexed model id the ingress sets. A request for an adapter answers with the adapter's id
as `model` and prefixes each token with the adapter's name (`" <adapter>.w0"`), so tests see
which adapter served it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from tokenmart.deployments.caller_watch import CallerWatch

FAIL_MARKER = "[[fake-error]]"
LENGTH_MARKER = re.compile(r"\[\[fake-tokens=(\d+)\]\]")
# `[[fake-cached=N]]`: up to N tokens of each prompt were served from the prefix cache, reported
# as vLLM does with prompt token details on (usage.prompt_tokens_details.cached_tokens).
CACHED_MARKER = re.compile(r"\[\[fake-cached=(\d+)\]\]")


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _field(request: Any, name: str) -> Any:
    """A request field, whether the request is a dict or an OpenAI request object."""
    return request.get(name) if isinstance(request, dict) else getattr(request, name, None)


def count_prompt_tokens(request: Any) -> tuple[list[int], str]:
    """Prompt tokens of each prompt (chat has one), and all the prompt text."""
    messages = _field(request, "messages")
    if messages is not None:
        texts = [_text_of(m.get("content") if isinstance(m, dict) else m.content) for m in messages]
        joined = " ".join(texts)
        return [sum(len(t.split()) for t in texts) + 3 * len(texts)], joined
    prompt = _field(request, "prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        prompts = [prompt]  # one pre-tokenized prompt
    else:
        prompts = list(prompt or [])
    counts = [len(item) if isinstance(item, list) else len(str(item).split()) for item in prompts]
    return counts, " ".join(" ".join(map(str, p)) if isinstance(p, list) else str(p) for p in prompts)


class FakeEngine:
    def __init__(
        self,
        model_id: str,
        reply_tokens: int = 16,
        token_delay_s: float = 0.005,
        adapters: dict[str, str] | None = None,
        max_adapters: int = 1,
        typed: bool = False,
        context_length: int | None = None,
    ) -> None:
        self.model_id = model_id
        # As vLLM's max_model_len: a prompt plus its max_tokens beyond it is refused (400).
        self.context_length = context_length
        # typed: answer with Ray Serve LLM's response types, as LLMServer does (for its own
        # OpenAiIngress in `baseline.py`); otherwise with plain dicts (the marketplace ingress).
        self.typed = typed
        # Streams running now, stopped by their caller, and run to the end (abort tests read these).
        self.active_streams = self.cancelled_streams = self.finished_streams = 0
        self._callers = CallerWatch()  # stops the requests of an ingress replica that died
        self.reply_tokens = reply_tokens
        self.token_delay_s = token_delay_s
        self.adapters = adapters or {}
        # Every answer names the replica that produced it (as `system_fingerprint`), so routing
        # tests can see where each request went.
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside a Serve replica
            self.replica = "local"

        # A plain function, as LLMServer does it: Serve caches its multiplexing state on it.
        async def open_adapter(adapter_id: str) -> str:
            if adapter_id not in self.adapters:
                raise ValueError(f"{adapter_id!r} is not an adapter of {self.model_id!r}")
            return adapter_id.rsplit(":", 1)[-1]

        self._load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(open_adapter)

    async def _served_as(self) -> tuple[str, str]:
        """The model id a request is answered as, and the prefix of its tokens."""
        adapter_id = serve.get_multiplexed_model_id()
        if not adapter_id:
            return self.model_id, ""
        return adapter_id, f"{await self._load_adapter(adapter_id)}."

    async def check_health(self) -> None:
        return None

    async def stream_stats(self) -> dict[str, int]:
        return {"active": self.active_streams, "cancelled": self.cancelled_streams, "finished": self.finished_streams}

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        async for item in self._callers.follow(self._run(request, chat=True), raw_request_info):
            yield item

    async def completions(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        async for item in self._callers.follow(self._run(request, chat=False), raw_request_info):
            yield item

    async def embeddings(self, request: Any, raw_request_info: Any = None) -> AsyncIterator[Any]:
        """One answer, as LLMServer's: EMBEDDING_DIMENSIONS numbers per input, each vector a pure
        function of its text, float or base64 (little-endian float32) as asked."""
        given = _field(request, "input")
        inputs = given if isinstance(given, list) and given and not isinstance(given[0], int) else [given]
        counts = [len(item) if isinstance(item, list) else len(str(item).split()) for item in inputs]
        base64_wanted = _field(request, "encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = fake_embedding(" ".join(map(str, item)) if isinstance(item, list) else str(item))
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": packed if base64_wanted else vector})
        yield {
            "id": f"embd-{_field(request, 'request_id')}",
            "object": "list",
            "created": int(time.time()),
            "model": self.model_id,
            "data": data,
            "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts), "completion_tokens": 0},
        }

    async def _run(self, request: Any, *, chat: bool) -> AsyncIterator[Any]:
        model_id, tag = await self._served_as()
        prompt_tokens, prompt_text = count_prompt_tokens(request)
        if FAIL_MARKER in prompt_text:
            error = {"message": "fake engine failure", "type": "InternalServerError", "code": 500}
            yield _typed_error(error) if self.typed else {"error": error}
            return
        max_tokens = _field(request, "max_completion_tokens") or _field(request, "max_tokens") or self.reply_tokens
        longest = max(prompt_tokens, default=0)
        if self.context_length is not None and longest + max_tokens > self.context_length:
            error = {
                "message": f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {max_tokens} output tokens and your prompt contains {longest} input tokens, for a "
                f"total of {longest + max_tokens} tokens.",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
            yield _typed_error(error) if self.typed else {"error": error}
            return
        length = LENGTH_MARKER.search(prompt_text)
        n_tokens = min(max_tokens, int(length.group(1)) if length else self.reply_tokens)
        n = _field(request, "n") or 1
        prompt_total = sum(prompt_tokens)
        choices = n * len(prompt_tokens)  # vLLM answers each prompt n times
        rid = _field(request, "request_id")
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"

        cached_marker = CACHED_MARKER.search(prompt_text)
        cached_each = int(cached_marker.group(1)) if cached_marker else 0

        def usage(completion: int, prompt: int = prompt_total, prompts: list[int] = prompt_tokens) -> dict[str, Any]:
            counted: dict[str, Any] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            if cached_each:
                counted["prompt_tokens_details"] = {"cached_tokens": sum(min(cached_each, p) for p in prompts)}
            return counted

        if not _field(request, "stream"):
            await asyncio.sleep(self.token_delay_s * n_tokens)
            text = "".join(f" {tag}w{i}" for i in range(n_tokens))
            body = {
                "id": response_id,
                "object": kind,
                "created": created,
                "model": model_id,
                "system_fingerprint": self.replica,
                "choices": [
                    {"index": c, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                    if chat
                    else {"index": c, "text": text, "finish_reason": "length"}
                    for c in range(choices)
                ],
                "usage": usage(n_tokens * choices),
            }
            yield _typed_response(body, chat) if self.typed else body
            return

        options = _field(request, "stream_options") or {}
        continuous = bool(_field(options, "continuous_usage_stats"))
        include_usage = bool(_field(options, "include_usage"))

        def chunk(choice_list: list[dict], usage_info: dict[str, Any] | None) -> str:
            body: dict[str, Any] = {
                "id": response_id,
                "object": f"{kind}.chunk" if chat else kind,
                "created": created,
                "model": model_id,
                "system_fingerprint": self.replica,
                "choices": choice_list,
            }
            if usage_info is not None:
                body["usage"] = usage_info
            return f"data: {json.dumps(body)}\n\n"

        self.active_streams += 1
        try:
            for i in range(n_tokens):
                await asyncio.sleep(self.token_delay_s)
                last = i == n_tokens - 1
                batch = []
                for c in range(choices):
                    token = f" {tag}w{i}"
                    delta = {"content": token} if i else {"role": "assistant", "content": token}
                    choice = (
                        {"index": c, "delta": delta, "finish_reason": "length" if last else None}
                        if chat
                        else {"index": c, "text": token, "finish_reason": "length" if last else None}
                    )
                    # As vLLM: this choice's tokens so far, and its own prompt's tokens.
                    own_prompt = prompt_tokens[c // n]
                    batch.append(chunk([choice], usage(i + 1, own_prompt, [own_prompt]) if continuous else None))
                yield batch
            if include_usage:
                yield [chunk([], usage(n_tokens * choices))]
            yield ["data: [DONE]\n\n"]
            self.finished_streams += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled_streams += 1  # the caller went away (or cancelled) mid-stream
            raise
        finally:
            self.active_streams -= 1


EMBEDDING_DIMENSIONS = 8


def fake_embedding(text: str) -> list[float]:
    """A unit vector that depends only on the text (its SHA-256), rounded to float32's precision."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [byte - 127.5 for byte in digest[:EMBEDDING_DIMENSIONS]]
    norm = math.sqrt(sum(value * value for value in raw))
    return [struct.unpack("<f", struct.pack("<f", value / norm))[0] for value in raw]


def _typed_response(body: dict, chat: bool) -> Any:
    from tokenmart.deployments.ray_llm import ChatCompletionResponse, CompletionResponse

    return (ChatCompletionResponse if chat else CompletionResponse).model_validate(body)


def _typed_error(error: dict) -> Any:
    from tokenmart.deployments.ray_llm import ErrorResponse

    return ErrorResponse.model_validate({"error": error})
