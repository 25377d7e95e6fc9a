"""The trainer CLI against a real S3 server: the commit protocol, re-runs and exit codes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_release.errors import ArtifactIntegrityError
from ml_release.storage import ObjectStore

pytestmark = pytest.mark.integration

LABELS = "negative,neutral,positive"
TINY_PROFILE: dict[str, Any] = {
    "max_train_samples": 40,
    "max_eval_samples": 16,
    "epochs": 1.0,
    "batch_size": 8,
    "gradient_accumulation_steps": 2,
    "max_length": 32,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "warmup_ratio": 0.1,
    "num_threads": 1,
    "precision": "fp32",
    "compile": False,
    "log_every_steps": 1,
    "seed": 5,
}
EXPECTED_METRICS = {
    "train_loss",
    "validation_accuracy",
    "validation_macro_f1",
    "samples_per_s",
    "tokens_per_s",
    "real_to_padded_token_ratio",
    "steps",
    "train_samples",
    "wall_s",
    "device",
    "precision",
    "torch_version",
}


def tweets(n: int) -> dict[str, list[str]]:
    words = {"negative": "hate awful scary", "neutral": "drove today saw", "positive": "love great smooth"}
    labels = [LABELS.split(",")[i % 3] for i in range(n)]
    texts = [f"I {words[lab]} the self-driving car {'really ' * (i % 7)}number {i}" for i, lab in enumerate(labels)]
    return {"text": texts, "label": labels}


def put_parquet(store: ObjectStore, uri: str, columns: dict[str, list[str]]) -> None:
    import pandas as pd

    buf = io.BytesIO()
    pd.DataFrame(columns).to_parquet(buf, index=False)
    store.put(uri, buf.getvalue())


def run_trainer(
    env: dict[str, str], bucket: str, output: str, *, train: str = "data/train.parquet", **extra: str
) -> subprocess.CompletedProcess[str]:
    args = {
        "--train-uri": f"s3://{bucket}/{train}",
        "--validation-uri": f"s3://{bucket}/data/validation.parquet",
        "--output-uri": f"s3://{bucket}/{output}",
        "--labels": LABELS,
        "--base-model": "all-MiniLM-L6-v2",
        "--profile-json": json.dumps(TINY_PROFILE),
        **extra,
    }
    argv = [sys.executable, "-m", "ml_release.training.trainer", "--tiny"]
    argv += [part for pair in args.items() for part in pair]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)


def keys(store: ObjectStore, bucket: str, prefix: str) -> set[str]:
    return set(store.list_keys(f"s3://{bucket}/{prefix}"))


def result_line(stdout: str) -> dict[str, Any]:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("ML_RELEASE_RESULT "), stdout
    return dict(json.loads(last.removeprefix("ML_RELEASE_RESULT ")))


@pytest.fixture(scope="module")
def data_bucket(s3_env: dict[str, str]) -> str:
    store = ObjectStore()
    name = f"test-trainer-{uuid.uuid4().hex[:12]}"
    store.ensure_bucket(name)
    put_parquet(store, f"s3://{name}/data/train.parquet", tweets(48))
    put_parquet(store, f"s3://{name}/data/validation.parquet", tweets(18))
    return name


@pytest.fixture(scope="module")
def first_run(
    s3_env: dict[str, str], data_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """One tiny training run, shared: the tests below only read what it committed."""
    xcom = tmp_path_factory.mktemp("xcom") / "airflow" / "xcom" / "return.json"
    proc = run_trainer(s3_env, data_bucket, "run-1/model/", **{"--xcom-path": str(xcom)})
    assert proc.returncode == 0, proc.stderr
    yield {"proc": proc, "xcom": xcom, "output": "run-1/model/"}


def test_tiny_run_commits_attempt_files_and_marker_listing_every_sha256(
    first_run: dict[str, Any], data_bucket: str, object_store: ObjectStore
) -> None:
    result = result_line(first_run["proc"].stdout)
    output = f"s3://{data_bucket}/{first_run['output']}"
    marker = object_store.get_json(output + "_SUCCESS")

    assert result["marker_uri"] == output + "_SUCCESS"
    assert result["model_uri"] == marker["model_uri"]
    assert marker["model_uri"].startswith(output + "attempt-")
    assert json.loads(first_run["xcom"].read_text()) == result
    attempt = {uri.removeprefix(marker["model_uri"]) for uri in object_store.list_keys(marker["model_uri"])}
    assert attempt == set(marker["files"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json"} <= attempt
    for name, digest in marker["files"].items():
        assert hashlib.sha256(object_store.get_bytes(marker["model_uri"] + name)).hexdigest() == digest
    assert object_store.get_json(marker["model_uri"] + "metrics.json") == marker["metrics"] == result["metrics"]
    assert set(marker["metrics"]) >= EXPECTED_METRICS
    assert marker["metrics"]["train_samples"] == 40
    assert marker["metrics"]["real_to_padded_token_ratio"] >= 0.7


def test_tiny_run_writes_the_marker_after_every_attempt_file(
    first_run: dict[str, Any], data_bucket: str, object_store: ObjectStore
) -> None:
    listing = object_store.client.list_objects_v2(Bucket=data_bucket, Prefix=first_run["output"])["Contents"]
    written = {item["Key"].rsplit("/", 1)[-1]: item["LastModified"] for item in listing}

    assert written["_SUCCESS"] >= max(t for name, t in written.items() if name != "_SUCCESS")


def test_tiny_run_logs_progress_to_stderr_and_only_the_result_to_stdout(first_run: dict[str, Any]) -> None:
    proc = first_run["proc"]

    assert proc.stdout.count("ML_RELEASE_RESULT") == 1
    assert "step 1/" in proc.stderr and "samples/s" in proc.stderr and "eta" in proc.stderr


def test_second_run_finds_the_marker_and_neither_trains_nor_writes(
    first_run: dict[str, Any], s3_env: dict[str, str], data_bucket: str, object_store: ObjectStore
) -> None:
    before = keys(object_store, data_bucket, first_run["output"])

    proc = run_trainer(s3_env, data_bucket, first_run["output"])

    assert proc.returncode == 0, proc.stderr
    assert "already exists, skipping" in proc.stderr
    assert "training:" not in proc.stderr
    assert result_line(proc.stdout) == result_line(first_run["proc"].stdout)
    assert keys(object_store, data_bucket, first_run["output"]) == before


@pytest.mark.parametrize(
    "extra",
    [
        {"--profile-json": json.dumps({**TINY_PROFILE, "learning_rate_typo": 0.1})},
        {"--profile-json": "[]"},
        {"--labels": "positive"},
        {"--output-uri": "s3://bad_bucket/x/"},
        {"--no-such-flag": "1"},
    ],
    ids=["unknown-profile-key", "profile-not-a-mapping", "one-label", "bad-output-uri", "unknown-flag"],
)
def test_bad_configuration_exits_2_and_writes_nothing(
    extra: dict[str, str], s3_env: dict[str, str], data_bucket: str, object_store: ObjectStore
) -> None:
    output = f"bad-config-{uuid.uuid4().hex[:8]}/"

    proc = run_trainer(s3_env, data_bucket, output, **extra)

    assert proc.returncode == 2, proc.stderr
    assert "ML_RELEASE_RESULT" not in proc.stdout
    assert not keys(object_store, data_bucket, output)


@pytest.mark.parametrize(
    "train",
    [
        {**tweets(12), "label": ["negative"] * 11 + ["ecstatic"]},
        {"text": tweets(12)["text"], "sentiment": tweets(12)["label"]},
        {"text": [], "label": []},
        None,
    ],
    ids=["unknown-label", "missing-label-column", "no-rows", "missing-object"],
)
def test_bad_input_data_exits_3_and_writes_no_marker(
    train: dict[str, list[str]] | None, s3_env: dict[str, str], data_bucket: str, object_store: ObjectStore
) -> None:
    run = uuid.uuid4().hex[:8]
    if train is not None:
        put_parquet(object_store, f"s3://{data_bucket}/{run}/train.parquet", train)

    proc = run_trainer(s3_env, data_bucket, f"{run}/model/", train=f"{run}/train.parquet")

    assert proc.returncode == 3, proc.stderr
    assert "bad input data" in proc.stderr
    assert not keys(object_store, data_bucket, f"{run}/model/")


def test_download_model_checks_every_sha256_and_detects_a_tampered_file(
    first_run: dict[str, Any], data_bucket: str, object_store: ObjectStore, tmp_path: Path
) -> None:
    from ml_release.training.trainer import download_model, read_committed_model

    marker = read_committed_model(object_store, f"s3://{data_bucket}/{first_run['output']}")
    assert marker is not None
    good = download_model(object_store, marker, tmp_path / "good")
    assert sorted(p.name for p in good.iterdir()) == sorted(marker["files"])

    # Tamper with a copy, so that the committed run other tests read stays intact.
    copy_prefix = f"s3://{data_bucket}/tampered-{uuid.uuid4().hex[:8]}/"
    for name in marker["files"]:
        object_store.put(copy_prefix + name, object_store.get_bytes(marker["model_uri"] + name))
    object_store.put(copy_prefix + "config.json", b'{"num_labels": 2}')
    tampered = {**marker, "model_uri": copy_prefix}

    with pytest.raises(ArtifactIntegrityError, match=r"config\.json"):
        download_model(object_store, tampered, tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        (b"{not json", "not valid JSON"),
        (
            json.dumps({"model_uri": "s3://elsewhere/x/", "files": {"a": "0" * 64}, "metrics": {}}),
            "not a prefix",
        ),
        (
            json.dumps({"model_uri": "{out}attempt-1/", "files": {"../../etc": "0" * 64}, "metrics": {}}),
            "unsafe",
        ),
        (json.dumps({"model_uri": "{out}attempt-1/", "files": {"a": "0" * 64}}), "lacks"),
    ],
    ids=["not-json", "model-outside-output", "path-traversal-file-name", "no-metrics"],
)
def test_read_committed_model_refuses_a_damaged_marker(
    marker: str | bytes, message: str, bucket: str, object_store: ObjectStore
) -> None:
    from ml_release.training.trainer import read_committed_model

    output = f"s3://{bucket}/run/model/"
    body = marker if isinstance(marker, bytes) else marker.replace("{out}", output).encode()
    object_store.put(output + "_SUCCESS", body)

    with pytest.raises(ArtifactIntegrityError, match=message):
        read_committed_model(object_store, output)


def test_read_committed_model_is_none_without_a_marker_even_if_attempt_files_exist(
    bucket: str, object_store: ObjectStore
) -> None:
    from ml_release.training.trainer import read_committed_model

    object_store.put(f"s3://{bucket}/run/model/attempt-abc/model.safetensors", b"partial")

    assert read_committed_model(object_store, f"s3://{bucket}/run/model") is None


def test_losing_the_marker_race_returns_the_winners_commit(
    bucket: str, object_store: ObjectStore, tmp_path: Path
) -> None:
    from ml_release.training.trainer import commit_model

    output = f"s3://{bucket}/race/model/"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"writer": "a"}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"writer": "b"}')

    winner = commit_model(object_store, output, tmp_path / "a", {"writer": "a"})
    loser = commit_model(object_store, output, tmp_path / "b", {"writer": "b"})

    assert loser == winner
    assert object_store.get_json(output + "_SUCCESS")["metrics"] == {"writer": "a"}
    attempts = {uri.rsplit("/", 2)[-2] for uri in object_store.list_keys(output + "attempt-")}
    assert len(attempts) == 2, "the loser's files stay unreferenced under their own attempt prefix"
