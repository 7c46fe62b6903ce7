"""`tokenmart`: run a local marketplace and operate it (keys, credit, usage, reconcile, models).

Operator commands talk to the running cluster's admin API, so they work the same against
a local cluster (found through the state file) and a remote one (TOKENMART_API_BASE and
TOKENMART_ADMIN_TOKEN).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from tokenmart.deployments.catalog import CatalogError
from tokenmart.deployments.config import admin_token_from_env
from tokenmart.deployments.redis_connection import redacted

from . import launcher
from .serve_mode import DEFAULT_SERVE_MODE, SERVE_MODES
from .state import ClusterState, default_state_dir

app = typer.Typer(help="tokenmart: an OpenAI-compatible pay-per-token LLM marketplace on Ray.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list, update and revoke API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Manage prepaid credit.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")

out = Console()
err = Console(stderr=True)

StateDir = typer.Option(
    None, "--state-dir", help="Local cluster state (default $TOKENMART_STATE_DIR or ~/.local/state/tokenmart)."
)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _state_dir(value: Path | None) -> Path:
    return value or default_state_dir()


class AdminClient:
    def __init__(self, state_dir: Path | None) -> None:
        state = ClusterState.load(_state_dir(state_dir))
        # Client side: where this CLI sends admin calls; the Serve app never reads it.
        self.base = os.environ.get("TOKENMART_API_BASE") or (state.api_base if state else None)
        from_env = admin_token_from_env()
        self.token = from_env.get_secret_value() if from_env else (state.admin_token if state else None)
        if not self.base or not self.token:
            _fail("no running cluster found: run `tokenmart up`, or set TOKENMART_API_BASE and TOKENMART_ADMIN_TOKEN")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = httpx.request(
                method, f"{self.base}{path}", headers={"authorization": f"Bearer {self.token}"}, timeout=30, **kwargs
            )
        except httpx.HTTPError as exc:
            _fail(f"cannot reach the API at {self.base}: {exc}")
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            _fail(f"{response.status_code}: {message}")
        return response.json()


def _money(value: float) -> str:
    return f"${value:,.6f}"


# -- cluster lifecycle ---------------------------------------------------------------------
@app.command()
def up(
    catalog: Path = typer.Option(launcher.DEFAULT_CATALOG, help="Catalog YAML of the listings to serve."),
    port: int = typer.Option(8000, help="HTTP port of the API."),
    redis_url: str | None = typer.Option(None, envvar="REDIS_URL", help="Use this Redis instead of starting one."),
    num_cpus: int = typer.Option(launcher.DEFAULT_NUM_CPUS, help="Logical CPUs the Ray head declares."),
    engine: str = typer.Option("vllm", help="vllm, or fake (deterministic stand-in engine, no model needed)."),
    timeout: float = typer.Option(900, help="Seconds to wait for the models to become ready."),
    default_rpm: int | None = typer.Option(None, min=1, help="Requests/min for keys without their own (600)."),
    default_tpm: int | None = typer.Option(None, min=1, help="Tokens/min for keys without their own (1,000,000)."),
    default_max_concurrency: int | None = typer.Option(
        None, min=1, help="Concurrent requests for keys without their own (64)."
    ),
    default_max_tokens_per_request: int | None = typer.Option(
        None, min=1, help="Output tokens one request may ask for, prompts x n x max_tokens (131,072)."
    ),
    serve_mode: str = typer.Option(
        DEFAULT_SERVE_MODE,
        help="haproxy (HAProxy in front of ingress replicas that serve HTTP themselves) or proxy (Ray Serve's "
        "Python proxy).",
    ),
    state_dir: Path | None = StateDir,
) -> None:
    """Start Redis, a local Ray cluster and the marketplace; print the endpoint and a key."""
    if engine not in ("vllm", "fake"):
        _fail("--engine must be vllm or fake")
    if serve_mode not in SERVE_MODES:
        _fail(f"--serve-mode must be one of {', '.join(SERVE_MODES)}")
    defaults = {
        "rpm": default_rpm,
        "tpm": default_tpm,
        "max_concurrency": default_max_concurrency,
        "max_tokens_per_request": default_max_tokens_per_request,
    }
    try:
        state, key = launcher.up(
            _state_dir(state_dir),
            catalog_path=catalog,
            port=port,
            redis_url=redis_url,
            num_cpus=num_cpus,
            engine=engine,
            timeout_s=timeout,
            default_limits={k: v for k, v in defaults.items() if v is not None},
            serve_mode=serve_mode,  # type: ignore[arg-type]  # checked above
        )
    except (launcher.LaunchError, CatalogError) as exc:
        _fail(str(exc))
    out.print(f"API base URL: {state.api_base}/v1", soft_wrap=True)
    out.print(f"API key: {key}", soft_wrap=True)
    out.print(f"Admin token: {state.admin_token}", soft_wrap=True)
    err.print(f"Ray dashboard: {state.dashboard_url}   Stop with: tokenmart down")


@app.command()
def down(state_dir: Path | None = StateDir) -> None:
    """Stop the local cluster (Ray, and the Redis that `up` started; its data is kept)."""
    if launcher.down(_state_dir(state_dir)):
        out.print("tokenmart stopped")
    else:
        out.print("no tokenmart cluster was recorded; stopped any local Ray processes")


@app.command()
def status(state_dir: Path | None = StateDir) -> None:
    """Show the cluster, its deployments and whether the API answers."""
    state = ClusterState.load(_state_dir(state_dir))
    if state is None:
        _fail("no cluster is running (tokenmart up starts one)")
    app_state, message, deployments = launcher.app_status(state.dashboard_url)
    table = Table(title="tokenmart")
    table.add_column("component")
    table.add_column("status")
    table.add_row("API", f"{state.api_base}/v1")
    table.add_row("healthz", "ok" if launcher._http_ok(f"{state.api_base}/healthz") else "[red]failing[/]")
    table.add_row(
        "redis", ("ok " if launcher.redis_ping(state.redis_url) else "[red]unreachable[/] ") + redacted(state.redis_url)
    )
    table.add_row("ray dashboard", state.dashboard_url)
    if state.metrics_url:
        table.add_row("prometheus metrics", state.metrics_url)
    table.add_row("serve app", app_state)
    for name, deployment_status in sorted(deployments.items()):
        table.add_row(f"  {name}", deployment_status)
    out.print(table)
    if message:
        out.print(message)


@app.command("build-model")
def build_model(
    names: list[str] | None = typer.Argument(
        None, help="Builtin models to build (default: all of them: the SmolLM2 model and its demo LoRA)."
    ),
    force: bool = typer.Option(False, help="Rebuild even if the cache has it."),
) -> None:
    """Build the embedded models into the model cache (done by `up` when needed)."""
    from .model_build import BUILTIN_MODELS, ModelBuildError, ensure_builtin

    try:
        for name in names or list(BUILTIN_MODELS):
            out.print(str(ensure_builtin(name, force=force)))
    except ModelBuildError as exc:
        _fail(str(exc))


# -- keys and credit -----------------------------------------------------------------------
EXPIRES_AT_HELP = "Expiry: ISO 8601 (UTC if no zone) or epoch seconds."


def _expiry(value: str | None) -> str | int | None:
    """The API takes expiry as ISO-8601 text or an integer of epoch seconds (never numeric text)."""
    if value is not None and value.strip().isdigit():
        return int(value)
    return value


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="A label for the key."),
    credit: float = typer.Option(0.0, help="Prepaid credit in USD."),
    models: str | None = typer.Option(None, help="Comma-separated listing ids this key may use (default: all)."),
    rpm: int | None = typer.Option(None, help="Requests per minute (up to 1,000,000)."),
    tpm: int | None = typer.Option(None, help="Tokens per minute (up to 1,000,000,000)."),
    max_concurrency: int | None = typer.Option(None, help="Concurrent requests (up to 10,000)."),
    max_tokens_per_request: int | None = typer.Option(
        None, help="Most output one request may ask for: prompts x n x max_tokens (up to 100,000,000)."
    ),
    expires_at: str | None = typer.Option(None, help=EXPIRES_AT_HELP),
    state_dir: Path | None = StateDir,
) -> None:
    """Create a key; the key itself is shown only now."""
    body: dict[str, Any] = {"name": name, "credit_usd": credit}
    optional = {
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrency": max_concurrency,
        "max_tokens_per_request": max_tokens_per_request,
        "expires_at": _expiry(expires_at),
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if models:
        body["models"] = [m.strip() for m in models.split(",") if m.strip()]
    created = AdminClient(state_dir).call("POST", "/admin/v1/keys", json=body)
    out.print(f"API key: {created['key']}", soft_wrap=True)
    out.print(f"id: {created['id']}  credit: {_money(created['credit_usd'])}")


@keys_app.command("update")
def keys_update(
    key_id: str = typer.Argument(...),
    name: str | None = typer.Option(None, help="A new label."),
    models: str | None = typer.Option(None, help="Comma-separated listing ids this key may use."),
    rpm: int | None = typer.Option(None, min=1, help="Requests per minute (up to 1,000,000)."),
    tpm: int | None = typer.Option(None, min=1, help="Tokens per minute (up to 1,000,000,000)."),
    max_concurrency: int | None = typer.Option(None, min=1, help="Concurrent requests (up to 10,000)."),
    max_tokens_per_request: int | None = typer.Option(
        None, min=1, help="Most output one request may ask for: prompts x n x max_tokens (up to 100,000,000)."
    ),
    status: str | None = typer.Option(None, help="revoked (revocation is final: a revoked key stays revoked)."),
    expires_at: str | None = typer.Option(None, help=EXPIRES_AT_HELP),
    state_dir: Path | None = StateDir,
) -> None:
    """Change a key's limits, models, name, status or expiry (takes effect on the next request)."""
    changes = {
        "name": name,
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrency": max_concurrency,
        "max_tokens_per_request": max_tokens_per_request,
        "status": status,
        "expires_at": _expiry(expires_at),
    }
    body: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
    if models is not None:
        body["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if not body:
        _fail("nothing to change: give at least one option")
    key = AdminClient(state_dir).call("PATCH", f"/admin/v1/keys/{key_id}", json=body)
    limits = key["limits"]
    out.print(
        f"{key['id']} {key['status']}  rpm: {limits['rpm'] or 'default'}  tpm: {limits['tpm'] or 'default'}  "
        f"concurrency: {limits['max_concurrency'] or 'default'}  "
        f"max tokens/request: {limits.get('max_tokens_per_request') or 'default'}  "
        f"models: {', '.join(key['models'] or ['all'])}"
    )


@keys_app.command("list")
def keys_list(state_dir: Path | None = StateDir) -> None:
    """List keys (never the keys themselves)."""
    data = AdminClient(state_dir).call("GET", "/admin/v1/keys")["data"]
    table = Table(title="API keys")
    for column in ("id", "name", "prefix", "status", "credit", "spent", "models"):
        table.add_column(column)
    for key in data:
        table.add_row(
            key["id"], key["name"], key["prefix"], key["status"], _money(key["credit_usd"]), _money(key["spent_usd"]),
            ", ".join(key["models"]) if key["models"] else "all",
        )  # fmt: skip
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(...), state_dir: Path | None = StateDir) -> None:
    """Revoke a key; every ingress replica refuses it from the next request on."""
    key = AdminClient(state_dir).call("DELETE", f"/admin/v1/keys/{key_id}")
    out.print(f"{key['id']} {key['status']}")


