"""Alert webhooks: an organization's settings, and the deliverer that POSTs its alerts.

Settlement (lua/settle.lua) raises an alert by appending it to the organization's outbox
stream, in the same script that moves the money, so an alert is never lost nor raised twice
for one crossing. Everything after that is here:

  {acct:O}:alerts            hash: url, secret, balance_below_micros ('' off), cap_percent ('' off), created_at
  {acct:O}:outbox            stream: alerts not yet delivered (oldest first; docs/accounts.md lists the fields)
  {acct:O}:outbox_attempts   hash: delivery id -> {"attempts": n, "next_at_ms": t} of alerts that failed before
  {acct:O}:deliveries        stream: what became of each alert (delivered or failed), capped
  tm:alert_orgs              set: organizations with settings, whose outboxes the deliverer polls
  tm:alert_lock:<org id>     string: the lease of the deliverer sending that organization's alerts now

All of a delivery's state is in Redis and times come from Redis's clock, so any ingress
replica's deliverer picks up where another stopped, and the lease keeps two replicas from
sending one organization's alerts at once. An alert keeps its delivery id across attempts,
so a receiver that saw a POST whose answer was lost dedupes the retry on it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import httpx
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from redis.exceptions import RedisError

from .errors import BadRequest, BillingUnavailable, NotFound
from .schemas import MAX_USD, Usd, micros_to_usd, usd_to_micros
from .scripts import account_key, lua_source

logger = logging.getLogger("tokenmart.alerts")

ALERT_ORGS = "tm:alert_orgs"
LOCK_PREFIX = "tm:alert_lock:"
LOCK_TTL_MS = 30_000
# delete_alerts waits this long for a deliverer's POST in flight before it settles the outbox.
REMOVAL_LOCK_WAIT_S = 10.0
OUTBOX_BATCH = 100
DELIVERIES_KEPT = 1_000
MAX_DELIVERIES_LISTED = 1_000
ORGS_AT_ONCE = 16  # organizations one pass delivers to concurrently (each one's alerts in order)
USER_AGENT = "tokenmart-alerts/1"
SIGNATURE_HEADER = "x-tokenmart-signature"
DELIVERY_HEADER = "x-tokenmart-delivery"
DEFAULT_BACKOFF_S: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 60, 120, 300, 600)
ORG_ID = re.compile(r"org_[0-9a-f]{20}")

AlertKind = Literal["balance_below", "cap_percent"]
T = TypeVar("T")


@functools.cache
def _source(name: str) -> str:
    """A script's text, read once per process (each POST runs up to three)."""
    return lua_source(name)


# -- settings -------------------------------------------------------------------------------


