"""The Helm chart's placement checks, generated from the rule table in deployments/placement.py.

`python -m tokenmart.cluster.chart_rules` rewrites helm/tokenmart/templates/_placement_rules.tpl,
which `_validate.tpl` includes; a unit test fails while the committed file differs from what
this module renders, and `tests/unit/test_placement_parity.py` runs the same bad values through
Helm and through the app. Rules are edited in `placement.RULES` (each holds its Python and its
Go condition side by side), never in the template.

What lives here is the chart's side of the table: how its values become the facts the rules
read (the Go variables below, named like `placement.Facts`, and `values_problem`, the same
reading in Python), and how the chart words a message (`CHART_WORDING`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tokenmart.deployments.placement import (
    FACTS,
    KNOWN_NONE,
    LISTED_NONE,
    RULES,
    Facts,
    GroupSpec,
    ListingSpec,
    Rule,
    Wording,
    broken_rules,
    listing_facts,
)

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "helm" / "tokenmart" / "templates" / "_placement_rules.tpl"
COMMAND = "python -m tokenmart.cluster.chart_rules"


def go_quote(text: str) -> str:
    """What Go's %q makes of a plain name (no control characters), so both sides quote alike."""
    return json.dumps(text, ensure_ascii=False)


CHART_WORDING = Wording(
    names={
        "worker_groups": "rayCluster.workerGroups",
        "gpus_per_worker": "gpusPerWorker",
        "max_replicas": "maxReplicas",
        "accelerator_type": "acceleratorType",
    },
    quote=go_quote,
)


def _where(index: int, listing_id: Any) -> str:
    return f"catalog.models[{index}] ({listing_id})"


# The facts of the whole cluster, once: its worker groups split by whether they have GPUs.
_CLUSTER_FACTS = """\
{{- $gpu_by_name := dict -}}
{{- $gpu_groups := list -}}
{{- $cpu_groups := list -}}
{{- range $.Values.rayCluster.workerGroups -}}
{{- if gt (int .gpusPerWorker) 0 -}}
{{- $_ := set $gpu_by_name .name . -}}
{{- $gpu_groups = append $gpu_groups .name -}}
{{- else -}}
{{- $cpu_groups = append $cpu_groups .name -}}
{{- end -}}
{{- end -}}
{{- $pools_known := true -}}
{{- $listed := join ", " $gpu_groups | default LISTED_NONE -}}
{{- $known := join ", " (sortAlpha $gpu_groups) | default KNOWN_NONE -}}
"""

# The facts of one listing (catalog.models[$index]) and of the GPU group it names.
_LISTING_FACTS = """\
{{- $accelerator := $model.accelerator | default dict -}}
{{- $engine := $model.engine | default dict -}}
{{- $where := printf "catalog.models[%d] (%v)" $index $model.id -}}
{{- $gpu := eq ($accelerator.kind | default "gpu") "gpu" -}}
{{- $listing_type := $accelerator.type | default "" -}}
{{- $group_named := kindIs "string" $accelerator.group -}}
{{- $group := $accelerator.group | default "" -}}
{{- $tp := int ($engine.tensor_parallel_size | default 1) -}}
{{- $pp := int ($engine.pipeline_parallel_size | default 1) -}}
{{- $gpus := mul $tp $pp -}}
{{- $heads := int ($model.attention_heads | default 0) -}}
{{- $divisor_list := list -}}
{{- range $size := untilStep 1 17 1 -}}
{{- if and (le $size $heads) (eq (mod $heads $size) 0) -}}
{{- $divisor_list = append $divisor_list $size -}}
{{- end -}}
{{- end -}}
{{- $divisors := join ", " $divisor_list -}}
{{- $group_found := hasKey $gpu_by_name $group -}}
{{- $per_node := 0 -}}
{{- $max_replicas := 0 -}}
{{- $group_type := "" -}}
{{- if $group_found -}}
{{- $spec := get $gpu_by_name $group -}}
{{- $per_node = int $spec.gpusPerWorker -}}
{{- $max_replicas = int $spec.maxReplicas -}}
{{- $group_type = $spec.acceleratorType | default "" -}}
{{- end -}}
"""

_PLACEHOLDER = re.compile(r"\{(\w+)(?::(\w*))?\}")
_DECLARED = re.compile(r"\$(\w+) :=")
_USED = re.compile(r"\$(\w+)")


