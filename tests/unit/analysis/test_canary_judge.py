from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml_release.analysis.judge import (
    Action,
    AnalysisPolicy,
    LabelledReplay,
    MetricPolicy,
    Phase,
    ProviderError,
    StepMeasurements,
    StepVerdict,
    VersionSamples,
    WorkerHealth,
    assess,
    collect,
    decide_rollout,
    default_policy,
)
from ml_release.config import ReleaseSpec
from ml_release.errors import SpecError

pytestmark = pytest.mark.unit

LABELS = ("negative", "neutral", "positive")
POLICY = default_policy()


def version(
    rng: np.random.Generator,
    name: str,
    n: int,
    *,
    extra_ms: float = 0.0,
    error_rate: float = 0.001,
    label_p: tuple[float, ...] = (0.3, 0.4, 0.3),
    non_finite: int = 0,
) -> VersionSamples:
    latencies = rng.lognormal(np.log(20.0), 0.35, n) + extra_ms
    statuses = np.where(rng.random(n) < error_rate, 503, 200)
    labels = rng.choice(LABELS, size=int((statuses == 200).sum()) - non_finite, p=label_p)
    return VersionSamples(name, tuple(latencies.tolist()), tuple(statuses.tolist()), tuple(labels.tolist()), non_finite)


def replay(rng: np.random.Generator, n: int, canary_acc: float | None = None) -> LabelledReplay:
    """Stable is right on 80 % of rows; the canary repeats stable's answers (a good candidate with
    the same weights) unless ``canary_acc`` asks for an independently drawn, different model."""
    truth = rng.choice(LABELS, size=n)

    def answers(acc: float) -> tuple[str, ...]:
        wrong = [LABELS[(LABELS.index(t) + 1) % 3] for t in truth]
        return tuple(np.where(rng.random(n) < acc, truth, wrong).tolist())

    stable = answers(0.8)
    canary = stable if canary_acc is None else answers(canary_acc)
    return LabelledReplay(tuple(truth.tolist()), canary, stable, LABELS)


def good_step(seed: int, step: int = 0, **canary: Any) -> StepMeasurements:
    rng = np.random.default_rng(seed)
    acc = canary.pop("canary_acc", None)
    return StepMeasurements(
        step=step,
        weight=25.0,
        canary=version(rng, "v2", 1500, **canary),
        stable=version(rng, "v1", 4500),
        replay=replay(rng, 400, canary_acc=acc),
        canary_health=WorkerHealth("v2", workers=1),
        stable_health=WorkerHealth("v1", workers=1),
    )


def metric(verdict: StepVerdict, name: str) -> Any:
    return next(m for m in verdict.metrics if m.metric == name)


def verdict_of(phase: Phase, step: int = 0) -> StepVerdict:
    return StepVerdict(step, 10.0, phase, f"step {step} {phase}", ())


# -- per-metric verdict paths -------------------------------------------------------------------


def test_a_good_candidate_passes_every_metric_with_its_figures() -> None:
    verdict = assess(good_step(0), POLICY)
    assert verdict.phase is Phase.PASS, verdict.message
    p99 = metric(verdict, "latency_p99")
    assert p99.n_canary == 1500 and p99.n_stable == 4500
    assert p99.threshold == 300.0 and 0 < p99.p_value <= 1 and 0.4 < p99.effect_size < 0.6
    assert "mann-whitney" in p99.test
    assert metric(verdict, "accuracy").details["per_class_recall"]["neutral"]["support"] > 0
    json.dumps(verdict.to_dict(), allow_nan=False)


@pytest.mark.parametrize(
    ("change", "failing", "message"),
    [
        ({"extra_ms": 400.0}, "latency_p99", "canary p99 latency"),
        ({"extra_ms": 100.0}, "latency_p50", "> stable"),
        ({"error_rate": 0.2}, "error_rate", "canary error rate 2"),
        ({"canary_acc": 0.5}, "accuracy", "< 0.600"),
        ({"canary_acc": 0.7}, "accuracy", "McNemar"),
        ({"label_p": (0.8, 0.1, 0.1)}, "prediction_shift", "PSI"),
        ({"non_finite": 1}, "non_finite", "non-finite scores in 1 of"),
    ],
    ids=["p99-over-slo", "p50-plus-100ms", "20pct-5xx", "accuracy-below-floor", "10-points-less-accurate",
         "prediction-shift", "one-nan-output"],
)  # fmt: skip
def test_a_bad_canary_fails_the_metric_that_shows_it(change: dict[str, Any], failing: str, message: str) -> None:
    verdict = assess(good_step(3, **change), POLICY)
    assert verdict.phase is Phase.FAIL
    bad = metric(verdict, failing)
    assert bad.phase is Phase.FAIL
    assert bad.message.startswith("Halt advancement: ") and message in bad.message
    assert bad.threshold is not None or bad.max_regression is not None  # the record names the limit
    assert failing in {m.metric for m in verdict.failed()}


