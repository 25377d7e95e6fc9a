"""
### release_model

Put a candidate beside the production model on TorchServe, check it, and promote it or roll
it back, leaving a release record in the bucket that explains the decision.

Scheduled by `train_model`'s candidates; also triggered from the UI or the REST API with
`{"conf": {"model_version": "r…"}}` or `{"conf": {"archive_uri": "s3://…/x.mar",
"eval_dataset_uri": "s3://…/test.parquet"}}`.

preflight → verify + deploy_canary → pretraffic_gate → check_accuracy → check_load (all before
any traffic) → analyze_canary (the canary's weight steps up through the router, each step judged
against stable on the same window) → decide, with cleanup_canary as a teardown: a failure
anywhere leaves no canary behind. The release report (JSON + HTML) is stored beside the record.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, TriggerRule, task

from ml_release.airflow.dag_support import DEFAULT_ARGS, MODEL_CANDIDATES, params_for

with DAG(
    dag_id="release_model",
    description="Canary a candidate beside production on TorchServe; promote or roll back.",
    schedule=[MODEL_CANDIDATES],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one release per model at a time (G5)
    default_args=DEFAULT_ARGS,
    params=params_for("release_model"),
    doc_md=__doc__,
    tags=["ml-release"],
    dagrun_timeout=timedelta(hours=1),
) as dag:

    @task(retries=0)
    def resolve_candidate(**context):
        from ml_release.airflow import tasks

        return tasks.resolve_candidate(context)

    @task
    def preflight(**context):
        """Production is healthy (or there is none yet) before anything changes."""
        from ml_release.airflow import tasks

        return tasks.preflight(context)

    @task
    def deploy_canary(candidate, **context):
        """Verify the archive's sha256 against its record, then register it as a new version."""
        from ml_release.airflow import tasks

        return tasks.deploy_canary(context, candidate)

    @task(retries=0)
    def pretraffic_gate(candidate, **context):
        from ml_release.airflow import tasks

        return tasks.pretraffic_gate(context, candidate)

    @task(retries=0)
    def check_accuracy(candidate, preflight_result, **context):
        from ml_release.airflow import tasks

        return tasks.check_accuracy(context, candidate, preflight_result)

    @task(retries=0)
    def check_load(candidate, preflight_result, **context):
        from ml_release.airflow import tasks

        return tasks.check_load(context, candidate, preflight_result)

    @task(retries=0)
    def analyze_canary(candidate, preflight_result, **context):
        """Step the canary's weight up through the router; the judge decides each step on evidence."""
        from ml_release.airflow import tasks

        return tasks.analyze_canary(context, candidate, preflight_result)

    @task(retries=1, trigger_rule=TriggerRule.ALL_DONE)
    def decide(candidate, **context):
        """Promote when every check passed, else roll back; writes the release record."""
        from ml_release.airflow import tasks

        return tasks.decide(context, candidate)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def cleanup_canary(candidate, **context):
        from ml_release.airflow import tasks

        tasks.cleanup_canary(context, candidate)

    candidate = resolve_candidate()
    preflight_result = preflight()
    deployed = deploy_canary(candidate)
    candidate >> preflight_result >> deployed
    gate = pretraffic_gate(candidate)
    accuracy = check_accuracy(candidate, preflight_result)
    load = check_load(candidate, preflight_result)
    deployed >> gate >> accuracy >> load
    decision = decide(candidate)
    load >> analyze_canary(candidate, preflight_result) >> decision
    decision >> cleanup_canary(candidate).as_teardown(setups=deployed)  # type: ignore[arg-type]
