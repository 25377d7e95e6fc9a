"""The steps of ``release_model``: put a candidate beside production, check it, decide.

Rollout state lives outside the task process: each check writes its evidence under the
release's prefix in the bucket, and ``decide`` reads it back, so a crashed or retried task
converges on the same decision (G26). A check that left no evidence counts as failed (G21).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_release.config import ReleaseSpec
from ml_release.errors import (
    ArtifactIntegrityError,
    GateFailed,
    MLReleaseError,
    PreconditionFailedError,
    ServingError,
)
from ml_release.naming import check_version
from ml_release.packaging.registry import ModelRegistry
from ml_release.pipeline.layout import RunRef
from ml_release.serving.torchserve import READY, TorchServeClient, TorchServeConfig
from ml_release.storage import ObjectStore

log = logging.getLogger(__name__)

REPLAY_CONNECTIONS = 4  # enough to fill TorchServe's batches, few enough not to queue for long
CHECKS = ("pretraffic_gate", "check_accuracy", "check_load", "analyze_canary")


@dataclasses.dataclass(frozen=True)
class Candidate:
    model_name: str
    version: str
    archive_uri: str
    sha256: str
    eval_dataset_uri: str
    record: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "record"}


def mar_name(model: str, version: str) -> str:
    return f"{model}-{check_version(version)}.mar"


def version_url(config: TorchServeConfig, model: str, version: str | None = None) -> str:
    base = f"{config.inference_url.rstrip('/')}/predictions/{model}"
    return f"{base}/{check_version(version)}" if version else base


# -- resolve_candidate -----------------------------------------------------------------------


def resolve_candidate(
    store: ObjectStore,
    registry: ModelRegistry,
    spec: ReleaseSpec,
    run: RunRef,
    conf: Mapping[str, Any],
    asset_extra: Mapping[str, Any] | None,
) -> Candidate:
    model = spec.model_name
    if conf.get("archive_uri"):
        # An archive built upstream. TorchServe serves it under the version in its manifest, so
        # that is its version here too; its sha256 is recorded as first seen, so that later
        # tampering is caught before registration (G16).
        archive_uri = conf["archive_uri"]
        if store.head(archive_uri) is None:
            raise GateFailed(f"archive_uri {archive_uri} does not exist")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "candidate.mar"
            sha256 = store.download(archive_uri, local)
            name, version = archive_identity(local, archive_uri)
        if name != model:
            raise GateFailed(f"archive_uri {archive_uri} holds model {name!r}, not {model!r}")
        try:
            record, _ = registry.register_version(
                {
                    "model_name": model,
                    "model_version": version,
                    "archive_uri": archive_uri,
                    "sha256": sha256,
                    "eval_dataset_uri": conf["eval_dataset_uri"],
                    "source": {"dag_id": run.dag_id, "run_id": run.run_id, "upstream": True},
                }
            )
        except ArtifactIntegrityError as exc:
            raise GateFailed(
                f"archive_uri {archive_uri}: version {version!r} is already registered for another artifact; "
                f"build the archive with a new --version ({exc})"
            ) from exc
    else:
        wanted = conf.get("model_version") or (asset_extra or {}).get("model_version")
        if not wanted:
            raise GateFailed(
                "no candidate: give model_version or archive_uri, or let a train_model candidate trigger the run"
            )
        found = registry.get_version(model, wanted)
        if found is None:
            raise GateFailed(f"model_version {wanted!r} is not registered for {model}")
        record = found
    production = registry.production(model)
    if production is not None and production.version == record["model_version"]:
        raise GateFailed(f"{model}/{record['model_version']} is already the production version; nothing to release")
    eval_uri = conf.get("eval_dataset_uri") or record.get("eval_dataset_uri")
    if not eval_uri:
        eval_uri = (record.get("split") or {}).get("uris", {}).get("test")
    if not eval_uri:
        raise GateFailed(f"{model}/{record['model_version']}: no labelled evaluation set to judge it on")
    return Candidate(model, record["model_version"], record["archive_uri"], record["sha256"], eval_uri, record)


def archive_identity(path: Path, uri: str) -> tuple[str, str]:
    """(model name, version) from a .mar's manifest: the identity TorchServe will serve it under."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        model = manifest["model"]
        return str(model["modelName"]), check_version(str(model["modelVersion"]), field="archive version")
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise GateFailed(f"archive_uri {uri} is not a TorchServe model archive: {exc}") from exc


