"""The typed app builder: catalog in, Ray Serve application out.

`build_app` is the one entry point that the local launcher, `serve run/deploy` configs and
the Helm chart's serveConfigV2 all use (`IMPORT_PATH`), so a catalog deploys the same way
everywhere. Its arguments, `AppArgs`, are defined in `config.py`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from .catalog import Catalog, CatalogError, Listing, WorkerGroup, placement_for
from .config import (
    DEFAULT_LIMITS,
    DEFAULT_REDIS_URL,
    AppArgs,
    FakeEngineOptions,
    IngressOptions,
    MetricsOptions,
)

# The settings live in config.py (no Ray import there); they are re-exported here, next to
# the builder they configure.
__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_REDIS_URL",
    "IMPORT_PATH",
    "PREFIX_ROUTER",
    "AppArgs",
    "FakeEngineOptions",
    "IngressOptions",
    "MetricsOptions",
    "adapter_paths",
    "build_app",
    "engine_deployment_options",
    "fake_engine_placement",
    "ingress_deployment_options",
    "known_tool_parser",
    "llm_config_for",
    "model_cards",
]


def _autoscaling(listing: Listing) -> dict[str, Any]:
    scaling = listing.autoscaling
    return {
        "min_replicas": scaling.min_replicas,
        "initial_replicas": max(scaling.min_replicas, 1),
        "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_ongoing_requests,
        "upscale_delay_s": scaling.upscale_delay_s,
        "downscale_delay_s": scaling.downscale_delay_s,
        "look_back_period_s": scaling.look_back_period_s,
        "metrics_interval_s": scaling.metrics_interval_s,
    }


# The catalog's `routing: prefix_aware` (deployments/routing.py), by path: importing the router
# imports vLLM, which building the app must not cost.
PREFIX_ROUTER = "tokenmart.deployments.routing:PrefixRouter"


def engine_deployment_options(listing: Listing) -> dict[str, Any]:
    """Serve options shared by the vLLM and the fake engine deployments of a listing."""
    options: dict[str, Any] = {
        "autoscaling_config": _autoscaling(listing),
        # Without an explicit bound Ray Serve LLM admits ~unbounded work per replica.
        "max_ongoing_requests": listing.autoscaling.replica_concurrency,
        # Past this many waiting requests the ingress gets BackPressureError: a fast 503.
        "max_queued_requests": listing.autoscaling.max_queued_requests,
    }
    if listing.routing == "prefix_aware":
        options["request_router_config"] = {
            "request_router_class": PREFIX_ROUTER,
            "request_router_kwargs": {"imbalanced_threshold": listing.routing_imbalance_threshold},
        }
    return options


def llm_config_for(listing: Listing, model_dir: Path | None = None, groups: dict[str, WorkerGroup] | None = None):
    """The Ray Serve LLM config of one listing (pure: no Ray cluster needed)."""
    from ray.serve.llm import LLMConfig

    engine = listing.engine
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "dtype": engine.dtype,
        "max_model_len": listing.context_length,
        # usage.prompt_tokens_details.cached_tokens: prompt tokens vLLM read from its prefix
        # cache (on by default), which settlement charges at the listing's cached price.
        "enable_prompt_tokens_details": True,
        **engine.extra,
    }
    if listing.task == "embed":
        # vLLM's pooling runner: /v1/embeddings, with the model's own pooling (sentence-transformers'
        # modules.json); the prompt token details belong to the generate runner's frontend.
        engine_kwargs["runner"] = "pooling"
        del engine_kwargs["enable_prompt_tokens_details"]
    if engine.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = engine.max_num_seqs
    if engine.tool_parser is not None:
        # vLLM frontend flags: Ray Serve LLM hands them to vLLM's OpenAI serving layer, which
        # then parses the model's tool calls (tool_choice auto, required, a named function).
        engine_kwargs.update(enable_auto_tool_choice=True, tool_call_parser=known_tool_parser(listing))
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": listing.id, "model_source": listing.resolved_source(model_dir)},
        "engine_kwargs": engine_kwargs,
        "deployment_config": engine_deployment_options(listing),
        # vLLM's own metrics (KV cache use, queue, tokens) through Ray's metrics agent.
        "log_engine_metrics": True,
        "experimental_configs": {"stream_batching_interval_ms": engine.stream_batching_interval_ms},
    }
    if listing.lora is not None:
        # Adapters reach the engine through Serve's multiplexing (deployments/lora.py); vLLM
        # holds as many at once as a replica keeps loaded.
        lora = listing.lora
        engine_kwargs.update(enable_lora=True, max_lora_rank=lora.max_rank, max_loras=lora.max_adapters_per_replica)
        config["lora_config"] = {"max_num_adapters_per_replica": lora.max_adapters_per_replica}
    placement = placement_for(listing, groups)
    if placement is None:
        config["accelerator_config"] = {"kind": "cpu"}
    else:
        config["placement_group_config"] = placement.as_config()
        if placement.accelerator_type:
            config["accelerator_type"] = placement.accelerator_type
    return LLMConfig(**config)


def known_tool_parser(listing: Listing) -> str:
    """The listing's tool parser, if vLLM has one of that name.

    The catalog checks only the name's shape: vLLM's registry is a module that imports vLLM and
    torch (seconds), which loading a catalog must not cost. Building the engine config imports
    them anyway (LLMConfig), so the name is checked here, before any replica starts. Ray Serve
    LLM does not load vLLM's tool parser plugins, so only built-in parsers can work.
    """
    from vllm.tool_parsers import ToolParserManager

    name = listing.engine.tool_parser
    known = ToolParserManager.list_registered()
    if name not in known:
        raise CatalogError(
            f"listing {listing.id!r}: field engine.tool_parser: vLLM has no tool parser {name!r} "
            f"(known: {', '.join(known)})"
        )
    return name  # type: ignore[return-value]


def fake_engine_placement(listing: Listing, groups: dict[str, WorkerGroup], num_cpus: float) -> dict[str, Any]:
    """The placement group a GPU listing's LLMServer replica gets, for the fake engine.

    The bundles come from Ray Serve LLM's own engine config for this listing; the replica
    actor's CPU joins the first bundle, as LLMServer does, and the GPUs stay reserved as
    vLLM's workers would hold them. CPU listings get no placement group.
    """
    if placement_for(listing, groups) is None:
        return {}
    engine_config = llm_config_for(listing, groups=groups).get_engine_config()
    bundles = [dict(bundle) for bundle in engine_config.placement_bundles]
    bundles[0]["CPU"] = bundles[0].get("CPU", 0) + num_cpus
    return {"placement_group_bundles": bundles, "placement_group_strategy": engine_config.placement_strategy}


def adapter_paths(listing: Listing, model_dir: Path | None = None) -> dict[str, str]:
    """Each LoRA adapter's public id and the folder its weights are read from."""
    return {adapter.id: adapter.resolved_source(model_dir) for adapter in listing.adapters}


