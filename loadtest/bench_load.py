"""The load side of `bench.py`: scenarios, the requests they send, and what a run measured.

Owns what every target is asked (the scenarios, one request body each, closed or open loop
on its own httpx client), what one request yields (`Sample`), the per-run summary that
becomes a row of runs.csv, and the repeat loop that rotates the targets. It starts nothing:
the targets it loads come from `bench_stack.Stack`.
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

MODEL = "smollm2-135m-instruct"
TIGHT_MODEL = "tight-chat"  # fake backend only: one request per replica, one queued (503s)
PROMPT = "Explain in a few sentences why the sky is blue."
REQUEST_TIMEOUT_S = 60.0
TARGETS = ("tokenmart", "rayserve", "engine", "litellm")
# The columns of runs.csv, which the report reads back.
COLUMNS = [
    "started", "backend", "repeat", "scenario", "target", "concurrency", "seconds", "stream", "max_tokens",
    "requests", "ok", "statuses", "timeouts", "errors", "rps", "p50_ms", "p99_ms", "ttft_p50_ms",
    "ttft_p99_ms", "output_tok_s", "refused", "refused_p50_ms", "refused_p99_ms", "offered_rps", "evalsha_per_request",
    "setup",
]  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    seconds: float
    stream: bool
    max_tokens: int
    targets: tuple[str, ...] = TARGETS
    key: str = "default"  # "limited": a key allowed 1 request a minute (429s)
    model: str = MODEL
    # Open loop instead of closed: requests start at a fixed rate, this many times the RPS
    # that tokenmart's `max_rps` run reached in the same repeat (its saturating load).
    times_saturation: float | None = None


def scenarios(backend: str) -> list[Scenario]:
    if backend == "fake":
        return [
            Scenario("latency_c1", 1, 5, stream=False, max_tokens=8),
            Scenario("ttft_c1", 1, 5, stream=True, max_tokens=8),
            Scenario("max_rps", 32, 6, stream=False, max_tokens=1),
            Scenario("stream_c16", 16, 6, stream=True, max_tokens=64),
            # 20 s a point: LiteLLM at 2 clients answers about 13 a second, and the sweep's
            # p99 (its budget) wants at least 200 samples.
            *(Scenario(f"sweep_c{c}", c, 20, stream=False, max_tokens=8) for c in (2, 8, 32)),
            Scenario("refuse_429_c1", 1, 5, False, 8, ("tokenmart",), key="limited"),  # unloaded
            Scenario("refuse_429", 0, 5, False, 8, ("tokenmart",), key="limited", times_saturation=2),
            Scenario("refuse_503", 0, 5, False, 64, ("tokenmart",), model=TIGHT_MODEL, times_saturation=2),
        ]
    # vLLM: long enough for 200 samples a run at 2 clients (p99 of the sweep), 4 tokens each.
    # No 503 scenario: a listing that takes one request would need a second vLLM engine.
    return [
        Scenario("latency_c1", 1, 15, stream=False, max_tokens=16),
        Scenario("ttft_c1", 1, 15, stream=True, max_tokens=8),
        Scenario("max_rps", 16, 15, stream=False, max_tokens=4),
        Scenario("stream_c16", 16, 20, stream=True, max_tokens=64),
        *(Scenario(f"sweep_c{c}", c, 20, stream=False, max_tokens=4) for c in (2, 8, 16)),
        Scenario("refuse_429_c1", 1, 5, False, 4, ("tokenmart",), key="limited"),
        Scenario("refuse_429", 0, 10, False, 4, ("tokenmart",), key="limited", times_saturation=2),
    ]


@dataclass
class Sample:
    start: float
    latency_s: float
    status: int  # HTTP status; 0 for a timeout, -1 for a connection error
    ttft_s: float | None = None
    tokens: int = 0


@dataclass
class Target:
    name: str
    base_url: str  # ends in /v1
    api_key: str
    keys: dict[str, str] = field(default_factory=dict)  # scenario key kind -> API key
    setup: str = ""  # how a peer was set up, recorded in runs.csv (e.g. LiteLLM's virtual key store)


async def one_request(client: httpx.AsyncClient, body: dict) -> Sample:
    start = time.perf_counter()
    try:
        if not body.get("stream"):
            response = await client.post("/chat/completions", json=body)
            tokens = 0
            if response.status_code == 200:
                tokens = (response.json().get("usage") or {}).get("completion_tokens", 0)
            return Sample(start, time.perf_counter() - start, response.status_code, tokens=tokens)
        ttft, tokens, chunks = None, 0, 0
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return Sample(start, time.perf_counter() - start, response.status_code)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens") or tokens
        return Sample(start, time.perf_counter() - start, 200, ttft_s=ttft, tokens=tokens or chunks)
    except httpx.TimeoutException:
        return Sample(start, time.perf_counter() - start, 0)
    except httpx.HTTPError:
        return Sample(start, time.perf_counter() - start, -1)


def request_body(scenario: Scenario) -> dict:
    body: dict = {
        "model": scenario.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": scenario.max_tokens,
        "temperature": 0,
    }
    if scenario.stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def client_for(target: Target, scenario: Scenario, connections: int) -> httpx.AsyncClient:
    key = target.keys.get(scenario.key, target.api_key)
    return httpx.AsyncClient(
        base_url=target.base_url,
        headers={"authorization": f"Bearer {key}"},
        timeout=REQUEST_TIMEOUT_S,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def closed_loop(target: Target, scenario: Scenario) -> tuple[list[Sample], float]:
    """`concurrency` clients, each sending its next request when the last one ends."""
    body = request_body(scenario)
    samples: list[Sample] = []
    async with client_for(target, scenario, scenario.concurrency) as client:
        began = time.perf_counter()
        deadline = began + scenario.seconds

        async def client_loop() -> None:
            while time.perf_counter() < deadline:
                samples.append(await one_request(client, body))

        await asyncio.gather(*(client_loop() for _ in range(scenario.concurrency)))
        elapsed = time.perf_counter() - began
    return samples, elapsed


async def open_loop(target: Target, scenario: Scenario, rate: float) -> tuple[list[Sample], float]:
    """Requests start every 1/rate seconds whether or not earlier ones have ended."""
    body = request_body(scenario)
    async with client_for(target, scenario, 512) as client:
        began = time.perf_counter()
        tasks = []
        for i in range(int(rate * scenario.seconds)):
            await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one_request(client, body)))
        samples = list(await asyncio.gather(*tasks))
        elapsed = time.perf_counter() - began
    return samples, elapsed


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(samples: list[Sample], elapsed: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    refused = [s for s in samples if s.status in (429, 503)]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    statuses = Counter(str(s.status) for s in samples)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "statuses": " ".join(f"{k}:{v}" for k, v in sorted(statuses.items())),
        "timeouts": statuses.get("0", 0),
        "errors": len(samples) - len(ok) - len(refused),
        "rps": round(len(ok) / elapsed, 2),
        "p50_ms": ms(percentile([s.latency_s for s in ok], 50)),
        "p99_ms": ms(percentile([s.latency_s for s in ok], 99)),
        "ttft_p50_ms": ms(percentile([s.ttft_s for s in ok if s.ttft_s is not None], 50)),
        "ttft_p99_ms": ms(percentile([s.ttft_s for s in ok if s.ttft_s is not None], 99)),
        "output_tok_s": round(sum(s.tokens for s in ok) / elapsed, 1),
        "refused_p50_ms": ms(percentile([s.latency_s for s in refused], 50)),
        "refused_p99_ms": ms(percentile([s.latency_s for s in refused], 99)),
        "refused": len(refused),
    }


def warm_up(targets: dict[str, Target]) -> None:
    """First requests pay for connections and caches; none of them is measured."""
    for target in targets.values():
        asyncio.run(closed_loop(target, Scenario("warmup", 2, 3, stream=True, max_tokens=4)))


def run_plan(
    plan: list[Scenario],
    targets: dict[str, Target],
    repeats: int,
    store: redis.Redis,
    console: Console,
    started: str,
    backend: str,
) -> list[dict]:
    """Every scenario against each of its targets, `repeats` times, the target order rotated
    on each repeat (so no target always runs first): one row of runs.csv per run."""
    rows: list[dict] = []
    saturation: dict[int, float] = {}  # repeat -> tokenmart's max RPS
    total = sum(len(s.targets) for s in plan) * repeats
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console) as progress:  # fmt: skip
        task = progress.add_task("benchmark", total=total)
        for repeat in range(repeats):
            for scenario in plan:
                order = list(scenario.targets)
                order = order[repeat % len(order) :] + order[: repeat % len(order)]  # rotate each repeat
                for name in order:
                    progress.update(task, description=f"repeat {repeat + 1}/{repeats} {scenario.name} → {name}")
                    evalsha = evalsha_calls(store)
                    if scenario.times_saturation:
                        rate = scenario.times_saturation * saturation.get(repeat, 50.0)
                        samples, elapsed = asyncio.run(open_loop(targets[name], scenario, rate))
                    else:
                        samples, elapsed = asyncio.run(closed_loop(targets[name], scenario))
                    row = {
                        "started": started, "backend": backend, "repeat": repeat, "scenario": scenario.name,
                        "target": name, "setup": targets[name].setup,
                        **{k: v for k, v in asdict(scenario).items() if k in COLUMNS},
                        **summarize(samples, elapsed),
                    }  # fmt: skip
                    if name == "tokenmart" and samples:
                        row["evalsha_per_request"] = round((evalsha_calls(store) - evalsha) / len(samples), 3)
                    if scenario.times_saturation:
                        row["offered_rps"] = round(rate, 1)
                    if scenario.name == "max_rps" and name == "tokenmart":
                        saturation[repeat] = row["rps"]
                    rows.append(row)
                    progress.advance(task)
                    time.sleep(1)  # let the last requests' settlements finish before the next target
    return rows


def evalsha_calls(store: redis.Redis) -> int:
    """Script calls Redis has served so far (tokenmart's round trips: EVALSHA, EVAL, FCALL)."""
    stats = store.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"))


def write_runs(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
