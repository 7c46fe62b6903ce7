"""The marketplace's vLLM engine deployment: Ray Serve LLM's LLMServer, plus one duty.

Ray does not cancel a streaming call whose caller died, so an ingress replica lost mid-stream
would leave its requests generating in vLLM until max_tokens. This server stops them
(`caller_watch.py`); everything else is LLMServer's.
"""

from __future__ import annotations

from typing import Any

from .caller_watch import CallerWatch
from .ray_llm import LLMServer


class MarketplaceLLMServer(LLMServer):
    async def __init__(self, *args: Any, **kwargs: Any) -> None:
        await super().__init__(*args, **kwargs)
        self._callers = CallerWatch()

    async def chat(self, request: Any, raw_request_info: Any = None) -> Any:
        return self._callers.follow(await super().chat(request, raw_request_info), raw_request_info)

    async def completions(self, request: Any, raw_request_info: Any = None) -> Any:
        return self._callers.follow(await super().completions(request, raw_request_info), raw_request_info)
