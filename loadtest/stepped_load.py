"""Stepped-load scenario against a running tokenmart: load, replicas and latency over time.

Runs Locust (loadtest/locustfile.py, headless, in its own process) through a list of user
steps while sampling, every second, the RUNNING replicas of every Serve deployment (from the
Ray dashboard's Serve API). Afterwards it keeps sampling through a cool-down to catch the
scale-down. It writes, to --out:
  samples.csv      one row a second: time, users, replicas per deployment
  locust_*.csv     Locust's own stats (incl. ttft / itl / tokens_per_s, see locustfile.py)
  autoscaling.png  load, replicas per deployment and p50/p99 time to first token over time
  summary.md       the steps, and per deployment: time from each load step to a new replica
                   serving, peak replicas, every change of RUNNING replicas (when each went up
                   and came back down), and the cold start below
  cold_start.csv   with --cold-model: one request to a listing scaled to zero replicas

With `--up CATALOG` it starts the cluster itself (the launcher's `up`, with `--ingress`
options such as target_ongoing_requests=4, which `tokenmart up` has no flag for) and stops
it at the end. With `--cold-model ID` (a listing with `min_replicas: 0`) it first waits until
that listing has no replica, then sends it one streamed request with a fresh key and reports
the status, the time to first token, the cost in the usage, and the key's balance and hold
before and after (the key must be charged the tokens only, and nothing left on hold).

Usage:
    tokenmart up --engine fake --catalog loadtest/catalogs/fake-market.yaml
    python loadtest/stepped_load.py --steps 6:40,18:90,6:60 --cooldown 60 --prompt "[[fake-tokens=48]]"
    python loadtest/stepped_load.py --up loadtest/catalogs/fake-ingress.yaml --engine fake \
        --ingress target_ongoing_requests=4 --ingress max_replicas=3 --cold-model chat-cold ...
"""

from __future__ import annotations

import contextlib
import csv
import json
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


def replica_changes(run: Run, name: str) -> list[str]:
    """Every change of this deployment's RUNNING replicas, and when the autoscaler's target moved
    for it (each move of the target is matched to the next change of RUNNING it explains)."""
    lines: list[str] = []
    last, last_target = None, None
    decisions: list[float] = []  # target moves not yet carried out
    for sample in run.samples:
        if not sample.replicas:
            continue  # a sample the dashboard did not answer
        count, target = sample.replicas.get(name, 0), sample.targets.get(name, 0)
        if last_target is not None and target != last_target:
            decisions += [sample.t] * abs(target - last_target)
        if last is not None and count != last:
            moved = [decisions.pop(0) for _ in range(min(abs(count - last), len(decisions)))]
            decided = f"{moved[0]:.0f} s" if moved else ""
            lines.append(f"| {name} | {sample.t:.0f} s | {last} -> {count} | {decided} | {run.users_at(sample.t)} |")
        last, last_target = count, target
    return lines


def excursions(run: Run, name: str) -> str:
    """When the deployment first went above its starting count, and when it was back."""
    counts = [(s.t, s.replicas.get(name, 0)) for s in run.samples if s.replicas]
    if not counts:
        return f"| {name} | | | | |"
    base = counts[0][1]
    up = next(((t, c) for t, c in counts if c > base), None)
    if up is None:
        return f"| {name} | {base} | never above {base} | | |"
    peak = max(c for _, c in counts)
    back = next(((t, c) for t, c in counts if t > up[0] and c <= base), None)
    back_text = f"{back[0]:.0f} s" if back else "not within the run"
    return f"| {name} | {base} | {up[0]:.0f} s | {peak} | {back_text} |"


