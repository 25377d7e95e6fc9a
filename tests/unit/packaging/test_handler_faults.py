from __future__ import annotations

import json
import math
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml_release.config import ServingSpec
from ml_release.packaging.archiver import TS_CONFIG_FILE, ArchiveError, build_archive, model_config_yaml
from ml_release.packaging.handler import (
    ERROR_HEADER,
    FAULTS_ENV,
    INJECTED,
    NO_FAULTS,
    NON_FINITE,
    VERSION_HEADER,
    FaultSettings,
    TextClassifierHandler,
    fault_settings,
)
from tests.support.torchserve_context import make_context

pytestmark = pytest.mark.unit

LABELS = ["negative", "neutral", "positive"]
SERVING = ServingSpec(batch_size=4, max_batch_delay_ms=10, workers=1, response_timeout_s=30, torch_threads=1)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for name in (FAULTS_ENV, "ML_RELEASE_TORCH_THREADS", "ML_RELEASE_MAX_LENGTH"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test process's threads
    assert torch.get_num_threads() == threads


def handler_with(model_dir: Path, faults: dict[str, Any] | None, version: str = "r1") -> TextClassifierHandler:
    config: dict[str, Any] = {"handler": {"torch_threads": 1}}
    if faults is not None:
        config["handler"]["faults"] = faults
    h = TextClassifierHandler()
    h.initialize(make_context(model_dir, batch=1, yaml_config=config, version=version))
    return h


def run_rows(h: TextClassifierHandler, model_dir: Path, n: int) -> tuple[list[Any], Any]:
    context = make_context(model_dir, batch=n)
    out = h.handle([{"body": {"text": f"row {i}"}} for i in range(n)], context)
    return out, context


def test_no_faults_by_default(tiny_model_dir: Path) -> None:
    h = handler_with(tiny_model_dir, None)
    assert h.faults == NO_FAULTS and not h.faults.active
    out, context = run_rows(h, tiny_model_dir, 8)
    assert all(context.get_response_status(i)[0] == 200 for i in range(8))
    assert all(set(row) == {"label", "scores"} for row in out)


def test_error_rate_1_answers_every_valid_row_with_the_configured_5xx(tiny_model_dir: Path) -> None:
    h = handler_with(tiny_model_dir, {"error_rate": 1.0, "error_status": 502})
    context = make_context(tiny_model_dir, batch=2)
    out = h.handle([{"body": {"text": "ok"}}, {"body": b"not json"}], context)
    assert context.get_response_status(0)[0] == 502
    assert out[0]["kind"] == INJECTED
    headers = context.get_response_headers(0)
    assert headers[ERROR_HEADER] == INJECTED and headers[VERSION_HEADER] == "r1"
    assert context.get_response_status(1)[0] == 400  # a malformed row is still the client's fault


def test_error_rate_fails_about_its_share_and_is_repeatable_with_a_seed(tiny_model_dir: Path) -> None:
    faults = {"error_rate": 0.3, "seed": 11}
    first, ctx = run_rows(handler_with(tiny_model_dir, faults), tiny_model_dir, 400)
    second, _ = run_rows(handler_with(tiny_model_dir, faults), tiny_model_dir, 400)
    failed = [i for i in range(400) if ctx.get_response_status(i)[0] == 503]
    assert 80 <= len(failed) <= 160  # 0.3 * 400 = 120, far inside a 99.9 % binomial interval
    assert [r.get("kind") for r in first] == [r.get("kind") for r in second]


def test_nan_scores_are_a_500_that_says_non_finite_never_a_label(tiny_model_dir: Path) -> None:
    h = handler_with(tiny_model_dir, {"nan_rate": 1.0})
    out, context = run_rows(h, tiny_model_dir, 3)
    for i in range(3):
        assert context.get_response_status(i)[0] == 500
        assert out[i]["kind"] == NON_FINITE and "non-finite" in out[i]["error"]
        assert "label" not in out[i]
        assert context.get_response_headers(i)[ERROR_HEADER] == NON_FINITE


def test_a_partial_nan_rate_fails_only_its_rows(tiny_model_dir: Path) -> None:
    h = handler_with(tiny_model_dir, {"nan_rate": 0.5, "seed": 3})
    out, context = run_rows(h, tiny_model_dir, 40)
    codes = [context.get_response_status(i)[0] for i in range(40)]
    assert set(codes) == {200, 500}
    for row, code in zip(out, codes, strict=True):
        assert ("label" in row) == (code == 200)
        if code == 200:
            assert all(math.isfinite(p) for p in row["scores"].values())


def test_latency_is_added_once_per_batch(tiny_model_dir: Path) -> None:
    h = handler_with(tiny_model_dir, {"latency_ms": 150})
    started = time.perf_counter()
    run_rows(h, tiny_model_dir, 4)
    assert time.perf_counter() - started >= 0.15


def test_after_rows_spares_the_first_rows_then_every_fault_applies(tiny_model_dir: Path) -> None:
    """A fault that only shows under traffic: the first rows (a pre-traffic gate's) are answered."""
    h = handler_with(tiny_model_dir, {"nan_rate": 1.0, "after_rows": 5})
    first, early = run_rows(h, tiny_model_dir, 3)
    later, late = run_rows(h, tiny_model_dir, 4)
    assert [early.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    assert [late.get_response_status(i)[0] for i in range(4)] == [200, 200, 500, 500]
    assert all("label" in row for row in first)
    assert [row.get("kind") for row in later] == [None, None, NON_FINITE, NON_FINITE]


def test_after_rows_holds_back_errors_and_latency_too(tiny_model_dir: Path) -> None:
    errors = handler_with(tiny_model_dir, {"error_rate": 1.0, "after_rows": 2})
    _, ctx = run_rows(errors, tiny_model_dir, 4)
    assert [ctx.get_response_status(i)[0] for i in range(4)] == [200, 200, 503, 503]
    slow = handler_with(tiny_model_dir, {"latency_ms": 300, "after_rows": 2})
    started = time.perf_counter()
    run_rows(slow, tiny_model_dir, 2)
    assert time.perf_counter() - started < 0.3
    started = time.perf_counter()
    run_rows(slow, tiny_model_dir, 1)
    assert time.perf_counter() - started >= 0.3


def test_malformed_rows_do_not_count_towards_after_rows(tiny_model_dir: Path) -> None:
    h = handler_with(tiny_model_dir, {"error_rate": 1.0, "after_rows": 1})
    context = make_context(tiny_model_dir, batch=3)
    h.handle([{"body": b"not json"}, {"body": {"text": "one"}}, {"body": {"text": "two"}}], context)
    assert [context.get_response_status(i)[0] for i in range(3)] == [400, 200, 503]


def test_the_environment_overrides_the_archive(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"error_rate": 1.0}))
    h = handler_with(tiny_model_dir, {"nan_rate": 1.0})
    out, _ = run_rows(h, tiny_model_dir, 1)
    assert out[0]["kind"] == INJECTED


