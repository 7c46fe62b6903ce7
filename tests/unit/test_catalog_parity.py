"""`helm template` refuses exactly the catalogs the app refuses, for the same reason.

Each case is chart values (catalog.models and rayCluster.workerGroups over
examples/values-gpu.yaml). It goes through the real `helm template`, and through the app's own
check of the catalog the chart hands it (the listings, and the worker groups with GPUs, as
`tokenmart.appArgs` builds them). Both must accept, or both refuse for the same reason:

- a rule across values (deployments/catalog_rules.py RULES, which the chart's
  _catalog_rules.tpl is generated from): both name the same rule, and the chart's message is
  word for word the table's message for those values;
- a field's own constraint (the catalog's pydantic `Field`s, which values.schema.json is
  generated from): both name the same field.

A few rules only the chart can check (the app never sees CPU groups, and runs without any group
under the local launcher): there the app accepts, and the case says so.
"""

from __future__ import annotations

import copy
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tokenmart.cluster import chart_rules
from tokenmart.deployments.catalog import CatalogError, parse_catalog
from tokenmart.deployments.catalog_rules import APP_WORDING, RULES, Rule, Wording

from .test_helm_chart import CHART, GPU_VALUES, _helm, serve_app

BASE = yaml.safe_load(GPU_VALUES.read_text())
EXAMPLE_MODELS = BASE["catalog"]["models"]
EXAMPLE_GROUPS = BASE["rayCluster"]["workerGroups"]  # gpu-l4: 1 x L4, 4 nodes; gpu-a100x4: 4 x A100-80G, 2 nodes
RULE = {rule.name: rule for rule in RULES}


def model(
    tp: int = 1,
    pp: int = 1,
    *,
    group: str | None = "gpu-a100x4",
    heads: int | None = 32,
    kind: str = "gpu",
    type: str | None = None,
    id: str = "m",
    **fields: Any,
) -> dict[str, Any]:
    accelerator: dict[str, Any] = {"kind": kind}
    if group is not None:
        accelerator["group"] = group
    if type is not None:
        accelerator["type"] = type
    listing = {
        "id": id,
        "owner": "o",
        "source": "org/m",
        "context_length": 4096,
        "pricing": {"prompt_usd_per_1m": 1, "completion_usd_per_1m": 2},
        "accelerator": accelerator,
        "engine": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp},
    }
    if heads is not None:
        listing["attention_heads"] = heads
    for name, value in fields.items():
        if isinstance(value, dict) and isinstance(listing.get(name), dict):
            listing[name] = {**listing[name], **value}
        else:
            listing[name] = value
    return listing


def priced(prompt: Any) -> dict[str, Any]:
    return model(pricing={"prompt_usd_per_1m": prompt})


def scaled(
    tp: int = 1, pp: int = 1, *, heads: int | None = 32, group: str = "gpu-a100x4", id: str = "m", **autoscaling: Any
):
    return model(tp, pp, heads=heads, group=group, id=id, autoscaling=autoscaling)


def extra(**args: Any) -> dict[str, Any]:
    return model(engine={"extra": args})


def with_adapters(*ids: str, id: str = "m") -> dict[str, Any]:
    adapters = [{"id": adapter, "source": f"/mnt/adapters/{adapter}", "pricing": {"prompt_usd_per_1m": 1,
                 "completion_usd_per_1m": 1}} for adapter in ids]  # fmt: skip
    return model(id=id, lora={"adapters": adapters})


def group(name: str, gpus: int, max_replicas: int = 2, type: str | None = None, min_replicas: int = 0):
    return {
        "name": name,
        "acceleratorType": type,
        "gpusPerWorker": gpus,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
    }


CPU = group("cpu", 0)
H100X6 = group("gpu-h100x6", 6, 2, "H100")
T4X2 = group("gpu-t4x2", 2, 4, "T4")
A100X4 = EXAMPLE_GROUPS[1]


@dataclass(frozen=True)
class Case:
    id: str
    models: list[dict[str, Any]]
    groups: list[dict[str, Any]] | None = None  # None: the example's
    rule: str | None = None  # the rule both name
    field: str | None = None  # or the field both name (a field's own constraint, in the schema); neither: both accept
    app: bool = True  # False: only the chart can tell (the app accepts)

    @property
    def values(self) -> dict[str, Any]:
        values = copy.deepcopy(BASE)
        values["catalog"]["models"] = copy.deepcopy(self.models)
        values["rayCluster"]["workerGroups"] = copy.deepcopy(self.groups if self.groups is not None else EXAMPLE_GROUPS)
        return values


