"""One local Ray cluster with the marketplace app on the fake engine, started once for this directory.

Starting Ray and Serve costs tens of seconds on a small machine, so it happens once; every
test makes its own API keys through the admin API, so tests do not share balances.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tokenmart.deployments.catalog import Catalog, Listing
from tokenmart.deployments.request_id import PROXY_ENV

from ..helpers import free_port, wait_until

SERVE_READY_TIMEOUT_S = 300.0


TEST_CATALOG = Catalog.model_validate(
    {
        "listings": [
            {
                "id": "alpha-chat",
                "owner": "alpha-labs",
                "source": "fake/alpha",
                "description": "cheap test listing",
                "context_length": 4096,
                # 0.15 / 0.6 per 1M: most token counts cost a fraction of a micro-USD extra,
                # so the rounding-up rule is exercised.
                # Prompt tokens from the prefix cache at a fifth of the prompt price.
                "pricing": {
                    "prompt_usd_per_1m": "0.15",
                    "completion_usd_per_1m": "0.6",
                    "cached_prompt_usd_per_1m": "0.03",
                },
                "default_max_tokens": 64,
                "accelerator": {"kind": "cpu"},
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
                # Two adapters sold on alpha's replicas; one loaded at a time, so they take turns.
                "lora": {
                    "max_rank": 8,
                    "max_adapters_per_replica": 1,
                    "adapters": [
                        {
                            "id": "alpha-chat:ahoy",
                            "source": "fake/alpha-ahoy",
                            "description": "alpha, greeting first",
                            "pricing": {"prompt_usd_per_1m": "0.3", "completion_usd_per_1m": "1.2"},
                        },
                        {
                            "id": "alpha-chat:legal",
                            "source": "fake/alpha-legal",
                            "owner": "gamma-law",
                            "pricing": {"prompt_usd_per_1m": "5", "completion_usd_per_1m": "20"},
                        },
                    ],
                },
            },
            {
                "id": "beta-chat",
                "owner": "beta-labs",
                "source": "fake/beta",
                "description": "premium test listing",
                "context_length": 8192,
                "pricing": {"prompt_usd_per_1m": "2.5", "completion_usd_per_1m": "10"},
                "default_max_tokens": 128,
                "accelerator": {"kind": "cpu"},
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
            },
            {
                # Two replicas behind Ray Serve LLM's prefix-cache affinity router (test_routing.py).
                "id": "prefix-chat",
                "owner": "prefix-labs",
                "source": "fake/prefix",
                "context_length": 4096,
                "pricing": {"prompt_usd_per_1m": "0.1", "completion_usd_per_1m": "0.2"},
                "default_max_tokens": 32,
                "accelerator": {"kind": "cpu"},
                "routing": "prefix_aware",
                "routing_imbalance_threshold": 2,
                "autoscaling": {
                    "min_replicas": 2,
                    "max_replicas": 2,
                    "target_ongoing_requests": 2,
                    "max_ongoing_requests": 4,
                },
            },
            {
                # An embedding listing (test_embeddings.py): billed per prompt token.
                "id": "embed-small",
                "owner": "delta-labs",
                "source": "fake/embed",
                "task": "embed",
                "context_length": 512,
                "pricing": {"prompt_usd_per_1m": "0.02", "completion_usd_per_1m": "0"},
                "default_max_tokens": 1,
                "accelerator": {"kind": "cpu"},
            },
            {
                # A weighted fair queue in front of the engine (test_fair_share.py): one request at a
                # time from each ingress replica, 20 waiting at most, a 4 s wait at most.
                "id": "fair-chat",
                "owner": "fair-labs",
                "source": "fake/fair",
                "context_length": 4096,
                "pricing": {"prompt_usd_per_1m": "0.1", "completion_usd_per_1m": "0.2"},
                "default_max_tokens": 16,
                "accelerator": {"kind": "cpu"},
                "fair_share": {"concurrency": 1, "deadline_s": 4, "max_waiting": 20},
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 2},
            },
            {
                # Small and busy: one request at a time, one waiting, a 64-token context; beta-chat
                # serves what it cannot (test_fallbacks.py).
                "id": "tiny-chat",
                "owner": "tiny-labs",
                "source": "fake/tiny",
                "context_length": 64,
                "pricing": {"prompt_usd_per_1m": "0.05", "completion_usd_per_1m": "0.1"},
                "default_max_tokens": 16,
                "accelerator": {"kind": "cpu"},
                "fallbacks": ["beta-chat"],
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 1,
                    "target_ongoing_requests": 1,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 1,
                },
            },
        ],
        # Fair-share tiers and their weights; keys and organizations without one are "standard".
        "tiers": {"free": 1, "standard": 2, "premium": 4},
        "default_tier": "standard",
    }
)


class Marketplace:
    """The running app: its URL, the admin token, and small helpers the tests share."""

    def __init__(self, base_url: str, admin_token: str) -> None:
        self.base_url = base_url
        self.admin_token = admin_token
        self.http = httpx.Client(base_url=base_url, timeout=30.0)
        self.metrics_url: str | None = None  # Ray's metrics export of the node, when the fixture has one

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def create_key(self, name: str = "test", credit_usd: float = 1, **fields: Any) -> dict[str, Any]:
        """POST /admin/v1/keys; returns the created record including the one-time `key`."""
        response = self.http.post(
            "/admin/v1/keys", json={"name": name, "credit_usd": credit_usd, **fields}, headers=self.admin_headers
        )
        assert response.status_code == 201, response.text
        return response.json()

    def create_org(self, name: str = "test", credit_usd: float = 1) -> dict[str, Any]:
        """POST /admin/v1/orgs; its keys come from `create_key(..., credit_usd=0, org_id=...)`."""
        response = self.http.post(
            "/admin/v1/orgs", json={"name": name, "credit_usd": credit_usd}, headers=self.admin_headers
        )
        assert response.status_code == 201, response.text
        return response.json()

    def org_info(self, org_id: str) -> dict[str, Any]:
        response = self.http.get(f"/admin/v1/orgs/{org_id}", headers=self.admin_headers)
        assert response.status_code == 200, response.text
        return response.json()

    def key_info(self, key: str) -> dict[str, Any]:
        response = self.http.get("/v1/key", headers=self.auth(key))
        assert response.status_code == 200, response.text
        return response.json()

    def usage(self, key: str, **params: str) -> dict[str, Any]:
        response = self.http.get("/v1/usage", headers=self.auth(key), params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def chat(self, key: str, model: str = "alpha-chat", path: str = "/v1/chat/completions", **body: Any):
        body.setdefault("messages", [{"role": "user", "content": "hello marketplace"}])
        return self.http.post(path, json={"model": model, **body}, headers=self.auth(key))

    # -- what the fake engine and the price list make a request cost ------------------
    @staticmethod
    def listing(model_id: str) -> Listing:
        found = TEST_CATALOG.get(model_id)
        assert found is not None, model_id
        return found

    def cost_micros(self, model_id: str, prompt_tokens: int, completion_tokens: int) -> int:
        """The contract's price math, done independently: integer micro-USD, rounded up."""
        prices = self.listing(model_id).pricing
        numerator = prompt_tokens * int(prices.prompt_usd_per_1m * 1_000_000) + completion_tokens * int(
            prices.completion_usd_per_1m * 1_000_000
        )
        return -(-numerator // 1_000_000)

    wait_until = staticmethod(wait_until)

    def wait_until_healthy(self) -> None:
        wait_until(
            lambda: self.http.get("/healthz").status_code == 200,
            SERVE_READY_TIMEOUT_S,
            interval_s=0.2,
            what="GET /healthz",
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Marketplace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Package scope: started once for this directory, and stopped as soon as its last test is
# done, so a combined run does not keep four idle replicas up during the e2e tests.
@pytest.fixture(scope="package")
def marketplace(redis_server) -> Iterator[Marketplace]:
    import ray
    from ray import serve

    from tokenmart.deployments.app import AppArgs, build_app

    with ray_serve_session() as admin_token:
        metrics_port = free_port()
        ray.init(
            # "local": always a fresh instance, never another session's running cluster.
            address="local",
            num_cpus=8,
            include_dashboard=False,
            # Ray's metrics agent exports every replica's metrics here, reported each second.
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 1000},
            # Replica logs stay in this Ray session's logs/serve dir under /tmp/ray.
            log_to_driver=False,
            runtime_env={"env_vars": {"TOKENMART_ADMIN_TOKEN": admin_token}},
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            AppArgs(
                catalog=TEST_CATALOG,
                engine="fake",
                redis_url=redis_server.url,
                fake_engine={"token_delay_s": 0.02},
                ingress={"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.1},
            )
        )
        serve.run(app, name="tokenmart", route_prefix="/")
        with Marketplace(f"http://127.0.0.1:{port}", admin_token) as market:
            market.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            market.wait_until_healthy()
            yield market


@contextmanager
def ray_serve_session() -> Iterator[str]:
    """A fresh admin token in the environment for the Ray cluster a fixture starts; on exit,
    Serve and Ray are shut down and the environment is put back. Yields the admin token."""
    import ray
    from ray import serve

    admin_token = "adm-" + secrets.token_urlsafe(24)
    names = ("TOKENMART_ADMIN_TOKEN", "RAY_AUTH_MODE", *PROXY_ENV)
    previous = {name: os.environ.get(name) for name in names}
    # Set here too, so anything Ray starts from this process inherits it. PROXY_ENV makes
    # Ray's HTTP proxy load tokenmart's request-id guard, as `tokenmart up` and the chart do.
    # These clusters serve through Serve's Python proxy (serve mode `proxy`); the e2e stack,
    # started by `tokenmart up`, serves through its default, HAProxy, so both modes are tested.
    os.environ["TOKENMART_ADMIN_TOKEN"] = admin_token
    os.environ.update(PROXY_ENV)
    # Ray caches RAY_AUTH_MODE when it is imported. A value set later in this process
    # (the launcher's Serve client sets it) would start a token-auth GCS that this driver
    # cannot talk to. Unset, ray.init chooses the mode for its new local cluster and
    # applies it to this process as well.
    os.environ.pop("RAY_AUTH_MODE", None)
    try:
        yield admin_token
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
