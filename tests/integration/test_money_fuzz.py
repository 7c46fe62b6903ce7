"""Property-based fuzz of the money path: drawn request shapes over HTTP, the books after each.

Every example makes a fresh key (a little credit, sometimes a tight tokens-per-minute
limit), sends one drawn request through the real ingress to the fake engine, waits for its
settlement on the key's ledger stream, and checks what a customer's money relies on:

- no client input gets a 5xx, and every 4xx is the OpenAI error envelope;
- nothing stays on hold or in flight, the balance never goes below zero, and
  balance + hold + spent equals the credit (GET /admin/v1/reconcile finds no difference);
- a request that completed is billed exactly the tokens the engine reported to the client
  (the JSON `usage`, or the stream's final usage chunk), at the catalog price, and those are
  the tokens the fake engine's rules give for the body that was sent;
- a stream the client hung up on is billed at least every token it received, and every
  prompt the engine started on;
- admission's prompt estimate (read off a fresh key's TPM headers) is never below the
  engine's count, and no settlement ever cost more than its hold (`hold_exceeded`);
- a client mistake costs nothing and leaves no trace in the ledger.

The fake engine's rules (doubles/fake_engine.py): prompt tokens are the words of every
message's content plus 3 per message (chat), or the words (token ids) of each prompt; each
choice gets min(max_tokens, 16) tokens, or min(max_tokens, N) with `[[fake-tokens=N]]` in
the prompt; a stream sends one chunk per token per choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx
import pytest
import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tokenmart.deployments.keystore import account_key

from ..helpers import sse_data, wait_for_entries
from .conftest import Marketplace

pytestmark = pytest.mark.integration

SETTLE_TIMEOUT_S = 20.0
ENVELOPE = {"message", "type", "param", "code"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# The integration catalog (conftest.TEST_CATALOG): context length and default output budget.
CONTEXT_LENGTH = {"alpha-chat": 4096, "beta-chat": 8192}
CHAT_DEFAULT_MAX_TOKENS = {"alpha-chat": 64, "beta-chat": 128}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI default, which /v1/completions keeps
FAKE_REPLY_TOKENS = 16  # the fake engine's reply length without a [[fake-tokens=N]] marker
REFUSAL_CODES = {402: "insufficient_quota", 429: "rate_limit_exceeded"}

Mode = Literal["json", "stream", "cut"]


# -- what a drawn request is ------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """The key an example runs on. A roomy key must serve every valid request; a tight one may
    refuse it (402 or 429), but never bill it."""

    credit_micros: int
    tpm: int | None = None

    @property
    def roomy(self) -> bool:
        return self.credit_micros >= 1_000_000 and self.tpm is None


ROOMY = Key(1_000_000)


@dataclass(frozen=True)
class Case:
    path: str
    body: dict[str, Any]
    mode: Mode = "json"
    cut_after: int = 0  # content chunks read before hanging up (mode "cut")
    key: Key = ROOMY
    ascii_json: bool = True  # \uXXXX escapes (always, for lone surrogates) or raw UTF-8
    mistake: str | None = None  # the `param` a 400 must name; None for a valid request

    @property
    def model(self) -> str:
        return self.body["model"]

    @property
    def prompt_tokens(self) -> list[int]:
        """The fake engine's prompt tokens, per prompt (chat has one)."""
        return expected_prompt_tokens(self.body)

    @property
    def choices(self) -> int:
        return (self.body.get("n") or 1) * len(self.prompt_tokens)

    @property
    def tokens_per_choice(self) -> int:
        return expected_tokens_per_choice(self.path, self.body)

    @property
    def output_budget(self) -> int:
        """What admission reserves for the output: the budget of every choice of every prompt."""
        return budget_of(self.path, self.body) * self.choices

    @property
    def full_usage(self) -> tuple[int, int]:
        """(prompt, completion) tokens of the request run to its end."""
        return sum(self.prompt_tokens), self.tokens_per_choice * self.choices

    @property
    def include_usage(self) -> bool:
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.body["stream_options"].get("continuous_usage_stats"))


def words(text: str) -> int:
    return len(text.split())


def content_words(content: Any) -> int:
    if isinstance(content, str):
        return words(content)
    return sum(words(part["text"]) for part in content or [])


