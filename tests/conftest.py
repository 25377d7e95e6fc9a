from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Airflow reads its configuration at import: give the test process its own throwaway home so
# that the DAG tests never touch a developer's Airflow database or the demo stack's.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="ml-release-airflow-test-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from tests.support.services import start_moto

LAYER_MARKERS = ("dags", "unit", "integration", "e2e")
ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test belongs to exactly one layer, so that CI can select layers by marker."""
    for item in items:
        layers = [m for m in LAYER_MARKERS if item.get_closest_marker(m)]
        if len(layers) != 1:
            raise pytest.UsageError(f"{item.nodeid} must carry exactly one of {LAYER_MARKERS}, has {layers}")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server: the running stack's if there is one, else a fresh moto."""
    endpoint = os.environ.get("ML_RELEASE_TEST_S3_ENDPOINT")
    if endpoint:
        yield endpoint
        return
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def s3_env(s3_endpoint: str) -> Iterator[dict[str, str]]:
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def object_store(s3_env: dict[str, str]):  # type: ignore[no-untyped-def]
    from ml_release.storage import ObjectStore

    return ObjectStore()


@pytest.fixture()
def bucket(object_store) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty bucket per test, so tests never see each other's objects."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    object_store.ensure_bucket(name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT classifier saved like the trainer saves one (handler and TorchServe tests)."""
    from ml_release.training.model import tiny_classifier

    model, tokenizer = tiny_classifier(("negative", "neutral", "positive"))
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
