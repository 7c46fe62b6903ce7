"""The error envelope and the request-context middleware, on a small FastAPI app built like the ingress."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from tokenmart.deployments import errors
from tokenmart.deployments.errors import (
    APIError,
    AuthenticationFailed,
    BadRequest,
    BillingUnavailable,
    Conflict,
    EngineError,
    InsufficientCredit,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ServiceUnavailable,
    error_body,
)
from tokenmart.deployments.ingress import create_fastapi_app

MAX_BODY = 2048
SECRET = "db-password-hunter2"
ENVELOPE_KEYS = {"message", "type", "param", "code"}


class Message(BaseModel):
    role: str
    content: str


class Body(BaseModel):
    model: str
    count: int = Field(default=1, ge=1, le=10)
    messages: list[Message] = []


RAISED: dict[str, APIError] = {
    "bad_request": BadRequest("Bad thing.", param="temperature"),
    "auth": AuthenticationFailed("Incorrect API key provided."),
    "credit": InsufficientCredit("Your credit balance is used up."),
    "permission": PermissionDenied("This API key may not use the model 'm'.", param="model"),
    "conflict": Conflict("The API key 'k' is revoked.", param="status", code="key_revoked"),
    "model": ModelNotFound("The model 'nope' does not exist.", param="model"),
    "not_found": NotFound("No such key.", param="key_id"),
    "too_large": PayloadTooLarge("Too big."),
    "unavailable": ServiceUnavailable("Overloaded.", retry_after_s=7),
    "billing": BillingUnavailable("The billing store is unreachable.", retry_after_s=2),
    "engine": EngineError("The engine failed."),
}


def _build_app() -> FastAPI:
    app = create_fastapi_app(max_body_bytes=MAX_BODY)

    @app.post("/v1/things")
    async def create_thing(body: Body) -> dict:
        return {"model": body.model, "count": body.count}

    @app.get("/raise/{kind}")
    async def raise_api_error(kind: str) -> dict:
        raise RAISED[kind]

    @app.get("/http/{status}")
    async def raise_http(status: int) -> dict:
        raise StarletteHTTPException(status_code=status, detail=f"custom detail {status}")

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError(f"connection to postgres failed: {SECRET}")

    @app.get("/request-id")
    async def request_id(request: Request) -> dict:
        return {"seen": request.headers.get("x-request-id")}

    @app.post("/echo-size")
    async def echo_size(request: Request) -> dict:
        return {"size": len(await request.body())}

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(_build_app(), raise_server_exceptions=False)


def _error(response) -> dict:
    payload = response.json()
    assert set(payload) == {"error"}, payload
    assert set(payload["error"]) == ENVELOPE_KEYS, payload
    assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
    return payload["error"]


# -- framework errors ------------------------------------------------------------------------


def test_unknown_route_is_404_not_found_envelope(client: TestClient):
    response = client.get("/v1/nope")
    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "not_found"
    assert error["type"] == "invalid_request_error"
    assert "GET /v1/nope" in error["message"]
    assert error["param"] is None


def test_wrong_method_is_405_envelope(client: TestClient):
    response = client.get("/v1/things")
    assert response.status_code == 405
    error = _error(response)
    assert error["code"] == "method_not_allowed"
    assert "GET" in error["message"]
    assert "/v1/things" in error["message"]
    assert response.headers["allow"] == "POST"


def test_http_exception_detail_and_status_are_kept(client: TestClient):
    response = client.get("/http/429")
    assert response.status_code == 429
    error = _error(response)
    assert error["message"] == "custom detail 429"
    assert error["code"] == "rate_limit_exceeded"


def test_unmapped_http_status_still_gets_envelope(client: TestClient):
    response = client.get("/http/418")
    assert response.status_code == 418
    assert _error(response)["message"] == "custom detail 418"


# -- body validation -----------------------------------------------------------------------------


def test_invalid_field_value_is_400_with_param(client: TestClient):
    response = client.post("/v1/things", json={"model": "m", "count": 0})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "count"
    assert error["code"] == "invalid_value"
    assert error["type"] == "invalid_request_error"
    assert "'count'" in error["message"]


def test_nested_invalid_field_param_is_dotted_path(client: TestClient):
    messages = [{"role": "user", "content": "hi"}, {"role": 5, "content": "x"}]
    response = client.post("/v1/things", json={"model": "m", "messages": messages})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "messages.1.role"
    assert error["code"] == "invalid_value"


def test_nested_missing_field_param_is_dotted_path(client: TestClient):
    response = client.post("/v1/things", json={"model": "m", "messages": [{"role": "user"}]})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "messages.0.content"
    assert error["code"] == "missing_required_parameter"


def test_wrong_type_param_is_named(client: TestClient):
    response = client.post("/v1/things", json={"model": "m", "count": "many"})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "count"
    assert error["code"] == "invalid_value"


def test_missing_required_field_is_400_missing_required_parameter(client: TestClient):
    response = client.post("/v1/things", json={"count": 2})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "model"
    assert error["code"] == "missing_required_parameter"
    assert "'model'" in error["message"]


def test_invalid_json_body_is_400(client: TestClient):
    response = client.post("/v1/things", content=b'{"model": "m",', headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "invalid_json"
    assert "not valid JSON" in error["message"]


def test_valid_body_passes_through(client: TestClient):
    response = client.post("/v1/things", json={"model": "m", "count": 3})
    assert response.status_code == 200
    assert response.json() == {"model": "m", "count": 3}


# -- APIError subclasses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status", "type_", "code", "param"),
    [
        ("bad_request", 400, "invalid_request_error", "invalid_value", "temperature"),
        ("auth", 401, "invalid_request_error", "invalid_api_key", None),
        ("credit", 402, "insufficient_quota", "insufficient_quota", None),
        ("permission", 403, "invalid_request_error", "model_not_allowed", "model"),
        ("conflict", 409, "invalid_request_error", "key_revoked", "status"),
        ("model", 404, "invalid_request_error", "model_not_found", "model"),
        ("not_found", 404, "invalid_request_error", "not_found", "key_id"),
        ("too_large", 413, "invalid_request_error", "request_too_large", None),
        ("unavailable", 503, "service_unavailable", "service_unavailable", None),
        ("billing", 503, "service_unavailable", "billing_unavailable", None),
        ("engine", 500, "server_error", "engine_error", None),
    ],
)
def test_api_error_maps_to_status_and_envelope(
    client: TestClient, kind: str, status: int, type_: str, code: str, param: str | None
):
    response = client.get(f"/raise/{kind}")
    assert response.status_code == status
    error = _error(response)
    assert error == {"message": RAISED[kind].message, "type": type_, "param": param, "code": code}


def test_service_unavailable_sends_retry_after(client: TestClient):
    assert client.get("/raise/unavailable").headers["retry-after"] == "7"
    assert client.get("/raise/billing").headers["retry-after"] == "2"


def test_service_unavailable_retry_after_defaults_to_one_second():
    assert ServiceUnavailable("x").headers == {"retry-after": "1"}


def test_service_unavailable_keeps_extra_headers():
    exc = ServiceUnavailable("x", retry_after_s=3, headers={"x-extra": "1"})
    assert exc.headers == {"retry-after": "3", "x-extra": "1"}


def test_error_code_and_type_can_be_overridden_per_instance():
    exc = AuthenticationFailed("no key", code="missing_api_key")
    assert exc.code == "missing_api_key"
    # the class default is untouched
    assert AuthenticationFailed("x").code == "invalid_api_key"
    assert exc.body() == {
        "error": {"message": "no key", "type": "invalid_request_error", "param": None, "code": "missing_api_key"}
    }


def test_error_body_for_bare_status():
    assert error_body(429, "slow down") == {
        "error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    }
    assert error_body(599, "odd")["error"]["type"] == "server_error"
    assert error_body(400, "bad", param="n", code="too_many")["error"] == {
        "message": "bad",
        "type": "invalid_request_error",
        "param": "n",
        "code": "too_many",
    }


# -- unexpected exceptions ---------------------------------------------------------------------------


def test_unexpected_exception_is_500_without_leaking_text(client: TestClient):
    response = client.get("/boom")
    assert response.status_code == 500
    error = _error(response)
    assert error["type"] == "server_error"
    assert error["code"] == "internal_error"
    assert SECRET not in response.text
    assert "postgres" not in response.text
    assert "RuntimeError" not in response.text


# -- body size limit -------------------------------------------------------------------------------


def test_body_over_limit_is_413_request_too_large(client: TestClient):
    response = client.post(
        "/v1/things",
        content=json.dumps({"model": "m" * (MAX_BODY + 10)}).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "request_too_large"
    assert str(MAX_BODY) in error["message"]
    assert response.headers.get("x-request-id")


def test_body_over_limit_is_refused_before_the_route_runs(client: TestClient):
    response = client.post("/echo-size", content=b"x" * (MAX_BODY + 1))
    assert response.status_code == 413


def test_body_at_limit_is_accepted(client: TestClient):
    response = client.post("/echo-size", content=b"x" * MAX_BODY)
    assert response.status_code == 200
    assert response.json() == {"size": MAX_BODY}


def test_default_body_limit_is_one_mebibyte():
    small = TestClient(create_fastapi_app())
    assert small.post("/anything", content=b"x" * ((1 << 20) + 1)).status_code == 413
    assert small.post("/anything", content=b"x" * (1 << 20)).status_code == 404


# -- x-request-id -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/request-id"),
        ("get", "/v1/nope"),
        ("get", "/v1/things"),
        ("get", "/raise/credit"),
        ("get", "/raise/unavailable"),
    ],
)
def test_every_response_carries_one_generated_request_id(client: TestClient, method: str, path: str):
    response = client.request(method, path)
    ids = response.headers.get_list("x-request-id")
    assert len(ids) == 1
    assert re.fullmatch(r"[0-9a-f]{32}", ids[0])


def test_validation_error_response_carries_request_id(client: TestClient):
    response = client.post("/v1/things", json={})
    assert response.status_code == 400
    assert len(response.headers.get_list("x-request-id")) == 1


def test_generated_request_id_is_the_one_the_app_sees(client: TestClient):
    response = client.get("/request-id")
    assert response.json()["seen"] == response.headers["x-request-id"]


def test_each_request_gets_its_own_id(client: TestClient):
    first = client.get("/request-id").headers["x-request-id"]
    second = client.get("/request-id").headers["x-request-id"]
    assert first != second


def test_incoming_request_id_is_kept_and_not_duplicated(client: TestClient):
    """Behind Ray Serve the proxy echoes the incoming id; the app must neither replace nor repeat it."""
    response = client.get("/request-id", headers={"x-request-id": "req-from-client-123"})
    assert response.json()["seen"] == "req-from-client-123"
    assert set(response.headers.get_list("x-request-id")) <= {"req-from-client-123"}


def test_incoming_request_id_is_echoed_exactly_once_behind_the_serve_proxy():
    """The full stack: Ray Serve's proxy RequestIdMiddleware in front of the tokenmart app."""
    from ray.serve._private.http_util import RequestIdMiddleware

    stacked = TestClient(RequestIdMiddleware(_build_app()), raise_server_exceptions=False)
    response = stacked.get("/request-id", headers={"x-request-id": "req-from-client-123"})
    assert response.headers.get_list("x-request-id") == ["req-from-client-123"]
    assert response.json()["seen"] == "req-from-client-123"

    for path, status in [("/v1/nope", 404), ("/raise/credit", 402), ("/boom", 500)]:
        response = stacked.get(path)
        assert response.status_code == status
        assert len(response.headers.get_list("x-request-id")) == 1, path