def test_p99_message_reads_like_flagger() -> None:
    verdict = assess(good_step(3, extra_ms=400.0), POLICY)
    assert metric(verdict, "latency_p99").message.startswith("Halt advancement: canary p99 latency 4")
    assert metric(verdict, "latency_p99").message.endswith(" ms > 300 ms")


def test_error_rate_significantly_above_stable_fails_even_under_the_slo() -> None:
    policy = AnalysisPolicy((MetricPolicy("errors", "error_rate", slo=0.5, max_regression=0.01),))
    verdict = assess(good_step(4, error_rate=0.1), policy)
    assert verdict.phase is Phase.FAIL and "Fisher" in verdict.message


def test_latency_shift_below_the_effect_floor_passes() -> None:
    policy = AnalysisPolicy((MetricPolicy("p50", "latency", quantile=0.5, max_regression=0.5, min_effect_size=0.7),))
    verdict = assess(good_step(5, extra_ms=1.0), policy)
    p50 = metric(verdict, "p50")
    assert p50.p_value < 0.01 and p50.effect_size < 0.7
    assert verdict.phase is Phase.PASS


def test_unattributed_failures_fail_closed() -> None:
    step = dataclasses.replace(good_step(6), unattributed_statuses=(502,) * 100)
    assert metric(assess(step, POLICY), "unattributed_errors").phase is Phase.FAIL


def test_zero_tolerance_metrics_report_their_implicit_limit_of_zero() -> None:
    policy = dataclasses.replace(POLICY, metrics=(MetricPolicy("nan", "non_finite"),))
    m = metric(assess(good_step(13, non_finite=2), policy), "nan")
    assert m.phase is Phase.FAIL and m.threshold == 0.0 and m.value == 2.0


@pytest.mark.parametrize(
    ("health", "figure"),
    [(WorkerHealth("v2", workers=1, restarts=1), "restarted 1 time(s)"),
     (WorkerHealth("v2", workers=1, not_ready=1), "1 not READY")],
    ids=["killed-and-restarted", "down-at-the-end"],
)  # fmt: skip
def test_a_canary_worker_that_died_mid_step_fails_without_a_sample_minimum(health: WorkerHealth, figure: str) -> None:
    """One dropped request cannot move the error rate; the restart itself is the evidence."""
    verdict = assess(dataclasses.replace(good_step(11), canary_health=health), POLICY)
    m = metric(verdict, "worker_restarts")
    assert m.phase is Phase.FAIL and figure in m.message and "> 0" in m.message
    assert m.value == 1.0 and m.threshold == 0
    assert verdict.phase is Phase.FAIL
    assert metric(verdict, "error_rate").phase is Phase.PASS


def test_a_stable_restart_is_recorded_but_does_not_fail_the_canary() -> None:
    step = dataclasses.replace(good_step(12), stable_health=WorkerHealth("v1", workers=1, restarts=1))
    m = metric(assess(step, POLICY), "worker_restarts")
    assert m.phase is Phase.PASS and m.stable_value == 1.0


def nan_latency(step: StepMeasurements) -> StepMeasurements:
    assert step.canary is not None
    return dataclasses.replace(
        step, canary=dataclasses.replace(step.canary, latencies_ms=(math.nan, *step.canary.latencies_ms[1:]))
    )


def tiny(step: StepMeasurements) -> StepMeasurements:
    assert step.canary is not None and step.replay is not None
    c, r = step.canary, step.replay
    return dataclasses.replace(
        step,
        canary=VersionSamples("v2", c.latencies_ms[:999], c.statuses[:999], c.predicted_labels[:99]),
        replay=LabelledReplay(r.truth[:10], r.canary[:10], r.stable[:10]),
    )


