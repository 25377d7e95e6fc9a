"""Bad datasets through the real train_model: validation fails with a report, no training starts."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

HEADER = b"sentiment,confidence,text\n"
GOOD_ROW = b"negative,0.9,I do not trust a car without a steering wheel\n"

CASES = {
    "empty-file": (b"", "input.not_empty"),
    "header-only": (HEADER, "table.row_count"),
    "missing-column": (b"sentiment,text\n" + b"negative,I do not trust it at all\n" * 1200, "table.columns"),
    "unknown-labels": (
        HEADER + GOOD_ROW * 600 + b"furious,0.9,I am beyond angry about this car\n" * 600,
        "label.in_set",
    ),
    "binary-garbage": (b"\x89PNG\r\n\x1a\n\x00\x00" + os.urandom(4096), "input.is_text"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_dataset_fails_validation_with_a_report_and_no_training(airflow: Any, store: Any, case: str) -> None:
    body, failing_check = CASES[case]
    uri = f"s3://ml-release/datasets/bad/{case}-{uuid.uuid4().hex[:8]}/tweets.csv"
    store.put(uri, body, create_only=True)
    run_id = f"bad-input-{case}-{uuid.uuid4().hex[:8]}"
    airflow.trigger("train_model", {"dataset_uri": uri}, dag_run_id=run_id)

    run = airflow.wait_for_run("train_model", run_id, timeout_s=600)

    assert run["state"] == "failed"
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("train_model", run_id)}
    assert states["validate_data"] == "failed"
    assert states["train"] in ("upstream_failed", None)
    from ml_release.naming import run_key

    report = store.get_json(f"s3://ml-release/runs/sentiment/{run_key('train_model', run_id)}/validation/report.json")
    assert report["success"] is False
    failed = [o["expectation"] for o in report["outcomes"] if not o["success"]]
    assert failing_check in failed, failed
    assert not list(store.list_keys(f"s3://ml-release/runs/sentiment/{run_key('train_model', run_id)}/model/"))
