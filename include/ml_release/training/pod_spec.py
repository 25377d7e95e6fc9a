"""The training pod, built by pure functions from the release spec.

Everything here returns plain Kubernetes JSON (camelCase dicts), so it can be validated against the
API schema, written out as a manifest (``include/k8s/``) and handed to the KubernetesPodOperator as
``pod_template_dict``, which reconciles its own fields on top. Nothing imports Airflow or the
Kubernetes client.

The container runs exactly the command the local backend runs
(:func:`ml_release.pipeline.training.trainer_command`), with ``python`` as the interpreter and
``--xcom-path /airflow/xcom/return.json``; with ``gpus > 1`` the interpreter becomes
``torchrun --standalone --nproc_per_node=<gpus>`` and the arguments stay the same. S3 credentials
reach the pod only as ``secretKeyRef`` (G30); the pod carries its own deadline (G10).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ml_release.config import KubernetesSpec

XCOM_PATH = "/airflow/xcom/return.json"
# The KubernetesPodOperator streams logs from, and waits on, the container of this name.
CONTAINER_NAME = "base"
# Kubeflow's training operator finds the trainer container by this name in a PyTorchJob.
PYTORCHJOB_CONTAINER_NAME = "pytorch"
TRAINER_MODULE = "ml_release.training.trainer"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SHM_VOLUME = "dshm"
LABEL_PREFIX = "ml-release.io"

_LABEL_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclasses.dataclass(frozen=True)
class PodIdentity:
    """What a pod is for; becomes its labels. ``run_id`` is None until a run exists."""

    model_name: str
    dag_id: str
    task_id: str
    run_id: str | None = None

    def labels(self) -> dict[str, str]:
        labels = {
            "app.kubernetes.io/name": "ml-release-trainer",
            "app.kubernetes.io/part-of": "ml-release",
            "app.kubernetes.io/component": "training",
            f"{LABEL_PREFIX}/model": label_value(self.model_name),
            f"{LABEL_PREFIX}/dag": label_value(self.dag_id),
            f"{LABEL_PREFIX}/task": label_value(self.task_id),
        }
        if self.run_id is not None:
            labels[f"{LABEL_PREFIX}/run"] = label_value(self.run_id)
        return labels


def label_value(text: str) -> str:
    """``text`` as a valid label value: at most 63 of ``[A-Za-z0-9_.-]``, alphanumeric at both ends.

    A value that had to change gets a short hash of the original, so two run ids that differ only
    in characters a label cannot hold (``manual__2026-01-01T00:00:00+00:00``) stay distinct.
    """
    clean = _LABEL_BAD.sub("_", text).strip("_.-")
    if clean == text and len(clean) <= 63:
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{clean[:54].rstrip('_.-')}-{digest}".lstrip("-")


def split_command(trainer_cmd: Sequence[str], gpus: int, nodes: int = 1) -> tuple[list[str], list[str]]:
    """Turn the local command (``<python> -m ml_release.training.trainer <args>``) into (command, args).

    The arguments are passed through untouched: the pod and the local process get the same ones.
    """
    cmd = list(trainer_cmd)
    if len(cmd) < 3 or cmd[1:3] != ["-m", TRAINER_MODULE]:
        raise ValueError(f"not a trainer command: {cmd[:3]}")
    args = cmd[3:]
    if nodes > 1:
        # Kubeflow's training operator sets MASTER_ADDR, MASTER_PORT and RANK (the node's rank) in
        # every replica; Kubernetes expands $(VAR) in a container's command from its env.
        launcher = [
            "torchrun",
            f"--nnodes={nodes}",
            f"--nproc_per_node={gpus}",
            "--node_rank=$(RANK)",
            "--master_addr=$(MASTER_ADDR)",
            "--master_port=$(MASTER_PORT)",
        ]
    elif gpus > 1:
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={gpus}"]
    else:
        launcher = ["python"]
    return [*launcher, "-m", TRAINER_MODULE], args


def trainer_env(k8s: KubernetesSpec, num_threads: int | None = None) -> list[dict[str, Any]]:
    """The container's environment: configuration as values, credentials only as secretKeyRef."""
    env: list[dict[str, Any]] = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": k8s.s3_secret_name, "key": key}}} for key in SECRET_KEYS
    ]
    env.append({"name": "AWS_DEFAULT_REGION", "value": k8s.s3_region})
    if k8s.s3_endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL", "value": k8s.s3_endpoint_url})
    env += [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "TRANSFORMERS_OFFLINE", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if num_threads is not None:
        env.append({"name": "OMP_NUM_THREADS", "value": str(num_threads)})
    return env


def resources(k8s: KubernetesSpec) -> dict[str, dict[str, str]]:
    requests = {"cpu": k8s.cpu_request, "memory": k8s.memory_request}
    limits = {"cpu": k8s.cpu_limit, "memory": k8s.memory_limit}
    if k8s.gpus:
        # Extended resources are whole units and cannot be overcommitted: request == limit.
        requests[k8s.gpu_resource] = limits[k8s.gpu_resource] = str(k8s.gpus)
    return {"requests": requests, "limits": limits}


def affinity(k8s: KubernetesSpec) -> dict[str, Any] | None:
    if not k8s.required_node_labels:
        return None
    expressions = [
        {"key": key, "operator": "In", "values": list(values)}
        for key, values in sorted(k8s.required_node_labels.items())
    ]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": expressions}]}
        }
    }


