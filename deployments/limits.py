"""Rate limits: token buckets per key, the admission verdicts, and the rate-limit headers.

Limits are token buckets refilled continuously (capacity = the per-minute limit, refill = the
limit per 60 000 ms). `lua/admit.lua` keeps their levels in Redis scaled by `SCALE`, so all
arithmetic is exact integers; Python reads them back with `bucket_level` for the headers of
responses that admission did not decide. The admission script answers with a `Verdict`.

The scale and the verdict table are defined once, in `scripts.py`, and handed to the Lua
scripts as constants; this module turns each refusing verdict into its API error.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from .auth import auth_refusal
from .config import DEFAULT_LIMITS
from .errors import APIError, BadRequest, InsufficientCredit, PermissionDenied, RateLimited
from .schemas import Limits, micros_to_usd
from .scripts import SCALE, Verdict, key_keys

# DEFAULT_LIMITS, the default of AppArgs.default_limits (config.py), is also the built-in
# fallback of each limit an operator leaves unset; importable from here as before.


@dataclass(frozen=True)
class RateLimitState:
    """What the `x-ratelimit-*` headers report after an admission decision."""

    rpm: int
    rpm_remaining: int
    rpm_reset_ms: int
    tpm: int
    tpm_remaining: int
    tpm_reset_ms: int
    max_concurrency: int = 0
    max_tokens_per_request: int = 0

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.rpm),
            "x-ratelimit-remaining-requests": str(self.rpm_remaining),
            "x-ratelimit-reset-requests": reset_duration(self.rpm_reset_ms),
            "x-ratelimit-limit-tokens": str(self.tpm),
            "x-ratelimit-remaining-tokens": str(self.tpm_remaining),
            "x-ratelimit-reset-tokens": reset_duration(self.tpm_reset_ms),
        }


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bucket_level(limit: int, stored: str | None, ts: str | None, now_ms: int) -> int:
    """A token bucket's scaled level at `now_ms`, refilled as admit.lua refills it."""
    capacity = limit * SCALE
    if stored is None or ts is None:
        return capacity
    return min(capacity, int(float(stored)) + max(0, now_ms - int(float(ts))) * limit)


def reset_duration(ms: int) -> str:
    """OpenAI's reset format: `6ms`, `1.5s`, `2m3s`."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s"


def effective_limits(own: Limits, defaults: Limits) -> tuple[int, int, int, int]:
    """(rpm, tpm, max_concurrency, max_tokens_per_request): the key's own limits, else the
    operator's defaults, else the built-in ones."""
    builtin = DEFAULT_LIMITS
    return (
        own.rpm or defaults.rpm or builtin.rpm or 0,
        own.tpm or defaults.tpm or builtin.tpm or 0,
        own.max_concurrency or defaults.max_concurrency or builtin.max_concurrency or 0,
        own.max_tokens_per_request or defaults.max_tokens_per_request or builtin.max_tokens_per_request or 0,
    )


def default_state(defaults: Limits) -> RateLimitState:
    """What the headers say when no key is known: the operator's defaults, untouched."""
    rpm, tpm, max_concurrency, max_per_request = effective_limits(Limits(), defaults)
    return RateLimitState(rpm, rpm, 0, tpm, tpm, 0, max_concurrency, max_per_request)


async def current_state(redis: aioredis.Redis, location: tuple[str, str], defaults: Limits) -> RateLimitState:
    """The key's limits and bucket levels now, without consuming anything (one round trip)."""
    pipe = redis.pipeline(transaction=False)
    named = key_keys(*location)
    pipe.hget(named["key"], "limits")
    pipe.hmget(named["buckets"], ["req_level", "req_ts", "tok_level", "tok_ts"])
    pipe.time()
    raw_limits, (req_level, req_ts, tok_level, tok_ts), (seconds, micros) = await pipe.execute()
    rpm, tpm, max_concurrency, max_per_request = effective_limits(Limits.from_stored(raw_limits), defaults)
    now_ms = seconds * 1000 + micros // 1000
    req = bucket_level(rpm, req_level, req_ts, now_ms)
    tok = bucket_level(tpm, tok_level, tok_ts, now_ms)
    return RateLimitState(
        rpm, req // SCALE, _ceil_div(rpm * SCALE - req, rpm),
        tpm, tok // SCALE, _ceil_div(tpm * SCALE - tok, tpm),
        max_concurrency, max_per_request,
    )  # fmt: skip


def refusal(
    verdict: Verdict, retry_ms: int, limits: RateLimitState, tokens: int, hold: int, model: str, output_tokens: int
) -> APIError:
    """The API error for a verdict other than ADMITTED (`retry_ms` carries the per-request bound
    for OVER_REQUEST_BOUND)."""
    if (refused_key := auth_refusal(verdict)) is not None:
        return refused_key
    if verdict is Verdict.MODEL_NOT_ALLOWED:
        return PermissionDenied(f"This API key may not use the model {model!r}.", param="model")
    if verdict is Verdict.OVER_REQUEST_BOUND:
        return BadRequest(
            f"This request may generate up to {output_tokens} tokens (prompts x n x max_tokens), more than this "
            f"key's limit of {retry_ms} tokens per request. Lower max_tokens or n, or send fewer prompts.",
            param="max_tokens",
        )
    headers = limits.headers()
    if verdict is Verdict.INSUFFICIENT_CREDIT:
        return InsufficientCredit(
            f"Your credit balance is too low for this request (it may cost up to ${micros_to_usd(hold):.6f} with "
            "its max_tokens). Add credit, or lower max_tokens.",
            headers=headers,
        )
    if verdict is Verdict.SPEND_CAP:
        return InsufficientCredit(
            f"This API key has reached its spend cap (this request may cost up to ${micros_to_usd(hold):.6f}). "
            "Wait for the cap's period to reset (GET /v1/key shows when), or ask for a higher cap.",
            code="spend_cap_reached",
            headers=headers,
        )
    if verdict is Verdict.LARGER_THAN_TPM:
        return RateLimited(
            f"This request needs up to {tokens} tokens, more than this key's whole limit of {limits.tpm} "
            "tokens per minute. Lower max_tokens or shorten the prompt.",
            type="tokens",
            headers={**headers, "x-should-retry": "false"},
        )
    retry_headers = {**headers, "retry-after": str(max(1, -(-retry_ms // 1000))), "retry-after-ms": str(retry_ms)}
    if verdict is Verdict.REQUESTS_PER_MINUTE:
        message = f"Rate limit reached: {limits.rpm} requests per minute. Retry after {retry_ms} ms."
        return RateLimited(message, type="requests", headers=retry_headers)
    if verdict is Verdict.TOKENS_PER_MINUTE:
        message = f"Rate limit reached: {limits.tpm} tokens per minute. Retry after {retry_ms} ms."
        return RateLimited(message, type="tokens", headers=retry_headers)
    message = f"Too many concurrent requests for this key (limit {limits.max_concurrency}). Retry when one finishes."
    return RateLimited(message, type="requests", code="concurrency_limit_exceeded", headers=retry_headers)
