"""The Serve application's settings: `AppArgs`, the one typed place they are read.

Every setting is a pydantic field whose description documents it once, for the code, the
Serve config's `args` and the Helm chart's values.schema.json (`cluster/helm_schema.py`).
Every environment variable the serving code honours is read here, by a field's default
factory (the `*_from_env` functions below), and named in that field's description. Modules
get their values from `AppArgs` through their constructors, never from the environment.

The defaults are read where the app is built: on a Ray node, from the environment of the
Ray processes (`tokenmart up` starts the Ray head with it; the chart gives every Ray pod the
same variables), or in the driver of `serve.run`.

This module imports no Ray, so the CLI and the chart's schema generator load it cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from .catalog import Catalog, load_catalog
from .schemas import Limits

# -- the environment ------------------------------------------------------------------------
REDIS_URL_ENV = "REDIS_URL"
ADMIN_TOKEN_ENV = "TOKENMART_ADMIN_TOKEN"
SPOOL_DIR_ENV = "TOKENMART_SPOOL_DIR"
CACHE_DIR_ENV = "TOKENMART_CACHE_DIR"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_SPOOL_DIR = "/tmp/tokenmart-spool"
# Operator defaults for keys that set no limits of their own: the default of
# `AppArgs.default_limits`, and the built-in fallback of each limit an operator leaves unset.
DEFAULT_LIMITS = Limits(rpm=600, tpm=1_000_000, max_concurrency=64, max_tokens_per_request=131_072)


def redis_url_from_env() -> str | None:
    """$REDIS_URL, or None (the launcher then starts its own Redis)."""
    return os.environ.get(REDIS_URL_ENV) or None


def admin_token_from_env() -> SecretStr | None:
    """$TOKENMART_ADMIN_TOKEN; unset or empty: None (no admin API)."""
    value = os.environ.get(ADMIN_TOKEN_ENV)
    return SecretStr(value) if value else None


def spool_dir_from_env() -> str:
    return os.environ.get(SPOOL_DIR_ENV) or DEFAULT_SPOOL_DIR


def cache_dir_from_env() -> Path:
    """The local model cache: $TOKENMART_CACHE_DIR, else ~/.cache/tokenmart."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "tokenmart")


def _default_redis_url() -> str:
    return redis_url_from_env() or DEFAULT_REDIS_URL


def _default_model_dir() -> str:
    return str(cache_dir_from_env() / "models")


# -- the settings ---------------------------------------------------------------------------
class IngressOptions(BaseModel):
    """Deployment options of the marketplace ingress (it autoscales like the models)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=1, description="Fewest ingress replicas.")
    max_replicas: int = Field(default=2, ge=1, description="Most ingress replicas.")
    target_ongoing_requests: float = Field(
        default=32, gt=0, description="Requests in flight per ingress replica that the autoscaler aims for."
    )
    max_ongoing_requests: int = Field(
        default=128,
        ge=1,
        description="Inference requests one ingress replica serves at once; beyond this it answers each new one "
        "with a fast 503 (server_overloaded, Retry-After) instead of queueing it.",
    )
    max_queued_requests: int = Field(
        default=512,
        ge=1,
        description="Requests beyond max_ongoing_requests that still reach an ingress replica (to be refused "
        "there, or to reach the admin and account routes); beyond this Ray Serve answers a plain 503.",
    )
    upscale_delay_s: float = Field(default=3.0, ge=0, description="Seconds of high load before adding a replica.")
    downscale_delay_s: float = Field(default=30.0, ge=0, description="Seconds of low load before removing a replica.")
    look_back_period_s: float = Field(
        default=5.0, gt=0, description="Seconds of load the autoscaler averages (Serve's default: 30)."
    )
    metrics_interval_s: float = Field(
        default=1.0, gt=0, description="How often replicas and handles report load (Serve's default: 10 s)."
    )
    num_cpus: float = Field(
        default=0.5,
        ge=0,
        description="Logical CPUs per ingress replica; small, so it schedules next to CPU engines on one machine.",
    )
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body in bytes; a larger one gets 413."
    )


class FakeEngineOptions(BaseModel):
    """The deterministic fake engine that `engine: fake` serves every listing with."""

    model_config = ConfigDict(extra="forbid")

    reply_tokens: int = Field(default=16, ge=1, description="Tokens the fake engine answers with.")
    token_delay_s: float = Field(default=0.005, ge=0, description="Seconds between the fake engine's tokens.")
    num_cpus: float = Field(default=0.1, ge=0, description="Logical CPUs per fake engine replica.")
    typed: bool = Field(
        default=False,
        description="Send the fake engine the pydantic requests a vLLM engine gets and count prompts with each "
        "listing's own tokenizer, so it costs the ingress what vLLM would (benchmarks). Off: plain dicts and "
        "byte bounds, and the fake engine's replicas never import vLLM.",
    )


class MetricsOptions(BaseModel):
    """The marketplace's own Prometheus metrics."""

    model_config = ConfigDict(extra="forbid")

    per_key_labels: bool = Field(
        default=False,
        description="Add a key_id label to the request, token and spend counters: one series per key and "
        "model, so only for marketplaces with a bounded number of keys.",
    )


