"""The marketplace's Prometheus metrics, exported through Ray's metrics agent.

Every Ray node runs a metrics agent that exports the metrics of all processes on the node on
its metrics export port (8080 on KubeRay pods). Each ingress replica records its own series,
and Ray tags them with the application, deployment and replica. Prometheus scrapes every Ray
pod (the chart's PodMonitor), and `sum by (model)` adds the replicas up. A `/metrics` route
on the ingress would instead show only the replica that happened to answer the scrape.

Label values are bounded: `model` is a catalog id (or `unknown`), `status` an HTTP status and
`code` one of the error codes of the API. Per-key series (`key_id`) are added only when the
operator turns them on (`AppArgs.metrics.per_key_labels`), since their number grows with
the number of keys. Ray prefixes every name with `ray_` and adds `_total` to counters.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

from ray.serve import metrics

UNKNOWN_MODEL = "unknown"
# HTTP status recorded for a stream whose client went away before it ended (nginx's convention).
CLIENT_CLOSED = 499

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TTFT_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as recorded; Prometheus sees ray_<name>, and ray_<name>_total for counters
    kind: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...]
    description: str

    @property
    def exported(self) -> str:
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


SPECS = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "tokenmart_requests",
            "counter",
            ("model", "status", "code", "stream", "key_id"),
            "Inference requests by listing, final HTTP status and error code. A stream's status is "
            "how it ended: 200, 499 (the client went away) or 500 (the engine failed mid-stream). "
            "status=429 are rate-limited requests and status=402 requests refused for credit.",
        ),
        MetricSpec("tokenmart_prompt_tokens", "counter", ("model", "key_id"), "Prompt tokens billed, by listing."),
        MetricSpec(
            "tokenmart_cached_prompt_tokens",
            "counter",
            ("model", "key_id"),
            "Of the prompt tokens billed, those the engine read from its prefix cache (cached prompt price).",
        ),
        MetricSpec(
            "tokenmart_completion_tokens", "counter", ("model", "key_id"), "Completion tokens billed, by listing."
        ),
        MetricSpec("tokenmart_spend_usd", "counter", ("model", "key_id"), "USD charged to keys, by listing."),
        MetricSpec(
            "tokenmart_hold_exceeded",
            "counter",
            ("model",),
            "Requests that cost more than admission held for them (the charge was capped at the hold "
            "and a hold_exceeded ledger event written; reconcile reports each). Should stay 0.",
        ),
        MetricSpec(
            "tokenmart_in_flight_requests",
            "gauge",
            ("model",),
            "Admitted requests not yet settled, per ingress replica (sum over replicas).",
        ),
        MetricSpec(
            "tokenmart_request_latency_seconds",
            "histogram",
            ("model", "stream"),
            "Seconds from the request reaching the ingress to its last byte (streams: the end of the stream).",
        ),
        MetricSpec(
            "tokenmart_time_to_first_token_seconds",
            "histogram",
            ("model",),
            "Seconds from the request reaching the ingress to the engine's first streamed token.",
        ),
    )
}


class MarketplaceMetrics:
    """What one ingress replica records.

    Counters and the in-flight gauge are summed locally and handed to Ray once a second
    (`FLUSH_INTERVAL_S`, below Ray's own export interval), because each Ray metric call
    validates and merges its tags: per request that was a few percent of the ingress's CPU
    at its highest request rate (py-spy, loadtest/README.md). Histograms are observed as
    they happen. Outside an event loop (unit tests, scripts) every call goes to Ray at once.
    """

    FLUSH_INTERVAL_S = 1.0

    def __init__(self, *, per_key_labels: bool = False) -> None:
        self.per_key_labels = per_key_labels

        def make(name: str, **options):
            spec = SPECS[name]
            kind = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}[spec.kind]
            return kind(name, description=spec.description, tag_keys=spec.labels, **options)

        self._requests = make("tokenmart_requests")
        self._prompt_tokens = make("tokenmart_prompt_tokens")
        self._cached_prompt_tokens = make("tokenmart_cached_prompt_tokens")
        self._completion_tokens = make("tokenmart_completion_tokens")
        self._spend = make("tokenmart_spend_usd")
        self._hold_exceeded = make("tokenmart_hold_exceeded")
        self._in_flight = make("tokenmart_in_flight_requests")
        self._latency = make("tokenmart_request_latency_seconds", boundaries=LATENCY_BOUNDARIES_S)
        self._ttft = make("tokenmart_time_to_first_token_seconds", boundaries=TTFT_BOUNDARIES_S)
        self._in_flight_counts: dict[str, int] = {}
        self._pending: dict[tuple[Any, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._dirty_models: set[str] = set()
        self._flusher: asyncio.Task | None = None

    def _key(self, key_id: str | None) -> str:
        return (key_id or "") if self.per_key_labels else ""

    def _inc(self, counter: Any, value: float, tags: dict[str, str]) -> None:
        self._pending[(counter, tuple(tags.items()))] += value
        self._schedule()

    def _schedule(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no event loop: nothing would flush later
            return
        self._flusher = loop.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.FLUSH_INTERVAL_S)
        self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, defaultdict(float)
        for (counter, tags), value in pending.items():
            counter.inc(value, tags=dict(tags))
        dirty, self._dirty_models = self._dirty_models, set()
        for model in dirty:
            self._in_flight.set(self._in_flight_counts[model], tags={"model": model})

    def request_done(
        self, model: str, status: int, code: str | None, *, stream: bool, key_id: str | None, seconds: float
    ) -> None:
        tags = {"model": model, "stream": "true" if stream else "false"}
        self._inc(self._requests, 1, {**tags, "status": str(status), "code": code or "", "key_id": self._key(key_id)})
        self._latency.observe(seconds, tags=tags)

    def first_token(self, model: str, seconds: float) -> None:
        self._ttft.observe(seconds, tags={"model": model})

    def billed(
        self,
        model: str,
        key_id: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
        cached_tokens: int = 0,
    ) -> None:
        tags = {"model": model, "key_id": self._key(key_id)}
        if prompt_tokens:
            self._inc(self._prompt_tokens, prompt_tokens, tags)
        if cached_tokens:
            self._inc(self._cached_prompt_tokens, cached_tokens, tags)
        if completion_tokens:
            self._inc(self._completion_tokens, completion_tokens, tags)
        if cost_usd:
            self._inc(self._spend, cost_usd, tags)

    def hold_exceeded(self, model: str) -> None:
        self._inc(self._hold_exceeded, 1, {"model": model})

    def in_flight(self, model: str, delta: int) -> None:
        self._in_flight_counts[model] = self._in_flight_counts.get(model, 0) + delta
        self._dirty_models.add(model)
        self._schedule()
