"""`tokenmart`: run a local marketplace and operate it (organizations, keys, credit, usage, ledger,
reconcile, models, data migration).

Operator commands talk to the running cluster's admin API, so they work the same against
a local cluster (found through the state file) and a remote one (TOKENMART_API_BASE and
TOKENMART_ADMIN_TOKEN).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from tokenmart.deployments.catalog import CatalogError
from tokenmart.deployments.config import admin_token_from_env
from tokenmart.deployments.ledger import MAX_PAGE, rows_csv
from tokenmart.deployments.redis_connection import RedisURLError, redacted
from tokenmart.deployments.schemas import MAX_GRACE_S

from . import launcher
from .serve_mode import DEFAULT_SERVE_MODE, SERVE_MODES
from .state import ClusterState, default_state_dir

app = typer.Typer(help="tokenmart: an OpenAI-compatible pay-per-token LLM marketplace on Ray.", no_args_is_help=True)
orgs_app = typer.Typer(help="Create, list, credit and rename organizations (they hold credit).", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list, update, rotate and revoke API keys.", no_args_is_help=True)
credits_app = typer.Typer(help="Manage prepaid credit.", no_args_is_help=True)
ledger_app = typer.Typer(help="The ledger of settled requests.", no_args_is_help=True)
app.add_typer(orgs_app, name="orgs")
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
app.add_typer(ledger_app, name="ledger")

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
    out.print(f"Console: {state.api_base}/console (operators: {state.api_base}/console/admin)", soft_wrap=True)
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
    table.add_row("console", f"{state.api_base}/console")
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
        None,
        help="Builtin models to build (default: all of them: SmolLM2, its demo LoRA and all-MiniLM-L6-v2).",
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


# -- organizations, keys and credit --------------------------------------------------------
EXPIRES_AT_HELP = "Expiry: ISO 8601 (UTC if no zone) or epoch seconds."
CAP_PERIODS = ("daily", "weekly", "monthly")
PERIOD_HELP = "When the spend cap resets: daily, weekly (Monday) or monthly, at 00:00 UTC (default: never)."
TIER_HELP = "The fair-share tier (one of the catalog's `tiers`; default: the organization's, else the catalog's)."


def _expiry(value: str | None) -> str | int | None:
    """The API takes expiry as ISO-8601 text or an integer of epoch seconds (never numeric text)."""
    if value is not None and value.strip().isdigit():
        return int(value)
    return value


def _period(value: str | None) -> str | None:
    if value is not None and value not in CAP_PERIODS:
        _fail(f"--period must be one of {', '.join(CAP_PERIODS)}")
    return value


def _cap(key: dict[str, Any]) -> str:
    if key["spend_cap_usd"] is None:
        return "none"
    return f"{_money(key['spend_cap_usd'])} {key['spend_cap_period'] or 'never resets'}"


@orgs_app.command("create")
def orgs_create(
    name: str = typer.Argument(..., help="A name for the organization."),
    credit: float | None = typer.Option(None, help="Prepaid credit in USD."),
    tier: str | None = typer.Option(None, help="The fair-share tier of its keys (one of the catalog's `tiers`)."),
    state_dir: Path | None = StateDir,
) -> None:
    """Create an organization; its keys draw on its credit (`tokenmart keys create NAME --org ID`)."""
    body: dict[str, Any] = {"name": name}
    if credit is not None:
        body["credit_usd"] = credit
    if tier is not None:
        body["tier"] = tier
    org = AdminClient(state_dir).call("POST", "/admin/v1/orgs", json=body)
    out.print(f"id: {org['id']}  credit: {_money(org['credit_usd'])}")


@orgs_app.command("list")
def orgs_list(state_dir: Path | None = StateDir) -> None:
    """List organizations with their credit, holds and spend."""
    data = AdminClient(state_dir).call("GET", "/admin/v1/orgs")["data"]
    table = Table(title="organizations")
    for column in ("id", "name", "keys", "credit", "on hold", "spent"):
        table.add_column(column, justify="left" if column in ("id", "name") else "right")
    for org in data:
        table.add_row(
            org["id"], org["name"], f"{org['keys']:,}", _money(org["credit_usd"]), _money(org["on_hold_usd"]),
            _money(org["spent_usd"]),
        )  # fmt: skip
    out.print(table)


@orgs_app.command("credit")
def orgs_credit(
    org_id: str = typer.Argument(...),
    amount_usd: float = typer.Argument(..., help="USD to add."),
    state_dir: Path | None = StateDir,
) -> None:
    """Add prepaid credit to an organization."""
    org = AdminClient(state_dir).call("POST", f"/admin/v1/orgs/{org_id}/credit", json={"amount_usd": amount_usd})
    out.print(f"{org['id']} credit: {_money(org['credit_usd'])}")


@orgs_app.command("rename")
def orgs_rename(
    org_id: str = typer.Argument(...), name: str = typer.Argument(...), state_dir: Path | None = StateDir
) -> None:
    """Rename an organization."""
    org = AdminClient(state_dir).call("PATCH", f"/admin/v1/orgs/{org_id}", json={"name": name})
    out.print(f"{org['id']} name: {org['name']}")


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="A label for the key."),
    org: str | None = typer.Option(
        None, "--org", help="The organization whose credit the key draws on (default: a new one of its own)."
    ),
    credit: float | None = typer.Option(
        None, help="Prepaid credit in USD of the key's own organization (not with --org: use `orgs credit`)."
    ),
    cap: float | None = typer.Option(None, "--cap", help="Spend cap in USD per period (see --period)."),
    period: str | None = typer.Option(None, "--period", help=PERIOD_HELP),
    models: str | None = typer.Option(None, help="Comma-separated listing ids this key may use (default: all)."),
    rpm: int | None = typer.Option(None, help="Requests per minute (up to 1,000,000)."),
    tpm: int | None = typer.Option(None, help="Tokens per minute (up to 1,000,000,000)."),
    max_concurrency: int | None = typer.Option(None, help="Concurrent requests (up to 10,000)."),
    max_tokens_per_request: int | None = typer.Option(
        None, help="Most output one request may ask for: prompts x n x max_tokens (up to 100,000,000)."
    ),
    expires_at: str | None = typer.Option(None, help=EXPIRES_AT_HELP),
    tier: str | None = typer.Option(None, help=TIER_HELP),
    state_dir: Path | None = StateDir,
) -> None:
    """Create a key; the key itself is shown only now."""
    if org is not None and credit is not None:
        _fail(f"credit belongs to the organization: leave out --credit and run `tokenmart orgs credit {org} AMOUNT`")
    if period is not None and cap is None:
        _fail("--period needs --cap")
    body: dict[str, Any] = {"name": name}
    optional = {
        "org_id": org,
        "credit_usd": credit,
        "spend_cap_usd": cap,
        "spend_cap_period": _period(period),
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrency": max_concurrency,
        "max_tokens_per_request": max_tokens_per_request,
        "expires_at": _expiry(expires_at),
        "tier": tier,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if models:
        body["models"] = [m.strip() for m in models.split(",") if m.strip()]
    created = AdminClient(state_dir).call("POST", "/admin/v1/keys", json=body)
    out.print(f"API key: {created['key']}", soft_wrap=True)
    out.print(
        f"id: {created['id']}  org: {created['org_id']} ({created['org_name']})  "
        f"credit: {_money(created['credit_usd'])}  cap: {_cap(created)}",
        soft_wrap=True,
    )


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
    cap: float | None = typer.Option(None, "--cap", help="A new spend cap in USD per period."),
    no_cap: bool = typer.Option(False, "--no-cap", help="Remove the spend cap."),
    period: str | None = typer.Option(None, "--period", help=PERIOD_HELP),
    tier: str | None = typer.Option(None, help=TIER_HELP),
    state_dir: Path | None = StateDir,
) -> None:
    """Change a key's limits, spend cap, models, name, status, expiry or tier (takes effect on the next request)."""
    if cap is not None and no_cap:
        _fail("give --cap or --no-cap, not both")
    changes = {
        "name": name,
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrency": max_concurrency,
        "max_tokens_per_request": max_tokens_per_request,
        "status": status,
        "expires_at": _expiry(expires_at),
        "spend_cap_usd": cap,
        "spend_cap_period": _period(period),
        "tier": tier,
    }
    body: dict[str, Any] = {k: v for k, v in changes.items() if v is not None}
    if no_cap:
        body["spend_cap_usd"] = None  # null removes the cap
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
        f"cap: {_cap(key)}  models: {', '.join(key['models'] or ['all'])}",
        soft_wrap=True,
    )


