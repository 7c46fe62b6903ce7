"""Bring a local tokenmart cluster up and down: Redis, a Ray head, and the Serve app.

`up` deploys through a Serve config whose `import_path` is the app builder, exactly the
path the Helm chart's serveConfigV2 takes, so local and Kubernetes deployments differ only
in where the config is sent.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tokenmart.deployments.catalog import BUILTIN_PREFIX, Catalog, load_catalog
from tokenmart.deployments.config import (
    ADMIN_TOKEN_ENV,
    DEFAULT_LIMITS,
    AppArgs,
    admin_token_from_env,
    redis_url_from_env,
)
from tokenmart.deployments.redis_connection import redacted

from .serve_mode import DEFAULT_SERVE_MODE, ServeMode, ray_env
from .state import ClusterState

APP_NAME = "tokenmart"
DEFAULT_CATALOG = Path(__file__).parent / "catalog" / "local.yaml"
# Ray accounts CPUs logically: a CPU vLLM replica asks for a 2-CPU bundle and the ingress
# for part of one, so a 2-core machine must declare more logical CPUs than it has.
DEFAULT_NUM_CPUS = 8

console = Console(stderr=True)


class LaunchError(RuntimeError):
    """A problem the user can fix; the message says how."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# -- Redis ---------------------------------------------------------------------------------
def redis_ping(url: str) -> bool:
    """Whether Redis answers at `url` (a redis:// URL, or redis+sentinel:// through its Sentinels)."""
    import redis

    from tokenmart.deployments.redis_connection import connect_sync

    try:
        with connect_sync(url, timeout_s=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def start_redis(state_dir: Path, port: int | None = None) -> tuple[str, str]:
    """Start the local redis-server (AOF under the state dir), on `port` when it is given (a restart)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError(
            "redis-server is not installed. Install it (Debian/Ubuntu: `sudo apt-get install redis-server`) "
            "or point tokenmart at an existing server with REDIS_URL=redis://host:port/0."
        )
    data_dir = state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    pidfile = state_dir / "redis.pid"
    subprocess.run(
        [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--appendonly", "yes", "--daemonize", "yes", "--pidfile", str(pidfile),
            "--logfile", str(data_dir / "redis.log"),
        ],
        check=True,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: redis_ping(url), 15, f"redis-server on port {port} (log: {data_dir / 'redis.log'})")
    return url, str(pidfile)


def stop_redis(url: str) -> None:
    import redis

    # SHUTDOWN closes the connection; an already-stopped server is fine too.
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis.from_url(url, socket_timeout=2).shutdown(save=True)


# -- Ray -----------------------------------------------------------------------------------
def _ray_cli() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def use_ray_token_auth() -> None:
    """Run the cluster with Ray's token auth, and let this process (the Serve REST client) use it.

    Ray turns token auth on for a new cluster when a token exists (~/.ray/auth_token), and
    clients must agree; saying so explicitly keeps the server and this process consistent.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    subprocess.run([_ray_cli(), "get-auth-token", "--generate"], capture_output=True, check=True)


def start_ray_head(num_cpus: int, env: dict[str, str]) -> tuple[str, str, str]:
    use_ray_token_auth()
    gcs_port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [
        _ray_cli(), "start", "--head", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--port={gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
        # Prometheus metrics of every process on the node: tokenmart's, Serve's and vLLM's.
        f"--metrics-export-port={metrics_port}",
    ]  # fmt: skip
    result = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise LaunchError(f"`ray start --head` failed:\n{tail}\n(If a cluster is already running: tokenmart down)")
    return f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{metrics_port}/metrics"


def _cluster_pids(gcs_address: str) -> list[int]:
    """Processes of the one Ray cluster whose GCS listens on this port, with their children.

    Ray names its GCS by the node's IP (not always 127.0.0.1), so processes are matched on
    the port in their GCS flags; helpers they fork (dashboard modules) are found as children.
    Other Ray clusters on the machine are left alone.
    """
    port = gcs_address.rsplit(":", 1)[-1]
    own = re.compile(
        rb"(--gcs[-_]address=|--address=)[^\x00 ]*:"
        + port.encode()
        + rb"(\x00|$)|--gcs_server_port="
        + port.encode()
        + rb"(\x00|$)"
    )
    matched: set[int] = set()
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if own.search(cmdline):
            matched.add(int(entry.name))
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in matched} - matched
        matched |= children
        grown = bool(children)
    return sorted(matched)


def stop_ray(gcs_address: str, grace_s: float = 15) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_pids(gcs_address):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while _cluster_pids(gcs_address) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _cluster_pids(gcs_address):
            return


def _http_ok(url: str, **kwargs: Any) -> bool:
    try:
        return httpx.get(url, timeout=2, **kwargs).status_code == 200
    except httpx.HTTPError:
        return False


# -- Serve ---------------------------------------------------------------------------------
def serve_config(app_args: AppArgs, port: int, extra_applications: list[dict] | None = None) -> dict[str, Any]:
    """The Serve config: the marketplace at `/`, and any extra applications (they get the
    same builder args unless they bring their own; `loadtest/bench.py` adds plain Ray Serve
    LLM at `/plain` this way)."""
    from tokenmart.deployments.app import IMPORT_PATH  # the builder's module imports Ray Serve

    args = app_args.serve_args()
    extra = [{"args": args, **app} for app in extra_applications or []]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args},
            *extra,
        ],
    }


