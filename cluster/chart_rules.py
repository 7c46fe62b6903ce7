"""The Helm chart's catalog checks, generated from the rule table in deployments/catalog_rules.py.

`python -m tokenmart.cluster.chart_rules` rewrites helm/tokenmart/templates/_catalog_rules.tpl,
which `_validate.tpl` includes; a unit test fails while the committed file differs from what
this module renders, and `tests/unit/test_catalog_parity.py` runs a corpus of bad and good
catalogs through Helm and through the app. Rules are edited in `catalog_rules.RULES` (each
holds its Python and its Go condition side by side), never in the template.

What lives here is the chart's side of the table: how its values become the facts the rules
read (the Go variables below, named like `catalog_rules.Facts` and `GroupFacts`, and
`values_problem`, the same reading in Python), and how the chart words a message
(`CHART_WORDING`). Where a value is left out, both readings take the catalog model's default.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tokenmart.deployments.catalog import Autoscaling, Listing
from tokenmart.deployments.catalog_rules import (
    FACTS,
    GROUP_FACTS,
    KNOWN_NONE,
    LISTED_NONE,
    LORA_ENGINE_ARGS,
    RULES,
    TOOL_ENGINE_ARGS,
    TYPED_ENGINE_ARGS,
    Facts,
    GroupFacts,
    GroupSpec,
    ListingSpec,
    Rule,
    Wording,
    broken_rules,
    group_facts,
    listing_facts,
)

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "helm" / "tokenmart" / "templates" / "_catalog_rules.tpl"
COMMAND = "python -m tokenmart.cluster.chart_rules"


def go_quote(text: str) -> str:
    """What Go's %q makes of a plain name (no control characters), so both sides quote alike."""
    return json.dumps(text, ensure_ascii=False)


CHART_WORDING = Wording(
    names={
        "worker_groups": "rayCluster.workerGroups",
        "gpus_per_worker": "gpusPerWorker",
        "min_replicas": "minReplicas",
        "max_replicas": "maxReplicas",
        "accelerator_type": "acceleratorType",
    },
    quote=go_quote,
)


def _where(index: int, listing_id: Any) -> str:
    return f"catalog.models[{index}] ({listing_id})"


def _group_where(index: int) -> str:
    return f"rayCluster.workerGroups[{index}]"


def _default(model: type, field: str) -> Any:
    return model.model_fields[field].default


# Values a listing may leave out: (Go variable, the dict it is read from, key, the model whose default
# applies, Go conversion).
_OPTIONAL = (
    ("scale_min", "$scaling", "min_replicas", Autoscaling, "int"),
    ("scale_max", "$scaling", "max_replicas", Autoscaling, "int"),
    ("look_back", "$scaling", "look_back_period_s", Autoscaling, "float64"),
    ("metrics_interval", "$scaling", "metrics_interval_s", Autoscaling, "float64"),
    ("default_max_tokens", "$model", "default_max_tokens", Listing, "int"),
)
_EXTRA = (("extra_typed", TYPED_ENGINE_ARGS), ("extra_lora", LORA_ENGINE_ARGS), ("extra_tools", TOOL_ENGINE_ARGS))


def _go_optional() -> str:
    lines = []
    for name, source, key, model, convert in _OPTIONAL:
        default = _default(model, key)
        lines.append(
            f"{{{{- ${name} := {convert} {default!r} -}}}}\n"
            f'{{{{- if hasKey {source} "{key}" -}}}}{{{{- ${name} = {convert} {source}.{key} -}}}}{{{{- end -}}}}\n'
        )
    for name, keys in _EXTRA:
        listed = " ".join(_go_string(key) for key in keys)
        lines.append(
            f"{{{{- ${name}_keys := list -}}}}\n"
            f"{{{{- range $key := list {listed} -}}}}\n"
            f"{{{{- if hasKey $extra $key -}}}}{{{{- ${name}_keys = append ${name}_keys $key -}}}}{{{{- end -}}}}\n"
            "{{- end -}}\n"
            f'{{{{- ${name} := join ", " ${name}_keys -}}}}\n'
        )
    return "".join(lines)


