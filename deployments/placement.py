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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

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


def placement_problems(listing: ListingSpec, groups: Mapping[str, GroupSpec]) -> list[str]:
    """Every reason this listing cannot be placed, each naming the listing and the fix."""
    if listing.accelerator_kind == "cpu":
        return []
    tp, pp = listing.tensor_parallel_size, listing.pipeline_parallel_size
    where = f"listing {listing.id!r}"
    problems = []
    heads = listing.attention_heads
    if heads is not None and heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 16]
        problems.append(
            f"{where}: tensor_parallel_size {tp} does not divide its {heads} attention heads; "
            f"use one of {', '.join(map(str, divisors))}"
        )
    name = listing.accelerator_group
    if name is None:
        return problems
    group = groups.get(name)
    if group is None:
        if groups:
            known = ", ".join(sorted(groups))
            problems.append(f"{where}: accelerator.group {name!r} is not a worker group (known: {known})")
        return problems
    if listing.accelerator_type and group.accelerator_type and listing.accelerator_type != group.accelerator_type:
        problems.append(
            f"{where}: accelerator.type {listing.accelerator_type!r} does not match worker group {name!r} "
            f"({group.accelerator_type!r}); change one of them"
        )
    per_node = group.gpus_per_worker
    if tp > per_node:
        problems.append(
            f"{where}: tensor_parallel_size {tp} is larger than the {per_node} GPUs per node of worker group "
            f"{name!r}; a tensor-parallel group must fit one node: lower tensor_parallel_size (and raise "
            f"pipeline_parallel_size) or use a group with at least {tp} GPUs per node"
        )
    elif tp * pp > per_node and per_node % tp:
        problems.append(
            f"{where}: pipeline stages span nodes, so the {per_node} GPUs per node of worker group {name!r} "
            f"must be a multiple of tensor_parallel_size {tp}"
        )
    if tp * pp > per_node * group.max_replicas:
        problems.append(
            f"{where}: one replica needs {tp * pp} GPUs but worker group {name!r} has at most "
            f"{per_node * group.max_replicas} ({group.max_replicas} nodes x {per_node}); raise its max_replicas"
        )
    return problems


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
