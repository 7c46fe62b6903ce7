"""The Grafana dashboard and docs/metrics.md cannot drift from the metrics the code records."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tokenmart.deployments.metrics import SPECS, MetricSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "helm" / "tokenmart" / "dashboards" / "tokenmart.json"
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
EXPORTED = {spec.exported: spec for spec in SPECS.values()}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Labels Ray's metrics agent and Ray Serve add to every series of a replica's metric.
RAY_LABELS = {"application", "deployment", "replica", "NodeAddress", "SessionName"}

REQUIRED_TITLES = {
    "Requests per second by model",
    "Errors per second by model and status",
    "Tokens per second by model",
    "Spend USD per hour by model",
    "Spend in the time range",
    "Rate limited and insufficient credit per second by model",
    "Time to first token p50/p95/p99 by model",
    "Request latency p50/p95/p99 by model and stream",
    "In-flight requests by model",
    "Healthy replicas per deployment",
    "Engine KV-cache use by model",
}

METRIC_NAME = re.compile(r"\bray_\w+")
TOKENMART_NAME = re.compile(r"\bray_tokenmart_\w+")
AGGREGATION_BY = re.compile(r"\b(?:sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk)\s+by\s*\(([^)]*)\)\s*\(")
ANY_BY = re.compile(r"\bby\s*\(")
SELECTOR = re.compile(r"\b(ray_tokenmart_\w+)\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
RANGE = re.compile(r"\[([^\]]+)\]")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query and every query variable."""
    exprs = [(title, target["expr"]) for title, target in _targets(dashboard)]
    exprs += [
        (f"variable {var['name']}", var["query"]) for var in dashboard["templating"]["list"] if var["type"] == "query"
    ]
    return exprs


def _spec_of(name: str) -> MetricSpec | None:
    """The spec an exported series name belongs to (a histogram's _bucket/_count/_sum included)."""
    if name in EXPORTED:
        return EXPORTED[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in EXPORTED and EXPORTED[base].kind == "histogram":
            return EXPORTED[base]
    return None


def _argument(expr: str, open_paren: int) -> str:
    """The text inside the parenthesis opened at `open_paren`."""
    depth = 0
    for i in range(open_paren, len(expr)):
        if expr[i] == "(":
            depth += 1
        elif expr[i] == ")":
            depth -= 1
            if depth == 0:
                return expr[open_paren + 1 : i]
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def test_dashboard_parses_with_its_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "tokenmart"
    assert dashboard["title"] == "tokenmart marketplace"
    assert dashboard["schemaVersion"] == 39
    assert dashboard["panels"]


def test_panel_ids_are_unique_and_laid_out_in_rows_of_two(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert ids == list(range(1, len(ids) + 1))
    for index, panel in enumerate(dashboard["panels"]):
        assert panel["gridPos"] == {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)}, panel["title"]


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    model = variables["model"]
    assert model["type"] == "query"
    assert model["datasource"] == DATASOURCE
    assert model["query"] == "label_values(ray_tokenmart_requests_total, model)"
    assert model["multi"] is True
    assert model["includeAll"] is True


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
    for title, target in _targets(dashboard):
        assert target["datasource"] == DATASOURCE, title


def test_required_panels_are_present(dashboard: dict[str, Any]) -> None:
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    missing = REQUIRED_TITLES - set(titles)
    assert not missing, f"panels missing: {sorted(missing)}"


def test_tokenmart_metric_names_are_exported_by_the_code(dashboard: dict[str, Any]) -> None:
    used = set()
    for where, expr in _exprs(dashboard):
        for name in TOKENMART_NAME.findall(expr):
            assert _spec_of(name) is not None, f"{where}: {name} is not a metric of SPECS"
            used.add(_spec_of(name).name)
    assert used == set(SPECS), f"metrics of SPECS no panel shows: {set(SPECS) - used}"


def test_grouping_labels_are_labels_of_the_metric(dashboard: dict[str, Any]) -> None:
    for where, expr in _exprs(dashboard):
        matches = list(AGGREGATION_BY.finditer(expr))
        # `sum(...) by (...)` would escape the check below: the dashboard writes `by` first.
        assert len(matches) == len(ANY_BY.findall(expr)), f"{where}: write `sum by (...) (...)`: {expr}"
        for match in matches:
            labels = {label.strip() for label in match.group(1).split(",") if label.strip()}
            for name in TOKENMART_NAME.findall(_argument(expr, match.end() - 1)):
                spec = _spec_of(name)
                assert spec is not None, name
                extra = labels - {*spec.labels, "le"}
                assert not extra, f"{where}: {name} has no label {sorted(extra)}"


def test_selector_labels_are_labels_of_the_metric(dashboard: dict[str, Any]) -> None:
    for where, expr in _exprs(dashboard):
        for name, matchers in SELECTOR.findall(expr):
            spec = _spec_of(name)
            assert spec is not None, name
            extra = set(MATCHER_LABEL.findall(matchers)) - {*spec.labels, "le", *RAY_LABELS}
            assert not extra, f"{where}: {name} has no label {sorted(extra)}"


def test_ranges_follow_grafana(dashboard: dict[str, Any]) -> None:
    for where, expr in _exprs(dashboard):
        for window in RANGE.findall(expr):
            assert window in {"$__rate_interval", "$__range"}, f"{where}: [{window}]"


def test_every_metric_is_documented(dashboard: dict[str, Any]) -> None:
    doc = METRICS_DOC.read_text()
    for spec in SPECS.values():
        assert re.search(rf"\b{spec.exported}\b", doc), f"{spec.exported} is missing from docs/metrics.md"
    for where, expr in _exprs(dashboard):
        for name in METRIC_NAME.findall(expr):
            assert name in doc, f"{where}: {name} is missing from docs/metrics.md"
