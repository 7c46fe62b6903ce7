"""The Helm chart, rendered by the real Helm binary that scripts/install.sh puts in .tools/bin.

No cluster is needed: `helm lint` and `helm template` run offline. What is checked here is
what can be checked without one: the values schema and cross-field rules, the serveConfigV2
against the app's own argument model, the worker groups' GPUs, core objects against the
Kubernetes schemas, and the RayService against KubeRay's v1 fields.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from tokenmart.cluster import helm_schema
from tokenmart.deployments.app import IMPORT_PATH, AppArgs, build_app
from tokenmart.deployments.catalog import load_catalog

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "tokenmart"
EXAMPLES = sorted((CHART / "examples").glob("values-*.yaml"))
KUBERNETES_VERSION = "1.30.0"
CORE_KINDS = {"Secret", "Service", "StatefulSet", "ConfigMap", "Ingress"}


def _helm() -> str:
    for candidate in (os.environ.get("HELM"), str(REPO_ROOT / ".tools" / "bin" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("no helm binary: run scripts/install.sh (it installs one into .tools/bin) or set HELM")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(*values_files: Path, release: str = "tokenmart") -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", "market"]
    for path in values_files:
        args += ["-f", str(path)]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def render_error(tmp_path: Path, values: dict[str, Any], *base: Path) -> str:
    """Render with `values` on top of `base`; the render must fail. Returns Helm's message."""
    extra = tmp_path / "values.yaml"
    extra.write_text(yaml.safe_dump(values))
    args = ["template", "tokenmart", str(CHART)]
    for path in (*base, extra):
        args += ["-f", str(path)]
    result = helm(*args, check=False)
    assert result.returncode != 0, "the render should have failed"
    return result.stderr


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, [doc["kind"] for doc in docs]
    return found[0]


def serve_app(rayservice: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app


GPU_VALUES = CHART / "examples" / "values-gpu.yaml"
CPU_VALUES = CHART / "examples" / "values-cpu.yaml"


# -- lint and render ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_passes(values: Path | None):
    args = ["lint", str(CHART)] + (["-f", str(values)] if values else [])
    result = helm(*args)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_the_serve_config_is_the_app_builder_with_args_the_app_accepts(values: Path | None):
    rayservice = one(render(*([values] if values else [])), "RayService")
    app = serve_app(rayservice)
    assert (app["name"], app["route_prefix"]) == ("tokenmart", "/")
    assert app["import_path"] == IMPORT_PATH

    # The chart and the code cannot drift: the args validate against the app's own model and
    # build the Serve application (no Ray cluster needed).
    args = AppArgs.model_validate(app["args"])
    assert build_app(args) is not None
    assert "redis_url" not in app["args"]  # it comes from a Secret, through REDIS_URL


def test_the_gpu_example_serves_exactly_the_repository_gpu_catalog():
    app = serve_app(one(render(GPU_VALUES), "RayService"))
    catalog = AppArgs.model_validate(app["args"]).load_catalog()
    assert catalog == load_catalog(REPO_ROOT / "cluster" / "catalog" / "gpu-example.yaml")


def test_the_cpu_example_serves_the_local_smollm2_listing_and_its_adapter():
    app = serve_app(one(render(CPU_VALUES), "RayService"))
    catalog = AppArgs.model_validate(app["args"]).load_catalog()
    local = load_catalog(REPO_ROOT / "cluster" / "catalog" / "local.yaml")
    assert [offer.id for offer in catalog.offers] == [offer.id for offer in local.offers]
    assert catalog.listings[0].pricing == local.listings[0].pricing
    assert catalog.listings[0].autoscaling.max_replicas == 2


# -- the Ray cluster ---------------------------------------------------------------------------------


def test_each_worker_group_gets_the_gpus_its_values_name():
    values = yaml.safe_load(GPU_VALUES.read_text())
    spec = one(render(GPU_VALUES), "RayService")["spec"]["rayClusterConfig"]
    rendered = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert list(rendered) == [group["name"] for group in values["rayCluster"]["workerGroups"]]
    for group in values["rayCluster"]["workerGroups"]:
        spec_group = rendered[group["name"]]
        gpus = str(group["gpusPerWorker"])
        (container,) = spec_group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert spec_group["rayStartParams"]["num-gpus"] == gpus
        assert spec_group["rayStartParams"]["resources"] == f'"{{\\"accelerator_type:{group["acceleratorType"]}\\":1}}"'
        assert (spec_group["minReplicas"], spec_group["maxReplicas"]) == (group["minReplicas"], group["maxReplicas"])
        assert spec_group["template"]["spec"]["nodeSelector"] == group["nodeSelector"]
        assert spec_group["template"]["spec"]["tolerations"] == group["tolerations"]


def test_the_head_schedules_no_gpu_work_and_the_cluster_autoscales():
    spec = one(render(GPU_VALUES), "RayService")["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["upscalingMode"] == "Default"
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}


def test_secrets_reach_the_pods_from_secrets_never_from_values():
    docs = render(GPU_VALUES)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        env = {item["name"]: item for item in template["spec"]["containers"][0]["env"]}
        assert env["TOKENMART_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "tokenmart-admin",
            "key": "admin-token",
        }
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "tokenmart-redis",
            "key": "redis-password",
        }
        assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@tokenmart-redis:6379/0"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    secrets = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Secret"}
    assert set(secrets) == {"tokenmart-admin", "tokenmart-redis"}
    assert all(doc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for doc in secrets.values())


