"""vLLM's own serving benchmark against tokenmart and the bare engine, side by side.

`bench.py` measures with its own client; this script asks vLLM's benchmark client
(`vllm bench serve`, run as a library: the CPU build has no `vllm` command) the same
question, so the numbers can be set beside the ones vLLM users already know. It starts
  engine     `vllm.entrypoints.openai.api_server` with exactly the engine arguments tokenmart
             gives the local SmolLM2 listing (from `llm_config_for`, LoRA on when the listing
             sells adapters, since LoRA alone costs ~27% of output tokens/s on vLLM-CPU)
  tokenmart  `launcher.up` with the same listing on one fixed replica, a key with unlimited
             limits, and optional `--env KEY=VALUE` levers in its Ray processes' environment
and runs, per repeat, each scenario against both targets, alternating which goes first:
  stream16   16 concurrent streams, 128 prompt tokens, 64 output tokens (throughput, ITL, p99 TTFT)
  single     1 stream, 128 prompt tokens, 16 output tokens (TTFT, TPOT)
Every run gets a new `--seed`, so vLLM's prefix cache never answers from an earlier run;
each target is warmed first by a run that is not recorded. Each benchmark runs in its own
process of this Python, so vLLM's module state never leaks from one run into the next.

Writes to --out: raw/<run>.json (vLLM's result per run), runs.csv (one row per run, with the
machine's load average before and after), report.md and ratios.png; `--report-only` redoes
the last two from runs.csv.

    python loadtest/vllm_bench.py --repeats 3
    python loadtest/vllm_bench.py --stream-batching-ms 50 --out /tmp/batch50
    python loadtest/vllm_bench.py --report-only --out loadtest/results/vllm-bench
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
import yaml
from bench_load import MODEL
from bench_stack import ROOT, Stack, bench_catalog, wait_http
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenmart.cluster import launcher
from tokenmart.cluster.launcher import free_port
from tokenmart.cluster.serve_mode import DEFAULT_SERVE_MODE, SERVE_MODES, ServeMode
from tokenmart.deployments.catalog import Listing, load_catalog
from tokenmart.deployments.schemas import MAX_CONCURRENCY, MAX_RPM, MAX_TPM

console = Console()
HERE = Path(__file__).resolve().parent
TARGETS = ("engine", "tokenmart")
LABELS = {"engine": "bare engine", "tokenmart": "tokenmart"}
RUN_TIMEOUT_S = 1800.0

# One benchmark, in a fresh interpreter: argv is `vllm bench serve`'s own.
CHILD = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""

COLUMNS = [
    "repeat", "position", "scenario", "target", "seed", "max_concurrency", "num_prompts", "input_len",
    "output_len", "completed", "failed", "duration_s", "output_tok_s", "request_rps", "median_ttft_ms",
    "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "load1_before",
    "load1_after", "load5_before", "load5_after", "started", "tokenmart_env", "result_file",
]  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    name: str
    streams: int
    input_len: int
    output_len: int
    num_prompts: int


@dataclass(frozen=True)
class Row:
    """One line of the report: a vLLM metric of one scenario, compared as a ratio or in ms."""

    measure: str
    scenario: str
    column: str
    kind: str  # "ratio": tokenmart ÷ engine; "difference": tokenmart minus engine, in ms


ROWS = [
    Row("output tokens/s, 16 streams", "stream16", "output_tok_s", "ratio"),
    Row("TTFT median (ms), 1 stream", "single", "median_ttft_ms", "difference"),
    Row("TPOT median (ms), 1 stream", "single", "median_tpot_ms", "ratio"),
    Row("ITL median (ms), 16 streams", "stream16", "median_itl_ms", "ratio"),
    Row("TTFT p99 (ms), 16 streams", "stream16", "p99_ttft_ms", "difference"),
]


# -- the two targets -------------------------------------------------------------------------
def bench_listing(catalog_path: Path, lora: bool | None, stream_batching_ms: float | None = None) -> Listing:
    """The benchmark catalog of `bench.py` (one fixed replica), with the listing's LoRA block kept.

    tokenmart serves the local listing with LoRA on when it sells adapters; `lora` None keeps
    that, False drops it on both sides.
    """
    bench_catalog("vllm", catalog_path)
    local = next(
        item
        for item in yaml.safe_load((ROOT / "cluster/catalog/local.yaml").read_text())["listings"]
        if item["id"] == MODEL
    )
    if lora is not False and "lora" in local:
        document = yaml.safe_load(catalog_path.read_text())
        document["listings"][0]["lora"] = local["lora"]
        catalog_path.write_text(yaml.safe_dump(document, sort_keys=False))
    elif lora:
        raise typer.BadParameter(f"the local listing {MODEL!r} has no LoRA adapters")
    if stream_batching_ms is not None:
        # The catalog's own lever (engine.stream_batching_interval_ms); None keeps its default.
        document = yaml.safe_load(catalog_path.read_text())
        document["listings"][0].setdefault("engine", {})["stream_batching_interval_ms"] = stream_batching_ms
        catalog_path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_catalog(catalog_path).get(MODEL)


def engine_argv(listing: Listing, port: int) -> list[str]:
    """The bare engine's command: the engine kwargs tokenmart's LLMConfig carries, as CLI flags."""
    from tokenmart.deployments.app import llm_config_for

    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", listing.resolved_source(None),
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
        # Ray Serve LLM sets the multiprocessing executor for CPU replicas (VLLMEngineConfig);
        # the CLI would pick the in-process one at one worker, a different engine loop.
        "--distributed-executor-backend", "mp",
    ]  # fmt: skip
    for name, value in llm_config_for(listing).engine_kwargs.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return argv


@contextmanager
def environment(extra: dict[str, str]) -> Iterator[None]:
    """`extra` in os.environ while the block runs (the Ray head inherits it), then as it was."""
    saved = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    key: str


def start(
    workdir: Path,
    stack: ExitStack,
    lora: bool | None,
    levers: dict[str, str],
    stream_batching_ms: float | None,
    serve_mode: ServeMode = DEFAULT_SERVE_MODE,
) -> tuple[dict, Listing]:
    """Start tokenmart and the bare engine on this machine; both stop when `stack` closes.

    tokenmart goes first: `engine_argv` imports Ray Serve LLM, and Ray fixes its auth mode on
    import, which must come after `launcher.up` has turned token auth on for this process.
    """
    catalog_path = workdir / "catalog.yaml"
    listing = bench_listing(catalog_path, lora, stream_batching_ms)
    state_dir = workdir / "state"
    stack.callback(launcher.down, state_dir)
    unlimited = {"rpm": MAX_RPM, "tpm": MAX_TPM, "max_concurrency": MAX_CONCURRENCY}  # the highest a key may have
    with environment(levers):
        state, key = launcher.up(
            state_dir,
            catalog_path=catalog_path,
            port=free_port(),
            engine="vllm",
            demo_credit_usd=1_000_000,
            default_limits=unlimited,
            app_overrides={"ingress": {"min_replicas": 1, "max_replicas": 1}},
            serve_mode=serve_mode,
        )

    processes = Stack("vllm", workdir, stack)  # its process handling only: logs, stop on exit
    engine_port = free_port()
    argv = engine_argv(listing, engine_port)
    (workdir / "engine-argv.txt").write_text(" ".join(argv) + "\n")
    processes._spawn("engine", argv)
    wait_http(f"http://127.0.0.1:{engine_port}/v1/models", what="the bare engine", alive=processes.check_alive)
    endpoints = {
        "engine": Endpoint(f"http://127.0.0.1:{engine_port}", "none"),
        "tokenmart": Endpoint(state.api_base, key),
    }
    return endpoints, listing


# -- the runs --------------------------------------------------------------------------------
def run_benchmark(
    endpoint: Endpoint,
    scenario: Scenario,
    seed: int,
    tokenizer: str,
    result: Path,
    log: Path,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `vllm bench serve` run in a child process; returns vLLM's result JSON. `extra_body`
    goes over the top level of every request's body (e.g. its `stream_options`)."""
    argv = [
        "--backend", "openai-chat", "--base-url", endpoint.base_url, "--endpoint", "/v1/chat/completions",
        "--model", MODEL, "--tokenizer", tokenizer, "--dataset-name", "random", "--ignore-eos",
        "--random-input-len", str(scenario.input_len), "--random-output-len", str(scenario.output_len),
        "--num-prompts", str(scenario.num_prompts), "--max-concurrency", str(scenario.streams),
        "--seed", str(seed), "--temperature", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        # No ready check: it sends the first prompt once before the timed run, which would
        # then find it in the prefix cache. Both targets answered /v1/models and a warm-up.
        "--ready-check-timeout-sec", "0", "--disable-tqdm",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    env = {**os.environ, "OPENAI_API_KEY": endpoint.key}
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-c", CHILD, *argv], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=RUN_TIMEOUT_S
        ).returncode
    if code != 0 or not result.exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"vLLM's benchmark exited with {code} (log {log}):\n{tail}")
    data = json.loads(result.read_text())
    if not data.get("completed"):
        raise RuntimeError(f"no request to {endpoint.base_url} completed; vLLM's benchmark printed the errors in {log}")
    return data