@dataclass
class ColdStart:
    """One request to a listing at zero replicas, and what the key was charged for it."""

    model: str
    deployment: str
    replicas_before: int
    status: int = 0
    ttft_s: float | None = None
    total_s: float | None = None
    replica_running_s: float | None = None  # after the request was sent
    completion_tokens: int = 0
    prompt_tokens: int = 0
    usage_cost_usd: float | None = None
    balance_before_usd: float | None = None
    balance_after_usd: float | None = None
    hold_after_usd: float | None = None
    error: str = ""

    @property
    def charged_usd(self) -> float | None:
        if self.balance_before_usd is None or self.balance_after_usd is None:
            return None
        return round(self.balance_before_usd - self.balance_after_usd, 6)

    def verdict(self) -> str:
        problems = []
        if self.status != 200:
            problems.append(f"status {self.status}")
        charged, cost = self.charged_usd, self.usage_cost_usd
        if charged is None or cost is None or abs(charged - cost) > 1e-6:
            problems.append(f"charged {self.charged_usd} against a usage cost of {self.usage_cost_usd}")
        if self.hold_after_usd:
            problems.append(f"{self.hold_after_usd} USD left on hold")
        return "ok: 200, charged exactly the usage's cost, nothing on hold" if not problems else "; ".join(problems)

    def write(self, path: Path) -> None:
        fields = {k: v for k, v in vars(self).items()}
        fields["charged_usd"], fields["verdict"] = self.charged_usd, self.verdict()
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(list(fields))
            writer.writerow(list(fields.values()))

    @classmethod
    def read(cls, path: Path) -> ColdStart | None:
        if not path.exists():
            return None
        with path.open() as handle:
            row = next(csv.DictReader(handle))
        names = {f for f in cls.__dataclass_fields__}
        kinds = {"model": str, "deployment": str, "error": str, "replicas_before": int, "status": int}
        kinds |= {"completion_tokens": int, "prompt_tokens": int}
        values = {k: (kinds.get(k, float)(v) if v != "" else None) for k, v in row.items() if k in names}
        values["error"] = values.get("error") or ""
        return cls(**values)

    def markdown(self) -> list[str]:
        def seconds(value: float | None) -> str:
            return f"{value:.2f} s" if value is not None else "-"

        return [
            "## Cold start (a listing at zero replicas)",
            "",
            "| model | deployment | replicas when sent | status | TTFT | whole request | replica RUNNING after | "
            "tokens (prompt + completion) | usage cost | balance before -> after | charged | on hold after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {self.model} | {self.deployment} | {self.replicas_before} | {self.status} | "
            f"**{seconds(self.ttft_s)}** | "
            f"{seconds(self.total_s)} | {seconds(self.replica_running_s)} | {self.prompt_tokens} + "
            f"{self.completion_tokens} | ${self.usage_cost_usd} | ${self.balance_before_usd} -> "
            f"${self.balance_after_usd} | ${self.charged_usd} | ${self.hold_after_usd} |",
            "",
            f"Verdict: {self.verdict()}." + (f" Error: {self.error}" if self.error else ""),
            "",
        ]


def deployment_of(client: Any, model: str) -> str | None:
    running, _ = replica_counts(client)
    return next((name for name in running if name.split(":", 1)[-1] == model), None)


def wait_for_zero(client: Any, deployment: str, timeout_s: float) -> int:
    """Wait until the deployment has no replica and the autoscaler wants none; its RUNNING count."""
    deadline = time.monotonic() + timeout_s
    with console.status(f"waiting for {deployment} to scale to zero replicas"):
        while time.monotonic() < deadline:
            running, targets = replica_counts(client)
            if running.get(deployment) == 0 and targets.get(deployment) == 0:
                return 0
            time.sleep(1)
    running, _ = replica_counts(client)
    return running.get(deployment, -1)


def key_state(api_base: str, key: str) -> dict[str, Any]:
    return httpx.get(f"{api_base}/v1/key", headers={"authorization": f"Bearer {key}"}, timeout=30).json()