def tolerations(k8s: KubernetesSpec) -> list[dict[str, str]]:
    out = []
    for t in k8s.tolerations:
        item = {"key": t.key, "operator": t.operator, "effect": t.effect}
        if t.value is not None:
            item["value"] = t.value
        out.append(item)
    return out


def container(
    k8s: KubernetesSpec,
    command: Sequence[str] | None,
    args: Sequence[str] | None,
    name: str = CONTAINER_NAME,
    num_threads: int | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "image": k8s.image,
        "imagePullPolicy": k8s.image_pull_policy,
        "env": trainer_env(k8s, num_threads),
        "resources": resources(k8s),
        "volumeMounts": [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if command:
        spec["command"] = list(command)
    if args:
        spec["args"] = list(args)
    return spec


def pod_spec(
    k8s: KubernetesSpec,
    command: Sequence[str] | None,
    args: Sequence[str] | None,
    *,
    container_name: str = CONTAINER_NAME,
    restart_policy: str = "Never",
    num_threads: int | None = None,
) -> dict[str, Any]:
    """The PodSpec: one trainer container, its GPUs, its node pool, its deadline."""
    spec: dict[str, Any] = {
        "serviceAccountName": k8s.service_account,
        # The trainer talks to S3, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "restartPolicy": restart_policy,
        "activeDeadlineSeconds": k8s.active_deadline_seconds,
        "terminationGracePeriodSeconds": k8s.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": k8s.run_as_user,
            "runAsGroup": k8s.run_as_user,
            "fsGroup": k8s.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container(k8s, command, args, container_name, num_threads)],
        "volumes": [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}}],
    }
    if k8s.node_selector:
        spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        spec["tolerations"] = tolerations(k8s)
    if (aff := affinity(k8s)) is not None:
        spec["affinity"] = aff
    if k8s.priority_class_name:
        spec["priorityClassName"] = k8s.priority_class_name
    return spec


def pod_manifest(
    k8s: KubernetesSpec,
    identity: PodIdentity,
    command: Sequence[str] | None = None,
    args: Sequence[str] | None = None,
    *,
    name: str | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """A complete ``v1/Pod``; the KubernetesPodOperator's template and ``include/k8s/trainer-pod.yaml``."""
    metadata: dict[str, Any] = {"namespace": k8s.namespace, "labels": identity.labels()}
    if name:
        metadata["name"] = name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": pod_spec(k8s, command, args, num_threads=num_threads),
    }


