"""A simulated multi-node Ray cluster with logical GPUs, serving a GPU catalog on the fake engine.

`ray.cluster_utils.Cluster` runs several raylets on this machine, each declaring its own
logical GPUs and accelerator type, so placement groups are scheduled exactly as on a GPU
cluster: a head with no GPUs, two 4-GPU "A100" nodes and two 2-GPU "T4" nodes. The engine
is the fake one, so no GPU is needed; its replicas reserve the same placement groups that
Ray Serve LLM's LLMServer would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tokenmart.deployments.catalog import Catalog
from tokenmart.deployments.request_id import PROXY_ENV

from ..integration.conftest import Marketplace, free_port, ray_serve_session

A100_NODES, T4_NODES = 2, 2


def listing(listing_id: str, group: str | None, tp: int = 1, pp: int = 1, replicas: int = 1, **extra) -> dict:
    return {
        "id": listing_id,
        "owner": "simulated",
        "source": f"fake/{listing_id}",
        "context_length": 4096,
        "attention_heads": 32,
        "pricing": extra.pop("pricing", {"prompt_usd_per_1m": "1", "completion_usd_per_1m": "2"}),
        "default_max_tokens": 64,
        "accelerator": {"kind": "gpu", "group": group} if group else {"kind": "cpu"},
        "engine": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp},
        **extra,
        "autoscaling": {"min_replicas": replicas, "max_replicas": replicas, **extra.get("autoscaling", {})},
    }


WORKER_GROUPS = [
    {"name": "a100x4", "accelerator_type": "A100", "gpus_per_worker": 4, "max_replicas": A100_NODES},
    {"name": "t4x2", "accelerator_type": "T4", "gpus_per_worker": 2, "max_replicas": T4_NODES},
    # Declared by the catalog, but no node of it has joined the cluster (e.g. a pool scaled to 0).
    {"name": "h100x8", "accelerator_type": "H100", "gpus_per_worker": 8, "max_replicas": 1},
]

MARKET_CATALOG = Catalog.model_validate(
    {
        "worker_groups": WORKER_GROUPS,
        "listings": [
            listing("big-tp4", "a100x4", tp=4, replicas=2),
            listing("split-tp2-pp2", "t4x2", tp=2, pp=2, pricing={"prompt_usd_per_1m": "3", "completion_usd_per_1m": "5"}),  # noqa: E501
            listing("small-cpu", None, pricing={"prompt_usd_per_1m": "0.1", "completion_usd_per_1m": "0.2"}),
            # One request at a time and one waiting: the rest are turned away at once.
            listing("narrow-cpu", None, autoscaling={"max_ongoing_requests": 1, "max_queued_requests": 1}),
        ],
    }
)  # fmt: skip

UNPLACEABLE_CATALOG = Catalog.model_validate(
    {"worker_groups": WORKER_GROUPS, "listings": [listing("huge-tp8", "h100x8", tp=8)]}
)


class SimulatedCluster(Marketplace):
    def __init__(self, base_url: str, admin_token: str, nodes: dict[str, str]) -> None:
        super().__init__(base_url, admin_token)
        self.nodes = nodes  # node id -> "head", "A100" or "T4"


@pytest.fixture(scope="package")
def gpu_cluster(redis_server) -> Iterator[SimulatedCluster]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from tokenmart.deployments.app import AppArgs, build_app

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0, "include_dashboard": False})
    try:
        with ray_serve_session() as admin_token:
            for _ in range(A100_NODES):
                cluster.add_node(num_cpus=1, num_gpus=4, resources={"accelerator_type:A100": 1})
            for _ in range(T4_NODES):
                cluster.add_node(num_cpus=1, num_gpus=2, resources={"accelerator_type:T4": 1})
            cluster.wait_for_nodes()
            # Every replica gets the admin token, whichever node it lands on (the head node's
            # raylet started before the token was in this process's environment).
            ray.init(
                address=cluster.address,
                log_to_driver=False,
                runtime_env={"env_vars": {"TOKENMART_ADMIN_TOKEN": admin_token, **PROXY_ENV}},
            )
            nodes = {}
            for node in ray.nodes():
                kinds = [k.split(":", 1)[1] for k in node["Resources"] if k.startswith("accelerator_type:")]
                nodes[node["NodeID"]] = kinds[0] if kinds else "head"
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            common = {"engine": "fake", "redis_url": redis_server.url, "fake_engine": {"token_delay_s": 0.01}}
            ingress = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1}
            market_app = build_app(AppArgs(catalog=MARKET_CATALOG, ingress=ingress, **common))
            serve.run(market_app, name="market", route_prefix="/")
            # A listing no node can host: deployed on its own, without waiting for it.
            unplaceable = build_app(AppArgs(catalog=UNPLACEABLE_CATALOG, ingress=ingress, **common))
            serve._run(unplaceable, name="unplaceable", route_prefix="/unplaceable", _blocking=False)
            with SimulatedCluster(f"http://127.0.0.1:{port}", admin_token, nodes) as market:
                market.wait_until_healthy()
                yield market
    finally:
        cluster.shutdown()
