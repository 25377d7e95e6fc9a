"""Bad conf through the REST API: refused with a 4xx naming the field, nothing written (G1, G3, G4)."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from ml_release.airflow_client import AirflowAPIError
from tests.e2e.conftest import all_keys

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        (
            {"dataset_uri": "s3://ml-release/datasets/x.csv", "dataset_url": "s3://ml-release/x.csv"},
            "conf.dataset_url",
        ),
        ({"dataset_uri": "ftp://somewhere/x.csv"}, "dataset_uri"),
        ({"dataset_uri": "s3://ml-release/../secrets.csv"}, "dataset_uri"),
    ],
    ids=["unknown-key", "malformed-dataset-uri", "traversal-dataset-uri"],
)
def test_bad_conf_is_refused_with_a_4xx_naming_the_field(
    airflow: Any, store: Any, conf: dict[str, Any], field: str
) -> None:
    runs_before = {r["dag_run_id"] for r in airflow.list_runs("train_model", limit=100)}
    keys_before = all_keys(store)
    with pytest.raises(AirflowAPIError) as info:
        airflow.trigger("train_model", conf)
    assert 400 <= info.value.status < 500
    assert field in str(info.value.detail)
    assert {r["dag_run_id"] for r in airflow.list_runs("train_model", limit=100)} == runs_before
    assert all_keys(store) == keys_before


def test_a_repeated_dag_run_id_is_a_409_not_a_second_run(airflow: Any) -> None:
    # rollback_model with no production to revert: the run itself fails harmlessly.
    airflow.trigger("rollback_model", {"reason": "idempotency probe"}, dag_run_id="probe-409")
    with pytest.raises(AirflowAPIError) as info:
        airflow.trigger("rollback_model", {"reason": "idempotency probe"}, dag_run_id="probe-409")
    assert info.value.status == 409
    run = airflow.wait_for_run("rollback_model", "probe-409", timeout_s=300)
    assert run["state"] == "failed"


def test_an_unauthenticated_trigger_is_refused(e2e_stack: Any) -> None:
    resp = requests.post(
        f"{e2e_stack.airflow_url}/api/v2/dags/train_model/dagRuns",
        json={"conf": {"bogus": 1}, "logical_date": None},
        timeout=30,
    )
    assert resp.status_code == 401