@pytest.mark.parametrize(
    ("mutate", "metric_name", "why"),
    [
        (lambda s: dataclasses.replace(s, canary=None), "latency_p99", "no canary traffic"),
        (lambda s: dataclasses.replace(s, canary=VersionSamples("v2")), "latency_p99", "0 canary requests < 1000"),
        (lambda s: dataclasses.replace(s, canary=VersionSamples("v2")), "error_rate", "0 canary requests"),
        (lambda s: dataclasses.replace(s, canary=VersionSamples("v2")), "non_finite", "0 scored"),
        (lambda s: dataclasses.replace(s, replay=None), "accuracy", "no labelled replay"),
        (lambda s: dataclasses.replace(s, stable=None), "prediction_shift", "no stable traffic"),
        (tiny, "latency_p99", "999 canary requests < 1000"),
        (tiny, "accuracy", "10 labelled rows < 200"),
        (tiny, "prediction_shift", "too few samples"),
        (nan_latency, "latency_p99", "non-finite"),
        (lambda s: dataclasses.replace(s, canary_health=None), "worker_restarts", "workers were not read"),
        (lambda s: dataclasses.replace(s, canary_health=WorkerHealth("v2", workers=0)), "worker_restarts",
         "no READY worker"),
    ],
    ids=["no-canary", "empty-canary-latency", "empty-canary-errors", "empty-canary-scores", "no-replay",
         "no-stable", "tiny-p99", "tiny-replay", "tiny-psi", "nan-latency", "no-health", "no-ready-worker"],
)  # fmt: skip
def test_missing_tiny_or_nan_evidence_is_inconclusive_never_pass(mutate: Any, metric_name: str, why: str) -> None:
    verdict = assess(mutate(good_step(7)), POLICY)
    m = metric(verdict, metric_name)
    assert m.phase is Phase.INCONCLUSIVE, m.message
    assert why in m.message
    assert verdict.phase is not Phase.PASS


def test_a_p99_needs_a_thousand_requests_by_default() -> None:
    assert MetricPolicy("p99", "latency", slo=300.0).required_samples == 1000
    assert MetricPolicy("p50", "latency", slo=300.0, quantile=0.5).required_samples == 100


def test_no_traffic_at_all_is_inconclusive_and_never_promotes() -> None:
    verdicts = [assess(StepMeasurements(0, 5.0), POLICY) for _ in range(3)]
    assert all(v.phase is Phase.INCONCLUSIVE for v in verdicts)
    decisions = [decide_rollout(verdicts[: i + 1], POLICY, total_steps=1) for i in range(3)]
    assert [d.action for d in decisions] == [Action.HOLD, Action.HOLD, Action.ROLLBACK]
    assert decisions[-1].phase is Phase.INCONCLUSIVE


def test_a_provider_error_is_an_error_verdict_for_the_metrics_it_feeds() -> None:
    step = dataclasses.replace(good_step(8), replay=None, errors=(ProviderError("replay", "connection refused"),))
    verdict = assess(step, POLICY)
    assert metric(verdict, "accuracy").phase is Phase.ERROR
    assert "replay measurement failed: connection refused" in metric(verdict, "accuracy").message
    assert metric(verdict, "latency_p99").phase is Phase.PASS
    assert verdict.phase is Phase.ERROR


def test_a_health_read_that_failed_is_an_error_not_a_pass() -> None:
    step = dataclasses.replace(
        good_step(8), canary_health=None, errors=(ProviderError("health", "management API timed out"),)
    )
    m = metric(assess(step, POLICY), "worker_restarts")
    assert m.phase is Phase.ERROR and "health measurement failed" in m.message


def test_collect_turns_a_raising_provider_into_a_provider_error() -> None:
    def broken() -> int:
        raise ConnectionError("TorchServe went away")

    result = collect("traffic", broken)
    assert result == ProviderError("traffic", "ConnectionError: TorchServe went away")
    assert collect("traffic", lambda: 3) == 3


def test_an_unpaired_replay_is_an_error_not_a_crash() -> None:
    step = dataclasses.replace(good_step(9), replay=LabelledReplay(("a",) * 300, ("a",) * 300, ("a",) * 299))
    assert metric(assess(step, POLICY), "accuracy").phase is Phase.ERROR


