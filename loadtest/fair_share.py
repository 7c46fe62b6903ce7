"""Fair share on the fake engine: served shares by tier, and a premium key's TTFT under overload.

The goal it measures (the fair-share issue): on a fake engine with `max_ongoing_requests: 2`,
three keys flooding at tier weights 1/2/4 are served within ±10% of their weights' shares, and
a tier-4 key's p99 TTFT at twice the saturating load is at most 1.5x its unloaded p99 TTFT.

One local Ray cluster (started in this process, as the integration tests start theirs) with a
real `redis-server`, ONE ingress replica and, side by side on the fake engine, one replica
each of:

| listing | what it is |
| --- | --- |
| `fair-chat` | `fair_share: {concurrency: 2, deadline_s: 30}`, `max_ongoing_requests: 2` |
| `fifo-chat` | the same without `fair_share`: Ray Serve's own first-come queue (the baseline) |
| `fair-deep` (`--deep`) | `fair-chat` with `max_queued_requests: 1024` (see below) |

Why `fair-deep`: the ingress sheds a request at once when the requests it has admitted to a
deployment and not settled fill the deployment's capacity (`max_ongoing_requests` x replicas +
`max_queued_requests`, 66 here), and fair-queue waiters count among them. Under open-loop
overload the flood fills that, and premium is then refused like everyone else before the fair
queue can order it; `fair-deep` shows the fair queue's own behaviour without that cap.

Tiers: free 1, standard 2, premium 4; one key per tier. Every request streams `--max-tokens`
tokens, one every `--token-delay-s`.

1. Shares: each key keeps `--clients` requests outstanding (closed loop) on a listing; the
   completions per key ending inside the saturated window (after `--warmup-s`) give its
   share, against weight / 7. Their sum per second is the listing's saturating throughput.
2. Latency: the premium key alone at `--premium-rps` (fixed intervals, so its requests never
   overlap: unloaded), then again while free and standard each send open loop at the
   saturating throughput (twice the saturating load together; the higher of the fair and
   FIFO listings' throughputs, so both get the same offered load). Premium's TTFT is taken
   from requests sent after `--settle-s` of load, once the queue has built up.

Writes `results.json` and `fair_share.png` to `--out` and prints a table. Takes about four
minutes on a 2-core machine.

    flock /tmp/cluster.lock nice -n 5 .venv/bin/python loadtest/fair_share.py
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis
import typer
from bench_load import Sample, one_request, percentile
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokenmart.cluster.launcher import free_port
from tokenmart.deployments.catalog import Catalog
from tokenmart.deployments.request_id import PROXY_ENV

HERE = Path(__file__).parent
console = Console()
TIERS = {"free": 1, "standard": 2, "premium": 4}
FAIR, FIFO, DEEP = "fair-chat", "fifo-chat", "fair-deep"
SHARE_GOAL = 0.10  # served share within ±10% (relative) of weight / sum of weights
TTFT_GOAL = 1.5  # premium's loaded p99 TTFT at most this times its unloaded p99
READY_TIMEOUT_S = 300.0


def catalog(deep: bool, concurrency: int, deadline_s: float) -> Catalog:
    def listing(model_id: str, fair: bool, max_queued: int | None = None) -> dict[str, Any]:
        scaling: dict[str, Any] = {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 2}
        if max_queued is not None:
            scaling["max_queued_requests"] = max_queued
        entry: dict[str, Any] = {
            "id": model_id,
            "owner": "bench",
            "source": f"fake/{model_id}",
            "context_length": 4096,
            "pricing": {"prompt_usd_per_1m": "0.1", "completion_usd_per_1m": "0.2"},
            "default_max_tokens": 16,
            "accelerator": {"kind": "cpu"},
            "autoscaling": scaling,
        }
        if fair:
            entry["fair_share"] = {"concurrency": concurrency, "deadline_s": deadline_s}
        return entry

    listings = [listing(FAIR, True), listing(FIFO, False)]
    if deep:
        listings.append(listing(DEEP, True, max_queued=1024))
    return Catalog.model_validate({"listings": listings, "tiers": TIERS, "default_tier": "standard"})


# -- the cluster ---------------------------------------------------------------------------------


@contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free loopback port; yields its URL."""
    data_dir = Path(tempfile.mkdtemp(prefix="tokenmart-fair-redis-"))
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*argv, "--dir", str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def marketplace(
    cat: Catalog, redis_url: str, token_delay_s: float, max_tokens: int, env: dict[str, str]
) -> Iterator[tuple[str, str]]:
    """Ray + Serve + the app on the fake engine in this process, one ingress replica; yields
    (base URL, admin token). `env` goes into every Ray worker's environment. Everything is shut
    down on exit."""
    import ray
    from ray import serve

    from tokenmart.deployments.app import AppArgs, build_app

    admin_token = "adm-" + secrets.token_urlsafe(24)
    os.environ["TOKENMART_ADMIN_TOKEN"] = admin_token
    os.environ.update(PROXY_ENV)
    os.environ.pop("RAY_AUTH_MODE", None)  # ray.init picks the mode of its new local cluster
    try:
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"TOKENMART_ADMIN_TOKEN": admin_token, **env}},
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(
            AppArgs(
                catalog=cat,
                engine="fake",
                redis_url=redis_url,
                fake_engine={"token_delay_s": token_delay_s, "reply_tokens": max_tokens},
                # One ingress replica: the fair queue is per replica. Its door limit is raised so
                # the deep listing's backlog is never shed at the door (the others are shed by
                # their deployment's capacity, 66, long before 128).
                ingress={"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 2048},
                # Limits never reached: the queues are what is measured.
                default_limits={"rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrency": 10_000},
            )
        )
        serve.run(app, name="tokenmart", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the app did not become healthy")
            time.sleep(0.2)
        yield base, admin_token
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def create_keys(base: str, admin_token: str) -> dict[str, str]:
    keys = {}
    for tier in TIERS:
        response = httpx.post(
            f"{base}/admin/v1/keys",
            json={"name": f"fair-{tier}", "credit_usd": 100, "tier": tier},
            headers={"authorization": f"Bearer {admin_token}"},
            timeout=30,
        )
        response.raise_for_status()
        assert response.json()["tier"] == tier, response.text
        keys[tier] = response.json()["key"]
    return keys


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Load:
    base: str
    keys: dict[str, str]
    max_tokens: int

    def client(self, tier: str, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"{self.base}/v1",
            headers={"authorization": f"Bearer {self.keys[tier]}"},
            timeout=120.0,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def body(self, model: str, tier: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": f"a turn for {tier} [[fake-tokens={self.max_tokens}]]"}],
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


async def closed_loop(load: Load, model: str, clients: int, seconds: float) -> dict[str, list[Sample]]:
    """Every tier's key keeps `clients` requests outstanding for `seconds`; the requests still
    running then are cancelled (the client hangs up)."""
    samples: dict[str, list[Sample]] = {tier: [] for tier in TIERS}
    http = {tier: load.client(tier, clients) for tier in TIERS}
    stop = time.perf_counter() + seconds

    async def loop(tier: str) -> None:
        body = load.body(model, tier)
        while time.perf_counter() < stop:
            samples[tier].append(await one_request(http[tier], body))

    tasks = [asyncio.create_task(loop(tier)) for tier in TIERS for _ in range(clients)]
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in http.values():
        await client.aclose()
    return samples


async def open_loop(
    load: Load, model: str, rates: dict[str, float], seconds: float, drain_s: float
) -> dict[str, list[Sample]]:
    """Each tier sends at its rate (fixed intervals, the tiers' phases spread) for `seconds`,
    whether or not earlier requests have ended. Premium's requests are waited for (at most
    `drain_s`); the others still running after that are cancelled."""
    http = {tier: load.client(tier, 2048) for tier in rates}
    began = time.perf_counter()
    tasks: dict[str, list[asyncio.Task]] = {tier: [] for tier in rates}

    async def send(tier: str, rate: float, phase: float) -> None:
        body = load.body(model, tier)
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, began + (i + phase) / rate - time.perf_counter()))
            tasks[tier].append(asyncio.create_task(one_request(http[tier], body)))

    await asyncio.gather(*(send(tier, rate, n / len(rates)) for n, (tier, rate) in enumerate(rates.items())))
    watched = tasks.get("premium") or [t for ts in tasks.values() for t in ts]
    await asyncio.wait(watched, timeout=drain_s)
    samples: dict[str, list[Sample]] = {}
    for tier, sent in tasks.items():
        for task in sent:
            task.cancel()
        results = await asyncio.gather(*sent, return_exceptions=True)
        # A request cancelled here never ended: it is counted as neither served nor refused.
        samples[tier] = [r for r in results if isinstance(r, Sample)]
    for client in http.values():
        await client.aclose()
    return samples


# -- what a phase measured -----------------------------------------------------------------------


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def shares(samples: dict[str, list[Sample]], began: float, warmup_s: float, window_s: float) -> dict[str, Any]:
    start, end = began + warmup_s, began + warmup_s + window_s
    done = {
        tier: sum(1 for s in got if s.status == 200 and start <= s.start + s.latency_s < end)
        for tier, got in samples.items()
    }
    total = sum(done.values()) or 1
    weights = sum(TIERS.values())
    per_tier = {}
    for tier, count in done.items():
        target = TIERS[tier] / weights
        share = count / total
        per_tier[tier] = {
            "completions": count,
            "share": round(share, 4),
            "target": round(target, 4),
            "relative_error": round(share / target - 1, 4),
            "statuses": dict(Counter(str(s.status) for s in samples[tier])),
        }
    max_error = max(abs(t["relative_error"]) for t in per_tier.values())
    return {
        "window_s": window_s,
        "tiers": per_tier,
        "max_relative_error": round(max_error, 4),
        "goal_met": max_error <= SHARE_GOAL,
        "saturating_rps": round(sum(done.values()) / window_s, 2),
    }


def ttft_summary(samples: list[Sample], since: float | None = None) -> dict[str, Any]:
    chosen = [s for s in samples if since is None or s.start >= since]
    served = [s.ttft_s for s in chosen if s.status == 200 and s.ttft_s is not None]
    return {
        "sent": len(chosen),
        "served": len(served),
        "statuses": dict(Counter(str(s.status) for s in chosen)),
        "ttft_p50_ms": ms(percentile(served, 50)),
        "ttft_p99_ms": ms(percentile(served, 99)),
        "ttft_ms": sorted(ms(v) for v in served),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    listings = results["listings"]
    colors = {FAIR: "tab:blue", FIFO: "tab:gray", DEEP: "tab:green"}
    has_latency = any("latency" in entry for entry in listings.values())
    fig, axes = plt.subplots(1, 2 if has_latency else 1, figsize=(13 if has_latency else 7, 5), squeeze=False)
    left = axes[0][0]
    tiers = list(TIERS)
    with_shares = [m for m in listings if "shares" in listings[m]]
    width = 0.8 / len(with_shares)
    for i, model in enumerate(with_shares):
        got = [listings[model]["shares"]["tiers"][t]["share"] for t in tiers]
        xs = [x + (i - (len(with_shares) - 1) / 2) * width for x in range(len(tiers))]
        error = listings[model]["shares"]["max_relative_error"]
        left.bar(xs, got, width, color=colors[model], label=f"{model} (max error {error:+.0%})")
    for x, tier in enumerate(tiers):
        target = TIERS[tier] / sum(TIERS.values())
        left.hlines(target, x - 0.45, x + 0.45, colors="black", linestyles="dashed")
        left.fill_between([x - 0.45, x + 0.45], target * 0.9, target * 1.1, color="black", alpha=0.08)
    left.set_xticks(range(len(tiers)), [f"{t} (weight {TIERS[t]})" for t in tiers])
    left.set_ylabel("share of completions in the saturated window")
    left.set_title("Served shares (dashed: weight / 7, band: ±10%)")
    left.legend()

    if has_latency:
        premium_cdf(listings, colors, axes[0][1], results["config"]["loaded_rps_per_flooding_tier"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def premium_cdf(listings: dict[str, Any], colors: dict[str, str], right: Any, offered: float) -> None:
    for model, entry in listings.items():
        if "latency" not in entry:
            continue
        for phase, style in (("unloaded", ":"), ("loaded", "-")):
            values = entry["latency"][phase]["ttft_ms"]
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            p99 = entry["latency"][phase]["ttft_p99_ms"]
            label = f"{model} {phase} (p99 {p99:.0f} ms, {entry['latency'][phase]['served']} served)"
            right.step(values, ys, where="post", linestyle=style, color=colors[model], label=label)
    right.set_xscale("log")
    right.set_xlabel("premium TTFT (ms, log scale)")
    right.set_ylabel("fraction of premium's served requests")
    right.set_title(f"Premium TTFT: alone, and with free + standard\nat {offered:.1f} rps each (2x saturation)")
    right.legend(fontsize=8, loc="lower right")


def table(results: dict[str, Any]) -> Table:
    listings = results["listings"]
    out = Table(title="Fair share on the fake engine (max_ongoing_requests 2, one ingress replica)")
    out.add_column("figure")
    for model in listings:
        out.add_column(model, justify="right")
    out.add_column("fair ÷ fifo", justify="right")

    def row(name: str, values: dict[str, Any], ratio: bool = True, fmt: str = "{}") -> None:
        cells = [fmt.format(values[m]) if values.get(m) is not None else "-" for m in listings]
        fair, fifo = values.get(FAIR), values.get(FIFO)
        quotient = f"{fair / fifo:.2f}x" if ratio and isinstance(fair, float | int) and fifo else ""
        out.add_row(name, *cells, quotient)

    for tier in TIERS:
        values = {m: e["shares"]["tiers"][tier]["share"] for m, e in listings.items() if "shares" in e}
        target = TIERS[tier] / sum(TIERS.values())
        row(f"share {tier} (target {target:.3f})", values, fmt="{:.3f}")
    values = {m: e["shares"]["max_relative_error"] for m, e in listings.items() if "shares" in e}
    row(f"max relative error (goal ≤ {SHARE_GOAL:.0%})", values, ratio=False, fmt="{:.1%}")
    values = {m: e["shares"]["saturating_rps"] for m, e in listings.items() if "shares" in e}
    row("saturating throughput (rps)", values, fmt="{:.1f}")
    if not all("latency" in e for e in listings.values()):
        return out
    for phase in ("unloaded", "loaded"):
        for q in ("p50", "p99"):
            values = {m: e["latency"][phase][f"ttft_{q}_ms"] for m, e in listings.items()}
            row(f"premium TTFT {q} {phase} (ms)", values, fmt="{:.1f}")
        values = {m: f"{e['latency'][phase]['served']}/{e['latency'][phase]['sent']}" for m, e in listings.items()}
        row(f"premium served/sent {phase}", values, ratio=False)
    values = {m: e["latency"]["p50_ratio"] for m, e in listings.items()}
    row("premium p50 loaded ÷ unloaded", values, fmt="{:.2f}x")
    values = {m: e["latency"]["p99_ratio"] for m, e in listings.items()}
    row(f"premium p99 loaded ÷ unloaded (goal ≤ {TTFT_GOAL})", values, fmt="{:.2f}x")
    for tier in ("free", "standard"):
        values = {m: " ".join(f"{k}:{v}" for k, v in sorted(e["latency"]["flood"][tier].items())) for m, e in
                  listings.items()}  # fmt: skip
        row(f"{tier} statuses under load", values, ratio=False)
    return out


def main(
    out: Path = typer.Option(HERE / "results" / "fair-share", help="Output directory."),
    token_delay_s: float = typer.Option(0.01, help="Seconds between the fake engine's tokens."),
    max_tokens: int = typer.Option(16, help="Tokens of every reply."),
    clients: int = typer.Option(16, help="Outstanding requests per key in the shares phase."),
    warmup_s: float = typer.Option(3.0, help="Seconds of closed-loop load before the shares window."),
    window_s: float = typer.Option(15.0, help="The shares window (seconds)."),
    premium_rps: float = typer.Option(4.0, help="Premium's light rate, alone and under load."),
    unloaded_s: float = typer.Option(15.0, help="Seconds of premium alone."),
    loaded_s: float = typer.Option(20.0, help="Seconds of twice the saturating load."),
    settle_s: float = typer.Option(5.0, help="Seconds of load before premium's requests count."),
    deep: bool = typer.Option(True, help="Also measure fair-deep (fair-chat with max_queued_requests 1024)."),
    latency: bool = typer.Option(True, help="Run the latency phase (without it: shares only)."),
    env: list[str] = typer.Option([], help="KEY=VALUE in the environment of the Ray workers (Serve's knobs)."),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cat = catalog(deep and latency, concurrency=2, deadline_s=30)
    env_vars = dict(item.split("=", 1) for item in env)
    models = [listing.id for listing in cat.listings]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    listings: dict[str, dict[str, Any]] = {m: {} for m in models}
    console.print("starting redis-server, Ray, Serve and the app (one ingress replica)")
    with (
        redis_server() as redis_url,
        marketplace(cat, redis_url, token_delay_s, max_tokens, env_vars) as (base, admin_token),
    ):
        load = Load(base, create_keys(base, admin_token), max_tokens)
        share_models = [FAIR, FIFO]
        steps = len(share_models) + 2 * len(models) * latency
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as progress:  # fmt: skip
            task = progress.add_task("warm-up", total=steps)
            for model in models:  # first requests pay for connections and caches
                asyncio.run(open_loop(load, model, {tier: 2.0 for tier in TIERS}, 2.0, 10.0))
            for model in share_models:
                progress.update(task, description=f"shares: {model}, {clients} streams per key")
                began = time.perf_counter()
                got = asyncio.run(closed_loop(load, model, clients, warmup_s + window_s))
                listings[model]["shares"] = shares(got, began, warmup_s, window_s)
                progress.advance(task)
                time.sleep(2)  # the cancelled requests settle
            rate = max(listings[m]["shares"]["saturating_rps"] for m in share_models)
            for model in models if latency else []:
                progress.update(task, description=f"latency: {model}, premium alone at {premium_rps} rps")
                alone = asyncio.run(open_loop(load, model, {"premium": premium_rps}, unloaded_s, 30.0))
                listings[model]["latency"] = {"unloaded": ttft_summary(alone["premium"])}
                progress.advance(task)
                progress.update(task, description=f"latency: {model}, free + standard at {rate:.1f} rps each")
                began = time.perf_counter()
                loaded = asyncio.run(
                    open_loop(load, model, {"free": rate, "standard": rate, "premium": premium_rps}, loaded_s, 40.0)
                )
                latency = listings[model]["latency"]
                latency["loaded"] = ttft_summary(loaded["premium"], since=began + settle_s)
                latency["flood"] = {t: dict(Counter(str(s.status) for s in loaded[t])) for t in ("free", "standard")}
                unloaded_p99, loaded_p99 = latency["unloaded"]["ttft_p99_ms"], latency["loaded"]["ttft_p99_ms"]
                ratio = loaded_p99 / unloaded_p99 if loaded_p99 and unloaded_p99 else None
                latency["p99_ratio"] = None if ratio is None else round(ratio, 2)
                p50s = latency["unloaded"]["ttft_p50_ms"], latency["loaded"]["ttft_p50_ms"]
                latency["p50_ratio"] = round(p50s[1] / p50s[0], 2) if all(p50s) else None
                latency["goal_met"] = ratio is not None and ratio <= TTFT_GOAL
                progress.advance(task)
                time.sleep(3)  # the cancelled flood settles before the next listing
    results = {
        "started": started,
        "config": {
            "engine": "fake",
            "token_delay_s": token_delay_s,
            "max_tokens": max_tokens,
            "max_ongoing_requests": 2,
            "fair_share": {"concurrency": 2, "deadline_s": 30},
            "ingress_replicas": 1,
            "tiers": TIERS,
            "clients_per_key": clients,
            "warmup_s": warmup_s,
            "window_s": window_s,
            "premium_rps": premium_rps,
            "unloaded_s": unloaded_s,
            "loaded_s": loaded_s,
            "settle_s": settle_s,
            "saturating_rps": rate,
            "loaded_rps_per_flooding_tier": rate,
            "cpus": os.cpu_count(),
            "ray_worker_env": env_vars,
        },
        "goals": {"share_max_relative_error": SHARE_GOAL, "premium_ttft_p99_ratio": TTFT_GOAL},
        "listings": listings,
    }
    fair, fifo = listings[FAIR], listings[FIFO]
    results["fair_vs_fifo"] = {
        "max_relative_error": [fair["shares"]["max_relative_error"], fifo["shares"]["max_relative_error"]],
        "saturating_rps": [fair["shares"]["saturating_rps"], fifo["shares"]["saturating_rps"]],
    }
    if latency:
        results["fair_vs_fifo"]["premium_loaded_ttft_p99_ms"] = [
            fair["latency"]["loaded"]["ttft_p99_ms"],
            fifo["latency"]["loaded"]["ttft_p99_ms"],
        ]
        results["fair_vs_fifo"]["premium_p99_ratio"] = [fair["latency"]["p99_ratio"], fifo["latency"]["p99_ratio"]]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "fair_share.png")
    console.print(table(results))
    console.print(f"wrote {out / 'results.json'} and {out / 'fair_share.png'}")


if __name__ == "__main__":
    typer.run(main)