def row_for(
    data: dict[str, Any], scenario: Scenario, target: str, repeat: int, position: int, seed: int, load: tuple
) -> dict[str, Any]:
    before, after, started = load
    return {
        "repeat": repeat,
        "position": position,
        "scenario": scenario.name,
        "target": target,
        "seed": seed,
        "max_concurrency": scenario.streams,
        "num_prompts": scenario.num_prompts,
        "input_len": scenario.input_len,
        "output_len": scenario.output_len,
        "completed": data.get("completed"),
        "failed": data.get("failed"),
        "duration_s": round(data["duration"], 3),
        "output_tok_s": round(data["output_throughput"], 2),
        "request_rps": round(data["request_throughput"], 3),
        **{name: round(data.get(name) or 0.0, 2) for name in COLUMNS if name.endswith("_ms")},
        "load1_before": round(before[0], 2),
        "load1_after": round(after[0], 2),
        "load5_before": round(before[1], 2),
        "load5_after": round(after[1], 2),
        "started": started,
    }


def run_all(
    endpoints: dict[str, Endpoint],
    plan: list[Scenario],
    warm: Scenario,
    repeats: int,
    seed: int,
    tokenizer: str,
    out: Path,
    logs: Path,
    levers: str,
) -> list[dict[str, Any]]:
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    total = len(TARGETS) + repeats * len(plan) * len(TARGETS)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("warming up", total=total)
        for target in TARGETS:
            progress.update(task, description=f"warming up {target}")
            result = logs / f"warm-{target}.json"
            run_benchmark(endpoints[target], warm, seed, tokenizer, result, logs / f"warm-{target}.log")
            seed += 1
            progress.advance(task)
        for repeat in range(1, repeats + 1):
            # Alternate which target goes first, so drift over the run spreads over both.
            order = TARGETS if repeat % 2 else TARGETS[::-1]
            for scenario in plan:
                for position, target in enumerate(order, start=1):
                    progress.update(task, description=f"repeat {repeat}/{repeats}: {scenario.name} on {target}")
                    name = f"r{repeat}-{scenario.name}-{target}"
                    before, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
                    data = run_benchmark(
                        endpoints[target], scenario, seed, tokenizer, raw / f"{name}.json", logs / f"{name}.log"
                    )
                    load = (before, os.getloadavg(), started)
                    row = row_for(data, scenario, target, repeat, position, seed, load)
                    rows.append({**row, "tokenmart_env": levers, "result_file": f"raw/{name}.json"})
                    if row["failed"]:
                        console.print(f"[yellow]{name}: {row['failed']} of {scenario.num_prompts} requests failed[/]")
                    seed += 1
                    progress.advance(task)
                    write_runs(out / "runs.csv", rows)  # what has run so far survives a later failure
    return rows


