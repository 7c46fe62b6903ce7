"""Stand-ins for parts tokenmart serves in front of, kept apart from the serving code.

- `fake_engine.py`: an engine deployment that answers like vLLM behind Ray Serve LLM (same
  response shapes, same usage rules) without a model; it backs `tokenmart up --engine fake`,
  the integration and multi-node tests, and benchmarks of the ingress alone.
- `baseline.py`: plain Ray Serve LLM (its own ingress, no keys, no billing) in front of the
  marketplace's engine deployments, the baseline of `loadtest/bench.py`.

Nothing in `tokenmart.deployments` imports this package at module level; the app builder
imports the fake engine only when a catalog is served with `engine: fake`.
"""
