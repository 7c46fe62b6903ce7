"""Where a listing's replicas go: tensor x pipeline parallel GPUs as one placement group.

One pure function of plain data (`ListingSpec`, `GroupSpec`: what placement needs of a
catalog listing and its worker group, so this module imports nothing from the catalog), so
the rules can be unit-tested and every impossible layout is refused before anything starts:

- A replica needs TP x PP GPUs, one placement-group bundle each (Ray Serve LLM adds the
  accelerator-type resource from the listing's `accelerator.type`).
- A tensor-parallel group must stay on one node: its all-reduce runs every layer and
  needs the node's NVLink/PCIe, not the network. With PP = 1, or when the whole replica
  fits one node of its group, the strategy is STRICT_PACK (all bundles on one node).
- Pipeline stages exchange activations only between stages, so they may span nodes:
  when TP x PP is larger than a node, the strategy is PACK and the group's GPUs per node
  must be a multiple of TP, so that Ray's packing, which fills one node before the next
  in bundle order, never splits a TP group across nodes.

The refusals are one table, `RULES`: each rule has a name, its condition in Python and the
same condition in Go template, and one message template. The app evaluates the table
(`placement_problems`); the Helm chart's placement checks,
`helm/tokenmart/templates/_placement_rules.tpl`, are generated from it, so after changing a
rule run `python -m tokenmart.cluster.chart_rules` (a unit test fails until the committed
template matches, and `tests/unit/test_placement_parity.py` runs the same bad values through
both).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

Strategy = Literal["STRICT_PACK", "PACK"]


@dataclass(frozen=True)
class ListingSpec:
    """What placement needs to know of a listing (built by `catalog.Listing.placement_spec`)."""

    id: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    accelerator_kind: Literal["cpu", "gpu"] = "gpu"
    accelerator_type: str | None = None
    accelerator_group: str | None = None
    attention_heads: int | None = None


@dataclass(frozen=True)
class GroupSpec:
    """What placement needs to know of a worker group (built by `catalog.WorkerGroup.placement_spec`)."""

    name: str
    gpus_per_worker: int
    max_replicas: int = 1
    accelerator_type: str | None = None


@dataclass(frozen=True)
class Placement:
    tensor_parallel: int
    pipeline_parallel: int
    strategy: Strategy
    accelerator_type: str | None = None

    @property
    def gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    def as_config(self) -> dict:
        """Ray Serve LLM's `LLMConfig.placement_group_config`."""
        return {"bundles": [{"GPU": 1} for _ in range(self.gpus)], "strategy": self.strategy}


class PlacementError(ValueError):
    pass