def cold_request(api_base: str, admin_token: str, client: Any, model: str, prompt: str, max_tokens: int,
                 wait_s: float) -> ColdStart:  # fmt: skip
    """One streamed request to a listing with no replica: status, TTFT, and what it cost the key."""
    deployment = deployment_of(client, model) or model
    before = wait_for_zero(client, deployment, wait_s)
    created = launcher.create_key(api_base, admin_token, {"name": "cold-start", "credit_usd": 1})
    result = ColdStart(model=model, deployment=deployment, replicas_before=before)
    result.balance_before_usd = key_state(api_base, created["key"]).get("credit_usd")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short sentence about cold starts. {prompt}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stop, running_at = threading.Event(), []

    def watch(sent: float) -> None:  # when the new replica is RUNNING, on the request's clock
        while not stop.is_set():
            if replica_counts(client)[0].get(deployment, 0) > 0:
                running_at.append(time.monotonic() - sent)
                return
            stop.wait(0.5)

    sent = time.monotonic()
    watcher = threading.Thread(target=watch, args=(sent,), daemon=True)
    watcher.start()
    try:
        headers = {"authorization": f"Bearer {created['key']}"}
        with httpx.stream("POST", f"{api_base}/v1/chat/completions", json=body, headers=headers, timeout=900) as reply:
            result.status = reply.status_code
            if reply.status_code != 200:
                result.error = reply.read().decode()[:300]
            for line in reply.iter_lines() if reply.status_code == 200 else []:
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: ") :])
                if result.ttft_s is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    result.ttft_s = time.monotonic() - sent
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    result.prompt_tokens, result.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
                    result.usage_cost_usd = usage.get("cost")
        result.total_s = time.monotonic() - sent
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        watcher.join(5 if result.status == 200 else 0)
        stop.set()
    result.replica_running_s = running_at[0] if running_at else None
    deadline = time.monotonic() + 15  # settlement runs after the stream; wait for the hold to clear
    while True:
        state = key_state(api_base, created["key"])
        if not state.get("on_hold_usd") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    result.balance_after_usd, result.hold_after_usd = state.get("credit_usd"), state.get("on_hold_usd")
    console.print(f"cold start of {model}: {result.status}, TTFT {result.ttft_s}, {result.verdict()}")
    return result


def summarize(run: Run, names: list[str], latency: list, locust_dir: Path, path: Path, title: str) -> str:
    lines = [f"# {title}", ""]
    if (locust_dir / "cluster.json").exists():  # started with --up
        cluster = json.loads((locust_dir / "cluster.json").read_text())
        ingress = ", ".join(f"{k}={v}" for k, v in cluster.get("ingress", {}).items()) or "defaults"
        lines += [f"Cluster: `{cluster['catalog']}`, engine {cluster['engine']}, ingress options: {ingress}.", ""]
    if (locust_dir / "notes.md").exists():  # findings written after the run
        lines += [(locust_dir / "notes.md").read_text().rstrip(), ""]
    lines += ["## Steps", "", "| step | users | seconds |", "| --- | --- | --- |"]
    lines += [f"| {i + 1} | {users} | {seconds:g} |" for i, (users, seconds) in enumerate(run.steps)]
    lines += ["", "## Scaling", ""]
    lines += ["| deployment | load change | RUNNING replicas | autoscaler decided after |", "| --- | --- | --- | --- |"]
    for name in names:
        lines += scaling_events(run, name)
    lines += ["", "| deployment | min | max RUNNING replicas seen |", "| --- | --- | --- |"]
    for name in names:
        counts = [s.replicas.get(name, 0) for s in run.samples if s.replicas]
        lines.append(f"| {name} | {min(counts, default=0)} | {max(counts, default=0)} |")
    lines += ["", "## Up and back down", "", "Seconds since the load started.", ""]
    lines += ["| deployment | replicas at the start | first above it | peak | back to it |"]
    lines += ["| --- | --- | --- | --- | --- |"]
    lines += [excursions(run, name) for name in names]
    lines += ["", "## Every change of RUNNING replicas", ""]
    lines += ["| deployment | at | RUNNING | target moved for it at | users then |", "| --- | --- | --- | --- | --- |"]
    for name in names:
        lines += replica_changes(run, name)
    cold = ColdStart.read(locust_dir / "cold_start.csv")
    if cold is not None:
        lines += ["", *cold.markdown()]
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