class AlertSettingsRequest(BaseModel):
    """The body of `POST /admin/v1/orgs/{id}/alerts`: it replaces the organization's settings."""

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl = Field(description="Where alerts are POSTed (http or https).")
    secret: str = Field(
        min_length=16, max_length=256, description="The HMAC-SHA256 key of the x-tokenmart-signature header."
    )
    balance_below_usd: Annotated[Usd, Field(ge=0, le=MAX_USD)] | None = Field(
        default=None, description="Alert when the organization's committed credit falls below this many USD."
    )
    cap_percent: Annotated[StrictInt, Field(ge=1, le=100)] | None = Field(
        default=None,
        validate_default=True,  # runs the check below when neither threshold is sent
        description="Alert when a key's spend this period reaches this percent of its spend cap.",
    )

    @field_validator("cap_percent")
    @classmethod
    def _one_threshold(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Only when balance_below_usd itself was valid: a wrong balance has its own error.
        if value is None and "balance_below_usd" in info.data and info.data["balance_below_usd"] is None:
            raise PydanticCustomError(
                "threshold_required",
                "set balance_below_usd, cap_percent or both: alert settings without a threshold never alert",
            )
        return value


class AlertSettingsView(BaseModel):
    """What the admin API shows of an organization's settings: never the secret."""

    object: Literal["alert_settings"] = "alert_settings"
    org_id: str
    url: str
    secret_set: bool = True
    balance_below_usd: float | None
    cap_percent: int | None
    created_at: int


def _view(org_id: str, stored: Mapping[str, str]) -> AlertSettingsView:
    balance = stored.get("balance_below_micros") or ""
    cap = stored.get("cap_percent") or ""
    return AlertSettingsView(
        org_id=org_id,
        url=stored["url"],
        secret_set=bool(stored.get("secret")),
        balance_below_usd=micros_to_usd(int(balance)) if balance else None,
        cap_percent=int(cap) if cap else None,
        created_at=int(stored.get("created_at") or 0),
    )


async def _store_call(call: Awaitable[T]) -> T:
    try:
        return await call
    except RedisError as exc:
        logger.warning("alert store call failed: %s: %s", type(exc).__name__, exc)
        raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc


def _org_not_found(org_id: str) -> NotFound:
    return NotFound(f"No organization with id {org_id!r}.", param="id", code="org_not_found")


async def _require_org(redis: aioredis.Redis, org_id: str) -> None:
    if not ORG_ID.fullmatch(org_id) or not await _store_call(redis.exists(account_key(org_id, "org"))):
        raise _org_not_found(org_id)


async def redis_now_ms(redis: aioredis.Redis) -> int:
    """Redis's clock, which every replica shares (their own clocks may disagree)."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def set_alerts(redis: aioredis.Redis, org_id: str, request: AlertSettingsRequest) -> AlertSettingsView:
    """Replace the organization's alert settings; its deliverer uses them from its next POST on."""
    await _require_org(redis, org_id)
    now_ms = await _store_call(redis_now_ms(redis))
    balance = request.balance_below_usd
    stored = {
        "url": str(request.url),
        "secret": request.secret,
        "balance_below_micros": "" if balance is None else str(usd_to_micros(balance)),
        "cap_percent": "" if request.cap_percent is None else str(request.cap_percent),
        "created_at": str(now_ms // 1000),
    }
    # The settings before the index: the deliverer only polls indexed organizations, and one
    # indexed without settings would have its alerts dropped as removed.
    await _store_call(redis.hset(account_key(org_id, "alerts"), mapping=stored))
    await _store_call(redis.sadd(ALERT_ORGS, org_id))
    return _view(org_id, stored)


async def get_alerts(redis: aioredis.Redis, org_id: str) -> AlertSettingsView | None:
    if not ORG_ID.fullmatch(org_id):
        return None
    stored = await _store_call(redis.hgetall(account_key(org_id, "alerts")))
    return _view(org_id, stored) if stored.get("url") else None


async def delete_alerts(redis: aioredis.Redis, org_id: str) -> bool:
    """Remove the settings; the alerts still in the outbox are recorded as failed
    (`alerts_removed`), since there is nowhere to send them. True when there were settings.

    Settlement raises no alert for an organization without settings, so the outbox only
    shrinks from here. A deliverer's POST in flight is waited for (up to
    REMOVAL_LOCK_WAIT_S), so an alert it is delivering right now is recorded as delivered.
    """
    if not ORG_ID.fullmatch(org_id):
        return False
    removed = await _store_call(redis.delete(account_key(org_id, "alerts")))
    await _store_call(redis.srem(ALERT_ORGS, org_id))
    lock = _Lease(redis, org_id)
    taken = await _store_call(lock.take(wait_s=REMOVAL_LOCK_WAIT_S))
    try:
        await _store_call(_drop_outbox(redis, org_id, "alerts_removed"))
    finally:
        if taken:
            await _store_call(lock.release())
    return bool(removed)


async def deliveries(redis: aioredis.Redis, org_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """What became of the organization's latest alerts, newest first (at most `limit`)."""
    if not 1 <= limit <= MAX_DELIVERIES_LISTED:
        raise BadRequest(f"'limit' must be between 1 and {MAX_DELIVERIES_LISTED}.", param="limit")
    await _require_org(redis, org_id)
    records = await _store_call(redis.xrevrange(account_key(org_id, "deliveries"), count=limit))
    return [_delivery_record(fields) for _, fields in records]


def _delivery_record(fields: Mapping[str, str]) -> dict[str, Any]:
    http_status = fields.get("http_status") or ""
    return {
        "object": "alert_delivery",
        "delivery_id": fields.get("delivery_id"),
        "kind": fields.get("kind") or None,
        "status": fields.get("status"),
        "attempts": int(fields.get("attempts") or 0),
        "http_status": int(http_status) if http_status.isdigit() else None,
        "reason": fields.get("reason") or None,
        "error": fields.get("error") or None,
        "at_ms": int(fields.get("at_ms") or 0),
    }


# -- the webhook ----------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The x-tokenmart-signature of a body: a receiver recomputes it over the exact bytes it
    received, with the secret it shares with the operator, and compares in constant time."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def alert_body(entry: Mapping[str, str]) -> dict[str, Any]:
    """The webhook's JSON from an outbox entry; the same entry always gives the same body."""
    kind = entry["kind"]
    body: dict[str, Any] = {
        "id": entry["delivery_id"],
        "object": "alert",
        "type": kind,
        "org_id": entry["org_id"],
        "key_id": entry.get("key_id") or None,
    }
    if kind == "balance_below":
        body["threshold_usd"] = micros_to_usd(int(entry["threshold_micros"]))
    elif kind == "cap_percent":
        body["threshold_percent"] = int(entry["threshold_percent"])
    else:
        raise ValueError(f"unknown alert kind {kind!r}")
    body["value_usd"] = micros_to_usd(int(entry["value_micros"]))
    body["request_id"] = entry["request_id"]
    body["created"] = int(entry["raised_at_ms"]) // 1000
    return body


def encode_body(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def webhook_headers(secret: str, delivery_id: str, content: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        SIGNATURE_HEADER: sign(secret, content),
        DELIVERY_HEADER: delivery_id,
        "user-agent": USER_AGENT,
    }


# -- delivery ---------------------------------------------------------------------------------


class _Lease:
    """One organization's delivery lease (SET NX PX), held by a random token."""

    def __init__(self, redis: aioredis.Redis, org_id: str) -> None:
        self.redis = redis
        self.key = LOCK_PREFIX + org_id
        self.token = secrets.token_hex(16)
        self._extend = redis.register_script(_source("alert_lock_extend"))
        self._release = redis.register_script(_source("alert_lock_release"))

    async def take(self, wait_s: float = 0.0) -> bool:
        """Take the lease, waiting up to `wait_s` for the deliverer holding it."""
        deadline = asyncio.get_running_loop().time() + wait_s
        while not await self.redis.set(self.key, self.token, nx=True, px=LOCK_TTL_MS):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def extend(self) -> bool:
        return bool(await self._extend(keys=[self.key], args=[self.token, LOCK_TTL_MS]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])


@dataclass(frozen=True)
class _Outcome:
    """How one alert ends for now: `retry` (with the delay) or final (`delivered`, `failed`)."""

    status: Literal["retry", "delivered", "failed"]
    posts: int = 1
    http_status: int | None = None
    reason: str = ""
    error: str = ""
    delay_ms: int = 0


async def _record(
    redis: aioredis.Redis, org_id: str, entry_id: str, fields: Mapping[str, str], outcome: _Outcome
) -> tuple[bool, int]:
    """Write the outcome (lua/alert_attempt.lua); returns (written, attempts so far)."""
    script = redis.register_script(_source("alert_attempt"))
    keys = [account_key(org_id, name) for name in ("outbox", "outbox_attempts", "deliveries")]
    args = [
        entry_id,
        fields.get("delivery_id") or entry_id,
        outcome.status,
        outcome.posts,
        "" if outcome.http_status is None else outcome.http_status,
        outcome.reason,
        outcome.error,
        outcome.delay_ms,
        fields.get("kind") or "",
        DELIVERIES_KEPT,
    ]
    written, attempts = await script(keys=keys, args=args)
    return bool(written), int(attempts)


async def _drop_outbox(redis: aioredis.Redis, org_id: str, reason: str) -> int:
    """Record every alert now in the outbox as failed for `reason`, unsent; returns how many.

    Only alerts up to the newest one seen at the start: one raised meanwhile (settings set
    again) belongs to the new settings.
    """
    outbox = account_key(org_id, "outbox")
    newest = await redis.xrevrange(outbox, count=1)
    if not newest:
        return 0
    last_id, dropped, start = newest[0][0], 0, "-"
    while entries := await redis.xrange(outbox, start, last_id, count=OUTBOX_BATCH):
        for entry_id, fields in entries:
            written, _ = await _record(redis, org_id, entry_id, fields, _Outcome("failed", posts=0, reason=reason))
            dropped += written
        start = "(" + entries[-1][0]
    if dropped:
        logger.info("%d alert(s) of %s dropped: %s", dropped, org_id, reason)
    return dropped


def _attempt_state(raw: str | None) -> tuple[int, int]:
    """(attempts made, next attempt's time in ms) of an alert; (0, 0) for a new one."""
    if not raw:
        return 0, 0
    try:
        state = json.loads(raw)
        return int(state.get("attempts", 0)), int(state.get("next_at_ms", 0))
    except (ValueError, TypeError, AttributeError):
        return 0, 0


class AlertDeliverer:
    """POSTs the alerts of every organization with settings, retrying on the backoff table.

    An alert that fails is tried again `backoff_s[n]` seconds after its n+1-th failure; one
    that fails once more after the table's last step is recorded as failed and dropped, so an
    alert is POSTed at most len(backoff_s) + 1 times. Any 2xx delivers it; anything else
    (another status, a timeout, a refused connection) is a failure. Redirects are not followed.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 5.0,
        backoff_s: Sequence[float] = DEFAULT_BACKOFF_S,
        poll_interval_s: float = 1.0,
    ) -> None:
        if timeout_s * 1000 >= LOCK_TTL_MS:
            raise ValueError(f"timeout_s must be shorter than the delivery lease ({LOCK_TTL_MS / 1000:g} s)")
        self.redis = redis
        self._own_http = http is None
        self.http = http if http is not None else httpx.AsyncClient(follow_redirects=False)
        self.timeout_s = timeout_s
        self.backoff_s = tuple(backoff_s)
        self.poll_interval_s = poll_interval_s

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def run_forever(self) -> None:
        """Deliver every poll_interval_s until cancelled; a failed pass is logged and retried."""
        while True:
            try:
                await self.deliver_once()
            except RedisError as exc:
                logger.warning("alert delivery pass failed, Redis is unavailable: %s: %s", type(exc).__name__, exc)
            except Exception:
                logger.exception("alert delivery pass failed")
            await asyncio.sleep(self.poll_interval_s)

    async def deliver_once(self) -> int:
        """One pass over every organization with settings; returns how many alerts were delivered."""
        orgs = sorted(await self.redis.smembers(ALERT_ORGS))
        if not orgs:
            return 0
        # Only organizations with alerts waiting take a lease: one pipelined XLEN each per pass.
        pipe = self.redis.pipeline(transaction=False)
        for org_id in orgs:
            pipe.xlen(account_key(org_id, "outbox"))
        orgs = [org_id for org_id, waiting in zip(orgs, await pipe.execute(), strict=True) if waiting]
        limit = asyncio.Semaphore(ORGS_AT_ONCE)

        async def one(org_id: str) -> int:
            async with limit:
                return await self._deliver_org(org_id)

        results = await asyncio.gather(*(one(org_id) for org_id in orgs), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise failures[0]
        return sum(result for result in results if isinstance(result, int))

    async def _deliver_org(self, org_id: str) -> int:
        lease = _Lease(self.redis, org_id)
        if not await lease.take():
            return 0  # another deliverer is sending this organization's alerts
        try:
            return await self._deliver_leased(org_id, lease)
        finally:
            try:
                await lease.release()
            except RedisError as exc:  # the lease runs out by itself
                logger.warning("could not release the alert lease of %s: %s", org_id, exc)

    async def _deliver_leased(self, org_id: str, lease: _Lease) -> int:
        entries = await self.redis.xrange(account_key(org_id, "outbox"), count=OUTBOX_BATCH)
        if not entries:
            return 0
        states = await self.redis.hgetall(account_key(org_id, "outbox_attempts"))
        now_ms = await redis_now_ms(self.redis)
        delivered = 0
        for entry_id, fields in entries:
            attempts, next_at_ms = _attempt_state(states.get(fields.get("delivery_id", "")))
            if next_at_ms > now_ms:
                continue
            # The lease for this POST, and the settings as they are now (changed or removed meanwhile).
            if not await lease.extend():
                logger.warning("the alert lease of %s ran out; another deliverer goes on", org_id)
                break
            settings = await self.redis.hgetall(account_key(org_id, "alerts"))
            if not settings.get("url"):
                await _drop_outbox(self.redis, org_id, "alerts_removed")
                break
            try:
                content = encode_body(alert_body(fields))
            except (KeyError, ValueError, TypeError):
                logger.error("alert %s of %s is malformed and is dropped: %r", entry_id, org_id, fields)
                await _record(self.redis, org_id, entry_id, fields, _Outcome("failed", posts=0, reason="malformed"))
                continue
            outcome = await self._post(settings, fields["delivery_id"], content, attempts)
            written, total = await _record(self.redis, org_id, entry_id, fields, outcome)
            if written and outcome.status == "delivered":
                delivered += 1
            elif written and outcome.status == "failed":
                logger.warning("alert %s of %s failed after %d attempts", fields["delivery_id"], org_id, total)
        return delivered

    async def _post(self, settings: Mapping[str, str], delivery_id: str, content: bytes, attempts: int) -> _Outcome:
        http_status, error = None, ""
        try:
            # Streamed and never read: a receiver's answer is its status, whatever its body's size.
            async with self.http.stream(
                "POST",
                settings["url"],
                content=content,
                headers=webhook_headers(settings["secret"], delivery_id, content),
                timeout=self.timeout_s,
            ) as response:
                http_status = response.status_code
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        if http_status is not None and 200 <= http_status < 300:
            return _Outcome("delivered", http_status=http_status)
        if attempts < len(self.backoff_s):
            delay_ms = int(self.backoff_s[attempts] * 1000)
            return _Outcome("retry", http_status=http_status, error=error, delay_ms=delay_ms)
        return _Outcome("failed", http_status=http_status, reason="retries_exhausted", error=error)


__all__ = [
    "AlertDeliverer",
    "AlertKind",
    "AlertSettingsRequest",
    "AlertSettingsView",
    "alert_body",
    "delete_alerts",
    "deliveries",
    "get_alerts",
    "set_alerts",
    "sign",
]
