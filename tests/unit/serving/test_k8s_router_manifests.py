from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import pytest
import yaml

from ml_release.serving.k8s_router import (
    CANARY_WEIGHT_ANNOTATION,
    EXAMPLE,
    K8sRouterError,
    K8sServingParams,
    httproute_weight_patch,
    httproute_weights,
    ingress_canary_weight_patch,
    render_httproute,
    render_ingress_pair,
    render_manifests,
    set_httproute_weights,
    set_ingress_canary_weight,
)

pytestmark = pytest.mark.unit

K8S_VERSION = "1.37.0"
MANIFEST_DIR = Path(__file__).resolve().parents[3] / "include" / "k8s" / "serving"

# The Gateway API v1 HTTPRoute fields these manifests use, with the CRD's own constraints
# (gateway-api v1.2 standard channel: names, path types, weight 0..1000000, at most 16 rules,
# backendRefs and hostnames, the filter types). Unknown fields are refused, as a strict API server
# with the CRD would prune or reject them.
_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_HEADER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "value"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9!#$%&'*+\\-.^_\\x60|~]+$", "maxLength": 256},
        "value": {"type": "string", "maxLength": 4096},
    },
}
_FILTER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type"],
    "properties": {
        "type": {
            "enum": [
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
                "RequestRedirect",
                "URLRewrite",
                "ExtensionRef",
            ]
        },
        "responseHeaderModifier": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "set": {"type": "array", "maxItems": 16, "items": _HEADER},
                "add": {"type": "array", "maxItems": 16, "items": _HEADER},
                "remove": {"type": "array", "maxItems": 16, "items": {"type": "string"}},
            },
        },
    },
}
HTTPROUTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parentRefs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 32,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "group": {"type": "string"},
                            "kind": {"type": "string"},
                            "namespace": {"type": "string"},
                            "name": _NAME,
                            "sectionName": {"type": "string"},
                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        },
                    },
                },
                "hostnames": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {
                        "type": "string",
                        "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                    },
                },
                "rules": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matches": {
                                "type": "array",
                                "maxItems": 64,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "path": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                                "value": {"type": "string", "pattern": "^/", "maxLength": 1024},
                                            },
                                        },
                                        "method": {"enum": _METHODS},
                                    },
                                },
                            },
                            "backendRefs": {
                                "type": "array",
                                "maxItems": 16,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name"],
                                    "properties": {
                                        "group": {"type": "string"},
                                        "kind": {"type": "string"},
                                        "name": _NAME,
                                        "namespace": {"type": "string"},
                                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                        "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
                                        "filters": {"type": "array", "maxItems": 16, "items": _FILTER},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def every_manifest() -> list[dict[str, Any]]:
    return [m for group in render_manifests(EXAMPLE, 5).values() for m in group]


@pytest.mark.parametrize(
    "manifest",
    [m for m in every_manifest() if m["kind"] != "HTTPRoute"],
    ids=lambda m: f"{m['kind']}-{m['metadata']['name']}",
)
def test_core_manifests_pass_strict_kubernetes_validation(manifest: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_strict_validation_would_catch_an_unknown_field() -> None:
    import kubernetes_validate

    bad = copy.deepcopy(every_manifest()[0])
    bad["spec"]["template"]["spec"]["containers"][0]["port"] = 8080
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_the_httproute_matches_the_gateway_api_field_shapes() -> None:
    jsonschema.validate(render_httproute(EXAMPLE, 25), HTTPROUTE_SCHEMA)


def test_the_checked_in_manifests_are_the_rendered_ones() -> None:
    for file_name, manifests in render_manifests(EXAMPLE, 5).items():
        on_disk = list(yaml.safe_load_all((MANIFEST_DIR / file_name).read_text()))
        assert on_disk == manifests, f"{file_name} is stale: run python -m ml_release.serving.k8s_router"


def test_the_production_rule_splits_by_weight_and_version_urls_go_to_their_track() -> None:
    route = render_httproute(EXAMPLE, 25)
    assert httproute_weights(route) == {"sentiment-stable": 75.0, "sentiment-canary": 25.0}
    production, stable_url, canary_url = route["spec"]["rules"]
    assert production["matches"][0]["path"] == {"type": "Exact", "value": "/predictions/sentiment"}
    assert stable_url["matches"][0]["path"]["value"] == f"/predictions/sentiment/{EXAMPLE.stable_version}"
    assert stable_url["backendRefs"][0]["name"] == "sentiment-stable"
    assert canary_url["backendRefs"][0]["name"] == "sentiment-canary"


def test_services_expose_only_the_inference_port_and_selectors_name_the_track() -> None:
    manifests = render_manifests(EXAMPLE)
    for track in ("stable", "canary"):
        deployment, service = manifests[f"{track}.yaml"]
        assert [p["port"] for p in service["spec"]["ports"]] == [8080]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert "model-version" not in str(deployment["spec"]["selector"])  # selectors are immutable
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][-1] == f"sentiment=sentiment-{EXAMPLE.version(track)}.mar"
        init = deployment["spec"]["template"]["spec"]["initContainers"][0]
        assert "env" not in init and init["envFrom"] == [{"secretRef": {"name": "ml-release-s3"}}]


def test_pods_take_inference_from_the_gateway_only_and_management_stays_on_loopback() -> None:
    """Token auth is off in the pod (its keys are random per pod); these make up for it (G29)."""
    import dataclasses

    props = dict(
        line.split("=", 1)
        for line in (MANIFEST_DIR.parents[2] / "docker" / "torchserve" / "config.properties").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["enable_model_api"] == "false" and props["disable_token_authorization"] == "true"
    assert props["enable_envvars_config"] == "false"  # nothing in the pod's env can turn them back

    params = dataclasses.replace(EXAMPLE, gateway_namespace="gateways")
    (policy,) = render_manifests(params)["networkpolicy.yaml"]
    pods = policy["spec"]["podSelector"]["matchLabels"]
    for track in ("stable", "canary"):
        labels = render_manifests(params)[f"{track}.yaml"][0]["spec"]["template"]["metadata"]["labels"]
        assert pods.items() <= labels.items()  # the policy covers both tracks' pods
    rules = {r["ports"][0]["port"]: r["from"] for r in policy["spec"]["ingress"]}
    assert set(rules) == {8080, 8082}  # 8081 (management) is admitted from nowhere
    assert rules[8080] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}}}]
    no_metrics = render_manifests(dataclasses.replace(params, monitoring_namespace=None))["networkpolicy.yaml"][0]
    assert [r["ports"][0]["port"] for r in no_metrics["spec"]["ingress"]] == [8080]
    probe = render_manifests(params)["stable.yaml"][0]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert "127.0.0.1:8081/models/sentiment" in probe["exec"]["command"][-1]