# -- preflight -------------------------------------------------------------------------------


def golden_check(client: TorchServeClient, spec: ReleaseSpec, version: str | None) -> dict[str, Any]:
    """Send the spec's golden texts; each must answer 200 with a known label and finite scores."""
    results, problems = [], []
    for text in spec.release.golden_texts:
        pred = client.predict(spec.model_name, {"text": text}, version=version)
        latency_ms = pred.latency_s * 1000
        problem = _prediction_problem(pred.status, pred.body, spec.data.labels)
        if problem is None and latency_ms > spec.release.pretraffic_latency_budget_ms:
            problem = f"latency {latency_ms:.0f} ms > budget {spec.release.pretraffic_latency_budget_ms:.0f} ms"
        results.append({"text": text, "status": pred.status, "latency_ms": round(latency_ms, 1), "body": pred.body})
        if problem:
            problems.append(f"golden request {text[:40]!r}: {problem}")
    return {"passed": not problems, "problems": problems, "requests": results}


def _prediction_problem(status: int, body: Any, labels: Sequence[str]) -> str | None:
    if status != 200:
        return f"HTTP {status}: {str(body)[:200]}"
    if not isinstance(body, dict) or body.get("label") not in labels:
        return f"answer has no known label: {str(body)[:200]}"
    scores = body.get("scores")
    if not isinstance(scores, dict) or set(scores) != set(labels):
        return f"answer's scores do not cover {list(labels)}"
    values = [float(v) for v in scores.values()]
    if not all(math.isfinite(v) for v in values) or abs(sum(values) - 1.0) > 1e-3:
        return f"scores are not a finite distribution: {scores}"
    return None


def ensure_production_serving(
    store: ObjectStore,
    registry: ModelRegistry,
    client: TorchServeClient,
    spec: ReleaseSpec,
    model_store: Path,
) -> str | None:
    """Reconcile TorchServe with the registry: the production version is loaded and default.

    After a TorchServe restart the server has forgotten its models; the registry has not.
    """
    alias = registry.production(spec.model_name)
    if alias is None:
        return None
    if alias.version not in client.versions(spec.model_name):
        record = registry.get_version(spec.model_name, alias.version)
        if record is None:
            raise MLReleaseError(f"production alias points at unregistered version {alias.version}")
        log.info("production %s/%s is not loaded in TorchServe: loading it", spec.model_name, alias.version)
        fetch_verified(
            store,
            record["archive_uri"],
            record["sha256"],
            model_store / mar_name(spec.model_name, alias.version),
        )
        client.register(mar_name(spec.model_name, alias.version), spec.model_name, initial_workers=spec.serving.workers)
    client.wait_ready(spec.model_name, alias.version, spec.release.ready_timeout_s)
    if client.default_version(spec.model_name) != alias.version:
        client.set_default(spec.model_name, alias.version)
    return alias.version


def preflight(
    store: ObjectStore,
    registry: ModelRegistry,
    client: TorchServeClient,
    spec: ReleaseSpec,
    model_store: Path,
) -> dict[str, Any]:
    """A release starts only while production is healthy, or when there is none yet (G25)."""
    production = ensure_production_serving(store, registry, client, spec, model_store)
    if production is None:
        log.info("no production version of %s yet: this is the first release", spec.model_name)
        return {"production_version": None, "healthy": True}
    golden = golden_check(client, spec, production)
    if not golden["passed"]:
        raise GateFailed(f"production {production} is unhealthy: " + "; ".join(golden["problems"]))
    return {"production_version": production, "healthy": True, "golden": golden}


# -- verify_archive + deploy_canary ---------------------------------------------------------