@credits_app.command("add")
def credits_add(
    key_id: str = typer.Argument(...),
    amount_usd: float = typer.Argument(..., help="USD to add."),
    state_dir: Path | None = StateDir,
) -> None:
    """Add prepaid credit to a key."""
    key = AdminClient(state_dir).call("POST", f"/admin/v1/keys/{key_id}/credit", json={"amount_usd": amount_usd})
    out.print(f"{key['id']} credit: {_money(key['credit_usd'])}")


# -- usage and catalog ---------------------------------------------------------------------
@app.command()
def usage(
    key_id: str | None = typer.Option(None, help="One key (default: all keys)."),
    start: str | None = typer.Option(None, help="First UTC day, YYYY-MM-DD (default: 30 days back)."),
    end: str | None = typer.Option(None, help="Last UTC day, YYYY-MM-DD (default: today)."),
    group_by: str = typer.Option("model", help="model or day."),
    state_dir: Path | None = StateDir,
) -> None:
    """Usage totals (requests, tokens, cost) across keys."""
    params = {k: v for k, v in {"key_id": key_id, "start": start, "end": end, "group_by": group_by}.items() if v}
    report = AdminClient(state_dir).call("GET", "/admin/v1/usage", params=params)
    label = "model" if group_by == "model" else "date"
    table = Table(title=f"usage {report['start']} .. {report['end']}")
    for column in (label, "requests", "prompt tokens", "completion tokens", "cost"):
        table.add_column(column, justify="left" if column == label else "right")
    for row in [*report["data"], {**report["total"], label: "total"}]:
        table.add_row(
            str(row[label]), f"{row['requests']:,}", f"{row['prompt_tokens']:,}", f"{row['completion_tokens']:,}",
            _money(row["cost_usd"]),
        )  # fmt: skip
    out.print(table)


