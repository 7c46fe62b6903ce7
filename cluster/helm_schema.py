"""The Helm chart's values.schema.json, generated from the project's own pydantic models.

`catalog.models[]` is the catalog file's listing schema and `app.*` the app builder's
arguments, so the schema that `helm install` checks values against is derived from the same
models the app validates them with, and a value that is an AppArgs field carries that
field's description (`Field(description=...)`, written once in deployments/config.py); the
chart-specific values (cluster, Redis, secrets, Service, monitoring) are described here.
`python -m tokenmart.cluster.helm_schema` rewrites the file; a test fails when the committed
file differs from what this module generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "tokenmart"
SCHEMA_PATH = CHART_DIR / "values.schema.json"

K8S_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _object(properties: dict[str, Any], required: list[str] | None = None, *, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if closed:
        schema["additionalProperties"] = False
    if required:
        schema["required"] = required
    return schema


def _free_object() -> dict[str, Any]:
    return {"type": "object"}


def _resources() -> dict[str, Any]:
    return _object({"requests": _free_object(), "limits": _free_object()})


def _string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


def _integer(minimum: int | None = None) -> dict[str, Any]:
    return {"type": "integer"} if minimum is None else {"type": "integer", "minimum": minimum}


def _boolean() -> dict[str, Any]:
    return {"type": "boolean"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _array(items: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "array", "items": items} if items else {"type": "array"}


QUANTITY = r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
# A memory size as redis.conf writes it (`maxmemory 768mb`): bytes, or k/kb/m/mb/g/gb in any case.
REDIS_MEMORY = r"^[1-9][0-9]*([kKmMgG][bB]?)?$"
# A name that is a DNS-1035 label (the RayService's name, and the Services KubeRay derives from it).
DNS_1035 = r"^([a-z]([-a-z0-9]*[a-z0-9])?)?$"
_ENV_VAR = _object({"name": _string(minLength=1)}, ["name"], closed=False)
_VOLUME = _object({"name": _string(pattern=K8S_NAME)}, ["name"], closed=False)
_VOLUME_MOUNT = _object(
    {"name": _string(minLength=1), "mountPath": _string(pattern="^/")}, ["name", "mountPath"], closed=False
)


def _pod_fields() -> dict[str, Any]:
    """Pod and container fields of a Ray pod (the head or a worker group), passed through as-is:
    the Kubernetes schema checks their insides when the pod is created."""
    return {
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": _array(_free_object()),
        "affinity": _free_object(),
        "topologySpreadConstraints": _array(_free_object()),
        "podSecurityContext": _nullable(_free_object()),
        "securityContext": _nullable(_free_object()),
        "serviceAccountName": _string(),
        "runtimeClassName": _string(),
        "priorityClassName": _string(),
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "env": _array(_ENV_VAR),
        "envFrom": _array(_free_object()),
        "volumes": _array(_VOLUME),
        "volumeMounts": _array(_VOLUME_MOUNT),
        "sharedMemory": _object(
            {"enabled": {"type": ["boolean", "null"]}, "sizeLimit": _nullable(_string(pattern=QUANTITY))}
        ),
    }


def _existing_secret(key_name: str, key_default: str) -> dict[str, Any]:
    return _object({"existingSecret": _string(), key_name: _string(minLength=1, default=key_default)})


# Chart values under `app` and the AppArgs field each one is (the chart's camelCase names).
APP_VALUES = {
    "modelDir": "model_dir",
    "redisTimeoutS": "redis_timeout_s",
    "ingress": "ingress",
    "defaultLimits": "default_limits",
    "metrics": "metrics",
    "accounts": "accounts",
}


def described(schema: dict[str, Any], model: type[BaseModel], field: str) -> dict[str, Any]:
    """`schema` with the description of `model.field`, where the model gives one."""
    description = model.model_fields[field].description
    return {**schema, "description": description} if description else schema


def values_schema() -> dict[str, Any]:
    from tokenmart.deployments.catalog import Catalog, Listing
    from tokenmart.deployments.config import AccountOptions, AppArgs, IngressOptions, MetricsOptions
    from tokenmart.deployments.schemas import Limits

    refs, shared = models_json_schema(
        [
            (Listing, "validation"),
            (IngressOptions, "validation"),
            (Limits, "validation"),
            (MetricsOptions, "validation"),
            (AccountOptions, "validation"),
        ],
        ref_template="#/$defs/{model}",
    )

    def ref(model: type) -> dict[str, Any]:
        return refs[(model, "validation")]

    worker_group = _object(
        {
            "name": _string(pattern=K8S_NAME, maxLength=63),
            "acceleratorType": {"type": ["string", "null"]},
            "gpusPerWorker": _integer(0),
            "minReplicas": _integer(0),
            "maxReplicas": _integer(1),
            "resources": _resources(),
            **_pod_fields(),
            "modelCache": {"type": ["boolean", "null"]},
            "adapters": {"type": ["boolean", "null"]},
        },
        ["name", "gpusPerWorker", "minReplicas", "maxReplicas"],
    )
    properties = {
        # Helm hands a subchart its parent's `global` values.
        "global": _free_object(),
        "nameOverride": _string(pattern=DNS_1035, maxLength=40),
        "fullnameOverride": _string(pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", maxLength=40),
        "image": _object(
            {
                "repository": _string(minLength=1),
                "tag": _string(minLength=1),
                "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            },
            ["repository", "tag"],
        ),
        "imagePullSecrets": {"type": "array"},
        "rayVersion": _string(pattern=r"^\d+\.\d+\.\d+$"),
        "catalog": {
            **_object(
                {"models": described({"type": "array", "minItems": 1, "items": ref(Listing)}, Catalog, "listings")},
                ["models"],
            ),
            "description": "The marketplace catalog (AppArgs.catalog): `models` are its listings, in the "
            "catalog file's schema.",
        },
        "app": {
            **_object(
                {
                    name: described(schema, AppArgs, APP_VALUES[name])
                    for name, schema in {
                        "modelDir": _string(minLength=1),
                        "redisTimeoutS": {"type": "number", "exclusiveMinimum": 0},
                        "ingress": ref(IngressOptions),
                        "defaultLimits": ref(Limits),
                        "metrics": ref(MetricsOptions),
                        "accounts": ref(AccountOptions),
                    }.items()
                }
            ),
            "description": "The Serve application's own options (AppArgs), less the catalog (catalog.models) "
            "and the Redis URL and admin token (from Secrets, through the Ray pods' environment).",
        },
        "rayCluster": _object(
            {
                "head": _object(
                    {
                        "numCpus": {"type": ["integer", "null"], "minimum": 0},
                        "resources": _resources(),
                        **_pod_fields(),
                    }
                ),
                "podAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
                "podSecurityContext": _free_object(),
                "securityContext": _free_object(),
                "spool": _object({"hostPath": _string(pattern="^(/.*)?$")}),
                "extraEnv": _array(_ENV_VAR),
                "sharedMemory": _object({"sizeLimit": _string(pattern=QUANTITY)}),
                "modelCache": _object(
                    {
                        "type": {"enum": ["none", "pvc", "hostPath"]},
                        "mountPath": _string(pattern="^/"),
                        "pvc": _object(
                            {
                                "existingClaim": _string(),
                                "storageClass": _string(),
                                "size": _string(pattern=QUANTITY),
                                "accessModes": _array(
                                    {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}
                                ),
                            }
                        ),
                        "hostPath": _object({"path": _string(pattern="^(/.*)?$")}),
                    }
                ),
                "adapters": _object(
                    {
                        "type": {"enum": ["none", "pvc", "hostPath"]},
                        "mountPath": _string(pattern="^/"),
                        "existingClaim": _string(),
                        "hostPath": _string(pattern="^(/.*)?$"),
                    }
                ),
                "gcsFaultTolerance": _object(
                    {
                        "enabled": _boolean(),
                        "externalAddress": _string(),
                        "externalStorageNamespace": _string(),
                        "existingSecret": _string(),
                        "passwordKey": _string(minLength=1),
                        "resources": _resources(),
                        "persistence": _object(
                            {"size": _string(pattern=r"^\d+(Ki|Mi|Gi|Ti)$"), "storageClass": _string()}
                        ),
                    }
                ),
                "workerGroups": {"type": "array", "items": worker_group},
                "enableInTreeAutoscaling": _boolean(),
                "autoscalerOptions": _object(
                    {
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "idleTimeoutSeconds": _integer(0),
                        "resources": _resources(),
                    }
                ),
            },
            ["workerGroups"],
        ),
        "upgradeStrategy": _object(
            {
                "type": {"enum": ["NewCluster", "None", "NewClusterWithIncrementalUpgrade"]},
                "clusterUpgradeOptions": _object(
                    {
                        "gatewayClassName": _string(),
                        "stepSizePercent": {"type": "integer", "minimum": 1, "maximum": 100},
                        "intervalSeconds": _integer(1),
                        "maxSurgePercent": {"type": "integer", "minimum": 0, "maximum": 100},
                    }
                ),
            }
        ),
        "secrets": _object({"generate": _boolean()}),
        "redis": _object(
            {
                "enabled": _boolean(),
                "mode": {"enum": ["standalone", "sentinel"]},
                "replicas": _integer(0),
                "image": _object({"repository": _string(minLength=1), "tag": _string(minLength=1)}),
                "auth": _existing_secret("passwordKey", "redis-password"),
                "maxmemory": _string(pattern=REDIS_MEMORY),
                "persistence": _object(
                    {
                        "size": _string(pattern=r"^\d+(Ki|Mi|Gi|Ti)$"),
                        "storageClass": _string(),
                        "appendfsync": {"enum": ["always", "everysec", "no"]},
                        "rdbSnapshots": _boolean(),
                    }
                ),
                "resources": _resources(),
                "sentinel": _object(
                    {
                        "replicas": _integer(1),
                        "quorum": _integer(1),
                        "masterName": _string(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$"),
                        "downAfterMilliseconds": _integer(100),
                        "failoverTimeout": _integer(1000),
                        "resources": _resources(),
                    }
                ),
                "external": _existing_secret("urlKey", "redis-url"),
            }
        ),
        "adminToken": _existing_secret("key", "admin-token"),
        "service": _object(
            {
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            }
        ),
        "ingress": _object(
            {
                "enabled": _boolean(),
                "className": _string(),
                "host": _string(),
                "tls": {"type": "array"},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            }
        ),
        "monitoring": _object(
            {
                "podMonitor": _object({"enabled": _boolean(), "interval": _string(), "labels": _free_object()}),
                "serviceMonitor": _object({"enabled": _boolean(), "interval": _string(), "labels": _free_object()}),
                "dashboard": _object({"enabled": _boolean(), "labels": _free_object()}),
            }
        ),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tokenmart Helm values",
        "description": "Generated by `python -m tokenmart.cluster.helm_schema` from tokenmart's pydantic models.",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "required": ["image", "catalog", "rayCluster"],
        "$defs": shared["$defs"],
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    SCHEMA_PATH.write_text(render())
    print(SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