# The facts of one worker group (rayCluster.workerGroups[$index]).
_GROUP_FACTS = """\
{{- $where := printf "rayCluster.workerGroups[%d]" $index -}}
{{- $name := $spec.name -}}
{{- $repeated := hasKey $seen_groups $name -}}
{{- $_ := set $seen_groups $name true -}}
{{- $group_min := int $spec.minReplicas -}}
{{- $group_max := int $spec.maxReplicas -}}
"""

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
{{- $scaling := $model.autoscaling | default dict -}}
{{- $extra := $engine.extra | default dict -}}
{{- $where := printf "catalog.models[%d] (%v)" $index $model.id -}}
{{- $offer_ids := list (toString $model.id) -}}
{{- with $model.lora -}}
{{- range .adapters -}}
{{- $offer_ids = append $offer_ids (toString .id) -}}
{{- end -}}
{{- end -}}
{{- $repeated_id := "" -}}
{{- range $offer := $offer_ids -}}
{{- if and (not $repeated_id) (hasKey $seen_ids $offer) -}}
{{- $repeated_id = $offer -}}
{{- end -}}
{{- $_ := set $seen_ids $offer true -}}
{{- end -}}
{{- $context_length := int $model.context_length -}}
OPTIONAL
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
{{- $capacity := 0 -}}
{{- if $group_found -}}
{{- $spec := get $gpu_by_name $group -}}
{{- $per_node = int $spec.gpusPerWorker -}}
{{- $max_replicas = int $spec.maxReplicas -}}
{{- $group_type = $spec.acceleratorType | default "" -}}
{{- if le $gpus $per_node -}}
{{- $capacity = mul (div $per_node $gpus) $max_replicas -}}
{{- else -}}
{{- $capacity = div (mul $per_node $max_replicas) $gpus -}}
{{- end -}}
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
        if name not in _scope_facts(rule) or spec not in (None, "q"):
            raise ValueError(f"rule {rule.name}: {match.group(0)} is not a fact (or :q of one)")
        args.append(f"${name}")
        return "%q" if spec == "q" else "%v"

    layout = _PLACEHOLDER.sub(verb, text)
    return " ".join(["printf", _go_string(layout), *args])


def _scope_facts(rule: Rule) -> tuple[str, ...]:
    return GROUP_FACTS if rule.scope == "group" else FACTS


def _check_rule(rule: Rule) -> None:
    unknown = sorted(set(_USED.findall(rule.go)) - set(_scope_facts(rule)))
    if unknown:
        raise ValueError(f"rule {rule.name}: its Go condition reads {unknown}, which are not facts")


def _checks(rules: list[Rule]) -> str:
    checks = []
    for rule in rules:
        _check_rule(rule)
        scope = "" if rule.app else " (the chart only)"
        checks.append(
            f"{{{{- /* {rule.name}{scope} */ -}}}}\n"
            f"{{{{- if {rule.go} -}}}}\n"
            f"{{{{- fail ({go_message(rule)}) -}}}}\n"
            "{{- end -}}\n"
        )
    return "".join(checks)


def _require(facts: str, names: tuple[str, ...]) -> None:
    missing = sorted(set(names) - set(_DECLARED.findall(facts)))
    if missing:
        raise ValueError(f"the chart computes no {missing}: add them to chart_rules")


