"""Small helpers every test package shares: free ports, waiting on a condition, reading SSE."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import redis


def free_port() -> int:
    """A loopback port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.05, what: str = "") -> Any:
    """Poll until `condition()` returns something truthy and return it."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the thing polled may not be up yet
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}: {last_error!r}")
        time.sleep(interval_s)


def wait_for_entries(client: redis.Redis, stream: str, count: int, timeout_s: float) -> None:
    """Block on a Redis stream (XREAD BLOCK, no polling) until it holds `count` entries."""
    deadline = time.monotonic() + timeout_s
    last_id, seen = "0-0", 0
    while seen < count:
        left_ms = int((deadline - time.monotonic()) * 1000)
        assert left_ms > 0, f"{stream} has {seen} of {count} entries after {timeout_s}s"
        for _, entries in client.xread({stream: last_id}, block=left_ms) or []:
            seen += len(entries)
            last_id = entries[-1][0]


def sse_data(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a streamed SSE response, as they arrive (`[DONE]` included)."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


T = TypeVar("T")


def run_with_redis(redis_url: str, scenario: Callable[[Any], Awaitable[T]]) -> T:
    """One async scenario on its own event loop, with a fresh asyncio client of the project's
    own (`redis_connection.connect`, as an ingress replica has)."""
    from tokenmart.deployments.redis_connection import connect

    async def main() -> T:
        client = connect(redis_url)
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(main())
