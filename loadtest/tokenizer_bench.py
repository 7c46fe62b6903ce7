"""What counting a prompt with the listing's real tokenizer costs the ingress, per request.

Admission counts the prompt before the engine sees it (`deployments/tokens.py`): the chat
template rendered to text, then encoded, with SmolLM2's own tokenizer. This times that call,
`PromptCounter.count`, on the chat prompt `bench.py` sends, one call at a time in this process
(no Ray, no HTTP), so it can be set against the TTFT differences `bench.py` reports.

Usage:
    python loadtest/tokenizer_bench.py [--calls 5000] [--out loadtest/results/tokenizer.json]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import typer
from bench_load import PROMPT, percentile  # bench.py's chat prompt and percentiles (this runs from loadtest/)

from tokenmart.cluster.model_build import SMOLLM2_NAME, ensure_builtin
from tokenmart.deployments.tokens import PromptCounter

WARMUP_CALLS = 200


def summary(samples_ns: list[int]) -> dict[str, float]:
    ms = sorted(ns / 1e6 for ns in samples_ns)
    return {
        "median": round(statistics.median(ms), 4),
        "p99": round(percentile(ms, 99), 4),
        "mean": round(statistics.fmean(ms), 4),
    }


def main(
    calls: int = typer.Option(5000, help="Timed calls, after a warm-up."),
    out: Path = typer.Option(Path("loadtest/results/tokenizer.json"), help="Where the result is written."),
) -> None:
    model = ensure_builtin(SMOLLM2_NAME)
    counter = PromptCounter.for_source(str(model))
    if not counter.exact:
        raise typer.BadParameter(f"no tokenizer in {model}: the exact path would not be measured")
    # Only `messages` is read on the exact path (besides the template-changing fields, absent here).
    body = SimpleNamespace(messages=[{"role": "user", "content": PROMPT}])
    tokens = counter.count(body, chat=True)
    for _ in range(WARMUP_CALLS):
        counter.count(body, chat=True)
    load_before = os.getloadavg()[0]
    cpu_ns, wall_ns = [], []
    for _ in range(calls):
        cpu_started, wall_started = time.thread_time_ns(), time.perf_counter_ns()
        counter.count(body, chat=True)
        wall_ns.append(time.perf_counter_ns() - wall_started)
        cpu_ns.append(time.thread_time_ns() - cpu_started)
    result = {
        "what": "PromptCounter.count(chat=True) with SmolLM2-135M-Instruct's tokenizer, one call at a time",
        "prompt": PROMPT,
        "prompt_tokens": tokens,
        "calls": calls,
        # CPU time is the call's own cost; wall time also holds whatever else ran on the cores.
        "cpu_ms": summary(cpu_ns),
        "wall_ms": summary(wall_ns),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_before": round(load_before, 2),
            "python": platform.python_version(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
