"""Stepped-load scenario against a running tokenmart: load, replicas and latency over time.

Runs Locust (loadtest/locustfile.py, headless, in its own process) through a list of user
steps while sampling, every second, the RUNNING replicas of every Serve deployment (from the
Ray dashboard's Serve API). Afterwards it keeps sampling through a cool-down to catch the
scale-down. It writes, to --out:
  samples.csv      one row a second: time, users, replicas per deployment
  locust_*.csv     Locust's own stats (incl. ttft / itl / tokens_per_s, see locustfile.py)
  autoscaling.png  load, replicas per deployment and p50/p99 time to first token over time
  summary.md       the steps, and per deployment: time from each load step to a new replica
                   serving, peak replicas, and time to scale back down after the load drops

Usage:
    tokenmart up --engine fake --catalog loadtest/catalogs/fake-market.yaml
    python loadtest/stepped_load.py --steps 6:40,18:90,6:60 --cooldown 60 --prompt "[[fake-tokens=48]]"
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typer
from load_steps import parse_steps, users_at
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tokenmart.cluster import launcher
from tokenmart.cluster.state import ClusterState, default_state_dir

console = Console()
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass
class Sample:
    t: float  # seconds since the load started
    users: int
    replicas: dict[str, int]  # RUNNING
    targets: dict[str, int] = field(default_factory=dict)  # what the autoscaler has decided


@dataclass
class Run:
    steps: list[tuple[int, float]]
    samples: list[Sample] = field(default_factory=list)

    def users_at(self, t: float) -> int:
        users = users_at(self.steps, t)
        return 0 if users is None else users

    def step_starts(self) -> list[tuple[float, int, int]]:
        """(start time, users before, users after) of every step."""
        out, start, before = [], 0.0, 0
        for users, seconds in self.steps:
            out.append((start, before, users))
            start, before = start + seconds, users
        out.append((start, before, 0))  # the load stops
        return out


def replica_counts(client: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(RUNNING replicas, target replicas) per deployment, over every Serve application."""
    try:
        details = client.get_serve_details()
    except Exception:  # the dashboard may be briefly busy; skip this sample
        return {}, {}
    running: dict[str, int] = {}
    targets: dict[str, int] = {}
    for app in details.get("applications", {}).values():
        for name, deployment in app.get("deployments", {}).items():
            running[name] = sum(1 for replica in deployment.get("replicas", []) if replica.get("state") == "RUNNING")
            targets[name] = int(deployment.get("target_num_replicas") or 0)
    return running, targets


def create_load_key(api_base: str, admin_token: str) -> str:
    body = {"name": "loadtest", "credit_usd": 10_000, "rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrency": 5000}
    return launcher.create_key(api_base, admin_token, body)["key"]


def sample_loop(run: Run, client: Any, started: float, stop: threading.Event) -> None:
    while not stop.is_set():
        t = time.monotonic() - started
        running, targets = replica_counts(client)
        run.samples.append(Sample(round(t, 1), run.users_at(t), running, targets))
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started - t)))


def write_samples(run: Run, path: Path) -> list[str]:
    names = sorted({name for sample in run.samples for name in sample.replicas})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t_s", "users", *names, *(f"{name} (target)" for name in names)])
        for sample in run.samples:
            writer.writerow(
                [sample.t, sample.users, *(sample.replicas.get(n, 0) for n in names)]
                + [sample.targets.get(n, 0) for n in names]
            )
    return names


def read_latency(history: Path, started_epoch: float) -> list[tuple[float, float, float, float]]:
    """(t, requests/s, TTFT p50 ms, TTFT p99 ms) per second of Locust's history, on our clock.

    Requests/s counts the HTTP requests only (not the ttft/itl/tokens_per_s entries), and
    latency is the streams' time to first token: what a chat user waits for.
    """
    if not history.exists():
        return []
    by_time: dict[float, dict[str, float]] = {}
    with history.open() as handle:
        for row in csv.DictReader(handle):
            t = float(row["Timestamp"]) - started_epoch
            point = by_time.setdefault(t, {"rps": 0.0})
            if row["Type"] == "POST":
                point["rps"] += float(row["Requests/s"])
            elif row["Type"] == "metric" and row["Name"] == "ttft" and row["50%"] not in ("N/A", ""):
                point["p50"], point["p99"] = float(row["50%"]), float(row["99%"])
    return [(t, p["rps"], p["p50"], p["p99"]) for t, p in sorted(by_time.items()) if "p50" in p]