# -- across steps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phases", "total", "action", "next_step"),
    [
        ([], 3, Action.HOLD, 0),
        ([(Phase.PASS, 0)], 3, Action.ADVANCE, 1),
        ([(Phase.PASS, 0), (Phase.PASS, 1), (Phase.PASS, 2)], 3, Action.PROMOTE, None),
        ([(Phase.PASS, 0), (Phase.FAIL, 1)], 3, Action.ROLLBACK, None),
        ([(Phase.INCONCLUSIVE, 0)], 3, Action.HOLD, 0),
        ([(Phase.INCONCLUSIVE, 0), (Phase.PASS, 0)], 3, Action.ADVANCE, 1),
        ([(Phase.INCONCLUSIVE, 0)] * 3, 3, Action.ROLLBACK, None),
        ([(Phase.ERROR, 0)] * 2, 3, Action.HOLD, 0),
        ([(Phase.ERROR, 0)] * 3, 3, Action.ROLLBACK, None),
        ([(Phase.ERROR, 0), (Phase.ERROR, 0), (Phase.PASS, 0), (Phase.ERROR, 1)], 3, Action.HOLD, 1),
        ([(Phase.PASS, 0), (Phase.PASS, 1), (Phase.INCONCLUSIVE, 2)], 3, Action.HOLD, 2),
        ([(Phase.PASS, 0), (Phase.PASS, 2)], 3, Action.ADVANCE, 3),
    ],
    ids=["nothing-yet", "pass-advances", "all-pass-promotes", "fail-rolls-back", "inconclusive-holds",
         "pass-after-inconclusive", "inconclusive-limit", "errors-within-limit", "consecutive-error-limit",
         "errors-not-consecutive", "last-step-inconclusive-never-promotes", "skipped-step-never-promotes"],
)  # fmt: skip
def test_decide_rollout_applies_the_limits(
    phases: list[tuple[Phase, int]], total: int, action: Action, next_step: int | None
) -> None:
    decision = decide_rollout([verdict_of(p, s) for p, s in phases], POLICY, total_steps=total)
    assert decision.action is action, decision.reason
    assert decision.next_step == next_step
    json.dumps(decision.to_dict(), allow_nan=False)


def test_failure_limit_allows_that_many_failed_steps() -> None:
    policy = dataclasses.replace(POLICY, failure_limit=1)
    once = decide_rollout([verdict_of(Phase.FAIL)], policy, total_steps=2)
    twice = decide_rollout([verdict_of(Phase.FAIL), verdict_of(Phase.FAIL)], policy, total_steps=2)
    assert (once.action, twice.action) == (Action.HOLD, Action.ROLLBACK)


def test_the_deadline_ends_in_rollback_not_a_pause() -> None:
    decision = decide_rollout([verdict_of(Phase.PASS)], POLICY, total_steps=3, elapsed_s=1801)
    assert decision.action is Action.ROLLBACK and "deadline" in decision.reason


def test_a_failed_step_names_the_metric_figure_and_threshold() -> None:
    verdict = assess(good_step(10, extra_ms=400.0), POLICY)
    decision = decide_rollout([verdict], POLICY, total_steps=3)
    assert decision.action is Action.ROLLBACK and decision.phase is Phase.FAIL
    assert "p99 latency" in decision.reason and "> 300 ms" in decision.reason


def test_no_false_rollback_in_ten_judge_runs_on_a_good_candidate() -> None:
    steps = 3
    for run in range(10):
        verdicts = [assess(good_step(1000 + 10 * run + s, step=s), POLICY) for s in range(steps)]
        assert all(v.phase is Phase.PASS for v in verdicts), [v.message for v in verdicts]
        assert decide_rollout(verdicts, POLICY, total_steps=steps).action is Action.PROMOTE


def test_measurements_round_trip_through_a_record() -> None:
    step = dataclasses.replace(good_step(21), unattributed_statuses=(502,), errors=(ProviderError("replay", "x"),))
    again = StepMeasurements.from_dict(json.loads(json.dumps(step.to_dict(), allow_nan=False)))
    assert again == step
    assert assess(again, POLICY).to_dict() == assess(step, POLICY).to_dict()


RECORDED = Path(__file__).parent / "data" / "recorded_good_canary.json"


