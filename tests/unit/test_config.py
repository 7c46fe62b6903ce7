"""One typed configuration: every setting of the Serve app is an AppArgs field, read in one place.

The environment is read only by deployments/config.py (the fields' defaults) and, for the
few variables that are not settings of the Serve app, by the code named in `NOT_APP_SETTINGS`.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr, ValidationError

from tokenmart.cluster import helm_schema, launcher
from tokenmart.cluster.state import ClusterState
from tokenmart.deployments import config
from tokenmart.deployments.app import IMPORT_PATH, build_app
from tokenmart.deployments.config import AppArgs, FakeEngineOptions, IngressOptions, MetricsOptions
from tokenmart.deployments.schemas import Limits

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CATALOG = REPO_ROOT / "cluster" / "catalog" / "local.yaml"
SOURCE_DIRS = ("deployments", "cluster", "doubles")
CONFIG_MODULE = "deployments/config.py"
SERVING_ENV = (config.REDIS_URL_ENV, config.ADMIN_TOKEN_ENV, config.SPOOL_DIR_ENV, config.CACHE_DIR_ENV)

# Environment variables code outside config.py may touch, and why: none is a setting of the
# Serve app. Each entry: the variable (None: the whole environment) -> (where, why).
NOT_APP_SETTINGS: dict[str | None, tuple[str, str]] = {
    "TOKENMART_API_BASE": ("cluster/cli.py", "client side: where the operator CLI sends its admin calls"),
    "TOKENMART_STATE_DIR": ("cluster/state.py", "client side: where the CLI records the local cluster"),
    "RAY_AUTH_MODE": ("cluster/launcher.py", "Ray's own client setting, set for the launcher's Serve REST client"),
    None: ("cluster/launcher.py", "the launcher's environment handed on to `ray start`, plus the app's variables"),
    "HF_HUB_OFFLINE": ("cluster/*.py", "the model build keeps the Hugging Face library offline, then restores it"),
}


def _env_uses(tree: ast.AST) -> list[tuple[int, str | None]]:
    """(line, variable) of every os.environ / os.getenv use; variable None when not a literal."""

    def literal(node: ast.AST | None) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    uses = []
    for node in ast.walk(tree):
        is_environ = isinstance(node, ast.Attribute) and node.attr == "environ"
        is_environ = is_environ or (isinstance(node, ast.Name) and node.id == "environ")
        is_getenv = (isinstance(node, ast.Attribute) and node.attr == "getenv") or (
            isinstance(node, ast.Name) and node.id == "getenv"
        )
        if not (is_environ or is_getenv):
            continue
        parent = parents.get(node)
        name = None
        if is_getenv and isinstance(parent, ast.Call) and parent.args:
            name = literal(parent.args[0])
        elif isinstance(parent, ast.Subscript):
            name = literal(parent.slice)
        elif isinstance(parent, ast.Attribute) and isinstance(parents.get(parent), ast.Call):
            call = parents[parent]
            name = literal(call.args[0]) if call.args else None  # environ.get/setdefault/pop("X")
        uses.append((node.lineno, name))
    return sorted(uses, key=lambda use: use[0])


def _sources() -> list[Path]:
    return sorted(path for folder in SOURCE_DIRS for path in (REPO_ROOT / folder).rglob("*.py"))


def test_the_environment_is_read_only_through_app_args_or_by_an_explained_exception():
    stray = []
    for path in _sources():
        relative = path.relative_to(REPO_ROOT).as_posix()
        if relative == CONFIG_MODULE:
            continue
        for line, name in _env_uses(ast.parse(path.read_text(), filename=relative)):
            allowed = NOT_APP_SETTINGS.get(name)
            if allowed is None or not Path(relative).match(allowed[0]):
                stray.append(f"{relative}:{line} reads {name or 'the environment'}")
    assert not stray, (
        "read settings through AppArgs (deployments/config.py), or add the variable to NOT_APP_SETTINGS "
        "with the reason it is not a setting of the Serve app:\n" + "\n".join(stray)
    )


def test_the_scan_finds_each_kind_of_environment_read():
    source = (
        "import os\nfrom os import environ, getenv\n"
        "os.environ.get('A')\nos.environ['B']\nos.getenv('C')\nenviron.setdefault('D', '1')\ngetenv('E')\n"
        "env = {**os.environ}\n"
    )
    assert [name for _, name in _env_uses(ast.parse(source))] == ["A", "B", "C", "D", "E", None]


def test_no_serving_variable_is_an_exception():
    assert not set(SERVING_ENV) & set(NOT_APP_SETTINGS)


@pytest.mark.parametrize("variable", SERVING_ENV)
def test_each_variable_the_app_reads_is_named_in_the_description_of_the_field_that_reads_it(variable: str):
    named = [name for name, field in AppArgs.model_fields.items() if f"${variable}" in (field.description or "")]
    assert len(named) == 1, (variable, named)


@pytest.mark.parametrize("model", [AppArgs, IngressOptions, FakeEngineOptions, MetricsOptions, Limits])
def test_every_setting_has_a_description(model: type[BaseModel]):
    assert [name for name, field in model.model_fields.items() if not field.description] == []


# -- the defaults are those of before ---------------------------------------------------------------


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for variable in SERVING_ENV:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_the_defaults_without_environment(bare_env: Path):
    args = AppArgs(catalog_path=str(LOCAL_CATALOG))
    assert args.redis_url == "redis://127.0.0.1:6379/0"
    assert args.redis_timeout_s == 1.0
    assert args.model_dir == str(bare_env / ".cache" / "tokenmart" / "models")
    assert args.engine == "vllm"
    assert args.fake_engine.model_dump() == {
        "reply_tokens": 16,
        "token_delay_s": 0.005,
        "num_cpus": 0.1,
        "typed": False,
    }
    assert args.ingress.model_dump() == {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 32,
        "max_ongoing_requests": 128,
        "max_queued_requests": 512,
        "upscale_delay_s": 3.0,
        "downscale_delay_s": 30.0,
        "look_back_period_s": 5.0,
        "metrics_interval_s": 1.0,
        "num_cpus": 0.5,
        "max_body_bytes": 1 << 20,
    }
    assert args.metrics.per_key_labels is False
    assert args.default_limits == Limits(rpm=600, tpm=1_000_000, max_concurrency=64, max_tokens_per_request=131_072)
    assert args.spool_dir == "/tmp/tokenmart-spool"
    assert args.admin_token is None


def test_the_defaults_from_the_environment(bare_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REDIS_URL", "redis://r.example:6380/2")
    monkeypatch.setenv("TOKENMART_CACHE_DIR", str(bare_env / "cache"))
    monkeypatch.setenv("TOKENMART_SPOOL_DIR", str(bare_env / "spool"))
    monkeypatch.setenv("TOKENMART_ADMIN_TOKEN", "adm-secret")
    args = AppArgs(catalog_path=str(LOCAL_CATALOG))
    assert args.redis_url == "redis://r.example:6380/2"
    assert args.model_dir == str(bare_env / "cache" / "models")
    assert args.spool_dir == str(bare_env / "spool")
    assert isinstance(args.admin_token, SecretStr) and args.admin_token.get_secret_value() == "adm-secret"


def test_an_empty_admin_token_is_no_admin_token(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOKENMART_ADMIN_TOKEN", "")
    assert AppArgs(catalog_path=str(LOCAL_CATALOG)).admin_token is None


def test_default_limits_are_one_definition_importable_where_they_were():
    from tokenmart.deployments import app, limits

    assert limits.DEFAULT_LIMITS is app.DEFAULT_LIMITS is config.DEFAULT_LIMITS
    assert AppArgs(catalog_path=str(LOCAL_CATALOG)).default_limits == config.DEFAULT_LIMITS
    # each instance gets its own copy: changing one app's limits changes no other's
    assert AppArgs(catalog_path=str(LOCAL_CATALOG)).default_limits is not config.DEFAULT_LIMITS


# -- the admin token stays out of the Serve config ---------------------------------------------------


def test_the_admin_token_is_in_no_dump_and_no_repr(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOKENMART_ADMIN_TOKEN", "adm-do-not-show")
    args = AppArgs(catalog_path=str(LOCAL_CATALOG), engine="fake")
    for shown in (args.model_dump_json(), json.dumps(args.model_dump(mode="json")), repr(args), str(args)):
        assert "adm-do-not-show" not in shown
    assert "admin_token" not in args.serve_args()


def test_the_admin_token_is_not_an_app_argument():
    with pytest.raises(ValidationError, match="TOKENMART_ADMIN_TOKEN"):
        AppArgs.model_validate({"catalog_path": str(LOCAL_CATALOG), "admin_token": "in-plain-text"})


def test_the_ingress_gets_the_admin_token_and_spool_dir_at_bind_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("TOKENMART_ADMIN_TOKEN", "adm-bound")
    app = build_app(AppArgs(catalog_path=str(LOCAL_CATALOG), engine="fake", spool_dir=str(tmp_path)))
    kwargs = app._bound_deployment.init_kwargs
    assert kwargs["admin_token"].get_secret_value() == "adm-bound"
    assert kwargs["spool_dir"] == str(tmp_path)


def test_serve_args_leave_environment_defaults_to_the_ray_processes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOKENMART_SPOOL_DIR", "/launcher/only")
    args = AppArgs(catalog_path=str(LOCAL_CATALOG), redis_url="redis://r:1/0")
    dumped = args.serve_args()
    assert dumped["redis_url"] == "redis://r:1/0"  # set explicitly: it goes in
    assert not {"model_dir", "spool_dir", "admin_token"} & set(dumped)
    assert AppArgs.model_validate(dumped).model_dump(exclude={"model_dir", "spool_dir"}) == args.model_dump(
        exclude={"model_dir", "spool_dir"}
    )


# -- the launcher builds typed args ------------------------------------------------------------------


def test_the_launcher_merges_default_limits_over_the_built_in_ones_and_validates_overrides():
    catalog = launcher.load_catalog(LOCAL_CATALOG)
    args = launcher.app_args(
        catalog,
        "fake",
        redis_url="redis://r:1/0",
        default_limits={"rpm": 5},
        app_overrides={"ingress": {"min_replicas": 3, "max_replicas": 3}},
    )
    assert args.default_limits == Limits(rpm=5, tpm=1_000_000, max_concurrency=64, max_tokens_per_request=131_072)
    assert (args.ingress.min_replicas, args.redis_url, args.engine) == (3, "redis://r:1/0", "fake")
    with pytest.raises(launcher.LaunchError, match=r"ingress\.replicas"):
        launcher.app_args(catalog, "fake", app_overrides={"ingress": {"replicas": 3}})


# -- the builder's import path ------------------------------------------------------------------------


def test_the_import_path_resolves_to_build_app():
    module, _, name = IMPORT_PATH.partition(":")
    assert getattr(importlib.import_module(module), name) is build_app


def test_every_file_that_spells_the_import_path_spells_this_one():
    """The chart (_helpers.tpl), the plain manifests, the rendered cluster configs and the docs."""
    pattern = re.compile(r"tokenmart\.deployments\.[\w.]+:build_app")
    files = [
        *(REPO_ROOT / "helm").rglob("*.tpl"),
        *(REPO_ROOT / "helm").rglob("*.yaml"),
        *(REPO_ROOT / "k8s").rglob("*.yaml"),
        *(REPO_ROOT / "cluster" / "deploy").rglob("*.yaml"),
        *(REPO_ROOT / "docs").rglob("*.md"),
        REPO_ROOT / "README.md",
        REPO_ROOT / "k8s" / "README.md",
    ]
    spelled = {
        (path.relative_to(REPO_ROOT).as_posix(), found) for path in files for found in pattern.findall(path.read_text())
    }
    assert spelled, "no file spells the import path: the pattern is stale"
    assert {found for _, found in spelled} == {IMPORT_PATH}, sorted(spelled)
    assert any(path.startswith("helm/") for path, _ in spelled)


# -- the chart's values carry the fields' descriptions -----------------------------------------------


def test_the_charts_app_values_carry_the_app_args_descriptions():
    app = helm_schema.values_schema()["properties"]["app"]["properties"]
    assert set(app) == set(helm_schema.APP_VALUES)
    for value, field in helm_schema.APP_VALUES.items():
        assert app[value]["description"] == AppArgs.model_fields[field].description


def test_the_ingress_options_in_the_chart_schema_carry_their_descriptions():
    defs = helm_schema.values_schema()["$defs"]
    for name, field in IngressOptions.model_fields.items():
        assert defs["IngressOptions"]["properties"][name]["description"] == field.description


# -- the local cluster record ------------------------------------------------------------------------


def test_an_old_state_file_with_extra_still_loads(tmp_path: Path):
    record = {
        "api_base": "http://127.0.0.1:8000",
        "admin_token": "t",
        "redis_url": "redis://127.0.0.1:1/0",
        "redis_managed": True,
        "ray_address": "127.0.0.1:2",
        "dashboard_url": "http://127.0.0.1:3",
        "catalog_path": "c.yaml",
        "extra": {"metrics_url": "http://127.0.0.1:4/metrics", "something_old": 1},
        "a_field_of_a_newer_version": True,
    }
    ClusterState.path(tmp_path).write_text(json.dumps(record))
    state = ClusterState.load(tmp_path)
    assert state is not None
    assert state.metrics_url == "http://127.0.0.1:4/metrics"
    state.save(tmp_path)
    saved = json.loads(ClusterState.path(tmp_path).read_text())
    assert saved["metrics_url"] == "http://127.0.0.1:4/metrics" and "extra" not in saved
