"""What an operator relies on when installing the chart on a real cluster: the headline GPU
deployment with its volumes, names that are valid for any release and as a subchart, Pod
Security, Secrets for GitOps, GCS fault tolerance, and catalog changes that leave the Ray
cluster alone. Rendered by the real Helm binary; every render is validated against Kubernetes
and the KubeRay CRDs (test_helm_chart.validate_rendered).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_helm_chart import (
    CHART,
    CPU_VALUES,
    GPU_VALUES,
    crd_errors,
    helm,
    one,
    pod_templates,
    render,
    render_error,
    serve_app,
    validate_rendered,
)

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Kinds whose names must be DNS labels, not just subdomains (KubeRay derives Services and pods
# from the RayService's name and needs it to start with a letter).
LABEL_NAMED = {"Service": DNS_1035_LABEL, "RayService": DNS_1035_LABEL, "StatefulSet": DNS_1123_LABEL}

# Everything the chart can render at once: the GPU example with GCS fault tolerance on.
GCS_ON = {"rayCluster": {"gcsFaultTolerance": {"enabled": True}}}


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "extra.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def render_with(tmp_path: Path, values: dict[str, Any], *base: Path, release: str = "tokenmart") -> list[dict]:
    return render(*base, values_file(tmp_path, values), release=release)


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the chart makes, by a readable name, with KubeRay's autoscaler sidecar added
    to the head as KubeRay adds it (its securityContext from autoscalerOptions)."""
    specs: dict[str, dict[str, Any]] = {}
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            specs[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            head = dict(cluster["headGroupSpec"]["template"]["spec"])
            autoscaler = {"name": "autoscaler", "securityContext": cluster["autoscalerOptions"].get("securityContext")}
            head["containers"] = [*head["containers"], autoscaler]
            specs["ray-head"] = head
            for group in cluster["workerGroupSpecs"]:
                specs[f"ray-{group['groupName']}"] = group["template"]["spec"]
    return specs


RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The checks of the `restricted` Pod Security Standard (Kubernetes 1.27+) that a pod spec
    can fail on its own: volume types, privilege, escalation, capabilities, non-root, seccomp,
    host namespaces and ports."""
    problems = []
    pod_security = spec.get("securityContext") or {}
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(field)
    if pod_security.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    for container in spec.get("initContainers", []) + spec["containers"]:
        name = container["name"]
        security = container.get("securityContext") or {}
        if security.get("privileged"):
            problems.append(f"{name}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = security.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot is not true")
        if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
            problems.append(f"{name}: runs as uid 0")
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile")) or {}
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


# -- the headline GPU deployment -------------------------------------------------------------------


def test_the_gpu_example_mounts_shm_the_model_cache_and_the_adapters_on_every_gpu_group():
    docs = render(GPU_VALUES)
    validate_rendered(docs)
    rayservice = one(docs, "RayService")
    listings = {listing["id"]: listing for listing in serve_app(rayservice)["args"]["catalog"]["listings"]}
    assert listings["llama-3.3-70b-instruct"]["engine"]["tensor_parallel_size"] == 4
    assert listings["llama-3.1-8b-instruct"]["engine"]["tensor_parallel_size"] == 1
    (adapter,) = listings["llama-3.1-8b-instruct"]["lora"]["adapters"]

    claim = one(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "tokenmart-model-cache"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "standard-rwx"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
        assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "tokenmart-model-cache"}
        assert volumes["adapters"]["persistentVolumeClaim"] == {"claimName": "tokenmart-adapters", "readOnly": True}
        (container,) = spec["containers"]
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        assert mounts["dshm"]["mountPath"] == "/dev/shm"
        assert mounts["model-cache"]["mountPath"] == "/models-cache"
        assert mounts["adapters"] == {"name": "adapters", "mountPath": "/mnt/adapters", "readOnly": True}
        assert adapter["source"].startswith(mounts["adapters"]["mountPath"] + "/")
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["HF_HOME"] == "/models-cache/huggingface"
        assert env["VLLM_CACHE_ROOT"] == "/models-cache/vllm"
    # The head loads no model: no cache, no adapters, no /dev/shm.
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert [volume["name"] for volume in head["volumes"]] == ["spool"]


def test_a_cpu_group_mounts_the_cache_and_adapters_only_when_it_asks(tmp_path: Path):
    volumes = {
        "rayCluster": {
            "modelCache": {"type": "hostPath", "hostPath": {"path": "/data/models"}},
            "adapters": {"type": "hostPath", "hostPath": "/data/adapters"},
        }
    }
    cluster = one(render_with(tmp_path, volumes, CPU_VALUES), "RayService")["spec"]["rayClusterConfig"]
    assert [v["name"] for v in cluster["workerGroupSpecs"][0]["template"]["spec"]["volumes"]] == ["spool"]

    group = yaml.safe_load(CPU_VALUES.read_text())["rayCluster"]["workerGroups"][0]
    group.update(modelCache=True, adapters=True, sharedMemory={"enabled": True, "sizeLimit": "2Gi"})
    volumes["rayCluster"]["workerGroups"] = [group]
    cluster = one(render_with(tmp_path, volumes, CPU_VALUES), "RayService")["spec"]["rayClusterConfig"]
    spec = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert spec["volumes"][1:] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
        {"name": "model-cache", "hostPath": {"path": "/data/models", "type": "DirectoryOrCreate"}},
        {"name": "adapters", "hostPath": {"path": "/data/adapters", "type": "Directory"}},
    ]


def test_a_gpu_group_can_turn_shm_off(tmp_path: Path):
    values = yaml.safe_load(GPU_VALUES.read_text())
    values["rayCluster"]["workerGroups"][0]["sharedMemory"] = {"enabled": False}
    docs = render(values_file(tmp_path, values))
    groups = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert "dshm" not in [volume["name"] for volume in groups[0]["template"]["spec"]["volumes"]]
    assert "dshm" in [volume["name"] for volume in groups[1]["template"]["spec"]["volumes"]]


POD_FIELDS = {
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]
            }
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "ray"}},
        }
    ],
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
    "nodeSelector": {"pool": "gpu"},
    "serviceAccountName": "tokenmart-ray",
    "runtimeClassName": "nvidia",
    "priorityClassName": "llm-serving",
    "labels": {"team": "inference"},
    "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
    "volumes": [{"name": "extra", "configMap": {"name": "tokenmart-extra"}}],
    "volumeMounts": [{"name": "extra", "mountPath": "/etc/extra", "readOnly": True}],
    "podSecurityContext": {
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "fsGroup": 2000,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
    },
}  # fmt: skip


def test_every_pod_field_reaches_the_head_and_each_group_as_given(tmp_path: Path):
    values = yaml.safe_load(GPU_VALUES.read_text())
    values["rayCluster"]["head"].update(POD_FIELDS)
    for group in values["rayCluster"]["workerGroups"]:
        group.update(POD_FIELDS)
    docs = render(values_file(tmp_path, values))
    validate_rendered(docs)
    for template in pod_templates(one(docs, "RayService")):
        spec = template["spec"]
        (container,) = spec["containers"]
        for field in ("affinity", "topologySpreadConstraints", "tolerations", "nodeSelector"):
            assert spec[field] == POD_FIELDS[field], field
        for field in ("serviceAccountName", "runtimeClassName", "priorityClassName"):
            assert spec[field] == POD_FIELDS[field], field
        assert spec["securityContext"] == POD_FIELDS["podSecurityContext"]
        assert container["securityContext"] == POD_FIELDS["securityContext"]
        assert template["metadata"]["labels"]["team"] == "inference"
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "ray"  # the chart's stay
        assert template["metadata"]["annotations"] == POD_FIELDS["annotations"]
        assert container["env"][-1] == {"name": "NCCL_DEBUG", "value": "WARN"}
        assert container["envFrom"] == POD_FIELDS["envFrom"]
        assert spec["volumes"][-1] == POD_FIELDS["volumes"][0]
        assert container["volumeMounts"][-1] == POD_FIELDS["volumeMounts"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rayCluster": {"head": {"volumes": [{"configMap": {"name": "x"}}]}}},
         "at '/rayCluster/head/volumes/0': missing property 'name'"),
        ({"rayCluster": {"head": {"affinity": []}}}, "at '/rayCluster/head/affinity': got array, want object"),
        ({"rayCluster": {"modelCache": {"type": "nfs"}}}, "at '/rayCluster/modelCache/type'"),
        ({"rayCluster": {"sharedMemory": {"sizeLimit": "lots"}}}, "at '/rayCluster/sharedMemory/sizeLimit'"),
    ],
)  # fmt: skip
def test_the_schema_types_the_pod_fields(tmp_path: Path, change: dict, message: str):
    assert message in render_error(tmp_path, change, CPU_VALUES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rayCluster": {"adapters": {"type": "pvc"}}},
         "rayCluster.adapters.existingClaim: with type pvc, name the claim that holds the adapters"),
        ({"rayCluster": {"modelCache": {"type": "hostPath", "hostPath": {"path": ""}}}},
         "rayCluster.modelCache.hostPath.path: with type hostPath, name the node folder of the cache"),
        ({"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}},
         "upgradeStrategy.clusterUpgradeOptions: NewClusterWithIncrementalUpgrade needs gatewayClassName, "
         "stepSizePercent and intervalSeconds"),
    ],
)  # fmt: skip
def test_volume_and_upgrade_values_that_cannot_work_fail_the_render(tmp_path: Path, change: dict, message: str):
    assert message in render_error(tmp_path, change, CPU_VALUES)


# -- the head's CPUs -----------------------------------------------------------------------------------


def _head_params(tmp_path: Path, values: dict[str, Any], base: Path) -> dict[str, str]:
    rayservice = one(render_with(tmp_path, values, base), "RayService")
    return rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]


@pytest.mark.parametrize(
    ("base", "num_cpus", "expected"),
    [
        (CPU_VALUES, 0, "0"),
        (CPU_VALUES, 3, "3"),
        (CPU_VALUES, None, None),  # a CPU cluster: Ray takes the pod's CPUs
        (GPU_VALUES, None, "0"),  # a GPU cluster: the head takes no serving work
        (GPU_VALUES, 2, "2"),
    ],
    ids=["cpu-explicit-0", "cpu-explicit-3", "cpu-default", "gpu-default", "gpu-explicit-2"],
)
def test_the_head_num_cpus_keeps_an_explicit_zero(tmp_path: Path, base: Path, num_cpus, expected):
    values = {} if num_cpus is None else {"rayCluster": {"head": {"numCpus": num_cpus}}}
    params = _head_params(tmp_path, values, base)
    assert params.get("num-cpus") == expected
    assert params["num-gpus"] == "0"


# -- names, subcharts -------------------------------------------------------------------------------------


def _names(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    for rayservice in (doc for doc in docs if doc["kind"] == "RayService"):
        names.append(("Service", rayservice["spec"]["serveService"]["metadata"]["name"]))
        cluster = rayservice["spec"]["rayClusterConfig"]
        names += [("RayWorkerGroup", group["groupName"]) for group in cluster["workerGroupSpecs"]]
    return names


def assert_valid_names(docs: list[dict[str, Any]]) -> None:
    for kind, name in _names(docs):
        rule = LABEL_NAMED.get(kind, DNS_1123_LABEL if kind == "RayWorkerGroup" else DNS_1123_SUBDOMAIN)
        assert rule.match(name) and len(name) <= 63, f"{kind} {name!r} is not a valid name"
        # The longest name KubeRay derives from the RayService: <name>-<5 random>-head-svc, and
        # the chart's own suffixes; all must stay one DNS label.
        if kind == "RayService":
            assert len(name) <= 40, name


def test_a_release_named_with_a_leading_digit_gets_valid_names(tmp_path: Path):
    docs = render(GPU_VALUES, values_file(tmp_path, GCS_ON), release="1market")
    validate_rendered(docs)
    assert_valid_names(docs)
    assert one(docs, "RayService")["metadata"]["name"] == "tm-1market-tokenmart"
    kinds = {kind for kind, _ in _names(docs)}
    assert kinds >= {"RayService", "Service", "StatefulSet", "Secret", "ConfigMap", "PersistentVolumeClaim"}


def test_long_and_dotted_release_names_are_cut_to_valid_labels(tmp_path: Path):
    docs = render(CPU_VALUES, values_file(tmp_path, GCS_ON), release="a.very-long-release-name-for-the-marketplace")
    assert_valid_names(docs)


def test_name_overrides_are_honoured(tmp_path: Path):
    docs = render_with(tmp_path, {"nameOverride": "market"}, CPU_VALUES, release="shop")
    rayservice = one(docs, "RayService")
    assert rayservice["metadata"]["name"] == "shop-market"
    assert rayservice["metadata"]["labels"]["app.kubernetes.io/name"] == "market"
    docs = render_with(tmp_path, {"fullnameOverride": "llm"}, CPU_VALUES, release="shop")
    assert {doc["metadata"]["name"] for doc in docs if doc["kind"] in ("RayService", "StatefulSet")} == {
        "llm",
        "llm-redis",
    }
    env = {item["name"]: item for item in pod_templates(one(docs, "RayService"))[0]["spec"]["containers"][0]["env"]}
    assert env["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@llm-redis:6379/0"
    assert env["TOKENMART_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "llm-admin"


def test_the_chart_renders_as_a_subchart_with_global_values(tmp_path: Path):
    umbrella = tmp_path / "platform"
    (umbrella / "charts").mkdir(parents=True)
    shutil.copytree(CHART, umbrella / "charts" / "tokenmart")
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    dependency = {"name": "tokenmart", "version": version, "repository": "file://charts/tokenmart"}
    (umbrella / "Chart.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v2", "name": "platform", "version": "1.0.0", "dependencies": [dependency]})
    )
    values = {
        "global": {"imageRegistry": "registry.example.com", "storageClass": "fast"},
        "tokenmart": yaml.safe_load(GPU_VALUES.read_text()),
    }
    (umbrella / "values.yaml").write_text(yaml.safe_dump(values))
    result = helm("template", "1platform", str(umbrella), "--namespace", "market")
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    validate_rendered(docs)
    assert_valid_names(docs)
    assert one(docs, "RayService")["metadata"]["name"] == "tm-1platform-tokenmart"
    assert "0 chart(s) failed" in helm("lint", str(umbrella)).stdout


# -- Pod Security -------------------------------------------------------------------------------------


def test_every_pod_meets_the_restricted_pod_security_level_by_default(tmp_path: Path):
    for base in (CPU_VALUES, GPU_VALUES):
        docs = render(base, values_file(tmp_path, GCS_ON))
        specs = _pod_specs(docs)
        assert {"ray-head", "tokenmart-redis", "tokenmart-gcs-redis"} <= set(specs)
        for name, spec in specs.items():
            assert restricted_violations(spec) == [], name


def test_a_hostpath_spool_is_reported_as_breaking_the_restricted_level(tmp_path: Path):
    """The check above can fail: the documented exception (a hostPath spool) trips it."""
    docs = render_with(tmp_path, {"rayCluster": {"spool": {"hostPath": "/var/lib/tokenmart"}}}, CPU_VALUES)
    assert restricted_violations(_pod_specs(docs)["ray-head"]) == ["volume spool: ['hostPath']"]
    root = {"rayCluster": {"podSecurityContext": None, "securityContext": None}}  # null drops a default
    problems = restricted_violations(_pod_specs(render_with(tmp_path, root, CPU_VALUES))["ray-head"])
    assert "ray-head: runAsNonRoot is not true" in problems
    assert "autoscaler: capabilities do not drop ALL" in problems


# -- Secrets for GitOps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secrets": {"generate": False}},
         "adminToken.existingSecret: with secrets.generate false, name the Secret that holds the admin token"),
        ({"secrets": {"generate": False}, "adminToken": {"existingSecret": "ops-admin"}},
         "redis.auth.existingSecret: with secrets.generate false, name the Secret that holds the Redis password"),
        ({"secrets": {"generate": False}, "adminToken": {"existingSecret": "ops-admin"},
          "redis": {"auth": {"existingSecret": "ops-redis"}}, **GCS_ON},
         "rayCluster.gcsFaultTolerance.existingSecret: with secrets.generate false, name the Secret that holds the "
         "GCS Redis password"),
    ],
    ids=["admin", "redis", "gcs-redis"],
)  # fmt: skip
def test_without_generated_secrets_every_secret_must_be_named(tmp_path: Path, values: dict, message: str):
    assert message in render_error(tmp_path, values, CPU_VALUES)


def test_with_named_secrets_a_gitops_render_is_stable_and_creates_none(tmp_path: Path):
    values = {
        "secrets": {"generate": False},
        "adminToken": {"existingSecret": "ops-admin"},
        "redis": {"auth": {"existingSecret": "ops-redis"}},
        "rayCluster": {"gcsFaultTolerance": {"enabled": True, "existingSecret": "ops-gcs-redis"}},
    }
    first = helm("template", "tokenmart", str(CHART), "-f", str(GPU_VALUES), "-f", str(values_file(tmp_path, values)))
    again = helm("template", "tokenmart", str(CHART), "-f", str(GPU_VALUES), "-f", str(values_file(tmp_path, values)))
    assert first.stdout == again.stdout  # nothing random: Argo CD sees no drift
    docs = [doc for doc in yaml.safe_load_all(first.stdout) if doc]
    validate_rendered(docs)
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    options = one(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "ops-gcs-redis", "key": "redis-password"}


# -- catalog changes apply in place ----------------------------------------------------------------------------


def _cluster_and_serve(*values: Path) -> tuple[str, str]:
    rayservice = one(render(*values), "RayService")
    return yaml.safe_dump(rayservice["spec"]["rayClusterConfig"]), rayservice["spec"]["serveConfigV2"]


def _catalog_change(tmp_path: Path, change) -> Path:
    models = yaml.safe_load(GPU_VALUES.read_text())["catalog"]["models"]
    change(models)
    return values_file(tmp_path, {"catalog": {"models": models}}, "catalog.yaml")


def _reprice(models: list[dict]) -> None:
    models[1]["pricing"]["completion_usd_per_1m"] = 0.89


def _retarget(models: list[dict]) -> None:
    models[0]["description"] = "Llama 3.1 8B Instruct, now with a longer description."
    models[1]["autoscaling"].update(max_replicas=1, target_ongoing_requests=32)


def _add_listing(models: list[dict]) -> None:
    listing = {key: value for key, value in models[0].items() if key != "lora"}
    models.append({**listing, "id": "llama-3.1-8b-instruct-fast"})


@pytest.mark.parametrize("change", [_reprice, _retarget, _add_listing], ids=["price", "autoscaling", "new-listing"])
def test_a_catalog_only_change_leaves_the_cluster_spec_byte_identical(tmp_path: Path, change):
    """KubeRay rolls a new cluster (twice the GPUs) when rayClusterConfig changes, and applies a
    serveConfigV2 change to the running cluster: a catalog edit must be the latter."""
    cluster, serve = _cluster_and_serve(GPU_VALUES)
    changed = _catalog_change(tmp_path, change)
    cluster_after, serve_after = _cluster_and_serve(GPU_VALUES, changed)
    assert serve_after != serve
    assert cluster_after == cluster


def test_a_cluster_change_changes_the_cluster_spec(tmp_path: Path):
    """The other side of the test above: an image change is a cluster change (a new cluster)."""
    cluster, serve = _cluster_and_serve(GPU_VALUES)
    newer = values_file(tmp_path, {"image": {"tag": "0.1.1-gpu"}})
    cluster_after, serve_after = _cluster_and_serve(GPU_VALUES, newer)
    assert cluster_after != cluster
    assert serve_after == serve


def test_the_upgrade_strategy_is_kuberays_field(tmp_path: Path):
    spec = one(render_with(tmp_path, {"upgradeStrategy": {"type": "None"}}, CPU_VALUES), "RayService")["spec"]
    assert spec["upgradeStrategy"] == {"type": "None"}
    assert "serviceUnhealthySecondThreshold" not in spec and "deploymentUnhealthySecondThreshold" not in spec
    incremental = {
        "upgradeStrategy": {
            "type": "NewClusterWithIncrementalUpgrade",
            "clusterUpgradeOptions": {"gatewayClassName": "istio", "stepSizePercent": 25, "intervalSeconds": 60},
        }
    }
    rayservice = one(render_with(tmp_path, incremental, CPU_VALUES), "RayService")
    assert rayservice["spec"]["upgradeStrategy"] == incremental["upgradeStrategy"]
    assert crd_errors(rayservice, "ray.io_rayservices.head-feeaf72.yaml") == []


# -- GCS fault tolerance ------------------------------------------------------------------------------------------


def test_gcs_fault_tolerance_uses_a_redis_of_its_own(tmp_path: Path):
    docs = render(GPU_VALUES, values_file(tmp_path, GCS_ON))
    validate_rendered(docs)
    options = one(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options == {
        "redisAddress": "tokenmart-gcs-redis:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "tokenmart-gcs-redis", "key": "redis-password"}}},
    }
    statefulsets = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "StatefulSet"}
    assert set(statefulsets) == {"tokenmart-redis", "tokenmart-gcs-redis"}
    gcs = statefulsets["tokenmart-gcs-redis"]["spec"]
    (container,) = gcs["template"]["spec"]["containers"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "tokenmart-gcs-redis"
    assert gcs["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "gcs-redis"
    services = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Service"}
    assert services["tokenmart-gcs-redis"]["spec"]["selector"]["app.kubernetes.io/component"] == "gcs-redis"
    secrets = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Secret"}
    assert secrets == {"tokenmart-admin", "tokenmart-redis", "tokenmart-gcs-redis"}
    # Off by default: no second Redis, no options.
    default = render(GPU_VALUES)
    assert "gcsFaultToleranceOptions" not in one(default, "RayService")["spec"]["rayClusterConfig"]
    assert [doc["metadata"]["name"] for doc in default if doc["kind"] == "StatefulSet"] == ["tokenmart-redis"]


def test_gcs_fault_tolerance_can_use_an_external_redis(tmp_path: Path):
    external = {"enabled": True, "externalAddress": "gcs.redis.svc:6379", "existingSecret": "gcs-redis"}
    external["externalStorageNamespace"] = "market-gcs"
    docs = render_with(tmp_path, {"rayCluster": {"gcsFaultTolerance": external}}, CPU_VALUES)
    validate_rendered(docs)
    options = one(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == "gcs.redis.svc:6379"
    assert options["externalStorageNamespace"] == "market-gcs"
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "gcs-redis", "key": "redis-password"}
    assert [doc["metadata"]["name"] for doc in docs if doc["kind"] == "StatefulSet"] == ["tokenmart-redis"]
    error = render_error(tmp_path, {"rayCluster": {"gcsFaultTolerance": {**external, "existingSecret": ""}}})
    assert "rayCluster.gcsFaultTolerance.existingSecret: with an externalAddress, name the Secret" in error


# -- the values table -----------------------------------------------------------------------------------------------


def test_every_value_is_documented_and_the_readme_table_is_current():
    from tokenmart.cluster import values_doc

    text = values_doc.VALUES_PATH.read_text()
    assert values_doc.undocumented(text) == []
    assert values_doc.main(["--check"]) == 0, "helm/README.md is stale: run python -m tokenmart.cluster.values_doc"
    readme = values_doc.README_PATH.read_text()
    assert "| `rayCluster.workerGroups[0].gpusPerWorker` | int | `0` | GPUs of each worker pod" in readme
    assert "| `secrets.generate` | bool | `true` |" in readme
    assert "| `rayCluster.head.numCpus` | int or null | `null` | Logical CPUs" in readme  # a declared (type)


def test_the_values_doc_finds_an_undocumented_value_and_reads_multiline_comments():
    from tokenmart.cluster import values_doc

    text = (
        "group:\n"
        "  # -- First line,\n"
        "  # second line.\n"
        "  documented: 1\n"
        "  forgotten: true\n"
        "  # -- A list whose entries are documented with it.\n"
        "  items:\n"
        "    - name: a\n"
        "      size: 2\n"
    )
    assert values_doc.undocumented(text) == ["group.forgotten"]
    rows = values_doc.table(text).splitlines()[2:]
    assert rows == [
        "| `group.documented` | int | `1` | First line, second line. |",
        '| `group.items` | list | `[{"name":"a","size":2}]` | A list whose entries are documented with it. |',
    ]


def test_account_retention_and_alert_delivery_reach_the_app_and_a_bad_value_fails_the_render(tmp_path: Path):
    from tokenmart.deployments.app import AppArgs

    defaults = AppArgs.model_validate(serve_app(one(render(), "RayService"))["args"]).accounts
    assert (defaults.generation_retention_days, defaults.ledger_retention_days, defaults.deliver_alerts) == (
        30,
        None,
        True,
    )
    changed = {"app": {"accounts": {"generation_retention_days": 7, "ledger_retention_days": 400}}}
    args = serve_app(one(render_with(tmp_path, changed), "RayService"))["args"]
    accounts = AppArgs.model_validate(args).accounts
    assert (accounts.generation_retention_days, accounts.ledger_retention_days, accounts.deliver_alerts) == (
        7,
        400,
        True,
    )
    error = render_error(tmp_path, {"app": {"accounts": {"ledger_retention_days": 0}}})
    assert "ledger_retention_days" in error
