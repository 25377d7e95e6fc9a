"""The steps of ``train_model``: validate, split, train, evaluate, package.

Each step reads references (S3 URIs) and writes its outputs under the run's prefix with
create-only writes, so a retry of the same run finds its earlier output, logs
"already exists, skipping" and carries on with what is stored (G15).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ml_release.config import ReleaseSpec, TrainingProfile, to_plain
from ml_release.errors import (
    BlessingFailed,
    DataValidationFailed,
    MLReleaseError,
    ObjectExistsError,
)
from ml_release.naming import model_version_for_run
from ml_release.packaging.registry import ModelRegistry
from ml_release.pipeline.layout import Layout, RunRef
from ml_release.storage import ObjectStore, sha256_file

log = logging.getLogger(__name__)

RESULT_PREFIX = "ML_RELEASE_RESULT "


class TrainerFailed(MLReleaseError):
    """Raised when the trainer process exits non-zero; ``exit_code`` tells retryable from not."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def put_once(store: ObjectStore, uri: str, body: bytes, **kwargs: Any) -> bool:
    """Create ``uri`` unless a previous attempt already did; returns whether it wrote."""
    try:
        store.put(uri, body, create_only=True, **kwargs)
        return True
    except ObjectExistsError:
        log.info("%s already exists, skipping", uri)
        return False


def put_json_once(store: ObjectStore, uri: str, obj: Any) -> bool:
    body = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
    return put_once(store, uri, body, content_type="application/json")


# -- validate_data ---------------------------------------------------------------------------


def resolve_dataset_uri(store: ObjectStore, spec: ReleaseSpec, dataset_uri: str | None) -> str:
    """The given URI, or for a scheduled run the newest CSV drop under the spec's prefix."""
    if dataset_uri:
        return dataset_uri
    prefix = spec.data.dataset_prefix
    drops = sorted(uri for uri in store.list_keys(prefix) if uri.endswith(".csv"))
    if not drops:
        raise DataValidationFailed(f"no dataset_uri given and no .csv drop under {prefix}")
    return drops[-1]


def validate_data(
    store: ObjectStore, layout: Layout, spec: ReleaseSpec, run: RunRef, dataset_uri: str
) -> dict[str, Any]:
    from ml_release.validation.runner import validate_dataset

    prefix = f"{layout.run_prefix(spec.model_name, run)}/validation"
    report_uri = f"{prefix}/report.json"
    info = store.head(dataset_uri)
    if info is None:
        raise DataValidationFailed(f"dataset_uri {dataset_uri} does not exist")
    if info.size > spec.data.max_bytes:
        # G9: refuse on the HEAD, before a byte is read into a worker's memory.
        oversize: dict[str, Any] = {
            "success": False,
            "dataset_uri": dataset_uri,
            "size_bytes": info.size,
            "outcomes": [
                {
                    "expectation": "input.size_within_limit",
                    "column": None,
                    "success": False,
                    "observed": info.size,
                    "unexpected_examples": [],
                    "detail": f"{info.size} bytes > data.max_bytes {spec.data.max_bytes}",
                }
            ],
        }
        put_json_once(store, report_uri, oversize)
        raise DataValidationFailed(oversize["outcomes"][0]["detail"], evidence_uri=report_uri)

    raw = store.get_bytes(dataset_uri, max_bytes=spec.data.max_bytes)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ml-release-docs-") as docs:
        report, _ = validate_dataset(raw, spec.data, docs_dir=Path(docs))
        elapsed = time.perf_counter() - started
        payload = {"dataset_uri": dataset_uri, "validated_in_s": round(elapsed, 2), **report.to_dict()}
        put_json_once(store, report_uri, payload)
        docs_uri = _upload_tree(store, Path(docs), f"{prefix}/data_docs")
    log.info("validation of %s: %s (%.1fs)", dataset_uri, report.summary(), elapsed)
    if not report.success:
        raise DataValidationFailed(f"{dataset_uri}: {report.summary()}", evidence_uri=report_uri)
    return {
        "dataset_uri": dataset_uri,
        "report_uri": report_uri,
        "data_docs_uri": docs_uri,
        "row_count": report.row_count,
        "size_bytes": len(raw),
        "summary": report.summary(),
    }


def _upload_tree(store: ObjectStore, root: Path, prefix_uri: str) -> str | None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(root).as_posix()
        ctype = "text/html" if path.suffix == ".html" else "application/octet-stream"
        put_once(store, f"{prefix_uri}/{rel}", path.read_bytes(), content_type=ctype)
    index = [p for p in files if p.name == "index.html"]
    return f"{prefix_uri}/{index[0].relative_to(root).as_posix()}" if index else None


