"""package is idempotent per run, and a tampered archive never reaches TorchServe (G15, G16)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from ml_release.config import ReleaseSpec
from ml_release.errors import ArtifactIntegrityError
from ml_release.packaging.registry import ModelRegistry
from ml_release.pipeline import release, training
from ml_release.pipeline.layout import Layout, RunRef
from ml_release.storage import ObjectStore
from tests.integration.test_trainer import put_parquet, result_line, run_trainer, tweets

pytestmark = pytest.mark.integration

SPEC = ReleaseSpec.for_model("sentiment")


@pytest.fixture(scope="module")
def trained(s3_env: dict[str, str]) -> dict[str, Any]:
    """A tiny model committed by the real trainer CLI under a run's prefix."""
    store = ObjectStore()
    bucket = f"test-pkg-{uuid.uuid4().hex[:12]}"
    store.ensure_bucket(bucket)
    put_parquet(store, f"s3://{bucket}/data/train.parquet", tweets(48))
    put_parquet(store, f"s3://{bucket}/data/validation.parquet", tweets(18))
    proc = run_trainer(s3_env, bucket, "runs/model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = result_line(proc.stdout)
    return {"bucket": bucket, "output_uri": f"s3://{bucket}/runs/model", "metrics": result["metrics"]}


def _package(store: ObjectStore, bucket: str, output_uri: str, run_id: str) -> dict[str, Any]:
    layout = Layout(f"s3://{bucket}")
    registry = ModelRegistry(store, layout.registry_root)
    lineage = {"training": {"metrics": {}}, "eval_dataset_uri": f"s3://{bucket}/data/validation.parquet"}
    return training.package(store, layout, registry, SPEC, RunRef("train_model", run_id), lineage, output_uri)


def test_running_package_again_creates_no_second_object_or_version(trained: dict[str, Any]) -> None:
    store, bucket = ObjectStore(), trained["bucket"]
    first = _package(store, bucket, trained["output_uri"], "run-1")
    second = _package(store, bucket, trained["output_uri"], "run-1")

    assert second == first
    archives = list(store.list_keys(f"s3://{bucket}/models/sentiment/archives/"))
    versions = list(store.list_keys(f"s3://{bucket}/registry/sentiment/versions/"))
    assert archives == [first["archive_uri"]]
    assert len(versions) == 1
    assert store.incomplete_uploads(bucket) == []


def test_package_after_a_crash_between_upload_and_record_records_the_stored_bytes(
    trained: dict[str, Any],
) -> None:
    store, bucket = ObjectStore(), trained["bucket"]
    first = _package(store, bucket, trained["output_uri"], "run-2")
    # Simulate the crash: the archive is in the bucket, its registry record is not.
    store.delete(ModelRegistry(store, f"s3://{bucket}/registry").version_uri("sentiment", first["model_version"]))

    again = _package(store, bucket, trained["output_uri"], "run-2")

    assert again["archive_uri"] == first["archive_uri"]
    assert again["sha256"] == first["sha256"]


def test_a_tampered_archive_is_refused_before_registration(
    trained: dict[str, Any], torchserve: Any, torchserve_client: Any
) -> None:
    store, bucket = ObjectStore(), trained["bucket"]
    record = _package(store, bucket, trained["output_uri"], "run-3")
    store.put(record["archive_uri"], b"PK\x03\x04 not the archive that was recorded")
    candidate = release.Candidate(
        "sentiment",
        record["model_version"],
        record["archive_uri"],
        record["sha256"],
        f"s3://{bucket}/data/validation.parquet",
        record,
    )
    model_store = Path(torchserve.settings.model_store)

    with pytest.raises(ArtifactIntegrityError, match="does not match its registry record"):
        release.deploy_canary(store, torchserve_client, SPEC, candidate, model_store)

    assert record["model_version"] not in torchserve_client.versions("sentiment")
    assert not (model_store / release.mar_name("sentiment", record["model_version"])).exists()
    assert not list(model_store.glob("*.unverified"))


def test_a_verified_candidate_is_registered_beside_the_default_without_taking_it(
    trained: dict[str, Any], torchserve: Any, torchserve_client: Any
) -> None:
    store, bucket = ObjectStore(), trained["bucket"]
    model_store = Path(torchserve.settings.model_store)
    records = [_package(store, bucket, trained["output_uri"], f"run-deploy-{i}") for i in (1, 2)]
    candidates = [
        release.Candidate("sentiment", r["model_version"], r["archive_uri"], r["sha256"], "s3://x-1/y", r)
        for r in records
    ]
    try:
        release.deploy_canary(store, torchserve_client, SPEC, candidates[0], model_store)
        torchserve_client.set_default("sentiment", candidates[0].version)
        release.deploy_canary(store, torchserve_client, SPEC, candidates[1], model_store)
        # a retry of the same step finds it registered and changes nothing
        release.deploy_canary(store, torchserve_client, SPEC, candidates[1], model_store)

        assert torchserve_client.default_version("sentiment") == candidates[0].version
        assert sorted(torchserve_client.versions("sentiment")) == sorted(c.version for c in candidates)
        release.rollback_canary(torchserve_client, "sentiment", candidates[1].version, candidates[0].version)
        assert torchserve_client.versions("sentiment") == [candidates[0].version]
    finally:
        for c in reversed(candidates):
            torchserve_client.unregister("sentiment", c.version)
