"""The chart's billing Redis: memory that is never evicted, persistence from values, and the
sentinel mode (a primary, replicas and Sentinels) whose URL the app's own parser accepts.
Rendered by the real Helm binary and validated like every render (test_helm_chart.validate_rendered).
The start scripts in helm/tokenmart/files/redis are checked here only as the pods receive them;
what they do is Redis's behaviour, which needs real processes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tokenmart.deployments.redis_connection import parse_sentinel_url

from .test_helm_chart import CHART, CPU_VALUES, GPU_VALUES, one, pod_templates, render, render_error, validate_rendered
from .test_helm_operator import _pod_specs, assert_valid_names, render_with, restricted_violations, values_file

SENTINEL = {"redis": {"mode": "sentinel"}}
PASSWORD = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def _by_name(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _container(statefulset: dict[str, Any]) -> dict[str, Any]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def _settings(args: list[str]) -> dict[str, list[str]]:
    """redis-server's `--name value...` arguments as {name: [values]}."""
    settings: dict[str, list[str]] = {}
    name = None
    for arg in args:
        if arg.startswith("--"):
            name = arg[2:]
            settings[name] = []
        else:
            assert name is not None, args
            settings[name].append(arg)
    return settings


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container["env"]}


def _ray_envs(docs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [template["spec"]["containers"][0]["env"] for template in pod_templates(one(docs, "RayService"))]


# -- memory and persistence, in both modes ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["standalone", "sentinel"])
def test_redis_caps_its_memory_and_never_evicts_in_both_modes(tmp_path: Path, mode: str):
    docs = render_with(tmp_path, {"redis": {"mode": mode}}, CPU_VALUES)
    settings = _settings(_container(_by_name(docs, "StatefulSet")["tokenmart-redis"])["args"])
    assert settings["maxmemory"] == ["768mb"]
    assert settings["maxmemory-policy"] == ["noeviction"]
    assert settings["appendonly"] == ["yes"]
    assert settings["appendfsync"] == ["everysec"]
    assert settings["save"] == [""]  # no RDB snapshots by default: AOF holds everything
    assert settings["requirepass"] == ["$(REDIS_PASSWORD)"]
    assert settings["dir"] == ["/data"]


def test_persistence_and_memory_values_reach_redis(tmp_path: Path):
    values = {"redis": {"maxmemory": "3gb", "persistence": {"appendfsync": "always", "rdbSnapshots": True}}}
    settings = _settings(_container(one(render_with(tmp_path, values, CPU_VALUES), "StatefulSet"))["args"])
    assert settings["maxmemory"] == ["3gb"]
    assert settings["maxmemory-policy"] == ["noeviction"]
    assert settings["appendfsync"] == ["always"]
    assert settings["save"] == ["3600", "1", "300", "100", "60", "10000"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"redis": {"maxmemory": "0"}}, "at '/redis/maxmemory'"),  # 0 is "no limit" to Redis
        ({"redis": {"maxmemory": "768Mi"}}, "at '/redis/maxmemory'"),  # a Kubernetes quantity, not Redis's
        ({"redis": {"maxmemoryPolicy": "allkeys-lru"}}, "additional properties 'maxmemoryPolicy' not allowed"),
        ({"redis": {"persistence": {"appendfsync": "sometimes"}}},
         "at '/redis/persistence/appendfsync': value must be one of 'always', 'everysec', 'no'"),
        ({"redis": {"mode": "cluster"}}, "at '/redis/mode': value must be one of 'standalone', 'sentinel'"),
        ({"redis": {"sentinel": {"replicas": 0}}}, "at '/redis/sentinel/replicas': minimum: got 0, want 1"),
    ],
)  # fmt: skip
def test_the_schema_refuses_redis_values_that_cannot_work(tmp_path: Path, change: dict, message: str):
    assert message in render_error(tmp_path, change, CPU_VALUES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"redis": {"mode": "sentinel", "replicas": 0}},
         "redis.replicas: sentinel mode needs at least 1 replica to fail over to"),
        ({"redis": {"mode": "sentinel", "sentinel": {"replicas": 3, "quorum": 4}}},
         "redis.sentinel.quorum: 3 Sentinels can never agree as 4 (set it to at most redis.sentinel.replicas)"),
    ],
)  # fmt: skip
def test_sentinel_values_that_cannot_fail_over_fail_the_render(tmp_path: Path, change: dict, message: str):
    assert message in render_error(tmp_path, change, CPU_VALUES)


