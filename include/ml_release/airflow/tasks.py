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

from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy
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


# With ``training.backend: kubernetes`` the ``train`` task is a KubernetesPodOperator. Its pod comes
# from ml_release.training.pod_spec; the per-run command (the run's URIs, the profile after the
# run's overrides) is set by ``prepare_train_pod`` right before ``execute``, from the same
# ``trainer_command`` the local backend runs.


def _train_command(ctx: Ctx, split_result: Mapping[str, Any], xcom_path: str | None = None) -> tuple[list[str], str]:
    from ml_release.pipeline import training

    overrides = {k: ctx.params.get(k) for k in ("max_train_samples", "epochs", "learning_rate")}
    profile = training.training_profile(ctx.spec, overrides)
    output_uri = f"{ctx.layout.run_prefix(ctx.spec.model_name, ctx.run)}/model"
    cmd = training.trainer_command(
        ctx.spec,
        profile,
        split_result["uris"]["train"],
        split_result["uris"]["validation"],
        output_uri,
        python="python",
        xcom_path=xcom_path,
    )
    return cmd, output_uri


def train_pod_operator(spec: ReleaseSpec, dag_id: str, **task_kwargs: Any) -> Any:
    """The ``train`` task for the Kubernetes backend: a KubernetesPodOperator built from the spec."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from ml_release.training import pod_spec

    k8s = spec.training.kubernetes
    identity = pod_spec.PodIdentity(spec.model_name, dag_id, task_kwargs.pop("task_id", "train"))
    return KubernetesPodOperator(
        task_id=identity.task_id,
        **pod_spec.operator_kwargs(k8s, identity, spec.training.active.num_threads),
        retries=k8s.max_retries,
        retry_policy=TrainingPodRetryPolicy(
            k8s.infrastructure_retries, k8s.oom_killed_retries, k8s.fail_fast_exit_codes
        ),
        pre_execute=prepare_train_pod,
        post_execute=finish_train_pod,
        **task_kwargs,
    )


@fail_fast_on_verdicts
def prepare_train_pod(context: Mapping[str, Any]) -> None:
    """Set the pod's command for this run: the local backend's command, with the pod's interpreter."""
    from ml_release.training import pod_spec

    ctx = _train_ctx(context)
    k8s = ctx.spec.training.kubernetes
    if k8s.nodes > 1:
        raise AirflowFailException(
            f"training.kubernetes.nodes is {k8s.nodes}: several nodes run as a PyTorchJob "
            "(include/k8s/trainer-pytorchjob.yaml), which this DAG does not launch"
        )
    split_result = context["ti"].xcom_pull(task_ids="split")
    if not split_result:
        raise AirflowFailException("train: no result from split to train on")
    cmd, _ = _train_command(ctx, split_result, xcom_path=pod_spec.XCOM_PATH)
    task = context["task"]
    task.cmds, task.arguments = pod_spec.split_command(cmd, k8s.gpus)
    identity = pod_spec.PodIdentity(ctx.spec.model_name, ctx.run.dag_id, task.task_id, ctx.run.run_id)
    task.labels = {**task.labels, **identity.labels()}
    log.info("training pod: %s … on %d GPU(s) in %s", " ".join(task.cmds), k8s.gpus, k8s.namespace)


def finish_train_pod(context: Mapping[str, Any], result: Any) -> None:
    """Give the pod's XCom the same shape as the local backend's result (updated in place: the
    task runner pushes this very dict after the post-execute hook)."""
    if not isinstance(result, dict) or "marker_uri" not in result:
        raise AirflowFailException(f"training pod returned no trainer result in {result!r:.200}")
    ctx = _train_ctx(context)
    result.setdefault("output_uri", str(result["marker_uri"]).rsplit("/", 1)[0])
    result.setdefault("profile", ctx.spec.training.profile)


class TrainingPodRetryPolicy(RetryPolicy):
    """Retries a failed training pod only for infrastructure failures (and, bounded, OOMKilled).

    Reads the pod the operator last saw (``remote_pod``, else ``pod``) and the launch error, and
    lets :func:`ml_release.training.failures.decide` classify them (G13).
    """

    def __init__(self, infrastructure_retries: int, oom_killed_retries: int, fail_fast_exit_codes: Any = ()) -> None:
        from ml_release.training.failures import RetryBounds

        self.bounds = RetryBounds(infrastructure_retries, oom_killed_retries, tuple(fail_fast_exit_codes))

    def evaluate(self, exception: BaseException, try_number: int, max_tries: int, context: Any = None) -> RetryDecision:
        from ml_release.training.failures import decide

        task = context.get("task") if context else None
        pod = getattr(task, "remote_pod", None) or getattr(task, "pod", None)
        pod_json = _pod_json(pod)
        messages: list[str] = []
        exc: BaseException | None = exception
        while exc is not None and len(messages) < 5:
            messages.append(f"{type(exc).__name__}: {exc}")
            exc = exc.__cause__ or exc.__context__
        container = getattr(task, "base_container_name", "base") or "base"
        verdict = decide(pod_json, try_number, self.bounds, container, "\n".join(messages))
        log.info("training pod failure: %s (%s)", verdict.failure.value, verdict.reason)
        if verdict.retry:
            return RetryDecision.retry(reason=verdict.reason)
        return RetryDecision.fail(reason=verdict.reason)

    def serialize(self) -> dict[str, Any]:
        bounds = self.bounds
        return {
            "__type": type(self).__name__,
            "infrastructure_retries": bounds.infrastructure_retries,
            "oom_killed_retries": bounds.oom_killed_retries,
            "fail_fast_exit_codes": list(bounds.fail_fast_exit_codes),
        }

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> TrainingPodRetryPolicy:
        return cls(data["infrastructure_retries"], data["oom_killed_retries"], data.get("fail_fast_exit_codes", ()))