def test_every_ray_pod_loads_the_request_id_guard_into_the_serve_proxy():
    """Same variable and value as `tokenmart up` (request_id.PROXY_ENV): a request id that is not
    UTF-8 would otherwise be a bare 500 from Ray's proxy on every route."""
    from tokenmart.deployments.request_id import PROXY_ENV

    for values in (GPU_VALUES, CPU_VALUES):
        cluster = one(render(values), "RayService")["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for template in templates:
            env = {item["name"]: item.get("value") for item in template["spec"]["containers"][0]["env"]}
            assert {name: env.get(name) for name in PROXY_ENV} == PROXY_ENV


def test_existing_secrets_are_used_and_none_is_created(tmp_path: Path):
    values = tmp_path / "secrets.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "adminToken": {"existingSecret": "ops-admin", "key": "token"},
                "redis": {"enabled": False, "external": {"existingSecret": "ops-redis", "urlKey": "url"}},
            }
        )
    )
    docs = render(CPU_VALUES, values)
    assert not [doc for doc in docs if doc["kind"] in ("Secret", "StatefulSet")]
    env = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    by_name = {item["name"]: item for item in env}
    assert by_name["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ops-redis", "key": "url"}
    assert "REDIS_PASSWORD" not in by_name
    assert by_name["TOKENMART_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ops-admin", "key": "token"}


def test_in_chart_redis_persists_with_aof_and_a_password():
    redis = one(render(), "StatefulSet")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert container["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_monitoring_selects_every_ray_pod_and_ships_the_dashboard(tmp_path: Path):
    values = tmp_path / "monitoring.yaml"
    values.write_text(yaml.safe_dump({"monitoring": {"serviceMonitor": {"enabled": True}}}))
    docs = render(GPU_VALUES, values)
    pod_monitor = one(docs, "PodMonitor")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {port["name"]: port["containerPort"] for port in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    dashboard = next(
        doc for doc in docs if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "tokenmart-dashboard"
    )
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["tokenmart.json"] == (CHART / "dashboards" / "tokenmart.json").read_text().strip()


def test_the_ingress_points_at_the_api_service_and_does_not_buffer_streams():
    docs = render(GPU_VALUES)
    ingress = one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    serve_service = one(docs, "RayService")["spec"]["serveService"]
    assert backend == {"name": serve_service["metadata"]["name"], "port": {"number": 8000}}
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_notes_say_how_to_get_a_key():
    result = helm("install", "tokenmart", str(CHART), "--dry-run=client", "-f", str(CPU_VALUES), "-n", "market")
    assert "get secret tokenmart-admin" in result.stdout
    assert "/admin/v1/keys" in result.stdout


# -- schema and cross-field rules ----------------------------------------------------------------------


def test_the_committed_values_schema_is_generated_from_the_models():
    assert (CHART / "values.schema.json").read_text() == helm_schema.render(), (
        "values.schema.json is stale: run python -m tokenmart.cluster.helm_schema"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"upgradeStrategy": "Recreate"}, "at '/upgradeStrategy': value must be one of 'NewCluster', 'None'"),
        ({"service": {"type": "Internal"}}, "at '/service/type'"),
        ({"rayCluster": {"workerGroups": [{"name": "G", "gpusPerWorker": 1, "minReplicas": 0, "maxReplicas": 1}]}},
         "at '/rayCluster/workerGroups/0/name'"),
        ({"rayCluster": {"workerGroups": [{"name": "g", "gpusPerWorker": -1, "minReplicas": 0, "maxReplicas": 1}]}},
         "at '/rayCluster/workerGroups/0/gpusPerWorker': minimum: got -1, want 0"),
        ({"app": {"ingress": {"min_replicas": 0}}}, "at '/app/ingress/min_replicas'"),
        ({"redis": {"persistence": {"size": "lots"}}}, "at '/redis/persistence/size'"),
        ({"adminToken": {"value": "plain-text-token"}}, "additional properties 'value' not allowed"),
    ],
)  # fmt: skip
def test_the_schema_rejects_bad_values_naming_them(tmp_path: Path, change: dict, message: str):
    assert message in render_error(tmp_path, change, CPU_VALUES)


