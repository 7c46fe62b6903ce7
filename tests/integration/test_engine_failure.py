"""An engine replica that dies: the client gets a clean error, and billing stays exact.

The fake engine's replica actor is killed with `ray.kill` while it streams, as a node loss or
an OOM kill would end it; Serve then starts a replacement, which the test waits for so later
tests see a healthy marketplace.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray

from ..helpers import sse_data

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "tell me about ray serve [[fake-tokens=400]]"}]  # 6 words + 3
PROMPT_TOKENS = 9
MODEL = "beta-chat"
RECOVERY_TIMEOUT_S = 120.0


def engine_replicas() -> list:
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::") and f"#fake:{MODEL}#" in actor["name"]
    ]
    assert names, "no replica of the fake engine found"
    return [ray.get_actor(name, namespace="serve") for name in names]


def kill_engine() -> None:
    for replica in engine_replicas():
        ray.kill(replica, no_restart=True)


def wait_for_recovery(marketplace, key: str) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        response = marketplace.chat(key, model=MODEL, max_tokens=1)
        if response.status_code == 200:
            return
        time.sleep(1)
    pytest.fail(f"{MODEL} did not come back within {RECOVERY_TIMEOUT_S:.0f} s")


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error_and_bills_what_was_sent(marketplace):
    created = marketplace.create_key(name="engine-dies", credit_usd=1)
    key = created["key"]
    payload = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 400}

    events: list[str] = []
    killer = threading.Timer(0.0, kill_engine)
    with (
        httpx.Client(base_url=marketplace.base_url, timeout=60.0) as client,
        client.stream("POST", "/v1/chat/completions", json=payload, headers=marketplace.auth(key)) as response,
    ):
        assert response.status_code == 200
        for event in sse_data(response):
            events.append(event)
            if len(events) == 5:
                killer.start()  # 395 tokens (8 s) still to come
    killer.join()

    # The stream ended with an error event and [DONE], not a cut connection.
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == ("engine_unavailable", "service_unavailable")
    assert set(error) == {"message", "type", "param", "code"}
    chunks = [json.loads(event) for event in events[:-2]]
    assert all(chunk["choices"] for chunk in chunks)
    delivered = len(chunks)
    assert 5 <= delivered < 400

    # Billed for the prompt and exactly the tokens the client received; nothing left on hold.
    cost = marketplace.cost_micros(MODEL, PROMPT_TOKENS, delivered)
    info = marketplace.key_info(key)
    assert round(info["credit_usd"] * 1_000_000) == 1_000_000 - cost
    assert info["on_hold_usd"] == 0.0
    total = marketplace.usage(key)["total"]
    assert (total["requests"], total["prompt_tokens"], total["completion_tokens"]) == (1, PROMPT_TOKENS, delivered)

    wait_for_recovery(marketplace, key)