def fetch_verified(store: ObjectStore, archive_uri: str, expected_sha256: str, dest: Path) -> Path:
    """Download into the model store and verify right before it can be registered (G16)."""
    staged = dest.with_name(dest.name + ".unverified")
    actual = store.download(archive_uri, staged)
    if actual != expected_sha256:
        staged.unlink(missing_ok=True)
        raise ArtifactIntegrityError(
            f"{archive_uri}: sha256 {actual[:16]}… does not match its registry record {expected_sha256[:16]}…; refused"
        )
    staged.replace(dest)
    return dest


def deploy_canary(
    store: ObjectStore, client: TorchServeClient, spec: ReleaseSpec, candidate: Candidate, model_store: Path
) -> dict[str, Any]:
    """Register the candidate as a new version; TorchServe keeps the current default."""
    name = mar_name(candidate.model_name, candidate.version)
    if candidate.version in client.versions(candidate.model_name):
        log.info("%s/%s is already registered, skipping", candidate.model_name, candidate.version)
    else:
        fetch_verified(store, candidate.archive_uri, candidate.sha256, model_store / name)
        started = time.perf_counter()
        client.register(name, candidate.model_name, initial_workers=spec.serving.workers)
        log.info("registered %s in %.1fs", name, time.perf_counter() - started)
    return {"mar": name, "default_version": client.default_version(candidate.model_name)}


# -- checks ----------------------------------------------------------------------------------


def pretraffic_gate(client: TorchServeClient, spec: ReleaseSpec, candidate: Candidate) -> dict[str, Any]:
    """READY workers and sane golden answers before any traffic (G19)."""
    started = time.perf_counter()
    try:
        workers = client.wait_ready(candidate.model_name, candidate.version, spec.release.ready_timeout_s)
    except (ServingError, TimeoutError) as exc:
        return {"passed": False, "reason": f"candidate never became READY: {exc}", "ready_workers": 0}
    golden = golden_check(client, spec, candidate.version)
    reason = "; ".join(golden["problems"]) or f"{workers} READY worker(s), golden requests valid"
    return {
        "passed": golden["passed"],
        "reason": reason,
        "ready_workers": workers,
        "ready_in_s": round(time.perf_counter() - started, 2),
        "golden": golden,
    }


def _replay(config: TorchServeConfig, spec: ReleaseSpec, version: str, texts: Sequence[str]) -> list[str | None]:
    """Each labelled text through ``version``'s own URL; ``None`` where no valid answer came back.

    A replay measures answers, not latency: it runs closed-loop with a few connections, so a busy
    server slows it down instead of turning late answers into "unanswered" (which count as wrong).
    """
    from ml_release.analysis.loadgen import run_closed_loop

    result = run_closed_loop(
        version_url(config, spec.model_name, version),
        [{"text": t} for t in texts],
        connections=REPLAY_CONNECTIONS,
        count=len(texts),
        headers={"Authorization": f"Bearer {config.inference_token}"},
        timeout_s=spec.release.load.timeout_s * 3,
        keep_bodies=True,
        max_duration_s=max(120.0, len(texts) * 0.5),
    )
    return [s.body.get("label") if s.status == 200 and isinstance(s.body, dict) else None for s in result.samples]


