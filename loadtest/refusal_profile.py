"""Where a refusal's time goes: CPU per refusal by process, and py-spy on the ingress replica.

`bench.py`'s refusal scenarios report latency at twice the saturating rate; this script
asks what each refusal costs and who pays it. It starts tokenmart alone on the fake backend
(`bench_stack`'s Ray targets: the benchmark catalog with its `tight-chat` listing, which
takes one request and queues one), measures tokenmart's saturating RPS (`max_rps`, closed
loop), then runs each refusal scenario open loop at `--times` that rate:
  refuse_429   a key allowed 1 request a minute: after its first 429 the ingress's door
               refuses it from its memo, before the body is read or Redis asked
  refuse_503   requests for `tight-chat` while it is full: the door reads each body's model
               and refuses it, before validation, prompt counting or Redis
For each run it reads the CPU seconds of every process by role (`cpu_profile.ROLES`, plus
the fake engine replica and this load generator) and records py-spy on the ingress replica.

    python loadtest/refusal_profile.py                      # writes loadtest/results/refusal-profile/
"""

from __future__ import annotations

import asyncio
import csv
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import typer
from bench_load import MODEL, TIGHT_MODEL, Scenario, closed_loop, open_loop, summarize, warm_up
from bench_stack import Stack
from cpu_profile import cpu_seconds, replica_pids, role_of, samples_by_group, spent, start_py_spy
from rich.console import Console

console = Console()
HERE = Path(__file__).resolve().parent
LOAD_GENERATOR = "load generator (this script)"
EXTRA_ROLES = [("fake engine replica", ("ServeReplica:tokenmart:fake",))]


def role_here(process: psutil.Process) -> str | None:
    """`cpu_profile`'s roles, plus the fake engine replica and this load generator."""
    if process.pid == psutil.Process().pid:
        return LOAD_GENERATOR
    role = role_of(process)
    if role is not None:
        return role
    try:
        text = " ".join([process.name(), *process.cmdline()])
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return next((r for r, marks in EXTRA_ROLES if any(m in text for m in marks)), None)


def roles_cpu() -> dict[int, tuple[str, float]]:
    return cpu_seconds(role_here)


def main(
    times: float = typer.Option(2.0, min=0.1, help="The offered rate, as a multiple of tokenmart's saturating RPS."),
    seconds: float = typer.Option(8.0, min=1, help="How long each refusal scenario offers its load."),
    out: Path = typer.Option(HERE / "results" / "refusal-profile", help="Where cpu.csv, pyspy.csv, summary.md go."),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tokenmart-refusal-profile-"))
    cpu_rows: list[dict] = []
    spy_rows: list[dict] = []
    lines: list[str] = []
    with ExitStack() as stack:
        bench = Stack("fake", workdir, stack)
        bench.prepare_catalog()
        console.print("starting tokenmart (fake backend)…")
        targets, _ = bench.start_ray_targets()
        tokenmart = {"tokenmart": targets["tokenmart"]}
        warm_up(tokenmart)
        samples, elapsed = asyncio.run(closed_loop(tokenmart["tokenmart"], Scenario("max_rps", 32, 6, False, 1)))
        saturation = summarize(samples, elapsed)["rps"]
        rate = times * saturation
        console.print(f"saturating RPS {saturation}; offering {rate:.0f} req/s")
        ingress_pid = replica_pids()["ingress replica"]
        for scenario in (
            Scenario("refuse_429", 0, seconds, False, 8, ("tokenmart",), key="limited", model=MODEL),
            Scenario("refuse_503", 0, seconds, False, 64, ("tokenmart",), model=TIGHT_MODEL),
        ):
            console.print(f"{scenario.name} at {rate:.0f} req/s for {seconds:g} s…")
            raw = workdir / f"{scenario.name}.pyspy"
            spy = start_py_spy(ingress_pid, int(seconds) + 1, raw)
            before = roles_cpu()
            samples, elapsed = asyncio.run(open_loop(tokenmart["tokenmart"], scenario, rate))
            after = roles_cpu()
            spy.wait(timeout=60)
            summary = summarize(samples, elapsed)
            refused = summary["refused"] or 1
            for role, cpu in sorted(spent(before, after).items(), key=lambda item: -item[1]):
                cpu_rows.append(
                    {
                        "scenario": scenario.name,
                        "role": role,
                        "cpu_s": round(cpu, 3),
                        "cpu_ms_per_refusal": round(cpu * 1000 / refused, 3),
                        "refused": summary["refused"],
                        "served": summary["ok"],
                        "refused_p50_ms": summary["refused_p50_ms"],
                        "refused_p99_ms": summary["refused_p99_ms"],
                        "offered_rps": round(rate, 1),
                        "elapsed_s": round(elapsed, 2),
                    }
                )
            groups = samples_by_group(raw) if raw.exists() else {}
            total = sum(groups.values()) or 1
            for group, count in groups.most_common():
                spy_rows.append(
                    {"scenario": scenario.name, "code": group, "samples": count, "share": round(count / total, 4)}
                )
            time.sleep(2)
    with (out / "cpu.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cpu_rows[0]))
        writer.writeheader()
        writer.writerows(cpu_rows)
    with (out / "pyspy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["scenario", "code", "samples", "share"])
        writer.writeheader()
        writer.writerows(spy_rows)
    lines = summary_lines(cpu_rows, spy_rows, saturation, rate)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


def summary_lines(cpu_rows: list[dict], spy_rows: list[dict], saturation: float, rate: float) -> list[str]:
    lines = [
        "# Where a refusal's time goes",
        "",
        f"tokenmart alone on the fake backend; saturating RPS {saturation} (closed loop, 32 clients), refusals",
        f"offered open loop at {rate:.0f} req/s. CPU seconds per process role over each run, divided by the",
        f"refusals it answered; {psutil.cpu_count()} CPUs, so the machine has {psutil.cpu_count() * 1000:.0f} ms of",
        "CPU a second to give.",
        "",
        "| scenario | refused (served) | p50 / p99 ms | role | CPU s | CPU ms per refusal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in cpu_rows:
        lines.append(
            f"| {row['scenario']} | {row['refused']} ({row['served']}) | {row['refused_p50_ms']} / "
            f"{row['refused_p99_ms']} | {row['role']} | {row['cpu_s']} | {row['cpu_ms_per_refusal']} |"
        )
    lines += ["", "## py-spy on the ingress replica (share of non-idle samples)", ""]
    lines += ["| scenario | code | samples | share |", "| --- | --- | --- | --- |"]
    for row in spy_rows:
        lines.append(f"| {row['scenario']} | {row['code']} | {row['samples']} | {row['share']:.1%} |")
    return lines


if __name__ == "__main__":
    typer.run(main)
