"""The gateway's serving choices without a cluster: which listings may serve a request (its
`model`, `models` or the listing's fallbacks), which failures pass it on, the tier's engine
priority and fair-queue turn, and the embedding listings' own rules."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokenmart.deployments.billing import Admission
from tokenmart.deployments.catalog import Catalog, parse_catalog
from tokenmart.deployments.errors import APIError, BadRequest, ModelNotFound, ServiceUnavailable
from tokenmart.deployments.gateway import (
    Gateway,
    _checked_candidates,
    _Details,
    _passes_on,
    _release_turn,
    fair_share_concurrency,
)
from tokenmart.deployments.validation import ChatRequest


def listing(model_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "owner": "o",
        "source": f"fake/{model_id}",
        "context_length": 4096,
        "default_max_tokens": 64,
        "pricing": {"prompt_usd_per_1m": "1", "completion_usd_per_1m": "2"},
        "accelerator": {"kind": "cpu"},
        **fields,
    }


CATALOG = Catalog.model_validate(
    {
        "listings": [
            listing("a", fallbacks=["b", "c"], fair_share={"concurrency": 2, "deadline_s": 0.05}),
            listing("b", context_length=128, default_max_tokens=16),
            listing("c", engine={"extra": {"scheduling_policy": "priority"}}),
            listing("e", task="embed", default_max_tokens=1),
        ],
        "tiers": {"free": 1, "standard": 2, "premium": 4},
        "default_tier": "standard",
    }
)


class Handle:
    def options(self, **_: Any) -> Handle:
        return self


@pytest.fixture
def gateway() -> Gateway:
    return Gateway(CATALOG, {offer.id: Handle() for offer in CATALOG.listings}, meter=None)  # type: ignore[arg-type]


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_candidates_are_the_model_then_its_fallbacks_or_the_requests_own_models(gateway):
    assert [c.id for c in gateway.candidates(chat(model="a"))] == ["a", "b", "c"]
    assert [c.id for c in gateway.candidates(chat(model="a", models=["c"]))] == ["a", "c"]
    assert [c.id for c in gateway.candidates(chat(model="b"))] == ["b"]
    body = chat(models=["c", "a"])  # no model: the first of `models`
    assert [c.id for c in gateway.candidates(body)] == ["c", "a"] and body.model == "c"
    with pytest.raises(ModelNotFound) as unknown:
        gateway.candidates(chat(model="a", models=["nope"]))
    assert unknown.value.param == "models"
    with pytest.raises(BadRequest) as too_many:
        gateway.candidates(chat(model="a", models=["b"] * 6))
    assert too_many.value.param == "models"


def test_a_fallback_that_cannot_take_the_request_is_left_out_but_the_models_own_refusal_stands(gateway):
    # max_tokens 1000 fits a's context (4096) but not b's (128): b is left out, c stays.
    bodies = _checked_candidates(chat(model="a", max_tokens=1000), gateway.candidates(chat(model="a")), chat=True)
    assert list(bodies) == ["a", "c"]
    assert [body.model for body in bodies.values()] == ["a", "c"]
    # Each candidate's own default output budget when the request sets none.
    defaults = _checked_candidates(chat(model="a"), gateway.candidates(chat(model="a")), chat=True)
    assert [body.max_tokens for body in defaults.values()] == [64, 16, 64]
    with pytest.raises(BadRequest):
        _checked_candidates(chat(model="b", max_tokens=1000), [CATALOG.get("b")], chat=True)
    with pytest.raises(BadRequest) as embed:
        _checked_candidates(chat(model="e"), [CATALOG.get("e")], chat=True)
    assert embed.value.message == "The model 'e' is an embedding model; send it to /v1/embeddings."


@pytest.mark.parametrize(
    ("error", "passes", "code"),
    [
        (ServiceUnavailable("busy", code="model_overloaded"), True, "model_overloaded"),
        (ServiceUnavailable("gone"), True, "service_unavailable"),
        (BadRequest("This model's maximum context length is 64 tokens. However, ..."), True, "context_length_exceeded"),
        (BadRequest("'temperature' must be at most 2."), False, "invalid_value"),
        (APIError("engine failed"), False, "internal_error"),
    ],
)
def test_only_overload_unavailability_and_a_too_long_prompt_pass_a_request_on(error, passes, code):
    assert _passes_on(error) is passes
    assert error.code == code


def admission(model_id: str, tier: str | None) -> Admission:
    found = CATALOG.get(model_id)
    made = Admission("bill", "org_1", "key_1", found, candidates=[found], tier=tier)
    made.details = _Details(started=0.0, fallback_id="x", stream=False, user="")
    return made


def test_the_engine_priority_follows_the_tier_only_where_the_engine_schedules_by_priority(gateway):
    body = chat(model="c", priority=7)  # the client's own priority is never passed on
    asyncio.run(gateway._wait_turn(admission("c", "premium"), body))
    assert body.priority == -4
    asyncio.run(gateway._wait_turn(admission("c", None), body))
    assert body.priority == -2  # the default tier, standard
    body = chat(model="b", priority=7)
    asyncio.run(gateway._wait_turn(admission("b", "premium"), body))
    assert body.priority == 0  # first come, first served: vLLM refuses any other priority


def test_a_fair_queued_listing_gives_turns_and_times_out_past_its_deadline(gateway):
    assert fair_share_concurrency(CATALOG.get("a")) == 2
    unset = parse_catalog({"listings": [listing("z", fair_share={})]}).get("z")
    assert fair_share_concurrency(unset) == 32  # max_ongoing_requests (4 x target 8) x min_replicas 1

    async def scenario() -> None:
        holders = [admission("a", "free") for _ in range(2)]
        for held in holders:
            await gateway._wait_turn(held, chat(model="a"))
        assert gateway.queues["a"].in_use == 2
        from tokenmart.deployments.fair_queue import QueueTimeout

        with pytest.raises(QueueTimeout):
            await gateway._wait_turn(admission("a", "premium"), chat(model="a"))  # 0.05 s deadline
        for held in holders:
            _release_turn(held)
            _release_turn(held)  # once only
        assert gateway.queues["a"].in_use == 0

    asyncio.run(scenario())


def test_the_door_leaves_a_fair_queued_listings_waiting_room_to_its_queue(gateway):
    from tokenmart.deployments.shedding import FAIR_SHARE_MARGIN, deployment_capacity

    fair = CATALOG.get("a")  # fair_share: concurrency 2, max_waiting 256 (the default)
    assert deployment_capacity(fair) == 2 + 256 + FAIR_SHARE_MARGIN
    assert gateway.queues["a"].max_waiting == 256
    plain = CATALOG.get("b")  # Serve's own queue: every replica busy plus max_queued_requests
    assert deployment_capacity(plain) == 1 * plain.autoscaling.replica_concurrency + 64
