"""Placement on a simulated multi-node GPU cluster, and several listings served side by side."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import MARKET_CATALOG, SimulatedCluster

pytestmark = pytest.mark.integration

PENDING_TIMEOUT_S = 60.0


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
        return deployment if deployment and deployment.message else None

    deployment = gpu_cluster.wait_until(pending_status, PENDING_TIMEOUT_S, interval_s=0.5, what="a pending status")
    assert deployment.status in ("UPDATING", "UPSCALING", "DEPLOYING")
    assert "8" in deployment.message and "GPU" in deployment.message, deployment.message
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
    created = gpu_cluster.create_key(name="overload", credit_usd="1")
    key = created["key"]
    body = {
        "model": "narrow-cpu",
        "messages": [{"role": "user", "content": "long [[fake-tokens=150]]"}],
        "max_tokens": 200,
    }

    def send(_: int) -> tuple[int, float, dict]:
        started = time.monotonic()
        with httpx.Client(base_url=gpu_cluster.base_url, timeout=60) as client:
            response = client.post("/v1/chat/completions", json=body, headers=gpu_cluster.auth(key))
        return response.status_code, time.monotonic() - started, response

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(6)))
    served = [r for status, _, r in results if status == 200]
    refused = [(seconds, r) for status, seconds, r in results if status == 503]
    assert len(served) + len(refused) == 6
    assert len(served) >= 2 and len(refused) >= 1  # one running + one queued at least; the rest turned away
    for seconds, response in refused:
        assert seconds < 1.0  # well before a served request (1.5 s of tokens) could finish
        assert response.json()["error"]["code"] == "model_overloaded"
        assert int(response.headers["retry-after"]) >= 1
    spent = sum(r.json()["usage"]["cost"] for r in served)
    info = gpu_cluster.key_info(key)
    assert round(info["credit_usd"] * 1e6) == 1_000_000 - round(spent * 1e6)
    assert info["on_hold_usd"] == 0.0
