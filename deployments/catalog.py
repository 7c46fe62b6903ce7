"""The marketplace catalog: one YAML file of listings, parsed into pydantic models.

The same models are used by the local launcher, the Ray Serve app builder and the Helm chart,
so a listing means the same thing wherever it is read. A catalog is validated completely
before anything starts; errors name the listing and the field. Each field's own constraints
are its pydantic `Field` here (the chart's values.schema.json is generated from them); the
rules across fields, listings and worker groups are the table in catalog_rules.py, which the
chart's checks are generated from, so `helm template` refuses what the app refuses.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .catalog_rules import GroupSpec, ListingSpec, catalog_problems
from .placement import Placement, place

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per 1M tokens

# The LoRA ranks vLLM accepts for `max_lora_rank`.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# vLLM tool parser names: hermes, llama3_json, granite-20b-fc, ...
TOOL_PARSER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

DEFAULT_TIER = "standard"
TIER_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"  # a fair-share tier's name

# The most fallback models a listing (or a request's `models`) may name.
MAX_FALLBACKS = 4

# A listing source of this form names a model that tokenmart builds itself
# (see tokenmart.cluster.model_build); it resolves to a folder in the model cache.
BUILTIN_PREFIX = "builtin:"


class CatalogError(ValueError):
    """The catalog cannot be used; the message names the listing and the field."""


class CatalogRulesBroken(ValueError):
    """Rules of catalog_rules.RULES that a catalog breaks, one message each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PRICE_MAX_USD = 10_000
PRICE_DECIMALS = 6  # 1 micro-USD, MICROS_PER_USD
# A price in quotes ("0.15", exact where a YAML number is a float) is plain decimal notation within
# the bounds above (below the power of ten PRICE_MAX_USD, or it exactly), so the chart's schema can
# refuse exactly the strings the app refuses.
_BELOW_MAX = len(str(PRICE_MAX_USD)) - 1
PRICE_STRING_PATTERN = (
    rf"^0*([0-9]{{1,{_BELOW_MAX}}}(\.[0-9]{{1,{PRICE_DECIMALS}}})?|{PRICE_MAX_USD}(\.0{{1,{PRICE_DECIMALS}}})?)$"
)


def _plain_decimal_text(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(PRICE_STRING_PATTERN, value):
        raise ValueError(
            f"a price written as text must be a plain decimal from 0 to {PRICE_MAX_USD} with at most "
            f'{PRICE_DECIMALS} decimal places, like "0.15" (YAML reads 1e-6 as text: write 0.000001)'
        )
    return value


Price = Annotated[
    Decimal,
    BeforeValidator(_plain_decimal_text),
    Field(ge=0, le=PRICE_MAX_USD),
    # The same bounds for the chart's values.schema.json: a JSON schema compares numbers exactly.
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": PRICE_MAX_USD, "multipleOf": 10**-PRICE_DECIMALS},
                {"type": "string", "pattern": PRICE_STRING_PATTERN},
            ]
        }
    ),
]


class Pricing(_Strict):
    """USD per 1M tokens. Kept as Decimal so prices like 0.015 are exact."""

    prompt_usd_per_1m: Price
    completion_usd_per_1m: Price
    # Prompt tokens the engine served from its prefix cache (usage.prompt_tokens_details
    # .cached_tokens); unset: the prompt price.
    cached_prompt_usd_per_1m: Price | None = None

    @field_validator("prompt_usd_per_1m", "completion_usd_per_1m", "cached_prompt_usd_per_1m")
    @classmethod
    def _at_most_six_decimals(cls, value: Decimal | None) -> Decimal | None:
        if value is None:
            return value
        if (value * MICROS_PER_USD) != (value * MICROS_PER_USD).to_integral_value():
            raise ValueError(f"prices may have at most {PRICE_DECIMALS} decimal places (1 micro-USD)")
        return value

    @property
    def prompt_micros_per_1m(self) -> int:
        return int(self.prompt_usd_per_1m * MICROS_PER_USD)

    @property
    def completion_micros_per_1m(self) -> int:
        return int(self.completion_usd_per_1m * MICROS_PER_USD)

    @property
    def cached_prompt_usd(self) -> Decimal:
        return self.prompt_usd_per_1m if self.cached_prompt_usd_per_1m is None else self.cached_prompt_usd_per_1m

    @property
    def cached_prompt_micros_per_1m(self) -> int:
        return int(self.cached_prompt_usd * MICROS_PER_USD)


