"""The traffic split on Kubernetes: stable and canary TorchServe Deployments behind weighted routes.

Two variants, rendered from :class:`K8sServingParams`:

- Gateway API (the default): an ``HTTPRoute`` whose production rule (``/predictions/<model>``,
  exact) has two weighted ``backendRefs``, the stable and the canary Service. Each backendRef adds
  ``X-ML-Release-Backend: stable|canary`` to its responses (a ``ResponseHeaderModifier`` filter on the
  backendRef, Gateway API "extended" support) next to the handler's ``X-ML-Release-Model-Version``.
  Two more exact rules send ``/predictions/<model>/<version>`` to the Service that holds that
  version, so the labelled replay can reach each version by its own URL.
- ingress-nginx: a main Ingress to the stable Service and a canary Ingress for the same host and
  path with ``nginx.ingress.kubernetes.io/canary-weight`` (out of ``canary-weight-total: 100``).

Each Deployment serves one version, loaded at start (``--models <model>=<file>.mar``) from a file an
init container copies out of the bucket with credentials from a Secret (``envFrom``, never values
in the pod spec, G30). So ``/predictions/<model>`` on a pod is that pod's version and the route
needs no path rewrite. Deployment selectors name the track (``stable``/``canary``), never the
version, because a selector is immutable.

Access (G29). TorchServe's token authorization draws random keys in each pod at start and cannot
be given keys, so a Gateway in front of several replicas has no token to send. On Kubernetes the
image (``docker/torchserve/config.properties``) therefore runs with token authorization off and
makes up for it: the management API listens on 127.0.0.1 in the pod only, the model API is off
(the pod loads its one version at start; nothing can register another), the Services expose the
inference port only, and a NetworkPolicy admits the inference port from the Gateway's namespace
only (and the metrics port from the monitoring namespace). Callers authenticate at the Gateway.
The local stack, where one TorchServe serves both versions, keeps token authorization on.

Weights change by a JSON patch through the Kubernetes API: :func:`httproute_weight_patch` and
:func:`ingress_canary_weight_patch` build it (with ``test`` operations, so a patch that would hit the
wrong backendRef or a non-canary Ingress fails instead of landing), :func:`set_httproute_weights` and
:func:`set_ingress_canary_weight` apply it with a given client and read the weight back from the
object the API server returns (G20). A JSON patch (a list body) is used for both kinds: the
kubernetes client sends a list as ``application/json-patch+json``, while a dict body (a merge
patch) would go out under the first content type the endpoint lists, which is JSON patch too, and
be refused; and a merge patch of a CRD's list replaces the whole ``backendRefs`` anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_release.errors import ServingError
from ml_release.naming import check_model_name, check_version
from ml_release.serving.router import BACKEND_HEADER, CANARY, STABLE, whole_percent

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_VERSION = "v1"
HTTPROUTE_PLURAL = "httproutes"
CANARY_ANNOTATION = "nginx.ingress.kubernetes.io/canary"
CANARY_WEIGHT_ANNOTATION = "nginx.ingress.kubernetes.io/canary-weight"
CANARY_WEIGHT_TOTAL_ANNOTATION = "nginx.ingress.kubernetes.io/canary-weight-total"
TRACK_LABEL = "ml-release.io/track"
VERSION_LABEL = "ml-release.io/model-version"
INFERENCE_PORT = 8080
METRICS_PORT = 8082
MODEL_STORE = "/home/model-server/model-store"
TRACKS = (STABLE, CANARY)


class K8sRouterError(ServingError):
    """Raised when a route's weights cannot be set, or read back differently from what was set."""


@dataclasses.dataclass(frozen=True)
class K8sServingParams:
    """What the manifests are rendered from; one instance per model."""

    model: str
    stable_version: str
    canary_version: str
    archive_prefix: str  # s3://bucket/prefix holding <model>-<version>.mar
    namespace: str = "ml-release"
    image: str = "ml-release/torchserve:0.1.0"
    fetch_image: str = "amazon/aws-cli:2.27.0"
    s3_secret: str = "ml-release-s3"  # AWS_* keys (and AWS_ENDPOINT_URL for MinIO), as envFrom
    gateway_name: str = "ml-release"
    gateway_namespace: str | None = None
    hostname: str = "models.ml-release.internal"
    ingress_class: str = "nginx"
    stable_replicas: int = 2
    canary_replicas: int = 1
    cpu: str = "2"
    memory: str = "4Gi"
    monitoring_namespace: str | None = "monitoring"  # may scrape the metrics port; None: nobody

    def __post_init__(self) -> None:
        check_model_name(self.model)
        check_version(self.stable_version, "stable_version")
        check_version(self.canary_version, "canary_version")
        if self.stable_version == self.canary_version:
            raise K8sRouterError(f"canary version {self.canary_version!r} is the stable version")
        if not self.archive_prefix.startswith("s3://"):
            raise K8sRouterError(f"archive_prefix must be an s3:// URI, got {self.archive_prefix!r}")
        if self.stable_replicas < 1 or self.canary_replicas < 1:
            raise K8sRouterError("each track needs at least one replica")

    def name(self, track: str) -> str:
        return f"{self.model}-{track}"

    def version(self, track: str) -> str:
        return self.stable_version if track == STABLE else self.canary_version

    @property
    def route_name(self) -> str:
        return self.model


