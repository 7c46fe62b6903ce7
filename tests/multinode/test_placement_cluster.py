"""Placement on a simulated multi-node GPU cluster, and several listings served side by side."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import MARKET_CATALOG, SimulatedCluster

pytestmark = pytest.mark.integration

PENDING_TIMEOUT_S = 60.0
# Serve's status message for replicas it could not schedule for 30 s.
REQUIRED_RESOURCES = re.compile(r"Resources required for each replica: (\[.*?\]), total resources available")
REFUSAL_TIMEOUT_S = 30.0
# 30 s of tokens at the cluster's 0.01 s per token: the stream holds narrow-cpu's one slot
# for as long as the overload test needs it.
LONG_STREAM_TOKENS = 3000


def replica_groups(deployment: str) -> list[dict]:
    """The placement groups of a deployment's running replicas (Serve names them after it)."""
    from ray.util import placement_group_table

    return [
        pg for pg in placement_group_table().values() if f"#{deployment}#" in pg["name"] and pg["state"] == "CREATED"
    ]


def node_kinds(cluster: SimulatedCluster, group: dict) -> list[str]:
    return [cluster.nodes[node] for _, node in sorted(group["bundles_to_node_id"].items())]


def test_each_tp4_replica_keeps_its_four_gpus_on_one_node_and_two_replicas_use_both_nodes(gpu_cluster) -> None:
    groups = replica_groups("fake:big-tp4")
    assert len(groups) == 2
    nodes_used = set()
    for group in groups:
        assert group["strategy"] == "STRICT_PACK"
        assert len(group["bundles_to_node_id"]) == 4
        assert set(node_kinds(gpu_cluster, group)) == {"A100"}
        assert len(set(group["bundles_to_node_id"].values())) == 1  # one node for the whole TP group
        nodes_used |= set(group["bundles_to_node_id"].values())
    assert len(nodes_used) == 2  # each replica has a 4-GPU node to itself


def test_tp2_x_pp2_spans_two_nodes_with_each_tp_group_on_one(gpu_cluster) -> None:
    (group,) = replica_groups("fake:split-tp2-pp2")
    assert group["strategy"] == "PACK"
    nodes = [group["bundles_to_node_id"][index] for index in range(4)]
    assert set(node_kinds(gpu_cluster, group)) == {"T4"}
    # Stage 0 (bundles 0, 1) on one node, stage 1 (bundles 2, 3) on the other.
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]


def test_a_listing_no_node_can_host_stays_pending_with_a_clear_status(gpu_cluster) -> None:
    from ray import serve

    def pending_status():
        app = serve.status().applications.get("unplaceable")
        deployment = app and app.deployments.get("fake:huge-tp8")
        return deployment if deployment and REQUIRED_RESOURCES.search(deployment.message) else None

    deployment = gpu_cluster.wait_until(pending_status, PENDING_TIMEOUT_S, interval_s=0.5, what="a pending status")
    assert deployment.status == "UPDATING"
    # Serve's message names what one replica needs: 8 H100 GPUs, with the replica's CPU in the first bundle.
    gpu = {"GPU": 1.0, "accelerator_type:H100": 0.001}
    needed = json.loads(REQUIRED_RESOURCES.search(deployment.message).group(1))
    assert needed == [{**gpu, "CPU": 0.1}] + [gpu] * 7, deployment.message
    assert replica_groups("fake:huge-tp8") == []
    # Nothing crashed: the marketplace next to it serves every listing.
    assert serve.status().applications["market"].status == "RUNNING"


@pytest.mark.parametrize("listing", [listing.id for listing in MARKET_CATALOG.listings])
def test_the_ingress_routes_each_request_to_its_listing_and_bills_its_price(gpu_cluster, listing) -> None:
    key = gpu_cluster.create_key(name=f"route-{listing}")["key"]
    response = gpu_cluster.chat(key, model=listing, max_tokens=4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == listing
    usage = body["usage"]
    assert usage["cost"] == gpu_cluster_cost(listing, usage["prompt_tokens"], usage["completion_tokens"])


def gpu_cluster_cost(listing_id: str, prompt_tokens: int, completion_tokens: int) -> float:
    listing = MARKET_CATALOG.get(listing_id)
    return listing.cost_micros(prompt_tokens, completion_tokens) / 1_000_000


def test_overload_beyond_the_queue_is_a_fast_503_and_is_not_billed(gpu_cluster) -> None:
    """narrow-cpu runs one request and queues one. With a stream running, of 5 more requests
    exactly one waits and 4 are refused with 503 model_overloaded while the stream still
    holds the replica: a refusal that waited for capacity would not come back before the
    stream is released. The refusals cost nothing and hold nothing."""
    created = gpu_cluster.create_key(name="overload", credit_usd=1)
    key = created["key"]
    running = {
        "model": "narrow-cpu",
        "messages": [{"role": "user", "content": f"long [[fake-tokens={LONG_STREAM_TOKENS}]]"}],  # 5 prompt tokens
        "max_tokens": LONG_STREAM_TOKENS,
        "stream": True,
    }
    short = {"model": "narrow-cpu", "messages": [{"role": "user", "content": "short"}], "max_tokens": 4}  # 4 tokens

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=gpu_cluster.base_url, timeout=60) as client:
            return client.post("/v1/chat/completions", json=short, headers=gpu_cluster.auth(key))

    with (
        ThreadPoolExecutor(5) as pool,
        httpx.Client(base_url=gpu_cluster.base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=running, headers=gpu_cluster.auth(key)) as stream,
    ):
        assert stream.status_code == 200
        # Kept: an iterator dropped here would be closed, and the connection with it.
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")  # generating: the replica's one slot is taken
        futures = [pool.submit(send, index) for index in range(5)]
        gpu_cluster.wait_until(
            lambda: sum(f.done() for f in futures) >= 4, REFUSAL_TIMEOUT_S, what="the requests beyond the queue"
        )
        refused = [f.result() for f in futures if f.done()]
        (queued,) = [f for f in futures if not f.done()]
        assert [r.status_code for r in refused] == [503] * 4
        for response in refused:
            assert response.json()["error"]["code"] == "model_overloaded"
            assert response.headers["retry-after"] == "1"
        lines.close()
        stream.close()  # the client hangs up; the queued request gets the replica
    served = queued.result(timeout=REFUSAL_TIMEOUT_S)
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] == 4

    info = gpu_cluster.wait_until(
        lambda: (i := gpu_cluster.key_info(key))["on_hold_usd"] == 0 and i, REFUSAL_TIMEOUT_S, what="the settlements"
    )
    total = gpu_cluster.usage(key)["total"]
    # The one ingress replica had admitted the listing's whole capacity (1 running + 1 queued),
    # so it refused the other four before asking Redis (at its door, by their model, once the
    # listing was full): usage holds the two it admitted, and only the stream (5 prompt tokens)
    # and the served one (4) are billed.
    assert (total["requests"], total["prompt_tokens"]) == (2, 5 + 4)
    assert round(info["credit_usd"] * 1e6) == 1_000_000 - round(total["cost_usd"] * 1e6)
