"""Requests move the marketplace's Prometheus metrics, as Ray's metrics agent exports them.

The marketplace runs two ingress replicas, so every figure is a sum over replicas, as a
Prometheus query would take it. Ray reports each second; the helpers wait for the change.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmart.deployments.metrics import SPECS

from .conftest import TEST_CATALOG
from .test_ingress_http import MESSAGES, PROMPT_TOKENS, micros, stream_chat

pytestmark = pytest.mark.integration

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]
REPORT_TIMEOUT_S = 30.0


def scrape(market) -> Series:
    text = httpx.get(market.metrics_url, timeout=10).text
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_tokenmart_"):
                series[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return series


def total(series: Series, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include these (i.e. over replicas)."""
    return sum(
        value for (sample, sample_labels), value in series.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )  # fmt: skip


def quiet_scrape(market) -> Series:
    """The series once the counters stopped moving: replicas hand counts to Ray once a second,
    so an earlier test's requests may still arrive after its last response."""
    previous = scrape(market)
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while time.monotonic() < deadline:
        time.sleep(2.5)
        current = scrape(market)
        if current == previous:
            break
        previous = current
    return previous


def wait_for(market, condition: Callable[[Series], bool]) -> Series:
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while True:
        series = scrape(market)
        if condition(series) or time.monotonic() > deadline:
            return series
        time.sleep(0.5)