def expected_prompt_tokens(body: dict[str, Any]) -> list[int]:
    if "messages" in body:
        return [sum(content_words(m.get("content")) + 3 for m in body["messages"])]
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return [words(prompt)]
    if all(isinstance(item, int) for item in prompt):
        return [len(prompt)]
    return [len(item) if isinstance(item, list) else words(item) for item in prompt]


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        return " ".join(
            m["content"] if isinstance(m["content"], str) else " ".join(p["text"] for p in m["content"])
            for m in body["messages"]
        )
    prompt = body["prompt"]
    return prompt if isinstance(prompt, str) else " ".join(p for p in prompt if isinstance(p, str))


def budget_of(path: str, body: dict[str, Any]) -> int:
    """Each choice's output budget: the request's, else the listing's (chat) or OpenAI's (completions)."""
    budget = body.get("max_completion_tokens") or body.get("max_tokens")
    if budget is None:
        return CHAT_DEFAULT_MAX_TOKENS[body["model"]] if path == CHAT else COMPLETIONS_DEFAULT_MAX_TOKENS
    return budget


def expected_tokens_per_choice(path: str, body: dict[str, Any]) -> int:
    budget = budget_of(path, body)
    marker = prompt_text(body).split("[[fake-tokens=", 1)
    reply = int(marker[1].split("]]", 1)[0]) if len(marker) == 2 else FAKE_REPLY_TOKENS
    return min(budget, reply)


# -- strategies -----------------------------------------------------------------------------

# Words the default text strategy rarely draws together: non-BMP (emoji, ZWJ sequences,
# mathematical letters), CJK, combining marks, non-breaking and zero-width spaces, controls.
SPECIMENS = [
    "hello",
    "naïve",
    "日本語",
    "🙂",
    "👩\u200d💻",
    "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521\U0001d522",  # mathematical Fraktur "Unicode"
    "\U0001f600\U0001f3fd",
    "e\u0301",
    "a\u00a0b",
    "zero\u200bwidth",
    "tab\tline\nbreak",
    "nul\x00",
    "\u2028",
    '"quoted" {json} \\slash',
]
# Every code point except surrogates (Hypothesis's default), or specimens joined by spaces.
TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(SPECIMENS), min_size=1, max_size=6).map(" ".join),
).filter(lambda text: "[[fake-" not in text)
LONE_SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city 🌦",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
RESPONSE_FORMATS = [
    {"type": "json_object"},
    {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
        },
    },
]
TEMPLATE_KWARGS = [{"enable_thinking": False}, {"enable_thinking": True}, {"custom_instructions": "be brief ✨"}]


@st.composite
def messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    drawn = []
    for _ in range(draw(st.integers(1, 3))):
        role = draw(st.sampled_from(["system", "developer", "user", "assistant"]))
        if draw(st.booleans()):
            content: Any = draw(TEXT)
        else:
            content = [{"type": "text", "text": draw(TEXT)} for _ in range(draw(st.integers(1, 3)))]
        message: dict[str, Any] = {"role": role, "content": content}
        if role in ("system", "user") and draw(st.booleans()):
            message["name"] = draw(st.sampled_from(["alice", "bob_2", "ユーザー"]))
        drawn.append(message)
    return drawn


PROMPTS = st.one_of(
    TEXT.filter(bool),
    st.lists(TEXT, min_size=1, max_size=4),
    st.lists(st.integers(0, 50_000), min_size=1, max_size=8),
    st.lists(st.lists(st.integers(0, 50_000), min_size=1, max_size=8), min_size=1, max_size=4),
)


def with_marker(body: dict[str, Any], tokens: int) -> None:
    """Put the fake engine's length marker into the prompt (a word of its own)."""
    marker = f"[[fake-tokens={tokens}]]"
    if "messages" in body:
        last = body["messages"][-1]
        if isinstance(last["content"], str):
            last["content"] += f" {marker}"
        else:
            last["content"].append({"type": "text", "text": marker})
    elif isinstance(body["prompt"], str):
        body["prompt"] += f" {marker}"
    elif all(isinstance(item, str) for item in body["prompt"]):
        body["prompt"][0] += f" {marker}"


def has_text_prompt(body: dict[str, Any]) -> bool:
    prompt = body.get("prompt")
    return "messages" in body or isinstance(prompt, str) or all(isinstance(item, str) for item in prompt)


KEYS = st.one_of(
    st.just(ROOMY),
    st.builds(Key, st.sampled_from([100, 1_000, 10_000]), st.sampled_from([None, 200, 1_000])),
)