def _labels(params: K8sServingParams, track: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "torchserve",
        "app.kubernetes.io/instance": params.model,
        "app.kubernetes.io/part-of": "ml-release",
        TRACK_LABEL: track,
    }


def _selector(params: K8sServingParams, track: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": params.model, TRACK_LABEL: track}


def render_deployment(params: K8sServingParams, track: str) -> dict[str, Any]:
    """A TorchServe Deployment serving one version of the model as its default."""
    version = params.version(track)
    mar = f"{params.model}-{version}.mar"
    source = f"{params.archive_prefix.rstrip('/')}/{mar}"
    resources = {"cpu": params.cpu, "memory": params.memory}
    # Model readiness, not liveness: /ping is Healthy before the model loads. The management API
    # listens on the pod's loopback only, where the probe (run inside the container) reaches it.
    ready_script = (
        "import json,urllib.request as u;"
        f"d=json.load(u.urlopen('http://127.0.0.1:8081/models/{params.model}',timeout=3));"
        "assert any(w['status']=='READY' for m in d for w in m['workers'])"
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": params.name(track),
            "namespace": params.namespace,
            "labels": {**_labels(params, track), VERSION_LABEL: version},
        },
        "spec": {
            "replicas": params.stable_replicas if track == STABLE else params.canary_replicas,
            "selector": {"matchLabels": _selector(params, track)},
            # Stable never loses capacity during a rollout of its own (G24, G25).
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": {**_labels(params, track), VERSION_LABEL: version}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                    "initContainers": [
                        {
                            "name": "fetch-archive",
                            "image": params.fetch_image,
                            "args": ["s3", "cp", source, f"{MODEL_STORE}/{mar}"],
                            "envFrom": [{"secretRef": {"name": params.s3_secret}}],
                            "volumeMounts": [{"name": "model-store", "mountPath": MODEL_STORE}],
                            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                        }
                    ],
                    "containers": [
                        {
                            "name": "torchserve",
                            "image": params.image,
                            "args": [
                                "torchserve",
                                "--start",
                                "--foreground",
                                "--ncs",
                                "--model-store",
                                MODEL_STORE,
                                "--ts-config",
                                "/home/model-server/config.properties",
                                "--models",
                                f"{params.model}={mar}",
                            ],
                            "ports": [
                                {"name": "http", "containerPort": INFERENCE_PORT, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                            ],
                            "resources": {"requests": dict(resources), "limits": dict(resources)},
                            "readinessProbe": {
                                "exec": {"command": ["python", "-c", ready_script]},
                                "periodSeconds": 5,
                                "timeoutSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/ping", "port": "http"},
                                "initialDelaySeconds": 30,
                                "periodSeconds": 10,
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": "model-store", "mountPath": MODEL_STORE}],
                        }
                    ],
                    "volumes": [{"name": "model-store", "emptyDir": {}}],
                },
            },
        },
    }


