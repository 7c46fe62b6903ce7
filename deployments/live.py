"""What is held and in flight right now, per organization and key (`GET /admin/v1/holds`,
the console's live page): the credit admission holds for unsettled requests, and how many
requests each key has admitted and not yet settled. Read in one pipelined round trip."""

from __future__ import annotations

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import RedisError

from .errors import BillingUnavailable
from .schemas import micros_to_usd
from .scripts import account_key, key_keys


class KeyHolds(BaseModel):
    key_id: str
    on_hold_usd: float
    in_flight: int  # admitted, unsettled requests (a lapsed lease counts until it is reaped)


class OrgHolds(BaseModel):
    object: str = "holds"
    org_id: str
    credit_usd: float
    on_hold_usd: float
    in_flight: int
    keys: list[KeyHolds]


async def live_holds(redis: aioredis.Redis, scope: dict[str, list[str]]) -> list[OrgHolds]:
    """Organization id -> its key ids, to what each holds now (organizations with any hold or
    request in flight first, then by id)."""
    pipe = redis.pipeline(transaction=False)
    orgs = sorted(scope)
    for org_id in orgs:
        pipe.hmget(account_key(org_id, "org"), "balance_micros", "hold_micros")
        for key_id in sorted(scope[org_id]):
            named = key_keys(org_id, key_id)
            pipe.hget(named["key"], "hold_micros")
            pipe.zcard(named["inflight"])
    try:
        replies = iter(await pipe.execute() if orgs else [])
    except RedisError as exc:
        raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc
    rows = []
    for org_id in orgs:
        balance, hold = next(replies)
        keys = [
            KeyHolds(key_id=key_id, on_hold_usd=micros_to_usd(int(next(replies) or 0)), in_flight=int(next(replies)))
            for key_id in sorted(scope[org_id])
        ]
        rows.append(
            OrgHolds(
                org_id=org_id,
                credit_usd=micros_to_usd(int(balance or 0)),
                on_hold_usd=micros_to_usd(int(hold or 0)),
                in_flight=sum(key.in_flight for key in keys),
                keys=keys,
            )
        )
    return sorted(rows, key=lambda row: (not (row.in_flight or row.on_hold_usd), row.org_id))