def test_error_module_has_no_hand_built_status_table_gaps():
    # Every status the public contract names maps to an OpenAI error type.
    for status in (400, 401, 402, 403, 404, 409, 413, 429, 500, 503):
        assert status in errors.STATUS_TYPES


def _chunks(total: int, size: int = 512):
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"x" * piece


def test_streamed_body_without_content_length_over_limit_is_413(client: TestClient):
    response = client.post("/echo-size", content=_chunks(MAX_BODY * 5))
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"


def test_streamed_json_body_over_limit_is_413_not_a_parse_error(client: TestClient):
    response = client.post("/v1/things", content=_chunks(MAX_BODY * 5), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_streamed_body_under_limit_is_read_whole(client: TestClient):
    response = client.post("/echo-size", content=_chunks(MAX_BODY - 10))
    assert response.json() == {"size": MAX_BODY - 10}


def test_unexpected_error_response_carries_a_request_id(client: TestClient):
    response = client.get("/boom")
    assert response.status_code == 500
    assert len(response.headers.get_list("x-request-id")) == 1
    assert SECRET not in response.text


# -- a request id that is not UTF-8 ----------------------------------------------------------------
# httpx's TestClient re-encodes header values as UTF-8, so these drive the ASGI app directly
# with the raw bytes a client can send.


async def _call_raw(app, headers: list[tuple[bytes, bytes]], path: str = "/request-id") -> tuple[int, list, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], start["headers"], body


@pytest.mark.parametrize("raw_id", [b"ab\xff\xfe", b"\xc3\x28", b"\x80"])
@pytest.mark.parametrize("path", ["/request-id", "/v1/nope", "/raise/credit"])
def test_a_request_id_that_is_not_utf8_is_replaced_not_a_crash(raw_id: bytes, path: str):
    status, headers, body = asyncio.run(_call_raw(_build_app(), [(b"x-request-id", raw_id)], path))
    assert status == {"/request-id": 200, "/v1/nope": 404, "/raise/credit": 402}[path]
    ids = [value for name, value in headers if name == b"x-request-id"]
    assert len(ids) == 1 and re.fullmatch(rb"[0-9a-f]{32}", ids[0])
    if path == "/request-id":
        assert json.loads(body)["seen"] == ids[0].decode()  # the app sees the replacement, once
    else:
        assert set(json.loads(body)["error"]) == ENVELOPE_KEYS


def test_a_utf8_request_id_is_kept():
    raw_id = "réq-1".encode()
    status, headers, body = asyncio.run(_call_raw(_build_app(), [(b"x-request-id", raw_id)]))
    assert status == 200
    assert json.loads(body)["seen"].encode("latin-1") == raw_id  # Starlette reads header bytes as latin-1
    assert not [value for name, value in headers if name == b"x-request-id"]  # the proxy echoes a kept id


def test_the_proxy_guard_drops_a_request_id_that_is_not_utf8_and_keeps_others():
    """Ray Serve's proxy decodes x-request-id as UTF-8; the guard runs in front of it."""
    from ray.serve._private.http_util import RequestIdMiddleware

    from tokenmart.deployments.request_id import PROXY_ENV, RequestIdGuard, proxy_middlewares

    seen: list[list[tuple[bytes, bytes]]] = []

    async def proxy(scope, receive, send) -> None:
        seen.append(list(scope["headers"]))
        # What Ray's proxy does with the header (ray/serve/_private/proxy.py): this must not raise.
        [value.decode() for name, value in scope["headers"] if name == b"x-request-id"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = RequestIdGuard(RequestIdMiddleware(proxy))
    other = (b"authorization", b"Bearer x")
    status, headers, _ = asyncio.run(_call_raw(guarded, [(b"x-request-id", b"bad\xff"), other]))
    assert status == 200
    forwarded = dict(seen[-1])
    assert forwarded[b"authorization"] == b"Bearer x"
    assert re.fullmatch(rb"[0-9a-f-]{32,36}", forwarded[b"x-request-id"])  # Ray generated one
    assert [v for n, v in headers if n.lower() == b"x-request-id"] == [forwarded[b"x-request-id"]]

    asyncio.run(_call_raw(guarded, [(b"x-request-id", b"client-id-1")]))
    assert dict(seen[-1])[b"x-request-id"] == b"client-id-1"

    assert [m.cls for m in proxy_middlewares()] == [RequestIdGuard]
    module, _, name = PROXY_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    assert module == "tokenmart.deployments.request_id" and name == "proxy_middlewares"


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "prompt", "str"), "prompt"),
        (("body", "prompt", "list[str]", 1), "prompt.1"),
        (("body", "prompt", "list[list[int]]", 0, 2), "prompt.0.2"),
        (("body", "messages", 0, "content", "function-after[check(), str]"), "messages.0.content"),
        (("body", "model"), "model"),
        (("body", "n"), "n"),
    ],
)
def test_param_names_the_field_not_the_union_member_pydantic_tried(loc: tuple, param: str) -> None:
    from tokenmart.deployments.errors import _param_from_loc

    assert _param_from_loc(loc) == param


