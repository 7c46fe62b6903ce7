"""Unit tests run without a Ray cluster.

Ray Serve LLM starts a local Ray while it builds a GPU listing's engine deployment. Without
an address, `ray.init` joins the cluster this machine last started (`/tmp/ray/ray_current_cluster`),
which after an integration or e2e run is one that is gone; so each unit test starts its own
(`RAY_ADDRESS=local`), and one it started is stopped again when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def own_local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "local")
    started_here = not ray.is_initialized()
    yield
    if started_here and ray.is_initialized():
        ray.shutdown()
