"""The e2e layer runs whole DAGs on a real stack of its own (own ports, own state folder)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ml_release import stack
from ml_release.naming import run_key
from tests.support.services import free_port


@pytest.fixture(scope="session")
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack.StackSettings]:
    home = Path(tmp_path_factory.mktemp("stack"))
    settings = stack.StackSettings(
        home=home,
        s3_port=free_port(),
        airflow_port=free_port(),
        ts_inference_port=free_port(),
        ts_management_port=free_port(),
        ts_metrics_port=free_port(),
        ts_grpc_inference_port=free_port(),
        ts_grpc_management_port=free_port(),
        router_port=free_port(),
        bucket="ml-release",
    )
    try:
        stack.start(settings)
        yield settings
    finally:
        stack.stop(settings)


@pytest.fixture(scope="session")
def airflow(e2e_stack: stack.StackSettings) -> Any:
    from ml_release.demo import airflow_client, wait_for_dags

    client = airflow_client(e2e_stack)
    wait_for_dags(client, ("train_model", "release_model", "rollback_model"))
    return client


@pytest.fixture(scope="session")
def store(e2e_stack: stack.StackSettings) -> Any:
    from ml_release.demo import object_store

    return object_store(e2e_stack)


@pytest.fixture(scope="session")
def torchserve(e2e_stack: stack.StackSettings) -> Any:
    from ml_release.serving.torchserve import TorchServeClient, TorchServeConfig

    ts = e2e_stack.torchserve()
    config = TorchServeConfig.from_key_file(
        inference_url=f"http://127.0.0.1:{e2e_stack.ts_inference_port}",
        management_url=f"http://127.0.0.1:{e2e_stack.ts_management_port}",
        key_file=ts.home / "key_file.json",
    )
    return TorchServeClient(config)


@pytest.fixture(scope="session")
def demo_release(e2e_stack: Any, airflow: Any, store: Any) -> dict[str, Any]:
    """Drop the sample, trigger train_model over REST, follow the release its candidate schedules."""
    from ml_release.demo import drop_sample_dataset, find_triggered_release

    dataset_uri = drop_sample_dataset(e2e_stack, dt.date.today())
    run_id = f"e2e-demo-{dt.datetime.now(dt.UTC).strftime('%H%M%S')}"
    triggered = airflow.trigger("train_model", {"dataset_uri": dataset_uri}, dag_run_id=run_id)
    train_run = airflow.wait_for_run("train_model", run_id, timeout_s=1800)
    assert train_run["state"] == "success", airflow.task_instances("train_model", run_id)
    release_run_id = find_triggered_release(airflow, triggered["run_after"])
    release_run = airflow.wait_for_run("release_model", release_run_id, timeout_s=1200)
    record_uri = f"s3://ml-release/releases/sentiment/{run_key('release_model', release_run_id)}/record.json"
    return {"run": release_run, "record": store.get_json(record_uri), "dataset_uri": dataset_uri}


def all_keys(store: Any, bucket: str = "ml-release") -> set[str]:
    return set(store.list_keys(f"s3://{bucket}/"))


__all__ = ["all_keys", "dataclasses"]