@keys_app.command("list")
def keys_list(
    org: str | None = typer.Option(None, "--org", help="One organization's keys (default: all keys)."),
    state_dir: Path | None = StateDir,
) -> None:
    """List keys (never the keys themselves)."""
    params = {"org_id": org} if org else None
    data = AdminClient(state_dir).call("GET", "/admin/v1/keys", params=params)["data"]
    table = Table(title="API keys")
    columns = ("id", "name", "org", "prefix", "status", "org credit", "cap", "spent this period", "spent", "models")
    for column in columns:
        table.add_column(column)
    for key in data:
        table.add_row(
            key["id"], key["name"], key["org_id"], key["prefix"], key["status"], _money(key["credit_usd"]),
            _cap(key), _money(key["spent_this_period_usd"]) if key["spend_cap_usd"] is not None else "",
            _money(key["spent_usd"]), ", ".join(key["models"]) if key["models"] else "all",
        )  # fmt: skip
    out.print(table)


@keys_app.command("rotate")
def keys_rotate(
    key_id: str = typer.Argument(...),
    grace: int = typer.Option(
        0, "--grace", min=0, max=MAX_GRACE_S, help="Seconds the old key keeps working (default 0: it stops now)."
    ),
    state_dir: Path | None = StateDir,
) -> None:
    """Give a key a new secret (shown only now); its id, limits, cap and usage stay."""
    rotated = AdminClient(state_dir).call("POST", f"/admin/v1/keys/{key_id}/rotate", json={"grace_s": grace})
    out.print(f"API key: {rotated['key']}", soft_wrap=True)
    if grace == 0:
        out.print(f"{rotated['id']}: the previous key no longer works")
    else:
        until = datetime.now(timezone.utc) + timedelta(seconds=grace)
        out.print(f"{rotated['id']}: the previous key works until {until:%Y-%m-%d %H:%M:%S} UTC ({grace:,} s)")


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
    """Add prepaid credit to a key's organization (`tokenmart orgs credit` names the organization)."""
    key = AdminClient(state_dir).call("POST", f"/admin/v1/keys/{key_id}/credit", json={"amount_usd": amount_usd})
    out.print(f"{key['id']} credit: {_money(key['credit_usd'])}")