def app_args(
    catalog: Catalog,
    engine: str,
    *,
    redis_url: str | None = None,
    default_limits: dict[str, int] | None = None,
    app_overrides: dict[str, Any] | None = None,
) -> AppArgs:
    """The Serve app's typed arguments; a problem is a LaunchError that names the field.

    `default_limits` are the operator's limits for keys that set none of their own, merged
    over the built-in defaults; `app_overrides` are other AppArgs fields (e.g. {"ingress": {...}}).
    """
    fields: dict[str, Any] = {"catalog": catalog, "engine": engine}
    if redis_url:
        fields["redis_url"] = redis_url
    if default_limits:
        fields["default_limits"] = {**DEFAULT_LIMITS.model_dump(), **default_limits}
    fields.update(app_overrides or {})
    try:
        return AppArgs.model_validate(fields)
    except ValidationError as exc:
        problems = "\n".join(
            f"  - {'.'.join(map(str, error['loc'])) or '(top level)'}: {error['msg']}" for error in exc.errors()
        )
        raise LaunchError(f"the app arguments are invalid:\n{problems}") from None


def serve_client(dashboard_url: str) -> Any:
    """Ray's Serve REST client (it adds the cluster's auth token when token auth is on)."""
    # Local clusters run with token auth (see use_ray_token_auth); this process must agree.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(dashboard_url)
    except (ConnectionError, RuntimeError, OSError):
        return None


def serve_details(dashboard_url: str) -> dict[str, Any]:
    client = serve_client(dashboard_url)
    try:
        return client.get_serve_details() if client else {}
    except (ConnectionError, RuntimeError, OSError):
        return {}


def app_status(dashboard_url: str) -> tuple[str, str, dict[str, str]]:
    """(application status, message, {deployment: status})."""
    app = serve_details(dashboard_url).get("applications", {}).get(APP_NAME)
    if not app:
        return "NOT_STARTED", "", {}
    deployments = {name: d.get("status", "?") for name, d in (app.get("deployments") or {}).items()}
    return app.get("status", "?"), app.get("message", ""), deployments


def deploy(dashboard_url: str, config: dict[str, Any]) -> None:
    client = serve_client(dashboard_url)
    if client is None:
        raise LaunchError(f"the Ray dashboard at {dashboard_url} does not answer")
    try:
        client.deploy_applications(config)
    except RuntimeError as exc:
        raise LaunchError(f"deploying the Serve app failed: {exc}") from exc


def wait_until_serving(dashboard_url: str, api_base: str, timeout_s: float) -> None:
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as progress:
        task = progress.add_task("deploying", total=None)
        deadline = time.monotonic() + timeout_s
        while True:
            status, message, deployments = app_status(dashboard_url)
            summary = ", ".join(f"{name}: {state}" for name, state in sorted(deployments.items())) or "starting"
            progress.update(task, description=f"Serve app {status} ({summary})")
            if status == "DEPLOY_FAILED":
                raise LaunchError(f"the Serve app failed to deploy:\n{message}")
            if status == "RUNNING" and _http_ok(f"{api_base}/healthz"):
                return
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"the Serve app was not ready after {timeout_s:.0f} s (status {status}: {summary}).\n{message}\n"
                    "Logs: /tmp/ray/session_latest/logs/serve/"
                )
            time.sleep(1)


# -- whole cluster -------------------------------------------------------------------------
def ensure_models(catalog: Catalog) -> None:
    """Build the `builtin:` models and adapters, and check every LoRA adapter folder, before starting."""
    from tokenmart.deployments.lora import AdapterError, check_adapter

    for listing in catalog.listings:
        _ensure_builtin(listing.id, listing.source)
        for adapter in listing.adapters:
            _ensure_builtin(adapter.id, adapter.source)
            try:
                check_adapter(adapter.id, adapter.resolved_source(), listing.lora.max_rank)  # type: ignore[union-attr]
            except AdapterError as exc:
                raise LaunchError(f"listing {listing.id!r}: {exc}") from exc


def _ensure_builtin(model_id: str, source: str) -> None:
    from .model_build import ModelBuildError, ensure_builtin

    if not source.startswith(BUILTIN_PREFIX):
        return
    try:
        path = ensure_builtin(source)
    except ModelBuildError as exc:
        raise LaunchError(f"model build failed for {model_id!r}: {exc}") from exc
    console.print(f"[green]model[/] {model_id}: {path}")


def create_key(api_base: str, admin_token: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{api_base}/admin/v1/keys", json=body, headers={"authorization": f"Bearer {admin_token}"}, timeout=30
    )
    if response.status_code != 201:
        raise LaunchError(f"creating an API key failed ({response.status_code}): {response.text}")
    return response.json()