def check_accuracy(
    store: ObjectStore,
    config: TorchServeConfig,
    spec: ReleaseSpec,
    candidate: Candidate,
    production_version: str | None,
) -> dict[str, Any]:
    """The labelled set through both versions, in the same window (G23)."""
    frame = _read_labelled(store, spec, candidate.eval_dataset_uri)
    frame = frame.sample(n=min(len(frame), spec.release.accuracy.max_samples), random_state=0)
    texts, truth = frame["text"].tolist(), frame["label"].tolist()

    def accuracy(version: str) -> dict[str, Any]:
        predicted = _replay(config, spec, version, texts)
        answered = sum(p is not None for p in predicted)
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        # Unanswered requests count as wrong: missing evidence never helps a candidate (G21).
        return {"version": version, "n": len(texts), "answered": answered, "accuracy": correct / len(texts)}

    cand = accuracy(candidate.version)
    prod = accuracy(production_version) if production_version else None
    acc_spec = spec.release.accuracy
    problems = []
    if not len(texts):
        problems.append("no labelled rows to judge on")
    if cand["accuracy"] < acc_spec.min_accuracy:
        problems.append(f"accuracy {cand['accuracy']:.3f} < floor {acc_spec.min_accuracy:.3f}")
    if prod is not None and cand["accuracy"] < prod["accuracy"] - acc_spec.max_regression:
        problems.append(
            f"accuracy {cand['accuracy']:.3f} < production {prod['accuracy']:.3f} - Δ {acc_spec.max_regression:.3f}"
        )
    reason = "; ".join(problems) or (
        f"accuracy {cand['accuracy']:.3f} >= floor {acc_spec.min_accuracy:.3f}"
        + (f" and within Δ {acc_spec.max_regression:.3f} of production {prod['accuracy']:.3f}" if prod else "")
    )
    return {
        "passed": not problems,
        "reason": reason,
        "candidate": cand,
        "production": prod,
        "eval_dataset_uri": candidate.eval_dataset_uri,
    }


def _read_labelled(store: ObjectStore, spec: ReleaseSpec, uri: str) -> Any:
    import io

    import pandas as pd

    raw = store.get_bytes(uri, max_bytes=spec.data.max_bytes)
    if uri.endswith(".parquet"):
        frame = pd.read_parquet(io.BytesIO(raw))
    else:
        frame = pd.read_csv(io.BytesIO(raw), encoding=spec.data.encoding)
        frame = frame.rename(columns={spec.data.text_column: "text", spec.data.label_column: "label"})
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise GateFailed(f"evaluation set {uri} lacks column(s) {sorted(missing)}")
    return frame[frame["label"].isin(spec.data.labels)]


def check_load(store: ObjectStore, config: TorchServeConfig, spec: ReleaseSpec, candidate: Candidate) -> dict[str, Any]:
    """Open-loop load on the candidate's version URL, judged against the spec's SLO."""
    from ml_release.analysis.loadgen import run_open_loop

    load = spec.release.load
    frame = _read_labelled(store, spec, candidate.eval_dataset_uri)
    texts = frame["text"].tolist()[:500] or list(spec.release.golden_texts)
    result = run_open_loop(
        version_url(config, spec.model_name, candidate.version),
        [{"text": t} for t in texts],
        rate_per_s=load.rate_per_s,
        count=load.requests,
        headers={"Authorization": f"Bearer {config.inference_token}"},
        timeout_s=load.timeout_s,
    )
    summary = result.summary()
    limits = {"p50_ms": load.p50_ms, "p95_ms": load.p95_ms, "p99_ms": load.p99_ms}
    problems = []
    if result.count < 1000:
        problems.append(f"only {result.count} requests: a p99 needs >= 1000 (inconclusive)")
    for key, limit in limits.items():
        value = summary[key]
        if not math.isfinite(value) or value > limit:
            problems.append(f"{key.removesuffix('_ms')} latency {value:.0f} ms > {limit:.0f} ms")
    if not summary["error_rate"] <= load.max_error_rate:
        problems.append(f"error rate {summary['error_rate']:.2%} > {load.max_error_rate:.2%}")
    reason = "; ".join(problems) or (
        f"p50 {summary['p50_ms']:.0f} ms, p95 {summary['p95_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms, "
        f"errors {summary['error_rate']:.2%} within SLO"
    )
    return {
        "passed": not problems,
        "reason": reason,
        "summary": summary,
        "slo": {**limits, "max_error_rate": load.max_error_rate},
    }


# -- decide ----------------------------------------------------------------------------------


