"""The training.kubernetes section: strict like the rest of the spec, and checked when it loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ml_release.config import ReleaseSpec
from ml_release.errors import SpecError

pytestmark = pytest.mark.unit

SPEC = Path(__file__).resolve().parents[3] / "include" / "releases" / "sentiment.yaml"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("    gpus: 1 ", "    gpus: 1\n    gpu_count: 2 ", "training.kubernetes: unknown key(s) 'gpu_count'"),
        ("    shm_size: 4Gi", "", "training.kubernetes.shm_size: missing"),
        ("trainer:0.1.0-cu128", "trainer:latest", "tag 'latest' moves"),
        ("trainer:0.1.0-cu128", "trainer", "must be pinned by @sha256"),
        ("    gpus: 1 ", "    gpus: two ", "training.kubernetes.gpus: expected an integer"),
        ("memory_limit: 24Gi", "memory_limit: 2Gi", "memory_request 16Gi exceeds memory_limit 2Gi"),
        ('cpu_request: "4"', "cpu_request: four", "cpu_request: 'four' is not a Kubernetes quantity"),
        ("shm_size: 4Gi", "shm_size: 64Gi", "shm_size: 64Gi must stay below memory_limit"),
        ("on_finish_action: delete_pod", "on_finish_action: keep_pod", "'keep_pod' is not one of"),
        ("active_deadline_seconds: 1800", "active_deadline_seconds: 7200", "exceeds training.timeout_seconds"),
        ("namespace: ml-release", "namespace: ML_Release", "namespace: 'ML_Release' is not a DNS-1123 label"),
        ("run_as_user: 1000", "run_as_user: 0", "never runs as root"),
        ("        value: null", '        value: "x"', "Exists takes no value"),
        ("fail_fast_exit_codes: [139]", "fail_fast_exit_codes: [300]", "exit codes lie in 1..255"),
    ],
    ids=[
        "unknown-key",
        "missing-key",
        "moving-tag",
        "unpinned-image",
        "wrong-type",
        "request-over-limit",
        "bad-quantity",
        "shm-over-memory",
        "keep-pod-refused",
        "deadline-over-timeout",
        "bad-namespace",
        "root-user",
        "exists-with-value",
        "bad-exit-code",
    ],
)
def test_bad_kubernetes_section_is_refused_naming_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = SPEC.read_text()
    assert old in text, old
    bad = tmp_path / "sentiment.yaml"
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(SpecError, match=re.escape(message)):
        ReleaseSpec.load(bad)


def test_digest_pinned_image_and_kubernetes_backend_load(tmp_path: Path) -> None:
    text = SPEC.read_text().replace("trainer:0.1.0-cu128", "trainer@sha256:" + "a" * 64, 1)
    (tmp_path / "sentiment.yaml").write_text(text.replace("  backend: local", "  backend: kubernetes", 1))
    spec = ReleaseSpec.for_model("sentiment", tmp_path)
    assert spec.training.backend == "kubernetes"
    assert spec.training.kubernetes.image.endswith("a" * 64)
    assert spec.training.kubernetes.max_retries == 3


def test_spec_dir_comes_from_the_environment_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sentiment.yaml").write_text(SPEC.read_text().replace("  backend: local", "  backend: kubernetes", 1))
    monkeypatch.setenv("ML_RELEASE_SPEC_DIR", str(tmp_path))
    assert ReleaseSpec.for_model("sentiment").training.backend == "kubernetes"


def test_kubernetes_section_overrides_are_checked() -> None:
    spec = ReleaseSpec.for_model("sentiment")
    assert spec.with_overrides({"training.kubernetes.gpus": 4}).training.kubernetes.gpus == 4
    with pytest.raises(SpecError, match="gpus must be >= 0"):
        spec.with_overrides({"training.kubernetes.gpus": -1})
