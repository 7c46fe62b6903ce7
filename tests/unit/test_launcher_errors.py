"""`tokenmart up` refuses bad starts with messages a user can act on, before starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenmart.cluster import cli, launcher
from tokenmart.cluster.state import ClusterState
from tokenmart.deployments.catalog import CatalogError

runner = CliRunner()


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and block) every attempt to start Redis, Ray or a model build."""
    started: list[str] = []
    monkeypatch.setattr(launcher, "start_redis", lambda *a, **k: started.append("redis"))
    monkeypatch.setattr(launcher, "start_ray_head", lambda *a, **k: started.append("ray"))
    monkeypatch.setattr(launcher, "ensure_models", lambda *a, **k: started.append("model"))
    return started


def test_port_in_use_is_refused(tmp_path: Path, nothing_starts: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(launcher.LaunchError, match=f"port {port} is already in use"):
            launcher.up(tmp_path, port=port, engine="fake")
    assert nothing_starts == []


def test_unreachable_redis_url_is_refused(tmp_path: Path, nothing_starts: list[str]) -> None:
    dead = f"redis://127.0.0.1:{launcher.free_port()}/0"
    with pytest.raises(launcher.LaunchError, match="Redis is unreachable at " + dead):
        launcher.up(tmp_path, port=launcher.free_port(), redis_url=dead, engine="fake")
    assert "ray" not in nothing_starts and "redis" not in nothing_starts


def test_invalid_catalog_fails_before_anything_starts(tmp_path: Path, nothing_starts: list[str]) -> None:
    catalog = tmp_path / "bad.yaml"
    catalog.write_text("listings:\n  - id: broken\n    owner: me\n    source: x\n    context_length: 5\n")
    with pytest.raises(CatalogError, match=r"listing 'broken' \(listings\[0\]\): field context_length"):
        launcher.up(tmp_path, catalog_path=catalog, port=launcher.free_port(), engine="fake")
    assert nothing_starts == []


def test_a_recorded_cluster_must_be_stopped_first(tmp_path: Path, nothing_starts: list[str]) -> None:
    ClusterState(
        api_base="http://127.0.0.1:1",
        admin_token="t",
        redis_url="redis://127.0.0.1:1/0",
        redis_managed=False,
        ray_address="127.0.0.1:1",
        dashboard_url="http://127.0.0.1:2",
        catalog_path="x",
    ).save(tmp_path)
    with pytest.raises(launcher.LaunchError, match="tokenmart down"):
        launcher.up(tmp_path, port=launcher.free_port(), engine="fake")
    assert nothing_starts == []


def test_missing_redis_server_binary_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher.shutil, "which", lambda name: None)
    with pytest.raises(launcher.LaunchError, match="apt-get install redis-server"):
        launcher.start_redis(tmp_path)


def test_cli_prints_a_readable_error_and_exits_1(tmp_path: Path, nothing_starts: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(cli.app, ["up", "--engine", "fake", "--port", str(port), "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert f"port {port} is already in use" in result.output
    assert "Traceback" not in result.output


def test_operator_commands_without_a_cluster_explain_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TOKENMART_API_BASE", raising=False)
    monkeypatch.delenv("TOKENMART_ADMIN_TOKEN", raising=False)
    result = runner.invoke(cli.app, ["keys", "list", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "tokenmart up" in result.output


def test_state_file_is_private(tmp_path: Path) -> None:
    state = ClusterState(
        api_base="a", admin_token="secret", redis_url="r", redis_managed=True,
        ray_address="x", dashboard_url="d", catalog_path="c",
    )  # fmt: skip
    state.save(tmp_path)
    assert ClusterState.path(tmp_path).stat().st_mode & 0o077 == 0
    assert ClusterState.load(tmp_path) == state


def _no_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests stand in an unreachable Redis for the one `up` starts: nothing to migrate."""
    from tokenmart.deployments import migrate

    monkeypatch.setattr(migrate, "migrate", lambda client: migrate.MigrationReport(schema_before=2))


def test_up_passes_the_operators_default_limits_to_the_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmart.deployments.app import AppArgs

    _no_migration(monkeypatch)

    deployed: list[dict] = []
    monkeypatch.setattr(launcher, "port_in_use", lambda port: False)
    monkeypatch.setattr(launcher, "start_redis", lambda state_dir: ("redis://127.0.0.1:1/0", None))
    monkeypatch.setattr(
        launcher, "start_ray_head", lambda *a, **k: ("127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3/metrics")
    )
    monkeypatch.setattr(launcher, "wait_for", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "deploy", lambda dashboard, config: deployed.append(config))
    monkeypatch.setattr(launcher, "wait_until_serving", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "create_key", lambda *a, **k: {"id": "key_demo", "key": "sk-tm-demo"})
    monkeypatch.delenv("REDIS_URL", raising=False)

    launcher.up(tmp_path, engine="fake", default_limits={"rpm": 5, "max_concurrency": 2})

    (config,) = deployed
    args = config["applications"][0]["args"]
    assert args["default_limits"] == {
        "rpm": 5,
        "tpm": 1_000_000,
        "max_concurrency": 2,
        "max_tokens_per_request": 131_072,
    }
    assert AppArgs.model_validate(args).default_limits.rpm == 5


@pytest.mark.parametrize(
    ("args", "mode_env"),
    [
        ([], {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),  # the default
        (["--serve-mode", "haproxy"], {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
        (["--serve-mode", "proxy"], {}),
    ],
)
def test_the_serve_mode_reaches_the_ray_heads_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], mode_env: dict[str, str]
) -> None:
    """Every Ray process reads the mode from the environment it starts with, so it is set on
    the head `up` starts; the request-id guard's variable goes with every mode."""
    from tokenmart.deployments.request_id import PROXY_ENV

    _no_migration(monkeypatch)
    envs: list[dict[str, str]] = []

    def start_ray_head(num_cpus: int, env: dict[str, str]) -> tuple[str, str, str]:
        envs.append(env)
        raise launcher.LaunchError("stop here")

    monkeypatch.setattr(launcher, "port_in_use", lambda port: False)
    monkeypatch.setattr(launcher, "start_redis", lambda state_dir: ("redis://127.0.0.1:1/0", None))
    monkeypatch.setattr(launcher, "stop_redis", lambda url: None)
    monkeypatch.setattr(launcher, "start_ray_head", start_ray_head)
    monkeypatch.delenv("REDIS_URL", raising=False)

    result = runner.invoke(cli.app, ["up", "--engine", "fake", "--state-dir", str(tmp_path), *args])

    assert result.exit_code == 1 and "stop here" in result.output
    (env,) = envs
    assert {name: value for name, value in env.items() if name.startswith("RAY_SERVE_")} == {**PROXY_ENV, **mode_env}
    assert env["RAY_worker_niceness"] == "0"  # the replicas run at the host's normal priority


def test_an_unknown_serve_mode_is_refused_before_anything_starts(tmp_path: Path, nothing_starts: list[str]) -> None:
    result = runner.invoke(cli.app, ["up", "--engine", "fake", "--serve-mode", "nginx", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "--serve-mode must be one of haproxy, proxy" in result.output
    assert nothing_starts == []