# -- split -----------------------------------------------------------------------------------


def split(store: ObjectStore, layout: Layout, spec: ReleaseSpec, run: RunRef, dataset_uri: str) -> dict[str, Any]:
    from ml_release.data.dataset import read_csv_bytes
    from ml_release.data.split import dataset_fingerprint, split_dataset, to_parquet_bytes

    prefix = f"{layout.run_prefix(spec.model_name, run)}/data"
    raw = store.get_bytes(dataset_uri, max_bytes=spec.data.max_bytes)
    parts = split_dataset(read_csv_bytes(raw, spec.data), spec.data)
    result: dict[str, Any] = {"fingerprint": dataset_fingerprint(raw, spec.data), "counts": {}, "uris": {}}
    for name, frame in parts.items():
        uri = f"{prefix}/{name}.parquet"
        put_once(store, uri, to_parquet_bytes(frame))
        result["uris"][name] = uri
        result["counts"][name] = len(frame)
    put_json_once(store, f"{prefix}/fingerprint.json", {"dataset_uri": dataset_uri, **result})
    log.info("split %s into %s (fingerprint %s)", dataset_uri, result["counts"], result["fingerprint"][:12])
    return result


# -- train -----------------------------------------------------------------------------------


def training_profile(spec: ReleaseSpec, overrides: Mapping[str, Any]) -> TrainingProfile:
    profile = spec.training.active
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(profile, **changes) if changes else profile


def trainer_command(
    spec: ReleaseSpec,
    profile: TrainingProfile,
    train_uri: str,
    validation_uri: str,
    output_uri: str,
    python: str = sys.executable,
    xcom_path: str | None = None,
) -> list[str]:
    """The trainer's command line: the local backend runs it, a training pod runs the same one."""
    cmd = [
        python,
        "-m",
        "ml_release.training.trainer",
        "--train-uri",
        train_uri,
        "--validation-uri",
        validation_uri,
        "--output-uri",
        output_uri,
        "--labels",
        ",".join(spec.data.labels),
        "--base-model",
        spec.training.base_model,
        "--profile-json",
        json.dumps(to_plain(profile), sort_keys=True),
    ]
    if xcom_path:
        cmd += ["--xcom-path", xcom_path]
    return cmd


