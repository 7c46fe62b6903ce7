"""Refusing early what cannot be served, so refusals never wait behind admitted work.

Three checks, each answered with an OpenAI-style error and `Retry-After` before anything is
parsed, counted or held:

- `DoorShedder` (an ASGI middleware) counts the paid requests one ingress replica is serving.
  At its limit a new one is refused before its body is read: an overloaded replica answers
  fast instead of letting a queue grow in front of it (in Serve's proxy, HAProxy or the
  replica itself), which would slow every answer, refusals included.
- `RefusalMemo` remembers, per key, a 429 for the key's requests-per-minute limit until the
  time it told the client to retry. Until then this replica refuses that key's requests at
  the door, before their body is read, their prompt counted or Redis asked: the token
  bucket cannot admit a request before then. A limit an operator raises (or a revocation)
  meanwhile applies from that time on: at most the minute the bucket takes to refill one
  request. A 429, not a 503.
- `EngineLoad` counts, per engine deployment, the requests this ingress replica has admitted
  and not yet settled. When that alone fills the deployment's whole capacity (every replica's
  concurrency plus its queue), the next request is refused before its prompt is counted or
  Redis is asked, instead of being held, dispatched and bounced by Serve's back-pressure. It
  sees only its own replica's requests, so it refuses only when Serve certainly would; Serve's
  `BackPressureError` remains the exact check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from . import auth
from .catalog import Listing
from .errors import APIError, RateLimited, ServiceUnavailable
from .limits import reset_duration

SHED_CODE = "server_overloaded"
RPM_CODE = "rate_limit_exceeded"
MEMO_SIZE = 100_000  # keys remembered at once; expired ones are dropped first

# Called when the door refuses a request, with its status, error code, key id (or None) and
# the seconds it took (for the metrics). The ingress replica puts it on its app's state, as
# `door_hook`, and its refusal memo as `refusals`, when its app is built.
DoorHook = Callable[[int, str, str | None, float], None]


class RefusalMemo:
    """Keys refused for their requests-per-minute limit, each until its 429's retry time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._refused: dict[str, tuple[float, APIError]] = {}

    def __len__(self) -> int:
        return len(self._refused)

    def remember(self, key_hash: str, error: APIError) -> None:
        """Keep a 429 of the requests bucket (not tokens, which depend on the next request's
        size, and not concurrency, which ends when a request does)."""
        if not (isinstance(error, RateLimited) and error.type == "requests" and error.code == RPM_CODE):
            return
        retry_ms = int(error.headers.get("retry-after-ms") or 0)
        if retry_ms <= 0:
            return
        if len(self._refused) >= MEMO_SIZE:
            self._forget_expired()
            if len(self._refused) >= MEMO_SIZE:
                return
        self._refused[key_hash] = (self._clock() + retry_ms / 1000, error)

    def refusal(self, key_hash: str) -> RateLimited | None:
        """The 429 this key gets now, with the time left to wait, or None once it may retry."""
        entry = self._refused.get(key_hash)
        if entry is None:
            return None
        until, error = entry
        left_ms = math.ceil(round((until - self._clock()) * 1000, 3))  # whole ms, float noise aside
        if left_ms <= 0:
            del self._refused[key_hash]
            return None
        rpm = error.headers.get("x-ratelimit-limit-requests", "?")
        headers = {
            **error.headers,
            "retry-after": str(max(1, math.ceil(left_ms / 1000))),
            "retry-after-ms": str(left_ms),
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": reset_duration(left_ms),
        }
        message = f"Rate limit reached: {rpm} requests per minute. Retry after {left_ms} ms."
        return RateLimited(message, type="requests", code=RPM_CODE, headers=headers)

    def _forget_expired(self) -> None:
        now = self._clock()
        self._refused = {key: entry for key, entry in self._refused.items() if entry[0] > now}


class DoorShedder:
    """Refuse a paid request with a fast 503 while this replica already serves `limit` of them,
    and a key this replica refused for its requests per minute with its 429 until it may retry."""

    def __init__(self, app: ASGIApp, *, limit: int, paths: Collection[str]) -> None:
        self.app = app
        self.limit = limit
        self.paths = frozenset(paths)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = getattr(scope.get("app"), "state", None)
        refusal, key_id = self._memorised_refusal(scope, getattr(state, "refusals", None))
        if refusal is None and self.in_flight >= self.limit:
            refusal = ServiceUnavailable(
                "The marketplace is at capacity right now; retry shortly.", code=SHED_CODE, retry_after_s=1
            )
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            hook: DoorHook | None = getattr(state, "door_hook", None)
            if hook is not None:
                hook(refusal.status_code, refusal.code or "", key_id, time.perf_counter() - started)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    def _memorised_refusal(scope: Scope, memo: RefusalMemo | None) -> tuple[RateLimited | None, str | None]:
        if not memo:  # none, or nobody refused: no key to hash on this request's path
            return None, None
        authorization = next((value for name, value in scope.get("headers") or [] if name == b"authorization"), None)
        if authorization is None:
            return None, None
        try:
            key_id, key_hash = auth.parse_api_key(authorization.decode("latin-1"))
        except APIError:
            return None, None  # the route answers it, with its 401
        return memo.refusal(key_hash), key_id


class EngineLoad:
    """Requests admitted to each engine deployment by this ingress replica and not yet settled."""

    def __init__(self, capacities: dict[str, int]) -> None:
        # deployment (base listing) id -> the most requests it takes at once and queues
        self._capacity = capacities
        self._admitted: dict[str, int] = dict.fromkeys(capacities, 0)

    @classmethod
    def for_listings(cls, listings: Collection[Listing]) -> EngineLoad:
        return cls({listing.id: deployment_capacity(listing) for listing in listings})

    def take(self, deployment_id: str) -> None:
        """Count one more request to the deployment, or raise the 503 Serve would give when
        this replica alone already fills it. Check and count are one step with no await
        between, so requests arriving together cannot all pass on the same free slot; a
        request refused later (by Redis, or the client leaving) gives its slot back with
        `settled`."""
        capacity = self._capacity.get(deployment_id)
        admitted = self._admitted.get(deployment_id, 0)
        if capacity is not None and admitted >= capacity:
            raise ServiceUnavailable(
                f"The model {deployment_id!r} is at capacity right now; retry shortly.",
                code="model_overloaded",
                retry_after_s=1,
            )
        self._admitted[deployment_id] = admitted + 1

    def settled(self, deployment_id: str) -> None:
        self._admitted[deployment_id] = max(self._admitted.get(deployment_id, 0) - 1, 0)

    def admitted_to(self, deployment_id: str) -> int:
        return self._admitted.get(deployment_id, 0)


def deployment_capacity(listing: Listing) -> int:
    """What an engine deployment takes from one caller at its largest: every replica busy and
    the caller's queue (Serve counts `max_queued_requests` per handle) full."""
    scaling = listing.autoscaling
    return scaling.max_replicas * scaling.replica_concurrency + scaling.max_queued_requests
