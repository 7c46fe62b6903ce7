"""One error envelope for every failure the API can return.

Domain code raises an `APIError` subclass; the handlers installed by `install_error_handlers`
turn it, FastAPI's validation errors and Starlette's HTTP errors into the OpenAI shape
`{"error": {"message", "type", "param", "code"}}` with the right status. Nothing else in
the project builds an error body by hand.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("tokenmart.errors")


class APIError(Exception):
    status_code: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class BadRequest(APIError):
    status_code = 400
    type = "invalid_request_error"
    code = "invalid_value"


class AuthenticationFailed(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class InsufficientCredit(APIError):
    status_code = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class PermissionDenied(APIError):
    status_code = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(APIError):
    """409: the request contradicts the resource's state (e.g. reactivating a revoked key)."""

    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(APIError):
    """429; `type` says which limit (`requests` or `tokens`), as OpenAI does."""

    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


class UpstreamTimeout(APIError):
    status_code = 408
    type = "timeout"
    code = "upstream_timeout"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailable(APIError):
    """503; always sent with Retry-After so well-behaved clients back off."""

    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any) -> None:
        headers = {"retry-after": str(retry_after_s), **kwargs.pop("headers", {})}
        super().__init__(message, headers=headers, **kwargs)


class BillingUnavailable(ServiceUnavailable):
    code = "billing_unavailable"


class EngineError(APIError):
    """The model replica failed; no completion tokens are charged."""

    status_code = 500
    type = "server_error"
    code = "engine_error"


# Status -> (type, code) for errors raised by Starlette/FastAPI itself (unknown route,
# wrong method) or by Ray Serve LLM's HTTPException paths.
_HTTP_STATUS_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("timeout", "upstream_timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("requests", "rate_limit_exceeded"),
    503: ("service_unavailable", "service_unavailable"),
}


def error_body(status_code: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The envelope for a bare status (used where no APIError instance exists)."""
    type_, default_code = _HTTP_STATUS_TYPES.get(status_code, ("server_error", "internal_error"))
    return {"error": {"message": message, "type": type_, "param": param, "code": code or default_code}}


# The tags pydantic puts in an error's location for the union member it tried (`str`,
# `list[int]`, `function-after[...]`, a model's class name); they are not fields.
_UNION_TAG = re.compile(r"^([A-Z].*|.*\[.*|function-.*|str|int|float|bool|bytes|none|list|dict|tuple|set|decimal)$")


def _param_from_loc(loc: Sequence[int | str]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if not _UNION_TAG.match(p)]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> BadRequest:
    errors = exc.errors()
    if not errors:
        return BadRequest("Invalid request body.")
    first = min(errors, key=lambda e: len(e.get("loc", ())))
    param = _param_from_loc(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return BadRequest(f"The request body is not valid JSON: {msg}.", code="invalid_json")
    if first.get("type") == "missing":
        return BadRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    where = f"'{param}'" if param else "the request body"
    return BadRequest(f"Invalid value for {where}: {msg}.", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}."
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError("The server had an error while processing your request.").response()

    async def on_engine_validation_error(request: Request, exc: Exception) -> JSONResponse:
        # vLLM's request models raise this from their validators (e.g. stream_options
        # without stream); it is the client's mistake, not a server error.
        message = str(exc.args[0]) if exc.args else str(exc)
        return BadRequest(message, param=getattr(exc, "parameter", None)).response()

    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # the unit tests' FastAPI apps run without vLLM
        pass
    else:
        app.add_exception_handler(VLLMClientError, on_engine_validation_error)

    app.add_exception_handler(APIError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_unexpected)
