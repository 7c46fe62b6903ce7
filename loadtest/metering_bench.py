"""Metering benchmark against a running tokenmart: Redis round trips per request, and a burst.

Two measurements, against whatever `tokenmart up` started (real vLLM or `--engine fake`):

1. Round trips. A fixed number of requests of each kind (JSON, stream, refused with 429)
   is sent one after another while a MONITOR connection tallies every command Redis
   receives by where it came from: a client (one network round trip each; this includes
   the ingress) or a Lua script (runs inside Redis, no round trip). `INFO commandstats` is
   read before and after for the per-command totals and the scripts' time in Redis.
2. Burst. A key with an RPM limit gets more concurrent requests than the limit, released
   together by a barrier. Reported: admitted vs the limit, and the balance before and after
   against the sum of the `usage.cost` the responses reported.

Usage:
    python loadtest/metering_bench.py [--requests 50] [--burst 40 --rpm 25] [--out loadtest/results]
It reads the API base, admin token and Redis URL from the local cluster state
(`$TOKENMART_STATE_DIR`), or from --api-base / --admin-token / --redis-url.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tokenmart.cluster import launcher
from tokenmart.cluster.state import ClusterState, default_state_dir

console = Console()
# MONITOR lines: 1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" ... or [0 lua] "HMGET" ...
MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ (?P<source>[^\]]+)\] "(?P<command>[^"]+)"')
PROMPT = [{"role": "user", "content": "Name one prime number."}]


@dataclass
class Target:
    api_base: str
    admin_token: str
    redis_url: str
    model: str


class Monitor:
    """Counts the commands Redis executes, split into client-issued and script-issued."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.by_source: Counter[tuple[str, str]] = Counter()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._own_port: str | None = None

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        # A last command wakes the MONITOR reader so it can see the stop flag.
        self.client.ping()
        self._thread.join(10)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for event in monitor.listen():
                if self._stop.is_set():
                    return
                raw = event.get("command", "")
                source = "lua" if event.get("client_type") == "lua" else "client"
                command = raw.split(" ", 1)[0].upper()
                self.by_source[(source, command)] += 1

    def reset(self) -> None:
        self.by_source.clear()

    def client_commands(self, ignore: tuple[str, ...] = ("PING",)) -> Counter[str]:
        return Counter({c: n for (s, c), n in self.by_source.items() if s == "client" and c not in ignore})

    def script_commands(self) -> Counter[str]:
        return Counter({c: n for (s, c), n in self.by_source.items() if s == "lua"})


def commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    return {name: dict(stats) for name, stats in client.info("commandstats").items()}


def stat_delta(before: dict, after: dict) -> dict[str, tuple[int, float]]:
    """command -> (calls, usec) between two INFO commandstats readings."""
    out = {}
    for name, stats in after.items():
        calls = int(stats["calls"]) - int(before.get(name, {}).get("calls", 0))
        usec = float(stats["usec"]) - float(before.get(name, {}).get("usec", 0))
        if calls:
            out[name.removeprefix("cmdstat_")] = (calls, usec)
    return out


def create_key(target: Target, name: str, **fields: Any) -> dict[str, Any]:
    return launcher.create_key(target.api_base, target.admin_token, {"name": name, **fields})


def chat(http: httpx.Client, target: Target, key: str, *, stream: bool = False) -> tuple[int, float | None]:
    """One request; (status, reported usage.cost or None)."""
    body: dict[str, Any] = {"model": target.model, "messages": PROMPT, "max_tokens": 8, "temperature": 0}
    headers = {"authorization": f"Bearer {key}"}
    if not stream:
        response = http.post("/v1/chat/completions", json=body, headers=headers)
        cost = response.json()["usage"]["cost"] if response.status_code == 200 else None
        return response.status_code, cost
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    cost = None
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("usage") and "cost" in chunk["usage"]:
                    cost = chunk["usage"]["cost"]
        return response.status_code, cost


def measure_round_trips(target: Target, requests: int, progress: Progress) -> list[dict[str, Any]]:
    store = redis.Redis.from_url(target.redis_url, decode_responses=True)
    rows = []
    with httpx.Client(base_url=target.api_base, timeout=120) as http, Monitor(target.redis_url) as monitor:
        key = create_key(target, "bench-round-trips", credit_usd=100)["key"]
        limited = create_key(target, "bench-refused", credit_usd=100, rpm=1)["key"]
        kinds = [
            # (label, warm-up, request, expected status); the 429 warm-up spends the key's one request a minute
            ("chat, JSON", lambda: chat(http, target, key), lambda: chat(http, target, key), 200),
            ("chat, stream", lambda: chat(http, target, key), lambda: chat(http, target, key, stream=True), 200),
            ("refused (429)", lambda: chat(http, target, limited), lambda: chat(http, target, limited), 429),
        ]
        task = progress.add_task("round trips", total=requests * len(kinds))
        for label, warm_up, send, expected in kinds:
            warm_up()  # scripts loaded, connections open
            time.sleep(0.3)  # let the warm-up's settlement land before resetting
            monitor.reset()
            before = commandstats(store)
            for _ in range(requests):
                status, _ = send()
                if status != expected:
                    raise SystemExit(f"{label}: expected {expected}, got {status}")
                progress.advance(task)
            time.sleep(0.3)
            delta = stat_delta(before, commandstats(store))
            client = monitor.client_commands(ignore=("PING", "INFO"))
            scripts = delta.get("evalsha", (0, 0.0))
            rows.append(
                {
                    "kind": label,
                    "requests": requests,
                    "round_trips_per_request": sum(client.values()) / requests,
                    "client_commands": dict(client),
                    "script_commands_per_request": sum(monitor.script_commands().values()) / requests,
                    "evalsha_usec_per_call": scripts[1] / scripts[0] if scripts[0] else 0.0,
                    "commandstats": {name: calls for name, (calls, _) in delta.items()},
                }
            )
    return rows