@st.composite
def valid_cases(draw: st.DrawFn) -> Case:
    chat = draw(st.sampled_from([CHAT, COMPLETIONS])) == CHAT
    model = draw(st.sampled_from(sorted(CONTEXT_LENGTH)))
    body: dict[str, Any] = {"model": model}
    if chat:
        body["messages"] = draw(messages())
    else:
        body["prompt"] = draw(PROMPTS)
    # Chat takes `"n": null`; vLLM's completions model (which the ingress reuses) does not.
    n = draw(st.sampled_from(["absent", None] if chat else ["absent"]) | st.integers(1, 4))
    if n != "absent":
        body["n"] = n
    mode: Mode = draw(st.sampled_from(["stream", "cut", "json"]))
    budget_field = "max_completion_tokens" if chat and draw(st.booleans()) else "max_tokens"

    if mode == "cut":
        # A long stream (0.02 s a token) the client leaves after a few chunks.
        length = draw(st.integers(60, 300))
        if has_text_prompt(body):
            with_marker(body, length)
        body[budget_field] = draw(st.integers(length, length + 50))
    else:
        if has_text_prompt(body) and draw(st.booleans()):
            with_marker(body, draw(st.integers(0, 24)))  # 0: a reply with no tokens at all
        budget = draw(st.sampled_from(["absent", None]) | st.integers(1, 24))
        if budget != "absent":
            body[budget_field] = budget

    if mode != "json":
        body["stream"] = True
        options = draw(
            st.sampled_from(
                [
                    None,
                    {"include_usage": True},
                    {"include_usage": False},
                    {"include_usage": True, "continuous_usage_stats": True},
                ]
            )
        )
        if options is not None:
            body["stream_options"] = options
    if draw(st.booleans()):
        body["stop"] = draw(st.sampled_from(["\n\n", ["END", "🛑"], ["###"]]))
    if chat:
        if draw(st.booleans()):
            body["tools"], body["tool_choice"] = [TOOL], "none"
        if draw(st.booleans()):
            body["response_format"] = draw(st.sampled_from(RESPONSE_FORMATS))
        if draw(st.booleans()):
            body["chat_template_kwargs"] = draw(st.sampled_from(TEMPLATE_KWARGS))
    case = Case(
        CHAT if chat else COMPLETIONS,
        body,
        mode,
        key=draw(KEYS),
        ascii_json=draw(st.booleans()),
    )
    if mode == "cut":
        chunks = case.choices * case.tokens_per_choice
        case = replace(case, cut_after=draw(st.integers(1, min(30, chunks - 1))))
    return case


def surrogate_text(draw: st.DrawFn) -> str:
    return draw(TEXT) + draw(LONE_SURROGATES) + draw(TEXT)


