"""The one door to Ray Serve LLM's private modules (`ray.llm._internal`).

Ray Serve LLM's public package does not export the OpenAI protocol models, LLMServer or its
LoRA loader, and tokenmart builds on all of them. Every private name it uses is listed in
`PRIVATE_NAMES` and resolved here, on first use, so a Ray upgrade that moves one touches this
file only (`tests/unit/test_ray_llm_door.py` resolves each name and checks that no other
module imports `ray.llm._internal`). Resolving on first use keeps what needs no engine light:
the fake engine's replicas never import vLLM through this module.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODELS = "ray.llm._internal.serve.core.configs.openai_api_models"

# Our name -> (Ray's private module, its name there).
PRIVATE_NAMES: dict[str, tuple[str, str]] = {
    # OpenAI protocol models, which Ray Serve LLM takes from vLLM
    "ChatCompletionRequest": (_MODELS, "ChatCompletionRequest"),
    "ChatCompletionResponse": (_MODELS, "ChatCompletionResponse"),
    "CompletionRequest": (_MODELS, "CompletionRequest"),
    "CompletionResponse": (_MODELS, "CompletionResponse"),
    "ErrorResponse": (_MODELS, "ErrorResponse"),
    "EmbeddingCompletionRequest": (_MODELS, "EmbeddingCompletionRequest"),
    "ModelCard": (_MODELS, "ModelCard"),
    # Materialises a chat request's lazy content iterables, as Ray Serve LLM's ingress does
    "sanitize_chat_request": ("ray.llm._internal.serve.core.ingress.utils", "_sanitize_chat_completion_request"),
    # What an ingress passes to an engine call beside the request (our caller header rides on it)
    "RawRequestInfo": ("ray.llm._internal.serve.core.protocol", "RawRequestInfo"),
    # The engine deployment and its LoRA loading
    "LLMServer": ("ray.llm._internal.serve.core.server.llm_server", "LLMServer"),
    "LoraModelLoader": ("ray.llm._internal.serve.utils.lora_serve_utils", "LoraModelLoader"),
    "DiskMultiplexConfig": ("ray.llm._internal.serve.core.configs.llm_config", "DiskMultiplexConfig"),
    "global_id_manager": ("ray.llm._internal.common.models", "global_id_manager"),
}

__all__ = sorted(PRIVATE_NAMES)


def __getattr__(name: str) -> Any:
    if name not in PRIVATE_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = PRIVATE_NAMES[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # resolved once
    return value
