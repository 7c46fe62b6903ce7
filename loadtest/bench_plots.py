"""The figures of `bench.py`, drawn from the rows of runs.csv with matplotlib.

latency.png (p50 latency and TTFT at concurrency 1), throughput.png (max RPS and output
tokens/s of 16 streams): the median per target, with the range over repeats as error bars;
sweep.png (fake backend): p99 latency against RPS as the concurrency grows.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench_load import TARGETS


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
