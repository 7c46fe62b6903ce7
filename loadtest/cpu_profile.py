"""Where the CPU goes per output token: tokenmart against the bare engine, process by process.

`vllm_bench.py` says how far tokenmart is from the bare engine; this says why. It starts the
same two targets (`vllm_bench.start`), warms both, then runs vLLM's benchmark client once per
target (16 streams by default) and reads, from /proc through psutil, the CPU seconds every
process of the machine spent during that run. Processes are grouped by role (the engine
core and its worker, Ray Serve's replicas, HAProxy, Ray's own daemons, Redis, the benchmark
client), and each role's CPU is divided by the output tokens of the run. On the tokenmart
run, py-spy samples the ingress and engine-replica processes as well, and their samples are
grouped by the code they were in (tokenmart, Ray Serve, Ray core, asyncio, HTTP, vLLM, ...).

    python loadtest/cpu_profile.py --out loadtest/results/cpu-profile
    python loadtest/cpu_profile.py --serve-mode proxy --out /tmp/cpu-profile-proxy

Writes cpu.csv (role, target, CPU seconds, ms per output token), the replicas' collapsed
stacks (stacks-*.txt), pyspy.csv (process, code group, share of samples), summary.md and
cpu.png; `--report-only` redoes the last three from the others.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import psutil
import typer
from rich.console import Console
from vllm_bench import Scenario, run_benchmark, start

from tokenmart.cluster.serve_mode import DEFAULT_SERVE_MODE, SERVE_MODES

console = Console()
HERE = Path(__file__).resolve().parent
PY_SPY = Path(sys.executable).with_name("py-spy")

# (role, test on the process name and command line), first match wins.
ROLES: list[tuple[str, tuple[str, ...]]] = [
    ("engine core (vLLM)", ("VLLM::EngineCore",)),
    ("engine worker (vLLM)", ("VLLM::Worker",)),
    ("ingress replica", ("ServeReplica:tokenmart:MarketplaceIngress",)),
    ("engine replica (Ray Serve LLM)", ("ServeReplica:tokenmart:LLMServer",)),
    ("HAProxy", ("haproxy",)),
    ("Serve proxy / HAProxy manager", ("ProxyActor", "HAProxyManager")),
    ("Serve controller", ("ServeController",)),
    ("Ray daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env_agent")),
    ("Redis", ("redis-server",)),
    ("bare engine API server", ("vllm.entrypoints.openai.api_server",)),
    ("benchmark client", ("vllm.benchmarks.serve",)),
]

# py-spy frames, by the file they are in; the innermost frame that matches decides the group.
CODE_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("tokenmart", ("(deployments/", "/deployments/", "tokenmart/")),
    ("Ray Serve", ("ray/serve/",)),
    ("Ray core", ("ray/_private/", "ray/_raylet", "ray/util/", "ray/actor", "ray/remote_function")),
    ("HTTP (uvicorn, starlette, fastapi, h11)", ("uvicorn/", "starlette/", "fastapi/", "h11/", "httptools")),
    ("pydantic", ("pydantic",)),
    ("vLLM", ("vllm/",)),
    ("asyncio", ("asyncio/", "uvloop")),
    ("json", ("json/", "orjson")),
]


def role_of(process: psutil.Process) -> str | None:
    try:
        text = " ".join([process.name(), *process.cmdline()])
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return next((role for role, marks in ROLES if any(mark in text for mark in marks)), None)


def cpu_seconds(role_for: Callable[[psutil.Process], str | None] = role_of) -> dict[int, tuple[str, float]]:
    """Every process with a role (`role_for`), and the CPU seconds (user + system) it has used so far."""
    seen: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter():
        role = role_for(process)
        if role is None:
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        seen[process.pid] = (role, times.user + times.system)
    return seen


def spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per role between two readings (a process that started in between counts whole)."""
    totals: dict[str, float] = defaultdict(float)
    for pid, (role, seconds) in after.items():
        totals[role] += seconds - before.get(pid, (role, 0.0))[1]
    return dict(totals)


def replica_pids() -> dict[str, int]:
    pids = {}
    for process in psutil.process_iter():
        role = role_of(process)
        if role in ("ingress replica", "engine replica (Ray Serve LLM)") and role not in pids:
            pids[role] = process.pid
    return pids