class Accelerator(_Strict):
    kind: Literal["cpu", "gpu"] = "gpu"
    # Ray accelerator type, e.g. "A100", "H100", "L4" (ray.util.accelerators names).
    type: str | None = None
    # Name of the worker group this listing runs on (used by the Helm chart).
    group: str | None = None


# Ray Serve LLM's default (50 ms) holds back a 1-stream reply's tokens for up to 50 ms each.
STREAM_BATCHING_INTERVAL_MS = 5.0


class EngineArgs(_Strict):
    """vLLM engine arguments. The common ones are typed; `extra` passes the rest through."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_num_seqs: int | None = Field(default=None, ge=1)
    tool_parser: str | None = Field(
        default=None,
        pattern=TOOL_PARSER_PATTERN,
        description=(
            "vLLM's tool call parser for this model's output (e.g. hermes, llama3_json, mistral): turns on "
            "tool_choice auto, required and a named function. Without it, such requests get a 400. The name is "
            "checked against vLLM's registered parsers when the app is built."
        ),
    )
    stream_batching_interval_ms: float = Field(
        default=STREAM_BATCHING_INTERVAL_MS,
        ge=0,
        le=1000,
        description=(
            "How long a replica gathers the engine's tokens before it sends them on as one packet while "
            "streaming (Ray Serve LLM's stream_batching_interval_ms; its own default is 50). Lower gives a "
            "sooner first token and smoother streams for a little more per-token work; 0 sends every token "
            "as it comes. The default is measured in loadtest/results/vllm-bench."
        ),
    )
    # Other vLLM engine arguments; none that the listing sets elsewhere (catalog_rules: extra-sets-no-*).
    extra: dict[str, Any] = Field(default_factory=dict)


class Autoscaling(_Strict):
    """Replica autoscaling of one listing. The defaults scale within seconds, unlike Ray Serve
    LLM's own (target 1e9 ongoing requests: effectively off)."""

    min_replicas: int = Field(default=1, ge=0)  # 0: scale to zero when idle
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=8, gt=0)
    # Requests one replica takes at once; more wait in the caller's queue.
    max_ongoing_requests: int | None = Field(default=None, ge=1)  # default: 4 x target, at least 16
    # Requests that may wait for a replica; beyond this the caller gets a fast 503.
    max_queued_requests: int = Field(default=64, ge=1)
    upscale_delay_s: float = Field(default=3.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    look_back_period_s: float = Field(default=5.0, gt=0)
    # How often replicas and handles report load to the Serve controller.
    metrics_interval_s: float = Field(default=1.0, gt=0)

    @property
    def replica_concurrency(self) -> int:
        return self.max_ongoing_requests or max(int(self.target_ongoing_requests * 4), 16)


class LoraAdapter(_Strict):
    """A LoRA adapter of a listing's base model, sold as its own marketplace model.

    It is served by the base listing's replicas through Ray Serve's model multiplexing: the
    adapter is loaded on the replicas that get its requests and kept while it is in use.
    """

    id: str = Field(pattern=MODEL_ID_PATTERN)
    # A local folder with adapter_config.json and the adapter weights (peft's format), present
    # on every node that runs the base model, or `builtin:<name>` for one tokenmart builds.
    source: str = Field(min_length=1)
    owner: str | None = Field(default=None, min_length=1, max_length=64)  # default: the base's owner
    description: str = ""
    pricing: Pricing
    # Models that serve the adapter's requests when it cannot (see Listing.fallbacks); not the base's.
    fallbacks: list[str] = Field(default_factory=list, max_length=MAX_FALLBACKS)

    def resolved_source(self, model_dir: Path | None = None) -> str:
        return _resolve_builtin(self.source, model_dir)


class Lora(_Strict):
    """LoRA serving on a listing's replicas, and the adapters it publishes."""

    # The largest adapter rank the engine accepts (vLLM's max_lora_rank).
    max_rank: int = Field(default=16, json_schema_extra={"enum": list(LORA_RANKS)})
    # Adapters loaded on one replica at once; the least recently used one is unloaded past this.
    max_adapters_per_replica: int = Field(default=4, ge=1, le=64)
    adapters: list[LoraAdapter] = Field(min_length=1)

    @field_validator("max_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"max_rank must be one of {', '.join(map(str, LORA_RANKS))}")
        return value


class FairShare(_Strict):
    """A listing's weighted fair queue (deployments/fair_queue.py): when the listing is saturated,
    requests wait in it and tenants (organizations) are served in proportion to their tier's
    weight, instead of the first come taking everything."""

    concurrency: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests this listing's engine runs at once from one ingress replica; the rest wait in the fair "
            "queue. Default: the listing's max_ongoing_requests times its min_replicas (at least one)."
        ),
    )
    deadline_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How long a request may wait in the queue before it gets a 503 with Retry-After (never billed).",
    )
    max_waiting: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description=(
            "Requests that may wait in one ingress replica's queue. When it is full, the organization with the "
            "largest backlog for its weight gives up its newest waiting request (a 503), so a newcomer of a "
            "heavier tier still gets in; a newcomer of that organization itself is refused."
        ),
    )

    def concurrency_of(self, scaling: Autoscaling) -> int:
        """Requests the listing runs at once from one ingress replica (default: max_ongoing_requests
        times min_replicas, at least one replica's)."""
        return self.concurrency or scaling.replica_concurrency * max(scaling.min_replicas, 1)