@st.composite
def mistaken_cases(draw: st.DrawFn) -> Case:
    """A valid request with one client mistake in it, and the `param` its 400 must name."""
    case = draw(valid_cases())
    body = json.loads(json.dumps(case.body))
    chat = case.path == CHAT
    index = len(body["messages"]) - 1 if chat else 0
    kinds = ["n", "n_string", "max_tokens_zero", "max_tokens_context", "surrogate_stop", "surrogate_user"]
    kinds += ["stream_options_without_stream"]
    if chat:
        kinds += ["role", "content_object", "part_type", "part_untyped", "part_string", "surrogate_content"]
        kinds += ["surrogate_part", "surrogate_name", "surrogate_tool", "surrogate_kwarg_key", "tool_choice_auto"]
        kinds += ["template_kwarg", "template", "no_messages", "messages_string"]
    else:
        kinds += ["surrogate_prompt", "surrogate_prompt_list", "empty_prompt", "prompt_mixed"]
    kind = draw(st.sampled_from(kinds))
    message = body["messages"][index] if chat else {}
    if kind == "n":
        body["n"], param = draw(st.sampled_from([0, -1, 17, 100])), "n"
    elif kind in ("max_tokens_zero", "max_tokens_context"):
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = 0 if kind == "max_tokens_zero" else CONTEXT_LENGTH[case.model]
        param = "max_tokens"
    elif kind == "n_string":
        body["n"], param = "two", "n"
    elif kind == "stream_options_without_stream":
        body.pop("stream", None)
        body["stream_options"], param = {"include_usage": True}, "stream_options"
    elif kind == "surrogate_user":
        body["user"], param = surrogate_text(draw), "user"
    elif kind == "surrogate_name":
        message["name"], param = surrogate_text(draw), f"messages.{index}.name"
    elif kind == "surrogate_tool":
        tool = json.loads(json.dumps(TOOL))
        tool["function"]["description"] = surrogate_text(draw)
        body["tools"], body["tool_choice"], param = [tool], "none", "tools.0.function.description"
    elif kind == "surrogate_kwarg_key":
        body["chat_template_kwargs"], param = {surrogate_text(draw): True}, "chat_template_kwargs"
    elif kind == "messages_string":
        body["messages"], param = draw(TEXT), "messages"
    elif kind == "surrogate_prompt_list":
        body["prompt"], param = [draw(TEXT), surrogate_text(draw)], "prompt.1"
    elif kind == "prompt_mixed":
        body["prompt"], param = [draw(TEXT), 7], "prompt"
    elif kind == "surrogate_stop":
        body["stop"], param = [surrogate_text(draw)], "stop.0"
    elif kind == "role":
        message["role"], param = draw(st.sampled_from(["wizard", "", "USER", "model"])), f"messages.{index}.role"
    elif kind == "content_object":
        message["content"], param = {"text": draw(TEXT)}, f"messages.{index}.content"
    elif kind == "part_type":
        message["content"] = [{"type": "bogus", "text": draw(TEXT)}]
        param = f"messages.{index}.content.0.type"
    elif kind == "part_untyped":
        message["content"], param = [{"text": draw(TEXT)}], f"messages.{index}.content.0.type"
    elif kind == "part_string":
        message["content"], param = [draw(TEXT)], f"messages.{index}.content.0"
    elif kind == "surrogate_content":
        message["content"], param = surrogate_text(draw), f"messages.{index}.content"
    elif kind == "surrogate_part":
        message["content"] = [{"type": "text", "text": surrogate_text(draw)}]
        param = f"messages.{index}.content.0.text"
    elif kind == "tool_choice_auto":
        body["tools"], body["tool_choice"], param = [TOOL], draw(st.sampled_from(["auto", "required"])), "tool_choice"
    elif kind == "template_kwarg":
        body["chat_template_kwargs"], param = {"tokenize": True}, "chat_template_kwargs"
    elif kind == "template":
        body["chat_template"], param = "{{ messages }}", "chat_template"
    elif kind == "no_messages":
        body["messages"], param = [], "messages"
    elif kind == "surrogate_prompt":
        body["prompt"], param = surrogate_text(draw), "prompt"
    else:
        body["prompt"], param = draw(st.sampled_from(["", []])), "prompt"
    return Case(case.path, body, case.mode, key=case.key, ascii_json=True, mistake=param)


# -- one request, and the books after it ----------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: httpx.Headers
    body: Any = None  # the JSON body (a completion or an error)
    chunks: list[dict[str, Any]] = field(default_factory=list)  # SSE data events, in order
    done: bool = False  # the stream ended with [DONE]

    @property
    def content_chunks(self) -> list[dict[str, Any]]:
        return [chunk for chunk in self.chunks if chunk.get("choices")]

    @property
    def usage_chunks(self) -> list[dict[str, Any]]:
        return [chunk for chunk in self.chunks if not chunk.get("choices") and chunk.get("usage")]


def send(market: Marketplace, key: str, case: Case) -> Reply:
    """POST the case's body (its JSON exactly as drawn); a cut stream hangs up after `cut_after`
    content chunks by closing its own connection."""
    content = json.dumps(case.body, ensure_ascii=case.ascii_json).encode("utf-8", errors="surrogatepass")
    headers = {**market.auth(key), "content-type": "application/json"}
    with (
        httpx.Client(base_url=market.base_url, timeout=60.0) as client,
        client.stream("POST", case.path, content=content, headers=headers) as response,
    ):
        if response.status_code != 200 or not case.body.get("stream"):
            response.read()
            return Reply(response.status_code, response.headers, response.json())
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers
        reply = Reply(200, response.headers)
        for event in sse_data(response):
            if event == "[DONE]":
                reply.done = True
                continue
            chunk = json.loads(event)
            assert "error" not in chunk, chunk
            reply.chunks.append(chunk)
            if case.mode == "cut" and len(reply.content_chunks) == case.cut_after:
                break  # leaving the block closes the connection mid-stream
        return reply


def assert_envelope(reply: Reply) -> dict[str, Any]:
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.body
    error = reply.body["error"]
    assert set(error) == ENVELOPE, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


def ledger_events(client: redis.Redis, org_id: str) -> list[dict[str, str]]:
    """The ledger of a key's own organization (the key is its only one)."""
    return [entry for _, entry in client.xrange(account_key(org_id, "ledger"))]


