"""LoRA adapters from the catalog, served through Ray Serve LLM's model multiplexing.

A listing's adapters are sold as models of their own. The ingress sends an adapter's requests
to the base listing's deployment with the adapter id as Serve's multiplexed model id, so they
go to replicas that already hold the adapter when there are any. On the replica, LLMServer asks
its model loader for the adapter, keeps up to `max_adapters_per_replica` of them (least
recently used first out) and registers each with vLLM under its public id, which is also the
request's `model`.

Ray Serve LLM's own loader reads adapters from cloud storage (s3/gs/azure) under one
`dynamic_lora_loading_path`. Catalog adapters are local folders instead (a volume or the
image; `builtin:` ones are built by tokenmart), so `lora_loader.CatalogAdapterLoader` swaps
the download for a lookup in the catalog and the folder check below, which the launcher also
runs before anything starts. This module does not import Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(ValueError):
    """An adapter folder cannot be served; the message says what is wrong with it."""


def adapter_rank(path: str | Path) -> int:
    """The rank of the peft adapter in `path`, after checking the folder holds one."""
    folder = Path(path)
    config_path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{config_path} does not exist: the adapter source must be a peft adapter folder") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config_path} cannot be read: {exc}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{config_path} does not describe a LoRA adapter (peft_type must be LORA)")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise AdapterError(f"{folder} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{config_path} has no valid rank 'r' (got {rank!r})")
    return rank


def check_adapter(adapter_id: str, path: str | Path, max_rank: int) -> None:
    """Refuse an adapter folder the engine would refuse, naming the adapter and the fix."""
    try:
        rank = adapter_rank(path)
    except AdapterError as exc:
        raise AdapterError(f"adapter {adapter_id!r}: {exc}") from None
    if rank > max_rank:
        raise AdapterError(
            f"adapter {adapter_id!r} has rank {rank}, above its listing's lora.max_rank ({max_rank}); "
            f"raise max_rank to at least {rank}"
        )