# The examples of the issue that `helm template` used to accept while the app refused them at start.
ISSUE = [
    Case("issue-tp3-pp2-on-4-gpu-nodes", [model(3, 2, heads=24)], rule="node-is-a-multiple-of-tp"),
    Case("issue-tp-not-dividing-heads", [model(4, heads=30)], rule="tp-divides-attention-heads"),
    Case("issue-price-string-with-a-dollar", [priced("$0.50")], field="pricing.prompt_usd_per_1m"),
    Case("issue-price-string-with-words", [priced("0.5 USD")], field="pricing.prompt_usd_per_1m"),
    Case("issue-model-min-above-max", [scaled(min_replicas=3, max_replicas=2)], rule="min-replicas-within-max"),
    Case(
        "issue-group-min-above-max",
        [model()],
        [EXAMPLE_GROUPS[0], group("gpu-a100x4", 4, 2, min_replicas=3)],
        rule="group-min-within-max",
    ),
    Case("issue-max-replicas-beyond-group", [scaled(4, max_replicas=3)], rule="max-replicas-fit-group"),
]

BAD = [
    *ISSUE,
    # worker groups
    Case("group-name-twice", [model()], [*EXAMPLE_GROUPS, group("gpu-l4", 1)], rule="group-name-is-unique"),
    Case("cpu-group-name-twice", [model(kind="cpu", group=None, heads=None)], [CPU, CPU],
         rule="group-name-is-unique", app=False),
    Case("cpu-group-min-above-max", [model(kind="cpu", group=None, heads=None)], [group("cpu", 0, 1, min_replicas=2)],
         rule="group-min-within-max", app=False),
    # a listing's own fields together, and the listings together
    Case("listing-id-twice", [model(id="dup"), model(id="dup")], rule="model-id-is-unique"),
    Case("adapter-reuses-a-listing-id", [model(id="other"), with_adapters("other")], rule="model-id-is-unique"),
    Case("adapter-id-twice", [with_adapters("m:a", "m:a")], rule="model-id-is-unique"),
    Case("adapter-reuses-its-base-id", [with_adapters("m")], rule="model-id-is-unique"),
    Case("default-max-tokens-at-context", [model(default_max_tokens=4096)], rule="default-max-tokens-within-context"),
    Case("default-max-tokens-above-context", [model(context_length=128)], rule="default-max-tokens-within-context"),
    Case("extra-sets-max-model-len", [extra(max_model_len=8192)], rule="extra-sets-no-typed-engine-arg"),
    Case("extra-sets-two-typed-args", [extra(tensor_parallel_size=2, dtype="half")],
         rule="extra-sets-no-typed-engine-arg"),
    Case("extra-sets-lora", [extra(enable_lora=True, max_loras=2)], rule="extra-sets-no-lora-engine-arg"),
    Case("extra-sets-tool-parser", [extra(tool_call_parser="hermes")], rule="extra-sets-no-tool-engine-arg"),
    Case("min-above-default-max", [scaled(min_replicas=2)], rule="min-replicas-within-max"),
    Case("look-back-as-long-as-interval", [scaled(look_back_period_s=2, metrics_interval_s=2)],
         rule="look-back-longer-than-metrics-interval"),
    Case("interval-beyond-default-look-back", [scaled(metrics_interval_s=7.5)],
         rule="look-back-longer-than-metrics-interval"),
    # where the replicas run
    Case("cpu-listing-with-a-type", [model(kind="cpu", group=None, type="A100")], rule="cpu-listing-has-no-type"),
    Case("tp3-of-32-heads", [model(3)], rule="tp-divides-attention-heads"),
    Case("tp2-of-7-heads", [model(2, heads=7)], rule="tp-divides-attention-heads"),
    Case("heads-without-a-group", [model(3, group=None)], rule="tp-divides-attention-heads"),
    Case("heads-before-node-size", [model(8, heads=12)], rule="tp-divides-attention-heads"),
    Case("gpu-listing-without-group", [model(group=None)], rule="gpu-listing-names-group", app=False),
    Case("no-gpu-group-at-all", [model(group=None)], [CPU], rule="gpu-listing-names-group", app=False),
    Case("cpu-group-only", [model(group="cpu")], [CPU], rule="group-has-gpus", app=False),
    Case("unknown-group", [model(group="gpu-h100")], rule="group-is-known"),
    Case("cpu-group-beside-gpu-groups", [model(group="cpu")], [CPU, *EXAMPLE_GROUPS], rule="group-is-known"),
    Case("unknown-group-no-gpu-groups", [model(group="nope")], [CPU], rule="group-is-known", app=False),
    Case("empty-group-name", [model(group="")], rule="group-is-known"),
    Case("type-contradicts-group", [model(4, type="H100")], rule="type-matches-group"),
    Case("type-before-node-size", [model(8, heads=64, type="H100")], rule="type-matches-group"),
    Case("tp-above-node", [model(8, heads=64)], rule="tp-fits-one-node"),
    Case("tp2-on-one-gpu-nodes", [model(2, group="gpu-l4")], rule="tp-fits-one-node"),
    Case("tp-above-node-with-stages", [model(4, 2, group="gpu-l4")], rule="tp-fits-one-node"),
    Case("stages-split-tp4-on-6", [model(4, 3, group="gpu-h100x6")], [H100X6], rule="node-is-a-multiple-of-tp"),
    Case("replica-above-group", [model(4, 4)], rule="replica-fits-group"),
    Case("pipeline-above-group", [model(1, 8, group="gpu-l4")], rule="replica-fits-group"),
    Case("one-node-group", [model(2, 2, group="t4")], [group("t4", 2, 1)], rule="replica-fits-group"),
    Case("tp3-replicas-take-a-node-each", [scaled(3, heads=24, max_replicas=3)], rule="max-replicas-fit-group"),
    Case("spread-replicas-beyond-group", [scaled(4, 2, max_replicas=2)], rule="max-replicas-fit-group"),
    Case("one-gpu-replicas-beyond-nodes", [scaled(group="gpu-l4", max_replicas=5)], rule="max-replicas-fit-group"),
    Case("second-listing", [EXAMPLE_MODELS[0], model(8, heads=64)], rule="tp-fits-one-node"),
    Case("first-broken-listing-first", [model(4, 4, id="a"), model(3, id="b")], rule="replica-fits-group"),
    Case("groups-before-listings", [model(4, 4)], [EXAMPLE_GROUPS[0], {**A100X4, "minReplicas": 3}],
         rule="group-min-within-max"),
    # a field's own constraints: the schema and the pydantic fields it is generated from
    Case("price-with-seven-decimals", [priced(0.0000001)], field="pricing.prompt_usd_per_1m"),
    Case("price-string-with-seven-decimals", [priced("0.0000001")], field="pricing.prompt_usd_per_1m"),
    Case("price-above-the-bound", [priced(10000.5)], field="pricing.prompt_usd_per_1m"),
    Case("price-string-above-the-bound", [priced("20000")], field="pricing.prompt_usd_per_1m"),
    Case("negative-price-string", [priced("-1")], field="pricing.prompt_usd_per_1m"),
    Case("price-string-with-a-sign", [priced("+0.5")], field="pricing.prompt_usd_per_1m"),
    Case("price-a-boolean", [priced(True)], field="pricing.prompt_usd_per_1m"),
    Case("lora-rank-vllm-refuses", [model(lora={"max_rank": 4, "adapters": with_adapters("m:a")["lora"]["adapters"]})],
         field="lora.max_rank"),
    Case("tp-zero", [model(0, heads=None)], field="engine.tensor_parallel_size"),
    Case("unknown-listing-field", [model(contxt_length=4096)], field="contxt_length"),
    Case("min-replicas-negative", [scaled(min_replicas=-1)], field="autoscaling.min_replicas"),
]  # fmt: skip