def settled_books(
    market: Marketplace, client: redis.Redis, created: dict[str, Any], credit_micros: int, requests: int
) -> dict[str, str]:
    """Wait for `requests` settlements on the ledger (0 or 1), then check the books; returns the
    settlement event (an empty dict when there is none)."""
    wait_for_entries(client, account_key(created["org_id"], "ledger"), requests, SETTLE_TIMEOUT_S)
    events = ledger_events(client, created["org_id"])
    assert [entry.get("event") for entry in events if "event" in entry] == [], events  # no hold_exceeded
    assert len(events) == requests, events

    response = market.http.get("/admin/v1/reconcile", params={"key_id": created["id"]}, headers=market.admin_headers)
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["ok"], report["differences"]) == (True, []), report
    (books,) = report["orgs"]
    assert (books["events"], books["in_flight"], books["on_hold_usd"]) == (requests, 0, 0.0), books
    assert books["balance_usd"] >= 0, books

    spent = int(events[0]["cost_micros"]) if events else 0
    info = market.key_info(created["key"])
    assert round(info["credit_usd"] * 1_000_000) == credit_micros - spent >= 0, (info, events)
    assert (info["on_hold_usd"], round(info["spent_usd"] * 1_000_000)) == (0.0, spent), info
    return events[0] if events else {}


def check_completed(market: Marketplace, case: Case, reply: Reply, settlement: dict[str, str]) -> None:
    """Billed exactly what the engine reported, which is what the fake engine's rules give."""
    prompt, completion = case.full_usage
    if case.mode == "json":
        usage = reply.body["usage"]
        assert len(reply.body["choices"]) == case.choices, reply.body
    else:
        assert reply.done, reply.chunks
        received = reply.content_chunks
        assert all(len(chunk["choices"]) == 1 for chunk in received), received
        # Usage on every chunk only for a client that asked for it (the gateway always asks
        # the engine, to bill a stream cut short).
        assert all(("usage" in chunk) == case.continuous_usage for chunk in received), received
        assert len(received) == completion  # one chunk per token per choice, all delivered
        indexes = {chunk["choices"][0]["index"] for chunk in received}
        assert indexes == (set(range(case.choices)) if case.tokens_per_choice else set()), indexes
        assert len(reply.usage_chunks) == (1 if case.include_usage else 0), reply.chunks
        usage = reply.usage_chunks[0]["usage"] if case.include_usage else None
    if usage is not None:
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion), usage
        assert usage["total_tokens"] == prompt + completion
        assert round(usage["cost"] * 1_000_000) == int(settlement["cost_micros"]), (usage, settlement)
    assert (settlement["status"], int(settlement["prompt_tokens"]), int(settlement["completion_tokens"])) == (
        "completed",
        prompt,
        completion,
    ), settlement
    assert int(settlement["cost_micros"]) == market.cost_micros(case.model, prompt, completion), settlement


def check_aborted(market: Marketplace, case: Case, reply: Reply, settlement: dict[str, str]) -> None:
    """Billed at least every token the client received, and every prompt the engine started."""
    received = reply.content_chunks
    assert len(received) == case.cut_after and not reply.done
    assert all(len(chunk["choices"]) == 1 for chunk in received), received
    prompt, completion = case.full_usage
    billed_prompt, billed_completion = int(settlement["prompt_tokens"]), int(settlement["completion_tokens"])
    if settlement["status"] == "completed":
        # The engine finished before the hang-up reached it (a slow client): the whole request.
        assert (billed_prompt, billed_completion) == (prompt, completion), settlement
    else:
        assert settlement["status"] == "aborted", settlement
        # The engine's first step streams the first token of every choice of every prompt.
        assert billed_prompt == prompt, (settlement, case.prompt_tokens)
        assert len(received) <= billed_completion <= completion, settlement
    assert int(settlement["cost_micros"]) == market.cost_micros(case.model, billed_prompt, billed_completion), (
        settlement
    )