def _gpu_listing(index: int) -> dict[str, Any]:
    return yaml.safe_load(GPU_VALUES.read_text())["catalog"]["models"][index]


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _gpu_models(**engine: Any) -> dict[str, Any]:
    models = yaml.safe_load(GPU_VALUES.read_text())["catalog"]["models"]
    models[1]["engine"].update(engine)
    return {"catalog": {"models": models}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"catalog": {"models": [{**yaml.safe_load(GPU_VALUES.read_text())["catalog"]["models"][0],
                                 "accelerator": {"kind": "gpu", "type": "L4", "group": "gpu-h100"}}]}},
         "catalog.models[0] (llama-3.1-8b-instruct): accelerator.group \"gpu-h100\" is not in rayCluster.workerGroups "
         "(gpu-a100x4, gpu-l4)"),
        (_gpu_models(tensor_parallel_size=8),
         "catalog.models[1] (llama-3.3-70b-instruct): tensor_parallel_size 8 is larger than gpusPerWorker 4 of worker "
         "group \"gpu-a100x4\"; a tensor-parallel group must fit one node"),
        (_gpu_models(tensor_parallel_size=4, pipeline_parallel_size=4),
         "catalog.models[1] (llama-3.3-70b-instruct): tensor_parallel_size x pipeline_parallel_size = 16 GPUs, more "
         "than worker group \"gpu-a100x4\" can ever have (gpusPerWorker 4 x maxReplicas 2)"),
        ({"catalog": {"models": [_without(_gpu_listing(0), "accelerator")]}},
         "catalog.models[0] (llama-3.1-8b-instruct): a GPU listing must name its worker group in accelerator.group "
         "(one of: gpu-l4, gpu-a100x4)"),
        ({"redis": {"enabled": False}},
         "redis.external.existingSecret: with redis.enabled false, name the Secret that holds the Redis URL"),
    ],
    ids=["unknown-group", "tp-above-node", "tp-pp-above-group", "gpu-without-group", "redis-nowhere"],
)  # fmt: skip
def test_cross_field_rules_fail_the_render_naming_the_value(tmp_path: Path, change: dict, message: str):
    assert message in render_error(tmp_path, change, GPU_VALUES)


def test_a_cpu_group_cannot_host_a_gpu_listing(tmp_path: Path):
    models = yaml.safe_load(GPU_VALUES.read_text())["catalog"]["models"][:1]
    models[0]["accelerator"] = {"kind": "gpu", "group": "cpu"}
    error = render_error(tmp_path, {"catalog": {"models": models}}, CPU_VALUES)
    assert 'accelerator.group "cpu" has gpusPerWorker 0 (a CPU group)' in error


# -- Kubernetes and KubeRay schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_core_objects_validate_against_the_kubernetes_schema(values: Path | None):
    docs = render(*([values] if values else []))
    core = [doc for doc in docs if doc["kind"] in CORE_KINDS]
    assert {doc["kind"] for doc in core} >= {"Secret", "Service", "StatefulSet", "ConfigMap"}
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    # The pod templates and the API Service inside the RayService are core objects too.
    spec = one(docs, "RayService")["spec"]
    cluster = spec["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "Service", **spec["serveService"]}, KUBERNETES_VERSION, strict=True
    )


class _KubeRay(BaseModel):
    """KubeRay's ray.io/v1 RayService fields the chart uses, as its API reference documents
    them (v1.3+); any other field is an error, so a misspelt field fails here."""

    model_config = ConfigDict(extra="forbid")


class _AutoscalerOptions(_KubeRay):
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None
    idleTimeoutSeconds: int | None = None
    resources: dict[str, Any] | None = None


class _HeadGroupSpec(_KubeRay):
    rayStartParams: dict[str, str]
    template: dict[str, Any]


class _WorkerGroupSpec(_KubeRay):
    groupName: str
    replicas: int = Field(ge=0)
    minReplicas: int = Field(ge=0)
    maxReplicas: int = Field(ge=1)
    rayStartParams: dict[str, str]
    template: dict[str, Any]


