"""How an engine deployment's requests are spread over its replicas (catalog `routing`).

`power_of_two` is Ray Serve's default router: of two random replicas, the one with the
shorter queue. `prefix_aware` is Ray Serve LLM's `PrefixCacheAffinityRouter`: while the
replicas' queues are within `routing_imbalance_threshold` of each other, a request goes to
the replica that has already seen the longest prefix of its prompt, so the engine serves
that prefix from its KV cache (and the customer pays the cached prompt price for it); once
one replica's queue runs ahead by more than the threshold, requests spill over to the
others by power of two.

Ray's router reads the prompt from request objects (`.messages` / `.prompt`). The fake
engine's requests travel as plain dicts (no vLLM import on its replicas), so tokenmart's
subclass reads dicts too; typed requests (vLLM) are read exactly as Ray reads them.

Importing this module imports vLLM (Ray's router does), so the app builder names the class
by its path (`app.PREFIX_ROUTER`) and only the processes that route requests load it.
"""

from __future__ import annotations

from typing import Any

from ray.serve.llm.request_router import PrefixCacheAffinityRouter


class PrefixRouter(PrefixCacheAffinityRouter):
    """Ray Serve LLM's prefix-cache affinity router, for typed and plain-dict requests."""

    def _extract_text_from_request(self, pending_request: Any) -> str:
        for arg in pending_request.args:
            if isinstance(arg, dict) and ("messages" in arg or "prompt" in arg):
                prompt = arg["messages"] if "messages" in arg else arg["prompt"]
                return self._normalize_prompt_to_string(prompt)
        return super()._extract_text_from_request(pending_request)
