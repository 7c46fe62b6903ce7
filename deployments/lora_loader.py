"""Ray Serve LLM's model loader for catalog LoRA adapters (see deployments/lora.py)."""

from __future__ import annotations

from typing import Any

from .lora import AdapterError, check_adapter
from .ray_llm import DiskMultiplexConfig, LoraModelLoader, global_id_manager


class CatalogAdapterLoader(LoraModelLoader):
    """LLMServer's model loader for a listing's catalog adapters (local folders, no download)."""

    def __init__(self, adapters: dict[str, str], *, max_rank: int, **loader_options: Any) -> None:
        super().__init__(**loader_options)
        self.adapters = dict(adapters)
        self.max_rank = max_rank

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> DiskMultiplexConfig:
        cached = self.disk_cache.get(lora_model_id)
        if cached is not None:
            return cached
        path = self.adapters.get(lora_model_id)
        if path is None:
            raise AdapterError(f"{lora_model_id!r} is not an adapter of {llm_config.model_id!r}")
        check_adapter(lora_model_id, path, self.max_rank)
        disk = DiskMultiplexConfig(
            model_id=lora_model_id,
            max_total_tokens=None,
            local_path=str(path),
            lora_assigned_int_id=global_id_manager.next(),
        )
        self.disk_cache[lora_model_id] = disk
        return disk
