"""Placement: tensor x pipeline parallel GPUs per replica, kept to one node where TP requires."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

import tokenmart.deployments.catalog_rules as catalog_rules_module
import tokenmart.deployments.placement as placement_module
from tokenmart.deployments.app import AppArgs, build_app, fake_engine_placement, llm_config_for
from tokenmart.deployments.catalog import (
    Catalog,
    CatalogError,
    Listing,
    WorkerGroup,
    load_catalog,
    parse_catalog,
    placement_for,
)
from tokenmart.deployments.catalog_rules import RULES
from tokenmart.deployments.placement import GroupSpec, ListingSpec, PlacementError, place, placement_problems

AUTOSCALING_FIELDS = {
    "min_replicas",
    "initial_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "look_back_period_s",
    "metrics_interval_s",
}

GROUPS = {
    "l4x1": WorkerGroup(name="l4x1", accelerator_type="L4", gpus_per_worker=1, max_replicas=8),
    "a100x4": WorkerGroup(name="a100x4", accelerator_type="A100", gpus_per_worker=4, max_replicas=2),
    "a100x8": WorkerGroup(name="a100x8", accelerator_type="A100", gpus_per_worker=8, max_replicas=2),
    "t4x2": WorkerGroup(name="t4x2", accelerator_type="T4", gpus_per_worker=2, max_replicas=4),
    "h100x6": WorkerGroup(name="h100x6", accelerator_type="H100", gpus_per_worker=6, max_replicas=2),
}
SPECS = {name: group.rule_spec() for name, group in GROUPS.items()}


def listing(tp: int = 1, pp: int = 1, group: str | None = None, heads: int | None = 32, **extra: Any) -> Listing:
    accelerator: dict[str, Any] = {"kind": "gpu", "group": group}
    accelerator.update(extra.pop("accelerator", {}))
    return Listing.model_validate(
        {
            "id": "m",
            "owner": "o",
            "source": "org/model",
            "context_length": 4096,
            "pricing": {"prompt_usd_per_1m": "1", "completion_usd_per_1m": "2"},
            "accelerator": accelerator,
            "engine": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp},
            "attention_heads": heads,
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("tp", "pp", "group", "gpus", "strategy", "accelerator"),
    [
        (1, 1, "l4x1", 1, "STRICT_PACK", "L4"),
        (4, 1, "a100x4", 4, "STRICT_PACK", "A100"),
        (8, 1, "a100x8", 8, "STRICT_PACK", "A100"),
        (2, 2, "a100x4", 4, "STRICT_PACK", "A100"),  # the whole replica fits one node
        (2, 2, "t4x2", 4, "PACK", "T4"),  # one TP group per node, stages across nodes
        (4, 2, "a100x4", 8, "PACK", "A100"),
        (1, 4, "l4x1", 4, "PACK", "L4"),
        (2, 3, "h100x6", 6, "STRICT_PACK", "H100"),
        (4, 1, None, 4, "STRICT_PACK", None),  # no group named: TP alone is one node
        (2, 2, None, 4, "PACK", None),
    ],
)
def test_placement_of_tp_x_pp_replicas(tp, pp, group, gpus, strategy, accelerator) -> None:
    placement = placement_for(listing(tp, pp, group), GROUPS)
    assert (placement.gpus, placement.strategy, placement.accelerator_type) == (gpus, strategy, accelerator)
    assert placement.as_config() == {"bundles": [{"GPU": 1}] * gpus, "strategy": strategy}


@pytest.mark.parametrize(
    ("tp", "pp", "group", "heads", "message"),
    [
        (3, 1, "a100x4", 32, "size 3 does not divide its 32 attention heads; use one of 1, 2, 4, 8, 16"),
        (4, 1, None, 30, "size 4 does not divide its 30 attention heads; use one of 1, 2, 3, 5, 6, 10, 15"),
        (8, 1, "a100x4", 32, "tensor_parallel_size 8 is larger than gpus_per_worker 4 of worker group 'a100x4'"),
        (2, 1, "l4x1", 32, "tensor_parallel_size 2 is larger than gpus_per_worker 1 of worker group 'l4x1'"),
        (4, 3, "h100x6", 32, "gpus_per_worker 6 of worker group 'h100x6' must be a multiple of tensor_parallel_size 4"),
        (4, 2, "t4x2", 32, "larger than gpus_per_worker 2 of"),
        (4, 4, "a100x4", 32, "more than worker group 'a100x4' can ever have (gpus_per_worker 4 x max_replicas 2)"),
        (1, 1, "nope", 32, "group 'nope' is not in worker_groups (a100x4, a100x8, h100x6, l4x1, t4x2)"),
    ],
)  # fmt: skip
def test_impossible_layouts_are_refused_with_what_to_change(tp, pp, group, heads, message) -> None:
    with pytest.raises(PlacementError) as refused:
        placement_for(listing(tp, pp, group, heads), GROUPS)
    assert "listing 'm'" in str(refused.value)
    assert message in str(refused.value)


def test_an_accelerator_type_that_contradicts_the_group_is_refused() -> None:
    with pytest.raises(PlacementError) as refused:
        placement_for(listing(4, 1, "a100x4", accelerator={"type": "H100"}), GROUPS)
    assert "accelerator.type 'H100' does not match worker group 'a100x4' (accelerator_type 'A100')" in str(
        refused.value
    )


def test_the_app_leaves_to_the_chart_only_what_it_cannot_see() -> None:
    """A listing may name no group (placed by TP alone), and the app is never handed CPU groups."""
    assert {rule.name for rule in RULES if not rule.app} == {"gpu-listing-names-group", "group-has-gpus"}
    assert placement_for(listing(4, 1, None), GROUPS).strategy == "STRICT_PACK"
    assert placement_for(listing(1, 1, "anything"), {}) is not None  # no groups given: the local launcher


@pytest.mark.parametrize("module", [placement_module, catalog_rules_module], ids=lambda m: m.__name__)
def test_placement_and_the_rules_import_nothing_from_the_catalog(module) -> None:
    """The catalog calls placement and the rules; they read only plain data, so there is no import circle."""
    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            if node.level and not node.module:
                imported.update("." + alias.name for alias in node.names)
    assert not {name for name in imported if name.startswith(".") or "tokenmart" in name} - {".catalog_rules"}
    assert not {name for name in imported if name.split(".")[-1] == "catalog"}, imported


def test_placement_works_on_plain_data() -> None:
    groups = {"t4x2": GroupSpec(name="t4x2", accelerator_type="T4", gpus_per_worker=2, max_replicas=4)}
    spread = ListingSpec(id="m", tensor_parallel_size=2, pipeline_parallel_size=2, accelerator_group="t4x2")
    assert place(spread, groups) == placement_for(listing(2, 2, "t4x2"), GROUPS)
    assert place(ListingSpec(id="m", accelerator_kind="cpu")) is None
    with pytest.raises(PlacementError, match=r"listing 'm': accelerator\.type applies only to kind: gpu"):
        place(ListingSpec(id="m", accelerator_kind="cpu", accelerator_type="A100"))
    with pytest.raises(PlacementError, match="listing 'm': tensor_parallel_size 4 is larger than gpus_per_worker 2"):
        place(ListingSpec(id="m", tensor_parallel_size=4, accelerator_group="t4x2"), groups)


def test_the_catalog_hands_placement_what_it_needs_of_listings_and_groups() -> None:
    tagged = listing(4, 2, "a100x4", heads=64, accelerator={"type": "A100"})
    assert tagged.rule_spec() == ListingSpec(
        id="m",
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        accelerator_kind="gpu",
        accelerator_type="A100",
        accelerator_group="a100x4",
        attention_heads=64,
        context_length=4096,
    )
    assert GROUPS["a100x4"].rule_spec() == GroupSpec(
        name="a100x4", gpus_per_worker=4, max_replicas=2, accelerator_type="A100"
    )


def test_cpu_listings_get_no_gpu_placement() -> None:
    cpu = listing(heads=None, accelerator={"kind": "cpu", "group": None})
    assert placement_for(cpu, GROUPS) is None
    assert fake_engine_placement(cpu, GROUPS, 0.1) == {}


def test_the_catalog_is_refused_before_anything_starts_naming_the_listing() -> None:
    raw = {
        "worker_groups": [{"name": "a100x4", "accelerator_type": "A100", "gpus_per_worker": 4}],
        "listings": [
            {
                "id": "big-model",
                "owner": "o",
                "source": "org/big",
                "context_length": 4096,
                "attention_heads": 64,
                "pricing": {"prompt_usd_per_1m": "1", "completion_usd_per_1m": "2"},
                "accelerator": {"kind": "gpu", "group": "a100x4"},
                "engine": {"tensor_parallel_size": 8},
            }
        ],
    }
    with pytest.raises(CatalogError) as refused:
        parse_catalog(raw)
    assert "  - listing 'big-model' (listings[0]): tensor_parallel_size 8 is larger than gpus_per_worker 4" in str(
        refused.value
    )


def test_ray_serve_llm_gets_the_bundles_and_strategy() -> None:
    catalog = load_catalog("cluster/catalog/gpu-example.yaml")
    big = catalog.get("llama-3.3-70b-instruct")
    engine = llm_config_for(big, groups=catalog.groups).get_engine_config()
    assert engine.placement_strategy == "STRICT_PACK"
    assert engine.placement_bundles == [{"GPU": 1.0, "accelerator_type:A100-80G": 0.001}] * 4


def test_the_fake_engine_reserves_the_same_placement_group_as_llmserver() -> None:
    spread = listing(2, 2, "t4x2")
    options = fake_engine_placement(spread, GROUPS, num_cpus=0.1)
    assert options["placement_group_strategy"] == "PACK"
    bundles = options["placement_group_bundles"]
    assert bundles[0] == {"GPU": 1.0, "accelerator_type:T4": 0.001, "CPU": 0.1}  # the replica actor joins bundle 0
    assert bundles[1:] == [{"GPU": 1.0, "accelerator_type:T4": 0.001}] * 3


@pytest.mark.parametrize(("engine", "name"), [("vllm", "LLMServer:m"), ("fake", "fake:m")])
def test_the_serve_deployment_of_a_listing_gets_the_catalogs_autoscaling_and_queue_bounds(engine, name) -> None:
    """Read back from the deployment `build_app` hands Serve, not from the dict we pass on.

    Ray Serve LLM merges its own defaults into a listing's deployment config (its default
    target of 1e9 ongoing requests never scales up), so a field it dropped or overrode fails
    here. That replicas really come and go under load is what `loadtest/stepped_load.py`
    shows; a unit test cannot.
    """
    scaling = {"min_replicas": 0, "max_replicas": 5, "upscale_delay_s": 2, "downscale_delay_s": 45}
    catalog = Catalog(
        worker_groups=[GROUPS["l4x1"]],
        listings=[listing(1, 1, "l4x1", autoscaling={**scaling, "target_ongoing_requests": 3})],
    )
    app = build_app(AppArgs(catalog=catalog, engine=engine, redis_url="redis://127.0.0.1:1/0"))
    (listing_app,) = app._bound_deployment.init_kwargs["llm_deployments"].values()
    deployment = listing_app._bound_deployment
    autoscaling = deployment._deployment_config.autoscaling_config
    assert deployment.name == name
    assert autoscaling.model_dump(include=AUTOSCALING_FIELDS) == {
        "min_replicas": 0,
        "initial_replicas": 1,  # a listing that may scale to zero still starts with one replica
        "max_replicas": 5,
        "target_ongoing_requests": 3.0,
        "upscale_delay_s": 2.0,
        "downscale_delay_s": 45.0,
        "look_back_period_s": 5.0,
        "metrics_interval_s": 1.0,
    }
    # Per replica: 4 x the target, at least 16; then the queue bound past which callers get a 503.
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (16, 64)


@pytest.mark.parametrize(
    ("tp", "pp", "group", "most"),
    [
        (1, 1, "l4x1", 8),  # one replica a node
        (2, 1, "a100x4", 4),  # two a node
        (3, 1, "a100x4", 2),  # a node holds one 3-GPU replica (STRICT_PACK): one GPU of each stays free
        (2, 3, "h100x6", 2),  # stages in one node
        (4, 2, "a100x8", 2),
        (2, 2, "t4x2", 2),  # spread over two nodes (PACK): 8 GPUs, 4 a replica
        (4, 3, "a100x4", 0),  # TP x PP larger than the group: replica-fits-group says so instead
    ],
)
def test_a_listing_may_scale_to_as_many_replicas_as_its_group_can_hold(tp: int, pp: int, group: str, most: int):
    def refusals(max_replicas: int) -> list[str]:
        spec = ListingSpec(id="m", tensor_parallel_size=tp, pipeline_parallel_size=pp, accelerator_group=group,
                           max_replicas=max_replicas)  # fmt: skip
        return [p for p in placement_problems(spec, SPECS) if "can ever hold" in p]

    expected = [
        f"listing 'm': autoscaling.max_replicas {most + 1} replicas of {tp * pp} GPUs each are more than worker "
        f"group '{group}' can ever hold ({most}, with gpus_per_worker {SPECS[group].gpus_per_worker} x max_replicas "
        f"{SPECS[group].max_replicas}); lower autoscaling.max_replicas or raise the group's max_replicas"
    ]
    assert refusals(most) == []
    assert refusals(most + 1) == (expected if most else [])
