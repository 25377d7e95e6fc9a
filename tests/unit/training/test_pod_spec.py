"""The training pod, rendered through the KubernetesPodOperator itself, validated against the schema."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_release.config import KubernetesSpec, ReleaseSpec, TolerationSpec, to_plain
from ml_release.pipeline.training import trainer_command
from ml_release.training import pod_spec

pytestmark = pytest.mark.unit

K8S_VERSION = "1.37.0"  # the newest schema kubernetes-validate 1.37.0 carries
K8S_DIR = Path(__file__).resolve().parents[3] / "include" / "k8s"
SENTINEL = "sentinel-secret-4f1c9a77e0b2"
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
SPEC = ReleaseSpec.for_model("sentiment")


def variant(name: str) -> ReleaseSpec:
    k8s = SPEC.training.kubernetes
    changes: dict[str, Any] = {
        "one-gpu": {},
        "four-gpus": {"gpus": 4, "cpu_limit": "32", "memory_limit": "96Gi", "shm_size": "16Gi"},
        "cpu-only": {"gpus": 0, "node_selector": {}, "tolerations": ()},
        "spot-pool": {
            "tolerations": (
                *k8s.tolerations,
                TolerationSpec("cloud.google.com/gke-spot", "Equal", "true", "NoSchedule"),
            ),
            "node_selector": {"cloud.google.com/gke-spot": "true"},
            "required_node_labels": {"nvidia.com/gpu.product": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB")},
            "priority_class_name": "preemptible-training",
        },
    }[name]
    new_k8s = dataclasses.replace(k8s, **changes)
    return dataclasses.replace(SPEC, training=dataclasses.replace(SPEC.training, kubernetes=new_k8s))


VARIANTS = ["one-gpu", "four-gpus", "cpu-only", "spot-pool"]


@pytest.fixture(autouse=True)
def connections_with_sentinel_secrets() -> Iterator[None]:
    """Connections the operator and the object store hook read, holding a recognisable secret."""
    env = {
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(
            {"conn_type": "kubernetes", "extra": {"in_cluster": False, "namespace": "ml-release"}}
        ),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
            {"conn_type": "aws", "login": "AKIASENTINEL", "password": SENTINEL, "extra": {"region_name": "us-east-1"}}
        ),
        "AWS_SECRET_ACCESS_KEY": SENTINEL,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def render(spec: ReleaseSpec, run_id: str = "manual__2026-01-01T00:00:00+00:00") -> tuple[Any, dict[str, Any]]:
    """Build the DAG's operator, set the command the way prepare_train_pod does, build the pod."""
    from kubernetes.client import ApiClient

    from ml_release.airflow.tasks import train_pod_operator

    op = train_pod_operator(spec, dag_id="train_model")
    profile = spec.training.active
    cmd = trainer_command(
        spec,
        profile,
        "s3://ml-release/runs/sentiment/r1/data/train.parquet",
        "s3://ml-release/runs/sentiment/r1/data/validation.parquet",
        "s3://ml-release/runs/sentiment/r1/model",
        python="python",
        xcom_path=pod_spec.XCOM_PATH,
    )
    op.cmds, op.arguments = pod_spec.split_command(cmd, spec.training.kubernetes.gpus)
    identity = pod_spec.PodIdentity(spec.model_name, "train_model", "train", run_id)
    op.labels = {**op.labels, **identity.labels()}
    pod = op.build_pod_request_obj(None, dry_run=True)
    return op, ApiClient().sanitize_for_serialization(pod)


