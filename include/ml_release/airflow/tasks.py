"""Task bodies: Airflow context in, core step called, verdicts turned into Airflow exceptions.

Faults that may pass (a dropped connection, a 503) propagate as ordinary exceptions and are
retried by the task's ``retries``. A gate's verdict (bad data, an unblessed model, a tampered
archive, a failed check) raises :class:`AirflowFailException`: retrying cannot change evidence.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from airflow.sdk.exceptions import AirflowFailException

from ml_release.config import ReleaseSpec
from ml_release.errors import ArtifactIntegrityError, GateFailed, SpecError
from ml_release.params import conf_errors
from ml_release.pipeline.layout import Layout, RunRef

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def fail_fast_on_verdicts(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except GateFailed as exc:
            evidence = f" (evidence: {exc.evidence_uri})" if exc.evidence_uri else ""
            raise AirflowFailException(f"{type(exc).__name__}: {exc}{evidence}") from exc
        except (ArtifactIntegrityError, SpecError) as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


class Ctx:
    """What every task needs, built from the Airflow context once per task."""

    def __init__(self, context: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> None:
        from ml_release.airflow.hooks import ObjectStoreHook

        dag_run = context["dag_run"]
        self.context = context
        self.conf: dict[str, Any] = dict(dag_run.conf or {})
        errors = conf_errors(dag_run.dag_id, self.conf)
        if errors:
            raise AirflowFailException("refused conf: " + "; ".join(errors))
        self.params: Mapping[str, Any] = context["params"]
        self.run = RunRef(dag_run.dag_id, dag_run.run_id)
        self.spec = ReleaseSpec.for_model(self.params["model_name"]).with_overrides(overrides or {})
        self.layout = Layout.from_env()
        self.store_hook = ObjectStoreHook()
        self.store = self.store_hook.get_store()

    @functools.cached_property
    def registry(self) -> Any:
        from ml_release.packaging.registry import ModelRegistry

        return ModelRegistry(self.store, self.layout.registry_root)

    @functools.cached_property
    def torchserve(self) -> Any:
        from ml_release.airflow.hooks import TorchServeHook

        return TorchServeHook()


def _train_ctx(context: Mapping[str, Any]) -> Ctx:
    profile = context["params"].get("training_profile")
    return Ctx(context, {"training.profile": profile} if profile else None)


# -- train_model -----------------------------------------------------------------------------


@fail_fast_on_verdicts
def validate_data(context: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import training

    ctx = _train_ctx(context)
    dataset_uri = training.resolve_dataset_uri(ctx.store, ctx.spec, ctx.params.get("dataset_uri"))
    return training.validate_data(ctx.store, ctx.layout, ctx.spec, ctx.run, dataset_uri)


@fail_fast_on_verdicts
def split(context: Mapping[str, Any], validation: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import training

    ctx = _train_ctx(context)
    return training.split(ctx.store, ctx.layout, ctx.spec, ctx.run, validation["dataset_uri"])


@fail_fast_on_verdicts
def train(context: Mapping[str, Any], split_result: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import training

    ctx = _train_ctx(context)
    overrides = {k: ctx.params.get(k) for k in ("max_train_samples", "epochs", "learning_rate")}
    profile = training.training_profile(ctx.spec, overrides)
    output_uri = f"{ctx.layout.run_prefix(ctx.spec.model_name, ctx.run)}/model"
    if ctx.spec.training.backend != "local":
        raise AirflowFailException(
            f"training.backend {ctx.spec.training.backend!r} is not available in this deployment"
        )
    cmd = training.trainer_command(
        ctx.spec, profile, split_result["uris"]["train"], split_result["uris"]["validation"], output_uri
    )
    log.info("running the trainer: %s", " ".join(cmd[:4]) + " …")
    result = training.train_local(cmd, ctx.store_hook.child_env(), ctx.spec.training.timeout_seconds)
    return {"output_uri": output_uri, "profile": ctx.spec.training.profile, **result}


@fail_fast_on_verdicts
def evaluate(
    context: Mapping[str, Any], split_result: Mapping[str, Any], train_result: Mapping[str, Any]
) -> dict[str, Any]:
    from ml_release.pipeline import training

    ctx = _train_ctx(context)
    return training.evaluate(ctx.store, ctx.layout, ctx.registry, ctx.spec, ctx.run, split_result, train_result)


@fail_fast_on_verdicts
def package(
    context: Mapping[str, Any],
    validation: Mapping[str, Any],
    split_result: Mapping[str, Any],
    train_result: Mapping[str, Any],
    evaluation: Mapping[str, Any],
) -> dict[str, Any]:
    from ml_release.pipeline import training

    ctx = _train_ctx(context)
    lineage = {
        "dataset_uri": validation["dataset_uri"],
        "validation": dict(validation),
        "split": dict(split_result),
        "eval_dataset_uri": split_result["uris"]["test"],
        "training": {"profile": train_result.get("profile"), "metrics": train_result.get("metrics")},
        "evaluation": {k: evaluation[k] for k in ("metrics_uri", "metrics", "baseline", "production", "blessing")},
    }
    record = training.package(
        ctx.store, ctx.layout, ctx.registry, ctx.spec, ctx.run, lineage, train_result["output_uri"]
    )
    return {k: record[k] for k in ("model_name", "model_version", "archive_uri", "sha256")}


# -- release_model ---------------------------------------------------------------------------


def _asset_extra(context: Mapping[str, Any]) -> dict[str, Any] | None:
    events = context.get("triggering_asset_events") or {}
    latest = None
    for asset_events in events.values():
        for event in asset_events:
            if latest is None or event.timestamp > latest.timestamp:
                latest = event
    return dict(latest.extra) if latest is not None else None


def _check_uri(ctx: Ctx, name: str) -> str:
    return f"{ctx.layout.release_prefix(ctx.spec.model_name, ctx.run)}/checks/{name}.json"


def _candidate(ctx: Ctx, data: Mapping[str, Any]) -> Any:
    from ml_release.pipeline.release import Candidate

    record = ctx.registry.get_version(data["model_name"], data["version"])
    return Candidate(record=record or {}, **data)


@fail_fast_on_verdicts
def resolve_candidate(context: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import release

    ctx = Ctx(context)
    candidate = release.resolve_candidate(ctx.store, ctx.registry, ctx.spec, ctx.run, ctx.conf, _asset_extra(context))
    log.info("candidate %s/%s from %s", candidate.model_name, candidate.version, candidate.archive_uri)
    return candidate.to_dict()


@fail_fast_on_verdicts
def preflight(context: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import release

    ctx = Ctx(context)
    result = release.preflight(
        ctx.store, ctx.registry, ctx.torchserve.get_client(), ctx.spec, ctx.torchserve.model_store()
    )
    ctx.store.put_json(_check_uri(ctx, "preflight"), result)
    return result


@fail_fast_on_verdicts
def deploy_canary(context: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import release

    ctx = Ctx(context)
    return release.deploy_canary(
        ctx.store,
        ctx.torchserve.get_client(),
        ctx.spec,
        _candidate(ctx, candidate),
        ctx.torchserve.model_store(),
    )


def _run_check(context: Mapping[str, Any], name: str, check: Callable[[Ctx], dict[str, Any]]) -> dict[str, Any]:
    ctx = Ctx(context)
    result = check(ctx)
    ctx.store.put_json(_check_uri(ctx, name), result)
    log.info("%s: %s — %s", name, "PASS" if result["passed"] else "FAIL", result["reason"])
    if not result["passed"]:
        raise GateFailed(f"{name}: {result['reason']}", evidence_uri=_check_uri(ctx, name))
    return result


@fail_fast_on_verdicts
def pretraffic_gate(context: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import release

    return _run_check(
        context,
        "pretraffic_gate",
        lambda ctx: release.pretraffic_gate(ctx.torchserve.get_client(), ctx.spec, _candidate(ctx, candidate)),
    )


@fail_fast_on_verdicts
def check_accuracy(
    context: Mapping[str, Any], candidate: Mapping[str, Any], preflight_result: Mapping[str, Any]
) -> dict[str, Any]:
    from ml_release.pipeline import release

    return _run_check(
        context,
        "check_accuracy",
        lambda ctx: release.check_accuracy(
            ctx.store,
            ctx.torchserve.get_config(),
            ctx.spec,
            _candidate(ctx, candidate),
            preflight_result.get("production_version"),
        ),
    )


@fail_fast_on_verdicts
def check_load(context: Mapping[str, Any], candidate: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import release

    return _run_check(
        context,
        "check_load",
        lambda ctx: release.check_load(ctx.store, ctx.torchserve.get_config(), ctx.spec, _candidate(ctx, candidate)),
    )


def decide(context: Mapping[str, Any], candidate_data: Mapping[str, Any] | None) -> dict[str, Any]:
    """Promote or roll back, write the release record, and fail the run if rolled back."""
    from ml_release.errors import ObjectExistsError
    from ml_release.pipeline import release

    ctx = Ctx(context)
    record_uri = f"{ctx.layout.release_prefix(ctx.spec.model_name, ctx.run)}/record.json"
    existing = ctx.store.get_json_with_etag(record_uri)
    if existing is not None:
        log.info("%s already exists, skipping", record_uri)
        record = existing[0]
    else:
        if candidate_data is None:
            raise AirflowFailException("no candidate was resolved; nothing was deployed")
        candidate = _candidate(ctx, candidate_data)
        found = ctx.store.get_json_with_etag(_check_uri(ctx, "preflight"))
        preflight_result = found[0] if found else None
        checks = {}
        for name in release.CHECKS:
            stored = ctx.store.get_json_with_etag(_check_uri(ctx, name))
            checks[name] = stored[0] if stored else None
        if preflight_result is None:
            checks["preflight"] = None
        decision = release.decide(
            ctx.store,
            ctx.registry,
            ctx.torchserve.get_client(),
            ctx.spec,
            candidate,
            checks,
            (preflight_result or {}).get("production_version"),
            ctx.run.key,
        )
        record = release.release_record(ctx.spec, ctx.run, candidate, preflight_result, checks, decision)
        try:
            ctx.store.put_json(record_uri, record, create_only=True)
        except ObjectExistsError:
            record = ctx.store.get_json(record_uri)
    log.info("release record: %s", record_uri)
    log.info("decision: %s — %s", record["decision"], record["reason"])
    if record["decision"] != "promoted":
        raise AirflowFailException(f"rolled back: {record['reason']} (record: {record_uri})")
    return {"record_uri": record_uri, "decision": record["decision"], "reason": record["reason"]}


def cleanup_canary(context: Mapping[str, Any], candidate_data: Mapping[str, Any] | None) -> None:
    """Teardown: whatever happened, no unpromoted canary stays registered, no .mar copy stays."""
    from ml_release.pipeline import release

    if candidate_data is None:
        return
    ctx = Ctx(context)
    client = ctx.torchserve.get_client()
    model, version = candidate_data["model_name"], candidate_data["version"]
    production = ctx.registry.production(model)
    if (production is None or production.version != version) and version in client.versions(model):
        log.info("cleanup: %s/%s was not promoted; unregistering it", model, version)
        release.rollback_canary(client, model, version, production.version if production else None)
    mar = ctx.torchserve.model_store() / release.mar_name(model, version)
    if production is None or production.version != version:
        mar.unlink(missing_ok=True)


# -- rollback_model --------------------------------------------------------------------------


@fail_fast_on_verdicts
def revert_production(context: Mapping[str, Any]) -> dict[str, Any]:
    from ml_release.pipeline import release

    ctx = Ctx(context)
    result = release.revert_production(
        ctx.store,
        ctx.registry,
        ctx.torchserve.get_client(),
        ctx.spec,
        ctx.torchserve.model_store(),
        ctx.run.key,
        ctx.params["reason"],
    )
    log.info(
        "production %s reverted from %s to %s: %s",
        ctx.spec.model_name,
        result["from_version"],
        result["to_version"],
        result["reason"],
    )
    return result