def render_service(params: K8sServingParams, track: str) -> dict[str, Any]:
    """The inference port of one track only; management stays inside the pod."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": params.name(track), "namespace": params.namespace, "labels": _labels(params, track)},
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(params, track),
            "ports": [{"name": "http", "port": INFERENCE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_network_policy(params: K8sServingParams) -> dict[str, Any]:
    """Both tracks' pods: inference from the Gateway's namespace only, metrics from monitoring only."""
    gateway_ns = params.gateway_namespace or params.namespace

    def peer(namespace: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}

    ingress: list[dict[str, Any]] = [
        {"from": [peer(gateway_ns)], "ports": [{"protocol": "TCP", "port": INFERENCE_PORT}]},
    ]
    if params.monitoring_namespace:
        ingress.append(
            {"from": [peer(params.monitoring_namespace)], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]}
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{params.model}-torchserve",
            "namespace": params.namespace,
            "labels": {"app.kubernetes.io/instance": params.model, "app.kubernetes.io/part-of": "ml-release"},
        },
        "spec": {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "torchserve", "app.kubernetes.io/instance": params.model}
            },
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def _backend_ref(params: K8sServingParams, track: str, weight: int | None) -> dict[str, Any]:
    ref: dict[str, Any] = {"group": "", "kind": "Service", "name": params.name(track), "port": INFERENCE_PORT}
    if weight is not None:
        ref["weight"] = weight
    ref["filters"] = [
        {
            "type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"set": [{"name": BACKEND_HEADER, "value": track}]},
        }
    ]
    return ref


def render_httproute(params: K8sServingParams, canary_weight: float = 0) -> dict[str, Any]:
    """The Gateway API route; rule 0 is the weighted production rule the patches address."""
    weight = whole_percent(canary_weight)
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": params.gateway_name}
    if params.gateway_namespace:
        parent["namespace"] = params.gateway_namespace

    def exact(path: str) -> list[dict[str, Any]]:
        return [{"path": {"type": "Exact", "value": path}, "method": "POST"}]

    production = f"/predictions/{params.model}"
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {
            "name": params.route_name,
            "namespace": params.namespace,
            "labels": {"app.kubernetes.io/instance": params.model, "app.kubernetes.io/part-of": "ml-release"},
        },
        "spec": {
            "parentRefs": [parent],
            "hostnames": [params.hostname],
            "rules": [
                {
                    "matches": exact(production),
                    "backendRefs": [
                        _backend_ref(params, STABLE, 100 - weight),
                        _backend_ref(params, CANARY, weight),
                    ],
                },
                *(
                    {
                        "matches": exact(f"{production}/{params.version(track)}"),
                        "backendRefs": [_backend_ref(params, track, None)],
                    }
                    for track in TRACKS
                ),
            ],
        },
    }


def render_ingress_pair(params: K8sServingParams, canary_weight: float = 0) -> list[dict[str, Any]]:
    """ingress-nginx: the main Ingress (stable) and its canary twin with a weight out of 100."""
    weight = whole_percent(canary_weight)

    def ingress(track: str, annotations: dict[str, str]) -> dict[str, Any]:
        name = params.model if track == STABLE else params.name(CANARY)
        metadata: dict[str, Any] = {"name": name, "namespace": params.namespace, "labels": _labels(params, track)}
        if annotations:
            metadata["annotations"] = annotations
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": metadata,
            "spec": {
                "ingressClassName": params.ingress_class,
                "rules": [
                    {
                        "host": params.hostname,
                        "http": {
                            "paths": [
                                {
                                    "path": f"/predictions/{params.model}",
                                    "pathType": "Exact",
                                    "backend": {
                                        "service": {"name": params.name(track), "port": {"number": INFERENCE_PORT}}
                                    },
                                }
                            ]
                        },
                    }
                ],
            },
        }

    return [
        ingress(STABLE, {}),
        ingress(
            CANARY,
            {
                CANARY_ANNOTATION: "true",
                CANARY_WEIGHT_ANNOTATION: str(weight),
                CANARY_WEIGHT_TOTAL_ANNOTATION: "100",
            },
        ),
    ]


def render_manifests(params: K8sServingParams, canary_weight: float = 0) -> dict[str, list[dict[str, Any]]]:
    """Every manifest, grouped by the file it is kept in under ``include/k8s/serving``."""
    return {
        "stable.yaml": [render_deployment(params, STABLE), render_service(params, STABLE)],
        "canary.yaml": [render_deployment(params, CANARY), render_service(params, CANARY)],
        "httproute.yaml": [render_httproute(params, canary_weight)],
        "ingress-nginx-canary.yaml": render_ingress_pair(params, canary_weight),
        "networkpolicy.yaml": [render_network_policy(params)],
    }


def dump_manifests(manifests: Sequence[Mapping[str, Any]]) -> str:
    import yaml

    return str(yaml.safe_dump_all([dict(m) for m in manifests], sort_keys=False, default_flow_style=False))


# -- weights through the Kubernetes API ----------------------------------------------------------


def httproute_weight_patch(params: K8sServingParams, canary_weight: float) -> list[dict[str, Any]]:
    """A JSON patch setting rule 0's weights; its ``test`` ops pin which backendRef is which."""
    weight = whole_percent(canary_weight)
    base = "/spec/rules/0/backendRefs"
    return [
        {"op": "test", "path": f"{base}/0/name", "value": params.name(STABLE)},
        {"op": "test", "path": f"{base}/1/name", "value": params.name(CANARY)},
        {"op": "replace", "path": f"{base}/0/weight", "value": 100 - weight},
        {"op": "replace", "path": f"{base}/1/weight", "value": weight},
    ]


