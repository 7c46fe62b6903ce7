"""`tokenmart migrate` and `tokenmart up` on data the version before organizations wrote
(tests/fixtures/layout1.json), in a Redis database of its own on the real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from tokenmart.cluster import cli, launcher
from tokenmart.cluster.state import ClusterState
from tokenmart.deployments.keystore import SCHEMA_KEY, org_key
from tokenmart.deployments.migrate import LEGACY_KEY_INDEX, legacy_org_id
from tokenmart.deployments.scripts import account_key

from .test_migrate import FIXTURE, layout1_database, old

pytestmark = pytest.mark.integration

DB = 8  # its own database: test_migrate.py uses 7, the other tests 0
KEY_IDS = sorted(FIXTURE["secrets"])
LEDGER_EVENTS = sum(len(old(account_key(key_id, "ledger"))) for key_id in KEY_IDS)


@pytest.fixture
def legacy(redis_server) -> Iterator[redis.Redis]:
    with layout1_database(redis_server, DB) as client:
        yield client


@pytest.fixture
def url(redis_server) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{DB}"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200"})


def assert_migrated(client: redis.Redis) -> None:
    assert client.get(SCHEMA_KEY) == "2" and not client.exists(LEGACY_KEY_INDEX)
    for key_id in KEY_IDS:
        record = old(account_key(key_id, "key"))
        org = client.hgetall(org_key(legacy_org_id(key_id)))
        assert (org["balance_micros"], org["credited_micros"]) == (record["balance_micros"], record["credited_micros"])
    assert not list(client.scan_iter(match="{acct:key_*"))


def test_migrate_moves_the_data_of_the_given_url_and_says_what_it_did(legacy, url):
    result = invoke("migrate", "--redis-url", url)
    assert result.exit_code == 0, result.output
    assert f"data layout 1 -> 2 in {url}" in result.stdout
    assert f"keys migrated: 3 ({', '.join(KEY_IDS)})" in result.stdout
    assert f"ledger events moved: {LEDGER_EVENTS:,}" in result.stdout
    assert "settlement markers moved: " in result.stdout
    assert_migrated(legacy)

    again = invoke("migrate", "--redis-url", url)
    assert again.exit_code == 0, again.output
    assert f"nothing to migrate: {url} is in data layout 2" in again.stdout


def test_migrate_uses_the_local_clusters_redis(legacy, url, tmp_path: Path):
    ClusterState(
        api_base="http://127.0.0.1:1",
        admin_token="t",
        redis_url=url,
        redis_managed=False,
        ray_address="127.0.0.1:1",
        dashboard_url="http://127.0.0.1:2",
        catalog_path="x",
    ).save(tmp_path)
    result = invoke("migrate", "--state-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "keys migrated: 3" in result.stdout
    assert_migrated(legacy)


def test_migrate_without_a_cluster_or_url_exits_1(tmp_path: Path):
    result = invoke("migrate", "--state-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "no local cluster is recorded: give --redis-url" in result.stderr


def test_migrate_of_an_unreachable_redis_exits_1_with_its_url_redacted():
    dead = f"redis://:hunter2@127.0.0.1:{launcher.free_port()}/{DB}"
    result = invoke("migrate", "--redis-url", dead)
    assert result.exit_code == 1
    assert f"migrating redis://:***@127.0.0.1:{dead.rsplit(':', 1)[1]} stopped" in result.stderr
    assert "hunter2" not in result.output


def test_up_migrates_before_it_starts_ray(legacy, url, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    seen: list[str | None] = []

    def start_ray_head(*args, **kwargs):
        seen.append(legacy.get(SCHEMA_KEY))  # what Ray, and the app after it, would find
        raise launcher.LaunchError("stop here")

    monkeypatch.setattr(launcher, "start_ray_head", start_ray_head)
    with pytest.raises(launcher.LaunchError, match="stop here"):
        launcher.up(tmp_path, port=launcher.free_port(), redis_url=url, engine="fake")
    assert seen == ["2"]
    assert_migrated(legacy)
    assert f"migrated 3 key(s) to the organization layout ({LEDGER_EVENTS:,} ledger events)" in capsys.readouterr().err
