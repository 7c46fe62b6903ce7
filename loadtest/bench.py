"""Side-by-side benchmark: tokenmart against plain Ray Serve LLM, the bare engine and LiteLLM.

One command starts every target on the same engine and machine, runs each scenario against
every target in the same run, interleaved (the target order rotates on each repeat), and
writes to --out:
  runs.csv     one row per (repeat, scenario, target): requests, statuses, RPS, latency and
               time-to-first-token percentiles, output tokens/s, timeouts
  report.md    the goals, each a ratio (or difference) per repeat, with median and range
  latency.png  p50 latency and time to first token per target; throughput.png: RPS and
               output tokens/s; sweep.png: p99 latency against RPS as concurrency grows

Targets:
  tokenmart  the marketplace ingress: key auth, rate limits, holds and billing on real Redis
  rayserve   plain Ray Serve LLM: its OpenAiIngress in front of the same engine deployment,
             in the same Ray cluster behind the same Serve proxy (route /plain)
  engine     the bare engine: `vllm serve` (backend vllm), or the fake engine in one uvicorn
             process (backend fake)
  litellm    the LiteLLM proxy, with a master key, in front of `engine`

Backends:
  fake  the fake engine (5 ms a token): isolates what each gateway adds
  vllm  SmolLM2-135M-Instruct on vLLM-CPU: end to end

    python loadtest/bench.py --backend fake --repeats 3 --out loadtest/results/bench-fake
    python loadtest/bench.py --backend vllm --repeats 2 --out loadtest/results/bench-vllm
    python loadtest/bench.py --report-only --out loadtest/results/bench-fake
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tokenmart.cluster import launcher
from tokenmart.cluster.launcher import free_port, wait_for
from tokenmart.deployments.catalog import load_catalog

console = Console()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "smollm2-135m-instruct"
TIGHT_MODEL = "tight-chat"  # fake backend only: one request per replica, one queued (503s)
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_REQUIREMENT = "litellm[proxy]==1.108.7"  # what resolves beside these registries
PROMPT = "Explain in a few sentences why the sky is blue."
REQUEST_TIMEOUT_S = 60.0
TARGETS = ("tokenmart", "rayserve", "engine", "litellm")


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
            *(Scenario(f"sweep_c{c}", c, 6, stream=False, max_tokens=8) for c in (2, 8, 32)),
            Scenario("refuse_429_c1", 1, 5, False, 8, ("tokenmart",), key="limited"),  # unloaded
            Scenario("refuse_429", 0, 5, False, 8, ("tokenmart",), key="limited", times_saturation=2),
            Scenario("refuse_503", 0, 5, False, 64, ("tokenmart",), model=TIGHT_MODEL, times_saturation=2),
        ]
    return [
        Scenario("latency_c1", 1, 15, stream=False, max_tokens=16),
        Scenario("ttft_c1", 1, 15, stream=True, max_tokens=8),
        Scenario("max_rps", 16, 15, stream=False, max_tokens=4),
        Scenario("stream_c16", 16, 20, stream=True, max_tokens=64),
    ]


# -- load ----------------------------------------------------------------------------------
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


# -- targets -------------------------------------------------------------------------------
def bench_catalog(backend: str, path: Path) -> None:
    """The benchmark catalog: the local SmolLM2 listing without adapters, on one fixed replica."""
    listing = next(
        item
        for item in yaml.safe_load((ROOT / "cluster/catalog/local.yaml").read_text())["listings"]
        if item["id"] == MODEL
    )
    listing.pop("lora", None)
    listing["engine"]["extra"]["gpu_memory_utilization"] = 0.1  # three engines share the RAM
    fixed = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16, "max_ongoing_requests": 64}
    listing["autoscaling"] = {**fixed, "max_queued_requests": 256}
    listings = [listing]
    if backend == "fake":
        tight = {**listing, "id": TIGHT_MODEL, "source": "fake/tight-chat"}
        tight["autoscaling"] = {**fixed, "target_ongoing_requests": 1, "max_ongoing_requests": 1}
        tight["autoscaling"]["max_queued_requests"] = 1
        listings.append(tight)
    path.write_text(yaml.safe_dump({"listings": listings}, sort_keys=False))


def wait_http(
    url: str, headers: dict[str, str] | None = None, timeout_s: float = 600, what: str = "", alive=lambda: None
) -> None:
    def ready() -> bool:
        alive()  # raises when a process it waits for has exited
        try:
            return httpx.get(url, headers=headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    with console.status(f"waiting for {what or url}"):
        wait_for(ready, timeout_s, what or url, interval_s=1)


def ensure_litellm() -> Path:
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        with console.status(f"installing the LiteLLM proxy into {LITELLM_VENV.name} ({LITELLM_REQUIREMENT})"):
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
            pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", LITELLM_REQUIREMENT]
            subprocess.run(pip, check=True)
    return binary


class Stack:
    """Starts the four targets and stops them again (an ExitStack of processes and clusters)."""

    def __init__(self, backend: str, workdir: Path, stack: ExitStack) -> None:
        self.backend, self.workdir, self.stack = backend, workdir, stack
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.processes[name] = process

        def stop() -> None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()

        self.stack.callback(stop)
        return process

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {self.logs / (name + '.log')}")

    def start(self) -> tuple[dict[str, Target], str]:
        catalog_path = self.workdir / "catalog.yaml"
        bench_catalog(self.backend, catalog_path)
        catalog = load_catalog(catalog_path)
        listing = catalog.get(MODEL)
        targets: dict[str, Target] = {}

        # The bare engine first: it is what LiteLLM fronts.
        engine_port = free_port()
        if self.backend == "vllm":
            launcher.ensure_models(catalog)
            engine = listing.engine
            # `vllm serve`'s server module: the `vllm` command itself asks for the `vllm`
            # distribution's version, and the CPU build is installed as `vllm-cpu`.
            argv = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", listing.resolved_source(None),
                "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(engine_port),
                "--dtype", engine.dtype, "--max-model-len", str(listing.context_length),
                "--max-num-seqs", str(engine.max_num_seqs or 16), "--enforce-eager",
                "--gpu-memory-utilization", str(engine.extra["gpu_memory_utilization"]),
            ]  # fmt: skip
        else:
            argv = [sys.executable, str(HERE / "fake_openai_server.py"), "--model", MODEL, "--port", str(engine_port)]
        self._spawn("engine", argv)
        targets["engine"] = Target("engine", f"http://127.0.0.1:{engine_port}/v1", "none")

        # tokenmart and plain Ray Serve LLM: one Ray cluster, one Serve proxy, two apps.
        state_dir = self.workdir / "state"
        port = free_port()
        plain = {
            "name": "plain",
            "route_prefix": "/plain",
            "import_path": "tokenmart.doubles.baseline:build_plain_app",
        }
        unlimited = {"rpm": 10_000_000, "tpm": 10_000_000_000, "max_concurrency": 100_000}
        overrides = {"ingress": {"min_replicas": 1, "max_replicas": 1}}
        self.stack.callback(launcher.down, state_dir)
        state, key = launcher.up(
            state_dir,
            catalog_path=catalog_path,
            port=port,
            engine=self.backend,
            demo_credit_usd=1_000_000,
            default_limits=unlimited,
            app_overrides=overrides,
            extra_applications=[plain],
        )
        targets["tokenmart"] = Target("tokenmart", f"{state.api_base}/v1", key)
        limited = launcher.create_key(
            state.api_base, state.admin_token, {"name": "bench-limited", "credit_usd": 1000, "rpm": 1}
        )
        targets["tokenmart"].keys["limited"] = limited["key"]
        targets["rayserve"] = Target("rayserve", f"{state.api_base}/plain/v1", "none")
        wait_http(f"{state.api_base}/plain/v1/models", what="plain Ray Serve LLM", alive=self.check_alive)
        wait_http(f"http://127.0.0.1:{engine_port}/v1/models", what="the bare engine", alive=self.check_alive)

        litellm_port = free_port()
        master_key = "sk-bench-litellm-master"
        config = {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": targets["engine"].base_url,
                        "api_key": "none",
                    },
                }
            ],
            "general_settings": {"master_key": master_key},
            "litellm_settings": {"drop_params": True, "telemetry": False},
        }
        (self.workdir / "litellm.yaml").write_text(yaml.safe_dump(config))
        argv = [str(ensure_litellm()), "--config", str(self.workdir / "litellm.yaml"), "--port", str(litellm_port)]
        self._spawn("litellm", argv, env={"LITELLM_LOG": "ERROR"})
        auth = {"authorization": f"Bearer {master_key}"}
        wait_http(
            f"http://127.0.0.1:{litellm_port}/v1/models", headers=auth, what="the LiteLLM proxy", alive=self.check_alive
        )
        targets["litellm"] = Target("litellm", f"http://127.0.0.1:{litellm_port}/v1", master_key)
        return targets, state.redis_url


# -- goals and report ----------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    measure: str
    scenario: str
    column: str
    target: str
    baseline: str | None  # None: tokenmart alone
    kind: str  # "ratio", "difference" (ms) or "value" (ms)
    limit: float
    at_most: bool  # the goal is value <= limit (else value >= limit)

    @property
    def text(self) -> str:
        unit = "" if self.kind == "ratio" else " ms"
        return f"{'≤' if self.at_most else '≥'} {self.limit:g}{unit}"

    @property
    def comparison(self) -> str:
        if self.baseline is None:
            return f"{self.target} alone"
        return f"{self.target} {'÷' if self.kind == 'ratio' else 'minus'} {self.baseline}"

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


GOALS = [
    Goal("p50 latency", "latency_c1", "p50_ms", "tokenmart", "rayserve", "ratio", 1.05, at_most=True),
    Goal("max RPS", "max_rps", "rps", "tokenmart", "rayserve", "ratio", 0.95, at_most=False),
    Goal("output tokens/s, 16 streams", "stream_c16", "output_tok_s", "tokenmart", "engine", "ratio", 0.90, False),
    Goal("TTFT p50, concurrency 1", "ttft_c1", "ttft_p50_ms", "tokenmart", "engine", "difference", 10, True),
    Goal("429 p99 at 2x saturation", "refuse_429", "refused_p99_ms", "tokenmart", None, "value", 10, True),
    Goal("503 p99 at 2x saturation", "refuse_503", "refused_p99_ms", "tokenmart", None, "value", 10, True),
]
# Side comparisons shown beside the goals.
EXTRA = [
    ("p50 latency", "latency_c1", "p50_ms", "tokenmart", "engine", "ratio"),
    ("p50 latency", "latency_c1", "p50_ms", "rayserve", "engine", "ratio"),
    ("p50 latency", "latency_c1", "p50_ms", "litellm", "engine", "ratio"),
    ("TTFT p50, concurrency 1", "ttft_c1", "ttft_p50_ms", "tokenmart", "rayserve", "difference"),
    ("TTFT p50, concurrency 1", "ttft_c1", "ttft_p50_ms", "rayserve", "engine", "difference"),
    ("max RPS", "max_rps", "rps", "tokenmart", "litellm", "ratio"),
    ("max RPS", "max_rps", "rps", "rayserve", "engine", "ratio"),
    ("output tokens/s, 16 streams", "stream_c16", "output_tok_s", "tokenmart", "rayserve", "ratio"),
    ("output tokens/s, 16 streams", "stream_c16", "output_tok_s", "rayserve", "engine", "ratio"),
    ("output tokens/s, 16 streams", "stream_c16", "output_tok_s", "litellm", "engine", "ratio"),
]


def load_rows(out: Path) -> list[dict]:
    with (out / "runs.csv").open() as f:
        return list(csv.DictReader(f))


def value_of(rows: list[dict], repeat: str, scenario: str, target: str, column: str) -> float | None:
    for row in rows:
        if (row["repeat"], row["scenario"], row["target"]) == (repeat, scenario, target) and row[column] not in (
            "",
            "None",
        ):
            return float(row[column])
    return None


def per_repeat(rows, scenario, column, target, baseline, kind) -> list[float]:
    values = []
    for repeat in sorted({row["repeat"] for row in rows}):
        mine = value_of(rows, repeat, scenario, target, column)
        if mine is None:
            continue
        if baseline is None:
            values.append(mine)
            continue
        theirs = value_of(rows, repeat, scenario, baseline, column)
        if theirs:
            values.append(mine / theirs if kind == "ratio" else mine - theirs)
    return values


def rps_at_p99(rows: list[dict], repeat: str, target: str, budget_ms: float) -> float | None:
    """The highest RPS of the sweep (linearly interpolated) whose p99 stays within the budget."""
    points = sorted(
        (float(row["rps"]), float(row["p99_ms"]))
        for row in rows
        if row["repeat"] == repeat and row["target"] == target and row["scenario"].startswith("sweep_")
        and row["p99_ms"] not in ("", "None")
    )  # fmt: skip
    best = None
    for (rps_a, p99_a), (rps_b, p99_b) in zip([(0.0, 0.0), *points], points, strict=False):
        if p99_b <= budget_ms:
            best = rps_b
        elif p99_a <= budget_ms < p99_b:
            best = rps_a + (rps_b - rps_a) * (budget_ms - p99_a) / (p99_b - p99_a)
            break
    return best


def litellm_goal(rows: list[dict]) -> list[float]:
    """RPS at the same p99, tokenmart ÷ LiteLLM. The p99 budget is LiteLLM's at its highest RPS."""
    values = []
    for repeat in sorted({row["repeat"] for row in rows}):
        sweep = [
            r for r in rows if r["repeat"] == repeat and r["target"] == "litellm" and r["scenario"].startswith("sweep_")
        ]
        if not sweep:
            continue
        peak = max(sweep, key=lambda r: float(r["rps"]))
        budget = float(peak["p99_ms"])
        mine = rps_at_p99(rows, repeat, "tokenmart", budget)
        if mine is not None:
            values.append(mine / float(peak["rps"]))
    return values