def render() -> str:
    """The generated template's text."""
    group_facts_go = _GROUP_FACTS
    listing_facts_go = (
        _CLUSTER_FACTS.replace("LISTED_NONE", _go_string(CHART_WORDING.words(LISTED_NONE))).replace(
            "KNOWN_NONE", _go_string(CHART_WORDING.words(KNOWN_NONE))
        )
        + "{{- $seen_ids := dict -}}\n"
        + "{{- range $index, $model := $.Values.catalog.models -}}\n"
        + _LISTING_FACTS.replace("OPTIONAL\n", _go_optional())
    )
    _require(group_facts_go, GROUP_FACTS)
    _require(listing_facts_go, FACTS)
    group_rules = [rule for rule in RULES if rule.scope == "group"]
    listing_rules = [rule for rule in RULES if rule.scope == "listing"]
    return (
        "{{/*\n"
        f"Generated from deployments/catalog_rules.py (RULES) by `{COMMAND}`; do not edit.\n"
        "The catalog's rules across values: the same rules, in the same order and with the same messages\n"
        "as the app's, plus those only the chart can check; first each worker group, then each listing.\n"
        "The render fails on the first broken rule.\n"
        "*/}}\n"
        '{{- define "tokenmart.catalogRules" -}}\n'
        "{{- $seen_groups := dict -}}\n"
        "{{- range $index, $spec := $.Values.rayCluster.workerGroups -}}\n"
        + group_facts_go
        + _checks(group_rules)
        + "{{- end -}}\n"
        + listing_facts_go
        + _checks(listing_rules)
        + "{{- end -}}\n"
        + "{{- end -}}\n"
    )


# -- the same reading of the values in Python --------------------------------------------------------


def _int(value: Any, default: int) -> int:
    return int(value) if value else default


def values_group_facts(values: Mapping[str, Any]) -> Iterator[GroupFacts]:
    """The facts of each worker group in these chart values, read as the generated template reads them."""
    names: list[str] = []
    for index, group in enumerate(values["rayCluster"]["workerGroups"]):
        spec = GroupSpec(
            name=group["name"],
            gpus_per_worker=int(group["gpusPerWorker"]),
            max_replicas=int(group["maxReplicas"]),
            min_replicas=int(group["minReplicas"]),
        )
        yield group_facts(spec, _group_where(index), names)
        names.append(spec.name)


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
    taken: list[str] = []
    for index, model in enumerate(values["catalog"]["models"]):
        accelerator = model.get("accelerator") or {}
        engine = model.get("engine") or {}
        scaling = model.get("autoscaling") or {}
        group = accelerator.get("group")
        optional = {
            key: (scaling if source == "$scaling" else model).get(key, _default(owner, key))
            for _, source, key, owner, _ in _OPTIONAL
        }
        listing = ListingSpec(
            id=model["id"],
            tensor_parallel_size=_int(engine.get("tensor_parallel_size"), 1),
            pipeline_parallel_size=_int(engine.get("pipeline_parallel_size"), 1),
            accelerator_kind=accelerator.get("kind") or "gpu",
            accelerator_type=accelerator.get("type") or None,
            accelerator_group=group if isinstance(group, str) else None,
            attention_heads=_int(model.get("attention_heads"), 0) or None,
            min_replicas=int(optional["min_replicas"]),
            max_replicas=int(optional["max_replicas"]),
            look_back_period_s=float(optional["look_back_period_s"]),
            metrics_interval_s=float(optional["metrics_interval_s"]),
            default_max_tokens=int(optional["default_max_tokens"]),
            context_length=int(model["context_length"]),
            extra_keys=tuple(engine.get("extra") or {}),
            adapter_ids=tuple(str(adapter["id"]) for adapter in (model.get("lora") or {}).get("adapters") or []),
        )
        yield listing_facts(
            listing,
            gpu_groups,
            wording=CHART_WORDING,
            where=_where(index, model["id"]),
            cpu_groups=cpu_groups,
            pools_known=True,
            taken_ids=taken,
        )
        taken += [str(listing.id), *listing.adapter_ids]


def values_problem(values: Mapping[str, Any]) -> tuple[Rule, str] | None:
    """The rule the chart's render fails on for these values, with its message; None if it passes."""
    scoped: list[Facts | GroupFacts] = [*values_group_facts(values), *values_facts(values)]
    for facts in scoped:
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
