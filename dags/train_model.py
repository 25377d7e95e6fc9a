"""
### train_model

Validate a labelled dataset, split it, fine-tune the model, evaluate it against the
majority-class baseline and the production model, package it as a TorchServe archive and
publish it as a release candidate.

Trigger it from the UI, on the release spec's schedule, or through the REST API:
`POST /api/v2/dags/train_model/dagRuns` with `{"conf": {"dataset_uri": "s3://…/tweets.csv"}}`.
Unknown conf keys are refused with a 400. A candidate that passes `evaluate` triggers
`release_model` through the `ml_release_model_candidates` asset.

`train` runs the trainer CLI as a local process (`training.backend: local`) or, with
`training.backend: kubernetes` in the default release spec, as a KubernetesPodOperator on a GPU
node: the same command, its result read from `/airflow/xcom/return.json`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from ml_release.airflow.dag_support import DEFAULT_ARGS, MODEL_CANDIDATES, params_for
from ml_release.config import ReleaseSpec
from ml_release.params import DEFAULT_MODEL

SPEC = ReleaseSpec.for_model(DEFAULT_MODEL)

with DAG(
    dag_id="train_model",
    description="Validate, train, evaluate and package a model; publish it as a release candidate.",
    schedule=SPEC.schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=params_for("train_model"),
    doc_md=__doc__,
    tags=["ml-release"],
) as dag:

    @task(retries=0)
    def validate_data(**context):
        """great-expectations suite on the input; a failure fails the run without retry."""
        from ml_release.airflow import tasks

        return tasks.validate_data(context)

    @task
    def split(validation, **context):
        from ml_release.airflow import tasks

        return tasks.split(context, validation)

    @task(retries=1, execution_timeout=timedelta(hours=2))
    def train(split_result, **context):
        from ml_release.airflow import tasks

        return tasks.train(context, split_result)

    def train_on_kubernetes(split_result):
        # Imported only for this backend: the provider costs the parse about 0.7 s (README).
        from ml_release.airflow.tasks import train_pod_operator

        pod = train_pod_operator(SPEC, dag_id="train_model", execution_timeout=timedelta(hours=2))
        split_result >> pod
        return pod.output

    @task
    def evaluate(split_result, train_result, **context):
        from ml_release.airflow import tasks

        return tasks.evaluate(context, split_result, train_result)

    @task
    def package(validation, split_result, train_result, evaluation, **context):
        from ml_release.airflow import tasks

        return tasks.package(context, validation, split_result, train_result, evaluation)

    @task(outlets=[MODEL_CANDIDATES])
    def publish_candidate(candidate, **context):
        """Emit the asset event that schedules release_model for this candidate."""
        context["outlet_events"][MODEL_CANDIDATES].extra = {
            "model_name": candidate["model_name"],
            "model_version": candidate["model_version"],
            "archive_uri": candidate["archive_uri"],
        }
        return candidate

    validation = validate_data()
    split_result = split(validation)
    train_result = train_on_kubernetes(split_result) if SPEC.training.backend == "kubernetes" else train(split_result)
    evaluation = evaluate(split_result, train_result)
    publish_candidate(package(validation, split_result, train_result, evaluation))