class AccountOptions(BaseModel):
    """How long per-request records are kept, and the spend alerts (docs/accounts.md)."""

    model_config = ConfigDict(extra="forbid")

    generation_retention_days: int = Field(
        default=30, ge=1, le=3650, description="Days GET /v1/generation can look a response up."
    )
    ledger_retention_days: int | None = Field(
        default=None,
        ge=1,
        le=36500,
        description="Ledger events older than this are trimmed hourly into a per-organization checkpoint of "
        "totals (reconcile counts it; export cannot return them). Default: keep every event.",
    )
    deliver_alerts: bool = Field(
        default=True, description="Ingress replicas deliver the spend alerts settlements raise (webhooks)."
    )


# AppArgs fields whose default comes from the environment of the process that builds the app.
ENVIRONMENT_FIELDS = frozenset({"redis_url", "model_dir", "spool_dir", "admin_token"})


class AppArgs(BaseModel):
    """Arguments of `build_app`; the same shape goes into a Serve config's `args`."""

    model_config = ConfigDict(extra="forbid")

    catalog_path: str | None = Field(
        default=None, description="A catalog YAML file to serve. Give this or `catalog`, not both."
    )
    catalog: Catalog | None = Field(
        default=None,
        description="The catalog inline, in the catalog file's schema. Give this or `catalog_path`, not both.",
    )
    redis_url: str = Field(
        default_factory=_default_redis_url,
        description="Redis for keys, rate limits and billing: redis://[:password@]host:port/db, or through "
        "Sentinel redis+sentinel://[:password@]host1:26379,host2:26379/<service>[/<db>][?sentinel_password=...] "
        "(the password is the data nodes'; options in docs/redis.md). Redis must run with maxmemory-policy "
        f"noeviction. Default: ${REDIS_URL_ENV}, else {DEFAULT_REDIS_URL}.",
    )
    redis_timeout_s: float = Field(
        default=1.0, gt=0, description="Seconds a Redis call may take before the request gets a 503."
    )
    model_dir: str | None = Field(
        default_factory=_default_model_dir,
        description=f"Where `builtin:` model sources are found. Default: the local model cache, "
        f"${CACHE_DIR_ENV}/models, else ~/.cache/tokenmart/models.",
    )
    engine: Literal["vllm", "fake"] = Field(
        default="vllm",
        description="vllm: Ray Serve LLM with vLLM. fake: every listing served by the deterministic fake "
        "engine (tests, load tests).",
    )
    fake_engine: FakeEngineOptions = Field(
        default_factory=FakeEngineOptions, description="Options of the fake engine (engine: fake)."
    )
    ingress: IngressOptions = Field(
        default_factory=IngressOptions, description="Deployment and autoscaling options of the ingress."
    )
    metrics: MetricsOptions = Field(default_factory=MetricsOptions, description="Options of the marketplace metrics.")
    accounts: AccountOptions = Field(
        default_factory=AccountOptions, description="Retention of generation records and the ledger; spend alerts."
    )
    default_limits: Limits = Field(
        default_factory=DEFAULT_LIMITS.model_copy,
        description="Limits of keys that set none of their own (rpm, tpm, max_concurrency, "
        "max_tokens_per_request); a limit left unset here keeps its built-in default.",
    )
    spool_dir: str = Field(
        default_factory=spool_dir_from_env,
        description="Folder of the settlement spool: settlements Redis could not take, replayed once it "
        "answers (one file per ingress process). Put it on a volume that outlives the pod. "
        f"Default: ${SPOOL_DIR_ENV}, else {DEFAULT_SPOOL_DIR}.",
    )
    admin_token: SecretStr | None = Field(
        default_factory=admin_token_from_env,
        exclude=True,
        description=f"Bearer token of the admin API, from ${ADMIN_TOKEN_ENV} only. A Serve config is "
        "shown in plain text on the Ray dashboard, so the token is never an argument: it is read from "
        "the environment of the Ray processes that build the app (`tokenmart up` sets it on the Ray "
        "head, the chart from a Secret), kept as a SecretStr, and left out of every dump. Unset or "
        "empty: the admin API refuses every call.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_admin_token_argument(cls, data: Any) -> Any:
        if isinstance(data, dict) and "admin_token" in data:
            raise ValueError(
                f"admin_token is not an app argument (a Serve config is shown in plain text): "
                f"set {ADMIN_TOKEN_ENV} in the environment of the Ray processes"
            )
        return data

    @model_validator(mode="after")
    def _one_catalog(self) -> AppArgs:
        if (self.catalog is None) == (self.catalog_path is None):
            raise ValueError("give exactly one of catalog_path and catalog")
        return self

    def load_catalog(self) -> Catalog:
        return self.catalog if self.catalog is not None else load_catalog(self.catalog_path)  # type: ignore[arg-type]

    def serve_args(self) -> dict[str, Any]:
        """These arguments as a Serve config's `args`.

        Fields left to their environment default stay out, so the Ray processes that build the
        app read them from their own environment; the admin token never goes in.
        """
        return self.model_dump(mode="json", exclude=set(ENVIRONMENT_FIELDS - self.model_fields_set))