def train_local(
    cmd: list[str],
    env: Mapping[str, str],
    timeout_s: float,
    on_line: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run the trainer as a child process, streaming its log, bounded by ``timeout_s`` (G10)."""
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a timeout or a kill takes the whole process group down (G11)
    )
    deadline = time.monotonic() + timeout_s
    result: dict[str, Any] | None = None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX) :])
            else:
                on_line(line)
            if time.monotonic() > deadline:
                raise TrainerFailed(f"trainer exceeded its {timeout_s:.0f}s deadline", exit_code=-1)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (TrainerFailed, subprocess.TimeoutExpired, BaseException):
        _kill_group(proc)
        raise
    if code != 0:
        raise TrainerFailed(f"trainer exited with code {code}", exit_code=code)
    if result is None:
        raise TrainerFailed("trainer exited 0 without a result line", exit_code=code)
    return result


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# -- evaluate --------------------------------------------------------------------------------


def _predict_labels(model_dir: Path, texts: list[str], max_length: int) -> list[str]:
    from ml_release.evaluation.metrics import predict_proba
    from ml_release.training.model import load_classifier

    model, tokenizer, labels = load_classifier(model_dir)
    proba = predict_proba(model, tokenizer, texts, batch_size=64, max_length=max_length)
    return [labels[i] for i in proba.argmax(axis=1)]


def evaluate(
    store: ObjectStore,
    layout: Layout,
    registry: ModelRegistry,
    spec: ReleaseSpec,
    run: RunRef,
    split_result: Mapping[str, Any],
    train_result: Mapping[str, Any],
) -> dict[str, Any]:
    import torch

    from ml_release.data.split import read_parquet_bytes
    from ml_release.evaluation.blessing import bless
    from ml_release.evaluation.metrics import classification_metrics, majority_baseline
    from ml_release.training.trainer import download_model, read_committed_model

    torch.set_num_threads(spec.training.active.num_threads)
    prefix = f"{layout.run_prefix(spec.model_name, run)}/evaluation"
    test = read_parquet_bytes(store.get_bytes(split_result["uris"]["test"]))
    train = read_parquet_bytes(store.get_bytes(split_result["uris"]["train"]))
    texts, truth = test["text"].tolist(), test["label"].tolist()
    labels = list(spec.data.labels)
    index = {label: i for i, label in enumerate(labels)}
    max_length = spec.training.active.max_length

    def score(output_uri: str) -> dict[str, Any]:
        marker = read_committed_model(store, output_uri)
        if marker is None:
            raise MLReleaseError(f"no committed model (no _SUCCESS marker) under {output_uri}")
        with tempfile.TemporaryDirectory(prefix="ml-release-eval-") as tmp:
            predicted = _predict_labels(download_model(store, marker, Path(tmp)), texts, max_length)
        return classification_metrics([index[t] for t in truth], [index[p] for p in predicted], labels)

    started = time.perf_counter()
    candidate = score(train_result["output_uri"])
    baseline = majority_baseline(train["label"].tolist(), truth)
    production: dict[str, Any] | None = None
    alias = registry.production(spec.model_name)
    if alias is not None:
        record = registry.get_version(spec.model_name, alias.version)
        if record and record.get("training_output_uri"):
            # Same split, same code: the comparison is on equal terms (G23's offline twin).
            production = {"version": alias.version, **score(record["training_output_uri"])}
    blessing = bless(
        candidate["accuracy"],
        baseline["accuracy"],
        production["accuracy"] if production else None,
        spec.blessing,
    )
    result = {
        "metrics": candidate,
        "baseline": baseline,
        "production": production,
        "blessing": blessing.to_dict(),
        "evaluated_in_s": round(time.perf_counter() - started, 2),
    }
    put_json_once(store, f"{prefix}/metrics.json", result)
    log.info(
        "test accuracy %.3f macro-F1 %.3f (baseline %.3f); %s",
        candidate["accuracy"],
        candidate["macro_f1"],
        baseline["accuracy"],
        "; ".join(blessing.reasons),
    )
    if not blessing.blessed:
        raise BlessingFailed("not blessed: " + "; ".join(blessing.reasons), evidence_uri=f"{prefix}/metrics.json")
    return {"metrics_uri": f"{prefix}/metrics.json", **result}


# -- package ---------------------------------------------------------------------------------


def package(
    store: ObjectStore,
    layout: Layout,
    registry: ModelRegistry,
    spec: ReleaseSpec,
    run: RunRef,
    lineage: Mapping[str, Any],
    training_output_uri: str,
) -> dict[str, Any]:
    """Archive the trained model, store it create-only and register it, exactly once per run."""
    from ml_release.packaging.archiver import build_archive
    from ml_release.training.trainer import download_model, read_committed_model

    model, version = spec.model_name, model_version_for_run(run.dag_id, run.run_id)
    existing = registry.get_version(model, version)
    if existing is not None:
        log.info("registry version %s/%s already exists, skipping", model, version)
        return existing

    archive_uri = layout.archive_uri(model, version)
    stored = store.head(archive_uri)
    if stored is None:
        marker = read_committed_model(store, training_output_uri)
        if marker is None:
            raise MLReleaseError(f"no committed model under {training_output_uri}")
        with tempfile.TemporaryDirectory(prefix="ml-release-pkg-") as tmp:
            model_dir = download_model(store, marker, Path(tmp) / "model")
            mar = build_archive(model_dir, model, version, spec.serving, Path(tmp) / "out")
            sha256 = sha256_file(mar)
            try:
                store.put_file(archive_uri, mar, create_only=True, metadata={"sha256": sha256})
            except ObjectExistsError:
                # An earlier attempt uploaded and died before registering: its bytes are the
                # artifact (ours differ by the manifest's timestamp), so record those.
                log.info("%s already exists, skipping upload", archive_uri)
                stored = store.head(archive_uri)
    if stored is not None:
        sha256 = _sha256_of(store, archive_uri)  # the stored bytes, not their metadata, are the truth

    record, created = registry.register_version(
        {
            "model_name": model,
            "model_version": version,
            "archive_uri": archive_uri,
            "sha256": sha256,
            "source": {"dag_id": run.dag_id, "run_id": run.run_id},
            "training_output_uri": training_output_uri,
            **lineage,
        }
    )
    log.info(
        "%s %s/%s -> %s (sha256 %s)",
        "registered" if created else "found",
        model,
        version,
        archive_uri,
        sha256,
    )
    return record


def _sha256_of(store: ObjectStore, uri: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return store.download(uri, Path(tmp) / "artifact")
