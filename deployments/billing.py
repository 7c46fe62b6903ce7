"""Billing: hold credit for a request's worst case at admission, settle its real tokens after.

The request pipeline calls exactly two methods, `admit` before dispatch and `settle` in a
`finally` after it; each is one Lua call. Admission (`lua/admit.lua`) authenticates the key,
checks its limits (see `limits.py`) and places a credit hold for the worst case at the
listing's prices. Settlement (`lua/settle.lua`), idempotent per billing id, charges the real
tokens (at most the hold), refunds the rest, returns the unused tokens to the TPM bucket,
releases the concurrency slot and appends the ledger event. When Redis cannot take a
settlement it goes to the local spool (`spool.py`) and is replayed.

Redis layout (per organization, hash-tagged; docs/accounts.md has all of it):
  {acct:<org>}:org                the organization, with balance/hold/spent/credited micro-USD
  {acct:<org>}:key:<key>          the key record, with its own holds, spend and spend cap
  {acct:<org>}:buckets:<key>      rate-limit token buckets (levels scaled by scripts.SCALE)
  {acct:<org>}:inflight:<key>     zset: admitted, unsettled billing ids -> lease expiry (ms)
  {acct:<org>}:holds              hash: billing id -> the credit it holds
  {acct:<org>}:leases             zset: "<key>|<billing id>" -> lease expiry, for every key
  {acct:<org>}:usage              hash "<UTC day>|<key>|<model>|<metric>" -> int (usage.py)
  {acct:<org>}:ledger             stream of usage events (reconcile.py, ledger.py)
  {acct:<org>}:settled:<billing>  idempotency marker (7 days)
  {acct:<org>}:gen:<response id>  the generation record (GET /v1/generation)
  {acct:<org>}:outbox             spend alerts raised by settlement (alerts.py)

An admission whose ingress dies before settling keeps its slot and hold until its lease
(LEASE_MS) runs out; the next admission of any key of its organization frees both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .catalog import Listing
from .config import DEFAULT_LIMITS, DEFAULT_SPOOL_DIR
from .errors import BillingUnavailable
from .keystore import Locator
from .limits import RateLimitState, current_state, default_state, effective_limits, refusal
from .redis_connection import describe_failure
from .schemas import Limits, micros_to_usd
from .scripts import Verdict, account_key, key_keys, lua_source
from .spool import SettlementSpool

logger = logging.getLogger("tokenmart.billing")

SETTLED_MARKER_TTL_S = 7 * 24 * 3600
GENERATION_TTL_S = 30 * 24 * 3600  # the default of AppArgs.generation_retention_days
# rejected: the engine refused the request as invalid before doing any work; it is released
# like any other admission but is not a request in the usage counters or the ledger.
Outcome = Literal["completed", "aborted", "error", "rejected"]


# Unsettled admissions expire after this long, so a crashed ingress cannot hold a slot forever.
LEASE_MS = 15 * 60 * 1000


SCALE = 60_000  # bucket levels are stored scaled (see lua/admit.lua)


@dataclass
class Admission:
    """What admission granted; settlement needs it back."""

    billing_id: str
    org_id: str
    key_id: str
    listing: Listing  # the listing serving it (a fallback's, once one takes over)
    hold_micros: int = 0
    reserved_tokens: int = 0
    limits: RateLimitState | None = None
    started_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    details: Any = None  # what the gateway keeps for the generation record (gateway._Details)
    # The listings the key may be served by, in order (the one asked for first, when allowed);
    # the hold covers the dearest of them.
    candidates: list[Listing] = field(default_factory=list)
    tier: str | None = None  # the key's fair-share tier, else its organization's (None: the default)


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


@dataclass(frozen=True)
class Generation:
    """What the generation record (GET /v1/generation) holds beyond the tokens and the cost."""

    response_id: str
    served_by: str
    stream: bool = False
    user: str = ""
    ttft_ms: int | None = None
    latency_ms: int | None = None
    cached_tokens: int = 0

    def as_json(self) -> str:
        return json.dumps(
            {
                "response_id": self.response_id,
                "served_by": self.served_by,
                "cached_tokens": self.cached_tokens,
                "ttft_ms": "" if self.ttft_ms is None else self.ttft_ms,
                "latency_ms": "" if self.latency_ms is None else self.latency_ms,
                "stream": int(self.stream),
                "user": self.user,
            }
        )


def new_billing_id() -> str:
    return uuid.uuid4().hex


class Meter:
    """Admission and settlement of one ingress process.

    `defaults` are the operator's limits for keys without their own (AppArgs.default_limits);
    settlements Redis cannot take go to `spool`, else to this process's spool in `spool_dir`
    (AppArgs.spool_dir).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        defaults: Limits | None = None,
        spool: SettlementSpool | None = None,
        *,
        spool_dir: str | Path | None = None,
        generation_ttl_s: int = GENERATION_TTL_S,
        locator: Locator | None = None,
    ) -> None:
        self.redis = redis
        self.locator = locator or Locator(redis)
        self.generation_ttl_s = generation_ttl_s
        self.defaults = defaults or DEFAULT_LIMITS
        self.spool = spool or SettlementSpool.of_this_process(spool_dir or DEFAULT_SPOOL_DIR)
        self._admit = redis.register_script(lua_source("admit"))
        self._settle = redis.register_script(lua_source("settle"))

    def default_state(self) -> RateLimitState:
        """What the headers say when no key is known: the operator's defaults, untouched."""
        return default_state(self.defaults)

    async def admit(
        self,
        key_hash: str,
        listing: Listing,
        prompt_tokens: int,
        max_output_tokens: int,
        *,
        now_ms: int | None = None,
        fallbacks: Sequence[tuple[Listing, int, int]] = (),
    ) -> Admission:
        """Authenticate the key and reserve limits and credit for the worst case, in one Redis call
        (two the first time this replica sees the key: its secrets index entry is read once).

        `fallbacks` are the listings that may serve instead, each with its own prompt count and
        output budget: the key's allow-list is applied to each, and the hold (and the tokens
        reserved) cover the dearest the key may use (`Admission.candidates`).

        Raises 401 (unknown, revoked, expired or rotated key), 403 (no candidate model allowed),
        429 or 402 (out of credit, or over the key's spend cap; with the rate-limit headers), or
        503 when Redis does not answer.
        """
        options = [(listing, prompt_tokens, max_output_tokens), *fallbacks]
        holds = [option.hold_micros(prompt, output) for option, prompt, output in options]
        tokens = max(prompt + output for _, prompt, output in options)
        billing_id = new_billing_id()
        org_id, key_id = await self.locator.locate(key_hash)
        named = key_keys(org_id, key_id)
        keys = [named[name] for name in ("org", "key", "buckets", "inflight", "holds", "leases")]
        rpm, tpm, max_concurrency, max_per_request = effective_limits(Limits(), self.defaults)
        models = " ".join(option.id for option, _, _ in options)
        args = [billing_id, key_hash, models, rpm, tpm, max_concurrency, tokens, " ".join(map(str, holds)), LEASE_MS]
        args += ["" if now_ms is None else now_ms, max_per_request, max_output_tokens]
        try:
            verdict, retry_ms, *state = await self._admit(keys=keys, args=args)
        except RedisError as exc:
            logger.warning("admission of %s refused: %s", key_id, describe_failure(exc))
            raise BillingUnavailable(
                "The billing store is unavailable; the request was not served. Retry shortly.", retry_after_s=2
            ) from exc
        limits = RateLimitState(*(int(v) for v in state[:7]))
        allowed = [flag == "1" for flag in (state[7] if len(state) > 7 else "")]
        hold = max((amount for amount, ok in zip(holds, allowed, strict=False) if ok), default=holds[0])
        if verdict != Verdict.ADMITTED:
            raise refusal(Verdict(int(verdict)), int(retry_ms), limits, tokens, hold, listing.id, max_output_tokens)
        candidates = [option for (option, _, _), ok in zip(options, allowed, strict=True) if ok]
        tier = (state[8] or state[9] or None) if len(state) > 9 else None
        return Admission(
            billing_id, org_id, key_id, candidates[0], hold, tokens, limits, candidates=candidates, tier=tier
        )

    async def current_state(self, key_hash: str) -> RateLimitState:
        """The key's limits and bucket levels now, without consuming anything (one round trip
        once the key is located)."""
        return await current_state(self.redis, await self.locator.locate(key_hash), self.defaults)

    async def settle(
        self,
        admission: Admission,
        prompt_tokens: int,
        completion_tokens: int,
        outcome: Outcome,
        generation: Generation | None = None,
        *,
        now_ms: int | None = None,
    ) -> Settlement:
        """Charge the real tokens. Engine errors charge no completion tokens (the caller passes 0)."""
        org_id, key_id = admission.org_id, admission.key_id
        generation = generation or Generation(response_id=admission.billing_id, served_by=admission.listing.id)
        # Prompt tokens from the engine's prefix cache are charged at the listing's cached price.
        cost = admission.listing.cost_micros(prompt_tokens, completion_tokens, generation.cached_tokens)
        named = key_keys(org_id, key_id)
        keys = [
            named["org"],
            named["key"],
            account_key(org_id, "usage"),
            account_key(org_id, "ledger"),
            account_key(org_id, f"settled:{admission.billing_id}"),
            named["buckets"],
            named["inflight"],
            named["holds"],
            account_key(org_id, f"gen:{generation.response_id}"),
            account_key(org_id, "alerts"),
            account_key(org_id, "outbox"),
            named["leases"],
        ]
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
            org_id,
            generation.as_json(),
            self.generation_ttl_s,
            "" if now_ms is None else now_ms,
        ]
        try:
            settled, balance, charged = await self._settle(keys=keys, args=args)
        except RedisError as exc:
            self.spool.append(keys, args)
            logger.warning("settlement of %s spooled for replay: %s", admission.billing_id, describe_failure(exc))
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
