"""One error envelope for every failure the API can return.

Domain code raises an `APIError` subclass; the handlers installed by `install_error_handlers`
turn it, FastAPI's validation errors and Starlette's HTTP errors into the OpenAI shape
`{"error": {"message", "type", "param", "code"}}` with the right status. Nothing else in
the project builds an error body by hand: each status's type and code are in `STATUS_TYPES`,
engine ErrorResponses are mapped by `engine_error`, and the internal 500 is rendered by
`internal_error_response`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("tokenmart.errors")


# The one status table: status -> (type, default code). The APIError classes take their
# `type` and `code` from it (a class may name a more specific code), and `error_body` uses it
# for a bare status: errors raised by Starlette/FastAPI itself (unknown route, wrong method)
# or by Ray Serve LLM's HTTPException paths. A status missing here is a 500's type and code.
STATUS_TYPES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("invalid_request_error", "invalid_api_key"),
    402: ("insufficient_quota", "insufficient_quota"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("timeout", "upstream_timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "service_unavailable"),
}


def status_type(status_code: int) -> tuple[str, str]:
    """The (type, default code) of a status; one the table does not name is a 500's."""
    return STATUS_TYPES.get(status_code, STATUS_TYPES[500])


class APIError(Exception):
    """The base of every error the API returns; a subclass names its status (and, at most,
    a more specific `code` or `type`); the rest comes from `STATUS_TYPES`."""

    status_code: int = 500
    type: str = STATUS_TYPES[500][0]
    code: str | None = STATUS_TYPES[500][1]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "status_code" in cls.__dict__:
            type_, code = status_type(cls.status_code)
            if "type" not in cls.__dict__:
                cls.type = type_
            if "code" not in cls.__dict__:
                cls.code = code

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


class AuthenticationFailed(APIError):
    status_code = 401


class InsufficientCredit(APIError):
    status_code = 402


class PermissionDenied(APIError):
    status_code = 403
    code = "model_not_allowed"


class NotFound(APIError):
    status_code = 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(APIError):
    """409: the request contradicts the resource's state (e.g. reactivating a revoked key)."""

    status_code = 409


class RateLimited(APIError):
    """429; `type` says which limit (`requests` or `tokens`), as OpenAI does."""

    status_code = 429


class PayloadTooLarge(APIError):
    status_code = 413


class ServiceUnavailable(APIError):
    """503; always sent with Retry-After so well-behaved clients back off."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any) -> None:
        headers = {"retry-after": str(retry_after_s), **kwargs.pop("headers", {})}
        super().__init__(message, headers=headers, **kwargs)


class BillingUnavailable(ServiceUnavailable):
    code = "billing_unavailable"


class EngineError(APIError):
    """The model replica failed; no completion tokens are charged."""

    status_code = 500
    code = "engine_error"


class EngineRefusal(BadRequest):
    """An engine's 4xx: the request was the problem, so the client gets the engine's status
    (never a 5xx, which SDKs retry) with a bad request's body. `engine_refusal_class` gives
    the class of each status; an instance is never given another status."""

    type = BadRequest.type
    code = BadRequest.code

    def __reduce__(self) -> tuple[Any, ...]:
        # The classes of statuses other than 400 are made by `engine_refusal_class`, so they
        # are rebuilt through it rather than looked up by name.
        return (_rebuild_engine_refusal, (self.status_code, self.message), self.__dict__)


@functools.cache
def engine_refusal_class(status_code: int) -> type[EngineRefusal]:
    """The `EngineRefusal` class of a 4xx status (one class per status, made once)."""
    if not 400 <= status_code < 500:
        raise ValueError(f"an engine refusal is a 4xx, not {status_code}")
    if status_code == EngineRefusal.status_code:
        return EngineRefusal
    name = f"EngineRefusal{status_code}"
    namespace = {
        "status_code": status_code,
        "type": EngineRefusal.type,
        "code": EngineRefusal.code,
        "__module__": __name__,
        "__qualname__": name,
    }
    return type(name, (EngineRefusal,), namespace)


def _rebuild_engine_refusal(status_code: int, message: str) -> EngineRefusal:
    return engine_refusal_class(status_code)(message)


# What the engine raises for a request it cannot take (a template argument, a bad value); its
# replica and the engine are fine. Anything else (a dead actor, a broken stream) is an outage.
_REQUEST_ERRORS: tuple[type[BaseException], ...] = (TypeError, ValueError, OverflowError, UnicodeError)
try:
    from jinja2 import TemplateError

    _REQUEST_ERRORS += (TemplateError,)
except ImportError:  # pragma: no cover - jinja2 comes with the engine's tokenizers
    pass
_INTERNALS = re.compile(r"(File \"[^\"]*\"|/[\w./-]+\.py\b|Traceback \(most recent call last\)|ray::\S+)")
MAX_ERROR_MESSAGE_CHARS = 300


def client_message(text: str) -> str:
    """An engine's error text fit for a client: its first line, without exception names, file
    paths or frames ("" when nothing is left). Every engine message reaching a client, in a
    JSON error or in a stream's error event, goes through here."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    line = re.sub(r"^(\w+\.)*\w*(Error|Exception)\w*:\s*", "", line)
    line = re.sub(r"\s{2,}", " ", _INTERNALS.sub("", line)).strip(" :")
    if len(line) > MAX_ERROR_MESSAGE_CHARS:
        line = line[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
    return line


def request_refusal(exc: BaseException) -> APIError | None:
    """A 400 for an engine exception that describes the request; None for an outage."""
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps what the replica raised
    if not isinstance(cause, _REQUEST_ERRORS):
        return None
    detail = client_message(str(cause))
    return BadRequest("The model could not process the request" + (f": {detail}" if detail else "."))


def engine_error(error: Any) -> APIError:
    """Map an engine ErrorResponse (a model or a dict) onto the envelope, keeping 4xx as 4xx.

    A 4xx is an `EngineRefusal` of that status with the engine's message and `param`; any
    other status (or none) is an `EngineError`, a 500.
    """
    if not isinstance(error, dict):
        error = error.model_dump()
    info = error.get("error", error)
    status = int(info.get("code") or 500) if str(info.get("code", "")).isdigit() else 500
    message = client_message(info.get("message") or "") or "The model failed to process the request."
    if 400 <= status < 500:
        return engine_refusal_class(status)(message, param=info.get("param"))
    return EngineError(message)


INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request."


def internal_error_response() -> JSONResponse:
    """The 500 for an unexpected exception: the generic message only, never the exception's text.

    Both places that catch the unexpected render it here: the app's last-resort handler and
    the request-context middleware (so the 500 carries the request id).
    """
    return APIError(INTERNAL_ERROR_MESSAGE).response()


def error_body(status_code: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The envelope for a bare status (used where no APIError instance exists)."""
    type_, default_code = status_type(status_code)
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
        return internal_error_response()

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