def validate(manifest: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def trainer(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == pod_spec.CONTAINER_NAME)


@pytest.mark.parametrize("name", VARIANTS, ids=VARIANTS)
def test_rendered_pod_validates_strictly_against_the_kubernetes_schema(name: str) -> None:
    _, pod = render(variant(name))
    validate(pod)


@pytest.mark.parametrize(("name", "gpus"), [("one-gpu", 1), ("four-gpus", 4), ("cpu-only", 0), ("spot-pool", 1)])
def test_gpu_limits_and_launcher_follow_the_gpu_count(name: str, gpus: int) -> None:
    _, pod = render(variant(name))
    c = trainer(pod)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert requests["cpu"] and requests["memory"] and limits["cpu"] and limits["memory"]
    tail = ["-m", "ml_release.training.trainer"]
    if gpus > 1:
        assert c["command"] == ["torchrun", "--standalone", f"--nproc_per_node={gpus}", *tail]
    else:
        assert c["command"] == ["python", *tail]
    assert c["args"][c["args"].index("--xcom-path") + 1] == "/airflow/xcom/return.json"


def test_pod_args_are_exactly_the_local_backends_args() -> None:
    spec = variant("four-gpus")
    _, pod = render(spec)
    local = trainer_command(
        spec,
        spec.training.active,
        "s3://ml-release/runs/sentiment/r1/data/train.parquet",
        "s3://ml-release/runs/sentiment/r1/data/validation.parquet",
        "s3://ml-release/runs/sentiment/r1/model",
        xcom_path=pod_spec.XCOM_PATH,
    )
    assert trainer(pod)["args"] == local[3:]


def test_spot_pool_gets_its_tolerations_node_selector_affinity_and_priority() -> None:
    _, pod = render(variant("spot-pool"))
    spec = pod["spec"]
    assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"]
    assert spec["priorityClassName"] == "preemptible-training"


def test_cpu_only_pod_asks_for_no_gpu_and_no_gpu_pool() -> None:
    _, pod = render(variant("cpu-only"))
    assert "nvidia.com/gpu" not in json.dumps(pod)
    assert not pod["spec"].get("tolerations") and not pod["spec"].get("nodeSelector")


def test_pod_carries_deadline_shm_service_account_and_non_root_user() -> None:
    _, pod = render(variant("one-gpu"))
    spec = pod["spec"]
    k8s = SPEC.training.kubernetes
    assert spec["activeDeadlineSeconds"] == k8s.active_deadline_seconds
    assert spec["restartPolicy"] == "Never"
    assert spec["serviceAccountName"] == "ml-release-trainer"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": k8s.shm_size}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer(pod)["volumeMounts"]
    assert trainer(pod)["image"] == k8s.image


def test_operator_cleans_up_reattaches_defers_streams_logs_and_bounds_startup() -> None:
    op, _ = render(variant("one-gpu"))
    k8s = SPEC.training.kubernetes
    assert op.task_id == "train"
    assert op.on_finish_action.value == "delete_pod"
    assert op.on_kill_action.value == "delete_pod"
    assert op.reattach_on_restart is True and op.durable is True
    assert op.deferrable is k8s.deferrable
    assert op.get_logs is True
    assert op.startup_timeout_seconds == k8s.startup_timeout_seconds
    assert op.active_deadline_seconds == k8s.active_deadline_seconds
    assert op.do_xcom_push is True
    assert op.retries == k8s.max_retries
    assert op.retry_policy is not None


def test_pod_labels_name_model_dag_run_and_task_in_label_syntax() -> None:
    _, pod = render(variant("one-gpu"), run_id="scheduled__2026-01-01T00:00:00+00:00/../" + "x" * 80)
    labels = pod["metadata"]["labels"]
    for key in ("model", "dag", "run", "task"):
        assert f"ml-release.io/{key}" in labels
    assert labels["ml-release.io/model"] == "sentiment"
    assert labels["ml-release.io/task"] == "train"
    for value in labels.values():
        assert LABEL_VALUE.match(value) and len(value) <= 63, value


def test_label_value_keeps_distinct_run_ids_distinct() -> None:
    a = pod_spec.label_value("manual__2026-01-01T00:00:00+00:00")
    b = pod_spec.label_value("manual__2026-01-01T00_00_00_00_00")
    assert a != b
    assert pod_spec.label_value("train_model") == "train_model"


@pytest.mark.parametrize("name", VARIANTS, ids=VARIANTS)
def test_no_secret_value_appears_anywhere_in_the_rendered_spec(name: str) -> None:
    op, pod = render(variant(name))
    text = json.dumps(pod) + repr(op.pod_template_dict) + repr(op.env_vars) + json.dumps(op.arguments)
    assert SENTINEL not in text
    assert "AKIASENTINEL" not in text
    for env in trainer(pod)["env"]:
        if env["name"].startswith("AWS_ACCESS") or env["name"].startswith("AWS_SECRET"):
            assert "value" not in env
            assert env["valueFrom"]["secretKeyRef"] == {"name": "ml-release-s3", "key": env["name"]}


def test_pytorchjob_embeds_a_pod_template_that_validates_as_core_podtemplate() -> None:
    k8s = dataclasses.replace(SPEC.training.kubernetes, nodes=3, gpus=8)
    job = pod_spec.pytorchjob_manifest(
        k8s, pod_spec.PodIdentity("sentiment", "train_model", "train", "r1"), pod_spec.example_trainer_cmd(), "job"
    )
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == k8s.active_deadline_seconds
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "All"
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--nnodes=3", "--nproc_per_node=8"]
    # kubernetes-validate knows only core and built-in API groups, not the PyTorchJob CRD:
    # the part Kubernetes itself runs, the pod template, is validated as a core v1 PodTemplate.
    for template in pod_spec.pod_templates(job):
        validate(template)


def test_generated_manifests_in_include_k8s_equal_what_the_builder_renders() -> None:
    import yaml

    profile = SPEC.training.profiles["full"]
    rendered = pod_spec.example_manifests(
        SPEC.training.kubernetes, "sentiment", json.dumps(to_plain(profile), sort_keys=True), profile.num_threads
    )
    for name, manifest in rendered.items():
        assert yaml.safe_load((K8S_DIR / name).read_text()) == manifest, f"regenerate: python -m {pod_spec.__name__}"


K8S_FILES = sorted(K8S_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", K8S_FILES, ids=[p.name for p in K8S_FILES])
def test_every_training_manifest_in_include_k8s_validates(path: Path) -> None:
    import yaml

    for doc in yaml.safe_load_all(path.read_text()):
        if doc.get("kind") == "PyTorchJob":
            for template in pod_spec.pod_templates(doc):
                validate(template)
        else:
            validate(doc)


def test_shipped_spec_pins_its_image_and_bounds_retries() -> None:
    k8s: KubernetesSpec = SPEC.training.kubernetes
    assert "@sha256:" in k8s.image or not k8s.image.endswith(":latest")
    assert SPEC.training.backend == "local"
    assert k8s.on_finish_action == "delete_pod"
    assert k8s.active_deadline_seconds <= SPEC.training.timeout_seconds
