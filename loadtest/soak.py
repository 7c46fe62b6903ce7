"""Soak test against a running local tokenmart: steady mixed load with one Redis restart.

For `--minutes` minutes, `--users` threads send chat requests through the official `openai`
client. Half of them stream, and a tenth of the streams (5% of all requests) hang up after
two chunks. Halfway through, the local Redis that `tokenmart up` started is shut down
(SHUTDOWN SAVE), then started again on the same port `--outage-s` seconds later.

Afterwards the script waits until every hold is settled (spooled settlements replayed), and
then checks the books three ways:
- the ledger equals the counters and the balances (`tokenmart reconcile`, via the admin API);
- usage equals the engine's own token counters: vLLM's prompt and generation tokens from
  Ray's metrics export, before and after the run;
- outside the outage, under 0.1% of requests failed.

It writes soak.csv (one row a request), soak.png (requests and failures over time, with the
outage shaded) and report.md into `--out`.

Usage: python loadtest/soak.py --minutes 10 --users 3 --out loadtest/results/soak
"""

from __future__ import annotations

import csv
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tokenmart.cluster import launcher
from tokenmart.cluster.state import ClusterState, default_state_dir

console = Console()
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain what a CPU does in one sentence.",
    "Write a haiku about rain.",
    "What is 12 times 12?",
]


@dataclass
class Outcome:
    started: float
    seconds: float
    kind: str  # json | stream | abort
    status: int  # HTTP status; 0 for a transport error
    code: str


def engine_tokens(metrics_url: str) -> tuple[float, float]:
    """vLLM's prompt and generation token counters, summed over engines."""
    prompt = generation = 0.0
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name == "ray_vllm_prompt_tokens_total":
                prompt += sample.value
            elif sample.name == "ray_vllm_generation_tokens_total":
                generation += sample.value
    return prompt, generation


def settled_engine_tokens(metrics_url: str, quiet_s: float = 20.0, timeout_s: float = 180.0) -> tuple[float, float]:
    """The engine's counters once they have stopped moving: Ray's metrics agent exports them
    every few seconds, and vLLM reports its stats on its own interval, so one read right after
    the load can miss the last steps."""
    last, still_since = engine_tokens(metrics_url), time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and time.monotonic() - still_since < quiet_s:
        time.sleep(2.5)
        now = engine_tokens(metrics_url)
        if now != last:
            last, still_since = now, time.monotonic()
    return last


def one_request(client: openai.OpenAI, model: str, rng: random.Random, start: float) -> Outcome:
    kind = rng.choices(["json", "stream", "abort"], weights=[50, 45, 5])[0]
    messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    max_tokens = rng.randint(8, 32)
    begun = time.monotonic()
    try:
        if kind == "json":
            client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        else:
            stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True)
            for index, _ in enumerate(stream):
                if kind == "abort" and index == 1:
                    stream.close()  # the client hangs up mid-stream
                    break
        status, code = 200, ""
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        status, code = exc.status_code, str((body.get("error") or body).get("code", ""))
    except openai.APIError as exc:  # a stream that ended with an error event, or a transport error
        status, code = 0, type(exc).__name__
    return Outcome(begun - start, time.monotonic() - begun, kind, status, code)


def main(
    minutes: float = typer.Option(10.0, help="How long the load runs."),
    users: int = typer.Option(3, help="Concurrent clients."),
    outage_s: float = typer.Option(20.0, help="Seconds Redis stays down in the middle."),
    model: str = typer.Option("smollm2-135m-instruct"),
    out: Path = typer.Option(Path("loadtest/results/soak")),
    state_dir: Path | None = typer.Option(None, help="Local cluster state (default: $TOKENMART_STATE_DIR)."),
    seed: int = typer.Option(7),
) -> None:
    state_dir = state_dir or default_state_dir()
    state = ClusterState.load(state_dir)
    if state is None or not state.redis_managed or not state.metrics_url:
        raise typer.BadParameter("needs a local cluster from `tokenmart up` that started its own Redis")
    admin = httpx.Client(base_url=state.api_base, headers={"authorization": f"Bearer {state.admin_token}"}, timeout=60)
    created = admin.post("/admin/v1/keys", json={"name": "soak", "credit_usd": 100}).json()
    client = openai.OpenAI(base_url=f"{state.api_base}/v1", api_key=created["key"], max_retries=0, timeout=120)
    metrics_url = state.metrics_url
    engine_before = engine_tokens(metrics_url)
    port = int(state.redis_url.rsplit(":", 1)[1].split("/")[0])

    duration = minutes * 60
    start = time.monotonic()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    outage: list[float] = []

    def user(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() - start < duration:
            outcome = one_request(client, model, rng, start)
            with lock:
                outcomes.append(outcome)

    def restart_redis() -> None:
        time.sleep(duration / 2)
        outage.append(time.monotonic() - start)
        launcher.stop_redis(state.redis_url)
        time.sleep(outage_s)
        launcher.start_redis(state_dir, port=port)
        outage.append(time.monotonic() - start)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    threads.append(threading.Thread(target=restart_redis, daemon=True))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("soak", total=duration)
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads[:-1]):
            with lock:
                done, failed = len(outcomes), sum(o.status != 200 for o in outcomes)
            progress.update(task, completed=min(time.monotonic() - start, duration),
                            description=f"soak: {done} requests, {failed} failed")  # fmt: skip
            time.sleep(1)
        threads[-1].join()

    # Settlements spooled during the outage are replayed within seconds; wait for no holds.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        account = admin.get(f"/admin/v1/keys/{created['id']}").json()
        if account["on_hold_usd"] == 0:
            break
        time.sleep(2)
    engine_after = settled_engine_tokens(metrics_url)
    reconcile = admin.get("/admin/v1/reconcile").json()
    usage = admin.get("/admin/v1/usage", params={"key_id": created["id"]}).json()["total"]
    report(out, outcomes, outage, outage_s, usage, reconcile, engine_before, engine_after, minutes, users, account)


