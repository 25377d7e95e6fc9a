"""
### rollback_model

Revert production to the previously promoted version: one step back, no new analysis. The
previous version is reloaded from its verified archive if TorchServe no longer has it.

`POST /api/v2/dags/rollback_model/dagRuns` with `{"conf": {"reason": "…"}}`.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task

from ml_release.airflow.dag_support import DEFAULT_ARGS, params_for

with DAG(
    dag_id="rollback_model",
    description="Revert production to the previously promoted version.",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=params_for("rollback_model"),
    doc_md=__doc__,
    tags=["ml-release"],
) as dag:

    @task
    def revert_production(**context):
        from ml_release.airflow import tasks

        return tasks.revert_production(context)

    revert_production()
