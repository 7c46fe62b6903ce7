"""What usage on every streamed chunk costs the engine itself.

tokenmart asks the engine for `stream_options.continuous_usage_stats` on every stream, so
that a stream cut short is billed the tokens it was sent. This script measures that
request option alone, on the bare engine (`vllm.entrypoints.openai.api_server` with the
engine arguments tokenmart gives the local SmolLM2 listing, as `vllm_bench.py` starts it),
with vLLM's own benchmark client, alternating per repeat between
  final      `stream_options: {include_usage: true}`: usage once, in the last chunk
             (what `vllm bench serve` sends, and what a plain client gets)
  per_chunk  `stream_options: {include_usage: true, continuous_usage_stats: true}`: usage
             in every chunk (what tokenmart's ingress asks of its engine)
at 16 streams (128 tokens in, 64 out). No Ray, no tokenmart: the difference is the engine's
API server building and sending the usage of every chunk.

    python loadtest/usage_cost.py --repeats 3      # writes loadtest/results/usage-cost/
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer
from bench_stack import Stack, wait_http
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from vllm_bench import Endpoint, Scenario, bench_listing, engine_argv, run_benchmark

from tokenmart.cluster.launcher import free_port

console = Console()
HERE = Path(__file__).resolve().parent
VARIANTS: dict[str, dict[str, Any]] = {
    "final": {"stream_options": {"include_usage": True}},
    "per_chunk": {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
}
COLUMNS = [
    "repeat",
    "variant",
    "seed",
    "completed",
    "failed",
    "output_tok_s",
    "median_itl_ms",
    "median_ttft_ms",
    "load1",
]


def run(repeats: int, num_prompts: int, streams: int, seed: int, out: Path) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="tokenmart-usage-cost-"))
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        listing = bench_listing(workdir / "catalog.yaml", None)
        processes = Stack("vllm", workdir, stack)
        port = free_port()
        processes._spawn("engine", engine_argv(listing, port))
        wait_http(f"http://127.0.0.1:{port}/v1/models", what="the bare engine", alive=processes.check_alive)
        endpoint = Endpoint(f"http://127.0.0.1:{port}", "none")
        tokenizer = listing.resolved_source(None)
        scenario = Scenario("stream16", streams, 128, 64, num_prompts)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("warming up", total=1 + repeats * len(VARIANTS))
            warm = Scenario("warm", streams, 128, 16, 16)
            run_benchmark(endpoint, warm, seed, tokenizer, logs / "warm.json", logs / "warm.log")
            seed += 1
            progress.advance(task)
            for repeat in range(1, repeats + 1):
                order = list(VARIANTS) if repeat % 2 else list(VARIANTS)[::-1]
                for variant in order:
                    progress.update(task, description=f"repeat {repeat}/{repeats}: {variant}")
                    name = f"r{repeat}-{variant}"
                    data = run_benchmark(
                        endpoint,
                        scenario,
                        seed,
                        tokenizer,
                        logs / f"{name}.json",
                        logs / f"{name}.log",
                        VARIANTS[variant],
                    )
                    rows.append(
                        {
                            "repeat": repeat,
                            "variant": variant,
                            "seed": seed,
                            "completed": data.get("completed"),
                            "failed": data.get("failed"),
                            "output_tok_s": round(data["output_throughput"], 2),
                            "median_itl_ms": round(data.get("median_itl_ms") or 0.0, 2),
                            "median_ttft_ms": round(data.get("median_ttft_ms") or 0.0, 2),
                            "load1": round(os.getloadavg()[0], 2),
                        }
                    )
                    seed += 1
                    progress.advance(task)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    by = {(int(r["repeat"]), r["variant"]): float(r["output_tok_s"]) for r in rows}
    repeats = sorted({repeat for repeat, _ in by})
    ratios = [by[(r, "per_chunk")] / by[(r, "final")] for r in repeats if (r, "per_chunk") in by and (r, "final") in by]
    lines = [
        "# Usage on every streamed chunk: what it costs the bare engine",
        "",
        "vLLM's benchmark client against the bare engine (tokenmart's SmolLM2 engine arguments), 16 streams,",
        "128 tokens in, 64 out; per repeat one run with usage only in the last chunk (`final`) and one with",
        f"`continuous_usage_stats` (`per_chunk`), the order alternating. Machine: {os.cpu_count()} CPUs.",
        "",
        "| repeat | final tok/s | per_chunk tok/s | per_chunk ÷ final |",
        "| --- | --- | --- | --- |",
    ]
    for r, ratio in zip(repeats, ratios, strict=False):
        lines.append(f"| {r} | {by[(r, 'final')]:.1f} | {by[(r, 'per_chunk')]:.1f} | {ratio:.3f} |")
    if ratios:
        lines += ["", f"Median per_chunk ÷ final: **{statistics.median(ratios):.3f}** "
                  f"({min(ratios):.3f} to {max(ratios):.3f}, n={len(ratios)})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(
    repeats: int = typer.Option(3, min=1, help="Pairs of runs (final, per_chunk)."),
    num_prompts: int = typer.Option(64, min=1, help="Requests per run."),
    streams: int = typer.Option(16, min=1, help="Concurrent streams."),
    seed: int = typer.Option(9000, help="The first run's --seed; every later run takes the next."),
    out: Path = typer.Option(HERE / "results" / "usage-cost", help="Where runs.csv and summary.md go."),
) -> None:
    began = time.monotonic()
    rows = run(repeats, num_prompts, streams, seed, out)
    text = summary(rows)
    (out / "summary.md").write_text(text)
    sys.stdout.write(text)
    console.print(f"[green]wrote[/] {out} in {(time.monotonic() - began) / 60:.1f} min")


if __name__ == "__main__":
    typer.run(main)