def test_the_canary_ingress_carries_the_weight_and_the_main_one_does_not() -> None:
    main, canary = render_ingress_pair(EXAMPLE, 5)
    assert "annotations" not in main["metadata"]
    assert canary["metadata"]["annotations"][CANARY_WEIGHT_ANNOTATION] == "5"
    main_path = main["spec"]["rules"][0]["http"]["paths"][0]
    canary_path = canary["spec"]["rules"][0]["http"]["paths"][0]
    assert (main_path["path"], main_path["pathType"]) == (canary_path["path"], canary_path["pathType"])
    assert main_path["backend"]["service"]["name"] == "sentiment-stable"
    assert canary_path["backend"]["service"]["name"] == "sentiment-canary"
    assert main["spec"]["rules"][0]["host"] == canary["spec"]["rules"][0]["host"]


class FakeCustomObjects:
    """Applies JSON patches to stored objects as the API server does, test ops included."""

    def __init__(self, route: dict[str, Any], drop_weight: bool = False) -> None:
        self.route = route
        self.drop_weight = drop_weight
        self.calls: list[tuple[Any, ...]] = []

    def patch_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: list[dict[str, Any]]
    ) -> dict[str, Any]:
        self.calls.append((group, version, namespace, plural, name))
        assert isinstance(body, list)  # the kubernetes client sends a list as a JSON patch
        self.route = jsonpatch.apply_patch(self.route, body)
        if self.drop_weight:  # an admission webhook that resets weights
            self.route["spec"]["rules"][0]["backendRefs"][1]["weight"] = 0
        return copy.deepcopy(self.route)