class _RayClusterSpec(_KubeRay):
    rayVersion: str
    enableInTreeAutoscaling: bool
    autoscalerOptions: _AutoscalerOptions | None = None
    headGroupSpec: _HeadGroupSpec
    workerGroupSpecs: list[_WorkerGroupSpec]


class _UpgradeStrategy(_KubeRay):
    type: Literal["NewCluster", "None", "NewClusterWithIncrementalUpgrade"]


class _RayServiceSpec(_KubeRay):
    upgradeStrategy: _UpgradeStrategy
    serviceUnhealthySecondThreshold: int
    deploymentUnhealthySecondThreshold: int
    serveConfigV2: str
    serveService: dict[str, Any]
    rayClusterConfig: _RayClusterSpec


class _RayService(_KubeRay):
    apiVersion: Literal["ray.io/v1"]
    kind: Literal["RayService"]
    metadata: dict[str, Any]
    spec: _RayServiceSpec


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_the_rayservice_uses_only_kuberay_v1_fields(values: Path | None):
    rayservice = _RayService.model_validate(one(render(*([values] if values else [])), "RayService"))
    for group in rayservice.spec.rayClusterConfig.workerGroupSpecs:
        assert group.minReplicas <= group.replicas <= group.maxReplicas


def test_the_plain_manifests_are_what_the_chart_renders(tmp_path: Path):
    """k8s/manifests is for users without Helm; scripts/render-k8s.sh regenerates it."""
    fresh = tmp_path / "tokenmart-cpu.yaml"
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "render-k8s.sh"), str(fresh)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HELM": _helm()},
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    committed = REPO_ROOT / "k8s" / "manifests" / "tokenmart-cpu.yaml"
    assert committed.read_text() == fresh.read_text(), "k8s/manifests is stale: run scripts/render-k8s.sh"
    docs = [doc for doc in yaml.safe_load_all(committed.read_text()) if doc]
    assert not [doc for doc in docs if doc["kind"] == "Secret"]  # created by the operator with kubectl
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _pod_annotations(*values_files: Path) -> list[dict[str, str]]:
    cluster = one(render(*values_files), "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [template["metadata"].get("annotations", {}) for template in templates]


def test_a_catalog_change_rolls_a_new_cluster_through_the_serve_config_checksum(tmp_path: Path):
    before = _pod_annotations(CPU_VALUES)
    digest = before[0]["tokenmart.io/serve-config-sha256"]
    assert len(digest) == 64 and all(a["tokenmart.io/serve-config-sha256"] == digest for a in before)
    assert _pod_annotations(CPU_VALUES) == before  # same values, same pods: no upgrade

    models = yaml.safe_load(CPU_VALUES.read_text())["catalog"]["models"]
    models[0]["pricing"]["completion_usd_per_1m"] = 0.05
    repriced = tmp_path / "repriced.yaml"
    repriced.write_text(yaml.safe_dump({"catalog": {"models": models}}))
    assert _pod_annotations(CPU_VALUES, repriced)[0]["tokenmart.io/serve-config-sha256"] != digest

    in_place = tmp_path / "in-place.yaml"
    in_place.write_text(yaml.safe_dump({"rayCluster": {"rolloutOnServeConfigChange": False}}))
    assert all("tokenmart.io/serve-config-sha256" not in a for a in _pod_annotations(CPU_VALUES, in_place))


def test_every_ray_pod_keeps_its_settlement_spool_on_a_volume(tmp_path: Path):
    host = tmp_path / "host.yaml"
    host.write_text(yaml.safe_dump({"rayCluster": {"spool": {"hostPath": "/var/lib/tokenmart"}}}))
    for values, volume in [
        ((CPU_VALUES,), {"name": "spool", "emptyDir": {}}),
        (
            (CPU_VALUES, host),
            {"name": "spool", "hostPath": {"path": "/var/lib/tokenmart", "type": "DirectoryOrCreate"}},
        ),
    ]:
        cluster = one(render(*values), "RayService")["spec"]["rayClusterConfig"]
        for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
            (container,) = template["spec"]["containers"]
            env = {item["name"]: item.get("value") for item in container["env"]}
            assert env["TOKENMART_SPOOL_DIR"] == "/var/lib/tokenmart/spool"
            assert {"name": "spool", "mountPath": "/var/lib/tokenmart/spool"} in container["volumeMounts"]
            assert template["spec"]["volumes"] == [volume]