GOOD = [
    Case("gpu-example", EXAMPLE_MODELS),
    Case("pack-over-two-nodes", [model(2, 2, group="gpu-t4x2", type="T4")], [T4X2]),
    Case("stages-in-one-node", [model(2, 3, group="gpu-h100x6")], [H100X6]),
    Case("cpu-listing-on-cpu-group", [model(kind="cpu", group=None, heads=None)], [CPU]),
    Case("heads-not-given", [model(3, heads=None, group="gpu-h100x6")], [H100X6]),
    Case("tp4-pp2-over-two-nodes", [model(4, 2)]),
    Case("type-from-the-group", [model(4, type="A100-80G"), model(id="other", group="gpu-l4")]),
    Case("price-strings-and-numbers", [model(pricing={"prompt_usd_per_1m": "0.5", "completion_usd_per_1m": 0.79})]),
    Case("prices-at-the-bounds", [model(pricing={"prompt_usd_per_1m": "10000", "completion_usd_per_1m": 0.0001})]),
    Case("six-decimal-prices", [model(pricing={"prompt_usd_per_1m": "0.000001", "completion_usd_per_1m": 12.345678})]),
    Case("scale-to-zero", [scaled(min_replicas=0, max_replicas=2)]),
    Case("max-replicas-fill-the-group", [scaled(group="gpu-l4", max_replicas=4), scaled(2, id="b", max_replicas=4)]),
    Case("tp3-replicas-one-per-node", [scaled(3, heads=24, max_replicas=2)]),
    Case("group-min-equals-max", [model()], [EXAMPLE_GROUPS[0], {**A100X4, "minReplicas": 2}]),
    Case("adapters-with-their-own-ids", [with_adapters("m:a", "m:b"), model(id="other")]),
    Case("extra-with-other-engine-args", [extra(enforce_eager=True, swap_space=4)]),
    Case("default-max-tokens-below-context", [model(default_max_tokens=4095)]),
    Case("look-back-just-longer", [scaled(look_back_period_s=1.5, metrics_interval_s=1)]),
]
CASES = BAD + GOOD