def write_runs(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# -- the report ------------------------------------------------------------------------------
def load_rows(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open() as f:
        return list(csv.DictReader(f))


def values(rows: list[dict[str, str]], scenario: str, column: str, target: str) -> dict[int, float]:
    """Per repeat: the column's value of one scenario on one target."""
    return {
        int(r["repeat"]): float(r[column])
        for r in rows
        if r["scenario"] == scenario and r["target"] == target and r[column] not in ("", "None")
    }


def comparisons(rows: list[dict[str, str]], line: Row) -> list[float]:
    """tokenmart ÷ engine (or minus, in ms) per repeat, over the repeats both targets ran."""
    engine = values(rows, line.scenario, line.column, "engine")
    tokenmart = values(rows, line.scenario, line.column, "tokenmart")
    both = sorted(engine.keys() & tokenmart.keys())
    if line.kind == "ratio":
        return [tokenmart[r] / engine[r] for r in both if engine[r]]
    return [tokenmart[r] - engine[r] for r in both]


def write_report(out: Path, rows: list[dict[str, str]]) -> str:
    def listed(numbers: dict[int, float]) -> str:
        return ", ".join(f"{numbers[r]:.1f}" for r in sorted(numbers)) or "-"

    lines = ["# vLLM's serving benchmark: tokenmart against the bare engine", ""]
    if rows:
        first = rows[0]
        levers = first.get("tokenmart_env") or "none"
        shapes = {
            r["scenario"]: f"{r['max_concurrency']} stream(s), {r['input_len']} in, {r['output_len']} out, "
            f"{r['num_prompts']} prompts"
            for r in rows
        }
        lines += [
            f"Runs from {first['started']} to {rows[-1]['started']}: "
            f"{max(int(r['repeat']) for r in rows)} repeat(s), `vllm bench serve --backend openai-chat "
            "--dataset-name random --ignore-eos --temperature 0`, a new seed per run.",
            "",
            *[f"- `{name}`: {shape}" for name, shape in shapes.items()],
            f"- tokenmart's levers: {levers} (`--env` pairs are set in its Ray processes' environment; "
            "`stream_batching_interval_ms` is the listing's catalog field)",
            "",
        ]
    lines += [
        "| measure | bare engine, per repeat | tokenmart, per repeat "
        "| tokenmart ÷ engine (TTFT: minus), median | min to max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for line in ROWS:
        found = comparisons(rows, line)
        spec, unit = (".3f", "") if line.kind == "ratio" else ("+.1f", " ms")
        summary, spread = "-", "-"
        if found:
            summary = f"{statistics.median(found):{spec}}{unit}"
            spread = f"{min(found):{spec}} to {max(found):{spec}}"
        engine = values(rows, line.scenario, line.column, "engine")
        tokenmart = values(rows, line.scenario, line.column, "tokenmart")
        lines.append(f"| {line.measure} | {listed(engine)} | {listed(tokenmart)} | {summary} | {spread} |")
    p99_prompts = {int(r["num_prompts"]) for r in rows if r["scenario"] == "stream16"}
    if p99_prompts and min(p99_prompts) < 200:
        lines += [
            "",
            f"The p99 TTFT comes from {min(p99_prompts)} requests a run, under 200: it is close to the "
            "slowest request. `--num-prompts 200` gives it at least 200 samples.",
        ]
    lines += [
        "",
        "Ratios are tokenmart ÷ bare engine, taken per repeat; TTFT rows are tokenmart minus bare engine. "
        "ITL is vLLM's time between streamed chunks: Ray Serve LLM batches tokens into chunks "
        "(the listing's `stream_batching_interval_ms`), so tokenmart's ITL counts fewer, larger gaps.",
        "",
        "## Runs",
        "",
        "| repeat | scenario | target | seed | completed | failed | output tok/s | load1 before → after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['repeat']} | {r['scenario']} | {r['target']} | {r['seed']} | {r['completed']} | {r['failed']} | "
        f"{float(r['output_tok_s']):.1f} | {r['load1_before']} → {r['load1_after']} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def plot(out: Path, rows: list[dict[str, str]]) -> None:
    """ratios.png: the per-repeat ratios (left) and TTFT differences (right), with their spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, kind, title in (
        (axes[0], "ratio", "tokenmart ÷ bare engine, per repeat"),
        (axes[1], "difference", "tokenmart minus bare engine (ms), per repeat"),
    ):
        lines = [line for line in ROWS if line.kind == kind]
        data = [comparisons(rows, line) for line in lines]
        names = [line.measure.replace(" (ms)", "").replace(", ", "\n") for line in lines]
        axis.boxplot([d or [float("nan")] for d in data], tick_labels=names)
        for i, found in enumerate(data, start=1):
            axis.scatter([i] * len(found), found, color="C1", zorder=3, s=18)
        axis.axhline(1.0 if kind == "ratio" else 0.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelsize=8)
    fig.suptitle("vLLM's serving benchmark: tokenmart against the bare engine")
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=120)
    plt.close(fig)


def report(out: Path) -> str:
    rows = load_rows(out)
    text = write_report(out, rows)
    plot(out, rows)
    return text


# -- the command -----------------------------------------------------------------------------
def parse_levers(pairs: list[str]) -> dict[str, str]:
    levers = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"--env takes KEY=VALUE, not {pair!r}")
        levers[name] = value
    return levers


def main(
    repeats: int = typer.Option(3, min=1, help="How many times each scenario runs against each target."),
    num_prompts: int = typer.Option(
        64, min=1, help="Requests per 16-stream run (output tokens/s, ITL, p99 TTFT; 200 for a p99 of 200 samples)."
    ),
    single_prompts: int = typer.Option(32, min=1, help="Requests per 1-stream run (TTFT and TPOT medians)."),
    streams: int = typer.Option(16, min=1, help="Concurrent streams of the throughput scenario."),
    input_len: int = typer.Option(128, min=1, help="Prompt tokens of every request (vLLM's random dataset)."),
    output_len: int = typer.Option(64, min=1, help="Output tokens per request at 16 streams."),
    single_output_len: int = typer.Option(16, min=1, help="Output tokens per request at 1 stream."),
    warm_prompts: int = typer.Option(16, min=1, help="Requests of the unrecorded warm-up run on each target."),
    seed: int = typer.Option(1000, help="The first run's --seed; every later run (warm-ups too) takes the next."),
    lora: bool | None = typer.Option(
        None, "--lora/--no-lora", help="LoRA on both engines (default: as the local listing, which sells adapters)."
    ),
    env: list[str] = typer.Option(
        [], "--env", help="KEY=VALUE in the environment of tokenmart's Ray processes (repeatable)."
    ),
    stream_batching_ms: float | None = typer.Option(
        None,
        min=0,
        help="The listing's engine.stream_batching_interval_ms for tokenmart (default: the catalog's default).",
    ),
    serve_mode: str = typer.Option(DEFAULT_SERVE_MODE, help=f"tokenmart's serve mode: {', '.join(SERVE_MODES)}."),
    out: Path = typer.Option(HERE / "results" / "vllm-bench", help="Where raw/, runs.csv, report.md, ratios.png go."),
    report_only: bool = typer.Option(False, help="Redo report.md and ratios.png from an earlier runs.csv."),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if report_only:
        sys.stdout.write(report(out))
        return
    levers = parse_levers(env)
    if serve_mode not in SERVE_MODES:
        raise typer.BadParameter(f"--serve-mode must be one of {', '.join(SERVE_MODES)}")
    plan = [
        Scenario("stream16", streams, input_len, output_len, num_prompts),
        Scenario("single", 1, input_len, single_output_len, single_prompts),
    ]
    warm = Scenario("warm", streams, input_len, single_output_len, warm_prompts)
    workdir = Path(tempfile.mkdtemp(prefix="tokenmart-vllm-bench-"))
    began = time.monotonic()
    with ExitStack() as stack:
        endpoints, listing = start(workdir, stack, lora, levers, stream_batching_ms, serve_mode)  # type: ignore[arg-type]
        console.print(f"[green]engine[/] {(workdir / 'engine-argv.txt').read_text().strip()}")
        tokenizer = listing.resolved_source(None)
        text = " ".join(
            [f"serve_mode={serve_mode}"]
            + [f"{k}={v}" for k, v in levers.items()]
            + [f"stream_batching_interval_ms={listing.engine.stream_batching_interval_ms:g}"]
        )
        run_all(endpoints, plan, warm, repeats, seed, tokenizer, out, workdir / "logs", text)
    sys.stdout.write(report(out))
    minutes = (time.monotonic() - began) / 60
    console.print(
        f"[green]wrote[/] {out}: raw/, runs.csv, report.md, ratios.png in {minutes:.1f} min; logs in {workdir}"
    )


if __name__ == "__main__":
    typer.run(main)