def ingress_overrides(options: list[str]) -> dict[str, Any]:
    """`--ingress key=value` options as the app's ingress settings (IngressOptions)."""
    ingress: dict[str, Any] = {}
    for option in options:
        name, _, value = option.partition("=")
        ingress[name.strip()] = float(value) if "." in value else int(value)
    return {"ingress": ingress} if ingress else {}


def main(
    steps: str = typer.Option("6:40,18:90,6:60", help="users:seconds,... (e.g. a 3x step and back)."),
    cooldown: float = typer.Option(60, help="Seconds to keep sampling after the load stops (scale-down)."),
    models: str | None = typer.Option(
        None, help="Comma-separated listings (default: all in /v1/models but the --cold-model)."
    ),
    max_tokens: int = typer.Option(32),
    stream_share: float = typer.Option(0.5),
    prompt: str = typer.Option("", help='Extra prompt text, e.g. "[[fake-tokens=48]]" for the fake engine.'),
    out: Path = typer.Option(Path("loadtest/results/stepped"), help="Output directory."),
    title: str = typer.Option("Stepped load", help="Title of summary.md."),
    report_only: bool = typer.Option(False, help="Redo plot and summary from an earlier run in --out."),
    up: Path | None = typer.Option(None, help="Start a cluster with this catalog first, and stop it at the end."),
    engine: str = typer.Option("vllm", help="With --up: vllm or fake."),
    ingress: list[str] = typer.Option(
        [], help="With --up: an ingress option as key=value (IngressOptions), e.g. target_ongoing_requests=4."
    ),
    cold_model: str | None = typer.Option(
        None, help="A listing with min_replicas 0: wait until it has no replica, then time one request to it."
    ),
    cold_wait: float = typer.Option(180, help="Seconds to wait for the --cold-model to reach zero replicas."),
    cold_max_tokens: int = typer.Option(16, help="max_tokens of the cold request."),
) -> None:
    if report_only:
        run, names = load_run(out, steps)
        if not (out / "started_at").exists():
            raise SystemExit(f"{out} holds no earlier run (started_at is missing)")
        report(run, names, out, float((out / "started_at").read_text()), title)
        return
    state_dir = default_state_dir()
    if up is not None:
        out.mkdir(parents=True, exist_ok=True)
        overrides = ingress_overrides(ingress)
        cluster = {"catalog": str(up), "engine": engine, **overrides}
        (out / "cluster.json").write_text(json.dumps(cluster, indent=1) + "\n")
        launcher.up(state_dir, catalog_path=up, engine=engine, app_overrides=overrides)
    try:
        stepped(steps, cooldown, models, max_tokens, stream_share, prompt, out, title, cold_model, cold_wait,
                cold_max_tokens)  # fmt: skip
    finally:
        if up is not None:
            launcher.down(state_dir)


def stepped(steps: str, cooldown: float, models: str | None, max_tokens: int, stream_share: float, prompt: str,
            out: Path, title: str, cold_model: str | None, cold_wait: float, cold_max_tokens: int) -> None:  # fmt: skip
    state = ClusterState.load(default_state_dir())
    if state is None:
        raise SystemExit("no running cluster found: run `tokenmart up` first")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(parse_steps(steps))
    if models is None:
        listed = httpx.get(f"{state.api_base}/v1/models", timeout=30).json()["data"]
        models = ",".join(model["id"] for model in listed if model["id"] != cold_model)
    client = launcher.serve_client(state.dashboard_url)
    if client is None:
        raise SystemExit(f"the Ray dashboard at {state.dashboard_url} does not answer")
    with contextlib.suppress(FileNotFoundError):
        (out / "cold_start.csv").unlink()  # a rerun without --cold-model reports none
    if cold_model is not None:
        cold_request(state.api_base, state.admin_token, client, cold_model, prompt, cold_max_tokens, cold_wait).write(
            out / "cold_start.csv"
        )
    key = create_load_key(state.api_base, state.admin_token)

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