# -- sentinel mode ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [CPU_VALUES, GPU_VALUES], ids=["cpu", "gpu"])
def test_sentinel_mode_renders_a_primary_replicas_and_sentinels_that_validate(tmp_path: Path, base: Path):
    docs = render_with(tmp_path, SENTINEL, base)
    validate_rendered(docs)
    statefulsets = _by_name(docs, "StatefulSet")
    assert set(statefulsets) == {"tokenmart-redis", "tokenmart-sentinel"}
    assert statefulsets["tokenmart-redis"]["spec"]["replicas"] == 3  # the primary and redis.replicas 2
    assert statefulsets["tokenmart-sentinel"]["spec"]["replicas"] == 3
    services = _by_name(docs, "Service")
    # No load-balanced Service in front of the data nodes: a client on it could write to a replica.
    assert set(services) == {"tokenmart-redis-headless", "tokenmart-sentinel"}
    for name, service in services.items():
        assert service["spec"]["clusterIP"] == "None", name
        assert service["spec"]["publishNotReadyAddresses"] is True, name
    assert statefulsets["tokenmart-redis"]["spec"]["serviceName"] == "tokenmart-redis-headless"
    assert statefulsets["tokenmart-sentinel"]["spec"]["serviceName"] == "tokenmart-sentinel"
    assert statefulsets["tokenmart-sentinel"]["spec"]["podManagementPolicy"] == "Parallel"


def test_the_app_gets_a_sentinel_url_naming_every_sentinel_that_its_parser_accepts(tmp_path: Path):
    values = {"redis": {"mode": "sentinel", "sentinel": {"replicas": 5, "quorum": 3, "masterName": "billing"}}}
    docs = render_with(tmp_path, values, CPU_VALUES)
    sentinels = _by_name(docs, "StatefulSet")["tokenmart-sentinel"]
    service = sentinels["spec"]["serviceName"]
    # A Sentinel pod's stable DNS name: <pod>.<its headless Service>.<namespace>.svc
    expected = tuple((f"tokenmart-sentinel-{i}.{service}.market.svc", 26379) for i in range(5))
    for env in _ray_envs(docs):
        names = [item["name"] for item in env]
        # Kubernetes expands $(REDIS_PASSWORD) only from variables defined before REDIS_URL.
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
        by_name = {item["name"]: item for item in env}
        assert by_name["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "tokenmart-redis",
            "key": "redis-password",
        }
        url = by_name["REDIS_URL"]["value"]
        assert url.startswith("redis+sentinel://")
        target = parse_sentinel_url(url.replace("$(REDIS_PASSWORD)", PASSWORD))
        assert target.sentinels == expected
        assert (target.service_name, target.db) == ("billing", 0)
        assert (target.username, target.password) == (None, PASSWORD)
        assert target.sentinel_password == PASSWORD
        assert target.wait_replicas == 1  # key and credit writes wait for a replica