def delta(before: Series, after: Series, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_a_paid_request_moves_requests_tokens_spend_and_latency(marketplace):
    key = marketplace.create_key(name="metrics", credit_usd=1)
    before = quiet_scrape(marketplace)
    response = marketplace.chat(key["key"], model="beta-chat", messages=MESSAGES, max_tokens=5)
    assert response.status_code == 200, response.text
    cost = response.json()["usage"]["cost"]

    ok = {"model": "beta-chat", "status": "200", "stream": "false"}
    after = wait_for(marketplace, lambda s: delta(before, s, "ray_tokenmart_requests_total", **ok) >= 1)
    assert delta(before, after, "ray_tokenmart_requests_total", **ok) == 1
    assert delta(before, after, "ray_tokenmart_prompt_tokens_total", model="beta-chat") == PROMPT_TOKENS
    assert delta(before, after, "ray_tokenmart_completion_tokens_total", model="beta-chat") == 5
    assert (
        micros(delta(before, after, "ray_tokenmart_spend_usd_total", model="beta-chat")) == micros(cost) == 70
    )  # 8 * 2.5 + 5 * 10
    latency = "ray_tokenmart_request_latency_seconds_count"
    assert delta(before, after, latency, model="beta-chat", stream="false") == 1
    # Settled, so nothing is in flight on any replica.
    assert total(after, "ray_tokenmart_in_flight_requests", model="beta-chat") == 0


def test_prompt_tokens_from_the_prefix_cache_are_counted_apart(marketplace):
    key = marketplace.create_key(name="metrics-cached", credit_usd=1)
    before = quiet_scrape(marketplace)
    messages = [{"role": "user", "content": "a shared prefix [[fake-cached=4]]"}]
    response = marketplace.chat(key["key"], model="beta-chat", messages=messages, max_tokens=2)
    assert response.status_code == 200, response.text
    prompt = response.json()["usage"]["prompt_tokens"]
    cached = "ray_tokenmart_cached_prompt_tokens_total"
    after = wait_for(marketplace, lambda s: delta(before, s, cached, model="beta-chat") >= 4)
    assert delta(before, after, cached, model="beta-chat") == 4
    assert delta(before, after, "ray_tokenmart_prompt_tokens_total", model="beta-chat") == prompt


def test_a_stream_records_its_time_to_first_token_and_ends_as_200(marketplace):
    key = marketplace.create_key(name="metrics-stream", credit_usd=1)
    before = quiet_scrape(marketplace)
    events = stream_chat(marketplace, key["key"], model="alpha-chat", max_tokens=4)
    assert events[-1] == "[DONE]"

    ok = {"model": "alpha-chat", "status": "200", "stream": "true"}
    after = wait_for(marketplace, lambda s: delta(before, s, "ray_tokenmart_requests_total", **ok) >= 1)
    assert delta(before, after, "ray_tokenmart_requests_total", **ok) == 1
    assert delta(before, after, "ray_tokenmart_time_to_first_token_seconds_count", model="alpha-chat") == 1
    assert delta(before, after, "ray_tokenmart_completion_tokens_total", model="alpha-chat") == 4
    assert delta(before, after, "ray_tokenmart_request_latency_seconds_count", model="alpha-chat", stream="true") == 1


def test_refusals_are_counted_by_status_and_code(marketplace):
    limited = marketplace.create_key(name="metrics-rpm", credit_usd=1, rpm=1)
    broke = marketplace.create_key(name="metrics-broke", credit_usd=0)
    before = quiet_scrape(marketplace)

    assert marketplace.chat(limited["key"], model="alpha-chat", max_tokens=1).status_code == 200
    assert marketplace.chat(limited["key"], model="alpha-chat", max_tokens=1).status_code == 429
    assert marketplace.chat(broke["key"], model="alpha-chat", max_tokens=1).status_code == 402
    assert marketplace.chat(broke["key"], model="no-such-model", max_tokens=1).status_code == 404

    requests = "ray_tokenmart_requests_total"
    rate_limited = {"model": "alpha-chat", "status": "429", "code": "rate_limit_exceeded"}
    expected = [
        {"model": "alpha-chat", "status": "200", "stream": "false"},  # its prompt tokens are billed
        rate_limited,
        {"model": "alpha-chat", "status": "402", "code": "insufficient_quota"},
        {"model": "unknown", "status": "404", "code": "model_not_found"},
    ]
    # The requests may have gone to either ingress replica, each reporting on its own clock.
    after = wait_for(marketplace, lambda s: all(delta(before, s, requests, **labels) >= 1 for labels in expected))
    assert delta(before, after, requests, **rate_limited) == 1
    assert delta(before, after, requests, model="alpha-chat", status="402", code="insufficient_quota") == 1
    # A model id that is not in the catalog is never a label value of its own.
    assert delta(before, after, requests, model="unknown", status="404", code="model_not_found") == 1
    assert not any(dict(labels).get("model") == "no-such-model" for _, labels in after)
    # Refused requests bill nothing: only the first one's 5 prompt tokens ("hello marketplace" + 3).
    assert delta(before, after, "ray_tokenmart_prompt_tokens_total", model="alpha-chat") == 5


# The metrics one paid request and one stream move (hold_exceeded, say, stays unexported
# until something exceeds a hold).
MOVED_BY_TRAFFIC = {
    SPECS[name].exported
    for name in (
        "tokenmart_requests",
        "tokenmart_prompt_tokens",
        "tokenmart_completion_tokens",
        "tokenmart_spend_usd",
        "tokenmart_in_flight_requests",
        "tokenmart_request_latency_seconds",
        "tokenmart_time_to_first_token_seconds",
    )
}
# The tags Ray's metrics agent adds to every series (Ray 2.60).
RAY_TAGS = {
    "Component",
    "NodeAddress",
    "SessionName",
    "Version",
    "WorkerId",
    "application",
    "deployment",
    "replica",
    "otel_scope_name",
    "otel_scope_schema_url",
    "otel_scope_version",
}
CATALOG_MODELS = {offer.id for offer in TEST_CATALOG.offers}


def base_name(sample: str) -> str:
    return sample.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")


def test_labels_are_bounded_and_documented(marketplace):
    """After traffic on a base model, an adapter and an unknown model, every exported series
    is a documented metric and carries only bounded label values: catalog ids or `unknown`,
    never the unknown id itself, and no key id (per-key labels are off by default)."""
    key = marketplace.create_key(name="metrics-labels", credit_usd=1)["key"]
    assert marketplace.chat(key, model="beta-chat", max_tokens=2).status_code == 200
    assert stream_chat(marketplace, key, model="alpha-chat:ahoy", max_tokens=2)[-1] == "[DONE]"
    assert marketplace.chat(key, model="no-such-model", max_tokens=1).status_code == 404
    sent = {"beta-chat", "alpha-chat:ahoy", "unknown"}

    def labelled_series() -> Series | None:
        series = scrape(marketplace)
        names = {base_name(name) for name, _ in series}
        models = {dict(labels).get("model") for name, labels in series if name == "ray_tokenmart_requests_total"}
        return series if names >= MOVED_BY_TRAFFIC and sent <= models else None

    series = marketplace.wait_until(labelled_series, REPORT_TIMEOUT_S, interval_s=0.5, what="the requests' series")
    documented = {spec.exported: spec for spec in SPECS.values()}
    for name, labels in series:
        spec = documented.get(base_name(name))
        assert spec is not None, f"{name} is not in deployments/metrics.py SPECS"
        values = dict(labels)
        # Beyond the tags Ray adds to every series, exactly the labels the spec documents.
        assert set(values) - RAY_TAGS - {"le"} == set(spec.labels), (name, values)
        assert values["model"] in CATALOG_MODELS | {"unknown"}, (name, values)
        # Per-key series are off by default: the label exists, empty, on every series that has it.
        assert values.get("key_id", "") == "", (name, values)
        assert values.get("stream", "true") in {"true", "false"}, (name, values)
        assert re.fullmatch(r"[1-5][0-9][0-9]", values.get("status", "200")), (name, values)
        assert re.fullmatch(r"[a-z_]*", values.get("code", "")), (name, values)
