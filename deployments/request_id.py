"""Which `x-request-id` a request keeps, decided once for Ray Serve's proxy and for the app.

A client may send its own request id, and it is echoed on the response. An id that is not
UTF-8 is treated as absent and replaced by a generated one: Ray Serve's HTTP proxy and its
replicas decode the header as UTF-8 and answer a bare plain-text 500 when they cannot, on
every route. `RequestIdGuard` runs in the proxy, ahead of Ray's own request-id middleware,
and drops such a header, so Ray generates the id. Ray loads it through the
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` environment variable (`PROXY_ENV`), which the
launcher, the Helm chart and the test clusters set on every Ray node. The ingress's own
middleware applies the same rule, for servers that run the app without Ray's proxy.

This module is imported by Ray's proxy processes, so it stays light: no vLLM, no FastAPI.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = b"x-request-id"
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "tokenmart.deployments.request_id:proxy_middlewares"}


def client_request_id(raw: bytes | None) -> str | None:
    """The client's request id, or None when it sent none, an empty one or one that is not UTF-8."""
    if not raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class RequestIdGuard:
    """Drops an `x-request-id` header that is not UTF-8, so the proxy generates a fresh id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers") or []
        if scope["type"] in ("http", "websocket") and any(
            name == HEADER and client_request_id(value) is None for name, value in headers
        ):
            kept = [(name, value) for name, value in headers if name != HEADER or client_request_id(value) is not None]
            scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback: the middlewares it wraps around its own."""
    return [Middleware(RequestIdGuard)]