def run_case(market: Marketplace, client: redis.Redis, case: Case) -> None:
    fields: dict[str, Any] = {"tpm": case.key.tpm} if case.key.tpm else {}
    created = market.create_key(name="money-fuzz", credit_usd=case.key.credit_micros / 1_000_000, **fields)
    reply = send(market, created["key"], case)
    assert reply.status < 500, (reply.status, reply.body)
    event(f"{case.path} {case.mode}: {reply.status}")

    if case.mistake is not None:
        assert reply.status == 400, (reply.status, reply.body)
        error = assert_envelope(reply)
        assert (error["type"], error["param"]) == ("invalid_request_error", case.mistake), error
        settled_books(market, client, created, case.key.credit_micros, requests=0)
        return
    if reply.status != 200:
        assert not case.key.roomy and reply.status in REFUSAL_CODES, (reply.status, reply.body)
        assert assert_envelope(reply)["code"] == REFUSAL_CODES[reply.status], reply.body
        settled_books(market, client, created, case.key.credit_micros, requests=0)
        return

    # A fresh key's token bucket is full, so the headers show exactly what admission reserved:
    # its prompt estimate plus the output budget. The estimate sizes the hold; it must not be
    # below what the engine counts.
    reserved = int(reply.headers["x-ratelimit-limit-tokens"]) - int(reply.headers["x-ratelimit-remaining-tokens"])
    assert reserved - case.output_budget >= sum(case.prompt_tokens), (reserved, case.output_budget, case.prompt_tokens)

    settlement = settled_books(market, client, created, case.key.credit_micros, requests=1)
    assert settlement["model"] == case.model, settlement
    event(f"settled {settlement['status']}")
    if case.mode == "cut":
        check_aborted(market, case, reply, settlement)
    else:
        check_completed(market, case, reply, settlement)


FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the checkout; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(case=valid_cases())
@example(  # four prompts x n=4, the client leaves after one chunk: every prompt is still billed
    case=Case(
        COMPLETIONS,
        {
            "model": "beta-chat",
            "prompt": ["one [[fake-tokens=200]]", "one two", "🙂 \U0001d518\U0001d52b\U0001d526 日本語", "a\u00a0b"],
            "n": 4,
            "max_tokens": 200,
            "stream": True,
        },
        "cut",
        cut_after=1,
    )
)
@example(  # n=3 chat stream with content parts, tools as context, names, read to the end with usage
    case=Case(
        CHAT,
        {
            "model": "alpha-chat",
            "messages": [
                {"role": "system", "name": "ops", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "👩\u200d💻 hi"}, {"type": "text", "text": "x"}]},
            ],
            "n": 3,
            "max_completion_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "tools": [TOOL],
            "tool_choice": "none",
            "response_format": {"type": "json_object"},
            "chat_template_kwargs": {"enable_thinking": False},
        },
        "stream",
        ascii_json=False,
    )
)
@example(  # a reply of no tokens at all, streamed with usage: its first packet is the usage chunk
    case=Case(
        CHAT,
        {
            "model": "alpha-chat",
            "messages": [{"role": "user", "content": "[[fake-tokens=0]]"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        "stream",
    )
)
@example(  # a pre-tokenized batch of prompts, n=2, as JSON on a key with a tight TPM
    case=Case(
        COMPLETIONS,
        {"model": "alpha-chat", "prompt": [[1, 2, 3], [4], [5, 6]], "n": 2, "max_tokens": 7},
        key=Key(10_000, 1_000),
    )
)
def test_every_request_shape_is_billed_exactly_what_the_engine_counted(
    marketplace: Marketplace, redis_client: redis.Redis, case: Case
) -> None:
    run_case(marketplace, redis_client, case)


@settings(FUZZ, max_examples=40)
@given(case=mistaken_cases())
@example(  # a lone surrogate in a content part, sent as a JSON escape
    case=Case(
        CHAT,
        {"model": "alpha-chat", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800b"}]}]},
        mistake="messages.0.content.0.text",
    )
)
@example(  # a lone low surrogate as a streamed prompt
    case=Case(COMPLETIONS, {"model": "beta-chat", "prompt": "\udfff", "stream": True}, "stream", mistake="prompt")
)
@example(  # a lone high surrogate in the second prompt of a batch
    case=Case(COMPLETIONS, {"model": "beta-chat", "prompt": ["ok", "x\ud83dy"], "n": 2}, mistake="prompt.1")
)
@example(  # a prompt list mixing text and a token id: `param` must name the field, not a union member
    case=Case(COMPLETIONS, {"model": "alpha-chat", "prompt": ["hi", 7]}, mistake="prompt")
)
def test_client_mistakes_are_400_envelopes_that_cost_nothing(
    marketplace: Marketplace, redis_client: redis.Redis, case: Case
) -> None:
    run_case(marketplace, redis_client, case)