def decide(
    store: ObjectStore,
    registry: ModelRegistry,
    client: TorchServeClient,
    spec: ReleaseSpec,
    candidate: Candidate,
    checks: Mapping[str, Mapping[str, Any] | None],
    production_version: str | None,
    release_id: str,
    router: Any = None,
) -> dict[str, Any]:
    """Promote when every check passed on evidence; otherwise roll back. Never both."""
    failed = [
        f"{name}: {(result or {}).get('reason', 'no evidence (the check did not complete)')}"
        for name, result in checks.items()
        if not (result or {}).get("passed")
    ]
    model = spec.model_name
    if not failed:
        expected = registry.production(model)
        if expected is not None and expected.version != production_version:
            failed.append(f"production moved to {expected.version} during this release; not promoting over it")
        else:
            client.set_default(model, candidate.version)
            try:
                registry.set_production(model, candidate.version, release_id, expected)
            except PreconditionFailedError as exc:
                if production_version:
                    client.set_default(model, production_version)
                failed.append(f"lost the promotion race: {exc}")
    if not failed:
        if router is not None:
            router.configure(model, candidate.version, None)  # the production URL: all on the new stable
        reason = "every check passed: " + "; ".join(str(c["reason"]) for c in checks.values() if c)
        return {"decision": "promoted", "reason": reason, "default_version": client.default_version(model)}
    rollback_canary(client, model, candidate.version, production_version, router)
    registry.append_history(
        model, {"event": "rollback", "version": candidate.version, "release_id": release_id, "reason": failed}
    )
    return {
        "decision": "rolled_back",
        "reason": "; ".join(failed),
        "default_version": client.default_version(model),
    }


def rollback_canary(
    client: TorchServeClient, model: str, version: str, production_version: str | None, router: Any = None
) -> None:
    """Weight 0 first, then the candidate out; production stays registered, default and warm (G24, G25)."""
    if version == production_version:
        return
    if router is not None and production_version:
        state = router.desired_state()
        if state.canary_version == version:
            router.set_canary_weight(0)
        router.configure(model, production_version, None)
    if production_version and client.default_version(model) != production_version:
        client.set_default(model, production_version)
    client.unregister(model, version)


def release_record(
    spec: ReleaseSpec,
    run: RunRef,
    candidate: Candidate,
    preflight_result: Mapping[str, Any] | None,
    checks: Mapping[str, Mapping[str, Any] | None],
    decision: Mapping[str, Any],
) -> dict[str, Any]:
    lineage = candidate.record
    return {
        "schema": "ml-release/release-record/v1",
        "model_name": spec.model_name,
        "release": {"dag_id": run.dag_id, "run_id": run.run_id, "key": run.key},
        "recorded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "candidate": candidate.to_dict(),
        "previous_production_version": (preflight_result or {}).get("production_version"),
        "inputs": {
            "dataset_uri": lineage.get("dataset_uri"),
            "training_run": lineage.get("source"),
            "eval_dataset_uri": candidate.eval_dataset_uri,
        },
        "data_fingerprint": (lineage.get("split") or {}).get("fingerprint"),
        "validation": lineage.get("validation"),
        "training": lineage.get("training"),
        "evaluation": lineage.get("evaluation"),
        "archive": {"uri": candidate.archive_uri, "sha256": candidate.sha256},
        "checks": {k: v for k, v in checks.items() if k != "analyze_canary"},
        "canary": checks.get("analyze_canary"),
        "decision": decision["decision"],
        "reason": decision["reason"],
        "default_version_after": decision.get("default_version"),
    }


def revert_production(
    store: ObjectStore,
    registry: ModelRegistry,
    client: TorchServeClient,
    spec: ReleaseSpec,
    model_store: Path,
    release_id: str,
    reason: str,
) -> dict[str, Any]:
    """One step back to the previously promoted version, with no new analysis (G24)."""
    model = spec.model_name
    alias = registry.production(model)
    if alias is None or alias.previous_version is None:
        raise GateFailed(f"{model} has no previous production version to roll back to")
    target = alias.previous_version
    record = registry.get_version(model, target)
    if record is None:
        raise MLReleaseError(f"previous version {target} is not in the registry")
    if target not in client.versions(model):
        fetch_verified(store, record["archive_uri"], record["sha256"], model_store / mar_name(model, target))
        client.register(mar_name(model, target), model, initial_workers=spec.serving.workers)
    client.wait_ready(model, target, spec.release.ready_timeout_s)
    client.set_default(model, target)
    registry.set_production(model, target, release_id, alias)
    registry.append_history(
        model,
        {
            "event": "revert",
            "version": target,
            "from_version": alias.version,
            "release_id": release_id,
            "reason": reason,
        },
    )
    return {"from_version": alias.version, "to_version": target, "reason": reason}


