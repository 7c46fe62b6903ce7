"""Metering: admit a request against the key's credit, then settle its real tokens.

The request pipeline calls exactly two methods, `admit` before dispatch and `settle` in a
`finally` after it. Settlement is one Lua call (`lua/settle.lua`), idempotent per billing
id. This cut admits on "credit left > 0"; the hold-based admission (rate limits plus a
credit hold in one Lua call) replaces `admit` without changing its callers.

Redis layout (per account, hash-tagged):
  {acct:<id>}:usage               hash "<UTC day>|<model>|<metric>" -> int
  {acct:<id>}:ledger              stream of usage events
  {acct:<id>}:settled:<billing>   idempotency marker (7 days)
"""

from __future__ import annotations

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
from .errors import BillingUnavailable, InsufficientCredit
from .keystore import account_key
from .schemas import KeyRecord, UsageReport, UsageRow, micros_to_usd

logger = logging.getLogger("tokenmart.metering")

LUA_DIR = Path(__file__).parent / "lua"
SETTLED_MARKER_TTL_S = 7 * 24 * 3600
Outcome = Literal["completed", "aborted", "error"]
_METRICS = ("requests", "prompt_tokens", "completion_tokens", "cost_micros")


@dataclass
class Admission:
    """What admission granted; settlement needs it back."""

    billing_id: str
    key_id: str
    listing: Listing
    hold_micros: int = 0
    started_at_ms: int = field(default_factory=lambda: int(time.time() * 1000))


@dataclass(frozen=True)
class Settlement:
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    balance_micros: int
    duplicate: bool = False

    @property
    def cost_usd(self) -> float:
        return micros_to_usd(self.cost_micros)


def new_billing_id() -> str:
    return uuid.uuid4().hex


class Meter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._settle = redis.register_script((LUA_DIR / "settle.lua").read_text())

    async def admit(self, record: KeyRecord, listing: Listing) -> Admission:
        if record.balance_micros <= 0:
            raise InsufficientCredit(
                "Your credit balance is used up. Add credit to this key to continue.",
            )
        return Admission(billing_id=new_billing_id(), key_id=record.id, listing=listing)

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
        ]
        try:
            settled, balance = await self._settle(keys=keys, args=args)
        except RedisError as exc:
            # The first cut has no spool yet: the event is logged with everything needed to
            # replay it by hand. The next metering cut writes it to a local spool instead.
            logger.error(
                "settlement failed, usage NOT recorded: billing_id=%s key=%s model=%s prompt=%d completion=%d "
                "cost_micros=%d outcome=%s: %s",
                admission.billing_id, key_id, admission.listing.id, prompt_tokens, completion_tokens,
                cost, outcome, exc,
            )  # fmt: skip
            raise BillingUnavailable("Usage could not be recorded.") from exc
        return Settlement(prompt_tokens, completion_tokens, cost, int(balance), duplicate=not settled)

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
