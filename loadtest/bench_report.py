"""The report of `bench.py`: its goals, checked per repeat, and report.md.

Owns what each goal compares (a ratio or a difference against a baseline target, taken per
repeat, then the median and range), the side comparisons, "RPS at the same p99" read off
the concurrency sweep, and the markdown tables. It reads runs.csv only, so a report can be
redone from an earlier run (`bench.py --report-only`).
"""

from __future__ import annotations

import csv
import os
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench_load import TARGETS


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
    Goal("output tokens/s, 16 streams", "stream_c16", "output_tok_s", "tokenmart", "engine", "ratio", 0.95, False),
    Goal("TTFT p50, concurrency 1", "ttft_c1", "ttft_p50_ms", "tokenmart", "engine", "difference", 10, True),
    Goal("429 p99 at 2x saturation", "refuse_429", "refused_p99_ms", "tokenmart", None, "value", 25, True),
    Goal("503 p99 at 2x saturation", "refuse_503", "refused_p99_ms", "tokenmart", None, "value", 25, True),
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


def setup_lines(rows: list[dict]) -> list[str]:
    """How each peer was set up, as runs.csv recorded it (older runs have no such column)."""
    setups = {row["target"]: row["setup"] for row in rows if row.get("setup")}
    return ["", *(f"`{target}` ran with: {setup}." for target, setup in sorted(setups.items()))] if setups else []


def sample_lines(rows: list[dict]) -> list[str]:
    """How many samples the p99 figures rest on: the fewest of any run they come from."""
    sweeps = [int(r["ok"]) for r in rows if r["scenario"].startswith("sweep_")]
    refusals = [int(r["refused"]) for r in rows if r["scenario"].startswith("refuse_") and r.get("offered_rps")]
    parts = []
    if sweeps:
        parts.append(f"the sweep's p99 from at least {min(sweeps)} answered requests a run")
    if refusals:
        parts.append(f"the refusals' p99 at 2x saturation from at least {min(refusals)} refusals a run")
    return ["", f"Samples: {'; '.join(parts)}."] if parts else []


def write_report(out: Path, backend: str, rows: list[dict]) -> str:
    """report.md from the rows of runs.csv; returns its text."""
    lines = [
        f"# Benchmark: backend `{backend}`",
        "",
        f"Run {rows[0]['started'] if rows else '?'} on {os.cpu_count()} CPUs. Targets ran interleaved in the same",
        "run; each figure is the median over repeats, with the range. Ratios are per repeat.",
        *setup_lines(rows),
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
    lines += sample_lines(rows)
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
    return report