def _engine_deployment(listing: Listing, args: AppArgs, groups: dict[str, WorkerGroup]) -> Application:
    model_dir = Path(args.model_dir) if args.model_dir else None
    if args.engine == "fake":
        from tokenmart.doubles.fake_engine import FakeEngine

        fake = args.fake_engine
        return serve.deployment(
            FakeEngine,
            name=f"fake:{listing.id}",
            ray_actor_options={"num_cpus": fake.num_cpus},
            **engine_deployment_options(listing),
            **fake_engine_placement(listing, groups, fake.num_cpus),
        ).bind(
            listing.id,
            reply_tokens=fake.reply_tokens,
            token_delay_s=fake.token_delay_s,
            adapters=adapter_paths(listing, model_dir),
            max_adapters=listing.lora.max_adapters_per_replica if listing.lora else 1,
            typed=fake.typed,
            context_length=listing.context_length,
        )

    from ray.serve.llm import build_llm_deployment

    bind_kwargs = None
    if listing.lora is not None:
        from .lora_loader import CatalogAdapterLoader

        loader = functools.partial(
            CatalogAdapterLoader, adapter_paths(listing, model_dir), max_rank=listing.lora.max_rank
        )
        bind_kwargs = {"model_downloader": loader}
    from .engine_server import MarketplaceLLMServer

    return build_llm_deployment(
        llm_config_for(listing, model_dir, groups),
        name_prefix="LLMServer:",  # Ray Serve LLM's own deployment names, which dashboards use
        bind_kwargs=bind_kwargs,
        deployment_cls=MarketplaceLLMServer,
    )


