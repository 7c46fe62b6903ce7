"""The ingress's door: inference requests over a replica's limit get a fast 503, others pass."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tokenmart.deployments.catalog import Listing
from tokenmart.deployments.errors import ServiceUnavailable
from tokenmart.deployments.ingress import PAID_PATHS, create_fastapi_app
from tokenmart.deployments.shedding import EngineLoad, deployment_capacity


def _app(limit: int):
    """An ingress app whose chat route waits until released; it records the bodies it read."""
    app = create_fastapi_app(max_paid_requests=limit)
    release = asyncio.Event()
    started = asyncio.Event()
    served: list[str] = []
    shed: list[float] = []
    app.state.shed_hook = shed.append

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
            assert len(shed) == 1 and shed[0] >= 0

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


def test_engine_load_refuses_only_at_capacity_and_frees_on_settle():
    load = EngineLoad({"m": 2})
    load.check("m")
    load.admitted("m")
    load.admitted("m")
    with pytest.raises(ServiceUnavailable) as refusal:
        load.check("m")
    assert refusal.value.body()["error"]["code"] == "model_overloaded"
    assert refusal.value.headers["retry-after"] == "1"
    load.settled("m")
    load.check("m")
    assert load.admitted_to("m") == 1
    load.check("unknown")  # a deployment it was not told of is never refused here