# -- one status table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        APIError,
        BadRequest,
        AuthenticationFailed,
        InsufficientCredit,
        NotFound,
        Conflict,
        errors.RateLimited,
        PayloadTooLarge,
        ServiceUnavailable,
    ],
)
def test_error_classes_and_the_bare_status_envelope_read_the_same_table(cls: type[APIError]) -> None:
    assert (cls.type, cls.code) == errors.STATUS_TYPES[cls.status_code]
    assert cls("m").body() == error_body(cls.status_code, "m")


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (PermissionDenied, "model_not_allowed"),
        (ModelNotFound, "model_not_found"),
        (BillingUnavailable, "billing_unavailable"),
        (EngineError, "engine_error"),
    ],
)
def test_a_class_names_only_its_more_specific_code(cls: type[APIError], code: str) -> None:
    assert cls.code == code
    assert cls.type == errors.STATUS_TYPES[cls.status_code][0]


def test_the_dead_408_class_is_gone() -> None:
    assert not hasattr(errors, "UpstreamTimeout")


# -- engine errors -----------------------------------------------------------------------------------


class _EngineErrorModel:
    """Stands in for Ray Serve LLM's ErrorResponse model (only `model_dump` is read)."""

    def __init__(self, payload: dict) -> None:
        self.payload = payload

    def model_dump(self) -> dict:
        return self.payload


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 418, 422, 429])
@pytest.mark.parametrize("shape", ["nested", "flat", "model", "string_code"])
def test_an_engine_4xx_is_a_refusal_of_that_status_with_a_bad_request_body(status: int, shape: str) -> None:
    info = {"message": "bad 'foo'", "type": "BadRequestError", "param": "foo", "code": status}
    error = {
        "nested": {"error": info},
        "flat": info,
        "model": _EngineErrorModel({"error": info}),
        "string_code": {"error": {**info, "code": str(status)}},
    }[shape]
    exc = errors.engine_error(error)
    assert type(exc) is errors.engine_refusal_class(status)
    assert isinstance(exc, errors.EngineRefusal) and isinstance(exc, BadRequest)
    assert exc.status_code == status
    assert exc.body() == {
        "error": {"message": "bad 'foo'", "type": "invalid_request_error", "param": "foo", "code": "invalid_value"}
    }
    assert exc.response().status_code == status
    # The status is the class's, never set on the instance, and no shared class changed.
    assert "status_code" not in vars(exc)
    assert (BadRequest.status_code, errors.EngineRefusal.status_code) == (400, 400)
    assert BadRequest("x").status_code == 400


