"""Refusing early what cannot be served, so refusals never wait behind admitted work.

Two checks, both answered with an OpenAI-style 503 and `Retry-After`, before anything is
parsed, counted or held:

- `DoorShedder` (an ASGI middleware) counts the paid requests one ingress replica is serving.
  At its limit a new one is refused before its body is read: an overloaded replica answers
  fast instead of letting a queue grow in front of it (in Serve's proxy, HAProxy or the
  replica itself), which would slow every answer, refusals included.
- `EngineLoad` counts, per engine deployment, the requests this ingress replica has admitted
  and not yet settled. When that alone fills the deployment's whole capacity (every replica's
  concurrency plus its queue), the next request is refused before its prompt is counted or
  Redis is asked, instead of being held, dispatched and bounced by Serve's back-pressure. It
  sees only its own replica's requests, so it refuses only when Serve certainly would; Serve's
  `BackPressureError` remains the exact check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from .catalog import Listing
from .errors import ServiceUnavailable

SHED_CODE = "server_overloaded"

# Called when the door refuses a request, with the seconds it took (the replica's metrics). The
# ingress replica puts it on its app's state, as `shed_hook`, when its app is built.
ShedHook = Callable[[float], None]


class DoorShedder:
    """Refuse a paid request with a fast 503 while this replica already serves `limit` of them."""

    def __init__(self, app: ASGIApp, *, limit: int, paths: Collection[str]) -> None:
        self.app = app
        self.limit = limit
        self.paths = frozenset(paths)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            started = time.perf_counter()
            refusal = ServiceUnavailable(
                "The marketplace is at capacity right now; retry shortly.", code=SHED_CODE, retry_after_s=1
            )
            await refusal.response()(scope, receive, send)
            hook: ShedHook | None = getattr(getattr(scope.get("app"), "state", None), "shed_hook", None)
            if hook is not None:
                hook(time.perf_counter() - started)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class EngineLoad:
    """Requests admitted to each engine deployment by this ingress replica and not yet settled."""

    def __init__(self, capacities: dict[str, int]) -> None:
        # deployment (base listing) id -> the most requests it takes at once and queues
        self._capacity = capacities
        self._admitted: dict[str, int] = dict.fromkeys(capacities, 0)

    @classmethod
    def for_listings(cls, listings: Collection[Listing]) -> EngineLoad:
        return cls({listing.id: deployment_capacity(listing) for listing in listings})

    def check(self, deployment_id: str) -> None:
        """Raise the 503 Serve would give, when this replica alone already fills the deployment."""
        capacity = self._capacity.get(deployment_id)
        if capacity is not None and self._admitted.get(deployment_id, 0) >= capacity:
            raise ServiceUnavailable(
                f"The model {deployment_id!r} is at capacity right now; retry shortly.",
                code="model_overloaded",
                retry_after_s=1,
            )

    def admitted(self, deployment_id: str) -> None:
        self._admitted[deployment_id] = self._admitted.get(deployment_id, 0) + 1

    def settled(self, deployment_id: str) -> None:
        self._admitted[deployment_id] = max(self._admitted.get(deployment_id, 0) - 1, 0)

    def admitted_to(self, deployment_id: str) -> int:
        return self._admitted.get(deployment_id, 0)


def deployment_capacity(listing: Listing) -> int:
    """What an engine deployment takes from one caller at its largest: every replica busy and
    the caller's queue (Serve counts `max_queued_requests` per handle) full."""
    scaling = listing.autoscaling
    return scaling.max_replicas * scaling.replica_concurrency + scaling.max_queued_requests