def report(out, outcomes, outage, outage_s, usage, reconcile, engine_before, engine_after, minutes, users, account):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "soak.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["started_s", "seconds", "kind", "status", "code"])
        for o in sorted(outcomes, key=lambda o: o.started):
            writer.writerow([f"{o.started:.3f}", f"{o.seconds:.3f}", o.kind, o.status, o.code])

    down, up = outage
    # The outage window: from the shutdown to 10 s after Redis is back (pooled connections
    # reconnect, the spool replays); requests that started in it may fail by design.
    in_outage = [o for o in outcomes if down <= o.started <= up + 10 or down <= o.started + o.seconds <= up + 10]
    outside = [o for o in outcomes if o not in in_outage]
    failed_outside = [o for o in outside if o.status != 200]
    failed_in = [o for o in in_outage if o.status != 200]
    rate = len(failed_outside) / max(len(outside), 1)
    engine_prompt = engine_after[0] - engine_before[0]
    engine_generated = engine_after[1] - engine_before[1]

    seconds = int(max(o.started for o in outcomes)) + 1
    per_s = [0] * seconds
    fail_s = [0] * seconds
    for o in outcomes:
        per_s[int(o.started)] += 1
        fail_s[int(o.started)] += o.status != 200
    figure, axis = plt.subplots(figsize=(10, 4))
    window = 10
    smooth = [sum(per_s[max(0, i - window + 1) : i + 1]) / window for i in range(seconds)]
    axis.plot(range(seconds), smooth, label=f"requests/s ({window} s mean)")
    axis.bar(range(seconds), fail_s, color="red", label="failed requests", width=1.0)
    axis.axvspan(down, up, color="orange", alpha=0.3, label="Redis down")
    axis.set_xlabel("seconds since start")
    axis.legend()
    axis.set_title(f"tokenmart soak: {minutes:g} min, {users} users, one Redis restart")
    figure.tight_layout()
    figure.savefig(out / "soak.png", dpi=120)

    # A request drawn to hang up does so only if its stream began; in the outage it got a 503 first.
    drawn_to_hang_up = sum(o.kind == "abort" for o in outcomes)
    hung_up = sum(o.kind == "abort" and o.status == 200 for o in outcomes)
    lines = [
        f"# Soak: {minutes:g} minutes, {users} users, Redis down for {outage_s:g} s in the middle",
        "",
        f"- Requests: {len(outcomes)} ({sum(o.kind != 'json' for o in outcomes)} streams; {hung_up} hung up "
        f"after two chunks, and {drawn_to_hang_up - hung_up} more drawn to hang up got an error before their "
        "stream began).",
        f"- Redis down from {down:.0f} s to {up:.0f} s. Requests failed in that window (to 10 s after): "
        f"{len(failed_in)} of {len(in_outage)}, with codes {sorted({o.code or str(o.status) for o in failed_in})}.",
        f"- Outside it: {len(failed_outside)} failed of {len(outside)}, "
        f"an error rate of {rate:.4%} (goal: under 0.1%).",
        f"- Billed (the key's usage counters): {usage['requests']} requests, {usage['prompt_tokens']} prompt and "
        f"{usage['completion_tokens']} completion tokens, ${usage['cost_usd']:.6f}; on hold afterwards: "
        f"${account['on_hold_usd']:.6f}.",
        f"- The engine's own counters (vLLM, Ray metrics export) over the run: {engine_prompt:.0f} prompt and "
        f"{engine_generated:.0f} generated tokens.",
        f"  - prompt tokens billed / engine: {usage['prompt_tokens']} / {engine_prompt:.0f}",
        f"  - completion tokens billed / engine: {usage['completion_tokens']} / {engine_generated:.0f}; "
        f"billed ≤ engine: {'yes' if usage['completion_tokens'] <= engine_generated else '**NO**'} "
        "(a stream the client hangs up is billed for what it was sent; the engine may have generated "
        "a few more tokens before it was stopped)",
        f"- Reconciliation (ledger = counters = balances): {'ok' if reconcile['ok'] else 'DIFFERENCES'} over "
        f"{len(reconcile['keys'])} keys{'' if reconcile['ok'] else ': ' + str(reconcile['differences'])[:500]}.",
        "",
        "![soak](soak.png)",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