class FakeNetworking:
    def __init__(self, ingress: dict[str, Any]) -> None:
        self.ingress = ingress

    def patch_namespaced_ingress(self, name: str, namespace: str, body: list[dict[str, Any]]) -> dict[str, Any]:
        assert name == self.ingress["metadata"]["name"]
        self.ingress = jsonpatch.apply_patch(self.ingress, body)
        return copy.deepcopy(self.ingress)


@pytest.mark.parametrize("weight", [0, 5, 50, 100], ids=str)
def test_set_httproute_weights_patches_and_reads_back(weight: int) -> None:
    api = FakeCustomObjects(render_httproute(EXAMPLE, 0))
    assert set_httproute_weights(api, EXAMPLE, weight) == weight
    assert api.calls == [("gateway.networking.k8s.io", "v1", "ml-release", "httproutes", "sentiment")]
    jsonschema.validate(api.route, HTTPROUTE_SCHEMA)


def test_a_read_back_that_differs_from_the_weight_set_raises() -> None:
    api = FakeCustomObjects(render_httproute(EXAMPLE, 0), drop_weight=True)
    with pytest.raises(K8sRouterError, match="reads back canary 0 %, set 25 %"):
        set_httproute_weights(api, EXAMPLE, 25)


def test_the_httproute_patch_refuses_a_route_whose_backend_order_differs() -> None:
    route = render_httproute(EXAMPLE, 0)
    route["spec"]["rules"][0]["backendRefs"].reverse()
    with pytest.raises(K8sRouterError, match="patching HTTPRoute"):
        set_httproute_weights(FakeCustomObjects(route), EXAMPLE, 50)


def test_the_httproute_patch_is_test_then_replace() -> None:
    ops = [op["op"] for op in httproute_weight_patch(EXAMPLE, 5)]
    assert ops == ["test", "test", "replace", "replace"]


def test_set_ingress_canary_weight_patches_the_annotation_and_reads_back() -> None:
    _, canary = render_ingress_pair(EXAMPLE, 0)
    api = FakeNetworking(canary)
    assert set_ingress_canary_weight(api, EXAMPLE, 25) == 25
    assert api.ingress["metadata"]["annotations"][CANARY_WEIGHT_ANNOTATION] == "25"


def test_the_ingress_patch_refuses_the_main_ingress() -> None:
    main, _ = render_ingress_pair(EXAMPLE, 0)
    main["metadata"]["name"] = "sentiment-canary"
    main["metadata"]["annotations"] = {}
    with pytest.raises(K8sRouterError, match="patching Ingress"):
        set_ingress_canary_weight(FakeNetworking(main), EXAMPLE, 25)
    assert ingress_canary_weight_patch(5)[0]["op"] == "test"


@pytest.mark.parametrize(
    "change",
    [{"canary_version": EXAMPLE.stable_version}, {"archive_prefix": "/local/path"}, {"canary_replicas": 0}],
    ids=["same-version", "not-s3", "no-replicas"],
)
def test_bad_params_are_refused(change: dict[str, Any]) -> None:
    import dataclasses

    with pytest.raises(K8sRouterError):
        K8sServingParams(**{**dataclasses.asdict(EXAMPLE), **change})
