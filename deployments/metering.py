"""Metering: admit a request against the key's credit, then settle its real tokens.

The request pipeline calls exactly two methods, `admit` before dispatch and `settle` in a
`finally` after it; each is one Lua call. Admission (`lua/admit.lua`) checks concurrency,
requests/min and tokens/min (prompt estimate + max output, counted up front) and places a
credit hold for the worst case at the listing's prices. Settlement (`lua/settle.lua`),
idempotent per billing id, refunds the unused hold, charges the real tokens, returns the
unused tokens to the TPM bucket and releases the concurrency slot.

Redis layout (per account, hash-tagged):
  {acct:<id>}:key                 the key record, with balance/hold/spent/credited micro-USD
  {acct:<id>}:buckets             rate-limit token buckets (levels scaled by 60 000)
  {acct:<id>}:inflight            zset: admitted, unsettled billing ids -> lease expiry (ms)
  {acct:<id>}:holds               hash: billing id -> the credit it holds
  {acct:<id>}:usage               hash "<UTC day>|<model>|<metric>" -> int
  {acct:<id>}:ledger              stream of usage events
  {acct:<id>}:settled:<billing>   idempotency marker (7 days)

An admission whose ingress dies before settling keeps its slot and hold until its lease
(LEASE_MS) runs out; the next admission of that key frees both.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .catalog import Listing
from .errors import (
    APIError,
    AuthenticationFailed,
    BadRequest,
    BillingUnavailable,
    InsufficientCredit,
    PermissionDenied,
    RateLimited,
)
from .keystore import account_key
from .schemas import Limits, UsageReport, UsageRow, micros_to_usd
from .spool import SettlementSpool

logger = logging.getLogger("tokenmart.metering")

LUA_DIR = Path(__file__).parent / "lua"
SETTLED_MARKER_TTL_S = 7 * 24 * 3600
# rejected: the engine refused the request as invalid before doing any work; it is released
# like any other admission but is not a request in the usage counters or the ledger.
Outcome = Literal["completed", "aborted", "error", "rejected"]
_METRICS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros")
# Operator defaults for keys that set no limits of their own (AppArgs.default_limits).
DEFAULT_LIMITS = Limits(rpm=600, tpm=1_000_000, max_concurrency=64, max_tokens_per_request=131_072)


# Unsettled admissions expire after this long, so a crashed ingress cannot hold a slot forever.
LEASE_MS = 15 * 60 * 1000


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
            "x-ratelimit-reset-requests": _duration(self.rpm_reset_ms),
            "x-ratelimit-limit-tokens": str(self.tpm),
            "x-ratelimit-remaining-tokens": str(self.tpm_remaining),
            "x-ratelimit-reset-tokens": _duration(self.tpm_reset_ms),
        }


SCALE = 60_000  # bucket levels are stored scaled (see lua/admit.lua)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bucket_level(limit: int, stored: str | None, ts: str | None, now_ms: int) -> int:
    """A token bucket's scaled level at `now_ms`, refilled as admit.lua refills it."""
    capacity = limit * SCALE
    if stored is None or ts is None:
        return capacity
    return min(capacity, int(float(stored)) + max(0, now_ms - int(float(ts))) * limit)


