"""API key records in Redis.

Layout (hash tags keep one account's keys in one Redis Cluster slot):
  {acct:<id>}:key      hash: the key record, including credit in micro-USD
  tm:keys              set of key ids, for listings
Nothing here caches a record: every request reads it, so a revocation takes effect on
every ingress replica at once.

Behind Sentinel (`redis_connection.py`), key and credit writes wait until a replica has them
(WAIT) before they are answered, so a failover right after an acknowledged top-up or key
creation does not take it back; see docs/redis.md for what that does and does not cover.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import auth
from .errors import BillingUnavailable, Conflict, NotFound
from .redis_connection import ReplicaAck, describe_failure
from .redis_connection import connect as connect  # the ingress's and tests' entry point
from .schemas import CreateKeyRequest, KeyRecord, Limits, UpdateKeyRequest, usd_to_micros
from .scripts import Verdict, account_key, lua_source

logger = logging.getLogger("tokenmart.keystore")

KEY_INDEX = "tm:keys"
T = TypeVar("T")
LIMIT_FIELDS = tuple(Limits.model_fields)


def _to_hash(record: KeyRecord) -> dict[str, str]:
    return {
        "id": record.id,
        "name": record.name,
        "prefix": record.prefix,
        "key_hash": record.key_hash,
        "status": record.status,
        "models": json.dumps(record.models),
        "limits": record.limits.model_dump_json(),
        "created_at": str(record.created_at),
        "expires_at": "" if record.expires_at is None else str(record.expires_at),
        "balance_micros": str(record.balance_micros),
        "hold_micros": str(record.hold_micros),
        "spent_micros": str(record.spent_micros),
        "credited_micros": str(record.credited_micros),
    }


def _from_hash(raw: dict[str, str]) -> KeyRecord:
    data: dict[str, Any] = dict(raw)
    data["models"] = json.loads(raw.get("models") or "null")
    data["limits"] = Limits.from_stored(raw.get("limits"))
    data["expires_at"] = int(raw["expires_at"]) if raw.get("expires_at") else None
    return KeyRecord.model_validate(data)


def _key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id {key_id!r}.", param="id", code="key_not_found")


class KeyStore:
    """Key records and credit. `replica_ack`: the WAIT that writes take (redis_connection.replica_ack)."""

    def __init__(self, redis: aioredis.Redis, *, replica_ack: ReplicaAck | None = None) -> None:
        self.redis = redis
        self.replica_ack = replica_ack
        self._authenticate = redis.register_script(lua_source("authenticate"))
        self._update = redis.register_script(lua_source("update_key"))
        self._add_credit = redis.register_script(lua_source("add_credit"))

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except RedisError as exc:
            logger.warning("key store call failed: %s", describe_failure(exc))
            raise BillingUnavailable(
                "The billing store is unavailable; the request was not served. Retry shortly.",
                retry_after_s=2,
            ) from exc

    async def _write(self, write: Callable[[aioredis.Redis], Awaitable[T]], what: str) -> T:
        """Run `write` and, behind Sentinel, wait until a replica confirms it (WAIT on the same
        connection: WAIT only counts that connection's writes).

        A replica that does not confirm in time does not fail the call: the write is on the
        primary as it would be without WAIT (failing it would invite a retry that credits
        twice); the shortfall is logged, because a failover now could lose it.
        """
        if self.replica_ack is None:
            return await self._call(write(self.redis))
        ack = self.replica_ack
        async with self.redis.client() as connection:
            result = await self._call(write(connection))
            confirmed = await self._call(connection.wait(ack.replicas, ack.timeout_ms))
        if confirmed < ack.replicas:
            logger.warning(
                "%s is on the Redis primary but only %d of %d replica(s) confirmed it within %d ms; "
                "a failover before they catch up would lose it",
                what,
                confirmed,
                ack.replicas,
                ack.timeout_ms,
            )
        return result

    async def get(self, key_id: str) -> KeyRecord | None:
        raw = await self._call(self.redis.hgetall(account_key(key_id, "key")))
        return _from_hash(raw) if raw else None

    async def require(self, key_id: str) -> KeyRecord:
        record = await self.get(key_id)
        if record is None:
            raise _key_not_found(key_id)
        return record

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        """401 for anything but a live key, in one round trip; malformed keys never reach Redis.

        The check itself is the one admission runs (lua/lib/key_check.lua), with Redis's clock.
        """
        key_id, key_hash = auth.parse_api_key(authorization)
        verdict, *fields = await self._call(self._authenticate(keys=[account_key(key_id, "key")], args=[key_hash]))
        if verdict != Verdict.ADMITTED:
            refused = auth.auth_refusal(int(verdict))
            assert refused is not None, verdict  # the key check only answers with key verdicts
            raise refused
        return _from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))

    async def create(self, request: CreateKeyRequest) -> tuple[KeyRecord, str]:
        key = auth.generate_key()
        key_hash = auth.hash_key(key)
        record = KeyRecord(
            id=auth.key_id_for_hash(key_hash),
            name=request.name,
            prefix=auth.display_prefix(key),
            key_hash=key_hash,
            models=request.models,
            limits=request.limits,
            created_at=int(time.time()),
            expires_at=request.expires_at_epoch,
            balance_micros=usd_to_micros(request.credit_usd),
            credited_micros=usd_to_micros(request.credit_usd),
        )

        async def write(connection: aioredis.Redis) -> None:
            # The index first: if Redis refuses the record (out of memory), the id left in the
            # index has no record, which listings and reconciliation skip. Two calls on this one
            # connection, not a pipeline (a pipeline takes a connection of its own, and WAIT
            # counts only the writes of the connection it runs on).
            await connection.sadd(KEY_INDEX, record.id)
            await connection.hset(account_key(record.id, "key"), mapping=_to_hash(record))

        await self._write(write, f"key {record.id}")
        return record, key

    async def ids(self) -> set[str]:
        return await self._call(self.redis.smembers(KEY_INDEX))

    async def list(self) -> list[KeyRecord]:
        ids = sorted(await self.ids())
        pipe = self.redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(account_key(key_id, "key"))
        raws = await self._call(pipe.execute()) if ids else []
        return [_from_hash(raw) for raw in raws if raw]

    async def update(self, key_id: str, request: UpdateKeyRequest) -> KeyRecord:
        """Write only the fields sent, in one script that refuses to reactivate a revoked key.

        Only the changed fields are written, so concurrent settlements of the balance
        counters are never overwritten.
        """
        changes = request.model_dump(exclude_unset=True)
        limits = {name: changes.pop(name) for name in LIMIT_FIELDS if name in changes}
        fields: list[str] = []
        if "name" in changes:
            fields += ["name", changes["name"]]
        if "models" in changes:
            fields += ["models", json.dumps(changes["models"])]
        if "status" in changes:
            fields += ["status", changes["status"]]
        if "expires_at" in changes:
            epoch = request.expires_at_epoch
            fields += ["expires_at", "" if epoch is None else str(epoch)]
        await self._change(key_id, limits, fields)
        return await self.require(key_id)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Idempotent: revoking a revoked key changes nothing and answers its record again."""
        await self._change(key_id, {}, ["status", "revoked"])
        return await self.require(key_id)

    async def _change(self, key_id: str, limits: dict[str, Any], fields: list[str]) -> None:
        keys, args = [account_key(key_id, "key")], [json.dumps(limits), *fields]
        verdict = await self._write(lambda c: self._update(keys=keys, args=args, client=c), f"a change of {key_id}")
        if verdict == "missing":
            raise _key_not_found(key_id)
        if verdict == "revoked":
            raise Conflict(
                f"The API key {key_id!r} is revoked, and revocation is final; create a new key instead.",
                param="status",
                code="key_revoked",
            )

    async def add_credit(self, key_id: str, micros: int) -> KeyRecord:
        keys = [account_key(key_id, "key")]
        verdict = await self._write(
            lambda c: self._add_credit(keys=keys, args=[micros], client=c), f"{micros} micro-USD credit to {key_id}"
        )
        if verdict == "missing":
            raise _key_not_found(key_id)
        if verdict == "revoked":
            raise Conflict(
                f"The API key {key_id!r} is revoked; credit cannot be added to it.", param="id", code="key_revoked"
            )
        return await self.require(key_id)
