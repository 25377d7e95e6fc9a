"""The demo release end to end, then a deliberately worse candidate that must be rolled back."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ml_release.config import ReleaseSpec
from ml_release.naming import run_key
from tests.support.models import permute_labels

pytestmark = pytest.mark.e2e

SPEC = ReleaseSpec.for_model("sentiment")


def test_demo_release_is_promoted_with_a_complete_record(demo_release: dict[str, Any], torchserve: Any) -> None:
    record = demo_release["record"]
    assert demo_release["run"]["state"] == "success"
    assert record["decision"] == "promoted"
    assert "every check passed" in record["reason"]
    assert record["previous_production_version"] is None  # the first release
    # validation result, training metrics, the archive and its digest
    assert record["validation"]["summary"].startswith("all ")
    assert record["validation"]["row_count"] > 30000
    assert record["inputs"]["dataset_uri"] == demo_release["dataset_uri"]
    assert len(record["data_fingerprint"]) == 64
    assert {"train_loss", "samples_per_s"} <= set(record["training"]["metrics"])
    evaluation = record["evaluation"]
    assert evaluation["blessing"]["blessed"] is True
    assert evaluation["metrics"]["accuracy"] >= evaluation["baseline"]["accuracy"] + SPEC.blessing.baseline_margin
    assert record["archive"]["uri"].endswith(".mar") and len(record["archive"]["sha256"]) == 64
    # every check's figures
    checks = record["checks"]
    assert checks["pretraffic_gate"]["passed"] and checks["pretraffic_gate"]["ready_workers"] >= 1
    assert checks["check_accuracy"]["candidate"]["accuracy"] >= SPEC.release.accuracy.min_accuracy
    load = checks["check_load"]["summary"]
    assert load["requests"] >= 1000
    assert all(math.isfinite(load[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))
    assert load["error_rate"] <= SPEC.release.load.max_error_rate
    # and production really is the candidate now
    version = record["candidate"]["version"]
    assert torchserve.default_version("sentiment") == version
    answer = torchserve.predict("sentiment", {"text": "I love this car"})
    assert answer.status == 200 and answer.body["label"] in SPEC.data.labels


def _worse_archive(store: Any, production: dict[str, Any], tmp: Path) -> Path:
    """Production's own weights with the classifier's label rows permuted: a confident, wrong model."""
    from ml_release.packaging.archiver import build_archive
    from ml_release.training.trainer import download_model, read_committed_model

    marker = read_committed_model(store, production["training_output_uri"])
    worse_dir = permute_labels(download_model(store, marker, tmp / "model"), tmp / "worse")
    return build_archive(worse_dir, "sentiment", "worse-1", SPEC.serving, tmp / "out")


def test_a_worse_candidate_is_rolled_back_and_production_is_untouched(
    demo_release: dict[str, Any], airflow: Any, store: Any, torchserve: Any
) -> None:
    from ml_release.packaging.registry import ModelRegistry

    registry = ModelRegistry(store, "s3://ml-release/registry")
    production_version = demo_release["record"]["candidate"]["version"]
    production = registry.get_version("sentiment", production_version)
    with tempfile.TemporaryDirectory() as tmp:
        mar = _worse_archive(store, production, Path(tmp))
        archive_uri = "s3://ml-release/upstream/worse-candidate.mar"
        store.put_file(archive_uri, mar, create_only=True)
    run_id = "e2e-worse-candidate"
    airflow.trigger(
        "release_model",
        {"archive_uri": archive_uri, "eval_dataset_uri": production["eval_dataset_uri"]},
        dag_run_id=run_id,
    )
    run = airflow.wait_for_run("release_model", run_id, timeout_s=1200)

    assert run["state"] == "failed"
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("release_model", run_id)}
    assert states["check_accuracy"] == "failed"
    assert states["cleanup_canary"] == "success"
    record = store.get_json(f"s3://ml-release/releases/sentiment/{run_key('release_model', run_id)}/record.json")
    assert record["decision"] == "rolled_back"
    assert "check_accuracy: accuracy" in record["reason"]
    assert record["previous_production_version"] == production_version
    assert record["default_version_after"] == production_version
    assert torchserve.default_version("sentiment") == production_version
    assert torchserve.versions("sentiment") == [production_version]
    alias = registry.production("sentiment")
    assert alias is not None and alias.version == production_version