def ingress_deployment_options(options: IngressOptions) -> dict[str, Any]:
    """Serve options of the ingress deployment (the plain Ray Serve LLM app of the benchmarks
    takes the same, so only the ingress code differs)."""
    return {
        # The ingress refuses inference requests over its own `max_ongoing_requests` with an
        # OpenAI-style 503 (shedding.py); Serve lets the excess in, so it is refused rather than
        # queued in front of the replica.
        "max_ongoing_requests": options.max_ongoing_requests + options.max_queued_requests,
        "max_queued_requests": options.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
            "look_back_period_s": options.look_back_period_s,
            "metrics_interval_s": options.metrics_interval_s,
        },
        "ray_actor_options": {"num_cpus": options.num_cpus},
    }


def model_cards(catalog: Catalog) -> dict[str, Any]:
    """Ray Serve LLM's ingress wants one card per engine deployment."""
    from .ray_llm import ModelCard

    return {
        listing.id: ModelCard(id=listing.id, object="model", owned_by=listing.owner, permission=[], metadata={})
        for listing in catalog.listings
    }


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    """The marketplace application: one engine deployment per listing behind the ingress.

    A dict (a Serve config's `args`) is validated here, in the process that builds the app,
    so the settings left to the environment are read from the Ray processes' environment.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    catalog = args.load_catalog()

    from ray.serve.llm.ingress import make_fastapi_ingress

    from .ingress import ENDPOINTS, MarketplaceIngress, create_fastapi_app

    deployments = {listing.id: _engine_deployment(listing, args, catalog.groups) for listing in catalog.listings}
    # Ray Serve LLM's ingress wants one card per deployment; customers see every offer,
    # adapters included, through the marketplace's own /v1/models.
    cards = model_cards(catalog)
    app = create_fastapi_app(args.ingress.max_body_bytes, args.ingress.max_ongoing_requests)
    ingress_cls = make_fastapi_ingress(MarketplaceIngress, endpoint_map=ENDPOINTS, app=app)
    return serve.deployment(ingress_cls, name="MarketplaceIngress", **ingress_deployment_options(args.ingress)).bind(
        llm_deployments=deployments,
        model_cards=cards,
        catalog=catalog.model_dump(mode="json"),
        redis_url=args.redis_url,
        redis_timeout_s=args.redis_timeout_s,
        default_limits=args.default_limits.model_dump(),
        spool_dir=args.spool_dir,
        # A SecretStr: kept out of reprs and logs on its way to the replicas.
        admin_token=args.admin_token,
        tokenizer_sources=_tokenizer_sources(catalog, args),
        plain_requests=args.engine == "fake" and not args.fake_engine.typed,
        per_key_metrics=args.metrics.per_key_labels,
        accounts=args.accounts.model_dump(),
    )


# The Serve config's `import_path` of `build_app`: the launcher, the cluster configs and the
# chart use this one (tests/unit/test_config.py checks the YAML that must spell it).
IMPORT_PATH = "tokenmart.deployments.app:build_app"


def _tokenizer_sources(catalog: Catalog, args: AppArgs) -> dict[str, str]:
    """Where the ingress finds each listing's tokenizer, to count prompts as the engine will."""
    if args.engine == "fake" and not args.fake_engine.typed:
        return {}  # the fake engine counts words, which the byte bound covers
    model_dir = Path(args.model_dir) if args.model_dir else None
    # Embedding inputs are held at the byte bound (gateway._embed), which needs no tokenizer.
    return {
        listing.id: listing.resolved_source(model_dir) for listing in catalog.listings if listing.task == "generate"
    }