@pytest.mark.parametrize(("version", "active"), [("r1", True), ("r2", False)], ids=["targeted", "other-version"])
def test_faults_with_a_version_apply_only_to_that_version(tiny_model_dir: Path, version: str, active: bool) -> None:
    h = handler_with(tiny_model_dir, {"error_rate": 1.0, "version": "r1"}, version=version)
    assert h.faults.active is active


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"nan_rate": -0.1}, "nan_rate"),
        ({"error_status": 404}, "error_status"),
        ({"error_status": True}, "error_status"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"eror_rate": 0.5}, "unknown keys 'eror_rate'"),
        ({"seed": "x"}, "seed"),
        ({"after_rows": -1}, "after_rows"),
        ({"after_rows": 2.5}, "after_rows"),
    ],
    ids=[
        "rate-over-1",
        "negative-rate",
        "not-5xx",
        "bool-status",
        "negative-latency",
        "typo",
        "seed",
        "negative-onset",
        "fractional-onset",
    ],
)
def test_bad_fault_settings_are_refused(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FaultSettings.from_mapping(raw)


def test_fault_settings_precedence_and_bad_env() -> None:
    archive = {"handler": {"faults": {"latency_ms": 5}}}
    assert fault_settings(None, {}) == NO_FAULTS
    assert fault_settings(archive, {}) == FaultSettings(latency_ms=5)
    assert fault_settings(archive, {FAULTS_ENV: '{"nan_rate": 1}'}) == FaultSettings(nan_rate=1)
    with pytest.raises(ValueError, match="not JSON"):
        fault_settings(archive, {FAULTS_ENV: "{nan"})


def test_a_default_model_config_carries_no_faults() -> None:
    assert "faults" not in yaml.safe_load(model_config_yaml(SERVING))["handler"]


def test_the_archiver_writes_validated_faults_into_the_model_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    mar = build_archive(tiny_model_dir, "tiny", "bad1", SERVING, tmp_path, faults={"error_rate": 0.25, "seed": 1})
    with zipfile.ZipFile(mar) as z:
        config = yaml.safe_load(z.read(TS_CONFIG_FILE))
    assert config["handler"]["faults"] == {"error_rate": 0.25, "seed": 1}


@pytest.mark.parametrize(
    ("faults", "error"),
    [({"error_rate": 2}, ValueError), ({"seed": 1}, ArchiveError)],
    ids=["invalid", "inactive"],
)
def test_the_archiver_refuses_bad_or_empty_faults_before_writing(
    tmp_path: Path, tiny_model_dir: Path, faults: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        build_archive(tiny_model_dir, "tiny", "bad2", SERVING, tmp_path, faults=faults)
    assert list(tmp_path.iterdir()) == []
