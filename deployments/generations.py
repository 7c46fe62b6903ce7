"""Per-generation lookup: `GET /v1/generation?id=<response id>`, and a key's recent ones
(`GET /v1/generations`, the console's activity page).

Settlement (`lua/settle.lua`) writes one record per response, `{acct:<org>}:gen:<response id>`,
in the same call that bills it (no extra round trip on the request path); it expires after
the generation retention (AppArgs.generation_retention_days). A key sees the generations of
its own organization only: the record is looked up under the caller's organization, so
another organization's id is simply not found.
"""

from __future__ import annotations

from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import RedisError

from .errors import BillingUnavailable, NotFound
from .schemas import micros_to_usd
from .scripts import account_key


class GenerationView(BaseModel):
    object: Literal["generation"] = "generation"
    id: str
    request_id: str
    model: str
    served_by: str
    key_id: str
    status: Literal["completed", "aborted", "error", "rejected"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    created: int
    ttft_ms: int | None  # streams only: arrival to the first token
    latency_ms: int | None  # arrival to settlement
    stream: bool
    user: str | None


def _optional_int(value: str | None) -> int | None:
    return int(value) if value else None


async def find_generation(redis: aioredis.Redis, org_id: str, response_id: str) -> GenerationView:
    try:
        raw = await redis.hgetall(account_key(org_id, f"gen:{response_id}"))
    except RedisError as exc:
        raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc
    if not raw:
        raise NotFound(
            f"No generation with id {response_id!r} for this API key's organization (records are kept for the "
            "generation retention period).",
            param="id",
            code="generation_not_found",
        )
    return _view(raw)


def _view(raw: dict[str, str]) -> GenerationView:
    return GenerationView(
        id=raw["id"],
        request_id=raw["request_id"],
        model=raw["model"],
        served_by=raw["served_by"],
        key_id=raw["key_id"],
        status=raw["status"],  # type: ignore[arg-type]
        prompt_tokens=int(raw["prompt_tokens"]),
        completion_tokens=int(raw["completion_tokens"]),
        cached_tokens=int(raw.get("cached_tokens") or 0),
        cost_usd=micros_to_usd(int(raw["cost_micros"])),
        created=int(raw["created"]),
        ttft_ms=_optional_int(raw.get("ttft_ms")),
        latency_ms=_optional_int(raw.get("latency_ms")),
        stream=raw.get("stream") == "1",
        user=raw.get("user") or None,
    )


# The most ledger events one look at a key's recent generations reads (newest first), and
# the most generations it returns.
RECENT_SCAN = 2000
MAX_RECENT_GENERATIONS = 100


def _from_ledger(event: dict[str, str]) -> dict[str, str]:
    """A generation record's fields from its ledger event (the record expired, or predates them)."""
    return {
        "id": event.get("response_id") or event["request_id"],
        "request_id": event["request_id"],
        "model": event["model"],
        "served_by": event.get("served_by") or event["model"],
        "key_id": event["key_id"],
        "status": event["status"],
        "prompt_tokens": event["prompt_tokens"],
        "completion_tokens": event["completion_tokens"],
        "cached_tokens": event.get("cached_tokens") or "0",
        "cost_micros": event["cost_micros"],
        "created": str(int(event["started_at_ms"]) // 1000),
    }


async def recent_generations(
    redis: aioredis.Redis, org_id: str, key_id: str | None = None, limit: int = 20
) -> list[GenerationView]:
    """The newest settled requests of an organization (of one key of it), newest first: each
    from its generation record while it is kept, else from its ledger event."""
    try:
        events = await redis.xrevrange(account_key(org_id, "ledger"), count=RECENT_SCAN)
        chosen = [
            event for _, event in events if "event" not in event and (key_id is None or event.get("key_id") == key_id)
        ][:limit]
        pipe = redis.pipeline(transaction=False)
        for event in chosen:
            pipe.hgetall(account_key(org_id, f"gen:{event.get('response_id') or event['request_id']}"))
        records = await pipe.execute() if chosen else []
    except RedisError as exc:
        raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc
    return [_view(record or _from_ledger(event)) for event, record in zip(chosen, records, strict=True)]
