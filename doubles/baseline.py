"""Plain Ray Serve LLM, for side-by-side benchmarks (`loadtest/bench.py`).

`build_plain_app` serves a catalog's listings the way Ray Serve LLM serves them out of the
box: its own `OpenAiIngress`, no keys, no limits, no billing. The engine deployments are the
marketplace's own (same LLMConfig, same autoscaling and queue bounds), so a benchmark of
tokenmart against this app measures the marketplace's ingress and nothing else.

- `engine: vllm` is `ray.serve.llm.build_openai_app` with the listings' LLMConfigs.
- `engine: fake` puts Ray Serve LLM's ingress in front of the fake engine. The fake engine
  then answers with Ray Serve LLM's response types, as LLMServer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application

from tokenmart.deployments.app import (
    AppArgs,
    engine_deployment_options,
    ingress_deployment_options,
    llm_config_for,
    model_cards,
)


def build_plain_app(args: AppArgs | dict[str, Any]) -> Application:
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    catalog = args.load_catalog()
    model_dir = Path(args.model_dir) if args.model_dir else None
    # The marketplace ingress's own deployment options, so only the ingress code differs.
    ingress = ingress_deployment_options(args.ingress)
    if args.engine == "vllm":
        from ray.serve.llm import build_openai_app

        configs = [llm_config_for(listing, model_dir, catalog.groups) for listing in catalog.listings]
        return build_openai_app({"llm_configs": configs, "ingress_deployment_config": ingress})

    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    from .fake_engine import FakeEngine

    fake = args.fake_engine
    engines = {
        listing.id: serve.deployment(
            FakeEngine,
            name=f"plain-fake:{listing.id}",
            ray_actor_options={"num_cpus": fake.num_cpus},
            **engine_deployment_options(listing),
        ).bind(listing.id, reply_tokens=fake.reply_tokens, token_delay_s=fake.token_delay_s, typed=True)
        for listing in catalog.listings
    }
    return serve.deployment(make_fastapi_ingress(OpenAiIngress), name="OpenAiIngress", **ingress).bind(
        llm_deployments=engines, model_cards=model_cards(catalog)
    )
