"""Catalog -> Ray Serve LLM config and the typed app builder, without a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
from pydantic import ValidationError
from ray.serve.deployment import Application

from tokenmart.deployments.app import (
    DEFAULT_REDIS_URL,
    AppArgs,
    IngressOptions,
    build_app,
    llm_config_for,
)
from tokenmart.deployments.catalog import Catalog, Listing, load_catalog

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CATALOG = REPO_ROOT / "cluster" / "catalog" / "local.yaml"


@pytest.fixture(scope="module")
def smollm() -> Listing:
    listing = load_catalog(LOCAL_CATALOG).get("smollm2-135m-instruct")
    assert listing is not None
    return listing


def _gpu_listing(**overrides: Any) -> Listing:
    raw: dict[str, Any] = {
        "id": "llama-3.1-70b-instruct",
        "owner": "meta",
        "source": "meta-llama/Llama-3.1-70B-Instruct",
        "context_length": 32768,
        "default_max_tokens": 1024,
        "pricing": {"prompt_usd_per_1m": "0.6", "completion_usd_per_1m": "0.8"},
        "accelerator": {"kind": "gpu", "type": "A100"},
        "engine": {"tensor_parallel_size": 4, "dtype": "bfloat16"},
        "autoscaling": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 16},
    }
    raw.update(overrides)
    return Listing.model_validate(raw)


@pytest.fixture(autouse=True)
def _no_ray_cluster():
    assert not ray.is_initialized()
    yield
    # nothing here may start (or connect to) a Ray cluster
    assert not ray.is_initialized()


# -- llm_config_for: the local SmolLM2 listing ----------------------------------------------------


def test_local_listing_runs_on_cpu(smollm: Listing, tmp_path: Path):
    config = llm_config_for(smollm, tmp_path)
    assert config.accelerator_config is not None
    assert config.accelerator_config.kind == "cpu"
    assert config.accelerator_type is None


def test_local_listing_engine_kwargs_come_from_catalog(smollm: Listing, tmp_path: Path):
    kwargs = llm_config_for(smollm, tmp_path).engine_kwargs
    assert kwargs["dtype"] == "bfloat16"
    assert kwargs["max_model_len"] == smollm.context_length == 2048
    assert kwargs["enforce_eager"] is True
    assert kwargs["gpu_memory_utilization"] == 0.2
    assert kwargs["tensor_parallel_size"] == 1
    assert kwargs["pipeline_parallel_size"] == 1
    assert kwargs["max_num_seqs"] == 16


def test_local_listing_autoscaling_comes_from_catalog_not_ray_defaults(smollm: Listing, tmp_path: Path):
    deployment = llm_config_for(smollm, tmp_path).deployment_config
    scaling = deployment["autoscaling_config"]
    assert scaling["min_replicas"] == smollm.autoscaling.min_replicas == 1
    assert scaling["max_replicas"] == smollm.autoscaling.max_replicas == 1
    assert scaling["target_ongoing_requests"] == smollm.autoscaling.target_ongoing_requests == 8
    assert scaling["max_replicas"] < 1e9
    # a bounded per-replica queue, not Ray Serve LLM's effectively unbounded default
    assert deployment["max_ongoing_requests"] == 32


def test_local_listing_model_source_resolves_to_model_dir(smollm: Listing, tmp_path: Path):
    loading = llm_config_for(smollm, tmp_path).model_loading_config
    assert loading.model_id == "smollm2-135m-instruct"
    assert loading.model_source == str(tmp_path / "smollm2-135m-instruct")


def test_local_listing_model_source_defaults_to_cache_dir(
    smollm: Listing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TOKENMART_CACHE_DIR", str(tmp_path))
    loading = llm_config_for(smollm).model_loading_config
    assert loading.model_source == str(tmp_path / "models" / "smollm2-135m-instruct")


# -- llm_config_for: GPU listings ---------------------------------------------------------------


def test_gpu_listing_gets_accelerator_type_and_tensor_parallelism():
    config = llm_config_for(_gpu_listing())
    assert config.accelerator_type == "A100"
    assert config.engine_kwargs["tensor_parallel_size"] == 4
    assert config.engine_kwargs["pipeline_parallel_size"] == 1
    assert config.engine_kwargs["max_model_len"] == 32768
    assert config.engine_kwargs["dtype"] == "bfloat16"
    assert "max_num_seqs" not in config.engine_kwargs


def test_gpu_listing_hub_source_passes_through(tmp_path: Path):
    config = llm_config_for(_gpu_listing(), tmp_path)
    assert config.model_loading_config.model_source == "meta-llama/Llama-3.1-70B-Instruct"
    assert config.model_loading_config.model_id == "llama-3.1-70b-instruct"


def test_gpu_listing_autoscaling_allows_scale_to_zero_but_starts_one_replica():
    scaling = llm_config_for(_gpu_listing()).deployment_config["autoscaling_config"]
    assert scaling["min_replicas"] == 0
    assert scaling["initial_replicas"] == 1
    assert scaling["max_replicas"] == 3
    assert scaling["target_ongoing_requests"] == 16


def test_max_ongoing_requests_scales_with_target():
    config = llm_config_for(_gpu_listing())
    assert config.deployment_config["max_ongoing_requests"] == 64  # 4 x target 16


def test_pipeline_parallel_size_is_passed_to_engine():
    listing = _gpu_listing(engine={"tensor_parallel_size": 8, "pipeline_parallel_size": 2})
    kwargs = llm_config_for(listing).engine_kwargs
    assert kwargs["tensor_parallel_size"] == 8
    assert kwargs["pipeline_parallel_size"] == 2


def test_gpu_listing_without_type_sets_no_accelerator_type():
    config = llm_config_for(_gpu_listing(accelerator={"kind": "gpu"}))
    assert config.accelerator_type is None


def test_engine_extra_is_passed_through():
    listing = _gpu_listing(engine={"tensor_parallel_size": 1, "extra": {"enable_prefix_caching": True}})
    assert llm_config_for(listing).engine_kwargs["enable_prefix_caching"] is True


# -- AppArgs ------------------------------------------------------------------------------------


def test_app_args_needs_a_catalog():
    with pytest.raises(ValidationError, match="exactly one of catalog_path and catalog"):
        AppArgs()


def test_app_args_refuses_both_catalog_and_path():
    catalog = load_catalog(LOCAL_CATALOG)
    with pytest.raises(ValidationError, match="exactly one of catalog_path and catalog"):
        AppArgs(catalog_path=str(LOCAL_CATALOG), catalog=catalog)


def test_app_args_accepts_an_inline_catalog():
    raw = load_catalog(LOCAL_CATALOG).model_dump(mode="json")
    args = AppArgs.model_validate({"catalog": raw})
    assert isinstance(args.catalog, Catalog)
    assert args.load_catalog().get("smollm2-135m-instruct") is not None


def test_app_args_loads_catalog_from_path():
    args = AppArgs(catalog_path=str(LOCAL_CATALOG))
    assert [listing.id for listing in args.load_catalog().listings] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]


def test_app_args_rejects_unknown_fields():
    with pytest.raises(ValidationError, match="catalogue"):
        AppArgs.model_validate({"catalog_path": str(LOCAL_CATALOG), "catalogue": "x"})


def test_app_args_rejects_unknown_engine():
    with pytest.raises(ValidationError):
        AppArgs(catalog_path=str(LOCAL_CATALOG), engine="sglang")  # type: ignore[arg-type]


def test_ingress_options_reject_unknown_fields():
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"catalog_path": str(LOCAL_CATALOG), "ingress": {"replicas": 3}})
    with pytest.raises(ValidationError):
        IngressOptions(max_body_bytes=10)


def test_redis_url_defaults_from_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_URL", "redis://redis.example:6380/2")
    assert AppArgs(catalog_path=str(LOCAL_CATALOG)).redis_url == "redis://redis.example:6380/2"


def test_redis_url_falls_back_to_localhost(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert AppArgs(catalog_path=str(LOCAL_CATALOG)).redis_url == DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"


def test_explicit_redis_url_beats_env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/0")
    args = AppArgs(catalog_path=str(LOCAL_CATALOG), redis_url="redis://explicit:6379/0")
    assert args.redis_url == "redis://explicit:6379/0"


def test_bad_catalog_path_fails_at_build_time(tmp_path: Path):
    from tokenmart.deployments.catalog import CatalogError

    with pytest.raises(CatalogError, match="does not exist"):
        build_app(AppArgs(catalog_path=str(tmp_path / "missing.yaml"), engine="fake"))


# -- build_app ----------------------------------------------------------------------------------


def test_build_app_with_fake_engine_returns_application():
    app = build_app(AppArgs(catalog_path=str(LOCAL_CATALOG), engine="fake"))
    assert isinstance(app, Application)


def test_build_app_accepts_a_plain_dict_like_a_serve_config():
    app = build_app({"catalog_path": str(LOCAL_CATALOG), "engine": "fake"})
    assert isinstance(app, Application)


def test_build_app_rejects_a_bad_args_dict():
    with pytest.raises(ValidationError):
        build_app({"catalog_path": str(LOCAL_CATALOG), "engine": "fake", "typo": 1})


def test_build_app_wires_one_fake_engine_per_listing():
    catalog = Catalog.model_validate(
        {
            "listings": [
                _gpu_listing(id="model-a").model_dump(mode="json"),
                _gpu_listing(id="model-b", autoscaling={"min_replicas": 2, "max_replicas": 5}).model_dump(mode="json"),
            ]
        }
    )
    app = build_app(AppArgs(catalog=catalog, engine="fake", redis_url="redis://r:1/0"))
    ingress = app._bound_deployment
    assert ingress.name == "MarketplaceIngress"
    kwargs = ingress.init_kwargs
    assert set(kwargs["llm_deployments"]) == {"model-a", "model-b"}
    assert set(kwargs["model_cards"]) == {"model-a", "model-b"}
    assert kwargs["redis_url"] == "redis://r:1/0"
    assert Catalog.model_validate(kwargs["catalog"]) == catalog
    engine_b = kwargs["llm_deployments"]["model-b"]._bound_deployment
    assert engine_b.name == "fake:model-b"
    scaling = engine_b._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 5)


def test_build_app_ingress_uses_ingress_options():
    app = build_app(
        AppArgs.model_validate(
            {
                "catalog_path": str(LOCAL_CATALOG),
                "engine": "fake",
                "ingress": {"min_replicas": 2, "max_replicas": 6, "max_ongoing_requests": 50},
            }
        )
    )
    config = app._bound_deployment._deployment_config
    assert config.max_ongoing_requests == 50 + 512  # the door refuses over 50; Serve lets the excess reach it
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (2, 6)
    # The ingress reports and averages its load like the listings do, not at Serve's 10 s / 30 s.
    assert (config.autoscaling_config.metrics_interval_s, config.autoscaling_config.look_back_period_s) == (1.0, 5.0)


def test_engine_metrics_are_exported_for_every_vllm_listing(smollm: Listing, tmp_path: Path):
    assert llm_config_for(smollm, tmp_path).log_engine_metrics is True


def test_the_stream_batching_interval_is_the_listings_with_a_measured_default(smollm: Listing, tmp_path: Path):
    """Ray Serve LLM holds a stream's tokens for 50 ms by default; the catalog sets its own."""
    assert llm_config_for(smollm, tmp_path).experimental_configs == {"stream_batching_interval_ms": 5.0}
    tuned = smollm.model_copy(update={"engine": smollm.engine.model_copy(update={"stream_batching_interval_ms": 0})})
    assert llm_config_for(tuned, tmp_path).experimental_configs == {"stream_batching_interval_ms": 0}