@app.command()
def reconcile(
    key_id: str | None = typer.Option(None, help="One key (default: all keys)."),
    state_dir: Path | None = StateDir,
) -> None:
    """Check the ledger stream against the usage counters and the balances; exit 1 on any difference."""
    report = AdminClient(state_dir).call("GET", "/admin/v1/reconcile", params={"key_id": key_id} if key_id else None)
    table = Table(title="reconciliation: ledger vs counters vs balances")
    columns = ("key", "name", "events", "ledger cost", "counters cost", "spent", "credited", "balance", "on hold", "")
    for column in columns:
        table.add_column(column, justify="left" if column in ("key", "name") else "right")
    for row in report["keys"]:
        table.add_row(
            row["key_id"], row["name"], f"{row['events']:,}", _money(row["ledger_cost_usd"]),
            _money(row["counters_cost_usd"]), _money(row["spent_usd"]), _money(row["credited_usd"]),
            _money(row["balance_usd"]), _money(row["on_hold_usd"]),
            "[green]ok[/]" if row["ok"] else "[bold red]MISMATCH[/]",
        )  # fmt: skip
    out.print(table)
    if report["ok"]:
        out.print(f"[green]ok:[/] {len(report['keys'])} key(s) reconcile exactly")
        return
    differences = Table(title="differences")
    for column in ("key", "check", "field", "expected", "actual"):
        differences.add_column(column)
    for diff in report["differences"]:
        differences.add_row(diff["key_id"], diff["check"], diff["field"], str(diff["expected"]), str(diff["actual"]))
    out.print(differences)
    raise typer.Exit(1)