class Listing(_Strict):
    """One marketplace model: what customers see (id, owner, price) and how it is served."""

    id: str = Field(pattern=MODEL_ID_PATTERN)
    owner: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1)
    description: str = ""
    context_length: int = Field(ge=16, le=10_000_000)
    pricing: Pricing
    # Used when a request sets no max_tokens, so every request's cost is bounded.
    default_max_tokens: int = Field(default=256, ge=1)
    accelerator: Accelerator = Accelerator()
    engine: EngineArgs = EngineArgs()
    autoscaling: Autoscaling = Autoscaling()
    # The model's attention heads (config.json num_attention_heads), so a tensor-parallel size
    # that does not divide them is refused before anything starts.
    attention_heads: int | None = Field(default=None, ge=1)
    # LoRA adapters of this model, each published as its own listing with its own price.
    lora: Lora | None = None
    # Multimodal listings: the most prompt tokens one image can become (the vision encoder's
    # maximum, e.g. (image_size / patch_size)^2 from the model's config), so the hold stays an
    # upper bound. Listings without it refuse image parts with a 400.
    max_tokens_per_image: int | None = Field(default=None, ge=1)
    task: Literal["generate", "embed"] = Field(
        default="generate",
        description=(
            "generate: a chat and text completion model (/v1/chat/completions, /v1/completions, /v1/responses). "
            "embed: an embedding model served by vLLM's pooling runner (/v1/embeddings), billed per prompt token."
        ),
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        max_length=MAX_FALLBACKS,
        description=(
            "Models (listing or adapter ids of this catalog) that serve a request for this one, in order, when "
            "it cannot: its engine is overloaded or unavailable, or the prompt is longer than its context. "
            "The request is held at the dearest of them and billed at the price of the one that served. A "
            "request's own `models` list replaces these."
        ),
    )
    fair_share: FairShare | None = Field(
        default=None,
        description=(
            "A weighted fair queue in front of the engine: under overload each organization gets slots in "
            "proportion to its tier's weight (the catalog's tiers). Unset: requests go straight to Ray Serve's "
            "own first-come queue."
        ),
    )
    routing: Literal["power_of_two", "prefix_aware"] = Field(
        default="power_of_two",
        description=(
            "How requests are spread over the listing's replicas: power_of_two (Ray Serve's default: the "
            "shorter queue of two random replicas) or prefix_aware (Ray Serve LLM's prefix-cache affinity "
            "router: a prompt goes to the replica that has seen its longest prefix, so the engine reads that "
            "prefix from its KV cache and the customer pays the cached prompt price for it)."
        ),
    )
    routing_imbalance_threshold: int = Field(
        default=4,
        ge=1,
        description=(
            "prefix_aware only: once one replica's queue is longer than another's by more than this many "
            "requests, requests spill over to the others by power of two instead of following their prefix."
        ),
    )

    def resolved_source(self, model_dir: Path | None = None) -> str:
        """The path or hub id that the engine loads."""
        return _resolve_builtin(self.source, model_dir)

    def rule_spec(self) -> ListingSpec:
        """What the catalog's rules (catalog_rules.py) and placement need to know of this listing."""
        return ListingSpec(
            id=self.id,
            tensor_parallel_size=self.engine.tensor_parallel_size,
            pipeline_parallel_size=self.engine.pipeline_parallel_size,
            accelerator_kind=self.accelerator.kind,
            accelerator_type=self.accelerator.type,
            accelerator_group=self.accelerator.group,
            attention_heads=self.attention_heads,
            min_replicas=self.autoscaling.min_replicas,
            max_replicas=self.autoscaling.max_replicas,
            look_back_period_s=self.autoscaling.look_back_period_s,
            metrics_interval_s=self.autoscaling.metrics_interval_s,
            default_max_tokens=self.default_max_tokens,
            context_length=self.context_length,
            extra_keys=tuple(self.engine.extra),
            adapter_ids=tuple(adapter.id for adapter in self.adapters),
        )

    @property
    def adapters(self) -> list[LoraAdapter]:
        return self.lora.adapters if self.lora else []

    def adapter_listing(self, adapter: LoraAdapter) -> Listing:
        """The adapter as customers see and pay for it: the base model's limits, its own id and price."""
        return self.model_copy(
            update={
                "id": adapter.id,
                "owner": adapter.owner or self.owner,
                "description": adapter.description,
                "pricing": adapter.pricing,
                "fallbacks": adapter.fallbacks,
                "lora": None,
            }
        )

    def cost_micros(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """Integer micro-USD for these tokens, rounded up to the next micro-USD; `cached_tokens`
        of the prompt tokens (served from the engine's prefix cache) at the cached price."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        prices = self.pricing
        numerator = (
            (prompt_tokens - cached) * prices.prompt_micros_per_1m
            + cached * prices.cached_prompt_micros_per_1m
            + completion_tokens * prices.completion_micros_per_1m
        )
        return -(-numerator // TOKENS_PER_PRICE_UNIT)

    def hold_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most these tokens can cost, however many of the prompt tokens turn out cached
        (a cached price above the prompt price is allowed, and held at)."""
        prices = self.pricing
        dearest = max(prices.prompt_micros_per_1m, prices.cached_prompt_micros_per_1m)
        return -(
            -(prompt_tokens * dearest + completion_tokens * prices.completion_micros_per_1m) // TOKENS_PER_PRICE_UNIT
        )


class WorkerGroup(_Strict):
    """A pool of identical GPU nodes (a KubeRay worker group) that listings name."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    accelerator_type: str | None = None
    gpus_per_worker: int = Field(ge=1)
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    # Kubernetes pod resources (requests/limits) for the Helm chart; not used by Ray itself.
    resources: dict[str, Any] = Field(default_factory=dict)

    def rule_spec(self) -> GroupSpec:
        """What the catalog's rules (catalog_rules.py) and placement need to know of this worker group."""
        return GroupSpec(
            name=self.name,
            gpus_per_worker=self.gpus_per_worker,
            max_replicas=self.max_replicas,
            accelerator_type=self.accelerator_type,
            min_replicas=self.min_replicas,
        )


def placement_for(listing: Listing, groups: dict[str, WorkerGroup] | None = None) -> Placement | None:
    """The placement of one replica of this listing on these worker groups; None for CPU listings.

    Raises placement.PlacementError naming the listing and the fix when it cannot be placed.
    """
    return place(listing.rule_spec(), {name: group.rule_spec() for name, group in (groups or {}).items()})


class Catalog(_Strict):
    """The marketplace: the served listings (`listings`) and every model sold (`offers`).

    Each listing is one deployment of replicas. Its LoRA adapters are sold as models of their
    own and served by the listing's replicas; `get` resolves either kind to the priced listing
    customers see, and `base_of` tells which deployment serves an adapter.
    """

    listings: list[Listing] = Field(min_length=1)
    # The GPU node pools listings run on (optional for CPU-only catalogs).
    worker_groups: list[WorkerGroup] = Field(default_factory=list)
    # Fair-share tiers: name -> weight. Keys and organizations name one; the others get default_tier.
    tiers: dict[Annotated[str, Field(pattern=TIER_PATTERN)], Annotated[int, Field(ge=1, le=1000)]] = Field(
        default_factory=lambda: {DEFAULT_TIER: 1}, min_length=1
    )
    default_tier: str = DEFAULT_TIER
    _offers: dict[str, Listing] = PrivateAttr(default_factory=dict)
    _bases: dict[str, Listing] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _rules(self) -> Catalog:
        """The rules across fields, listings and groups (catalog_rules.RULES), then the offers by id."""
        problems = catalog_problems(
            [group.rule_spec() for group in self.worker_groups], [listing.rule_spec() for listing in self.listings]
        )
        if problems:
            raise CatalogRulesBroken(problems)
        for listing in self.listings:
            self._offers[listing.id] = listing
            for adapter in listing.adapters:
                self._offers[adapter.id] = listing.adapter_listing(adapter)
                self._bases[adapter.id] = listing
        problems = (
            []
            if self.default_tier in self.tiers
            else [f"field default_tier: {self.default_tier!r} is not one of the tiers ({', '.join(self.tiers)})"]
        )
        problems += [
            f"listing {listing.id!r}: field task: an embedding listing has no {what}"
            for listing in self.listings
            if listing.task == "embed"
            for what, present in (("lora adapters", listing.lora), ("engine.tool_parser", listing.engine.tool_parser))
            if present
        ]
        problems += [
            f"listing {offer.id!r}: field fallbacks: {name!r} is "
            + ("the listing itself" if name == offer.id else "not a model of this catalog")
            for offer in self._offers.values()
            for name in offer.fallbacks
            if name == offer.id or name not in self._offers
        ]
        problems += [
            f"listing {offer.id!r}: field fallbacks: {name!r} does another task ({self._offers[name].task})"
            for offer in self._offers.values()
            for name in offer.fallbacks
            if name in self._offers and self._offers[name].task != offer.task
        ]
        if problems:
            raise CatalogRulesBroken(problems)
        return self

    @property
    def groups(self) -> dict[str, WorkerGroup]:
        return {group.name: group for group in self.worker_groups}

    @property
    def offers(self) -> list[Listing]:
        """Every model customers can call, adapters included, in catalog order."""
        return list(self._offers.values())

    def get(self, model_id: str) -> Listing | None:
        """The priced listing of a model id: a served listing or one of its LoRA adapters."""
        return self._offers.get(model_id)

    def tier_weight(self, tier: str | None) -> int:
        """A tier's weight; a tier the catalog does not have (or none) weighs as the default tier."""
        return self.tiers.get(tier or self.default_tier) or self.tiers[self.default_tier]

    def base_of(self, model_id: str) -> Listing | None:
        """The listing whose replicas serve this LoRA adapter; None for a listing itself."""
        return self._bases.get(model_id)


def default_cache_dir() -> Path:
    """The local model cache ($TOKENMART_CACHE_DIR, read in config.py; else ~/.cache/tokenmart)."""
    from .config import cache_dir_from_env  # config imports this module's models

    return cache_dir_from_env()


def default_model_dir() -> Path:
    """Where `builtin:` sources resolve when no model_dir is given (AppArgs.model_dir's default)."""
    return default_cache_dir() / "models"


def _resolve_builtin(source: str, model_dir: Path | None) -> str:
    if source.startswith(BUILTIN_PREFIX):
        return str((model_dir or default_model_dir()) / source[len(BUILTIN_PREFIX) :])
    return source


def _describe_location(raw: Any, loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into `listing 'id' (listings[0]): field a.b`."""
    if len(loc) >= 2 and loc[0] == "listings" and isinstance(loc[1], int):
        index = loc[1]
        listing_id = "?"
        if isinstance(raw, dict) and isinstance(raw.get("listings"), list) and index < len(raw["listings"]):
            entry = raw["listings"][index]
            if isinstance(entry, dict) and "id" in entry:
                listing_id = str(entry["id"])
        field = ".".join(str(part) for part in loc[2:]) or "(the listing itself)"
        return f"listing {listing_id!r} (listings[{index}]): field {field}"
    field = ".".join(str(part) for part in loc) or "(top level)"
    return f"field {field}"


def _problems(raw: Any, error: Any) -> list[str]:
    """One line per problem: a field's error after its location; each broken rule, which names its own."""
    broken = (error.get("ctx") or {}).get("error")
    if isinstance(broken, CatalogRulesBroken):
        return broken.problems
    return [f"{_describe_location(raw, error['loc'])}: {error['msg']}"]


def parse_catalog(raw: Any, origin: str = "catalog") -> Catalog:
    """Validate a parsed YAML/JSON document; raise CatalogError naming each bad field."""
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        problems = [f"  - {problem}" for err in exc.errors() for problem in _problems(raw, err)]
        raise CatalogError(f"{origin} is invalid:\n" + "\n".join(problems)) from None


def load_catalog(path: str | os.PathLike[str]) -> Catalog:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"catalog {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {path} is not valid YAML: {exc}") from None
    return parse_catalog(raw, origin=f"catalog {path}")