def spread(values: list[float], unit: str = "") -> tuple[str, str]:
    """(median, "min to max (n)") of per-repeat values."""
    if not values:
        return "n/a", "n/a"
    digits = 3 if not unit else 1
    sign = "+" if unit == " ms Δ" else ""

    def fmt(v: float) -> str:
        return f"{v:{sign}.{digits}f}{unit}"

    return fmt(statistics.median(values)), f"{fmt(min(values))} to {fmt(max(values))} (n={len(values)})"


def write_report(out: Path, backend: str) -> str:
    rows = load_rows(out)
    lines = [
        f"# Benchmark: backend `{backend}`",
        "",
        f"Run {rows[0]['started'] if rows else '?'} on {os.cpu_count()} CPUs. Targets ran interleaved in the same",
        "run; each figure is the median over repeats, with the range. Ratios are per repeat.",
        "",
        "| measure | comparison | goal | median | range | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for goal in GOALS:
        values = per_repeat(rows, goal.scenario, goal.column, goal.target, goal.baseline, goal.kind)
        median, rng = spread(values, {"ratio": "", "difference": " ms Δ", "value": " ms"}[goal.kind])
        met = "n/a" if not values else ("yes" if goal.met(statistics.median(values)) else "**no**")
        lines.append(f"| {goal.measure} | {goal.comparison} | {goal.text} | {median} | {rng} | {met} |")
    values = litellm_goal(rows)
    median, rng = spread(values)
    met = "n/a" if not values else ("yes" if statistics.median(values) >= 1.5 else "**no**")
    lines.append(f"| RPS at the same p99 | tokenmart ÷ litellm | ≥ 1.5 | {median} | {rng} | {met} |")
    timeouts = sum(int(r["timeouts"]) for r in rows if r["scenario"].startswith("refuse_"))
    if any(r["scenario"].startswith("refuse_") for r in rows):
        lines.append(
            f"| timeouts at 2x saturation | tokenmart alone | 0 | {timeouts} | | "
            f"{'yes' if not timeouts else '**no**'} |"
        )
    refusals = [r for r in rows if r["scenario"].startswith("refuse_")]
    if refusals:
        lines += ["", "Refusals (tokenmart):", "", "| scenario | load | refused | p50 ms | p99 ms | timeouts |"]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for scenario in dict.fromkeys(r["scenario"] for r in refusals):
            mine = [r for r in refusals if r["scenario"] == scenario]
            offered = [float(r["offered_rps"]) for r in mine if r.get("offered_rps") not in (None, "", "None")]
            load = f"{mine[0]['concurrency']} client(s)"
            if offered:
                load = f"{statistics.median(offered):.0f} req/s offered"
            p50 = statistics.median(float(r["refused_p50_ms"]) for r in mine)
            p99 = statistics.median(float(r["refused_p99_ms"]) for r in mine)
            refused = sum(int(r["refused"]) for r in mine)
            timeouts = sum(int(r["timeouts"]) for r in mine)
            lines.append(f"| {scenario} | {load} | {refused} | {p50:.1f} | {p99:.1f} | {timeouts} |")
    lines += ["", "Side comparisons:", "", "| measure | comparison | median | range |", "| --- | --- | --- | --- |"]
    for measure, scenario, column, target, baseline, kind in EXTRA:
        values = per_repeat(rows, scenario, column, target, baseline, kind)
        if values:
            median, rng = spread(values, "" if kind == "ratio" else " ms Δ")
            sign = "÷" if kind == "ratio" else "minus"
            lines.append(f"| {measure} | {target} {sign} {baseline} | {median} | {rng} |")
    lines += ["", "Medians per scenario and target:", "",
              "| scenario | target | RPS | p50 ms | p99 ms | TTFT p50 ms | out tok/s | statuses |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        for target in TARGETS:
            mine = [r for r in rows if r["scenario"] == scenario and r["target"] == target]
            if not mine:
                continue

            def med(column: str, mine: list[dict] = mine) -> str:
                values = [float(r[column]) for r in mine if r[column] not in ("", "None")]
                return f"{statistics.median(values):.1f}" if values else ""

            statuses = Counter()
            for r in mine:
                for part in r["statuses"].split():
                    code, count = part.split(":")
                    statuses[code] += int(count)
            status_text = " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
            lines.append(
                f"| {scenario} | {target} | {med('rps')} | {med('p50_ms')} | {med('p99_ms')} | "
                f"{med('ttft_p50_ms')} | {med('output_tok_s')} | {status_text} |"
            )
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    plot(out, rows)
    return report


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def medians(scenario: str, column: str) -> tuple[list[str], list[float], list[float], list[float]]:
        names, mids, lows, highs = [], [], [], []
        for target in TARGETS:
            values = [float(r[column]) for r in rows if r["scenario"] == scenario and r["target"] == target
                      and r[column] not in ("", "None")]  # fmt: skip
            if values:
                mid = statistics.median(values)
                names.append(target), mids.append(mid), lows.append(mid - min(values)), highs.append(max(values) - mid)
        return names, mids, lows, highs

    def bars(axis, scenario: str, column: str, title: str) -> None:
        names, mids, lows, highs = medians(scenario, column)
        axis.bar(names, mids, yerr=[lows, highs], capsize=4, color=["C0", "C1", "C2", "C3"][: len(names)])
        axis.set_title(title)

    for filename, panels in (
        ("latency.png", [("latency_c1", "p50_ms", "p50 latency (ms), concurrency 1"),
                         ("ttft_c1", "ttft_p50_ms", "TTFT p50 (ms), concurrency 1")]),
        ("throughput.png", [("max_rps", "rps", "max RPS"),
                            ("stream_c16", "output_tok_s", "output tokens/s, 16 streams")]),
    ):  # fmt: skip
        figure, axes = plt.subplots(1, len(panels), figsize=(11, 4))
        for axis, (scenario, column, title) in zip(axes, panels, strict=True):
            bars(axis, scenario, column, title)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=110)
        plt.close(figure)

    sweep = [r for r in rows if r["scenario"].startswith("sweep_")]
    if sweep:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for target in TARGETS:
            points = sorted(
                (int(r["scenario"].removeprefix("sweep_c")), float(r["rps"]), float(r["p99_ms"]))
                for r in sweep if r["target"] == target and r["p99_ms"] not in ("", "None")
            )  # fmt: skip
            by_c: dict[int, list[tuple[float, float]]] = {}
            for c, rps, p99 in points:
                by_c.setdefault(c, []).append((rps, p99))
            xs = [statistics.median(v[0] for v in by_c[c]) for c in sorted(by_c)]
            ys = [statistics.median(v[1] for v in by_c[c]) for c in sorted(by_c)]
            axis.plot(xs, ys, marker="o", label=target)
            for c, x, y in zip(sorted(by_c), xs, ys, strict=True):
                axis.annotate(f"c={c}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("requests/s")
        axis.set_ylabel("p99 latency (ms)")
        axis.set_title("p99 latency against throughput (concurrency sweep)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "sweep.png", dpi=110)
        plt.close(figure)


# -- main ----------------------------------------------------------------------------------
COLUMNS = [
    "started", "backend", "repeat", "scenario", "target", "concurrency", "seconds", "stream", "max_tokens",
    "requests", "ok", "statuses", "timeouts", "errors", "rps", "p50_ms", "p99_ms", "ttft_p50_ms",
    "ttft_p99_ms", "output_tok_s", "refused", "refused_p50_ms", "refused_p99_ms", "offered_rps", "evalsha_per_request",
]  # fmt: skip


def main(
    backend: str = typer.Option("fake", help="fake (gateway overhead) or vllm (SmolLM2 on vLLM-CPU, end to end)"),
    repeats: int = typer.Option(3, min=1, help="How many times each scenario runs against each target."),
    out: Path = typer.Option(
        None, help="Where the CSV, plots and report go (default loadtest/results/bench-<backend>)."
    ),
    only: str = typer.Option("", help="Comma-separated scenario names to run (default: all of the backend's)."),
    report_only: bool = typer.Option(False, help="Redo report.md and the plots from an earlier runs.csv."),
) -> None:
    out = out or HERE / "results" / f"bench-{backend}"
    out.mkdir(parents=True, exist_ok=True)
    if report_only:
        sys.stdout.write(write_report(out, backend))
        return
    if backend not in ("fake", "vllm"):
        raise typer.BadParameter("backend is fake or vllm")
    plan = [s for s in scenarios(backend) if not only or s.name in only.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"tokenmart-bench-{backend}-"))
    with ExitStack() as stack:
        targets, redis_url = Stack(backend, workdir, stack).start()
        store = redis.Redis.from_url(redis_url)
        for target in targets.values():  # warm-up: first requests pay for connections and caches
            asyncio.run(closed_loop(target, Scenario("warmup", 2, 3, stream=True, max_tokens=4)))
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
                        evalsha = _evalsha_calls(store)
                        if scenario.times_saturation:
                            rate = scenario.times_saturation * saturation.get(repeat, 50.0)
                            samples, elapsed = asyncio.run(open_loop(targets[name], scenario, rate))
                        else:
                            samples, elapsed = asyncio.run(closed_loop(targets[name], scenario))
                        row = {
                            "started": started, "backend": backend, "repeat": repeat, "scenario": scenario.name,
                            "target": name, **{k: v for k, v in asdict(scenario).items() if k in COLUMNS},
                            **summarize(samples, elapsed),
                        }  # fmt: skip
                        if name == "tokenmart" and samples:
                            row["evalsha_per_request"] = round((_evalsha_calls(store) - evalsha) / len(samples), 3)
                        if scenario.times_saturation:
                            row["offered_rps"] = round(rate, 1)
                        if scenario.name == "max_rps" and name == "tokenmart":
                            saturation[repeat] = row["rps"]
                        rows.append(row)
                        progress.advance(task)
                        time.sleep(1)  # let the last requests' settlements finish before the next target
        with (out / "runs.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    report = write_report(out, backend)
    sys.stdout.write(report)
    plots = "latency.png, throughput.png" + (", sweep.png" if backend == "fake" else "")
    console.print(f"[green]wrote[/] {out}: runs.csv, report.md, {plots}; the targets' logs were in {workdir}/logs")


def _evalsha_calls(store: redis.Redis) -> int:
    stats = store.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"))


if __name__ == "__main__":
    typer.run(main)