@app.command()
def models(state_dir: Path | None = StateDir) -> None:
    """The marketplace catalog with prices."""
    data = AdminClient(state_dir).call("GET", "/v1/models")["data"]
    table = Table(title="models (USD per 1M tokens)")
    for column in ("id", "owner", "LoRA of", "context", "prompt", "completion"):
        table.add_column(column)
    for model in data:
        pricing = model["pricing"]
        table.add_row(
            model["id"], model["owned_by"], model.get("parent") or "", f"{model['context_length']:,}",
            f"{pricing['prompt_usd_per_1m']}", f"{pricing['completion_usd_per_1m']}",
        )  # fmt: skip
    out.print(table)


@app.command("render-cluster")
def render_cluster(
    catalog: Path = typer.Option(..., help="A GPU catalog with worker_groups."),
    out_dir: Path = typer.Option(..., "--out", help="Directory for ray-cluster.yaml and serve.yaml."),
    name: str = typer.Option("tokenmart", help="Ray cluster name."),
) -> None:
    """Render a GPU catalog into a Ray cluster launcher config and its Serve config."""
    from tokenmart.deployments.catalog import load_catalog

    from .cluster_config import ClusterConfigError, render

    try:
        written = render(load_catalog(catalog), catalog, out_dir, name=name)
    except (CatalogError, ClusterConfigError) as exc:
        _fail(str(exc))
    for path in written:
        out.print(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
