"""The paid request pipeline: authenticate, validate, admit, dispatch, settle.

Routes hand a parsed OpenAI request to `Gateway.handle`; everything between the HTTP
layer and the model's LLMServer deployment happens here. The engine is always asked for
usage (streams too, with continuous usage stats so an aborted stream still knows how many
tokens it produced); the client sees the usage chunk only if it asked for it.
Settlement runs in a `finally` shielded from cancellation, so a client that disconnects
mid-stream is still billed for what it received, exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, get_args

import anyio
from fastapi import Request
from ray.serve.exceptions import BackPressureError
from starlette.responses import JSONResponse, Response, StreamingResponse

from . import auth
from .billing import Admission, Generation, Meter, Outcome, Settlement
from .caller_watch import CALLER_HEADER
from .catalog import MAX_FALLBACKS, Catalog, Listing
from .errors import APIError, BadRequest, ModelNotFound, ServiceUnavailable, engine_error, request_refusal
from .fair_queue import FairQueue, QueueFull, QueueTimeout, Slot
from .metrics import CLIENT_CLOSED, UNKNOWN_MODEL, MarketplaceMetrics
from .ray_llm import ErrorResponse, RawRequestInfo, sanitize_chat_request
from .shedding import EngineLoad, ListingPeek, RefusalMemo
from .tokens import PromptCounter
from .validation import max_output_tokens, validate_embeddings, validate_request

logger = logging.getLogger("tokenmart.gateway")
# Names the listing that served a paid request (another than `model` when a fallback did).
SERVED_BY_HEADER = "x-tokenmart-served-by"
BYTE_BOUND = PromptCounter()  # listings without a local tokenizer


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_openai(cls, usage: Any) -> Usage:
        if usage is None:
            return cls()
        if not isinstance(usage, dict):
            usage = usage.model_dump()
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


@dataclass(frozen=True)
class UsageWanted:
    """The usage a streaming client asked to see: the final totals, and usage on every chunk
    (vLLM's rule: `continuous_usage_stats` counts only with `include_usage`)."""

    final: bool
    per_chunk: bool


class StreamTally:
    """What a stream has produced so far, summed over every choice and every prompt.

    With continuous usage stats, vLLM puts on each chunk the tokens of that chunk's choice
    and of that choice's own prompt, not the request's totals; only the final usage chunk
    sums them. A stream that ends early (client gone, engine dead) has no final chunk, so the
    tally keeps the latest count of each choice (index `prompt * n + choice`) and of each
    prompt, and bills their sums: with `n` > 1 or several prompts, the last chunk alone
    covers one choice of one prompt.
    """

    def __init__(self, n: int) -> None:
        self.n = max(n, 1)
        self._completion: dict[int, int] = {}
        self._prompt: dict[int, int] = {}
        self._final: Usage | None = None
        self.response_id: str | None = None
        self.cached_tokens = 0

    def add(self, chunk: dict, usage: Any) -> None:
        counted = Usage.from_openai(usage)
        choices = chunk.get("choices")
        if not choices:
            self._final = counted  # the engine's own totals
            return
        index = int(choices[0].get("index") or 0)
        self._completion[index] = max(self._completion.get(index, 0), counted.completion_tokens)
        prompt = index // self.n
        self._prompt[prompt] = max(self._prompt.get(prompt, 0), counted.prompt_tokens)

    def take(self, chunk: dict, *, keep_usage: bool) -> dict | None:
        """Count one engine chunk's usage. Returns the chunk to pass on (its usage removed
        unless the client asked for usage on every chunk), or None for a chunk without
        choices: the final usage chunk, or an empty one."""
        usage = chunk.get("usage")
        if self.response_id is None and isinstance(chunk.get("id"), str):
            self.response_id = chunk["id"]
        if usage:
            self.add(chunk, usage)
            self.cached_tokens = max(self.cached_tokens, cached_tokens(usage))
        if not chunk.get("choices"):
            return None
        if usage and not keep_usage:
            del chunk["usage"]
        return chunk

    @property
    def usage(self) -> Usage:
        if self._final is not None:
            return self._final
        return Usage(sum(self._prompt.values()), sum(self._completion.values()))


class Gateway:
    def __init__(
        self,
        catalog: Catalog,
        handles: dict[str, Any],
        meter: Meter,
        counters: dict[str, PromptCounter] | None = None,
        *,
        plain_requests: bool = False,
        metrics: MarketplaceMetrics | None = None,
        caller: str | None = None,
    ) -> None:
        self.catalog = catalog
        # This ingress replica's actor name, sent with each engine call so the engine replica
        # can stop the call if this replica dies mid-request (caller_watch.py).
        self._request_info = RawRequestInfo(headers={CALLER_HEADER: caller}) if caller else None
        self.metrics = metrics
        self._plain_requests = plain_requests
        self._counters = counters or {}
        self.meter = meter
        # One configured handle per model, made once: `.options()` per request is costly. A LoRA
        # adapter's handle is its base deployment's, multiplexed on the adapter id, so Serve
        # prefers replicas that already hold the adapter.
        self._handles = {model_id: handle.options(stream=True) for model_id, handle in handles.items()}
        for listing in catalog.listings:
            for adapter in listing.adapters:
                self._handles[adapter.id] = handles[listing.id].options(stream=True, multiplexed_model_id=adapter.id)
        self._replayer: asyncio.Task | None = None
        # More loops of this replica (alert delivery, ledger trimming), started with the replayer.
        self.background: list[Callable[[], Awaitable[None]]] = []
        self._background: list[asyncio.Task | None] = []
        # Admitted and unsettled requests per engine deployment, to refuse before Redis is asked
        # when this replica alone fills a deployment (shedding.py).
        self.load = EngineLoad.for_listings(catalog.listings)
        self.peek = ListingPeek(self.load, self._door_deployment)
        # Keys refused for their requests per minute, refused at the door until they may retry.
        self.refusals = RefusalMemo()
        # The weighted fair queues of the listings that have one (catalog `fair_share`), per
        # engine deployment: an adapter waits in its base model's queue.
        self.queues = {
            listing.id: FairQueue(
                fair_share_concurrency(listing), name=listing.id, max_waiting=listing.fair_share.max_waiting
            )
            for listing in catalog.listings
            if listing.fair_share is not None
        }

    def _ensure_replayer(self) -> None:
        """Start the spool replay loop, and the other background loops, on the serving event loop
        (once per replica)."""
        if self._replayer is None or self._replayer.done():
            self._replayer = asyncio.get_running_loop().create_task(self.meter.replay_forever())
        # Each loop runs once; one that ended (it failed) starts again, the others go on.
        self._background += [None] * (len(self.background) - len(self._background))
        for index, (start, task) in enumerate(zip(self.background, self._background, strict=True)):
            if task is None or task.done():
                self._background[index] = asyncio.get_running_loop().create_task(start())

    def resolve(self, model_id: str | None) -> Listing:
        if not model_id:
            raise BadRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")
        listing = self.catalog.get(model_id)
        if listing is None:
            raise ModelNotFound(f"The model {model_id!r} does not exist. See GET /v1/models.", param="model")
        return listing

    def _door_deployment(self, model_id: str) -> str | None:
        """The deployment the door may refuse a request for `model_id` on when it is full; None
        for unknown models and for listings with fallbacks (another listing may serve them)."""
        listing = self.catalog.get(model_id)
        return None if listing is None or listing.fallbacks else self._deployment_of(listing)

    def candidates(self, body: Any) -> list[Listing]:
        """The listings that may serve a request, in order: its `model`, then its `models`
        (OpenRouter's field) or, without them, the listing's catalog fallbacks."""
        models = getattr(body, "models", None)
        if models is not None:
            if not 1 <= len(models) <= MAX_FALLBACKS + 1:
                raise BadRequest(f"'models' must name 1 to {MAX_FALLBACKS + 1} models.", param="models")
            if not body.model:
                body.model = models[0]
        primary = self.resolve(body.model)
        names = primary.fallbacks if models is None else models
        chosen = [primary]
        for name in names:
            listing = self.catalog.get(name) if isinstance(name, str) else None
            if listing is None:
                raise ModelNotFound(
                    f"The model {name!r} in 'models' does not exist. See GET /v1/models.", param="models"
                )
            if listing not in chosen:
                chosen.append(listing)
        return chosen

    def _deployment_of(self, listing: Listing) -> str:
        """The engine deployment that serves a listing: an adapter's is its base model's."""
        return (self.catalog.base_of(listing.id) or listing).id

    async def handle(self, body: Any, request: Request, *, method: str) -> Response:
        """Serve one paid request, and record it in the metrics however it ends."""
        started = time.perf_counter()
        model = body.model if isinstance(body.model, str) and self.catalog.get(body.model) else UNKNOWN_MODEL
        stream = bool(getattr(body, "stream", False))  # embeddings have no stream
        key_hash = ""
        status, code = 500, "internal_error"
        try:
            key_hash = auth.parse_api_key(request.headers.get("authorization"))
            response = await self._handle(body, request, method, key_hash, started)
            status, code = 200, None
            return response
        except APIError as exc:
            status, code = exc.status_code, exc.code
            if key_hash:
                self.refusals.remember(key_hash, exc, self.key_label(key_hash))
            raise
        except anyio.get_cancelled_exc_class():
            status, code = CLIENT_CLOSED, "client_closed"
            raise
        finally:
            # A stream that started is recorded by `_stream`, when it ends.
            if self.metrics is not None and not (stream and status == 200):
                key_id = self.key_label(key_hash) if key_hash else None
                self.metrics.request_done(
                    model, status, code, stream=stream, key_id=key_id, seconds=time.perf_counter() - started
                )

    def key_label(self, key_hash: str) -> str | None:
        """The key id of a secret this replica has located (the metrics' key label), else None."""
        location = self.meter.locator.cached(key_hash)
        return None if location is None else location.key_id

    async def _handle(self, body: Any, request: Request, method: str, key_hash: str, started: float) -> Response:
        self._ensure_replayer()
        if method == "embeddings":
            return await self._embed(body, key_hash, started)
        chat = method == "chat"
        bodies = _checked_candidates(body, self.candidates(body), chat=chat)
        body = next(iter(bodies.values()))
        # The key's format and checksum were checked; its record is read by the admission
        # script, so a request costs two Redis round trips in all (admit, settle), and one more
        # the first time this replica sees the key (its secrets index entry).
        admission = await self._admit(bodies, key_hash, chat=chat)
        admission.details = _Details(
            started=started,
            fallback_id=f"{'chatcmpl' if chat else 'cmpl'}-{admission.billing_id}",
            stream=bool(body.stream),
            user=body.user if isinstance(getattr(body, "user", None), str) else "",
        )
        headers = admission.limits.headers() if admission.limits else {}
        wants = _usage_wanted(body)
        for each in bodies.values():
            # The billing id is the engine's request id, so the response id and the ledger match.
            each.request_id = admission.billing_id
            each.models = None  # the engine serves one model
            if each.stream:
                _force_usage(each)

        responses, first = await self._dispatch(admission, bodies, method, headers)
        listing = admission.listing  # the one that served
        headers = {**headers, SERVED_BY_HEADER: listing.id}
        if not body.stream:
            return await self._reply(admission, first, headers)

        admission.details.first_token_at = time.perf_counter()
        if self.metrics is not None:
            self.metrics.first_token(listing.id, admission.details.first_token_at - started)
        begun = _Begun()
        return _SettledStreamingResponse(
            self._stream(admission, first, responses, wants, started, begun, StreamTally(body.n or 1)),
            begun,
            lambda: self._abandon(admission, responses, started),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
        )

    async def _embed(self, body: Any, key_hash: str, started: float) -> Response:
        """An embeddings request: held at the byte bound of its input, billed per prompt token."""
        listing = self.resolve(body.model)
        validate_embeddings(body, listing)
        # The byte bound covers any tokenizer's count, special tokens included (a BERT tokenizer
        # adds two per input, which a chat template count would miss).
        inputs = SimpleNamespace(prompt=body.input)
        admission = await self._admit(
            {listing.id: body}, key_hash, chat=False, counted=(await BYTE_BOUND.count_async(inputs, chat=False), 0)
        )
        admission.details = _Details(
            started=started, fallback_id=f"embd-{admission.billing_id}", stream=False, user=body.user or ""
        )
        body.request_id = admission.billing_id
        headers = admission.limits.headers() if admission.limits else {}
        _, first = await self._dispatch(admission, {listing.id: body}, "embeddings", headers)
        payload = first if isinstance(first, dict) else first.model_dump()
        usage = Usage.from_openai(payload.get("usage"))
        response_id = payload.get("id") if isinstance(payload.get("id"), str) else None
        settlement = await self._settle(admission, Usage(usage.prompt_tokens, 0), "completed", response_id=response_id)
        if payload.get("usage") is not None:
            payload["usage"]["cost"] = settlement.cost_usd
        return JSONResponse(payload, headers={**headers, SERVED_BY_HEADER: listing.id})

    async def _admit(
        self, bodies: dict[str, Any], key_hash: str, *, chat: bool, counted: tuple[int, int] | None = None
    ) -> Admission:
        """Count the prompt for each candidate (an adapter shares its base model's tokenizer) and
        hold the cost of the dearest the key may use."""
        options = [self.catalog.get(model_id) for model_id in bodies]
        # An engine slot is taken before the first await, so requests arriving together cannot
        # all pass on the same free one; the admission's settlement gives it back. With
        # fallbacks, the first candidate with room takes it (the dispatch moves it if need be).
        held = next((o for o in options if self.load.refusal(self._deployment_of(o)) is None), options[0])
        self.load.take(self._deployment_of(held))
        try:
            plans = []
            for listing, body in zip(options, bodies.values(), strict=True):
                if counted is None:
                    counter = self._counters.get(self._deployment_of(listing)) or BYTE_BOUND
                    tokens = (await counter.count_async(body, chat=chat), max_output_tokens(body, chat=chat))
                else:
                    tokens = counted
                plans.append((listing, *tokens))
            admission = await self.meter.admit(key_hash, *plans[0], fallbacks=plans[1:])
        except BaseException:
            self.load.settled(self._deployment_of(held))  # refused (or the client left) before it was admitted
            raise
        admission.listing = held  # the listing whose slot the admission holds, until dispatch
        if self.metrics is not None:
            self.metrics.in_flight(held.id, +1)
        return admission

    def _occupy(self, admission: Admission, listing: Listing) -> bool:
        """Move the admission's engine slot (and its in-flight count) to `listing`; False when
        that listing's deployment is full on this replica."""
        old, new = self._deployment_of(admission.listing), self._deployment_of(listing)
        if old != new:
            if self.load.refusal(new) is not None:
                return False
            self.load.take(new)
            self.load.settled(old)
        if self.metrics is not None and admission.listing.id != listing.id:
            self.metrics.in_flight(admission.listing.id, -1)
            self.metrics.in_flight(listing.id, +1)
        admission.listing = listing
        return True

    async def _dispatch(
        self, admission: Admission, bodies: dict[str, Any], method: str, headers: dict
    ) -> tuple[Any, Any]:
        """Send the request to the first candidate that takes it and wait for its first packet.

        A candidate that is overloaded or unavailable, or whose context the prompt does not fit,
        passes the request to the next (`admission.listing` is the one that took it). When none
        takes it, or something else stops it (the client leaving, the engine refusing or
        failing), the admission is settled with nothing produced and the first candidate's
        error goes on.
        """
        first_error: tuple[Outcome, APIError] | None = None
        for index, listing in enumerate(admission.candidates):
            last = index == len(admission.candidates) - 1
            if not self._occupy(admission, listing):
                first_error = first_error or ("rejected", _overloaded(listing))  # never reached an engine
                continue
            try:
                responses, first = await self._dispatch_once(admission, bodies[listing.id], method)
            except _Unserved as unserved:
                _release_turn(admission)
                if unserved.passes and not last:
                    logger.info("%s passed %s on (%s)", listing.id, admission.billing_id, unserved.error.code)
                    first_error = first_error or (unserved.outcome, unserved.error)
                    continue
                outcome, error = first_error or (unserved.outcome, unserved.error)
                await self._settle(admission, Usage(), outcome)
                error.headers = {**headers, **error.headers}
                raise error from None
            return responses, first
        assert first_error is not None  # every candidate was full
        await self._settle(admission, Usage(), first_error[0])
        error = first_error[1]
        error.headers = {**headers, **error.headers}
        raise error

    async def _wait_turn(self, admission: Admission, body: Any) -> None:
        """The tenant's place in the listing's fair queue (when it has one), and the engine
        priority of its tier (when the engine schedules by priority)."""
        listing = admission.listing
        weight = self.catalog.tier_weight(admission.tier)
        if hasattr(body, "priority"):
            # vLLM runs lower values first; a client's own priority is never passed on.
            body.priority = -weight if listing.engine.extra.get("scheduling_policy") == "priority" else 0
        queue = self.queues.get(self._deployment_of(listing))
        if queue is not None and admission.details is not None:
            deadline = (self.catalog.base_of(listing.id) or listing).fair_share.deadline_s
            admission.details.slot = await queue.acquire(admission.org_id, weight, deadline)

    async def _dispatch_once(self, admission: Admission, body: Any, method: str) -> tuple[Any, Any]:
        """One engine's first packet, or `_Unserved` saying why not. A cancellation (the client
        left) settles the admission and goes on."""
        responses = None
        try:
            await self._wait_turn(admission, body)
            # Plain engines (the fake one) take the body as a dict, so their replicas never
            # import vLLM to unpickle it.
            request = body.model_dump() if self._plain_requests else body
            responses = getattr(self._handles[admission.listing.id], method).remote(request, self._request_info)
            first = await anext(responses)
        except QueueTimeout as timeout:
            why = (
                "its waiting room is full"
                if isinstance(timeout, QueueFull)
                else f"no turn within {timeout.waited_s:.1f} s"
            )
            busy = ServiceUnavailable(
                f"The model {admission.listing.id!r} is busy ({why}); retry shortly.",
                code="model_overloaded",
                retry_after_s=timeout.retry_after_s,
            )
            raise _Unserved("rejected", busy, passes=True) from None
        except BaseException as exc:
            outcome, error = _dispatch_failure(admission.listing, exc)
            if outcome == "aborted" and responses is not None:
                responses.cancel()
            if error is None:
                await self._settle(admission, Usage(), outcome)
                raise
            raise _Unserved(outcome, error, passes=_passes_on(error)) from None
        head = first[0] if isinstance(first, list) and first else first
        if isinstance(head, ErrorResponse) or (isinstance(head, dict) and "error" in head):
            # The engine answered with an error instead of output.
            error = engine_error(head)
            raise _Unserved("rejected" if error.status_code < 500 else "error", error, passes=_passes_on(error))
        return responses, first

    async def _reply(self, admission: Admission, first: Any, headers: dict) -> JSONResponse:
        """A whole (non-streamed) answer: bill the engine's usage and show its cost."""
        payload = first if isinstance(first, dict) else first.model_dump()
        usage = Usage.from_openai(payload.get("usage"))
        response_id = payload.get("id") if isinstance(payload.get("id"), str) else None
        settlement = await self._settle(
            admission, usage, "completed", response_id=response_id, cached=cached_tokens(payload.get("usage"))
        )
        if payload.get("usage") is not None:
            payload["usage"]["cost"] = settlement.cost_usd
        return JSONResponse(payload, headers=headers)

    async def _abandon(self, admission: Admission, responses: Any, started: float) -> None:
        """The client left before the stream's body started: stop the engine, charge nothing."""
        responses.cancel()
        await self._settle(admission, Usage(), "aborted")
        if self.metrics is not None:
            self.metrics.request_done(
                admission.listing.id,
                CLIENT_CLOSED,
                "client_closed",
                stream=True,
                key_id=admission.key_id,
                seconds=time.perf_counter() - started,
            )

    async def _stream(
        self,
        admission: Admission,
        first: Any,
        responses: Any,
        wants: UsageWanted,
        started: float,
        begun: _Begun,
        tally: StreamTally,
    ) -> AsyncIterator[str]:
        begun.started = True  # from here on, this generator settles however it ends
        usage_chunk: dict | None = None
        outcome: Outcome = "aborted"
        ended = (CLIENT_CLOSED, "client_closed")  # the status and code the metrics record
        settled = False
        try:
            try:
                async with aclosing(_engine_chunks(first, responses)) as chunks:
                    async for chunk in chunks:
                        if "error" in chunk:
                            outcome = "error"
                            yield _sse(engine_error(chunk).body())
                        elif (shown := tally.take(chunk, keep_usage=wants.per_chunk)) is not None:
                            yield _sse(shown)
                        elif chunk.get("usage"):
                            usage_chunk = chunk  # goes out at the end, with its cost
                outcome, ended = ("error", (500, "engine_error")) if outcome == "error" else ("completed", (200, None))
            except _EngineStopped:
                # The engine replica died (or its stream broke) mid-stream. The client gets an
                # error event instead of a cut connection, and pays, as after a disconnect, for
                # the tokens it was sent.
                logger.exception("the stream of %s failed mid-way", admission.listing.id)
                failure = ServiceUnavailable(
                    f"The model {admission.listing.id!r} stopped while streaming; retry the request.",
                    code="engine_unavailable",
                )
                outcome, ended = "aborted", (failure.status_code, failure.code)
                yield _sse(failure.body())
            settlement = await self._settle(
                admission, tally.usage, outcome, response_id=tally.response_id, cached=tally.cached_tokens
            )
            settled = True
            if usage_chunk is not None and wants.final:
                usage_chunk["usage"]["cost"] = settlement.cost_usd
                yield _sse(usage_chunk)
            yield "data: [DONE]\n\n"
        finally:
            if not settled:
                # Client went away (or we failed): stop the engine and bill what was produced.
                responses.cancel()
                await self._settle(
                    admission, tally.usage, outcome, response_id=tally.response_id, cached=tally.cached_tokens
                )
            if self.metrics is not None:
                self.metrics.request_done(
                    admission.listing.id,
                    *ended,
                    stream=True,
                    key_id=admission.key_id,
                    seconds=time.perf_counter() - started,
                )

    async def _settle(
        self,
        admission: Admission,
        usage: Usage,
        outcome: Outcome,
        *,
        response_id: str | None = None,
        cached: int = 0,
    ) -> Settlement:
        """Settle, even when the surrounding task is being cancelled. Engine errors bill no output.

        It does not fail when Redis does: the meter spools the settlement for replay.
        """
        if outcome == "error":
            usage = Usage(usage.prompt_tokens, 0)
        generation = _generation(admission, response_id, cached)
        _release_turn(admission)
        with anyio.CancelScope(shield=True):
            try:
                settlement = await self.meter.settle(
                    admission, usage.prompt_tokens, usage.completion_tokens, outcome, generation
                )
            finally:
                self.load.settled(self._deployment_of(admission.listing))
        if self.metrics is not None:
            self.metrics.in_flight(admission.listing.id, -1)  # each admission settles once
        if self.metrics is not None and settlement.uncharged_micros:
            self.metrics.hold_exceeded(admission.listing.id)
        if self.metrics is not None and not settlement.duplicate:
            self.metrics.billed(
                admission.listing.id,
                admission.key_id,
                settlement.prompt_tokens,
                settlement.completion_tokens,
                settlement.cost_usd,
                cached_tokens=min(generation.cached_tokens, settlement.prompt_tokens),
            )
        return settlement


@dataclass
class _Begun:
    started: bool = False


@dataclass
class _Details:
    """What the generation record needs of a request beyond its tokens (Admission.details)."""

    started: float  # perf_counter at arrival
    fallback_id: str  # the response id, when the engine sent none (it failed first)
    stream: bool
    user: str
    first_token_at: float | None = None
    slot: Slot | None = None  # its turn in the listing's fair queue, while it has one


def _release_turn(admission: Admission) -> None:
    """Give the request's fair-queue slot back (it settles, or moves to another candidate)."""
    details: _Details | None = getattr(admission, "details", None)
    if details is not None and details.slot is not None:
        details.slot.release()
        details.slot = None


def fair_share_concurrency(listing: Listing) -> int:
    """Requests a fair-queued listing runs at once from one ingress replica."""
    assert listing.fair_share is not None
    return listing.fair_share.concurrency_of(listing.autoscaling)


def _generation(admission: Admission, response_id: str | None, cached: int) -> Generation:
    details: _Details | None = getattr(admission, "details", None)
    if details is None:
        return Generation(response_id=response_id or admission.billing_id, served_by=admission.listing.id)
    now = time.perf_counter()
    first = details.first_token_at
    return Generation(
        response_id=response_id or details.fallback_id,
        served_by=admission.listing.id,
        stream=details.stream,
        user=details.user,
        ttft_ms=None if first is None else round((first - details.started) * 1000),
        latency_ms=round((now - details.started) * 1000),
        cached_tokens=cached,
    )


def cached_tokens(usage: Any) -> int:
    """Prompt tokens served from the engine's prefix cache, as its usage reports them."""
    if usage is None:
        return 0
    if not isinstance(usage, dict):
        usage = usage.model_dump()
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


class _SettledStreamingResponse(StreamingResponse):
    """A stream whose admission is settled even when its body never starts.

    `Gateway._stream` settles when it ends, however it ends, but only once it has started. A
    client that leaves between the response and its first byte (Starlette fails sending the
    response start) leaves that generator unstarted, and its `finally` would never run; then
    `abandon` stops the engine and settles the admission instead.
    """

    def __init__(
        self, body: AsyncIterator[str], begun: _Begun, abandon: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(body, **kwargs)
        self._begun = begun
        self._abandon = abandon

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._begun.started:
                self._begun.started = True
                with anyio.CancelScope(shield=True):
                    await self._abandon()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _events(item: Any) -> list[str]:
    """The JSON `data:` payloads in one engine packet (a packet may hold several SSE events)."""
    if not isinstance(item, str):
        return [item.model_dump_json()] if hasattr(item, "model_dump_json") else []
    return [
        line[len("data: ") :].strip()
        for line in item.split("\n")
        if line.startswith("data: ") and line.strip() != "data: [DONE]"
    ]


def _usage_wanted(body: Any) -> UsageWanted:
    """What the client itself asked for: usage is forced on for billing, and shown to the
    client only as far as it asked."""
    options = body.stream_options if body.stream else None
    final = bool(options and options.include_usage)
    return UsageWanted(final, per_chunk=final and bool(options.continuous_usage_stats))


class _Unserved(Exception):
    """A candidate did not serve the request: how it settles, the client's error, and whether
    the next candidate may serve it instead."""

    def __init__(self, outcome: Outcome, error: APIError, *, passes: bool) -> None:
        super().__init__(error.message)
        self.outcome, self.error, self.passes = outcome, error, passes


# vLLM's refusal of a prompt (plus its output budget) longer than the model's context.
_CONTEXT_REFUSAL = "maximum context length"


def _passes_on(error: APIError) -> bool:
    """Whether a fallback may serve a request this error stopped: an overloaded or unavailable
    engine, or a prompt longer than the listing's context; not the client's other mistakes."""
    if error.status_code == 503:
        return True
    if error.status_code == 400 and _CONTEXT_REFUSAL in error.message:
        error.code = "context_length_exceeded"  # OpenAI's code for it
        return True
    return False


def _overloaded(listing: Listing) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"The model {listing.id!r} is at capacity right now; retry shortly.", code="model_overloaded", retry_after_s=1
    )


def _checked_candidates(body: Any, candidates: list[Listing], *, chat: bool) -> dict[str, Any]:
    """Model id -> the body that candidate is sent, each checked against its listing. The
    requested model's refusals are the client's; a fallback that cannot take the request (a
    smaller context for its max_tokens, no tool parser) is left out."""
    if chat:
        # Materialise pydantic's lazy iterables (content parts) so the body can be inspected
        # here and pickled to the engine replica.
        try:
            body = sanitize_chat_request(body)
        except ValueError as exc:  # content the route's own checks did not see (callers without them)
            raise BadRequest("Invalid message content.", param="messages") from exc
    bodies: dict[str, Any] = {}
    for index, listing in enumerate(candidates):
        each = body.model_copy() if len(candidates) > 1 else body
        each.model = listing.id
        try:
            if listing.task != "generate":
                raise BadRequest(
                    f"The model {listing.id!r} is an embedding model; send it to /v1/embeddings.", param="model"
                )
            validate_request(each, listing, chat=chat)
        except APIError:
            if index == 0:
                raise
            continue
        bodies[listing.id] = each
    return bodies


def _dispatch_failure(listing: Listing, exc: BaseException) -> tuple[Outcome, APIError | None]:
    """How a dispatch that failed before the first packet settles, and the error the client
    gets (None: the exception itself goes on, as a cancellation does)."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        return "aborted", None
    if isinstance(exc, APIError):
        return "error", exc
    refusal = request_refusal(exc)
    if refusal is not None:
        # The engine refused the request itself (a template argument, a value it cannot take):
        # the client's mistake, so a 400 that SDKs do not retry, and no charge.
        return "rejected", refusal
    if isinstance(exc, BackPressureError):
        return "error", _overloaded(listing)
    logger.error("dispatch to %s failed", listing.id, exc_info=exc)
    return "error", ServiceUnavailable(f"The model {listing.id!r} is not available right now.", retry_after_s=5)


class _EngineStopped(Exception):
    """The engine's stream broke after it had started (its replica died, say)."""


async def _engine_chunks(first: Any, responses: Any) -> AsyncIterator[dict]:
    """Every chunk of an engine's stream, parsed, from the packet already read onwards."""
    batch = first
    while True:
        for item in batch if isinstance(batch, list) else [batch]:
            for event in _events(item):
                yield json.loads(event)
        try:
            batch = await anext(responses)
        except StopAsyncIteration:
            return
        except Exception as exc:
            raise _EngineStopped from exc


def _force_usage(body: Any) -> None:
    """Ask the engine for usage on every chunk, whatever the client asked for."""
    if body.stream_options is None:
        annotation = type(body).model_fields["stream_options"].annotation
        options_type = next(t for t in get_args(annotation) if t is not type(None))
        body.stream_options = options_type(include_usage=True, continuous_usage_stats=True)
    else:
        body.stream_options.include_usage = True
        body.stream_options.continuous_usage_stats = True