# -- what the rules read ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the rules read of one listing, its worker group and the cluster's groups.

    Plain values under the same names as the variables of the chart's generated template, so
    a rule's Python condition and its Go condition read alike. Go templates have no None, so
    an absent value is "" or 0 on both sides.
    """

    where: str  # how a message names the listing
    gpu: bool  # accelerator.kind is gpu
    listing_type: str  # accelerator.type, or ""
    group_named: bool  # accelerator.group is set (even to "")
    group: str  # accelerator.group, or ""
    tp: int
    pp: int
    gpus: int  # tp x pp: the GPUs of one replica
    heads: int  # attention_heads, or 0 when not given
    divisors: str  # the tensor-parallel sizes up to 16 that divide heads: "1, 2, 4, 8, 16"
    gpu_groups: tuple[str, ...]  # the worker groups with GPUs, in their order
    cpu_groups: tuple[str, ...]  # the worker groups without GPUs (only the chart sees them)
    pools_known: bool  # every GPU group of the cluster is known (see listing_facts)
    listed: str  # gpu_groups in their order, or how to add one
    known: str  # gpu_groups sorted
    group_found: bool  # accelerator.group names a GPU group
    per_node: int  # that group's GPUs per worker, or 0
    max_replicas: int  # that group's most workers, or 0
    group_type: str  # that group's accelerator type, or ""


FACTS = tuple(field.name for field in fields(Facts))

# What `listed` and `known` say when there is no GPU group.
LISTED_NONE = "none; add one to <worker_groups>"
KNOWN_NONE = "none with GPUs"

_VALUE_NAME = re.compile(r"<(\w+)>")


class _Formatter(string.Formatter):
    def __init__(self, quote: Callable[[str], str]) -> None:
        self._quote = quote

    def format_field(self, value: Any, format_spec: str) -> str:
        return self._quote(value) if format_spec == "q" else format(value, format_spec)


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

    def render(self, template: str, facts: Facts) -> str:
        values = {name: getattr(facts, name) for name in FACTS}
        return _Formatter(self.quote).vformat(self.words(template), (), values)


APP_WORDING = Wording(
    names={
        "worker_groups": "worker_groups",
        "gpus_per_worker": "gpus_per_worker",
        "max_replicas": "max_replicas",
        "accelerator_type": "accelerator_type",
    },
    quote=repr,
)


def listing_facts(
    listing: ListingSpec,
    groups: Mapping[str, GroupSpec],
    *,
    wording: Wording = APP_WORDING,
    where: str | None = None,
    cpu_groups: Iterable[str] = (),
    pools_known: bool | None = None,
) -> Facts:
    """The facts of one listing on these GPU worker groups.

    `pools_known` defaults to whether any group is given: a catalog with worker groups
    describes its cluster's GPU node pools, one without (the local launcher's) leaves the
    listing to whatever GPUs Ray has. The chart knows every pool of its cluster, CPU groups
    (`cpu_groups`) included.
    """
    name = listing.accelerator_group
    group = groups.get(name) if name is not None else None
    tp, pp = listing.tensor_parallel_size, listing.pipeline_parallel_size
    heads = listing.attention_heads or 0
    return Facts(
        where=where if where is not None else f"listing {wording.quote(listing.id)}",
        gpu=listing.accelerator_kind == "gpu",
        listing_type=listing.accelerator_type or "",
        group_named=name is not None,
        group=name or "",
        tp=tp,
        pp=pp,
        gpus=tp * pp,
        heads=heads,
        divisors=", ".join(str(size) for size in range(1, 17) if size <= heads and heads % size == 0),
        gpu_groups=tuple(groups),
        cpu_groups=tuple(cpu_groups),
        pools_known=bool(groups) if pools_known is None else pools_known,
        listed=", ".join(groups) or wording.words(LISTED_NONE),
        known=", ".join(sorted(groups)) or wording.words(KNOWN_NONE),
        group_found=group is not None,
        per_node=group.gpus_per_worker if group else 0,
        max_replicas=group.max_replicas if group else 0,
        group_type=(group.accelerator_type or "") if group else "",
    )


# -- the rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One reason a listing cannot be placed: a condition over `Facts` that breaks it, written
    in Python (`python`, for the app) and in Go template (`go`, for the chart, over variables
    named like the facts), and the message both sides render from `message`.

    `app=False` marks a rule only the chart checks: the chart knows every node pool of its
    cluster, while the app is handed only the GPU groups (none at all by the local launcher)
    and places a listing that names no group by its tensor-parallel size alone.
    """

    name: str
    python: Callable[[Facts], object]
    go: str
    message: str
    app: bool = True


RULES: tuple[Rule, ...] = (
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
)

APP_RULES = tuple(rule for rule in RULES if rule.app)


def broken_rules(
    facts: Facts, rules: Iterable[Rule] = APP_RULES, wording: Wording = APP_WORDING
) -> list[tuple[Rule, str]]:
    """The rules these facts break, in table order, each with its message."""
    return [(rule, wording.render(rule.message, facts)) for rule in rules if rule.python(facts)]


def placement_problems(listing: ListingSpec, groups: Mapping[str, GroupSpec]) -> list[str]:
    """Every reason this listing cannot be placed, each naming the listing and the fix."""
    return [message for _, message in broken_rules(listing_facts(listing, groups))]


def place(listing: ListingSpec, groups: Mapping[str, GroupSpec] | None = None) -> Placement | None:
    """The placement of one replica of this listing; None for CPU listings (no GPU bundles).

    `catalog.placement_for` calls this with a catalog listing and its worker groups.
    """
    groups = groups or {}
    problems = placement_problems(listing, groups)
    if problems:
        raise PlacementError("; ".join(problems))
    if listing.accelerator_kind == "cpu":
        return None
    tp, pp = listing.tensor_parallel_size, listing.pipeline_parallel_size
    group = groups.get(listing.accelerator_group or "")
    fits_one_node = pp == 1 or (group is not None and tp * pp <= group.gpus_per_worker)
    accelerator_type = listing.accelerator_type or (group.accelerator_type if group else None)
    return Placement(tp, pp, "STRICT_PACK" if fits_one_node else "PACK", accelerator_type)