# -- usage, ledger and reconciliation ------------------------------------------------------
# The report row field that names each grouping, and its column title.
USAGE_GROUPS = {
    "model": ("model", "model"),
    "day": ("date", "date"),
    "key": ("key_id", "key"),
    "org": ("org_id", "org"),
}


@app.command()
def usage(
    key_id: str | None = typer.Option(None, help="One key (default: all keys)."),
    org: str | None = typer.Option(None, "--org", help="One organization (default: all of them)."),
    start: str | None = typer.Option(None, help="First UTC day, YYYY-MM-DD (default: 30 days back)."),
    end: str | None = typer.Option(None, help="Last UTC day, YYYY-MM-DD (default: today)."),
    group_by: str = typer.Option("model", help="model, day, key or org."),
    state_dir: Path | None = StateDir,
) -> None:
    """Usage totals (requests, tokens, cost) across keys."""
    if group_by not in USAGE_GROUPS:
        _fail(f"--group-by must be one of {', '.join(USAGE_GROUPS)}")
    chosen = {"key_id": key_id, "org_id": org, "start": start, "end": end, "group_by": group_by}
    params = {k: v for k, v in chosen.items() if v}
    report = AdminClient(state_dir).call("GET", "/admin/v1/usage", params=params)
    label, title = USAGE_GROUPS[group_by]
    table = Table(title=f"usage {report['start']} .. {report['end']}")
    for column in (title, "requests", "prompt tokens", "completion tokens", "cost"):
        table.add_column(column, justify="left" if column == title else "right")
    for row in [*report["data"], {**report["total"], label: "total"}]:
        table.add_row(
            str(row[label]), f"{row['requests']:,}", f"{row['prompt_tokens']:,}", f"{row['completion_tokens']:,}",
            _money(row["cost_usd"]),
        )  # fmt: skip
    out.print(table)


@ledger_app.command("export")
def ledger_export(
    after: str | None = typer.Option(None, help="Resume after this cursor (a previous export's `next cursor`)."),
    org: str | None = typer.Option(None, "--org", help="One organization (default: all of them)."),
    out_file: Path | None = typer.Option(None, "--out", help="Write the CSV here (default: stdout)."),
    page_size: int = typer.Option(1000, min=1, max=MAX_PAGE, help="Rows per request."),
    state_dir: Path | None = StateDir,
) -> None:
    """Export settled ledger rows as CSV, page by page, up to what has settled now.

    The cursor to resume from is printed on stderr at the end (also after a failure part way),
    so a later `--after` export continues exactly where this one stopped.
    """
    client = AdminClient(state_dir)
    cursor, written = after, 0
    sink = out_file.open("w", newline="", encoding="utf-8") if out_file else sys.stdout
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err)
    try:
        with progress:
            task = progress.add_task("rows written: 0", total=None)
            while True:
                params = {k: v for k, v in {"after": cursor, "limit": page_size, "org_id": org}.items() if v}
                page = client.call("GET", "/admin/v1/ledger", params=params)
                rows = page["data"]
                if rows:
                    sink.write(rows_csv(rows, header=written == 0))
                    sink.flush()
                    written += len(rows)
                cursor = page["next"]  # only once its rows are written
                progress.update(task, description=f"rows written: {written:,}")
                if not rows or page.get("has_more") is False:
                    break
        if written == 0:
            sink.write(rows_csv([]))  # the header, so the output is always a CSV file
    finally:
        if out_file:
            sink.close()
        if cursor:
            err.print(f"next cursor: {cursor}", soft_wrap=True, markup=False, highlight=False)
    err.print(f"{written:,} row(s) written" + (f" to {out_file}" if out_file else ""))