def _pod_json(pod: Any) -> dict[str, Any] | None:
    if pod is None:
        return None
    if isinstance(pod, dict):
        return pod
    from kubernetes.client import ApiClient

    return dict(ApiClient().sanitize_for_serialization(pod))


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
    router = ctx.torchserve.get_router()
    if router is not None and result["production_version"]:
        # Reconcile: whatever an earlier, crashed release left, the production URL serves stable only.
        router.configure(ctx.spec.model_name, result["production_version"], None)
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


def _pretraffic(
    ctx: Ctx, name: str, production_version: str | None, run: Callable[[Ctx], dict[str, Any]]
) -> dict[str, Any]:
    """Run a pre-traffic check unless this release leaves it to the progressive canary.

    Only a release with a stable model to compare against may leave one out: on a first release
    the pre-traffic checks are the only evidence there is, and no evidence never passes (G21).
    """
    chosen = ctx.params.get("pretraffic_checks")
    enabled = ctx.spec.release.pretraffic_checks if chosen is None else tuple(chosen)
    check = name.removeprefix("check_")
    if check in enabled:
        return run(ctx)
    if production_version is None:
        return {
            "passed": False,
            "skipped": True,
            "reason": f"pretraffic_checks {list(enabled)} leaves out {check}, but this is a first release: "
            "with no stable model there is no canary analysis to judge it instead",
        }
    return {
        "passed": True,
        "skipped": True,
        "reason": f"{check} not checked before traffic (pretraffic_checks {list(enabled)}): "
        "the progressive canary judges it against stable",
    }


@fail_fast_on_verdicts
def check_accuracy(
    context: Mapping[str, Any], candidate: Mapping[str, Any], preflight_result: Mapping[str, Any]
) -> dict[str, Any]:
    from ml_release.pipeline import release

    production = preflight_result.get("production_version")
    return _run_check(
        context,
        "check_accuracy",
        lambda ctx: _pretraffic(
            ctx,
            "check_accuracy",
            production,
            lambda c: release.check_accuracy(
                c.store, c.torchserve.get_config(), c.spec, _candidate(c, candidate), production
            ),
        ),
    )


@fail_fast_on_verdicts
def check_load(
    context: Mapping[str, Any], candidate: Mapping[str, Any], preflight_result: Mapping[str, Any]
) -> dict[str, Any]:
    from ml_release.pipeline import release

    return _run_check(
        context,
        "check_load",
        lambda ctx: _pretraffic(
            ctx,
            "check_load",
            preflight_result.get("production_version"),
            lambda c: release.check_load(c.store, c.torchserve.get_config(), c.spec, _candidate(c, candidate)),
        ),
    )


@fail_fast_on_verdicts
def analyze_canary(
    context: Mapping[str, Any], candidate: Mapping[str, Any], preflight_result: Mapping[str, Any]
) -> dict[str, Any]:
    """The progressive canary: weights step up through the router, each step judged against stable."""
    from ml_release.pipeline import release

    def run(ctx: Ctx) -> dict[str, Any]:
        production = preflight_result.get("production_version")
        router = ctx.torchserve.get_router()
        if router is None and production:
            return {"passed": False, "reason": "no traffic router is configured for torchserve_default"}
        return release.analyze_canary(
            ctx.store,
            ctx.torchserve.get_config(),
            router,
            ctx.spec,
            _candidate(ctx, candidate),
            production,
            traffic_rate_per_s=ctx.params.get("traffic_rate_per_s"),
        )

    return _run_check(context, "analyze_canary", run)


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
            router=ctx.torchserve.get_router(),
        )
        record = release.release_record(ctx.spec, ctx.run, candidate, preflight_result, checks, decision)
        record["report_uri"] = _write_report(ctx, record)
        try:
            ctx.store.put_json(record_uri, record, create_only=True)
        except ObjectExistsError:
            record = ctx.store.get_json(record_uri)
    log.info("release record: %s", record_uri)
    log.info("release report: %s", record.get("report_uri"))
    if record.get("report_uri"):
        from ml_release.airflow.links import REPORT_XCOM_KEY

        # Pushed before a rollback fails the task, so the UI's "Release report" link works for both.
        context["ti"].xcom_push(key=REPORT_XCOM_KEY, value=record["report_uri"])
    log.info("decision: %s — %s", record["decision"], record["reason"])
    if record["decision"] != "promoted":
        raise AirflowFailException(f"rolled back: {record['reason']} (record: {record_uri})")
    return {"record_uri": record_uri, "decision": record["decision"], "reason": record["reason"]}


def _write_report(ctx: Ctx, record: Mapping[str, Any]) -> str:
    from ml_release.reporting.report import report_files

    prefix = ctx.layout.release_prefix(ctx.spec.model_name, ctx.run)
    for name, body in report_files(record).items():
        ctype = "text/html; charset=utf-8" if name.endswith(".html") else "application/json"
        ctx.store.put(f"{prefix}/{name}", body, content_type=ctype)
    return f"{prefix}/report.html"


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
        release.rollback_canary(
            client, model, version, production.version if production else None, ctx.torchserve.get_router()
        )
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
