"""The catalog's cross-field rules: one table that the app evaluates and the Helm chart is generated from.

A catalog is checked in two layers, each with one source:

- A field's own constraints (type, range, pattern, allowed values, unknown fields) are the
  pydantic `Field`s of deployments/catalog.py. They also generate the chart's
  values.schema.json (`python -m tokenmart.cluster.helm_schema`), so `helm install` refuses
  the same field values the app does.
- Rules that read more than one field (two fields of a listing, the listings together, a
  listing and its worker group, a worker group's own bounds) are this module's table,
  `RULES`. Each rule has a name, its condition in Python (over `Facts` or `GroupFacts`) and the
  same condition in Go template (over variables named like those facts), and one message
  template. The app evaluates the table when a catalog is validated (`catalog_problems`,
  called by `catalog.Catalog`); the chart's checks, helm/tokenmart/templates/_catalog_rules.tpl,
  are generated from it by `python -m tokenmart.cluster.chart_rules`. A unit test fails until
  the committed template matches, and tests/unit/test_catalog_parity.py runs a corpus of bad
  and good catalogs through both.

Rules read plain data (`ListingSpec`, `GroupSpec`: what the rules need of a catalog listing and
of a worker group), so this module imports nothing from the catalog. The placement rules
(a listing's TP x PP against its group's nodes) are explained in deployments/placement.py.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

# Engine arguments that `engine.extra` must not set, because the listing sets them elsewhere.
TYPED_ENGINE_ARGS = ("dtype", "max_model_len", "max_num_seqs", "pipeline_parallel_size", "tensor_parallel_size")
LORA_ENGINE_ARGS = ("enable_lora", "max_cpu_loras", "max_lora_rank", "max_loras")
TOOL_ENGINE_ARGS = ("enable_auto_tool_choice", "tool_call_parser")


@dataclass(frozen=True)
class ListingSpec:
    """What the rules need to know of a listing (built by `catalog.Listing.rule_spec`).

    The defaults are the catalog's own, so a spec built for placement alone breaks no other rule.
    """

    id: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    accelerator_kind: Literal["cpu", "gpu"] = "gpu"
    accelerator_type: str | None = None
    accelerator_group: str | None = None
    attention_heads: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    look_back_period_s: float = 5.0
    metrics_interval_s: float = 1.0
    default_max_tokens: int = 256
    context_length: int | None = None
    extra_keys: tuple[str, ...] = ()
    adapter_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class GroupSpec:
    """What the rules need to know of a worker group (built by `catalog.WorkerGroup.rule_spec`)."""

    name: str
    gpus_per_worker: int
    max_replicas: int = 1
    accelerator_type: str | None = None
    min_replicas: int = 0


# -- what the rules read ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the listing rules read of one listing, its worker group and the cluster's groups.

    Plain values under the same names as the variables of the chart's generated template, so
    a rule's Python condition and its Go condition read alike. Go templates have no None, so
    an absent value is "" or 0 on both sides.
    """

    where: str  # how a message names the listing
    repeated_id: str  # the first of its model ids (itself, then its adapters) already taken, or ""
    gpu: bool  # accelerator.kind is gpu
    listing_type: str  # accelerator.type, or ""
    group_named: bool  # accelerator.group is set (even to "")
    group: str  # accelerator.group, or ""
    tp: int
    pp: int
    gpus: int  # tp x pp: the GPUs of one replica
    heads: int  # attention_heads, or 0 when not given
    divisors: str  # the tensor-parallel sizes up to 16 that divide heads: "1, 2, 4, 8, 16"
    scale_min: int  # autoscaling.min_replicas
    scale_max: int  # autoscaling.max_replicas
    look_back: float  # autoscaling.look_back_period_s
    metrics_interval: float  # autoscaling.metrics_interval_s
    default_max_tokens: int
    context_length: int  # 0 when not given (only plain specs lack it)
    extra_typed: str  # the keys of engine.extra in TYPED_ENGINE_ARGS, sorted: "dtype, max_model_len"
    extra_lora: str  # ... in LORA_ENGINE_ARGS
    extra_tools: str  # ... in TOOL_ENGINE_ARGS
    gpu_groups: tuple[str, ...]  # the worker groups with GPUs, in their order
    cpu_groups: tuple[str, ...]  # the worker groups without GPUs (only the chart sees them)
    pools_known: bool  # every GPU group of the cluster is known (see listing_facts)
    listed: str  # gpu_groups in their order, or how to add one
    known: str  # gpu_groups sorted
    group_found: bool  # accelerator.group names a GPU group
    per_node: int  # that group's GPUs per worker, or 0
    max_replicas: int  # that group's most workers, or 0
    group_type: str  # that group's accelerator type, or ""
    capacity: int  # the most replicas of this listing that group can ever hold, or 0