def up(
    state_dir: Path,
    *,
    catalog_path: Path = DEFAULT_CATALOG,
    port: int = 8000,
    redis_url: str | None = None,
    num_cpus: int = DEFAULT_NUM_CPUS,
    engine: str = "vllm",
    timeout_s: float = 900,
    demo_credit_usd: float = 10.0,
    default_limits: dict[str, int] | None = None,
    app_overrides: dict[str, Any] | None = None,
    extra_applications: list[dict] | None = None,
    serve_mode: ServeMode = DEFAULT_SERVE_MODE,
) -> tuple[ClusterState, str]:
    """Start everything and return (state, a fresh demo API key)."""
    if ClusterState.load(state_dir) is not None:
        raise LaunchError(f"a cluster is already recorded in {state_dir}; run `tokenmart down` first")
    catalog = load_catalog(catalog_path)  # an invalid catalog fails before anything starts
    if port_in_use(port):
        raise LaunchError(f"port {port} is already in use; choose another with --port or stop what holds it")
    # The app arguments are checked before anything starts (the Redis URL is known later).
    app_args(catalog, engine, default_limits=default_limits, app_overrides=app_overrides)
    if engine == "vllm":
        ensure_models(catalog)

    redis_url = redis_url or redis_url_from_env()
    redis_pidfile = None
    if redis_url:
        if not redis_ping(redis_url):
            raise LaunchError(
                f"Redis is unreachable at {redacted(redis_url)}; check REDIS_URL or unset it to start a local one"
            )
        managed = False
    else:
        with console.status("starting redis-server"):
            redis_url, redis_pidfile = start_redis(state_dir)
        managed = True
    console.print(f"[green]redis[/] {redacted(redis_url)}")

    # Data written before organizations moves to their layout before any ingress of this
    # version reads it (idempotent: a migrated or empty Redis has nothing to do).
    import redis

    from tokenmart.deployments.migrate import migrate
    from tokenmart.deployments.redis_connection import connect_sync

    try:
        with (
            console.status("checking the data layout in Redis"),
            connect_sync(redis_url, timeout_s=30) as client,
        ):
            migrated = migrate(client)
    except redis.RedisError as exc:
        if managed:
            stop_redis(redis_url)
        raise LaunchError(
            f"migrating the data in Redis to the organization layout failed part way: {exc}. "
            "It resumes where it stopped: run `tokenmart up` (or `tokenmart migrate`) again."
        ) from exc
    if migrated.keys_migrated:
        console.print(
            f"[green]migrated[/] {len(migrated.keys_migrated)} key(s) to the organization layout "
            f"({migrated.ledger_events:,} ledger events)"
        )

    from_env = admin_token_from_env()
    admin_token = from_env.get_secret_value() if from_env else f"tm-admin-{secrets.token_urlsafe(24)}"
    api_base = f"http://127.0.0.1:{port}"
    try:
        with console.status(f"starting the Ray head ({num_cpus} logical CPUs)"):
            # ray_env: how HTTP reaches the ingress (serve_mode.py). The admin token reaches the app
            # through the Ray processes' environment (AppArgs.admin_token), never through the
            # Serve config, which the dashboard shows.
            env = {ADMIN_TOKEN_ENV: admin_token, **ray_env(serve_mode)}
            ray_address, dashboard_url, metrics_url = start_ray_head(num_cpus, env)
        console.print(f"[green]ray[/] {ray_address}, dashboard {dashboard_url}")
        state = ClusterState(
            api_base=api_base,
            admin_token=admin_token,
            redis_url=redis_url,
            redis_managed=managed,
            ray_address=ray_address,
            dashboard_url=dashboard_url,
            catalog_path=str(Path(catalog_path).resolve()),
            engine=engine,
            redis_pidfile=redis_pidfile,
            metrics_url=metrics_url,
        )
        state.save(state_dir)  # from here on, `down` can find and stop this cluster
        wait_for(lambda: serve_client(dashboard_url), 120, "the Ray dashboard")
        args = app_args(
            catalog, engine, redis_url=redis_url, default_limits=default_limits, app_overrides=app_overrides
        )
        deploy(dashboard_url, serve_config(args, port, extra_applications))
        wait_until_serving(dashboard_url, api_base, timeout_s)
        created = create_key(api_base, admin_token, {"name": "demo", "credit_usd": demo_credit_usd})
    except BaseException:
        console.print("[red]startup failed; stopping what was started[/]")
        if not down(state_dir) and managed:
            stop_redis(redis_url)
        raise
    state.demo_key_id = created["id"]
    state.save(state_dir)
    return state, created["key"]


def down(state_dir: Path) -> bool:
    """Stop Ray (and the Redis that `up` started). Returns False when nothing was recorded."""
    state = ClusterState.load(state_dir)
    if state is None:
        return False
    stop_ray(state.ray_address)
    if state.redis_managed:
        stop_redis(state.redis_url)
    ClusterState.clear(state_dir)
    return True
