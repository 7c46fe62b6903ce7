"""A client that hangs up mid-stream pays for what the engine produced, exactly once."""

from __future__ import annotations

import json

import httpx
import pytest
from ray import serve

from ..helpers import sse_data

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "tell me about ray serve"}]  # 8 prompt tokens
# 40 s of tokens at the fixture's 0.02 s per token: a hang-up that did not stop the engine
# would leave it generating long after the settlement timeout.
LONG_STREAM_TOKENS = 2000
LONG_MESSAGES = [{"role": "user", "content": f"tell me about ray [[fake-tokens={LONG_STREAM_TOKENS}]]"}]  # 8 tokens
SETTLE_TIMEOUT_S = 15.0


def engine_streams(model: str) -> dict[str, int]:
    """The fake engine's stream counters: running now, cancelled by their caller, run to the end."""
    handle = serve.get_deployment_handle(f"fake:{model}", app_name="tokenmart")
    return handle.stream_stats.remote().result(timeout_s=10)


def test_client_disconnect_mid_stream_is_billed_once_as_aborted(marketplace, redis_client):
    created = marketplace.create_key(name="hangs-up", credit_usd=1)
    key = created["key"]
    ledger = f"{{acct:{created['org_id']}}}:ledger"
    payload = {"model": "beta-chat", "messages": LONG_MESSAGES, "stream": True, "max_tokens": LONG_STREAM_TOKENS}
    before = engine_streams("beta-chat")

    chunks: list[dict] = []
    with (
        httpx.Client(base_url=marketplace.base_url, timeout=30.0) as client,
        client.stream("POST", "/v1/chat/completions", json=payload, headers=marketplace.auth(key)) as response,
    ):
        assert response.status_code == 200
        for event in sse_data(response):
            chunks.append(json.loads(event))
            if len(chunks) == 3:
                break
    # Leaving both blocks closed the connection with 1997 of 2000 tokens still to come.
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [" w0", " w1", " w2"]
    billing_id = chunks[0]["id"].removeprefix("chatcmpl-")

    events = marketplace.wait_until(lambda: redis_client.xrange(ledger), SETTLE_TIMEOUT_S, what="the settlement")
    assert len(events) == 1, events
    event = events[0][1]
    assert (event["request_id"], event["model"], event["status"]) == (billing_id, "beta-chat", "aborted")
    # The engine's stream was cancelled, not run to its end.
    stats = marketplace.wait_until(
        lambda: (s := engine_streams("beta-chat"))["active"] == before["active"] and s,
        SETTLE_TIMEOUT_S,
        what="the engine stream to stop",
    )
    assert (stats["cancelled"], stats["finished"]) == (before["cancelled"] + 1, before["finished"])
    # Billed: what the engine had produced when it was stopped (the last usage it reported),
    # which is at least what the client read and, as it was stopped, less than all of it.
    completion_tokens = int(event["completion_tokens"])
    assert 3 <= completion_tokens < LONG_STREAM_TOKENS, event
    assert int(event["prompt_tokens"]) == 8
    cost = marketplace.cost_micros("beta-chat", 8, completion_tokens)
    assert int(event["cost_micros"]) == cost

    info = marketplace.key_info(key)
    assert round(info["credit_usd"] * 1_000_000) == 1_000_000 - cost
    assert info["on_hold_usd"] == 0.0
    total = marketplace.usage(key)["total"]
    assert (total["requests"], total["completion_tokens"], round(total["cost_usd"] * 1_000_000)) == (
        1,
        completion_tokens,
        cost,
    )

    # A later request settles after the aborted one; the aborted one is still there once.
    follow_up = marketplace.chat(key, model="beta-chat", messages=MESSAGES, max_tokens=1)
    assert follow_up.status_code == 200
    request_ids = [fields["request_id"] for _, fields in redis_client.xrange(ledger)]
    assert len(request_ids) == 2
    assert request_ids.count(billing_id) == 1
    follow_cost = round(follow_up.json()["usage"]["cost"] * 1_000_000)
    assert round(marketplace.key_info(key)["credit_usd"] * 1_000_000) == 1_000_000 - cost - follow_cost


def test_a_stream_read_to_the_end_is_settled_as_completed(marketplace, redis_client):
    created = marketplace.create_key(name="reads-it-all", credit_usd=1)
    ledger = f"{{acct:{created['org_id']}}}:ledger"
    payload = {"model": "beta-chat", "messages": MESSAGES, "stream": True, "max_tokens": 4}
    with httpx.Client(base_url=marketplace.base_url, timeout=30.0) as client:
        response = client.post("/v1/chat/completions", json=payload, headers=marketplace.auth(created["key"]))
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")

    events = marketplace.wait_until(lambda: redis_client.xrange(ledger), SETTLE_TIMEOUT_S, what="the settlement")
    assert [(e["model"], e["status"], e["prompt_tokens"], e["completion_tokens"]) for _, e in events] == [
        ("beta-chat", "completed", "8", "4")
    ]