def reroute(step: StepMeasurements, rng: np.random.Generator) -> StepMeasurements:
    """The same step as a repeat run would see it: the recorded production requests, each routed
    again by a fresh draw at the step's weight (the router's own randomness), and the labelled
    replay's rows drawn again with replacement (pairs kept)."""
    assert step.canary is not None and step.stable is not None
    requests = []
    for v in (step.canary, step.stable):
        # Every recorded request succeeded with finite scores, so each has its label.
        assert v.errors == 0 and v.non_finite_responses == 0 and len(v.predicted_labels) == v.requests
        requests += list(zip(v.latencies_ms, v.statuses, v.predicted_labels, strict=True))
    order = rng.permutation(len(requests))
    to_canary = rng.random(len(requests)) < step.weight / 100

    def version(name: str, mine: bool) -> VersionSamples:
        rows = [requests[i] for i in order if bool(to_canary[i]) == mine]
        return VersionSamples(name, tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows), 0)

    r = step.replay
    assert r is not None
    k = rng.integers(0, len(r.truth), len(r.truth))
    replay = LabelledReplay(
        tuple(r.truth[x] for x in k), tuple(r.canary[x] for x in k), tuple(r.stable[x] for x in k), r.labels
    )
    return dataclasses.replace(
        step, canary=version(step.canary.version, True), stable=version(step.stable.version, False), replay=replay
    )


def test_no_false_rollback_in_ten_judge_runs_on_recorded_measurements() -> None:
    """Measurements recorded from a real release on the local stack, of a candidate with stable's
    own weights, judged with the shipped policy: the recording itself, then nine re-routed repeats,
    each at the step's end and at every interim look."""
    recorded = json.loads(RECORDED.read_text(encoding="utf-8"))
    steps = [StepMeasurements.from_dict(m) for m in recorded["steps"]]
    policy = ReleaseSpec.for_model("sentiment").release.analysis
    assert [s.weight for s in steps] == [s.weight for s in ReleaseSpec.for_model("sentiment").release.canary.steps]
    for run in range(10):
        rng = np.random.default_rng(run)
        drawn = steps if run == 0 else [reroute(s, rng) for s in steps]
        verdicts = [assess(s, policy) for s in drawn]
        assert all(v.phase is Phase.PASS for v in verdicts), (run, [v.message for v in verdicts])
        assert decide_rollout(verdicts, policy, total_steps=len(steps)).action is Action.PROMOTE
        looks = ReleaseSpec.for_model("sentiment").release.canary.looks_per_step
        for step in drawn:  # the interim looks inside each step must not fail it either
            for k in range(1, looks):
                early = assess(first_part(step, k / looks), policy)
                assert early.phase is not Phase.FAIL, (run, step.step, k, early.message)


def first_part(step: StepMeasurements, share: float) -> StepMeasurements:
    """What an interim look sees: the first ``share`` of each version's requests, no replay yet."""

    def head(v: VersionSamples | None) -> VersionSamples | None:
        if v is None:
            return None
        n, m = round(v.requests * share), round(len(v.predicted_labels) * share)
        return dataclasses.replace(
            v, latencies_ms=v.latencies_ms[:n], statuses=v.statuses[:n], predicted_labels=v.predicted_labels[:m]
        )

    return dataclasses.replace(step, canary=head(step.canary), stable=head(step.stable), replay=None)


# -- policy ----------------------------------------------------------------------------------


def test_policy_round_trips_through_plain_data() -> None:
    raw = POLICY.to_dict()
    json.dumps(raw)
    assert AnalysisPolicy.from_dict(raw) == POLICY


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ({"metrics": [{"name": "x", "kind": "latency"}]}, "needs slo"),
        ({"metrics": [{"name": "x", "kind": "prediction_shift"}]}, "needs slo"),
        ({"metrics": [{"name": "x", "kind": "latency", "slo": 1, "min_samples": 0}]}, "min_samples"),
        ({"metrics": [{"name": "x", "kind": "bogus"}]}, "not one of"),
        ({"metrics": [{"name": "x", "kind": "non_finite", "typo": 1}]}, "unknown key"),
        ({"metrics": []}, "at least one metric"),
        ({"metrics": [{"name": "x", "kind": "non_finite"}, {"name": "x", "kind": "non_finite"}]}, "duplicate"),
    ],
    ids=["latency-without-limits", "psi-without-limit", "zero-min-samples", "unknown-kind", "unknown-key",
         "no-metrics", "duplicate-names"],
)  # fmt: skip
def test_a_bad_policy_is_refused_naming_the_problem(raw: dict[str, Any], why: str) -> None:
    with pytest.raises(SpecError, match=why):
        AnalysisPolicy.from_dict(raw)