def _go_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def go_message(rule: Rule) -> str:
    """The rule's message as a Go printf call over the template's variables."""
    text = CHART_WORDING.words(rule.message).replace("%", "%%")
    args: list[str] = []

    def verb(match: re.Match[str]) -> str:
        name, spec = match.group(1), match.group(2)
        if name not in FACTS or spec not in (None, "q"):
            raise ValueError(f"rule {rule.name}: {match.group(0)} is not a fact (or :q of one)")
        args.append(f"${name}")
        return "%q" if spec == "q" else "%v"

    layout = _PLACEHOLDER.sub(verb, text)
    return " ".join(["printf", _go_string(layout), *args])


def _check_rule(rule: Rule) -> None:
    unknown = sorted(set(_USED.findall(rule.go)) - set(FACTS))
    if unknown:
        raise ValueError(f"rule {rule.name}: its Go condition reads {unknown}, which are not facts")


def render() -> str:
    """The generated template's text."""
    facts = (
        _CLUSTER_FACTS.replace("LISTED_NONE", _go_string(CHART_WORDING.words(LISTED_NONE))).replace(
            "KNOWN_NONE", _go_string(CHART_WORDING.words(KNOWN_NONE))
        )
        + "{{- range $index, $model := $.Values.catalog.models -}}\n"
        + _LISTING_FACTS
    )
    missing = sorted(set(FACTS) - set(_DECLARED.findall(facts)))
    if missing:
        raise ValueError(f"the chart computes no {missing}: add them to chart_rules")
    checks = []
    for rule in RULES:
        _check_rule(rule)
        scope = "" if rule.app else " (the chart only)"
        checks.append(
            f"{{{{- /* {rule.name}{scope} */ -}}}}\n"
            f"{{{{- if {rule.go} -}}}}\n"
            f"{{{{- fail ({go_message(rule)}) -}}}}\n"
            "{{- end -}}\n"
        )
    return (
        "{{/*\n"
        f"Generated from deployments/placement.py (RULES) by `{COMMAND}`; do not edit.\n"
        "The placement checks of the catalog against rayCluster.workerGroups: the same rules, in the same\n"
        "order and with the same messages as the app's, plus those only the chart can check. The render\n"
        "fails on the first broken rule.\n"
        "*/}}\n"
        '{{- define "tokenmart.placementRules" -}}\n' + facts + "".join(checks) + "{{- end -}}\n" + "{{- end -}}\n"
    )


# -- the same reading of the values in Python --------------------------------------------------------


def _int(value: Any, default: int) -> int:
    return int(value) if value else default


def values_facts(values: Mapping[str, Any]) -> Iterator[Facts]:
    """The facts of each listing in these chart values, read as the generated template reads them."""
    groups = values["rayCluster"]["workerGroups"]
    gpu_groups = {
        group["name"]: GroupSpec(
            name=group["name"],
            gpus_per_worker=int(group["gpusPerWorker"]),
            max_replicas=int(group["maxReplicas"]),
            accelerator_type=group.get("acceleratorType") or None,
        )
        for group in groups
        if int(group["gpusPerWorker"]) > 0
    }
    cpu_groups = [group["name"] for group in groups if int(group["gpusPerWorker"]) <= 0]
    for index, model in enumerate(values["catalog"]["models"]):
        accelerator = model.get("accelerator") or {}
        engine = model.get("engine") or {}
        group = accelerator.get("group")
        listing = ListingSpec(
            id=model["id"],
            tensor_parallel_size=_int(engine.get("tensor_parallel_size"), 1),
            pipeline_parallel_size=_int(engine.get("pipeline_parallel_size"), 1),
            accelerator_kind=accelerator.get("kind") or "gpu",
            accelerator_type=accelerator.get("type") or None,
            accelerator_group=group if isinstance(group, str) else None,
            attention_heads=_int(model.get("attention_heads"), 0) or None,
        )
        yield listing_facts(
            listing,
            gpu_groups,
            wording=CHART_WORDING,
            where=_where(index, model["id"]),
            cpu_groups=cpu_groups,
            pools_known=True,
        )


def values_problem(values: Mapping[str, Any]) -> tuple[Rule, str] | None:
    """The rule the chart's render fails on for these values, with its message; None if it passes."""
    for facts in values_facts(values):
        broken = broken_rules(facts, RULES, CHART_WORDING)
        if broken:
            return broken[0]
    return None


def main() -> int:
    TEMPLATE_PATH.write_text(render())
    print(TEMPLATE_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
