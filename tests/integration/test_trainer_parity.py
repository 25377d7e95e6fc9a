"""The local backend and the pod's exact command and environment give the same committed output.

Both run here on the CPU with the tiny model against the real moto S3 server: once through
``trainer_command`` + ``train_local`` (what the local ``train`` task does), once with the container
command, args and env taken from the pod the KubernetesPodOperator renders, secretKeyRef values
resolved from a dict standing in for the Secret. Two deliberate differences, both outside the
trainer's contract: ``python`` becomes this interpreter, and ``/airflow/xcom/return.json`` (the
mount the operator's sidecar reads) becomes a temporary file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from ml_release.config import ReleaseSpec, TrainingProfile, build
from ml_release.pipeline.training import train_local, trainer_command
from ml_release.storage import ObjectStore
from ml_release.training import pod_spec
from tests.integration.test_trainer import TINY_PROFILE, put_parquet, tweets

pytestmark = pytest.mark.integration


def committed(store: ObjectStore, output_uri: str) -> tuple[dict[str, Any], set[str]]:
    marker = store.get_json(output_uri + "/_SUCCESS")
    files = {uri.removeprefix(marker["model_uri"]) for uri in store.list_keys(marker["model_uri"])}
    return marker, files


def test_pod_command_and_env_commit_the_same_layout_marker_and_metrics_as_the_local_backend(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    from kubernetes.client import ApiClient

    from ml_release.airflow.tasks import train_pod_operator

    store = ObjectStore()
    bucket = f"test-parity-{uuid.uuid4().hex[:12]}"
    store.ensure_bucket(bucket)
    train_uri, val_uri = f"s3://{bucket}/data/train.parquet", f"s3://{bucket}/data/validation.parquet"
    put_parquet(store, train_uri, tweets(48))
    put_parquet(store, val_uri, tweets(18))

    base = ReleaseSpec.for_model("sentiment")
    k8s = dataclasses.replace(
        base.training.kubernetes, gpus=0, node_selector={}, tolerations=(), s3_endpoint_url=s3_env["AWS_ENDPOINT_URL"]
    )
    spec = dataclasses.replace(base, training=dataclasses.replace(base.training, kubernetes=k8s))
    profile: TrainingProfile = build(TrainingProfile, TINY_PROFILE, "profile")

    # 1. the local backend
    local_out = f"s3://{bucket}/local/model"
    local_cmd = [*trainer_command(spec, profile, train_uri, val_uri, local_out), "--tiny"]
    local_result = train_local(local_cmd, dict(s3_env), timeout_s=300, on_line=lambda _line: None)

    # 2. the pod: rendered through the operator, then run as the container would run
    pod_out = f"s3://{bucket}/pod/model"
    op = train_pod_operator(spec, dag_id="train_model")
    cmd = [*trainer_command(spec, profile, train_uri, val_uri, pod_out, python="python", xcom_path=pod_spec.XCOM_PATH)]
    op.cmds, op.arguments = pod_spec.split_command([*cmd, "--tiny"], k8s.gpus)
    os.environ.setdefault("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": {}}))
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(None, dry_run=True))
    container = next(c for c in pod["spec"]["containers"] if c["name"] == pod_spec.CONTAINER_NAME)
    secret = {
        "AWS_ACCESS_KEY_ID": s3_env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3_env["AWS_SECRET_ACCESS_KEY"],
    }
    env = {}
    for item in container["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == k8s.s3_secret_name
            env[item["name"]] = secret[ref["key"]]
        else:
            env[item["name"]] = item["value"]
    xcom = tmp_path / "xcom" / "return.json"
    argv = [sys.executable if part == "python" else part for part in container["command"]]
    argv += [str(xcom) if part == pod_spec.XCOM_PATH else part for part in container["args"]]
    # No AWS_* from this process: the pod's credentials come only from its env (the Secret).
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(argv, env={**base_env, **env}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pod_result = json.loads(xcom.read_text())

    local_marker, local_files = committed(store, local_out)
    pod_marker, pod_files = committed(store, pod_out)
    assert local_files == pod_files
    assert set(local_marker) == set(pod_marker) == {"model_uri", "files", "metrics"}
    assert set(local_marker["files"]) == set(pod_marker["files"]) == local_files
    assert set(local_marker["metrics"]) == set(pod_marker["metrics"])
    assert set(local_result) == set(pod_result) == {"model_uri", "marker_uri", "metrics"}
    assert pod_result["marker_uri"] == pod_out + "/_SUCCESS"
    assert pod_result["metrics"] == pod_marker["metrics"]
    assert pod_marker["metrics"]["profile"] == local_marker["metrics"]["profile"]


def test_two_rank_torchrun_on_gloo_commits_once_with_world_size_in_the_metrics(s3_env: dict[str, str]) -> None:
    """What a 2-GPU pod runs (torchrun + DistributedDataParallel), on the CPU with gloo."""
    store = ObjectStore()
    bucket = f"test-ddp-{uuid.uuid4().hex[:12]}"
    store.ensure_bucket(bucket)
    put_parquet(store, f"s3://{bucket}/train.parquet", tweets(64))
    put_parquet(store, f"s3://{bucket}/validation.parquet", tweets(18))
    spec = ReleaseSpec.for_model("sentiment")
    profile: TrainingProfile = build(TrainingProfile, TINY_PROFILE, "profile")
    cmd = trainer_command(
        spec, profile, f"s3://{bucket}/train.parquet", f"s3://{bucket}/validation.parquet", f"s3://{bucket}/model"
    )
    command, args = pod_spec.split_command([*cmd, "--tiny"], gpus=2)
    assert command[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    argv = [str(Path(sys.executable).with_name("torchrun")), *command[1:], *args]
    proc = subprocess.run(argv, env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("ML_RELEASE_RESULT ")]
    assert len(results) == 1  # rank 0 alone commits and reports
    marker, _ = committed(store, f"s3://{bucket}/model")
    assert marker["metrics"]["world_size"] == 2
    assert marker["metrics"]["model_flops_utilisation"] is None  # no known peak on a CPU: "unknown"
    assert "rank 1 of 2" in proc.stderr