# -- progressive canary ----------------------------------------------------------------------

VERSION_HEADER = "X-ML-Release-Backend-Version"  # set by the router even on errors it generates


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _iso(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat(timespec="milliseconds")


def _step_samples(result: Any, version: str) -> Any:
    """The judge's samples for ``version``; a 5xx that says "non-finite scores" counts as one."""
    from ml_release.analysis.loadgen import version_samples

    samples = version_samples(result, version)
    flagged = sum(
        1
        for s in result.samples
        if s.served_by == version and isinstance(s.body, dict) and s.body.get("kind") == "non_finite_scores"
    )
    return dataclasses.replace(samples, non_finite_responses=samples.non_finite_responses + flagged)


def worker_snapshot(client: TorchServeClient, model: str, version: str) -> dict[str, dict[str, Any]]:
    """The version's workers by id: the process behind each, when it started, and its status."""
    return {
        str(w.get("id")): {"pid": w.get("pid"), "start_time": w.get("startTime"), "status": w.get("status")}
        for d in client.describe(model, version)
        for w in d.get("workers", [])
    }


def worker_health(version: str, before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]) -> Any:
    """What happened to ``version``'s workers between two snapshots: a changed process or start
    time, or a worker gone, is a restart; a worker not READY at the end is counted too."""
    from ml_release.analysis.judge import WorkerHealth

    restarted = sorted(
        wid
        for wid, w in before.items()
        if wid not in after or (after[wid]["pid"], after[wid]["start_time"]) != (w["pid"], w["start_time"])
    )
    not_ready = sorted(wid for wid, w in after.items() if w["status"] != READY)
    return WorkerHealth(
        version=version,
        workers=sum(1 for w in before.values() if w["status"] == READY),
        restarts=len(restarted),
        not_ready=len(not_ready),
        details={"before": dict(before), "after": dict(after), "restarted": restarted, "not_ready": not_ready},
    )


def _step_measurements(
    step: int,
    weight: float,
    canary_version: str,
    stable_version: str,
    traffic: Any,
    replay: Any,
    traffic_error: Any,
    *,
    before: Any,
    after: Any,
) -> Any:
    """One step's measurements for the judge: the production traffic so far (``None`` if none was
    sent), the labelled replay (or its :class:`ProviderError`), and both versions' workers now
    (``after``) against the step's start (``before``), either of which may be a ProviderError."""
    from ml_release.analysis import judge

    canary_health = stable_health = None
    health_error = next((x for x in (before, after) if isinstance(x, judge.ProviderError)), None)
    if health_error is None:
        canary_health = worker_health(canary_version, before["canary"], after["canary"])
        stable_health = worker_health(stable_version, before["stable"], after["stable"])
    canary_samples = stable_samples = None
    unattributed: tuple[int, ...] = ()
    if traffic is not None:
        canary_samples = _step_samples(traffic, canary_version)
        stable_samples = _step_samples(traffic, stable_version)
        unattributed = tuple(s.status for s in traffic.samples if s.served_by is None)
    return judge.StepMeasurements(
        step=step,
        weight=weight,
        canary=canary_samples,
        stable=stable_samples,
        replay=None if replay is None or isinstance(replay, judge.ProviderError) else replay,
        unattributed_statuses=unattributed,
        errors=tuple(x for x in (traffic_error, replay, health_error) if isinstance(x, judge.ProviderError)),
        canary_health=canary_health,
        stable_health=stable_health,
    )


def _split(total: int, parts: int) -> list[int]:
    """``total`` requests in ``parts`` near-equal, non-empty parts (fewer if there are too few)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _merge_results(first: Any, second: Any) -> Any:
    """Two consecutive open-loop runs as one step's result (their samples, their summed wall time)."""
    return dataclasses.replace(first, samples=first.samples + second.samples, wall_s=first.wall_s + second.wall_s)