def operator_kwargs(k8s: KubernetesSpec, identity: PodIdentity, num_threads: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``KubernetesPodOperator`` (besides ``task_id`` and the command).

    The pod itself travels as ``pod_template_dict``; the operator's own knobs say how Airflow
    drives it: delete on finish and on kill (G11), reattach after a restart (G12), deferrable
    waiting, streamed logs, a startup timeout, and the XCom sidecar reading ``return.json``.
    The command is set per run (it holds the run's URIs), see ``ml_release.airflow.tasks``.
    """
    return {
        "kubernetes_conn_id": k8s.kubernetes_conn_id,
        "namespace": k8s.namespace,
        "name": f"train-{identity.model_name}",
        "random_name_suffix": True,
        "pod_template_dict": pod_manifest(k8s, identity, num_threads=num_threads),
        "base_container_name": CONTAINER_NAME,
        "labels": identity.labels(),
        "service_account_name": k8s.service_account,
        "active_deadline_seconds": k8s.active_deadline_seconds,
        "startup_timeout_seconds": k8s.startup_timeout_seconds,
        "schedule_timeout_seconds": k8s.startup_timeout_seconds,
        "termination_grace_period": k8s.termination_grace_period_seconds,
        "get_logs": k8s.get_logs,
        "log_events_on_failure": True,
        "deferrable": k8s.deferrable,
        "durable": k8s.reattach_on_restart,
        "on_finish_action": k8s.on_finish_action,
        "on_kill_action": "delete_pod",
        "do_xcom_push": True,
        # The failure message would otherwise print the whole remote pod into the task log.
        "log_pod_spec_on_failure": False,
    }


def pytorchjob_manifest(
    k8s: KubernetesSpec,
    identity: PodIdentity,
    trainer_cmd: Sequence[str],
    name: str,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """A Kubeflow ``PyTorchJob`` (training-operator v1) for ``nodes`` nodes of ``gpus`` GPUs each.

    One Master and ``nodes - 1`` Workers share one pod template; each runs ``torchrun`` with the
    trainer's usual arguments. The job's runPolicy carries the same deadline (G10), deletes every
    pod when it ends (G11) and bounds restarts by the infrastructure retries (G13).
    """
    command, args = split_command(trainer_cmd, k8s.gpus, k8s.nodes)
    template = {
        "metadata": {"labels": identity.labels()},
        "spec": pod_spec(
            k8s,
            command,
            args,
            container_name=PYTORCHJOB_CONTAINER_NAME,
            restart_policy="Never",
            num_threads=num_threads,
        ),
    }
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if k8s.nodes > 1:
        replicas["Worker"] = {"replicas": k8s.nodes - 1, "restartPolicy": "Never", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": identity.labels()},
        "spec": {
            "nprocPerNode": str(k8s.gpus),
            "runPolicy": {
                "activeDeadlineSeconds": k8s.active_deadline_seconds,
                "backoffLimit": k8s.infrastructure_retries,
                "cleanPodPolicy": "All",
                "ttlSecondsAfterFinished": 3600,
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def pod_templates(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The PodTemplateSpecs inside a PyTorchJob, as ``v1/PodTemplate`` objects for schema validation."""
    out = []
    for role, replica in manifest["spec"]["pytorchReplicaSpecs"].items():
        out.append(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{manifest['metadata']['name']}-{role.lower()}"},
                "template": replica["template"],
            }
        )
    return out


# -- the example manifests in include/k8s ---------------------------------------------------------------

EXAMPLE_RUN = "manual__2026-01-01T00:00:00+00:00"


def example_trainer_cmd(model_name: str = "sentiment", profile_json: str = "{}") -> list[str]:
    """The command a run would get, with placeholder URIs (the manifests are examples to adapt)."""
    prefix = f"s3://ml-release/runs/{model_name}/example-run"
    return [
        "python",
        "-m",
        TRAINER_MODULE,
        "--train-uri",
        f"{prefix}/data/train.parquet",
        "--validation-uri",
        f"{prefix}/data/validation.parquet",
        "--output-uri",
        f"{prefix}/model",
        "--labels",
        "negative,neutral,positive",
        "--base-model",
        "all-MiniLM-L6-v2",
        "--profile-json",
        profile_json,
        "--xcom-path",
        XCOM_PATH,
    ]


def example_manifests(k8s: KubernetesSpec, model_name: str, profile_json: str, num_threads: int) -> dict[str, Any]:
    """``include/k8s/trainer-pod.yaml`` and ``trainer-pytorchjob.yaml`` for a spec."""
    identity = PodIdentity(model_name, "train_model", "train", EXAMPLE_RUN)
    cmd = example_trainer_cmd(model_name, profile_json)
    command, args = split_command(cmd, k8s.gpus)
    multi = dataclasses.replace(k8s, nodes=max(2, k8s.nodes), gpus=max(1, k8s.gpus))
    return {
        "trainer-pod.yaml": pod_manifest(
            k8s, identity, command, args, name=f"train-{model_name}-example", num_threads=num_threads
        ),
        "trainer-pytorchjob.yaml": pytorchjob_manifest(
            multi, identity, cmd, name=f"train-{model_name}-multinode", num_threads=num_threads
        ),
    }


def main() -> None:  # pragma: no cover - regenerates files checked by tests
    """Rewrite the generated manifests in include/k8s from the shipped release spec."""
    import json
    from pathlib import Path

    import yaml

    from ml_release.config import ReleaseSpec, to_plain

    spec = ReleaseSpec.for_model("sentiment")
    profile = spec.training.profiles["full"]
    out = Path(__file__).resolve().parents[2] / "k8s"
    manifests = example_manifests(
        spec.training.kubernetes,
        spec.model_name,
        json.dumps(to_plain(profile), sort_keys=True),
        profile.num_threads,
    )
    for name, manifest in manifests.items():
        header = (
            "# Generated by `python -m ml_release.training.pod_spec` from include/releases/sentiment.yaml\n"
            "# (training.kubernetes, profile full); a test keeps it equal to what the builder renders.\n"
        )
        (out / name).write_text(header + yaml.safe_dump(manifest, sort_keys=False, width=100), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    main()
