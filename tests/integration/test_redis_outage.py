"""Failure policy: with the billing store down nothing is served unmetered, and it recovers."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..helpers import sse_data

pytestmark = pytest.mark.integration

RECOVERY_TIMEOUT_S = 30.0


def assert_billing_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "billing_unavailable"
    assert int(response.headers["retry-after"]) > 0
    assert len(response.headers.get_list("x-request-id")) == 1


def test_requests_get_503_while_redis_is_down_and_are_served_again_once_it_is_back(marketplace, redis_server):
    key = marketplace.create_key(name="before-outage")["key"]
    assert marketplace.chat(key, max_tokens=1).status_code == 200

    redis_server.kill()
    try:
        for _ in range(4):  # a few, so both ingress replicas are asked
            assert_billing_unavailable(marketplace.chat(key, max_tokens=1))
        assert_billing_unavailable(marketplace.http.get("/v1/key", headers=marketplace.auth(key)))
        assert_billing_unavailable(marketplace.http.get("/healthz"))
        admin = marketplace.http.post(
            "/admin/v1/keys", json={"name": "during-outage"}, headers=marketplace.admin_headers
        )
        assert_billing_unavailable(admin)
    finally:
        redis_server.start()

    marketplace.wait_until(
        lambda: marketplace.http.get("/healthz").status_code == 200, RECOVERY_TIMEOUT_S, what="healthz after restart"
    )
    # The test server keeps no data across restarts, so the old key is gone; a new one works.
    fresh = marketplace.create_key(name="after-outage")["key"]
    for _ in range(4):
        response = marketplace.chat(fresh, max_tokens=1)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["cost"] > 0


STREAMS = 6
STREAM_TOKENS = 120  # 120 x 20 ms: each stream runs ~2.4 s, so they end while Redis is down
OUTAGE_S = 4.0
REPLAY_TIMEOUT_S = 30.0


def read_stream(marketplace, key: str, started: threading.Event) -> dict:
    """One long stream; returns its id, text and final usage chunk."""
    body = {
        "model": "alpha-chat",
        "messages": [{"role": "user", "content": f"long story [[fake-tokens={STREAM_TOKENS}]]"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 200,
    }
    chunks = []
    with (
        httpx.Client(base_url=marketplace.base_url, timeout=60.0) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=marketplace.auth(key)) as response,
    ):
        if response.status_code != 200:
            started.set()
            raise AssertionError(f"stream refused: {response.status_code} {response.read().decode()}")
        for event in sse_data(response):
            if event == "[DONE]":
                chunks.append(event)
            else:
                chunks.append(json.loads(event))
                started.set()
    return {"id": chunks[0]["id"], "chunks": chunks}


def test_redis_killed_mid_load_loses_nothing_and_bills_nothing_twice(marketplace, redis_server, redis_client):
    redis_server.make_durable()
    try:
        created = marketplace.create_key(name="mid-load", credit_usd=1)
        key, key_id, org_id = created["key"], created["id"], created["org_id"]
        served: list[dict] = []  # every 200 JSON response of the background load
        refused: list[httpx.Response] = []
        stop = threading.Event()

        def steady_load() -> None:
            with httpx.Client(base_url=marketplace.base_url, timeout=30.0) as client:
                while not stop.is_set():
                    body = {"model": "alpha-chat", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 4}
                    response = client.post("/v1/chat/completions", json=body, headers=marketplace.auth(key))
                    if response.status_code == 200:
                        served.append(response.json())
                    else:
                        refused.append(response)
                    time.sleep(0.05)

        with ThreadPoolExecutor(STREAMS + 1) as pool:
            try:
                started = [threading.Event() for _ in range(STREAMS)]
                streams = [pool.submit(read_stream, marketplace, key, event) for event in started]
                load = pool.submit(steady_load)
                assert all(event.wait(30) for event in started), "the streams did not start"
                if failed := [f.exception() for f in streams if f.done() and f.exception()]:
                    raise failed[0]
                redis_server.kill()
                time.sleep(OUTAGE_S)
                redis_server.start()
                restarted_ms = time.time() * 1000
                served_before = len(served)
                results = [future.result(timeout=60) for future in streams]
                # Recovery needs no restart of anything else: the load is served again.
                marketplace.wait_until(lambda: len(served) >= served_before + 5, 30, what="load after restart")
                refused_until = len(refused)
                marketplace.wait_until(lambda: len(served) >= served_before + 10, 30, what="more load")
                assert len(refused) == refused_until, "requests were refused after Redis came back"
            finally:
                stop.set()
            load.result(timeout=30)
    finally:
        redis_server.make_durable(False)

    # New requests during the outage were refused with 503 + Retry-After, never served unmetered.
    assert refused
    for response in refused:
        assert_billing_unavailable(response)

    # Every stream that was running finished normally, with its usage and cost.
    for result in results:
        assert result["chunks"][-1] == "[DONE]"
        usage = result["chunks"][-2]["usage"]
        assert usage["completion_tokens"] == STREAM_TOKENS
        assert usage["cost"] == marketplace.cost_micros("alpha-chat", usage["prompt_tokens"], STREAM_TOKENS) / 1e6

    # The settlements spooled during the outage are replayed: one ledger event per response.
    ledger = f"{{acct:{org_id}}}:ledger"
    ids = sorted(
        [r["id"].removeprefix("chatcmpl-") for r in results] + [r["id"].removeprefix("chatcmpl-") for r in served]
    )

    def ledger_ids() -> list[str]:
        return sorted(fields["request_id"] for _, fields in redis_client.xrange(ledger))

    marketplace.wait_until(lambda: ledger_ids() == ids, REPLAY_TIMEOUT_S, interval_s=0.2, what="the spool replay")
    time.sleep(2.5)  # one more replay interval: nothing arrives twice
    assert ledger_ids() == ids
    # The streams ended while Redis was down, so their events came from the spool, after the restart.
    settled_at = {f["request_id"]: int(f["settled_at_ms"]) for _, f in redis_client.xrange(ledger)}
    assert all(settled_at[r["id"].removeprefix("chatcmpl-")] >= restarted_ms - 50 for r in results)

    # Money: the balance fell by exactly the sum of the reported costs, and nothing is on hold.
    spent = sum(r["chunks"][-2]["usage"]["cost"] for r in results) + sum(r["usage"]["cost"] for r in served)
    info = marketplace.key_info(key)
    assert round(info["credit_usd"] * 1e6) == round(info["org_credit_usd"] * 1e6) == 1_000_000 - round(spent * 1e6)
    assert round(info["spent_usd"] * 1e6) == round(spent * 1e6)  # the key's own spend: all of it
    assert info["on_hold_usd"] == 0.0

    # And the books agree: ledger, counters and balances.
    report = marketplace.http.get("/admin/v1/reconcile", params={"key_id": key_id}, headers=marketplace.admin_headers)
    assert report.status_code == 200, report.text
    assert report.json()["ok"] is True, report.json()["differences"]
    (org,) = report.json()["orgs"]
    assert (org["org_id"], org["events"], org["in_flight"], org["on_hold_usd"]) == (org_id, len(ids), 0, 0.0)