@app.command()
def reconcile(
    key_id: str | None = typer.Option(None, help="The organization holding this key (default: all of them)."),
    org: str | None = typer.Option(None, "--org", help="One organization (default: all of them)."),
    state_dir: Path | None = StateDir,
) -> None:
    """Check the ledger against the usage counters and every balance; exit 1 on any difference."""
    params = {k: v for k, v in {"key_id": key_id, "org_id": org}.items() if v}
    report = AdminClient(state_dir).call("GET", "/admin/v1/reconcile", params=params or None)
    table = Table(title="reconciliation: ledger vs counters vs balances")
    columns = (
        "org", "name", "keys", "events", "ledger cost", "counters cost", "spent", "credited", "balance", "on hold",
        "in flight", "",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("org", "name") else "right")
    for row in report["orgs"]:
        table.add_row(
            row["org_id"], row["name"], f"{row['keys']:,}", f"{row['events']:,}", _money(row["ledger_cost_usd"]),
            _money(row["counters_cost_usd"]), _money(row["spent_usd"]), _money(row["credited_usd"]),
            _money(row["balance_usd"]), _money(row["on_hold_usd"]), f"{row['in_flight']:,}",
            "[green]ok[/]" if row["ok"] else "[bold red]MISMATCH[/]",
        )  # fmt: skip
    out.print(table)
    if report["ok"] and not report["differences"]:
        out.print(f"[green]ok:[/] {len(report['orgs'])} organization(s) reconcile exactly")
        return
    differences = Table(title="differences")
    for column in ("org", "key", "check", "field", "expected", "actual"):
        differences.add_column(column)
    for diff in report["differences"]:
        differences.add_row(
            diff["org_id"], diff["key_id"] or "", diff["check"], diff["field"], str(diff["expected"]),
            str(diff["actual"]),
        )  # fmt: skip
    out.print(differences)
    raise typer.Exit(1)


# -- data layout ---------------------------------------------------------------------------
MIGRATE_TIMEOUT_S = 30.0


@app.command()
def migrate(
    redis_url: str | None = typer.Option(
        None, help="The Redis to migrate, redis:// or redis+sentinel:// (default: the local cluster's)."
    ),
    state_dir: Path | None = StateDir,
) -> None:
    """Move data written before organizations into the organization layout (docs/accounts.md).

    Idempotent and resumable: run it again after an interruption; `tokenmart up` runs it too.
    Run it with no ingress of the previous version serving.
    """
    import redis

    from tokenmart.deployments.migrate import migrate as migrate_data
    from tokenmart.deployments.redis_connection import connect_sync

    if redis_url is None:
        state = ClusterState.load(_state_dir(state_dir))
        if state is None:
            _fail("no local cluster is recorded: give --redis-url")
        redis_url = state.redis_url
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True)
    try:
        with connect_sync(redis_url, timeout_s=MIGRATE_TIMEOUT_S) as client, progress:
            task = progress.add_task(f"migrating {redacted(redis_url)}", total=None)
            report = migrate_data(client, lambda key_id: progress.update(task, description=f"migrated {key_id}"))
    except RedisURLError as exc:
        _fail(f"--redis-url: {exc}")
    except redis.RedisError as exc:
        _fail(f"migrating {redacted(redis_url)} stopped: {exc}; run `tokenmart migrate` again, it resumes")
    if not report.changed:
        out.print(f"nothing to migrate: {redacted(redis_url)} is in data layout {report.schema_after}")
        return
    out.print(f"data layout {report.schema_before} -> {report.schema_after} in {redacted(redis_url)}")
    migrated = report.keys_migrated
    out.print(f"keys migrated: {len(migrated)}" + (f" ({', '.join(migrated)})" if migrated else ""), soft_wrap=True)
    out.print(f"ledger events moved: {report.ledger_events:,}  settlement markers moved: {report.settled_markers:,}")


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