def _paired_replay(config: TorchServeConfig, spec: ReleaseSpec, canary: str, stable: str, rows: Any) -> Any:
    """The same labelled rows through both versions' own URLs, concurrently: same window (G23)."""
    from concurrent.futures import ThreadPoolExecutor

    from ml_release.analysis.judge import LabelledReplay

    texts, truth = rows["text"].tolist(), rows["label"].tolist()
    with ThreadPoolExecutor(max_workers=2) as pool:
        c = pool.submit(_replay, config, spec, canary, texts)
        s = pool.submit(_replay, config, spec, stable, texts)
        canary_labels, stable_labels = c.result(), s.result()
    return LabelledReplay(tuple(truth), tuple(canary_labels), tuple(stable_labels), tuple(spec.data.labels))


def analyze_canary(
    store: ObjectStore,
    config: TorchServeConfig,
    router: Any,
    spec: ReleaseSpec,
    candidate: Candidate,
    production_version: str | None,
    traffic_rate_per_s: float | None = None,
) -> dict[str, Any]:
    """Walk the canary through the spec's steps; judge each on evidence; stop at the first Fail.

    Each step sets the router's weight and reads it back (G20), sends held-out texts through the
    production URL at a constant rate (stable and canary share the window, G23), replays labelled
    rows through both versions, and hands the measurements to the pure judge. A failing or
    inconclusive canary goes to weight 0 before anything else happens (G24). Returns the rollout's
    evidence; ``passed`` only if the judge said promote.
    """
    from ml_release.analysis import judge
    from ml_release.analysis.loadgen import run_open_loop

    if production_version is None:
        return {
            "passed": True,
            "mode": "first_release",
            "reason": "first release: no stable version to compare with; the pre-traffic checks are the evidence",
            "steps": [],
            "weight_timeline": [],
        }
    canary_spec, policy = spec.release.canary, spec.release.analysis
    rate = canary_spec.traffic_rate_per_s if traffic_rate_per_s is None else traffic_rate_per_s
    frame = _read_labelled(store, spec, candidate.eval_dataset_uri).sample(frac=1.0, random_state=7)
    texts = frame["text"].tolist()
    model = spec.model_name
    headers = {"Authorization": f"Bearer {config.inference_token}"}
    timeline: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    verdicts: list[Any] = []

    def set_weight(weight: float, reason: str) -> float:
        effective = router.set_canary_weight(min(weight, canary_spec.max_weight))
        timeline.append({"at": _now(), "weight": weight, "effective_weight": effective, "reason": reason})
        return float(effective)

    def send_traffic(count: int, offset: int) -> Any:
        return run_open_loop(
            f"{router.settings.url}/predictions/{model}",
            [{"text": t} for t in texts[offset:] + texts[:offset]],
            rate_per_s=rate,
            count=count,
            headers=headers,
            timeout_s=canary_spec.request_timeout_s,
            version_header=VERSION_HEADER,
        )

    def replay_labelled(rows: Any) -> Any:
        assert production_version is not None
        return _paired_replay(config, spec, candidate.version, production_version, rows)

    client = TorchServeClient(config)

    def snapshot() -> dict[str, Any]:
        assert production_version is not None
        return {
            "canary": worker_snapshot(client, model, candidate.version),
            "stable": worker_snapshot(client, model, production_version),
        }

    router.configure(model, production_version, candidate.version)
    started = time.monotonic()
    index, attempt, replay_offset = 0, 0, 0
    decision: Any = None
    first_canary_request: float | None = None  # epoch seconds
    text_offset = 0
    while True:
        step = canary_spec.steps[index]
        before = judge.collect("health", snapshot)
        effective = set_weight(step.weight, f"step {index}")
        step_started = _now()

        # What the step has measured so far, with the workers read now against ``before``.
        measure = functools.partial(
            _step_measurements, index, effective, candidate.version, production_version, before=before
        )

        traffic: Any = None  # the parts sent so far, as one result
        traffic_error = None  # a part that could not be sent or measured: the step's traffic is Error
        looks = 0
        interim: Any = None  # (measurements, verdict) of a part that failed the step early
        if rate > 0 and step.requests > 0 and texts:
            # The step's traffic goes out in parts; after each part but the last, the judge looks at
            # what has been measured so far, and a Fail ends the step at once: evidence of harm does
            # not wait for the step's end. Pass, Inconclusive and Error wait for the whole step.
            parts = _split(step.requests, canary_spec.looks_per_step)
            for looks, count in enumerate(parts, start=1):
                part_started = time.time()
                part = judge.collect("traffic", functools.partial(send_traffic, count, text_offset))
                text_offset = (text_offset + count) % len(texts)
                if isinstance(part, judge.ProviderError):
                    traffic_error = part
                    break
                traffic = part if traffic is None else _merge_results(traffic, part)
                sent = [s.sent_s for s in part.samples if s.served_by == candidate.version]
                if first_canary_request is None and sent:
                    first_canary_request = part_started + min(sent)
                if looks < len(parts):
                    so_far = measure(traffic, None, None, after=judge.collect("health", snapshot))
                    look = judge.assess(so_far, policy)
                    if look.phase is judge.Phase.FAIL:
                        log.info("canary step %d failed after part %d of %d of its traffic", index, looks, len(parts))
                        interim = (so_far, look)
                        break
        if interim is not None:
            measurements, verdict = interim
        else:
            rows = frame.iloc[replay_offset : replay_offset + step.replay_rows]
            replay_offset = (replay_offset + step.replay_rows) % max(len(frame), 1)
            replay = judge.collect("replay", functools.partial(replay_labelled, rows)) if len(rows) else None
            measurements = measure(traffic, replay, traffic_error, after=judge.collect("health", snapshot))
            verdict = judge.assess(measurements, policy)
        served = {"canary": 0, "stable": 0, "canary_errors": 0, "stable_errors": 0}
        served["unattributed"] = len(measurements.unattributed_statuses)
        for role, samples in (("canary", measurements.canary), ("stable", measurements.stable)):
            if samples is not None:
                served[role], served[f"{role}_errors"] = samples.requests, samples.errors
        verdicts.append(verdict)
        decision = judge.decide_rollout(
            verdicts, policy, total_steps=len(canary_spec.steps), elapsed_s=time.monotonic() - started
        )
        log.info(
            "canary step %d (weight %.0f%%, attempt %d): %s — %s",
            index,
            effective,
            attempt,
            verdict.phase,
            verdict.message,
        )
        steps.append(
            {
                "step": index,
                "attempt": attempt,
                "weight": step.weight,
                "effective_weight": effective,
                "started_at": step_started,
                "ended_at": _now(),
                "served": served,
                "looks": looks,
                "ended_early": interim is not None,
                "measurements": measurements.to_dict(),
                "verdict": verdict.to_dict(),
            }
        )
        if decision.action in (judge.Action.ROLLBACK, judge.Action.PROMOTE):
            break
        if decision.action is judge.Action.ADVANCE and decision.next_step is not None:
            index, attempt = decision.next_step, 0
        else:
            attempt += 1
    passed = decision.action is judge.Action.PROMOTE
    exposure: dict[str, Any] = {
        "canary_requests": sum(s["served"]["canary"] for s in steps),
        "canary_errors": sum(s["served"]["canary_errors"] for s in steps),
        "stable_errors": sum(s["served"]["stable_errors"] for s in steps),
        "first_canary_request_at": _iso(first_canary_request) if first_canary_request else None,
    }
    if not passed:
        set_weight(0, f"rollback: {decision.reason}")
        zero_at = time.time()
        exposure["weight_zero_at"] = _iso(zero_at)
        exposure["first_request_to_weight_zero_s"] = (
            round(zero_at - first_canary_request, 3) if first_canary_request else None
        )
    return {
        "passed": passed,
        "mode": "progressive",
        "reason": decision.reason if passed else f"{decision.phase}: {decision.reason}",
        "decision": decision.to_dict(),
        "steps": steps,
        "weight_timeline": timeline,
        "traffic_rate_per_s": rate,
        "max_weight": canary_spec.max_weight,
        "exposure": exposure,
    }