def plot(run: Run, names: list[str], latency: list[tuple[float, float, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [s.t for s in run.samples]
    fig, (load_ax, replica_ax, latency_ax) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    load_ax.step(times, [s.users for s in run.samples], where="post", color="black", label="users")
    load_ax.set_ylabel("users")
    if latency:
        rate_ax = load_ax.twinx()
        rate_ax.plot([r[0] for r in latency], [r[1] for r in latency], color="tab:green", label="requests/s")
        rate_ax.set_ylabel("requests/s", color="tab:green")
    load_ax.set_title("Load")
    for name in names:
        (line,) = replica_ax.step(times, [s.replicas.get(name, 0) for s in run.samples], where="post", label=name)
        targets = [s.targets.get(name, 0) for s in run.samples]
        replica_ax.step(times, targets, where="post", linestyle="--", alpha=0.6, color=line.get_color())
    replica_ax.set_ylabel("replicas")
    replica_ax.set_title("RUNNING replicas per deployment (dashed: the autoscaler's target)")
    replica_ax.legend(fontsize="small", loc="upper right")
    replica_ax.yaxis.get_major_locator().set_params(integer=True)
    if latency:
        latency_ax.plot([r[0] for r in latency], [r[2] for r in latency], label="p50")
        latency_ax.plot([r[0] for r in latency], [r[3] for r in latency], label="p99")
        latency_ax.legend(fontsize="small", loc="upper right")
    latency_ax.set_ylabel("ms")
    latency_ax.set_xlabel("seconds since the load started")
    latency_ax.set_title("Time to first token of streams (Locust, p50/p99 over the last 10 s)")
    for start, _, _ in run.step_starts():
        for ax in (load_ax, replica_ax, latency_ax):
            ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def scaling_events(run: Run, name: str) -> list[str]:
    """Per load step: how long until this deployment's replica count moved, and to what."""
    lines = []
    series = [(s.t, s.replicas.get(name, 0)) for s in run.samples]
    decided = [(s.t, s.targets.get(name, 0)) for s in run.samples]
    starts = run.step_starts()
    for index, (start, before, after) in enumerate(starts):
        if after == before:
            continue
        # Only what happens before the next load change counts for this one.
        end = starts[index + 1][0] if index + 1 < len(starts) else float("inf")
        at_start = next((count for t, count in series if t >= start), None)
        if at_start is None:
            continue
        later = [(t, count) for t, count in series if start <= t < end]
        if after > before:
            moved = next(((t, c) for t, c in later if c > at_start), None)
            what = "a new replica RUNNING"
        elif later:
            floor = min(c for _, c in later)
            moved = next(((t, c) for t, c in later if c == floor and c < at_start), None)
            what = f"back down to {floor}"
        else:
            continue
        verb = "up" if after > before else "down"
        if moved is None:
            lines.append(f"| {name} | {before} -> {after} users at {start:.0f} s | {verb}: no change ({at_start}) | |")
            continue
        target_then = next((c for t, c in decided if t >= start), at_start)
        decision = next(
            (t for t, c in decided if start <= t < end and (c > target_then if after > before else c < target_then)),
            None,
        )
        decided_text = f"{decision - start:.1f} s" if decision is not None else "before the step"
        lines.append(
            f"| {name} | {before} -> {after} users at {start:.0f} s | "
            f"{verb}: {what} after **{moved[0] - start:.1f} s** ({at_start} -> {moved[1]}) | {decided_text} |"
        )
    return lines


def summarize(run: Run, names: list[str], latency: list, locust_dir: Path, path: Path, title: str) -> str:
    lines = [f"# {title}", "", "## Steps", "", "| step | users | seconds |", "| --- | --- | --- |"]
    lines += [f"| {i + 1} | {users} | {seconds:g} |" for i, (users, seconds) in enumerate(run.steps)]
    lines += ["", "## Scaling", ""]
    lines += ["| deployment | load change | RUNNING replicas | autoscaler decided after |", "| --- | --- | --- | --- |"]
    for name in names:
        lines += scaling_events(run, name)
    lines += ["", "| deployment | min | max RUNNING replicas seen |", "| --- | --- | --- |"]
    for name in names:
        counts = [s.replicas.get(name, 0) for s in run.samples if s.replicas]
        lines.append(f"| {name} | {min(counts, default=0)} | {max(counts, default=0)} |")
    stats = locust_dir / "locust_stats.csv"
    if stats.exists():
        lines += ["", "## Requests (Locust)", "", "| name | requests | failures | p50 ms | p99 ms | req/s |"]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        with stats.open() as handle:
            for row in csv.DictReader(handle):
                lines.append(
                    f"| {row['Type']} {row['Name']} | {row['Request Count']} | {row['Failure Count']} | "
                    f"{row['50%']} | {row['99%']} | {float(row['Requests/s']):.2f} |"
                )
        lines.append("")
        lines.append("`metric ttft` / `metric itl` are milliseconds; `metric tokens_per_s` is tokens per second.")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def load_run(out: Path, steps: str) -> tuple[Run, list[str]]:
    """Rebuild a run from its samples.csv (to redo the report without rerunning the load)."""
    run = Run(parse_steps(steps))
    with (out / "samples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    names = [k for k in rows[0] if k not in ("t_s", "users") and not k.endswith(" (target)")]
    for row in rows:
        running = {n: int(row[n]) for n in names}
        targets = {n: int(row[f"{n} (target)"]) for n in names}
        run.samples.append(Sample(float(row["t_s"]), int(row["users"]), running, targets))
    return run, names


def report(run: Run, names: list[str], out: Path, started_epoch: float, title: str) -> None:
    latency = read_latency(out / "locust_stats_history.csv", started_epoch)
    plot(run, names, latency, out / "autoscaling.png")
    console.print(summarize(run, names, latency, out, out / "summary.md", title))
    console.print(f"wrote {out}/samples.csv, autoscaling.png, summary.md")


def main(
    steps: str = typer.Option("6:40,18:90,6:60", help="users:seconds,... (e.g. a 3x step and back)."),
    cooldown: float = typer.Option(60, help="Seconds to keep sampling after the load stops (scale-down)."),
    models: str | None = typer.Option(None, help="Comma-separated listings (default: all in /v1/models)."),
    max_tokens: int = typer.Option(32),
    stream_share: float = typer.Option(0.5),
    prompt: str = typer.Option("", help='Extra prompt text, e.g. "[[fake-tokens=48]]" for the fake engine.'),
    out: Path = typer.Option(Path("loadtest/results/stepped"), help="Output directory."),
    title: str = typer.Option("Stepped load", help="Title of summary.md."),
    report_only: bool = typer.Option(False, help="Redo plot and summary from an earlier run in --out."),
) -> None:
    if report_only:
        run, names = load_run(out, steps)
        if not (out / "started_at").exists():
            raise SystemExit(f"{out} holds no earlier run (started_at is missing)")
        report(run, names, out, float((out / "started_at").read_text()), title)
        return
    state = ClusterState.load(default_state_dir())
    if state is None:
        raise SystemExit("no running cluster found: run `tokenmart up` first")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(parse_steps(steps))
    if models is None:
        listed = httpx.get(f"{state.api_base}/v1/models", timeout=30).json()["data"]
        models = ",".join(model["id"] for model in listed)
    key = create_load_key(state.api_base, state.admin_token)
    client = launcher.serve_client(state.dashboard_url)
    if client is None:
        raise SystemExit(f"the Ray dashboard at {state.dashboard_url} does not answer")

    env = {
        **os.environ,
        "TOKENMART_API_KEY": key,
        "LOADTEST_MODELS": models,
        "LOADTEST_MAX_TOKENS": str(max_tokens),
        "LOADTEST_STREAM_SHARE": str(stream_share),
        "LOADTEST_PROMPT": prompt,
        "LOADTEST_STEPS": steps,
        "LOCUST_CSV_STATS_INTERVAL_SEC": "1",
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", state.api_base,
        "--csv", str(out / "locust"), "--csv-full-history", "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    total = sum(seconds for _, seconds in run.steps) + cooldown
    stop = threading.Event()
    started, started_epoch = time.monotonic(), time.time()
    (out / "started_at").write_text(f"{started_epoch}\n")
    sampler = threading.Thread(target=sample_loop, args=(run, client, started, stop), daemon=True)
    with (out / "locust.log").open("w") as log:
        locust = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler.start()
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"))
        with Progress(*columns, TimeRemainingColumn(), console=console) as progress:
            task = progress.add_task("stepped load", total=total, state="")
            while (elapsed := time.monotonic() - started) < total:
                latest = run.samples[-1].replicas if run.samples else {}
                replicas = " ".join(f"{name.split(':')[-1]}={count}" for name, count in sorted(latest.items()))
                phase = "cool-down" if locust.poll() is not None else f"{run.users_at(elapsed)} users"
                progress.update(task, completed=elapsed, state=f"{phase}  {replicas}")
                time.sleep(0.5)
        stop.set()
        sampler.join(5)
        if locust.poll() is None:
            locust.terminate()
        locust.wait(30)

    names = write_samples(run, out / "samples.csv")
    report(run, names, out, started_epoch, title)


if __name__ == "__main__":
    typer.run(main)