def test_sentinels_and_data_nodes_agree_on_every_name_the_start_scripts_build(tmp_path: Path):
    """The scripts name members as $DATA_NAME-N.$DATA_DOMAIN and $SENTINEL_NAME-N.$SENTINEL_DOMAIN:
    those must be the StatefulSets' pods behind their headless Services."""
    values = {
        "redis": {
            "mode": "sentinel",
            "replicas": 1,
            "sentinel": {"masterName": "billing", "quorum": 2, "downAfterMilliseconds": 3000, "failoverTimeout": 20000},
        }
    }
    docs = render_with(tmp_path, values, CPU_VALUES)
    statefulsets = _by_name(docs, "StatefulSet")
    data, sentinel = statefulsets["tokenmart-redis"], statefulsets["tokenmart-sentinel"]
    data_env, sentinel_env = _env(_container(data)), _env(_container(sentinel))
    for env in (data_env, sentinel_env):
        assert {name: env[name]["value"] for name in env if "value" in env[name]}.items() >= {
            "MASTER_NAME": "billing",
            "DATA_NAME": data["metadata"]["name"],
            "DATA_DOMAIN": f"{data['spec']['serviceName']}.market.svc",
            "DATA_COUNT": str(data["spec"]["replicas"]),
            "SENTINEL_NAME": sentinel["metadata"]["name"],
            "SENTINEL_DOMAIN": f"{sentinel['spec']['serviceName']}.market.svc",
            "SENTINEL_COUNT": str(sentinel["spec"]["replicas"]),
        }.items()
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "tokenmart-redis",
            "key": "redis-password",
        }
    assert data["spec"]["replicas"] == 2
    assert {
        name: sentinel_env[name]["value"] for name in ("QUORUM", "DOWN_AFTER_MILLISECONDS", "FAILOVER_TIMEOUT")
    } == {
        "QUORUM": "2",
        "DOWN_AFTER_MILLISECONDS": "3000",
        "FAILOVER_TIMEOUT": "20000",
    }
    # Data nodes start through the script, with the chart's settings and the primary's password.
    container = _container(data)
    assert container["command"] == ["sh", "/scripts/start-redis.sh"]
    settings = _settings(container["args"])
    assert settings["masterauth"] == ["$(REDIS_PASSWORD)"]
    assert settings["maxmemory-policy"] == ["noeviction"]
    assert _container(sentinel)["command"] == ["sh", "/scripts/start-sentinel.sh"]


def test_the_pods_run_the_scripts_of_the_chart_and_roll_when_they_change(tmp_path: Path):
    docs = render_with(tmp_path, SENTINEL, CPU_VALUES)
    scripts = _by_name(docs, "ConfigMap")["tokenmart-redis-scripts"]["data"]
    files = CHART / "files" / "redis"
    assert scripts == {path.name: path.read_text() for path in files.glob("*.sh")}
    for statefulset in _by_name(docs, "StatefulSet").values():
        spec = statefulset["spec"]["template"]["spec"]
        (volume,) = [volume for volume in spec["volumes"] if volume["name"] == "scripts"]
        assert volume["configMap"]["name"] == "tokenmart-redis-scripts"
        assert {"name": "scripts", "mountPath": "/scripts", "readOnly": True} in _container(statefulset)["volumeMounts"]
        assert len(statefulset["spec"]["template"]["metadata"]["annotations"]["checksum/redis-scripts"]) == 64


