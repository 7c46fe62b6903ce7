"""The chart's placement checks and the app's are one rule table: the same values, both verdicts.

Each case is chart values (catalog.models and rayCluster.workerGroups over
examples/values-gpu.yaml). It goes through the real `helm template`, and through the app's own
check of the catalog the chart hands it (the listings, and the worker groups with GPUs, as
`tokenmart.appArgs` builds them). Both must accept, or both refuse naming the same rule; the
chart's message must be exactly the table's message for those values. A few rules only the
chart can check (the app never sees CPU groups, and runs without any group under the local
launcher): there the app accepts, and the case says so.
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
from tokenmart.deployments.placement import APP_WORDING, RULES, Rule, Wording

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
    return listing


def group(name: str, gpus: int, max_replicas: int = 2, type: str | None = None) -> dict[str, Any]:
    return {"name": name, "acceleratorType": type, "gpusPerWorker": gpus, "minReplicas": 0, "maxReplicas": max_replicas}


CPU = group("cpu", 0)
H100X6 = group("gpu-h100x6", 6, 2, "H100")
T4X2 = group("gpu-t4x2", 2, 4, "T4")


@dataclass(frozen=True)
class Case:
    id: str
    models: list[dict[str, Any]]
    groups: list[dict[str, Any]] | None = None  # None: the example's
    rule: str | None = None  # the rule both name; None: both accept
    app: bool = True  # False: only the chart can tell (the app accepts)

    @property
    def values(self) -> dict[str, Any]:
        values = copy.deepcopy(BASE)
        values["catalog"]["models"] = copy.deepcopy(self.models)
        values["rayCluster"]["workerGroups"] = copy.deepcopy(self.groups if self.groups is not None else EXAMPLE_GROUPS)
        return values


BAD = [
    Case("cpu-listing-with-a-type", [model(kind="cpu", group=None, type="A100")], rule="cpu-listing-has-no-type"),
    Case("tp3-of-32-heads", [model(3)], rule="tp-divides-attention-heads"),
    Case("tp4-of-30-heads", [model(4, heads=30)], rule="tp-divides-attention-heads"),
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
    Case("l4-listing-on-a100-group", [model(type="L4")], rule="type-matches-group"),
    Case("type-before-node-size", [model(8, heads=64, type="H100")], rule="type-matches-group"),
    Case("tp-above-node", [model(8, heads=64)], rule="tp-fits-one-node"),
    Case("tp2-on-one-gpu-nodes", [model(2, group="gpu-l4")], rule="tp-fits-one-node"),
    Case("tp-above-node-with-stages", [model(4, 2, group="gpu-l4")], rule="tp-fits-one-node"),
    Case("stages-split-tp4-on-6", [model(4, 3, group="gpu-h100x6")], [H100X6], rule="node-is-a-multiple-of-tp"),
    Case("two-stages-split-tp4-on-6", [model(4, 2, group="gpu-h100x6")], [H100X6], rule="node-is-a-multiple-of-tp"),
    Case("stages-split-tp3-on-4", [model(3, 2, heads=24)], rule="node-is-a-multiple-of-tp"),
    Case("replica-above-group", [model(4, 4)], rule="replica-fits-group"),
    Case("pipeline-above-group", [model(1, 8, group="gpu-l4")], rule="replica-fits-group"),
    Case("one-node-group", [model(2, 2, group="t4")], [group("t4", 2, 1)], rule="replica-fits-group"),
    Case("second-listing", [EXAMPLE_MODELS[0], model(8, heads=64)], rule="tp-fits-one-node"),
    Case("first-broken-listing-first", [model(4, 4, id="a"), model(3, id="b")], rule="replica-fits-group"),
]  # fmt: skip

GOOD = [
    Case("gpu-example", EXAMPLE_MODELS),
    Case("pack-over-two-nodes", [model(2, 2, group="gpu-t4x2", type="T4")], [T4X2]),
    Case("stages-in-one-node", [model(2, 3, group="gpu-h100x6")], [H100X6]),
    Case("cpu-listing-on-cpu-group", [model(kind="cpu", group=None, heads=None)], [CPU]),
    Case("heads-not-given", [model(3, heads=None, group="gpu-h100x6")], [H100X6]),
    Case("tp4-pp2-over-two-nodes", [model(4, 2)]),
    Case("type-from-the-group", [model(4, type="A100-80G"), model(id="other", group="gpu-l4")]),
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
    """The app's first placement problem with these values, or None when it accepts them."""
    try:
        parse_catalog(app_catalog(values))
    except CatalogError as refused:
        # "  - <field>: Value error, <problem>; <problem>": the field's first problem, without pydantic's marker
        first_error = str(refused).splitlines()[1].removeprefix("  - ").replace("Value error, ", "", 1)
        return re.split(r"; (?=listing ')", first_error)[0]
    return None


def chart_refusal(result: subprocess.CompletedProcess) -> str | None:
    if result.returncode == 0:
        return None
    failed = re.search(r"execution error at \([^)]*\): (.*)", result.stderr)
    assert failed, result.stderr
    return failed.group(1)


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
    assert len(BAD) >= 20 and len({case.id for case in CASES}) == len(CASES)
    assert {case.rule for case in BAD} == set(RULE)
    for case in BAD:
        assert case.app or not RULE[case.rule].app or not app_catalog(case.values).get("worker_groups"), case.id


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_the_chart_and_the_app_refuse_the_same_values_naming_the_same_rule(
    case: Case, rendered: dict[str, subprocess.CompletedProcess]
) -> None:
    chart = chart_refusal(rendered[case.id])
    app = app_refusal(case.values)
    if case.rule is None:
        assert (chart, app) == (None, None)
        # What the chart accepted reaches the app as the catalog checked here.
        args = serve_app(next(d for d in yaml.safe_load_all(rendered[case.id].stdout) if d["kind"] == "RayService"))
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


def test_the_two_sides_word_a_rule_alike() -> None:
    """One message template, quoted and named the side's way: the app repr and snake_case, the chart %q
    and its values' camelCase."""
    values = next(case.values for case in BAD if case.id == "tp-above-node")
    app, chart = app_refusal(values), chart_rules.values_problem(values)
    assert chart is not None
    assert app == (
        "field (top level): listing 'm': tensor_parallel_size 8 is larger than gpus_per_worker 4 of worker group "
        "'gpu-a100x4'; a tensor-parallel group must fit one node: lower tensor_parallel_size (and raise "
        "pipeline_parallel_size) or use a group with at least 8 GPUs per node"
    )
    assert chart[1] == (
        'catalog.models[0] (m): tensor_parallel_size 8 is larger than gpusPerWorker 4 of worker group "gpu-a100x4"; '
        "a tensor-parallel group must fit one node: lower tensor_parallel_size (and raise pipeline_parallel_size) "
        "or use a group with at least 8 GPUs per node"
    )
