"""Progressive canary releases on the real stack: a good candidate, a slow one, and no traffic.

These run after test_c_release, which leaves a promoted production model behind.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from ml_release.analysis.stats import binomial_tolerance
from ml_release.config import ReleaseSpec
from ml_release.naming import run_key
from ml_release.packaging.registry import ModelRegistry

pytestmark = pytest.mark.e2e

SPEC = ReleaseSpec.for_model("sentiment")


@pytest.fixture(scope="module")
def production(demo_release: dict[str, Any], store: Any) -> dict[str, Any]:
    record = ModelRegistry(store, "s3://ml-release/registry").get_version(
        "sentiment", demo_release["record"]["candidate"]["version"]
    )
    assert record is not None
    return record


def _candidate_archive(store: Any, production: dict[str, Any], faults: dict[str, Any] | None) -> str:
    """Production's own weights, re-archived (optionally with injected faults) as an upstream build."""
    from ml_release.packaging.archiver import build_archive
    from ml_release.training.trainer import download_model, read_committed_model

    with tempfile.TemporaryDirectory() as tmp:
        marker = read_committed_model(store, production["training_output_uri"])
        model_dir = download_model(store, marker, Path(tmp) / "model")
        version = f"up-{uuid.uuid4().hex[:8]}"  # TorchServe serves an archive under its manifest's version
        mar = build_archive(model_dir, "sentiment", version, SPEC.serving, Path(tmp) / "out", faults=faults)
        uri = f"s3://ml-release/upstream/{uuid.uuid4().hex[:10]}.mar"
        store.put_file(uri, mar, create_only=True)
    return uri


def _release(airflow: Any, store: Any, production: dict[str, Any], archive_uri: str, **conf: Any) -> dict[str, Any]:
    run_id = f"e2e-canary-{uuid.uuid4().hex[:8]}"
    airflow.trigger(
        "release_model",
        {"archive_uri": archive_uri, "eval_dataset_uri": production["eval_dataset_uri"], **conf},
        dag_run_id=run_id,
    )
    run = airflow.wait_for_run("release_model", run_id, timeout_s=1500)
    record = store.get_json(f"s3://ml-release/releases/sentiment/{run_key('release_model', run_id)}/record.json")
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("release_model", run_id)}
    return {"run": run, "record": record, "states": states}


def _assert_shares_within_weights(record: dict[str, Any]) -> None:
    for step in record["canary"]["steps"]:
        served = step["served"]
        n = served["canary"] + served["stable"]
        weight = step["effective_weight"] / 100
        assert step["effective_weight"] <= SPEC.release.canary.max_weight
        _, hi = binomial_tolerance(n, weight, 0.999)
        assert served["canary"] <= hi, step
        assert served["unattributed"] == 0, step


def test_a_good_candidate_is_promoted_through_every_step(
    airflow: Any, store: Any, torchserve: Any, production: dict[str, Any]
) -> None:
    result = _release(airflow, store, production, _candidate_archive(store, production, None))

    record = result["record"]
    assert result["run"]["state"] == "success", record["reason"]
    assert record["decision"] == "promoted"
    canary = record["canary"]
    assert canary["mode"] == "progressive"
    passed_steps = [s for s in canary["steps"] if s["verdict"]["phase"] == "Pass"]
    assert [s["weight"] for s in passed_steps] == [s.weight for s in SPEC.release.canary.steps]
    for step in canary["steps"]:
        lo, hi = binomial_tolerance(step["served"]["canary"] + step["served"]["stable"], step["effective_weight"] / 100)
        assert lo <= step["served"]["canary"] <= hi, step["served"]
    _assert_shares_within_weights(record)
    assert record["report_uri"].endswith("report.html")
    assert b"<svg" in store.get_bytes(record["report_uri"])
    assert torchserve.default_version("sentiment") == record["candidate"]["version"]


def test_a_slow_canary_is_rolled_back_before_it_gets_production_traffic(
    airflow: Any, store: Any, torchserve: Any, production: dict[str, Any]
) -> None:
    """+100 ms a batch saturates one worker at the spec's load: the pre-traffic load check on the
    canary's own URL fails it, so the production URL never sends it a request."""
    stable = torchserve.default_version("sentiment")
    result = _release(airflow, store, production, _candidate_archive(store, production, {"latency_ms": 100}))

    record = result["record"]
    assert result["run"]["state"] == "failed"
    assert record["decision"] == "rolled_back"
    assert result["states"]["check_load"] == "failed"
    assert result["states"]["analyze_canary"] == "upstream_failed"
    load = record["checks"]["check_load"]
    assert load["summary"]["p50_ms"] > load["slo"]["p50_ms"]
    assert f"p50 latency {load['summary']['p50_ms']:.0f} ms > {load['slo']['p50_ms']:.0f} ms" in record["reason"]
    assert record["canary"] is None  # no step ran: the canary never had a share of production traffic
    assert torchserve.default_version("sentiment") == stable
    assert record["candidate"]["version"] not in torchserve.versions("sentiment")


def test_no_traffic_ends_inconclusive_and_does_not_promote(
    airflow: Any, store: Any, torchserve: Any, production: dict[str, Any]
) -> None:
    stable = torchserve.default_version("sentiment")
    archive = _candidate_archive(store, production, None)
    result = _release(airflow, store, production, archive, traffic_rate_per_s=0)

    record = result["record"]
    assert result["run"]["state"] == "failed"
    assert record["decision"] == "rolled_back"
    assert record["canary"]["decision"]["phase"] == "Inconclusive"
    assert all(s["verdict"]["phase"] == "Inconclusive" for s in record["canary"]["steps"])
    assert torchserve.default_version("sentiment") == stable