@dataclass(frozen=True)
class GroupFacts:
    """What the worker group rules read of one group (variables of the template's group loop)."""

    where: str  # how a message names the group
    name: str
    repeated: bool  # an earlier group has this name
    group_min: int  # its fewest workers
    group_max: int  # its most workers


FACTS = tuple(field.name for field in fields(Facts))
GROUP_FACTS = tuple(field.name for field in fields(GroupFacts))

# What `listed` and `known` say when there is no GPU group.
LISTED_NONE = "none; add one to <worker_groups>"
KNOWN_NONE = "none with GPUs"

_VALUE_NAME = re.compile(r"<(\w+)>")


def go_number(value: float) -> str:
    """A float as Go's %v prints it (5.0 -> "5", 0.5 -> "0.5"), so both sides print numbers alike."""
    text = repr(float(value))
    return text.removesuffix(".0")


class _Formatter(string.Formatter):
    def __init__(self, quote: Callable[[str], str]) -> None:
        self._quote = quote

    def format_field(self, value: Any, format_spec: str) -> str:
        if format_spec == "q":
            return self._quote(value)
        if isinstance(value, float):
            return go_number(value)
        return format(value, format_spec)


@dataclass(frozen=True)
class Wording:
    """How one side words a message: the app speaks of a catalog file, the chart of its values.

    A message template holds `{fact}` (a fact's value), `{fact:q}` (quoted the side's way:
    Python's repr in the app, like its other catalog errors; Go's %q in the chart, like its
    other checks) and `<name>` (what the side calls a worker group's value, e.g.
    `<gpus_per_worker>`: gpus_per_worker in a catalog file, gpusPerWorker in chart values).
    """

    names: Mapping[str, str]
    quote: Callable[[str], str]

    def words(self, template: str) -> str:
        return _VALUE_NAME.sub(lambda match: self.names[match.group(1)], template)

    def render(self, template: str, facts: Facts | GroupFacts) -> str:
        values = {field.name: getattr(facts, field.name) for field in fields(facts)}
        return _Formatter(self.quote).vformat(self.words(template), (), values)


APP_WORDING = Wording(
    names={
        "worker_groups": "worker_groups",
        "gpus_per_worker": "gpus_per_worker",
        "min_replicas": "min_replicas",
        "max_replicas": "max_replicas",
        "accelerator_type": "accelerator_type",
    },
    quote=repr,
)