def _duration(ms: int) -> str:
    """OpenAI's reset format: `6ms`, `1.5s`, `2m3s`."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s"


@dataclass
class Admission:
    """What admission granted; settlement needs it back."""

    billing_id: str
    key_id: str
    listing: Listing
    hold_micros: int = 0
    reserved_tokens: int = 0
    limits: RateLimitState | None = None
    started_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))


@dataclass(frozen=True)
class Settlement:
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int  # what was charged: the tokens' cost, capped at the hold
    balance_micros: int | None  # None when the settlement was spooled (balance unknown)
    duplicate: bool = False
    spooled: bool = False
    # The tokens' cost beyond what could be charged (a `hold_exceeded` ledger event); 0 normally.
    uncharged_micros: int = 0

    @property
    def cost_usd(self) -> float:
        return micros_to_usd(self.cost_micros)


def new_billing_id() -> str:
    return uuid.uuid4().hex


_AUTH_REFUSALS = {
    6: ("Incorrect API key provided.", "invalid_api_key"),
    7: ("This API key has been revoked.", "revoked_api_key"),
    8: ("This API key has expired.", "expired_api_key"),
}


def _refusal(
    verdict: int, retry_ms: int, limits: RateLimitState, tokens: int, hold: int, model: str, output_tokens: int
) -> APIError:
    if verdict in _AUTH_REFUSALS:
        message, code = _AUTH_REFUSALS[verdict]
        return AuthenticationFailed(message, code=code)
    if verdict == 9:
        return PermissionDenied(f"This API key may not use the model {model!r}.", param="model")
    if verdict == 10:
        return BadRequest(
            f"This request may generate up to {output_tokens} tokens (prompts x n x max_tokens), more than this "
            f"key's limit of {retry_ms} tokens per request. Lower max_tokens or n, or send fewer prompts.",
            param="max_tokens",
        )
    headers = limits.headers()
    if verdict == 5:
        return InsufficientCredit(
            f"Your credit balance is too low for this request (it may cost up to ${micros_to_usd(hold):.6f} with "
            "its max_tokens). Add credit, or lower max_tokens.",
            headers=headers,
        )
    if verdict == 3:
        return RateLimited(
            f"This request needs up to {tokens} tokens, more than this key's whole limit of {limits.tpm} "
            "tokens per minute. Lower max_tokens or shorten the prompt.",
            type="tokens",
            headers={**headers, "x-should-retry": "false"},
        )
    retry_headers = {**headers, "retry-after": str(max(1, -(-retry_ms // 1000))), "retry-after-ms": str(retry_ms)}
    if verdict == 1:
        message = f"Rate limit reached: {limits.rpm} requests per minute. Retry after {retry_ms} ms."
        return RateLimited(message, type="requests", headers=retry_headers)
    if verdict == 2:
        message = f"Rate limit reached: {limits.tpm} tokens per minute. Retry after {retry_ms} ms."
        return RateLimited(message, type="tokens", headers=retry_headers)
    message = f"Too many concurrent requests for this key (limit {limits.max_concurrency}). Retry when one finishes."
    return RateLimited(message, type="requests", code="concurrency_limit_exceeded", headers=retry_headers)


class Meter:
    def __init__(
        self, redis: aioredis.Redis, defaults: Limits | None = None, spool: SettlementSpool | None = None
    ) -> None:
        self.redis = redis
        self.defaults = defaults or DEFAULT_LIMITS
        self.spool = spool or SettlementSpool()
        self._admit = redis.register_script((LUA_DIR / "admit.lua").read_text())
        self._settle = redis.register_script((LUA_DIR / "settle.lua").read_text())

    def effective_limits(self, own: Limits) -> tuple[int, int, int, int]:
        """(rpm, tpm, max_concurrency, max_tokens_per_request): the key's own limits, else the
        operator's defaults, else the built-in ones."""
        default, builtin = self.defaults, DEFAULT_LIMITS
        return (
            own.rpm or default.rpm or builtin.rpm or 0,
            own.tpm or default.tpm or builtin.tpm or 0,
            own.max_concurrency or default.max_concurrency or builtin.max_concurrency or 0,
            own.max_tokens_per_request or default.max_tokens_per_request or builtin.max_tokens_per_request or 0,
        )

    def default_state(self) -> RateLimitState:
        """What the headers say when no key is known: the operator's defaults, untouched."""
        rpm, tpm, max_concurrency, max_per_request = self.effective_limits(Limits())
        return RateLimitState(rpm, rpm, 0, tpm, tpm, 0, max_concurrency, max_per_request)

    async def admit(
        self,
        key_id: str,
        key_hash: str,
        listing: Listing,
        prompt_tokens: int,
        max_output_tokens: int,
        *,
        now_ms: int | None = None,
    ) -> Admission:
        """Authenticate the key and reserve limits and credit for the worst case, in one Redis call.

        Raises 401 (unknown, revoked or expired key), 403 (model not allowed), 429 or 402
        (with the rate-limit headers), or 503 when Redis does not answer.
        """
        tokens = prompt_tokens + max_output_tokens
        hold = listing.cost_micros(prompt_tokens, max_output_tokens)
        billing_id = new_billing_id()
        keys = [account_key(key_id, name) for name in ("key", "buckets", "inflight", "holds")]
        rpm, tpm, max_concurrency, max_per_request = self.effective_limits(Limits())
        args = [billing_id, key_hash, listing.id, rpm, tpm, max_concurrency, tokens, hold, LEASE_MS]
        args += ["" if now_ms is None else now_ms, max_per_request, max_output_tokens]
        try:
            verdict, retry_ms, *state = await self._admit(keys=keys, args=args)
        except RedisError as exc:
            logger.warning("admission of %s refused: Redis failed (%r)", key_id, exc)
            raise BillingUnavailable(
                "The billing store is unavailable; the request was not served. Retry shortly.", retry_after_s=2
            ) from exc
        limits = RateLimitState(*(int(v) for v in state))
        if verdict != 0:
            raise _refusal(int(verdict), int(retry_ms), limits, tokens, hold, listing.id, max_output_tokens)
        return Admission(billing_id, key_id, listing, hold, tokens, limits)

    async def current_state(self, key_id: str) -> RateLimitState:
        """The key's limits and bucket levels now, without consuming anything (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(account_key(key_id, "key"), "limits")
        pipe.hmget(account_key(key_id, "buckets"), ["req_level", "req_ts", "tok_level", "tok_ts"])
        pipe.time()
        raw_limits, (req_level, req_ts, tok_level, tok_ts), (seconds, micros) = await pipe.execute()
        own = Limits.from_stored(raw_limits)
        rpm, tpm, max_concurrency, max_per_request = self.effective_limits(own)
        now_ms = seconds * 1000 + micros // 1000
        req = bucket_level(rpm, req_level, req_ts, now_ms)
        tok = bucket_level(tpm, tok_level, tok_ts, now_ms)
        return RateLimitState(
            rpm, req // SCALE, _ceil_div(rpm * SCALE - req, rpm),
            tpm, tok // SCALE, _ceil_div(tpm * SCALE - tok, tpm),
            max_concurrency, max_per_request,
        )  # fmt: skip

    async def settle(
        self, admission: Admission, prompt_tokens: int, completion_tokens: int, outcome: Outcome
    ) -> Settlement:
        """Charge the real tokens. Engine errors charge no completion tokens (the caller passes 0)."""
        cost = admission.listing.cost_micros(prompt_tokens, completion_tokens)
        key_id = admission.key_id
        keys = [
            account_key(key_id, "key"),
            account_key(key_id, "usage"),
            account_key(key_id, "ledger"),
            account_key(key_id, f"settled:{admission.billing_id}"),
        ]
        keys += [account_key(key_id, "buckets"), account_key(key_id, "inflight"), account_key(key_id, "holds")]
        args = [
            admission.billing_id,
            key_id,
            admission.listing.id,
            prompt_tokens,
            completion_tokens,
            cost,
            admission.hold_micros,
            outcome,
            admission.started_at_ms,
            SETTLED_MARKER_TTL_S,
            max(admission.reserved_tokens - prompt_tokens - completion_tokens, 0),
            admission.reserved_tokens,
        ]
        try:
            settled, balance, charged = await self._settle(keys=keys, args=args)
        except RedisError as exc:
            self.spool.append(keys, args)
            logger.warning("Redis unavailable at settlement of %s (%s); spooled for replay", admission.billing_id, exc)
            return Settlement(prompt_tokens, completion_tokens, cost, balance_micros=None, spooled=True)
        if not settled:
            return Settlement(prompt_tokens, completion_tokens, cost, int(balance), duplicate=True)
        if int(charged) < cost:
            logger.error(
                "settlement of %s cost %d micro-USD, more than its hold; charged %d (hold_exceeded in the ledger)",
                admission.billing_id,
                cost,
                int(charged),
            )
        return Settlement(
            prompt_tokens, completion_tokens, int(charged), int(balance), uncharged_micros=cost - int(charged)
        )

    async def replay_forever(self, interval_s: float = 2.0) -> None:
        """Background task of each ingress replica: drain the spool whenever Redis answers."""
        while True:
            await self.replay_spool()
            await asyncio.sleep(interval_s)

    async def replay_spool(self) -> int:
        """Send spooled settlements again, in order, stopping at the first failure; also adopt
        the spools of ingress processes that died. Returns how many went."""
        replayed = await self._replay(self.spool)
        for orphan in self.spool.orphans():
            sent = await self._replay(orphan)
            replayed += sent
            if orphan.pending():
                orphan.release()  # Redis failed part way; adopted again on a later pass
            else:
                orphan.remove()
                logger.info("adopted and replayed the spool %s of a stopped ingress", orphan.path.name)
        return replayed

    async def _replay(self, spool: SettlementSpool) -> int:
        replayed = 0
        for entry in spool.pending():
            try:
                await self._settle(keys=entry["keys"], args=entry["args"])
            except RedisError:
                break
            replayed += 1
        if replayed:
            spool.drop_first(replayed)
            logger.info("replayed %d spooled settlement(s) from %s", replayed, spool.path.name)
        return replayed

    async def usage(self, key_ids: list[str], start: date, end: date, group_by: Literal["model", "day"]) -> UsageReport:
        """Totals over [start, end] (UTC days, inclusive), grouped by model or by day."""
        pipe = self.redis.pipeline(transaction=False)
        for key_id in key_ids:
            pipe.hgetall(account_key(key_id, "usage"))
        try:
            counters = await pipe.execute() if key_ids else []
        except RedisError as exc:
            raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc

        first, last = start.isoformat(), end.isoformat()
        groups: dict[str, dict[str, int]] = {}
        for raw in counters:
            for name, value in raw.items():
                day, model, metric = name.split("|", 2)
                if metric not in _METRICS or not (first <= day <= last):
                    continue
                group = groups.setdefault(model if group_by == "model" else day, dict.fromkeys(_METRICS, 0))
                group[metric] += int(value)

        def row(label: str | None, totals: dict[str, int]) -> UsageRow:
            return UsageRow(
                model=label if group_by == "model" else None,
                date=label if group_by == "day" else None,
                requests=totals["requests"],
                prompt_tokens=totals["prompt_tokens"],
                completion_tokens=totals["completion_tokens"],
                total_tokens=totals["prompt_tokens"] + totals["completion_tokens"],
                cost_usd=micros_to_usd(totals["cost_micros"]),
            )

        overall = dict.fromkeys(_METRICS, 0)
        for totals in groups.values():
            for metric in _METRICS:
                overall[metric] += totals[metric]
        return UsageReport(
            key_id=key_ids[0] if len(key_ids) == 1 else None,
            start=first,
            end=last,
            group_by=group_by,
            data=[row(label, groups[label]) for label in sorted(groups)],
            total=row(None, overall).model_copy(update={"model": None, "date": None}),
        )
