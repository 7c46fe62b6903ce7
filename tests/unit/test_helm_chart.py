"""The Helm chart, rendered by the real Helm binary that scripts/install.sh puts in .tools/bin.

No cluster is needed: `helm lint` and `helm template` run offline. What is checked here is
what can be checked without one: the values schema and cross-field rules, the serveConfigV2
against the app's own argument model, the worker groups' GPUs, core objects against the
Kubernetes schemas (`kubernetes-validate --strict`), and the RayService, PodMonitor and
ServiceMonitor against the real CRD schemas in ../shared/kuberay/, with unknown fields refused.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tokenmart.cluster import helm_schema
from tokenmart.deployments.app import IMPORT_PATH, AppArgs, build_app
from tokenmart.deployments.catalog import load_catalog

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "tokenmart"
EXAMPLES = sorted((CHART / "examples").glob("values-*.yaml"))
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion), one in between, and a current one.
KUBERNETES_VERSIONS = ("1.27.0", "1.30.0", "1.35.0")
CORE_KINDS = {"Secret", "Service", "StatefulSet", "ConfigMap", "Ingress", "PersistentVolumeClaim"}
# The CRDs beside the checkout (the workplace's ../shared/kuberay/), or TOKENMART_CRD_DIR.
CRD_DIR = Path(os.environ.get("TOKENMART_CRD_DIR") or REPO_ROOT.parent / "shared" / "kuberay")
# KubeRay's RayService CRD at the oldest release the chart supports and at its main branch.
RAYSERVICE_CRDS = ("ray.io_rayservices.v1.3.0.yaml", "ray.io_rayservices.head-feeaf72.yaml")
CRD_FILES = {
    "PodMonitor": ("monitoring.coreos.com_podmonitors.yaml",),
    "ServiceMonitor": ("monitoring.coreos.com_servicemonitors.yaml",),
    "RayService": RAYSERVICE_CRDS,
}


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
        ({"upgradeStrategy": {"type": "Recreate"}},
         "at '/upgradeStrategy/type': value must be one of 'NewCluster', 'None', 'NewClusterWithIncrementalUpgrade'"),
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


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones, as an API server
    with field validation would: a misspelt field fails instead of being dropped."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    listed = "properties" in strict and "additionalProperties" not in strict
    if listed and not strict.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def crd_spec_validator(crd_file: str) -> jsonschema.protocols.Validator:
    path = CRD_DIR / crd_file
    if not path.is_file():
        pytest.fail(
            f"no CRD schema at {path}: put KubeRay's and prometheus-operator's CRDs in ../shared/kuberay/"
            " beside the checkout, or set TOKENMART_CRD_DIR"
        )
    crd = yaml.safe_load(path.read_text())
    (version,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict[str, Any], crd_file: str) -> list[str]:
    errors = crd_spec_validator(crd_file).iter_errors(doc["spec"])
    return [f"{crd_file}: spec.{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in errors]


def pod_templates(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]


def validate_rendered(docs: list[dict[str, Any]]) -> None:
    """Every rendered object against the schema a cluster would check it with: core objects (and the
    pod templates and API Service inside the RayService) with kubernetes-validate in strict mode
    for each supported Kubernetes version, custom resources against their CRDs in strict mode."""
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        elif doc["kind"] in CRD_FILES:
            errors = [error for crd in CRD_FILES[doc["kind"]] for error in crd_errors(doc, crd)]
            assert not errors, "\n".join(errors)
        else:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: no schema to validate it against")
    for rayservice in (doc for doc in docs if doc["kind"] == "RayService"):
        for template in pod_templates(rayservice):
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(pod_template, version, strict=True)
        service = {"apiVersion": "v1", "kind": "Service", **rayservice["spec"]["serveService"]}
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(service, version, strict=True)


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_every_object_validates_against_kubernetes_and_the_crds(values: Path | None):
    docs = render(*([values] if values else []))
    assert {doc["kind"] for doc in docs} >= {"Secret", "Service", "StatefulSet", "ConfigMap", "RayService"}
    validate_rendered(docs)
    for group in one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_the_strict_crd_check_refuses_a_misspelt_field():
    rayservice = one(render(CPU_VALUES), "RayService")
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    rayservice["spec"]["serviceUnhealthySecondTreshold"] = 900
    for crd in RAYSERVICE_CRDS:
        errors = crd_errors(rayservice, crd)
        assert any("'rayStartParam' was unexpected" in error for error in errors), errors
        assert any("'serviceUnhealthySecondTreshold' was unexpected" in error for error in errors), errors


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
    validate_rendered(docs)


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