@pytest.mark.parametrize(
    "error",
    [
        {"error": {"message": "engine crashed", "code": 500}},
        {"error": {"message": "engine crashed", "code": 503}},
        {"error": {"message": "engine crashed", "code": "InternalServerError"}},
        {"error": {"message": "engine crashed"}},
        {"error": {"message": "engine crashed", "code": 302}},
    ],
)
def test_any_other_engine_error_is_a_500_engine_error(error: dict) -> None:
    exc = errors.engine_error(error)
    assert type(exc) is EngineError
    assert exc.status_code == 500
    assert exc.body() == {
        "error": {"message": "engine crashed", "type": "server_error", "param": None, "code": "engine_error"}
    }


def test_an_engine_error_without_a_message_gets_the_generic_one() -> None:
    assert errors.engine_error({"error": {"code": 500}}).message == "The model failed to process the request."
    assert errors.engine_error({"error": {"code": 404, "message": ""}}).message == (
        "The model failed to process the request."
    )


def test_engine_refusal_classes_are_made_once_per_4xx_status() -> None:
    assert errors.engine_refusal_class(404) is errors.engine_refusal_class(404)
    assert errors.engine_refusal_class(400) is errors.EngineRefusal
    assert errors.engine_refusal_class(404) is not errors.engine_refusal_class(422)
    for status in (399, 500, 503):
        with pytest.raises(ValueError):
            errors.engine_refusal_class(status)