def start_py_spy(pid: int, seconds: int, out: Path) -> subprocess.Popen:
    argv = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100"]
    argv += ["--format", "raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


# A sample whose innermost Python frame is a thread's `run` was in C code that thread runs
# without Python frames above it: uvloop's event loop (socket reads and writes, timers) or
# the thread Ray Serve LLM streams the engine's output on.
NATIVE_LOOP = "event loop in C (uvloop)"


def code_group(stack: str) -> str:
    frames = stack.split(";")
    if frames and frames[-1].startswith("Thread.run "):
        return NATIVE_LOOP
    for frame in reversed(frames):
        for group, marks in CODE_GROUPS:
            if any(mark in frame for mark in marks):
                return group
    return "other"


def samples_by_group(raw: Path) -> Counter:
    """py-spy's collapsed stacks ("frame;frame;... count" per line) summed per code group."""
    groups: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit() and "process_idle" not in stack:
            groups[code_group(stack)] += int(count)
    return groups


def main(
    streams: int = typer.Option(16, min=1, help="Concurrent streams."),
    num_prompts: int = typer.Option(64, min=1, help="Requests per measured run."),
    output_len: int = typer.Option(64, min=1, help="Output tokens per request."),
    serve_mode: str = typer.Option(DEFAULT_SERVE_MODE, help=f"tokenmart's serve mode: {', '.join(SERVE_MODES)}."),
    seed: int = typer.Option(5000, help="The first run's --seed; every later run takes the next."),
    out: Path = typer.Option(HERE / "results" / "cpu-profile", help="Where cpu.csv, pyspy.csv, summary.md go."),
    report_only: bool = typer.Option(False, help="Redo pyspy.csv, summary.md and cpu.png from an earlier run."),
) -> None:
    if report_only:
        report(out)
        return
    if serve_mode not in SERVE_MODES:
        raise typer.BadParameter(f"--serve-mode must be one of {', '.join(SERVE_MODES)}")
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tokenmart-cpu-profile-"))
    measured = Scenario("stream", streams, 128, output_len, num_prompts)
    warm = Scenario("warm", streams, 128, 16, 16)
    rows: list[dict] = []
    with ExitStack() as stack:
        endpoints, listing = start(workdir, stack, None, {}, None, serve_mode)  # type: ignore[arg-type]  # checked
        tokenizer = listing.resolved_source(None)
        for target, endpoint in endpoints.items():
            console.print(f"warming up {target}")
            run_benchmark(endpoint, warm, seed, tokenizer, workdir / f"warm-{target}.json", workdir / "warm.log")
            seed += 1
        for target, endpoint in endpoints.items():
            console.print(f"measuring {target}: {streams} streams, {num_prompts} requests")
            spies = {}
            if target == "tokenmart":
                # Long enough for the run; py-spy stops when its duration is over.
                spies = {r: (start_py_spy(p, 600, workdir / f"{p}.txt"), p) for r, p in replica_pids().items()}
            before = cpu_seconds()
            data = run_benchmark(endpoint, measured, seed, tokenizer, out / f"{target}.json", workdir / "run.log")
            after = cpu_seconds()
            seed += 1
            for role, (spy, pid) in spies.items():
                spy.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
                spy.wait(timeout=60)
                (workdir / f"{pid}.txt").replace(out / stacks_file(role))
            tokens = data["total_output_tokens"]
            for role, seconds in sorted(spent(before, after).items(), key=lambda item: -item[1]):
                rows.append(
                    {
                        "target": target,
                        "role": role,
                        "cpu_s": round(seconds, 2),
                        "ms_per_output_token": round(1000 * seconds / tokens, 3),
                        "output_tok_s": round(data["output_throughput"], 2),
                        "output_tokens": tokens,
                    }
                )
    write_csv(out / "cpu.csv", rows)
    (out / "run.json").write_text(json.dumps({"serve_mode": serve_mode, "streams": streams,
                                              "num_prompts": num_prompts, "output_len": output_len}))  # fmt: skip
    report(out)
    console.print(f"[green]wrote[/] {out}; logs in {workdir}")


def stacks_file(role: str) -> str:
    return "stacks-" + role.split(" (")[0].replace(" ", "-") + ".txt"


def report(out: Path) -> None:
    """pyspy.csv, summary.md and cpu.png from cpu.csv, run.json and the collapsed stacks."""
    with (out / "cpu.csv").open() as f:
        rows = [{**r, "cpu_s": float(r["cpu_s"]), "ms_per_output_token": float(r["ms_per_output_token"]),
                 "output_tokens": int(r["output_tokens"])} for r in csv.DictReader(f)]  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    spy_rows: list[dict] = []
    for role in ("ingress replica", "engine replica (Ray Serve LLM)"):
        path = out / stacks_file(role)
        if not path.exists():
            continue
        groups = samples_by_group(path)
        total = sum(groups.values()) or 1
        spy_rows += [
            {"process": role, "code": group, "samples": count, "share": round(count / total, 4)}
            for group, count in groups.most_common()
        ]
    write_csv(out / "pyspy.csv", spy_rows)
    text = summary(rows, spy_rows, run["serve_mode"], run["streams"], run["num_prompts"], run["output_len"])
    (out / "summary.md").write_text(text)
    plot(out / "cpu.png", rows)
    sys.stdout.write(text)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def summary(rows: list[dict], spy_rows: list[dict], mode: str, streams: int, prompts: int, output_len: int) -> str:
    by_target: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_target[row["target"]].append(row)
    lines = [
        "# CPU per output token, by process role",
        "",
        f"One run per target of vLLM's benchmark client, {streams} streams, {prompts} requests of 128 tokens in and "
        f"{output_len} out, after a warm-up; tokenmart in serve mode `{mode}`. CPU seconds are user + system "
        "from /proc for every process of the machine with a role, over the run (the idle target's processes "
        f"included). Machine: {os.cpu_count()} cores.",
        "",
        "| target | output tok/s | role | CPU s | CPU ms per output token |",
        "| --- | --- | --- | --- | --- |",
    ]
    for target, target_rows in by_target.items():
        total = sum(r["cpu_s"] for r in target_rows)
        tokens = target_rows[0]["output_tokens"]
        for row in target_rows:
            lines.append(
                f"| {target} | {row['output_tok_s']} | {row['role']} | {row['cpu_s']} | {row['ms_per_output_token']} |"
            )
        lines.append(f"| {target} | | **all** | {total:.2f} | {1000 * total / tokens:.3f} |")
    if spy_rows:
        lines += ["", "## py-spy on tokenmart's replicas (share of non-idle samples, innermost known frame)", ""]
        lines += ["| process | code | samples | share |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['process']} | {r['code']} | {r['samples']} | {r['share']:.1%} |" for r in spy_rows]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(r["target"] for r in rows))
    roles = list(dict.fromkeys(r["role"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    left = [0.0] * len(targets)
    for role in roles:
        widths = [next((r["ms_per_output_token"] for r in rows if r["target"] == t and r["role"] == role), 0.0)
                  for t in targets]  # fmt: skip
        ax.barh(targets, widths, left=left, label=role)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("CPU ms per output token (all processes)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Where the CPU goes, per output token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    typer.run(main)
