"""Engine replicas stop the requests of an ingress replica that died.

Ray does not cancel a streaming actor call when its caller dies: the engine would go on
generating, for nobody, up to the request's max_tokens. So the marketplace ingress names
itself (its Serve replica actor) in a header of each request's `RawRequestInfo`, and the
engine replica keeps one watcher per caller it is serving. The watcher calls the caller's
`__ray_ready__` once a second, whatever the number of requests; when the caller is gone it
cancels that caller's requests, which aborts them in the engine as a client disconnect does.

What happens to the billing of such a request is the lease policy of `billing.py`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import RayActorError

CALLER_HEADER = "x-tokenmart-caller"
SERVE_NAMESPACE = "serve"

logger = logging.getLogger("ray.serve")


def caller_of(raw_request_info: Any) -> str | None:
    headers = getattr(raw_request_info, "headers", None) or {}
    return headers.get(CALLER_HEADER)


class CallerWatch:
    def __init__(self, interval_s: float = 1.0, timeout_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s  # a caller slower than this to answer is busy, not dead
        self._requests: dict[str, set[asyncio.Task]] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._handles: dict[str, Any] = {}

    async def follow(self, stream: AsyncIterator[Any], raw_request_info: Any) -> AsyncIterator[Any]:
        """Yield from `stream`; if the caller dies first, the consuming task is cancelled."""
        caller = caller_of(raw_request_info)
        if caller is None:
            async for item in stream:
                yield item
            return
        task = asyncio.current_task()
        requests = self._requests.setdefault(caller, set())
        requests.add(task)
        if caller not in self._watchers:
            self._watchers[caller] = asyncio.create_task(self._watch(caller))
        try:
            async for item in stream:
                yield item
        finally:
            requests.discard(task)
            if not requests and self._requests.get(caller) is requests:
                del self._requests[caller]

    async def _watch(self, caller: str) -> None:
        try:
            handle = self._handles.get(caller)
            if handle is None:
                try:
                    handle = await asyncio.to_thread(ray.get_actor, caller, namespace=SERVE_NAMESPACE)
                    self._handles[caller] = handle  # looked up once per caller, not per request
                except ValueError:
                    pass  # gone already
            while True:
                # Sleep first: a request that ends within a second costs no call at all.
                await asyncio.sleep(self.interval_s)
                if not self._requests.get(caller):
                    return
                if handle is not None:
                    try:
                        await asyncio.wait_for(handle.__ray_ready__.remote(), self.timeout_s)
                    except asyncio.TimeoutError:
                        pass  # alive, but busy
                    except RayActorError:
                        self._handles.pop(caller, None)
                        handle = None
                if handle is None:
                    orphans = self._requests.pop(caller, set())
                    logger.warning("ingress replica %s is gone; cancelling its %d request(s)", caller, len(orphans))
                    for task in orphans:
                        task.cancel()
                    return
        finally:
            self._watchers.pop(caller, None)
