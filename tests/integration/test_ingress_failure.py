"""An ingress replica that dies mid-stream: its engine request stops, and its hold lapses.

The policy (README, "Billing"): an admission whose ingress replica dies before settling is
never charged, since no process is left that knows how many tokens reached the client. Its
concurrency slot and hold stay taken until its 15-minute lease lapses; the key's next
admission after that frees both, with the credit unchanged. Meanwhile the engine is not left
generating for nobody: Ray ends a streaming call whose caller died, and the engine replica
sees its stream cancelled.

Both ingress replicas are killed with `ray.kill`, as a node loss or an OOM kill would end
them; Serve starts replacements, which the test waits for so later tests see a healthy
marketplace.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray
from ray import serve

from ..helpers import sse_data

pytestmark = pytest.mark.integration

MODEL = "beta-chat"
MESSAGES = [{"role": "user", "content": "tell me about ray serve [[fake-tokens=400]]"}]  # 8 s of tokens
ABORT_TIMEOUT_S = 30.0
RECOVERY_TIMEOUT_S = 120.0


def ingress_replicas() -> list:
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::") and "#MarketplaceIngress#" in actor["name"]
    ]
    assert names, "no ingress replica found"
    return [ray.get_actor(name, namespace="serve") for name in names]


def engine_streams() -> dict[str, int]:
    handle = serve.get_deployment_handle(f"fake:{MODEL}", app_name="tokenmart")
    return handle.stream_stats.remote().result(timeout_s=10)


def test_an_ingress_dying_mid_stream_stops_the_engine_and_charges_nothing(marketplace, redis_client):
    created = marketplace.create_key(name="ingress-dies", credit_usd=1, max_concurrency=1)
    key, key_id, org_id = created["key"], created["id"], created["org_id"]
    before = engine_streams()
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 400}

    received: list[str] = []
    with (
        pytest.raises(httpx.HTTPError),
        httpx.Client(base_url=marketplace.base_url, timeout=30.0) as client,
        client.stream("POST", "/v1/chat/completions", json=payload, headers=marketplace.auth(key)) as response,
    ):
        assert response.status_code == 200
        for event in sse_data(response):
            received.append(event)
            if len(received) == 5:
                assert engine_streams()["active"] == before["active"] + 1
                for replica in ingress_replicas():
                    ray.kill(replica, no_restart=True)
    # The connection broke without [DONE]: the client knows the answer is incomplete.
    assert "[DONE]" not in received
    assert all(json.loads(event)["choices"] for event in received)

    # The orphaned engine request was cancelled, well before its 8 s of tokens ran out.
    killed = time.monotonic()
    stats = marketplace.wait_until(
        lambda: (s := engine_streams())["active"] == before["active"] and s, ABORT_TIMEOUT_S, what="the engine abort"
    )
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["finished"] == before["finished"]
    assert time.monotonic() - killed < 6  # the watcher polls each second; the stream had 7+ s to go

    marketplace.wait_until_healthy()
    # Nothing was settled: no charge, no ledger event; the hold and the slot are still taken.
    ledger = f"{{acct:{org_id}}}:ledger"
    assert redis_client.xlen(ledger) == 0
    info = marketplace.key_info(key)
    assert info["on_hold_usd"] > 0  # the worst case of the request, set aside from the organization's credit
    assert round((info["credit_usd"] + info["on_hold_usd"]) * 1_000_000) == 1_000_000
    org = redis_client.hgetall(f"{{acct:{org_id}}}:org")
    assert int(org["hold_micros"]) == round(info["on_hold_usd"] * 1_000_000)  # the key's hold is its organization's
    assert org["spent_micros"] == "0"
    assert marketplace.chat(key, model=MODEL, max_tokens=1).status_code == 429  # max_concurrency=1, still held

    # The lease lapses (here: moved to the past instead of waiting 15 minutes).
    inflight = f"{{acct:{org_id}}}:inflight:{key_id}"
    (orphan,) = redis_client.zrange(inflight, 0, -1)
    redis_client.zadd(f"{{acct:{org_id}}}:leases", {f"{key_id}|{orphan}": 0})  # the organization's lease set
    follow_up = marketplace.chat(key, model=MODEL, max_tokens=1)
    assert follow_up.status_code == 200, follow_up.text
    follow_cost = round(follow_up.json()["usage"]["cost"] * 1_000_000)
    info = marketplace.key_info(key)
    assert info["on_hold_usd"] == 0.0
    assert round(info["credit_usd"] * 1_000_000) == 1_000_000 - follow_cost  # only the follow-up is charged
    assert round(info["spent_usd"] * 1_000_000) == follow_cost
    org = redis_client.hgetall(f"{{acct:{org_id}}}:org")
    assert (org["hold_micros"], org["spent_micros"]) == ("0", str(follow_cost))
    events = [fields for _, fields in redis_client.xrange(ledger)]
    assert [e["request_id"] for e in events] == [follow_up.json()["id"].removeprefix("chatcmpl-")]