def app_catalog(values: dict[str, Any]) -> dict[str, Any]:
    """The catalog the chart hands the app (tokenmart.appArgs in _helpers.tpl)."""
    groups = [
        {
            "name": g["name"],
            "accelerator_type": g.get("acceleratorType"),
            "gpus_per_worker": g["gpusPerWorker"],
            "min_replicas": g.get("minReplicas"),
            "max_replicas": g.get("maxReplicas"),
            "resources": g.get("resources") or {},
        }
        for g in values["rayCluster"]["workerGroups"]
        if int(g["gpusPerWorker"]) > 0
    ]
    catalog: dict[str, Any] = {"listings": values["catalog"]["models"]}
    if groups:
        catalog["worker_groups"] = groups
    return catalog


def _pattern(rule: Rule, wording: Wording) -> re.Pattern[str]:
    literal = re.split(r"\{\w+(?::\w+)?\}", wording.words(rule.message))
    return re.compile(".*?".join(map(re.escape, literal)), re.DOTALL)


def rule_named_by(problem: str, wording: Wording) -> str:
    """The one rule whose message this is."""
    named = [rule.name for rule in RULES if _pattern(rule, wording).fullmatch(problem)]
    assert len(named) == 1, (problem, named)
    return named[0]


def app_refusal(values: dict[str, Any]) -> str | None:
    """The app's first problem with these values, or None when it accepts them."""
    try:
        parse_catalog(app_catalog(values))
    except CatalogError as refused:
        return str(refused).splitlines()[1].removeprefix("  - ")
    return None


def app_field(problem: str) -> str:
    """The field an app's field error names: "listing 'm' (listings[0]): field pricing.x: ..." -> "pricing.x"."""
    named = re.match(r"listing '[^']*' \(listings\[\d+\]\): field ([\w.]+): ", problem)
    assert named, problem
    return named.group(1)


def chart_refusal(result: subprocess.CompletedProcess) -> str | None:
    if result.returncode == 0:
        return None
    failed = re.search(r"execution error at \([^)]*\): (.*)", result.stderr)
    assert failed, result.stderr
    return failed.group(1)


