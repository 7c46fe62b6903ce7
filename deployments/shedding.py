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
  `BackPressureError` remains the exact check. While one of its deployments is full, the door
  also peeks at each paid request's `model` (one JSON decode of the body it reads anyway, no
  validation, no route) and refuses one for the full deployment there: a flood at a full
  listing then costs what a 429 from the memo costs. With no deployment full the door reads
  nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import auth
from .catalog import Listing
from .errors import APIError, PayloadTooLarge, RateLimited, ServiceUnavailable
from .limits import reset_duration

SHED_CODE = "server_overloaded"
RPM_CODE = "rate_limit_exceeded"
MEMO_SIZE = 100_000  # keys remembered at once; expired ones are dropped first

# Called when the door refuses a request, with its status, error code, key id (or None), the
# seconds it took and the model it asked for (None when its body was not read), for the
# metrics. The ingress replica puts it on its app's state as `door_hook`, its refusal memo as
# `refusals` and its `ListingPeek` as `listing_peek`, when its app is built.
DoorHook = Callable[[int, str, str | None, float, str | None], None]


class RefusalMemo:
    """Keys refused for their requests-per-minute limit, each until its 429's retry time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._refused: dict[str, tuple[float, APIError, str | None]] = {}

    def __len__(self) -> int:
        return len(self._refused)

    def remember(self, key_hash: str, error: APIError, key_id: str | None = None) -> None:
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
        self._refused[key_hash] = (self._clock() + retry_ms / 1000, error, key_id)

    def refusal(self, key_hash: str) -> RateLimited | None:
        """The 429 this key gets now, with the time left to wait, or None once it may retry."""
        entry = self._refused.get(key_hash)
        if entry is None:
            return None
        until, error, _ = entry
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

    def key_of(self, key_hash: str) -> str | None:
        """The key id a remembered refusal was for (the metrics' key label)."""
        entry = self._refused.get(key_hash)
        return None if entry is None else entry[2]

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
        model = None
        peek: ListingPeek | None = getattr(state, "listing_peek", None)
        # A request without a well-formed key gets the route's 401, full listing or not.
        if refusal is None and peek is not None and peek.load.any_full() and _api_key(scope):
            try:
                body, receive = await _read_body(receive)
            except StarletteHTTPException as exc:  # over the body limit, while being read
                refusal = PayloadTooLarge(str(exc.detail))
            else:
                model, refusal = peek.refusal(body)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            hook: DoorHook | None = getattr(state, "door_hook", None)
            label = getattr(state, "key_label", None)  # the ingress's: a located secret's key id
            if hook is not None and key_id is None and label is not None and (key_hash := _api_key(scope)):
                key_id = label(key_hash)
            if hook is not None:
                hook(refusal.status_code, refusal.code or "", key_id, time.perf_counter() - started, model)
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
        key_hash = _api_key(scope)
        if key_hash is None:
            return None, None  # the route answers it, with its 401
        return memo.refusal(key_hash), memo.key_of(key_hash)


def _api_key(scope: Scope) -> str | None:
    """The hash of the request's key, or None without a well-formed key (the route's 401)."""
    authorization = next((value for name, value in scope.get("headers") or [] if name == b"authorization"), None)
    if authorization is None:
        return None
    try:
        return auth.parse_api_key(authorization.decode("latin-1"))
    except APIError:
        return None


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
        refusal = self.refusal(deployment_id)
        if refusal is not None:
            raise refusal
        self._admitted[deployment_id] = self._admitted.get(deployment_id, 0) + 1

    def refusal(self, deployment_id: str) -> ServiceUnavailable | None:
        """The 503 for a request to the deployment now, or None while it has room."""
        capacity = self._capacity.get(deployment_id)
        if capacity is None or self._admitted.get(deployment_id, 0) < capacity:
            return None
        return ServiceUnavailable(
            f"The model {deployment_id!r} is at capacity right now; retry shortly.",
            code="model_overloaded",
            retry_after_s=1,
        )

    def any_full(self) -> bool:
        return any(self._admitted[deployment] >= capacity for deployment, capacity in self._capacity.items())

    def settled(self, deployment_id: str) -> None:
        self._admitted[deployment_id] = max(self._admitted.get(deployment_id, 0) - 1, 0)

    def admitted_to(self, deployment_id: str) -> int:
        return self._admitted.get(deployment_id, 0)


class ListingPeek:
    """The door's look at a request's `model` while one of this replica's deployments is full."""

    def __init__(self, load: EngineLoad, deployment_of: Callable[[str], str | None]) -> None:
        self.load = load
        # model id -> its engine deployment (an adapter's is its base's), None when unknown
        self._deployment_of = deployment_of

    def refusal(self, body: bytes) -> tuple[str | None, ServiceUnavailable | None]:
        """The model asked for, and the 503 when its deployment is full. A body that is not a
        JSON object with a known model passes: the route gives it its own answer."""
        try:
            parsed = json.loads(body)
            model = parsed.get("model")
        except (ValueError, AttributeError, RecursionError):  # not JSON (or nested too deep), not an object
            return None, None
        if not isinstance(model, str):
            return None, None
        if parsed.get("models"):
            return model, None  # fallbacks named: the gateway picks one with room
        deployment = self._deployment_of(model)
        if deployment is None:
            return None, None
        return model, self.load.refusal(deployment)


async def _read_body(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole request body, and a `receive` that gives it to the app as one message
    and then goes on with the connection's (its disconnect)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: let the app see it
            return b"", _replaying([message], receive)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    return body, _replaying([{"type": "http.request", "body": body, "more_body": False}], receive)


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


# Requests of a fair-queued listing between the door and the queue (counting the prompt, the
# admission call) beyond what the queue itself bounds.
FAIR_SHARE_MARGIN = 64


def deployment_capacity(listing: Listing) -> int:
    """What an engine deployment takes from one caller at its largest: every replica busy and
    the caller's queue (Serve counts `max_queued_requests` per handle) full. A listing with a
    fair queue: the queue's slots and waiting room, which the queue bounds itself (and refuses
    from the tenant over its share), plus the requests on their way to it."""
    scaling = listing.autoscaling
    if listing.fair_share is not None:
        return listing.fair_share.concurrency_of(scaling) + listing.fair_share.max_waiting + FAIR_SHARE_MARGIN
    return scaling.max_replicas * scaling.replica_concurrency + scaling.max_queued_requests
