"""Where a listing's replicas go: tensor x pipeline parallel GPUs as one placement group.

One pure function of plain data (`ListingSpec`, `GroupSpec`: what the rules need of a
catalog listing and its worker group, so this module imports nothing from the catalog), so
the layouts can be unit-tested and every impossible one is refused before anything starts:

- A replica needs TP x PP GPUs, one placement-group bundle each (Ray Serve LLM adds the
  accelerator-type resource from the listing's `accelerator.type`).
- A tensor-parallel group must stay on one node: its all-reduce runs every layer and
  needs the node's NVLink/PCIe, not the network. With PP = 1, or when the whole replica
  fits one node of its group, the strategy is STRICT_PACK (all bundles on one node).
- Pipeline stages exchange activations only between stages, so they may span nodes:
  when TP x PP is larger than a node, the strategy is PACK and the group's GPUs per node
  must be a multiple of TP, so that Ray's packing, which fills one node before the next
  in bundle order, never splits a TP group across nodes.
- A listing's most replicas must fit its group's most nodes: a node holds whole replicas
  of a STRICT_PACK layout only, so 3-GPU replicas on 4-GPU nodes take a node each.

The refusals are rules of the catalog's one rule table (`catalog_rules.PLACEMENT_RULES`), which
the Helm chart's checks are generated from; `place` refuses a listing that breaks any rule of
a listing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .catalog_rules import APP_RULES, GroupSpec, ListingSpec, broken_rules, listing_facts

__all__ = ["GroupSpec", "ListingSpec", "Placement", "PlacementError", "Strategy", "place", "placement_problems"]

Strategy = Literal["STRICT_PACK", "PACK"]


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
    return [message for _, message in broken_rules(listing_facts(listing, groups), APP_RULES)]


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
