"""The marketplace's vLLM engine deployment: Ray Serve LLM's LLMServer, plus two duties.

Ray does not cancel a streaming call whose caller died, so an ingress replica lost mid-stream
would leave its requests generating in vLLM until max_tokens. This server stops them
(`caller_watch.py`). And a new replica of a model in a local folder skips Ray Serve LLM's
per-node download task, which has nothing to download and costs a replica's start seconds
(`skip_local_node_init`). Everything else is LLMServer's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .caller_watch import CallerWatch
from .ray_llm import LLMServer


def skip_local_node_init(llm_config: Any) -> bool:
    """Skip Ray Serve LLM's node initialization when the model is a folder on this node.

    Before it starts vLLM, LLMServer runs a Ray task on every node of the replica's placement
    group to download the model files there. For a local folder that task downloads nothing and
    hands back the same path, yet it needs a worker process of its own (its runtime env is not
    the replica's), which starts and imports torch and transformers: several seconds of every new
    replica's start on a small machine (loadtest/results/scaleup). A catalog's local source must
    be present on every node that runs the listing, so nothing is lost. Hub ids and remote
    mirrors still go through the download. Returns whether it was skipped.
    """
    source = llm_config.model_loading_config.model_source
    if not isinstance(source, str) or not Path(source).is_dir():
        return False
    llm_config.get_or_create_callback().ctx.run_init_node = False
    # The one other thing the task does on a node: torch cannot create its kernel cache folder
    # when the folder above is missing (Ray Serve LLM works around it there; so do we, here).
    import torch  # the replica has imported it with vLLM already

    os.makedirs(os.path.join(torch.hub._get_torch_home(), "kernels"), exist_ok=True)
    return True


class MarketplaceLLMServer(LLMServer):
    async def __init__(self, *args: Any, **kwargs: Any) -> None:
        skip_local_node_init(kwargs["llm_config"] if "llm_config" in kwargs else args[0])
        await super().__init__(*args, **kwargs)
        self._callers = CallerWatch()

    async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        return self._callers.follow(await super().chat(request, raw_request_info), raw_request_info)

    async def completions(self, request: Any, raw_request_info: Any = None) -> Any:
        return self._callers.follow(await super().completions(request, raw_request_info), raw_request_info)
