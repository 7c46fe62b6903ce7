"""Render a catalog into a deployment description for a real multi-node GPU cluster.

Two files, both derived from the catalog and never kept by hand:
  ray-cluster.yaml  a Ray cluster launcher config (GCP): a CPU head, and one node type per
                    catalog worker group, whose machine has exactly `gpus_per_worker` GPUs of
                    the group's accelerator type and declares the `accelerator_type:<X>`
                    resource that the listings' placement groups ask for
  serve.yaml        the Serve config to `serve deploy` on it: the same import path and
                    catalog as `tokenmart up`, with Redis and the admin token from the
                    environment of the Ray nodes

    tokenmart render-cluster --catalog cluster/catalog/gpu-example.yaml --out cluster/deploy/gpu-example
    ray up cluster/deploy/gpu-example/ray-cluster.yaml
    ray submit ... / serve deploy cluster/deploy/gpu-example/serve.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tokenmart.deployments.catalog import Catalog, WorkerGroup, placement_for
from tokenmart.deployments.config import ADMIN_TOKEN_ENV, REDIS_URL_ENV
from tokenmart.deployments.request_id import PROXY_ENV

# GCP machine types by (accelerator type, GPUs per machine): GPUs come with the machine.
GCP_MACHINES: dict[tuple[str, int], tuple[str, int]] = {
    # (accelerator, gpus): (machine type, vCPUs)
    ("L4", 1): ("g2-standard-8", 8),
    ("L4", 2): ("g2-standard-24", 24),
    ("L4", 4): ("g2-standard-48", 48),
    ("L4", 8): ("g2-standard-96", 96),
    ("A100", 1): ("a2-highgpu-1g", 12),
    ("A100", 2): ("a2-highgpu-2g", 24),
    ("A100", 4): ("a2-highgpu-4g", 48),
    ("A100", 8): ("a2-highgpu-8g", 96),
    ("A100-80G", 1): ("a2-ultragpu-1g", 12),
    ("A100-80G", 2): ("a2-ultragpu-2g", 24),
    ("A100-80G", 4): ("a2-ultragpu-4g", 48),
    ("A100-80G", 8): ("a2-ultragpu-8g", 96),
    ("H100", 8): ("a3-highgpu-8g", 208),
}
HEAD_MACHINE = ("n2-standard-16", 16)
GPU_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-py310"
PIP_INSTALL = "pip install 'tokenmart[gpu] @ git+https://github.com/OWNER/tokenmart'"


class ClusterConfigError(ValueError):
    pass


def _machine(group: WorkerGroup) -> tuple[str, int]:
    key = (group.accelerator_type or "", group.gpus_per_worker)
    if key not in GCP_MACHINES:
        offered = ", ".join(f"{a} x{n}" for a, n in sorted(GCP_MACHINES))
        raise ClusterConfigError(
            f"worker group {group.name!r}: no GCP machine has {group.gpus_per_worker} x {group.accelerator_type}; "
            f"use one of: {offered}"
        )
    return GCP_MACHINES[key]


def _node_type(group: WorkerGroup) -> dict[str, Any]:
    machine, vcpus = _machine(group)
    resources: dict[str, Any] = {"CPU": vcpus, "GPU": group.gpus_per_worker}
    if group.accelerator_type:
        resources[f"accelerator_type:{group.accelerator_type}"] = 1
    return {
        "min_workers": group.min_replicas,
        "max_workers": group.max_replicas,
        "resources": resources,
        "node_config": {
            "machineType": machine,
            "disks": [
                {
                    "boot": True,
                    "autoDelete": True,
                    "type": "PERSISTENT",
                    "initializeParams": {
                        "diskSizeGb": 500,
                        "sourceImage": GPU_IMAGE,
                    },
                }
            ],
            "scheduling": [{"onHostMaintenance": "TERMINATE"}],
            "metadata": {"items": [{"key": "install-nvidia-driver", "value": "True"}]},
        },
    }


def ray_cluster_config(
    catalog: Catalog, *, name: str, region: str = "us-central1", zone: str = "us-central1-a"
) -> dict:
    """A Ray cluster launcher config whose GPU node types are the catalog's worker groups."""
    for listing in catalog.listings:
        placement = placement_for(listing, catalog.groups)  # raises on impossible layouts
        if placement is not None and listing.accelerator.group is None:
            raise ClusterConfigError(f"listing {listing.id!r} needs GPUs but names no worker group")
    head_machine, head_vcpus = HEAD_MACHINE
    node_types: dict[str, Any] = {
        "head": {
            # The head runs the Serve controller, the proxy and the ingress, no engine.
            "resources": {"CPU": head_vcpus, "GPU": 0},
            "node_config": {
                "machineType": head_machine,
                "disks": [
                    {
                        "boot": True,
                        "autoDelete": True,
                        "type": "PERSISTENT",
                        "initializeParams": {
                            "diskSizeGb": 100,
                            "sourceImage": "projects/deeplearning-platform-release/global/images/family/common-cpu",
                        },
                    }
                ],
            },
        }
    }
    for group in catalog.worker_groups:
        node_types[group.name] = _node_type(group)
    return {
        "cluster_name": name,
        "max_workers": sum(group.max_replicas for group in catalog.worker_groups),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "provider": {"type": "gcp", "region": region, "availability_zone": zone, "project_id": "YOUR-GCP-PROJECT"},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": "head",
        "setup_commands": [
            PIP_INSTALL,
            # Fill these in (or template them) before `ray up`: every Ray process reads them.
            f"echo '{REDIS_URL_ENV}=redis://:REDIS_PASSWORD@REDIS_HOST:6379/0' | sudo tee -a /etc/environment",
            f"echo '{ADMIN_TOKEN_ENV}=CHANGE-ME' | sudo tee -a /etc/environment",
            # Ray's HTTP proxy loads tokenmart's request-id guard (deployments/request_id.py).
            *(f"echo '{name}={value}' | sudo tee -a /etc/environment" for name, value in PROXY_ENV.items()),
        ],
        "head_start_ray_commands": [
            "ray stop",
            "ray start --head --port=6379 --dashboard-host=0.0.0.0 --autoscaling-config=~/ray_bootstrap_config.yaml",
        ],
        "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
    }


def serve_config(catalog: Catalog, *, port: int = 8000) -> dict:
    """The Serve config for the cluster: the app builder (`IMPORT_PATH`) with the catalog inline."""
    from tokenmart.deployments.app import IMPORT_PATH  # the builder's module imports Ray Serve

    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": port},
        "applications": [
            {
                "name": "tokenmart",
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                # redis_url (REDIS_URL) and the admin token (TOKENMART_ADMIN_TOKEN) are AppArgs
                # defaults read from the Ray nodes' environment (the cluster config's setup_commands).
                "args": {"catalog": catalog.model_dump(mode="json", exclude_defaults=True), "engine": "vllm"},
            }
        ],
    }


HEADER = "# Generated by `tokenmart render-cluster` from {catalog}; do not edit by hand.\n"


def render(catalog: Catalog, catalog_path: Path, out: Path, *, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    header = HEADER.format(catalog=catalog_path.as_posix())
    written = []
    for filename, document in (
        ("ray-cluster.yaml", ray_cluster_config(catalog, name=name)),
        ("serve.yaml", serve_config(catalog)),
    ):
        path = out / filename
        path.write_text(header + yaml.safe_dump(document, sort_keys=False, width=120))
        written.append(path)
    return written
