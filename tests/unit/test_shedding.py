"""The ingress's door: inference requests over a replica's limit get a fast 503, others pass."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tokenmart.deployments.auth import generate_key, hash_key, parse_api_key
from tokenmart.deployments.catalog import Listing
from tokenmart.deployments.errors import RateLimited, ServiceUnavailable
from tokenmart.deployments.ingress import PAID_PATHS, create_fastapi_app
from tokenmart.deployments.shedding import EngineLoad, ListingPeek, RefusalMemo, deployment_capacity


def _app(limit: int):
    """An ingress app whose chat route waits until released; it records the bodies it read."""
    app = create_fastapi_app(max_paid_requests=limit)
    release = asyncio.Event()
    started = asyncio.Event()
    served: list[str] = []
    shed: list[tuple] = []
    app.state.door_hook = lambda *refusal: shed.append(refusal)

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        served.append(body["tag"])
        started.set()
        await release.wait()
        return {"tag": body["tag"]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": []}

    return app, release, started, served, shed


def test_a_request_over_the_limit_gets_a_fast_openai_503_without_its_body_being_read():
    async def scenario() -> None:
        app, release, started, served, shed = _app(limit=1)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = asyncio.create_task(client.post("/v1/chat/completions", json={"tag": "first"}))
            await asyncio.wait_for(started.wait(), 5)

            refused = await client.post("/v1/chat/completions", json={"tag": "second"})
            models = await client.get("/v1/models")  # not an inference route: never refused

            assert refused.status_code == 503
            assert refused.json() == {
                "error": {
                    "message": "The marketplace is at capacity right now; retry shortly.",
                    "type": "service_unavailable",
                    "param": None,
                    "code": "server_overloaded",
                }
            }
            assert refused.headers["retry-after"] == "1"
            assert len(refused.headers["x-request-id"]) == 32  # the id it was given, as on every response
            assert models.status_code == 200
            assert served == ["first"]  # the refused body never reached the route
            ((status, code, key_id, seconds, model),) = shed
            assert (status, code, key_id, model) == (503, "server_overloaded", None, None) and seconds >= 0

            release.set()
            assert (await first).json() == {"tag": "first"}
            again = await client.post("/v1/chat/completions", json={"tag": "third"})
            assert again.status_code == 200  # the place is free once the first one ended
            assert served == ["first", "third"]

    asyncio.run(scenario())


def test_every_public_inference_path_is_guarded():
    assert set(PAID_PATHS) == {
        "/v1/chat/completions",
        "/api/v1/chat/completions",
        "/v1/inference/chat/completions",
        "/v1/completions",
        "/api/v1/completions",
        "/v1/inference/completions",
        "/v1/responses",
        "/api/v1/responses",
        "/v1/inference/responses",
        "/v1/embeddings",
        "/api/v1/embeddings",
        "/v1/inference/embeddings",
    }


def _listing(**autoscaling: object) -> Listing:
    return Listing.model_validate(
        {
            "id": "m",
            "owner": "o",
            "source": "fake/m",
            "context_length": 4096,
            "pricing": {"prompt_usd_per_1m": "1", "completion_usd_per_1m": "1"},
            "accelerator": {"kind": "cpu"},
            "autoscaling": autoscaling,
        }
    )


def test_a_deployments_capacity_is_every_replica_busy_plus_its_queue():
    assert deployment_capacity(_listing(max_replicas=3, max_ongoing_requests=4, max_queued_requests=5)) == 17
    # The default concurrency is 4 x the target, at least 16.
    assert deployment_capacity(_listing(max_replicas=1, target_ongoing_requests=2, max_queued_requests=64)) == 80


def _peek(load: EngineLoad, read: list[str]) -> ListingPeek:
    """A peek over deployment "m" (listings "m" and its adapter "m-lora") that notes each body it sees."""

    class Noting(ListingPeek):
        def refusal(self, body: bytes):
            read.append(body.decode(errors="replace"))
            return super().refusal(body)

    return Noting(load, {"m": "m", "m-lora": "m", "x": "x"}.get)


def test_the_door_refuses_a_request_for_a_full_deployment_by_its_model_alone():
    """While "m" is full the door reads each paid body once, decodes only its `model`, and
    refuses those for "m" (an adapter's too) with the route's own 503; others, bodies it
    cannot read a known model from, and requests without a well-formed key (the route's 401)
    reach the route unchanged."""

    async def scenario() -> None:
        app, release, _, served, shed = _app(limit=10)
        release.set()
        load, read = EngineLoad({"m": 1, "x": 1}), []
        app.state.listing_peek = _peek(load, read)
        key = generate_key()
        # The ingress's label: the key id of a secret its replica has located (no Redis call).
        app.state.key_label = {hash_key(key): "key_located"}.get
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=_auth(key)) as client:
            # Nothing full: the door does not read the body.
            assert (await client.post("/v1/chat/completions", json={"tag": "free", "model": "m"})).status_code == 200
            assert read == []

            load.take("m")
            refused = await client.post("/v1/chat/completions", json={"tag": "full", "model": "m-lora"})
            passed = await client.post("/v1/chat/completions", json={"tag": "other", "model": "x"})
            odd = [
                await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
                for content in (
                    b'["m"]',
                    b"[" * 100_000,  # nested past the JSON decoder's recursion limit
                    b'{"model": 7, "tag": "seven"}',
                    b'{"model": "nope", "tag": "unknown"}',
                )
            ]
            keyless = [
                await client.post("/v1/chat/completions", json={"tag": tag, "model": "m"}, headers=headers)
                for tag, headers in (("no key", {"authorization": ""}), ("bad key", _auth("sk-tm-not-a-key")))
            ]

            assert refused.status_code == 503
            assert refused.json()["error"] == {
                "message": "The model 'm' is at capacity right now; retry shortly.",
                "type": "service_unavailable",
                "param": None,
                "code": "model_overloaded",
            }
            assert refused.headers["retry-after"] == "1"
            assert passed.status_code == 200 and passed.json() == {"tag": "other"}
            assert [response.status_code for response in odd] == [400, 400, 200, 200]  # the route's own answers
            assert [response.status_code for response in keyless] == [200, 200]  # the test route has no 401
            assert served == ["free", "other", "seven", "unknown", "no key", "bad key"]
            ((status, code, key_id, _, model),) = shed
            # The door asks Redis for nothing: the key's label is the one its replica already located.
            assert (status, code, key_id, model) == (503, "model_overloaded", "key_located", "m-lora")
            assert len(read) == 6  # every paid body with a key while "m" was full, once each

            load.settled("m")
            assert (await client.post("/v1/chat/completions", json={"tag": "again", "model": "m"})).status_code == 200
            assert len(read) == 6

    asyncio.run(scenario())


def test_a_body_over_the_limit_read_by_the_door_gets_the_413_envelope():
    async def scenario() -> None:
        app = create_fastapi_app(max_body_bytes=1024)
        load = EngineLoad({"m": 1})
        load.take("m")
        app.state.listing_peek = _peek(load, [])

        async def chunks():
            for _ in range(4):
                yield b'{"pad": "' + b"x" * 500 + b'"}'

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post(
                "/v1/chat/completions", content=chunks(), headers=_auth(generate_key())
            )  # no content-length
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert response.json()["error"]["message"] == "The request body is larger than 1024 bytes."

    asyncio.run(scenario())


def test_engine_load_refuses_only_at_capacity_and_frees_on_settle():
    load = EngineLoad({"m": 2})
    load.take("m")
    load.take("m")
    with pytest.raises(ServiceUnavailable) as refusal:
        load.take("m")
    assert refusal.value.body()["error"]["code"] == "model_overloaded"
    assert refusal.value.headers["retry-after"] == "1"
    assert load.admitted_to("m") == 2  # a refusal takes no slot
    load.settled("m")
    assert not load.any_full()
    load.take("m")
    assert load.admitted_to("m") == 2
    assert load.any_full()
    load.take("unknown")  # a deployment it was not told of is never refused here
    load.take("unknown")
    assert load.admitted_to("unknown") == 2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _rpm_refusal(retry_ms: int, **overrides: str) -> RateLimited:
    headers = {
        "x-ratelimit-limit-requests": "1",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "59.9s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "990",
        "x-ratelimit-reset-tokens": "600ms",
        "retry-after": str(-(-retry_ms // 1000)),
        "retry-after-ms": str(retry_ms),
        **overrides,
    }
    return RateLimited("Rate limit reached: 1 requests per minute.", type="requests", headers=headers)


def test_a_requests_per_minute_429_is_repeated_with_the_time_left_until_it_expires():
    clock = Clock()
    memo = RefusalMemo(clock)
    memo.remember("hash-a", _rpm_refusal(59_900))

    clock.now += 20.0
    again = memo.refusal("hash-a")
    assert again is not None and again.status_code == 429
    assert again.body()["error"] == {
        "message": "Rate limit reached: 1 requests per minute. Retry after 39900 ms.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert again.headers["retry-after-ms"] == "39900"
    assert again.headers["retry-after"] == "40"
    assert again.headers["x-ratelimit-reset-requests"] == "39.9s"
    assert again.headers["x-ratelimit-remaining-requests"] == "0"
    assert again.headers["x-ratelimit-limit-tokens"] == "1000"  # the rest as the refusal had them
    assert memo.refusal("hash-b") is None  # another key

    clock.now += 40.0
    assert memo.refusal("hash-a") is None  # the bucket has a request again: Redis decides


def test_a_remembered_refusal_keeps_the_key_id_it_was_given():
    """The secret's hash is the memo's key; the key id (known once the key was located) is only
    the metrics' label, and a refusal remembered without one has none."""
    clock = Clock()
    memo = RefusalMemo(clock)
    memo.remember("hash-a", _rpm_refusal(1_000), key_id="key_a")
    memo.remember("hash-b", _rpm_refusal(1_000))
    assert (memo.key_of("hash-a"), memo.key_of("hash-b"), memo.key_of("hash-c")) == ("key_a", None, None)
    assert len(memo) == 2
    clock.now += 1.0
    assert memo.refusal("hash-a") is None and memo.key_of("hash-a") is None  # forgotten once it may retry
    assert len(memo) == 1


def test_only_the_requests_bucket_is_remembered():
    memo = RefusalMemo(Clock())
    tokens = RateLimited("tokens", type="tokens", headers={"retry-after-ms": "5000"})
    concurrency = RateLimited("busy", type="requests", code="concurrency_limit_exceeded",
                              headers={"retry-after-ms": "5000"})  # fmt: skip
    for key, error in (("t", tokens), ("c", concurrency), ("z", _rpm_refusal(0))):
        memo.remember(key, error)
        assert memo.refusal(key) is None


def test_the_door_answers_a_remembered_key_before_reading_its_body():
    """Only the key that was refused, and only until it may retry; other keys, and a malformed
    key (the route's 401), go through."""

    async def scenario() -> None:
        app, release, _, served, shed = _app(limit=10)
        release.set()
        memo = RefusalMemo()
        app.state.refusals = memo
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            key = generate_key()
            key_hash = parse_api_key(f"Bearer {key}")
            memo.remember(key_hash, _rpm_refusal(30_000), key_id="key_0123456789abcdef0123")

            refused = await client.post("/v1/chat/completions", json={"tag": "limited"}, headers=_auth(key))
            other = await client.post("/v1/chat/completions", json={"tag": "other"}, headers=_auth(generate_key()))

            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            assert 0 < int(refused.headers["retry-after-ms"]) <= 30_000
            assert other.status_code == 200
            assert served == ["other"]  # the limited key's body never reached the route
            ((status, code, key_id, _, model),) = shed
            assert (status, code, model) == (429, "rate_limit_exceeded", None)
            assert key_id == "key_0123456789abcdef0123"  # the id the refusal was remembered with

    asyncio.run(scenario())


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