def burst(target: Target, size: int, rpm: int, progress: Progress) -> dict[str, Any]:
    with httpx.Client(base_url=target.api_base, timeout=300) as http:
        created = create_key(target, "bench-burst", credit_usd=5, rpm=rpm, max_concurrency=size)
        key, key_id = created["key"], created["id"]
        headers = {"authorization": f"Bearer {key}"}
        before = http.get("/v1/key", headers=headers).json()
    barrier = threading.Barrier(size)
    task = progress.add_task(f"burst of {size} (limit {rpm}/min)", total=size)

    def one(_: int) -> tuple[int, float | None]:
        with httpx.Client(base_url=target.api_base, timeout=300) as http:
            barrier.wait()
            result = chat(http, target, key)
            progress.advance(task)
            return result

    started = time.monotonic()
    with ThreadPoolExecutor(size) as pool:
        results = list(pool.map(one, range(size)))
    elapsed = time.monotonic() - started
    with httpx.Client(base_url=target.api_base, timeout=60) as http:
        after = http.get("/v1/key", headers=headers).json()
    statuses = Counter(status for status, _ in results)
    reported = sum(cost for status, cost in results if status == 200 and cost is not None)
    return {
        "key_id": key_id,
        "concurrent_requests": size,
        "rpm_limit": rpm,
        "admitted": statuses.get(200, 0),
        "refused_429": statuses.get(429, 0),
        "other_statuses": {str(s): n for s, n in statuses.items() if s not in (200, 429)},
        "balance_before_usd": before["credit_usd"],
        "balance_after_usd": after["credit_usd"],
        "on_hold_after_usd": after["on_hold_usd"],
        "balance_drop_micros": round((before["credit_usd"] - after["credit_usd"]) * 1e6),
        "sum_reported_cost_micros": round(reported * 1e6),
        "seconds": round(elapsed, 2),
    }


def resolve_target(api_base: str | None, admin_token: str | None, redis_url: str | None, model: str | None) -> Target:
    state = ClusterState.load(default_state_dir())
    api_base = api_base or (state.api_base if state else None)
    admin_token = admin_token or (state.admin_token if state else None)
    redis_url = redis_url or (state.redis_url if state else None)
    if not (api_base and admin_token and redis_url):
        raise SystemExit("no running cluster found: run `tokenmart up`, or pass --api-base/--admin-token/--redis-url")
    if model is None:
        model = httpx.get(f"{api_base}/v1/models", timeout=30).json()["data"][0]["id"]
    return Target(api_base, admin_token, redis_url, model)


def main(
    requests: int = typer.Option(50, help="Requests of each kind for the round-trip count."),
    burst_size: int = typer.Option(40, "--burst", help="Concurrent requests in the burst."),
    rpm: int = typer.Option(25, help="The burst key's requests-per-minute limit."),
    model: str | None = typer.Option(None, help="Listing to call (default: the first in /v1/models)."),
    api_base: str | None = typer.Option(None, help="e.g. http://127.0.0.1:8000 (default: the local cluster)."),
    admin_token: str | None = typer.Option(None),
    redis_url: str | None = typer.Option(None),
    out: Path = typer.Option(Path("loadtest/results"), help="Where metering.json is written."),
) -> None:
    target = resolve_target(api_base, admin_token, redis_url, model)
    with Progress(console=console) as progress:
        trips = measure_round_trips(target, requests, progress)
        burst_result = burst(target, burst_size, rpm, progress)

    table = Table(title=f"Redis round trips per request ({target.model}, {requests} requests each)")
    columns = ("request", "round trips (MONITOR)", "client commands", "EVALSHA (commandstats)", "in-script commands",
               "µs per script")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("request", "client commands") else "right")
    for row in trips:
        per = row["requests"]
        commands = ", ".join(f"{name} x{count / per:.2g}" for name, count in row["client_commands"].items())
        table.add_row(
            row["kind"], f"{row['round_trips_per_request']:.2f}", commands,
            f"{row['commandstats'].get('evalsha', 0) / per:.2f}", f"{row['script_commands_per_request']:.0f}",
            f"{row['evalsha_usec_per_call']:.0f}",
        )  # fmt: skip
    console.print(table)

    b = burst_result
    summary = Table(title="burst", show_header=False)
    summary.add_row("admitted vs limit", f"{b['admitted']} of {b['concurrent_requests']} (limit {b['rpm_limit']}/min)")
    summary.add_row("refused 429 / other", f"{b['refused_429']} / {b['other_statuses'] or 0}")
    summary.add_row("balance before -> after", f"${b['balance_before_usd']:.6f} -> ${b['balance_after_usd']:.6f}")
    drop, reported = b["balance_drop_micros"], b["sum_reported_cost_micros"]
    summary.add_row("balance drop vs Σ usage.cost", f"{drop} vs {reported} µUSD")
    summary.add_row("on hold after", f"${b['on_hold_after_usd']:.6f}")
    console.print(summary)

    out.mkdir(parents=True, exist_ok=True)
    path = out / "metering.json"
    path.write_text(json.dumps({"model": target.model, "round_trips": trips, "burst": b}, indent=2))
    console.print(f"wrote {path}")
    ok = b["admitted"] == min(b["rpm_limit"], b["concurrent_requests"]) and (
        b["balance_drop_micros"] == b["sum_reported_cost_micros"]
    )
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