def chart_schema_fields(result: subprocess.CompletedProcess) -> set[str]:
    """The listing fields Helm's schema check names: "at '/catalog/models/0/pricing/x'" -> "pricing.x"."""
    assert result.returncode != 0 and "don't meet the specifications of the schema" in result.stderr, result.stderr
    paths = re.findall(r"at '/catalog/models/\d+/([^']*)'", result.stderr)
    unknown = re.findall(
        r"at '/catalog/models/\d+((?:/[^']*)?)': additional properties '(\w+)' not allowed", result.stderr
    )
    return {path.replace("/", ".") for path in paths} | {
        f"{path}/{name}".strip("/").replace("/", ".") for path, name in unknown
    }


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every case through `helm template`, a few at a time."""
    folder = tmp_path_factory.mktemp("parity")
    helm = _helm()

    def render(case: Case) -> subprocess.CompletedProcess:
        path = folder / f"{case.id}.yaml"
        path.write_text(yaml.safe_dump(case.values))
        return subprocess.run(
            [helm, "template", "tokenmart", str(CHART), "-f", str(path)], capture_output=True, text=True, timeout=60
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([case.id for case in CASES], pool.map(render, CASES), strict=True))


def test_the_committed_template_is_generated_from_the_rules() -> None:
    assert chart_rules.TEMPLATE_PATH.read_text() == chart_rules.render(), (
        f"{chart_rules.TEMPLATE_PATH.name} is stale: run {chart_rules.COMMAND}"
    )


def test_the_corpus_breaks_every_rule_and_says_where_only_the_chart_can_tell() -> None:
    assert len({case.id for case in CASES}) == len(CASES)
    assert {case.rule for case in BAD if case.rule} == set(RULE)
    assert all((case.rule is None) != (case.field is None) for case in BAD)
    for case in BAD:
        assert case.app or (
            case.rule and (not RULE[case.rule].app or not app_catalog(case.values).get("worker_groups"))
        )


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_the_chart_and_the_app_refuse_the_same_catalogs_for_the_same_reason(
    case: Case, rendered: dict[str, subprocess.CompletedProcess]
) -> None:
    result = rendered[case.id]
    app = app_refusal(case.values)
    if case.field is not None:
        assert case.field in chart_schema_fields(result)
        assert app is not None, "the app accepted values the chart's schema refuses"
        assert app_field(app) == case.field
        return
    chart = chart_refusal(result)
    if case.rule is None:
        assert (chart, app) == (None, None)
        # What the chart accepted reaches the app as the catalog checked here.
        args = serve_app(next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "RayService"))
        assert args["args"]["catalog"] == app_catalog(case.values)
        return
    assert chart is not None, "the chart accepted values it must refuse"
    assert rule_named_by(chart, chart_rules.CHART_WORDING) == case.rule
    # Word for word what the table says for these values.
    assert (RULE[case.rule], chart) == chart_rules.values_problem(case.values)
    if case.app:
        assert app is not None, "the app accepted values the chart refuses"
        assert rule_named_by(app, APP_WORDING) == case.rule
    else:
        assert app is None, "the case says only the chart can tell, but the app refused"


def _messages(case_id: str) -> tuple[str | None, tuple[Rule, str] | None]:
    values = next(case.values for case in BAD if case.id == case_id)
    return app_refusal(values), chart_rules.values_problem(values)


def test_the_two_sides_word_a_rule_alike() -> None:
    """One message template, quoted and named the side's way: the app repr and snake_case, the chart %q
    and its values' camelCase."""
    app, chart = _messages("tp-above-node")
    assert chart is not None
    assert app == (
        "listing 'm' (listings[0]): tensor_parallel_size 8 is larger than gpus_per_worker 4 of worker group "
        "'gpu-a100x4'; a tensor-parallel group must fit one node: lower tensor_parallel_size (and raise "
        "pipeline_parallel_size) or use a group with at least 8 GPUs per node"
    )
    assert chart[1] == (
        'catalog.models[0] (m): tensor_parallel_size 8 is larger than gpusPerWorker 4 of worker group "gpu-a100x4"; '
        "a tensor-parallel group must fit one node: lower tensor_parallel_size (and raise pipeline_parallel_size) "
        "or use a group with at least 8 GPUs per node"
    )


def test_the_issue_examples_are_refused_with_messages_that_say_what_to_change() -> None:
    assert _messages("issue-max-replicas-beyond-group") == (
        "listing 'm' (listings[0]): autoscaling.max_replicas 3 replicas of 4 GPUs each are more than worker group "
        "'gpu-a100x4' can ever hold (2, with gpus_per_worker 4 x max_replicas 2); lower autoscaling.max_replicas "
        "or raise the group's max_replicas",
        (
            RULE["max-replicas-fit-group"],
            "catalog.models[0] (m): autoscaling.max_replicas 3 replicas of 4 GPUs each are more than worker group "
            '"gpu-a100x4" can ever hold (2, with gpusPerWorker 4 x maxReplicas 2); lower autoscaling.max_replicas '
            "or raise the group's maxReplicas",
        ),
    )
    assert _messages("issue-group-min-above-max") == (
        "worker_groups[1]: min_replicas 3 of worker group 'gpu-a100x4' is larger than its max_replicas 2",
        (
            RULE["group-min-within-max"],
            'rayCluster.workerGroups[1]: minReplicas 3 of worker group "gpu-a100x4" is larger than its maxReplicas 2',
        ),
    )
    app, _ = _messages("issue-model-min-above-max")
    assert app == "listing 'm' (listings[0]): autoscaling.min_replicas 3 is larger than autoscaling.max_replicas 2"
    app, _ = _messages("look-back-as-long-as-interval")
    assert app == (
        "listing 'm' (listings[0]): autoscaling.look_back_period_s 2 must be longer than "
        "autoscaling.metrics_interval_s 2"
    )