def test_sentinel_mode_pods_meet_the_restricted_pod_security_level(tmp_path: Path):
    docs = render(GPU_VALUES, values_file(tmp_path, SENTINEL))
    specs = _pod_specs(docs)
    assert {"tokenmart-redis", "tokenmart-sentinel"} <= set(specs)
    for name, spec in specs.items():
        assert restricted_violations(spec) == [], name
    for name in ("tokenmart-redis", "tokenmart-sentinel"):
        security = specs[name]["securityContext"]
        assert (security["runAsNonRoot"], security["runAsUser"]) == (True, 999)
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = specs[name]["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_sentinel_mode_spreads_its_pods_over_nodes(tmp_path: Path):
    docs = render_with(tmp_path, SENTINEL, CPU_VALUES)
    for name, component in (("tokenmart-redis", "redis"), ("tokenmart-sentinel", "redis-sentinel")):
        spec = _by_name(docs, "StatefulSet")[name]["spec"]["template"]["spec"]
        (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component


def test_sentinel_mode_names_stay_valid_for_a_long_release(tmp_path: Path):
    docs = render(CPU_VALUES, values_file(tmp_path, SENTINEL), release="a.very-long-release-name-for-the-marketplace")
    assert_valid_names(docs)
    validate_rendered(docs)
    for statefulset in _by_name(docs, "StatefulSet").values():
        last_pod = f"{statefulset['metadata']['name']}-{statefulset['spec']['replicas'] - 1}"
        assert len(last_pod) <= 63, last_pod  # a pod's hostname is one DNS label


def test_standalone_mode_is_unchanged_for_the_ray_pods(tmp_path: Path):
    """The default keeps the plain URL (changing it would roll a new Ray cluster on upgrade)."""
    docs = render(CPU_VALUES)
    for env in _ray_envs(docs):
        by_name = {item["name"]: item for item in env}
        assert by_name["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@tokenmart-redis:6379/0"
    assert set(_by_name(docs, "Service")) >= {"tokenmart-redis", "tokenmart-redis-headless"}
    assert "tokenmart-redis-scripts" not in _by_name(docs, "ConfigMap")


# -- an external Sentinel set --------------------------------------------------------------------------------


def test_an_external_sentinel_set_is_reached_through_the_url_secret(tmp_path: Path):
    values = {"redis": {"enabled": False, "external": {"existingSecret": "ops-redis-sentinel", "urlKey": "url"}}}
    docs = render_with(tmp_path, values, GPU_VALUES)
    validate_rendered(docs)
    assert not [doc for doc in docs if doc["kind"] in ("StatefulSet",) or doc["metadata"]["name"].endswith("-redis")]
    for env in _ray_envs(docs):
        by_name = {item["name"]: item for item in env}
        assert by_name["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ops-redis-sentinel", "key": "url"}
        assert "REDIS_PASSWORD" not in by_name
    # What an operator puts in that Secret, in the form values.yaml documents, is a URL the app takes.
    url = "redis+sentinel://:data-pw@sentinel-a.ops:26379,sentinel-b.ops:26379,sentinel-c.ops/billing/2?sentinel_password=s-pw"
    target = parse_sentinel_url(url)
    assert target.sentinels == (("sentinel-a.ops", 26379), ("sentinel-b.ops", 26379), ("sentinel-c.ops", 26379))
    assert (target.service_name, target.db, target.password, target.sentinel_password) == (
        "billing",
        2,
        "data-pw",
        "s-pw",
    )


def test_liveness_waits_until_the_start_scripts_have_found_the_primary(tmp_path: Path):
    """A pod killed by its liveness probe while its script still asks the set would never start."""
    files = CHART / "files" / "redis"
    resolve_wait_s = int(re.search(r"RESOLVE_WAIT_S:-(\d+)", (files / "start-sentinel.sh").read_text())[1])
    attempts = int(re.search(r"FIND_ATTEMPTS:-(\d+)", (files / "start-redis.sh").read_text())[1])
    call_timeout_s = int(re.search(r"timeout (\d+) redis-cli", (files / "lib.sh").read_text())[1])
    docs = render_with(tmp_path, SENTINEL, CPU_VALUES)
    statefulsets = _by_name(docs, "StatefulSet")
    members = (
        statefulsets["tokenmart-redis"]["spec"]["replicas"] + statefulsets["tokenmart-sentinel"]["spec"]["replicas"]
    )
    # Worst case: every member's host vanished without refusing, so each call runs out its timeout.
    for name, needed_s in (
        ("tokenmart-sentinel", resolve_wait_s + members * call_timeout_s),
        ("tokenmart-redis", attempts * (members * call_timeout_s + 2)),
    ):
        probe = _container(statefulsets[name])["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] > needed_s, name
