"""The GPU example catalog renders into a Ray cluster launcher config and a Serve config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tokenmart.cluster.cluster_config import ClusterConfigError, ray_cluster_config, render
from tokenmart.deployments.app import IMPORT_PATH, AppArgs
from tokenmart.deployments.catalog import Catalog, load_catalog, placement_for

CATALOG_PATH = Path("cluster/catalog/gpu-example.yaml")
RENDERED = Path("cluster/deploy/gpu-example")


def test_the_committed_deployment_files_are_exactly_what_the_catalog_renders(tmp_path: Path) -> None:
    render(load_catalog(CATALOG_PATH), CATALOG_PATH, tmp_path, name="tokenmart")
    for name in ("ray-cluster.yaml", "serve.yaml"):
        assert (RENDERED / name).read_text() == (tmp_path / name).read_text(), (
            f"re-run tokenmart render-cluster ({name})"
        )


def test_the_cluster_config_is_valid_for_the_ray_cluster_launcher() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config fills in the launcher's defaults, as `ray up` does, then it is checked
    # against Ray's cluster config schema.
    validate_config(prepare_config(yaml.safe_load((RENDERED / "ray-cluster.yaml").read_text())))


def test_every_gpu_listing_fits_one_node_type_with_its_accelerator() -> None:
    catalog = load_catalog(CATALOG_PATH)
    node_types = yaml.safe_load((RENDERED / "ray-cluster.yaml").read_text())["available_node_types"]
    for listing in catalog.listings:
        placement = placement_for(listing, catalog.groups)
        node = node_types[listing.accelerator.group]["resources"]
        assert node["GPU"] >= placement.tensor_parallel  # a TP group fits one node
        assert node[f"accelerator_type:{placement.accelerator_type}"] == 1
        assert node["GPU"] * node_types[listing.accelerator.group]["max_workers"] >= placement.gpus
    assert node_types["head"]["resources"]["GPU"] == 0


def test_the_serve_config_deploys_the_same_catalog_through_build_app() -> None:
    serve = yaml.safe_load((RENDERED / "serve.yaml").read_text())
    (application,) = serve["applications"]
    assert application["import_path"] == IMPORT_PATH
    args = AppArgs.model_validate(application["args"])
    assert args.load_catalog() == load_catalog(CATALOG_PATH)


def test_a_group_no_machine_offers_is_refused_by_name() -> None:
    catalog = Catalog.model_validate(
        {
            "worker_groups": [{"name": "odd", "accelerator_type": "L4", "gpus_per_worker": 3}],
            "listings": [
                {
                    "id": "m",
                    "owner": "o",
                    "source": "org/m",
                    "context_length": 4096,
                    "pricing": {"prompt_usd_per_1m": "1", "completion_usd_per_1m": "1"},
                    "accelerator": {"kind": "gpu", "group": "odd"},
                }
            ],
        }
    )
    with pytest.raises(ClusterConfigError, match="worker group 'odd': no GCP machine has 3 x L4"):
        ray_cluster_config(catalog, name="x")