def test_per_key_metric_labels_are_off_unless_the_operator_turns_them_on():
    default = build_app(AppArgs(catalog_path=str(LOCAL_CATALOG), engine="fake"))
    assert default._bound_deployment.init_kwargs["per_key_metrics"] is False
    opted_in = build_app(AppArgs(catalog_path=str(LOCAL_CATALOG), engine="fake", metrics={"per_key_labels": True}))
    assert opted_in._bound_deployment.init_kwargs["per_key_metrics"] is True


def test_a_typed_fake_engine_gets_what_a_vllm_engine_gets(tmp_path: Path):
    """For benchmarks against plain Ray Serve LLM: pydantic requests, not dicts, and prompts
    counted with the listing's tokenizer, not bounded by bytes."""
    plain = build_app(AppArgs(catalog_path=str(LOCAL_CATALOG), engine="fake", model_dir=str(tmp_path)))
    typed = build_app(
        AppArgs(catalog_path=str(LOCAL_CATALOG), engine="fake", model_dir=str(tmp_path), fake_engine={"typed": True})
    )
    plain_kwargs, typed_kwargs = plain._bound_deployment.init_kwargs, typed._bound_deployment.init_kwargs
    assert (plain_kwargs["plain_requests"], typed_kwargs["plain_requests"]) == (True, False)
    assert plain_kwargs["tokenizer_sources"] == {}
    assert typed_kwargs["tokenizer_sources"] == {
        "smollm2-135m-instruct": str(tmp_path / "smollm2-135m-instruct"),
    }
    for app, expected in ((plain, False), (typed, True)):
        engine = app._bound_deployment.init_kwargs["llm_deployments"]["smollm2-135m-instruct"]._bound_deployment
        assert engine.init_kwargs["typed"] is expected
