"""The metric definitions: documented, bounded labels, per-key series only on request."""

from __future__ import annotations

from pathlib import Path

from tokenmart.deployments.metrics import SPECS, MarketplaceMetrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_counters_are_exported_with_ray_prefix_and_total_suffix():
    assert SPECS["tokenmart_requests"].exported == "ray_tokenmart_requests_total"
    assert SPECS["tokenmart_in_flight_requests"].exported == "ray_tokenmart_in_flight_requests"
    assert SPECS["tokenmart_time_to_first_token_seconds"].exported == "ray_tokenmart_time_to_first_token_seconds"


def test_no_metric_is_labelled_by_anything_unbounded_but_the_opt_in_key_id():
    allowed = {"model", "status", "code", "stream", "key_id"}
    for spec in SPECS.values():
        assert set(spec.labels) <= allowed, spec.name


def test_every_metric_is_documented():
    text = DOCS.read_text()
    assert all(spec.exported in text for spec in SPECS.values())


def test_key_ids_become_label_values_only_when_the_operator_opts_in():
    assert MarketplaceMetrics()._key("key_abc") == ""
    assert MarketplaceMetrics(per_key_labels=True)._key("key_abc") == "key_abc"
    assert MarketplaceMetrics(per_key_labels=True)._key(None) == ""


def test_in_flight_is_a_running_count_per_model():
    metrics = MarketplaceMetrics()
    for delta in (+1, +1, -1):
        metrics.in_flight("a", delta)
    metrics.in_flight("b", +1)
    assert metrics._in_flight_counts == {"a": 1, "b": 1}