def test_an_engine_refusal_survives_pickling() -> None:
    import pickle

    exc = errors.engine_error({"error": {"message": "no such adapter", "param": "model", "code": 404}})
    exc.headers = {"x-request-id": "r1"}
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert (copy.status_code, copy.body(), copy.headers) == (404, exc.body(), {"x-request-id": "r1"})


# -- the internal 500 ------------------------------------------------------------------------------------


INTERNAL_500 = {
    "error": {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
}


def test_the_internal_500_is_rendered_by_one_function() -> None:
    response = errors.internal_error_response()
    assert response.status_code == 500
    assert json.loads(response.body) == INTERNAL_500


def test_the_middleware_fallback_renders_the_internal_500(client: TestClient) -> None:
    response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == INTERNAL_500


def test_the_last_resort_handler_renders_the_same_internal_500() -> None:
    """Without the middleware in front, the app's own Exception handler answers."""
    bare = FastAPI()
    errors.install_error_handlers(bare)

    @bare.get("/boom")
    async def boom() -> dict:
        raise RuntimeError(SECRET)

    response = TestClient(bare, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 500
    assert response.json() == INTERNAL_500


# -- rate-limit headers: one source per app -------------------------------------------------------------


def _source(name: str, calls: list):
    async def source(authorization: str | None, status: int) -> dict[str, str]:
        calls.append((authorization, status))
        return {"x-ratelimit-limit-requests": name, "x-ratelimit-remaining-requests": "9"}

    return source


def test_each_app_keeps_its_own_rate_limit_source() -> None:
    from tokenmart.deployments.ingress import RequestContextMiddleware, attach_rate_limits

    first_calls: list = []
    second_calls: list = []
    first, second, bare = _build_app(), _build_app(), _build_app()
    attach_rate_limits(first, _source("first", first_calls))
    attach_rate_limits(second, _source("second", second_calls))

    one = TestClient(first, raise_server_exceptions=False).get("/v1/nope", headers={"authorization": "Bearer k1"})
    two = TestClient(second, raise_server_exceptions=False).get("/raise/credit")
    none = TestClient(bare, raise_server_exceptions=False).get("/request-id")

    assert one.headers["x-ratelimit-limit-requests"] == "first"
    assert two.headers["x-ratelimit-limit-requests"] == "second"
    assert "x-ratelimit-limit-requests" not in none.headers
    assert first_calls == [("Bearer k1", 404)]
    assert second_calls == [(None, 402)]
    assert "rate_limits" not in vars(RequestContextMiddleware)


def test_rate_limit_headers_already_on_a_response_are_not_replaced() -> None:
    from tokenmart.deployments.ingress import attach_rate_limits

    app = _build_app()

    @app.get("/admitted")
    async def admitted() -> JSONResponse:
        return JSONResponse({}, headers={"x-ratelimit-limit-requests": "admission"})

    calls: list = []
    attach_rate_limits(app, _source("source", calls))
    response = TestClient(app).get("/admitted")
    assert response.headers.get_list("x-ratelimit-limit-requests") == ["admission"]
    assert calls == []


class _NoEvictionRedis:
    """What the replica's start reads of Redis: its memory policy."""

    async def config_get(self, pattern: str) -> dict[str, str]:
        return {"maxmemory-policy": "noeviction", "maxmemory": "1gb"}


def test_the_ingress_attaches_its_source_to_its_own_app() -> None:
    """Ray Serve calls `__serve_build_asgi_app__` in the replica after the constructor."""
    from types import SimpleNamespace

    from tokenmart.deployments.ingress import MarketplaceIngress, rate_limit_source

    apps = [_build_app(), _build_app()]
    replicas = [
        SimpleNamespace(
            app=app,
            _rate_limit_headers=_source(str(i), []),
            _record_door_refusal=lambda *refusal: None,
            gateway=SimpleNamespace(refusals=object(), peek=object(), key_label=object()),
            redis=_NoEvictionRedis(),
            _check_layout=lambda: asyncio.sleep(0),
        )
        for i, app in enumerate(apps)
    ]
    for replica in replicas:
        assert asyncio.run(MarketplaceIngress.__serve_build_asgi_app__(replica)) is replica.app
    for app, replica in zip(apps, replicas, strict=True):
        assert rate_limit_source({"app": app}) is replica._rate_limit_headers
        assert app.state.door_hook is replica._record_door_refusal
        assert app.state.refusals is replica.gateway.refusals
        assert app.state.listing_peek is replica.gateway.peek
        assert app.state.key_label is replica.gateway.key_label
    assert rate_limit_source({}) is None