def httproute_weights(route: Mapping[str, Any]) -> dict[str, float]:
    """Percent per Service of the production rule, as the returned object says (G20)."""
    refs = route["spec"]["rules"][0]["backendRefs"]
    weights = {str(ref["name"]): int(ref.get("weight", 1)) for ref in refs}  # Gateway API default: 1
    total = sum(weights.values())
    return {name: (100.0 * w / total if total else 0.0) for name, w in weights.items()}


def set_httproute_weights(api: Any, params: K8sServingParams, canary_weight: float) -> float:
    """Patch the route with a ``CustomObjectsApi``; return the canary percent read back."""
    patch = httproute_weight_patch(params, canary_weight)
    try:
        route = api.patch_namespaced_custom_object(
            GATEWAY_GROUP, GATEWAY_VERSION, params.namespace, HTTPROUTE_PLURAL, params.route_name, patch
        )
    except Exception as exc:  # ApiException and transport errors alike; the caller retries
        raise K8sRouterError(f"patching HTTPRoute {params.namespace}/{params.route_name} failed: {exc}") from exc
    effective = httproute_weights(_as_dict(route)).get(params.name(CANARY), 0.0)
    expected = float(whole_percent(canary_weight))
    if effective != expected:
        raise K8sRouterError(f"HTTPRoute {params.route_name} reads back canary {effective:g} %, set {expected:g} %")
    return effective


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def ingress_canary_weight_patch(canary_weight: float) -> list[dict[str, Any]]:
    """A JSON patch of the canary Ingress's weight annotation; refuses a non-canary Ingress."""
    weight = whole_percent(canary_weight)
    annotations = "/metadata/annotations"
    return [
        {"op": "test", "path": f"{annotations}/{_pointer(CANARY_ANNOTATION)}", "value": "true"},
        {"op": "add", "path": f"{annotations}/{_pointer(CANARY_WEIGHT_TOTAL_ANNOTATION)}", "value": "100"},
        {"op": "add", "path": f"{annotations}/{_pointer(CANARY_WEIGHT_ANNOTATION)}", "value": str(weight)},
    ]


def set_ingress_canary_weight(api: Any, params: K8sServingParams, canary_weight: float) -> float:
    """Patch the canary Ingress with a ``NetworkingV1Api``; return the percent read back."""
    patch = ingress_canary_weight_patch(canary_weight)
    name = params.name(CANARY)
    try:
        ingress = api.patch_namespaced_ingress(name, params.namespace, patch)
    except Exception as exc:
        raise K8sRouterError(f"patching Ingress {params.namespace}/{name} failed: {exc}") from exc
    annotations = (_as_dict(ingress).get("metadata") or {}).get("annotations") or {}
    try:
        effective = (
            100.0 * int(annotations[CANARY_WEIGHT_ANNOTATION]) / int(annotations[CANARY_WEIGHT_TOTAL_ANNOTATION])
        )
    except (KeyError, ValueError, ZeroDivisionError) as exc:
        raise K8sRouterError(f"Ingress {name} has no readable canary weight: {annotations}") from exc
    expected = float(whole_percent(canary_weight))
    if effective != expected:
        raise K8sRouterError(f"Ingress {name} reads back canary {effective:g} %, set {expected:g} %")
    return effective


def _as_dict(obj: Any) -> dict[str, Any]:
    """Custom objects come back as dicts; typed models (V1Ingress) are serialized like the API does."""
    if isinstance(obj, Mapping):
        return dict(obj)
    from kubernetes.client import ApiClient

    return dict(ApiClient().sanitize_for_serialization(obj))


EXAMPLE = K8sServingParams(
    model="sentiment",
    stable_version="r0123456789ab",
    canary_version="r0fedcba98765",
    archive_prefix="s3://ml-release/models/sentiment",
)


def write_examples(out_dir: Path, params: K8sServingParams = EXAMPLE, canary_weight: float = 5) -> list[Path]:
    """Write the rendered manifests (the files kept in ``include/k8s/serving``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, manifests in render_manifests(params, canary_weight).items():
        path = out_dir / file_name
        header = "# Rendered by `python -m ml_release.serving.k8s_router`; edit k8s_router.py, not this file.\n"
        path.write_text(header + dump_manifests(manifests), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "k8s" / "serving")
    args = parser.parse_args(argv)
    for path in write_examples(args.out):
        print(path)


if __name__ == "__main__":
    main()


__all__ = [
    "EXAMPLE",
    "K8sRouterError",
    "K8sServingParams",
    "httproute_weight_patch",
    "httproute_weights",
    "ingress_canary_weight_patch",
    "render_deployment",
    "render_httproute",
    "render_ingress_pair",
    "render_manifests",
    "render_network_policy",
    "render_service",
    "set_httproute_weights",
    "set_ingress_canary_weight",
    "write_examples",
]