def _capacity(per_node: int, group_max: int, gpus: int) -> int:
    """The most replicas of `gpus` GPUs a group of `group_max` nodes of `per_node` GPUs holds.

    A replica that fits one node is packed onto one node (STRICT_PACK), so a node holds whole
    replicas only; a larger one is spread in whole TP groups (PACK), so only the total counts.
    """
    if not per_node or not gpus:
        return 0
    if gpus <= per_node:
        return (per_node // gpus) * group_max
    return per_node * group_max // gpus


def _among(keys: Iterable[str], names: Sequence[str]) -> str:
    present = set(keys)
    return ", ".join(name for name in names if name in present)


def listing_facts(
    listing: ListingSpec,
    groups: Mapping[str, GroupSpec],
    *,
    wording: Wording = APP_WORDING,
    where: str | None = None,
    cpu_groups: Iterable[str] = (),
    pools_known: bool | None = None,
    taken_ids: Collection[str] = (),
) -> Facts:
    """The facts of one listing on these GPU worker groups.

    `pools_known` defaults to whether any group is given: a catalog with worker groups
    describes its cluster's GPU node pools, one without (the local launcher's) leaves the
    listing to whatever GPUs Ray has. The chart knows every pool of its cluster, CPU groups
    (`cpu_groups`) included. `taken_ids` are the model ids of the listings before this one.
    """
    name = listing.accelerator_group
    group = groups.get(name) if name is not None else None
    tp, pp = listing.tensor_parallel_size, listing.pipeline_parallel_size
    heads = listing.attention_heads or 0
    seen, repeated_id = set(taken_ids), ""
    for offer in (listing.id, *listing.adapter_ids):
        if offer in seen and not repeated_id:
            repeated_id = offer
        seen.add(offer)
    return Facts(
        where=where if where is not None else f"listing {wording.quote(listing.id)}",
        repeated_id=repeated_id,
        gpu=listing.accelerator_kind == "gpu",
        listing_type=listing.accelerator_type or "",
        group_named=name is not None,
        group=name or "",
        tp=tp,
        pp=pp,
        gpus=tp * pp,
        heads=heads,
        divisors=", ".join(str(size) for size in range(1, 17) if size <= heads and heads % size == 0),
        scale_min=listing.min_replicas,
        scale_max=listing.max_replicas,
        look_back=float(listing.look_back_period_s),
        metrics_interval=float(listing.metrics_interval_s),
        default_max_tokens=listing.default_max_tokens,
        context_length=listing.context_length or 0,
        extra_typed=_among(listing.extra_keys, TYPED_ENGINE_ARGS),
        extra_lora=_among(listing.extra_keys, LORA_ENGINE_ARGS),
        extra_tools=_among(listing.extra_keys, TOOL_ENGINE_ARGS),
        gpu_groups=tuple(groups),
        cpu_groups=tuple(cpu_groups),
        pools_known=bool(groups) if pools_known is None else pools_known,
        listed=", ".join(groups) or wording.words(LISTED_NONE),
        known=", ".join(sorted(groups)) or wording.words(KNOWN_NONE),
        group_found=group is not None,
        per_node=group.gpus_per_worker if group else 0,
        max_replicas=group.max_replicas if group else 0,
        group_type=(group.accelerator_type or "") if group else "",
        capacity=_capacity(group.gpus_per_worker, group.max_replicas, tp * pp) if group else 0,
    )


def group_facts(group: GroupSpec, where: str, taken_names: Collection[str] = ()) -> GroupFacts:
    """The facts of one worker group; `taken_names` are the names of the groups before it."""
    return GroupFacts(
        where=where,
        name=group.name,
        repeated=group.name in taken_names,
        group_min=group.min_replicas,
        group_max=group.max_replicas,
    )


# -- the rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One reason a catalog cannot be served: a condition that breaks it, written in Python
    (`python`, for the app) and in Go template (`go`, for the chart, over variables named like
    the facts), and the message both sides render from `message`.

    `scope` says what the rule reads: "listing" rules read `Facts` (one listing, its group and
    the listings before it), "group" rules read `GroupFacts` (one worker group).
    `app=False` marks a rule only the chart checks: the chart knows every node pool of its
    cluster, while the app is handed only the GPU groups (none at all by the local launcher)
    and places a listing that names no group by its tensor-parallel size alone.
    """

    name: str
    python: Callable[[Any], object]
    go: str
    message: str
    app: bool = True
    scope: Literal["listing", "group"] = "listing"


GROUP_RULES: tuple[Rule, ...] = (
    Rule(
        name="group-name-is-unique",
        python=lambda f: f.repeated,
        go="$repeated",
        message="{where}: the name {name:q} is used twice",
        scope="group",
    ),
    Rule(
        name="group-min-within-max",
        python=lambda f: f.group_min > f.group_max,
        go="gt $group_min $group_max",
        message=(
            "{where}: <min_replicas> {group_min} of worker group {name:q} is larger than its <max_replicas> {group_max}"
        ),
        scope="group",
    ),
)

# The rules of one listing's own fields, before where it runs.
LISTING_RULES: tuple[Rule, ...] = (
    Rule(
        name="model-id-is-unique",
        python=lambda f: f.repeated_id,
        go="$repeated_id",
        message=(
            "{where}: model id {repeated_id:q} appears more than once (listings and LoRA adapters share one namespace)"
        ),
    ),
    Rule(
        name="default-max-tokens-within-context",
        python=lambda f: f.context_length and f.default_max_tokens >= f.context_length,
        go="and $context_length (ge $default_max_tokens $context_length)",
        message="{where}: default_max_tokens {default_max_tokens} must be smaller than context_length {context_length}",
    ),
    Rule(
        name="extra-sets-no-typed-engine-arg",
        python=lambda f: f.extra_typed,
        go="$extra_typed",
        message="{where}: field engine.extra: set {extra_typed} as its own field (or context_length), not in extra",
    ),
    Rule(
        name="extra-sets-no-lora-engine-arg",
        python=lambda f: f.extra_lora,
        go="$extra_lora",
        message="{where}: field engine.extra: set LoRA serving in the listing's lora block, not {extra_lora} in extra",
    ),
    Rule(
        name="extra-sets-no-tool-engine-arg",
        python=lambda f: f.extra_tools,
        go="$extra_tools",
        message="{where}: field engine.extra: set tool calling with engine.tool_parser, not {extra_tools} in extra",
    ),
    Rule(
        name="min-replicas-within-max",
        python=lambda f: f.scale_min > f.scale_max,
        go="gt $scale_min $scale_max",
        message="{where}: autoscaling.min_replicas {scale_min} is larger than autoscaling.max_replicas {scale_max}",
    ),
    Rule(
        name="look-back-longer-than-metrics-interval",
        python=lambda f: f.look_back <= f.metrics_interval,
        go="le $look_back $metrics_interval",
        message=(
            "{where}: autoscaling.look_back_period_s {look_back} must be longer than "
            "autoscaling.metrics_interval_s {metrics_interval}"
        ),
    ),
)

# Where a listing's replicas run (deployments/placement.py explains the layouts).
PLACEMENT_RULES: tuple[Rule, ...] = (
    Rule(
        name="cpu-listing-has-no-type",
        python=lambda f: not f.gpu and f.listing_type,
        go="and (not $gpu) $listing_type",
        message="{where}: accelerator.type applies only to kind: gpu",
    ),
    Rule(
        name="tp-divides-attention-heads",
        python=lambda f: f.gpu and f.heads and f.heads % f.tp,
        go="and $gpu $heads (mod $heads $tp)",
        message=(
            "{where}: tensor_parallel_size {tp} does not divide its {heads} attention heads; use one of {divisors}"
        ),
    ),
    Rule(
        name="gpu-listing-names-group",
        python=lambda f: f.gpu and not f.group_named,
        go="and $gpu (not $group_named)",
        message="{where}: a GPU listing must name its worker group in accelerator.group (one of: {listed})",
        app=False,
    ),
    Rule(
        name="group-has-gpus",
        # Only where no group has GPUs: with GPU groups, group-is-known names the same
        # mistake on both sides (the app never sees CPU groups).
        python=lambda f: f.gpu and f.group in f.cpu_groups and not f.gpu_groups,
        go="and $gpu (has $group $cpu_groups) (not $gpu_groups)",
        message=(
            "{where}: accelerator.group {group:q} has <gpus_per_worker> 0 (a CPU group); give the group GPUs or "
            "set accelerator.kind: cpu"
        ),
        app=False,
    ),
    Rule(
        name="group-is-known",
        python=lambda f: f.gpu and f.group_named and f.pools_known and not f.group_found,
        go="and $gpu $group_named $pools_known (not $group_found)",
        message="{where}: accelerator.group {group:q} is not in <worker_groups> ({known})",
    ),
    Rule(
        name="type-matches-group",
        python=lambda f: f.gpu and f.group_found and f.listing_type and f.group_type and f.listing_type != f.group_type,
        go="and $gpu $group_found $listing_type $group_type (ne $listing_type $group_type)",
        message=(
            "{where}: accelerator.type {listing_type:q} does not match worker group {group:q} "
            "(<accelerator_type> {group_type:q}); change one of them"
        ),
    ),
    Rule(
        name="tp-fits-one-node",
        python=lambda f: f.gpu and f.group_found and f.tp > f.per_node,
        go="and $gpu $group_found (gt $tp $per_node)",
        message=(
            "{where}: tensor_parallel_size {tp} is larger than <gpus_per_worker> {per_node} of worker group {group:q}; "
            "a tensor-parallel group must fit one node: lower tensor_parallel_size (and raise "
            "pipeline_parallel_size) or use a group with at least {tp} GPUs per node"
        ),
    ),
    Rule(
        name="node-is-a-multiple-of-tp",
        python=lambda f: f.gpu and f.group_found and f.tp <= f.per_node < f.gpus and f.per_node % f.tp,
        go="and $gpu $group_found (le $tp $per_node) (lt $per_node $gpus) (mod $per_node $tp)",
        message=(
            "{where}: pipeline stages span nodes, so <gpus_per_worker> {per_node} of worker group {group:q} must be "
            "a multiple of tensor_parallel_size {tp}"
        ),
    ),
    Rule(
        name="replica-fits-group",
        python=lambda f: f.gpu and f.group_found and f.gpus > f.per_node * f.max_replicas,
        go="and $gpu $group_found (gt $gpus (mul $per_node $max_replicas))",
        message=(
            "{where}: tensor_parallel_size x pipeline_parallel_size = {gpus} GPUs, more than worker group {group:q} "
            "can ever have (<gpus_per_worker> {per_node} x <max_replicas> {max_replicas}); raise its <max_replicas>"
        ),
    ),
    Rule(
        name="max-replicas-fit-group",
        # Only once one replica fits (replica-fits-group names that): then capacity >= 1.
        python=lambda f: f.gpu and f.group_found and f.capacity and f.scale_max > f.capacity,
        go="and $gpu $group_found $capacity (gt $scale_max $capacity)",
        message=(
            "{where}: autoscaling.max_replicas {scale_max} replicas of {gpus} GPUs each are more than worker group "
            "{group:q} can ever hold ({capacity}, with <gpus_per_worker> {per_node} x <max_replicas> "
            "{max_replicas}); lower autoscaling.max_replicas or raise the group's <max_replicas>"
        ),
    ),
)

RULES: tuple[Rule, ...] = GROUP_RULES + LISTING_RULES + PLACEMENT_RULES
APP_RULES = tuple(rule for rule in RULES if rule.app)


def broken_rules(
    facts: Facts | GroupFacts, rules: Iterable[Rule] = APP_RULES, wording: Wording = APP_WORDING
) -> list[tuple[Rule, str]]:
    """The rules of the facts' scope that these facts break, in table order, each with its message."""
    scope = "group" if isinstance(facts, GroupFacts) else "listing"
    return [(rule, wording.render(rule.message, facts)) for rule in rules if rule.scope == scope and rule.python(facts)]


def catalog_problems(groups: Sequence[GroupSpec], listings: Sequence[ListingSpec]) -> list[str]:
    """Every rule a catalog breaks, groups first and then each listing, in the chart's order.

    Messages name a group by its index in `worker_groups` and a listing by its id and index
    in `listings`, like the catalog's field errors.
    """
    problems: list[str] = []
    names: list[str] = []
    for index, group in enumerate(groups):
        problems += [message for _, message in broken_rules(group_facts(group, f"worker_groups[{index}]", names))]
        names.append(group.name)
    by_name = {group.name: group for group in groups}
    taken: list[str] = []
    for index, listing in enumerate(listings):
        where = f"listing {listing.id!r} (listings[{index}])"
        facts = listing_facts(listing, by_name, where=where, taken_ids=taken)
        problems += [message for _, message in broken_rules(facts)]
        taken += [listing.id, *listing.adapter_ids]
    return problems
