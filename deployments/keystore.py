"""Organizations, API key records and credit in Redis.

Layout (docs/accounts.md; every key of an organization carries its hash tag `{acct:<org id>}`):
  {acct:<org>}:org          hash: the organization, with its credit in micro-USD
  {acct:<org>}:key:<key>    hash: a key record (limits, cap, its own holds and spend)
  tm:orgs                   set of organization ids
  tm:key_orgs               hash: key id -> organization id
  tm:auth:<sha256>          "<org id> <key id>": the key a secret was issued for
Nothing here caches a record: every request reads it, so a revocation or rotation takes
effect on every ingress replica at once. Only the secrets index is cached, since an entry
never changes once written.

Behind Sentinel (`redis_connection.py`), key and credit writes wait until a replica has them
(WAIT) before they are answered, so a failover right after an acknowledged top-up or key
creation does not take it back; see docs/redis.md for what that does and does not cover.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import auth
from .errors import BillingUnavailable, Conflict, NotFound
from .redis_connection import ReplicaAck, describe_failure
from .redis_connection import connect as connect  # the ingress's and tests' entry point
from .schemas import (
    CreateKeyRequest,
    CreateOrgRequest,
    KeyRecord,
    Limits,
    OrgRecord,
    UpdateKeyRequest,
    UpdateOrgRequest,
    usd_to_micros,
)
from .scripts import Verdict, account_key, lua_source

logger = logging.getLogger("tokenmart.keystore")

ORG_INDEX = "tm:orgs"
KEY_ORGS = "tm:key_orgs"
SCHEMA_KEY = "tm:schema"
SCHEMA_VERSION = 2
T = TypeVar("T")
LIMIT_FIELDS = tuple(Limits.model_fields)
LOCATION_CACHE_SIZE = 100_000


def auth_index(key_hash: str) -> str:
    return f"tm:auth:{key_hash}"


def org_key(org_id: str) -> str:
    return account_key(org_id, "org")


def key_key(org_id: str, key_id: str) -> str:
    return account_key(org_id, f"key:{key_id}")


def new_org_id() -> str:
    return "org_" + secrets.token_hex(10)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(10)


class KeyLocation(NamedTuple):
    org_id: str
    key_id: str


class Locator:
    """Where the key of a secret lives, from the secrets index (`tm:auth:<sha256>`).

    An index entry never changes once written, so this keeps the answers (LRU): a replica
    asks Redis once per secret it sees, and authentication plus admission stay one script
    call. Whether the secret still works is never cached: the scripts check the key record.
    """

    def __init__(self, redis: aioredis.Redis, size: int = LOCATION_CACHE_SIZE) -> None:
        self.redis = redis
        self.size = size
        self._known: OrderedDict[str, KeyLocation] = OrderedDict()

    def cached(self, key_hash: str) -> KeyLocation | None:
        return self._known.get(key_hash)

    async def locate(self, key_hash: str) -> KeyLocation:
        """The organization and key a secret was issued for; 401 for a secret never issued
        (503 when Redis does not answer)."""
        location = self._known.get(key_hash)
        if location is not None:
            self._known.move_to_end(key_hash)
            return location
        try:
            raw = await self.redis.get(auth_index(key_hash))
        except RedisError as exc:
            logger.warning("the secrets index did not answer: %s", describe_failure(exc))
            raise BillingUnavailable(
                "The billing store is unavailable; the request was not served. Retry shortly.", retry_after_s=2
            ) from exc
        if not raw:
            refused = auth.auth_refusal(Verdict.UNKNOWN_KEY)
            assert refused is not None
            raise refused
        org_id, key_id = raw.split(" ", 1)
        location = self._known[key_hash] = KeyLocation(org_id, key_id)
        if len(self._known) > self.size:
            self._known.popitem(last=False)
        return location


def _key_to_hash(record: KeyRecord) -> dict[str, str]:
    return {
        "id": record.id,
        "org_id": record.org_id,
        "name": record.name,
        "prefix": record.prefix,
        "key_hash": record.key_hash,
        "prev_key_hash": record.prev_key_hash,
        "prev_valid_until_ms": str(record.prev_valid_until_ms),
        "status": record.status,
        "models": json.dumps(record.models),
        "limits": record.limits.model_dump_json(),
        "created_at": str(record.created_at),
        "expires_at": "" if record.expires_at is None else str(record.expires_at),
        "hold_micros": str(record.hold_micros),
        "spent_micros": str(record.spent_micros),
        "cap_micros": "" if record.cap_micros is None else str(record.cap_micros),
        "cap_period": record.cap_period or "",
        "period_id": record.period_id,
        "period_spent_micros": str(record.period_spent_micros),
        "tier": record.tier or "",
    }


def key_from_hash(raw: dict[str, str]) -> KeyRecord:
    data: dict[str, Any] = dict(raw)
    data["models"] = json.loads(raw.get("models") or "null")
    data["limits"] = Limits.from_stored(raw.get("limits"))
    data["expires_at"] = int(raw["expires_at"]) if raw.get("expires_at") else None
    data["cap_micros"] = int(raw["cap_micros"]) if raw.get("cap_micros") else None
    data["cap_period"] = raw.get("cap_period") or None
    data["prev_valid_until_ms"] = int(raw.get("prev_valid_until_ms") or 0)
    return KeyRecord.model_validate(data)


def org_from_hash(raw: dict[str, str]) -> OrgRecord:
    return OrgRecord.model_validate(raw)


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _key_not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id {key_id!r}.", param="id", code="key_not_found")


def _org_not_found(org_id: str) -> NotFound:
    return NotFound(f"No organization with id {org_id!r}.", param="org_id", code="org_not_found")


class KeyStore:
    """Organizations, key records and credit. `replica_ack`: the WAIT that writes take
    (redis_connection.replica_ack)."""

    def __init__(
        self, redis: aioredis.Redis, *, replica_ack: ReplicaAck | None = None, locator: Locator | None = None
    ) -> None:
        self.redis = redis
        self.replica_ack = replica_ack
        self._authenticate = redis.register_script(lua_source("authenticate"))
        self._update = redis.register_script(lua_source("update_key"))
        self._add_credit = redis.register_script(lua_source("add_credit"))
        self._rotate = redis.register_script(lua_source("rotate_key"))
        self.locator = locator or Locator(redis)

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

    async def authenticate(self, authorization: str | None) -> tuple[KeyRecord, OrgRecord]:
        """401 for anything but a live key; malformed keys never reach Redis.

        The check itself is the one admission runs (lua/lib/key_check.lua), with Redis's clock.
        """
        key_hash = auth.parse_api_key(authorization)
        org_id, key_id = await self.locator.locate(key_hash)
        keys = [key_key(org_id, key_id), org_key(org_id)]
        verdict, *rest = await self._call(self._authenticate(keys=keys, args=[key_hash]))
        if verdict != Verdict.ADMITTED:
            refused = auth.auth_refusal(int(verdict))
            assert refused is not None, verdict  # the key check only answers with key verdicts
            raise refused
        return key_from_hash(_pairs(rest[0])), org_from_hash(_pairs(rest[1]))

    # -- organizations -----------------------------------------------------------------------
    async def create_org(self, request: CreateOrgRequest, *, org_id: str | None = None) -> OrgRecord:
        org = OrgRecord(
            id=org_id or new_org_id(),
            name=request.name,
            created_at=int(time.time()),
            balance_micros=usd_to_micros(request.credit_usd),
            credited_micros=usd_to_micros(request.credit_usd),
            tier=request.tier,
        )

        async def write(connection: aioredis.Redis) -> None:
            # The index first: an id in the index without a record is skipped by listings.
            await connection.sadd(ORG_INDEX, org.id)
            fields = {k: "" if v is None else str(v) for k, v in org.model_dump().items()}
            await connection.hset(org_key(org.id), mapping=fields)

        await self._write(write, f"organization {org.id}")
        return org

    async def get_org(self, org_id: str) -> OrgRecord | None:
        raw = await self._call(self.redis.hgetall(org_key(org_id)))
        return org_from_hash(raw) if raw else None

    async def require_org(self, org_id: str) -> OrgRecord:
        org = await self.get_org(org_id)
        if org is None:
            raise _org_not_found(org_id)
        return org

    async def org_ids(self) -> set[str]:
        return await self._call(self.redis.smembers(ORG_INDEX))

    async def list_orgs(self) -> list[OrgRecord]:
        ids = sorted(await self.org_ids())
        pipe = self.redis.pipeline(transaction=False)
        for org_id in ids:
            pipe.hgetall(org_key(org_id))
        raws = await self._call(pipe.execute()) if ids else []
        return [org_from_hash(raw) for raw in raws if raw]

    async def update_org(self, org_id: str, request: UpdateOrgRequest) -> OrgRecord:
        """Write only the fields sent (its name, its tier)."""
        await self.require_org(org_id)
        changes = request.model_dump(exclude_unset=True)
        fields = {name: "" if value is None else value for name, value in changes.items()}
        if fields:
            await self._write(lambda c: c.hset(org_key(org_id), mapping=fields), f"a change of {org_id}")
        return await self.require_org(org_id)

    async def add_org_credit(self, org_id: str, micros: int) -> OrgRecord:
        await self._credit(org_id, None, micros)
        return await self.require_org(org_id)

    async def _credit(self, org_id: str, key_id: str | None, micros: int) -> None:
        keys = [org_key(org_id)] + ([key_key(org_id, key_id)] if key_id else [])
        target = key_id or org_id
        verdict = await self._write(
            lambda c: self._add_credit(keys=keys, args=[micros], client=c), f"{micros} micro-USD credit to {target}"
        )
        if verdict == "missing":
            raise _key_not_found(key_id) if key_id else _org_not_found(org_id)
        if verdict == "revoked":
            raise Conflict(
                f"The API key {key_id!r} is revoked; credit cannot be added through it. Credit its "
                f"organization {org_id!r} instead.",
                param="id",
                code="key_revoked",
            )

    # -- keys ------------------------------------------------------------------------------
    async def create(self, request: CreateKeyRequest) -> tuple[KeyRecord, str]:
        """A new key in `request.org_id`, or in a new organization of its own (named after the
        key, holding `credit_usd`)."""
        if request.org_id is not None:
            org_id = (await self.require_org(request.org_id)).id
        else:
            org_id = (await self.create_org(CreateOrgRequest(name=request.name, credit_usd=request.credit_usd))).id
        key = auth.generate_key()
        key_hash = auth.hash_key(key)
        record = KeyRecord(
            id=new_key_id(),
            org_id=org_id,
            name=request.name,
            prefix=auth.display_prefix(key),
            key_hash=key_hash,
            models=request.models,
            limits=request.limits,
            created_at=int(time.time()),
            expires_at=request.expires_at_epoch,
            cap_micros=None if request.spend_cap_usd is None else usd_to_micros(request.spend_cap_usd),
            cap_period=request.spend_cap_period,
            tier=request.tier,
        )

        async def write(connection: aioredis.Redis) -> None:
            # The indexes first: if Redis refuses the record (out of memory), an index entry
            # without a record is skipped by listings and refused by authentication. Calls on
            # this one connection, not a pipeline (WAIT counts only this connection's writes).
            await connection.hset(KEY_ORGS, record.id, org_id)
            await connection.set(auth_index(key_hash), f"{org_id} {record.id}")
            await connection.hset(key_key(org_id, record.id), mapping=_key_to_hash(record))

        await self._write(write, f"key {record.id}")
        return record, key

    async def org_of(self, key_id: str) -> str:
        org_id = await self._call(self.redis.hget(KEY_ORGS, key_id))
        if not org_id:
            raise _key_not_found(key_id)
        return org_id

    async def get(self, key_id: str) -> KeyRecord | None:
        org_id = await self._call(self.redis.hget(KEY_ORGS, key_id))
        if not org_id:
            return None
        raw = await self._call(self.redis.hgetall(key_key(org_id, key_id)))
        return key_from_hash(raw) if raw else None

    async def require(self, key_id: str) -> KeyRecord:
        record = await self.get(key_id)
        if record is None:
            raise _key_not_found(key_id)
        return record

    async def with_org(self, record: KeyRecord) -> tuple[KeyRecord, OrgRecord]:
        return record, await self.require_org(record.org_id)

    async def ids(self) -> dict[str, str]:
        """Every key id -> its organization id."""
        return await self._call(self.redis.hgetall(KEY_ORGS))

    async def list(self, org_id: str | None = None) -> list[tuple[KeyRecord, OrgRecord]]:
        """Every key (of one organization) with its organization, ordered by key id."""
        located = sorted((k, o) for k, o in (await self.ids()).items() if org_id is None or o == org_id)
        org_ids = sorted({o for _, o in located})
        pipe = self.redis.pipeline(transaction=False)
        for key_id, owner in located:
            pipe.hgetall(key_key(owner, key_id))
        for owner in org_ids:
            pipe.hgetall(org_key(owner))
        raws = await self._call(pipe.execute()) if located else []
        orgs = {owner: org_from_hash(raw) for owner, raw in zip(org_ids, raws[len(located) :], strict=True) if raw}
        return [
            (key_from_hash(raw), orgs[owner])
            for (_, owner), raw in zip(located, raws[: len(located)], strict=True)
            if raw and owner in orgs
        ]

    async def update(self, key_id: str, request: UpdateKeyRequest) -> KeyRecord:
        """Write only the fields sent, in one script that refuses to reactivate a revoked key.

        Only the changed fields are written, so concurrent settlements of the key's counters
        are never overwritten.
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
        if "spend_cap_usd" in changes:
            cap = request.spend_cap_usd
            fields += ["cap_micros", "" if cap is None else str(usd_to_micros(cap))]
        if "spend_cap_period" in changes:
            fields += ["cap_period", request.spend_cap_period or ""]
        if "tier" in changes:
            fields += ["tier", request.tier or ""]
        await self._change(key_id, limits, fields)
        return await self.require(key_id)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Idempotent: revoking a revoked key changes nothing and answers its record again."""
        await self._change(key_id, {}, ["status", "revoked"])
        return await self.require(key_id)

    async def _change(self, key_id: str, limits: dict[str, Any], fields: list[str]) -> None:
        org_id = await self.org_of(key_id)
        keys, args = [key_key(org_id, key_id)], [json.dumps(limits), *fields]
        verdict = await self._write(lambda c: self._update(keys=keys, args=args, client=c), f"a change of {key_id}")
        if verdict == "missing":
            raise _key_not_found(key_id)
        if verdict == "revoked":
            raise Conflict(
                f"The API key {key_id!r} is revoked, and revocation is final; create a new key instead.",
                param="status",
                code="key_revoked",
            )

    async def rotate(self, key_id: str, grace_s: int) -> tuple[KeyRecord, str]:
        """A new secret for the key; the current one keeps working for `grace_s` seconds."""
        org_id = await self.org_of(key_id)
        key = auth.generate_key()
        key_hash = auth.hash_key(key)

        async def write(connection: aioredis.Redis) -> str:
            await connection.set(auth_index(key_hash), f"{org_id} {key_id}")
            return await self._rotate(
                keys=[key_key(org_id, key_id)],
                args=[key_hash, auth.display_prefix(key), grace_s * 1000],
                client=connection,
            )

        verdict = await self._write(write, f"a rotation of {key_id}")
        if verdict != "rotated":  # never issued: its index entry goes too
            await self._call(self.redis.delete(auth_index(key_hash)))
        if verdict == "missing":
            raise _key_not_found(key_id)
        if verdict == "revoked":
            raise Conflict(
                f"The API key {key_id!r} is revoked, and revocation is final; create a new key instead.",
                param="id",
                code="key_revoked",
            )
        return await self.require(key_id), key

    async def add_credit(self, key_id: str, micros: int) -> KeyRecord:
        """Credit the key's organization (the route kept from before organizations)."""
        org_id = await self.org_of(key_id)
        await self._credit(org_id, key_id, micros)
        return await self.require(key_id)
