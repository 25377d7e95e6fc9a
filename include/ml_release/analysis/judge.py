"""The canary judge: pure functions from measurements and a policy to verdicts and a rollout decision.

Shaped after Argo Rollouts' analysis, Flagger and Kayenta (STYLE 6): measurements come from
providers (the load generator, the labelled replay) that never raise into the loop: a provider that
fails hands over a :class:`ProviderError`, and the metrics it feeds get the Error phase.
:func:`assess` judges one step; :func:`decide_rollout` applies the failure, inconclusive and
consecutive-error limits and the deadline over all steps so far.

Rules (RELIABILITY G21, G22, G28): no data, too few samples or non-finite measurements never pass;
Inconclusive never promotes; Fail rolls back; a deadline ends in rollback. Each metric has a
direction, an absolute SLO and a limit relative to stable. A relative limit fails the canary only
when the difference is both larger than the limit and statistically significant (and, for latency,
large in effect size), so that a good candidate is not rolled back on noise.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from ml_release.analysis import stats
from ml_release.analysis.stats import json_float
from ml_release.errors import SpecError

MetricKind = Literal[
    "latency", "error_rate", "accuracy", "prediction_shift", "non_finite", "unattributed_errors", "worker_restarts"
]
Provider = Literal["traffic", "replay", "health"]

PROVIDER_OF: Mapping[str, Provider] = {
    "latency": "traffic",
    "error_rate": "traffic",
    "prediction_shift": "traffic",
    "non_finite": "traffic",
    "unattributed_errors": "traffic",
    "accuracy": "replay",
    "worker_restarts": "health",
}
HIGHER_IS_BETTER = frozenset({"accuracy"})
ZERO_TOLERANCE = frozenset({"non_finite", "unattributed_errors", "worker_restarts"})  # default limit 0
DEFAULT_MIN_SAMPLES: Mapping[str, int] = {
    "error_rate": 200,
    "accuracy": 200,
    "prediction_shift": 100,
    "non_finite": 1,
    "unattributed_errors": 100,
    "worker_restarts": 1,
}
DEFAULT_MIN_EFFECT_SIZE = 0.56  # P(canary > stable); Vargha-Delaney's "small" effect

T = TypeVar("T")


class Phase(enum.StrEnum):
    PASS = "Pass"
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"
    ERROR = "Error"


class Action(enum.StrEnum):
    ADVANCE = "advance"  # the step passed: go to the next weight
    HOLD = "hold"  # the step did not pass but is within limits: measure the same step again
    PROMOTE = "promote"
    ROLLBACK = "rollback"


# -- policy -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetricPolicy:
    """One metric. ``slo`` is absolute (a maximum, or a minimum for accuracy); ``max_regression``
    is how much worse than stable the canary may be, in the metric's unit (ms, error-rate points,
    accuracy points), before a significant difference fails it.
    """

    name: str
    kind: MetricKind
    slo: float | None = None
    max_regression: float | None = None
    quantile: float = 0.99  # latency only
    alpha: float = 0.01  # significance level of the relative test
    min_effect_size: float | None = None  # latency only: floor on P(canary > stable)
    min_samples: int | None = None  # per version; None = the kind's default

    def __post_init__(self) -> None:
        where = f"analysis.metrics.{self.name}"
        if self.kind in ("latency", "error_rate", "accuracy") and self.slo is None and self.max_regression is None:
            raise SpecError(f"{where}: a {self.kind} metric needs slo, max_regression or both")
        if self.kind == "prediction_shift" and self.slo is None:
            raise SpecError(f"{where}: a prediction_shift metric needs slo (the maximum PSI)")
        if not 0.0 < self.quantile < 1.0:
            raise SpecError(f"{where}.quantile: must lie in (0, 1)")
        if not 0.0 < self.alpha < 0.5:
            raise SpecError(f"{where}.alpha: must lie in (0, 0.5)")
        if self.min_samples is not None and self.min_samples < 1:
            raise SpecError(f"{where}.min_samples: must be >= 1 (no data never passes)")
        if self.max_regression is not None and self.max_regression < 0:
            raise SpecError(f"{where}.max_regression: must be >= 0")

    @property
    def direction(self) -> Literal["lower_is_better", "higher_is_better"]:
        return "higher_is_better" if self.kind in HIGHER_IS_BETTER else "lower_is_better"

    @property
    def provider(self) -> Provider:
        return PROVIDER_OF[self.kind]

    @property
    def required_samples(self) -> int:
        """Per version. Latency: enough for ten samples beyond the quantile, so a p99 needs 1000 (L3)."""
        if self.min_samples is not None:
            return self.min_samples
        if self.kind == "latency":
            return max(100, math.ceil(10 / (1 - self.quantile) - 1e-9))
        return DEFAULT_MIN_SAMPLES[self.kind]

    @property
    def limit(self) -> float | None:
        """The absolute threshold: ``slo``, or 0 for the kinds where any occurrence is one too many."""
        if self.slo is None and self.kind in ZERO_TOLERANCE:
            return 0.0
        return self.slo

    @property
    def effect_floor(self) -> float:
        return self.min_effect_size if self.min_effect_size is not None else DEFAULT_MIN_EFFECT_SIZE

    def label(self) -> str:
        if self.kind == "latency":
            return f"p{_quantile_name(self.quantile)} latency"
        return {
            "error_rate": "error rate",
            "accuracy": "accuracy",
            "prediction_shift": "predicted-label PSI",
            "non_finite": "non-finite outputs",
            "unattributed_errors": "unattributed error rate",
            "worker_restarts": "worker restarts",
        }[self.kind]


def _quantile_name(q: float) -> str:
    return f"{q * 100:g}"


@dataclasses.dataclass(frozen=True)
class AnalysisPolicy:
    """Metrics plus the limits applied across steps (Argo Rollouts' names; a limit of 0 means the
    first such step rolls back). ``deadline_s``: a rollout still unresolved after it rolls back."""

    metrics: tuple[MetricPolicy, ...]
    failure_limit: int = 0
    inconclusive_limit: int = 2
    consecutive_error_limit: int = 2
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if not self.metrics:
            raise SpecError("analysis.metrics: at least one metric (no metrics would never pass)")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise SpecError(f"analysis.metrics: duplicate metric names in {names}")
        for name in ("failure_limit", "inconclusive_limit", "consecutive_error_limit"):
            if getattr(self, name) < 0:
                raise SpecError(f"analysis.{name}: must be >= 0")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> AnalysisPolicy:
        """Build from plain data (the release spec's ``analysis`` block); unknown keys are errors."""
        from ml_release.config import build

        return build(cls, raw, path="analysis")

    def to_dict(self) -> dict[str, Any]:
        from ml_release.config import to_plain

        return dict(to_plain(self))


# -- measurements -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VersionSamples:
    """What one version served in one step's window of live traffic.

    ``latencies_ms`` and ``statuses`` hold one entry per request (status 0: transport error).
    ``predicted_labels``: the label of each successful response with finite scores;
    ``non_finite_responses``: successful responses whose scores held a NaN or an infinity.
    """

    version: str
    latencies_ms: tuple[float, ...] = ()
    statuses: tuple[int, ...] = ()
    predicted_labels: tuple[str, ...] = ()
    non_finite_responses: int = 0

    @property
    def requests(self) -> int:
        return len(self.statuses)

    @property
    def errors(self) -> int:
        return sum(1 for s in self.statuses if not 200 <= s < 300)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "latencies_ms": [json_float(x) for x in self.latencies_ms],
            "statuses": list(self.statuses),
            "predicted_labels": list(self.predicted_labels),
            "non_finite_responses": self.non_finite_responses,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VersionSamples:
        """Inverse of :meth:`to_dict` (a non-finite latency was written as null)."""
        return cls(
            version=str(raw["version"]),
            latencies_ms=tuple(math.nan if x is None else float(x) for x in raw["latencies_ms"]),
            statuses=tuple(int(x) for x in raw["statuses"]),
            predicted_labels=tuple(str(x) for x in raw["predicted_labels"]),
            non_finite_responses=int(raw["non_finite_responses"]),
        )


@dataclasses.dataclass(frozen=True)
class LabelledReplay:
    """The same labelled rows through both versions; ``None`` = no usable answer (counts as wrong)."""

    truth: tuple[str, ...]
    canary: tuple[str | None, ...]
    stable: tuple[str | None, ...]
    labels: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "truth": list(self.truth),
            "canary": list(self.canary),
            "stable": list(self.stable),
            "labels": list(self.labels),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LabelledReplay:
        def answers(xs: Sequence[Any]) -> tuple[str | None, ...]:
            return tuple(None if x is None else str(x) for x in xs)

        return cls(tuple(map(str, raw["truth"])), answers(raw["canary"]), answers(raw["stable"]), tuple(raw["labels"]))


@dataclasses.dataclass(frozen=True)
class WorkerHealth:
    """One version's serving workers over a step, read from the server before and after it.

    ``restarts``: workers that died during the step (their process changed or vanished);
    ``not_ready``: workers not READY when the step ended; ``workers``: how many were READY at its
    start. A worker that crashes mid-step is a canary fault even when the requests it dropped are
    too few to move the error rate (Flagger and Argo Rollouts abort on a crash-looping canary too).
    """

    version: str
    workers: int
    restarts: int = 0
    not_ready: int = 0
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "workers": self.workers,
            "restarts": self.restarts,
            "not_ready": self.not_ready,
            "details": _plain(self.details),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> WorkerHealth:
        counts = (int(raw["workers"]), int(raw["restarts"]), int(raw["not_ready"]))
        return cls(str(raw["version"]), *counts, details=raw.get("details", {}))


@dataclasses.dataclass(frozen=True)
class ProviderError:
    """A measurement that failed: the metrics this provider feeds are judged Error, never Pass."""

    provider: Provider
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "message": self.message}


@dataclasses.dataclass(frozen=True)
class StepMeasurements:
    """Everything measured in one canary step, canary and stable in the same window (G23).

    ``unattributed_statuses``: statuses of responses that named no version (e.g. a proxy's own 502).
    """

    step: int
    weight: float  # the canary's share in percent, as read back from the router
    canary: VersionSamples | None = None
    stable: VersionSamples | None = None
    replay: LabelledReplay | None = None
    unattributed_statuses: tuple[int, ...] = ()
    errors: tuple[ProviderError, ...] = ()
    canary_health: WorkerHealth | None = None
    stable_health: WorkerHealth | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "weight": self.weight,
            "canary": self.canary.to_dict() if self.canary else None,
            "stable": self.stable.to_dict() if self.stable else None,
            "replay": self.replay.to_dict() if self.replay else None,
            "unattributed_statuses": list(self.unattributed_statuses),
            "errors": [e.to_dict() for e in self.errors],
            "canary_health": self.canary_health.to_dict() if self.canary_health else None,
            "stable_health": self.stable_health.to_dict() if self.stable_health else None,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StepMeasurements:
        """Inverse of :meth:`to_dict`: a release record's measurements, ready to be judged again."""

        def opt(key: str, kind: Any) -> Any:
            return kind.from_dict(raw[key]) if raw.get(key) is not None else None

        return cls(
            step=int(raw["step"]),
            weight=float(raw["weight"]),
            canary=opt("canary", VersionSamples),
            stable=opt("stable", VersionSamples),
            replay=opt("replay", LabelledReplay),
            unattributed_statuses=tuple(int(x) for x in raw.get("unattributed_statuses", ())),
            errors=tuple(ProviderError(e["provider"], e["message"]) for e in raw.get("errors", ())),
            canary_health=opt("canary_health", WorkerHealth),
            stable_health=opt("stable_health", WorkerHealth),
        )


def collect(provider: Provider, measure: Callable[[], T]) -> T | ProviderError:
    """Run a provider; any exception becomes a :class:`ProviderError` instead of escaping."""
    try:
        return measure()
    except Exception as exc:  # a provider never raises into the loop (STYLE 6)
        return ProviderError(provider, f"{type(exc).__name__}: {exc}")


# -- verdicts ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetricVerdict:
    metric: str
    kind: str
    direction: str
    phase: Phase
    message: str
    value: float = math.nan
    stable_value: float = math.nan
    threshold: float | None = None  # the absolute SLO
    max_regression: float | None = None
    test: str = ""
    p_value: float = math.nan
    effect_size: float = math.nan
    effect_name: str = ""
    n_canary: int = 0
    n_stable: int = 0
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "kind": self.kind,
            "direction": self.direction,
            "phase": str(self.phase),
            "message": self.message,
            "value": json_float(self.value),
            "stable_value": json_float(self.stable_value),
            "threshold": self.threshold,
            "max_regression": self.max_regression,
            "test": self.test,
            "p_value": json_float(self.p_value),
            "effect_size": json_float(self.effect_size),
            "effect_name": self.effect_name,
            "n_canary": self.n_canary,
            "n_stable": self.n_stable,
            "details": _plain(self.details),
        }


def _plain(x: Any) -> Any:
    if isinstance(x, float):
        return json_float(x)
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return x


@dataclasses.dataclass(frozen=True)
class StepVerdict:
    step: int
    weight: float
    phase: Phase
    message: str
    metrics: tuple[MetricVerdict, ...]

    def failed(self) -> tuple[MetricVerdict, ...]:
        return tuple(m for m in self.metrics if m.phase is not Phase.PASS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "weight": self.weight,
            "phase": str(self.phase),
            "message": self.message,
            "metrics": [m.to_dict() for m in self.metrics],
        }


@dataclasses.dataclass(frozen=True)
class RolloutDecision:
    action: Action
    phase: Phase  # the outcome so far: Pass (advance/promote), or why it holds or rolls back
    reason: str
    next_step: int | None  # the step to run next (advance/hold); None on promote/rollback
    failed_steps: int
    inconclusive_steps: int
    consecutive_errors: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "action": str(self.action), "phase": str(self.phase)}


_SEVERITY = (Phase.FAIL, Phase.ERROR, Phase.INCONCLUSIVE, Phase.PASS)


def assess(measurements: StepMeasurements, policy: AnalysisPolicy) -> StepVerdict:
    """Judge one step: every metric of ``policy``, then the step (Fail > Error > Inconclusive > Pass)."""
    verdicts = tuple(_assess_metric(m, measurements) for m in policy.metrics)
    phase = next(p for p in _SEVERITY if p is Phase.PASS or any(v.phase is p for v in verdicts))
    if phase is Phase.PASS:
        message = f"step {measurements.step} at {measurements.weight:g}%: all {len(verdicts)} metrics passed"
    else:
        message = "; ".join(v.message for v in verdicts if v.phase is phase)
    return StepVerdict(measurements.step, measurements.weight, phase, message, verdicts)


def decide_rollout(
    verdicts: Sequence[StepVerdict], policy: AnalysisPolicy, *, total_steps: int, elapsed_s: float | None = None
) -> RolloutDecision:
    """What to do after the latest step verdict, given every verdict of this rollout in order.

    Rolls back on more Fail steps than ``failure_limit``, more Inconclusive steps than
    ``inconclusive_limit``, more consecutive Error steps than ``consecutive_error_limit``, or past
    ``deadline_s``. Promotes only when every step ``0 .. total_steps - 1`` has a Pass verdict.
    """
    failed = sum(1 for v in verdicts if v.phase is Phase.FAIL)
    inconclusive = sum(1 for v in verdicts if v.phase is Phase.INCONCLUSIVE)
    consecutive = 0
    for v in reversed(verdicts):
        if v.phase is not Phase.ERROR:
            break
        consecutive += 1

    def out(action: Action, phase: Phase, reason: str, next_step: int | None = None) -> RolloutDecision:
        return RolloutDecision(action, phase, reason, next_step, failed, inconclusive, consecutive)

    last = verdicts[-1] if verdicts else None
    if failed > policy.failure_limit:
        worst = next(v for v in reversed(verdicts) if v.phase is Phase.FAIL)
        return out(Action.ROLLBACK, Phase.FAIL, f"step {worst.step} failed: {worst.message}")
    if inconclusive > policy.inconclusive_limit:
        assert last is not None
        return out(
            Action.ROLLBACK,
            Phase.INCONCLUSIVE,
            f"{inconclusive} inconclusive step(s) > limit {policy.inconclusive_limit}: {last.message}",
        )
    if consecutive > policy.consecutive_error_limit:
        assert last is not None
        return out(
            Action.ROLLBACK,
            Phase.ERROR,
            f"{consecutive} consecutive measurement error(s) > limit {policy.consecutive_error_limit}: {last.message}",
        )
    passed = {v.step for v in verdicts if v.phase is Phase.PASS}
    if total_steps > 0 and passed >= set(range(total_steps)):
        return out(Action.PROMOTE, Phase.PASS, f"all {total_steps} step(s) passed")
    if policy.deadline_s is not None and elapsed_s is not None and elapsed_s > policy.deadline_s:
        phase = last.phase if last is not None and last.phase is not Phase.PASS else Phase.INCONCLUSIVE
        return out(Action.ROLLBACK, phase, f"deadline {policy.deadline_s:g}s passed after {elapsed_s:.0f}s")
    if last is None:
        return out(Action.HOLD, Phase.INCONCLUSIVE, "no verdict yet", 0)
    if last.phase is Phase.PASS:
        nxt = last.step + 1
        return out(Action.ADVANCE, Phase.PASS, f"step {last.step} passed: advance to step {nxt}", nxt)
    return out(Action.HOLD, last.phase, f"step {last.step} {last.phase}: measure again ({last.message})", last.step)


# -- metrics ----------------------------------------------------------------------------------


def _assess_metric(mp: MetricPolicy, m: StepMeasurements) -> MetricVerdict:
    base: dict[str, Any] = {
        "metric": mp.name,
        "kind": mp.kind,
        "direction": mp.direction,
        "threshold": mp.limit,
        "max_regression": mp.max_regression if mp.kind in ("latency", "error_rate", "accuracy") else None,
    }
    errors = [e for e in m.errors if e.provider == mp.provider]
    if errors:
        why = "; ".join(e.message for e in errors)
        return MetricVerdict(
            **base, phase=Phase.ERROR, message=f"Halt advancement: {mp.provider} measurement failed: {why}"
        )
    try:
        return _EVALUATORS[mp.kind](mp, m, base)
    except Exception as exc:  # a bug or malformed input is an Error verdict, never a crash of the loop
        return MetricVerdict(
            **base, phase=Phase.ERROR, message=f"Halt advancement: {mp.label()} could not be judged: {exc!r}"
        )


def _inconclusive(mp: MetricPolicy, base: dict[str, Any], why: str, **kw: Any) -> MetricVerdict:
    return MetricVerdict(
        **base, phase=Phase.INCONCLUSIVE, message=f"Halt advancement: canary {mp.label()} inconclusive: {why}", **kw
    )


def _no_samples(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any], *, need_stable: bool) -> MetricVerdict:
    missing = [side for side, v in (("canary", m.canary), ("stable", m.stable)) if v is None]
    if not need_stable:
        missing = [s for s in missing if s == "canary"]
    return _inconclusive(mp, base, f"no {' or '.join(missing)} traffic measured")


def _latency(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any]) -> MetricVerdict:
    relative = mp.max_regression is not None
    if m.canary is None or (relative and m.stable is None):
        return _no_samples(mp, m, base, need_stable=relative)
    canary = m.canary.latencies_ms
    stable = m.stable.latencies_ms if m.stable is not None else ()
    need = mp.required_samples
    test = stats.mann_whitney_slower(canary, stable, min_samples=need) if relative else None
    value = stats.quantile(canary, mp.quantile)
    stable_value = stats.quantile(stable, mp.quantile)
    n = {"n_canary": len(canary), "n_stable": len(stable)}
    if not math.isfinite(value) and canary:
        return _inconclusive(mp, base, "non-finite latency measurements", **n)
    if len(canary) < need:
        return _inconclusive(mp, base, f"{len(canary)} canary requests < {need} needed", **n)
    if test is not None and not test.sufficient:
        return _inconclusive(mp, base, test.reason, **n)
    label, unit = f"canary {mp.label()}", "ms"
    fig: dict[str, Any] = {"value": value, "stable_value": stable_value, **n}
    if test is not None:
        fig |= {"test": test.test, "p_value": test.p_value, "effect_size": test.effect_size}
        fig |= {"effect_name": test.effect_name, "details": dict(test.details)}
    if mp.slo is not None and value > mp.slo:
        return MetricVerdict(
            **base, phase=Phase.FAIL, message=f"Halt advancement: {label} {value:.0f} {unit} > {mp.slo:g} {unit}", **fig
        )
    if test is not None and mp.max_regression is not None:
        increase = value - stable_value
        if increase > mp.max_regression and test.p_value < mp.alpha and test.effect_size >= mp.effect_floor:
            return MetricVerdict(
                **base,
                phase=Phase.FAIL,
                message=(
                    f"Halt advancement: {label} {value:.0f} {unit} > stable {stable_value:.0f} {unit} "
                    f"+ {mp.max_regression:g} {unit} (Mann-Whitney p={test.p_value:.2g}, "
                    f"P(canary > stable)={test.effect_size:.2f})"
                ),
                **fig,
            )
    within = f" <= {mp.slo:g} {unit}" if mp.slo is not None else ""
    versus = f"; stable {stable_value:.0f} {unit}" if test is not None else ""
    return MetricVerdict(**base, phase=Phase.PASS, message=f"{label} {value:.0f} {unit}{within}{versus}", **fig)


def _error_rate(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any]) -> MetricVerdict:
    relative = mp.max_regression is not None
    if m.canary is None or (relative and m.stable is None):
        return _no_samples(mp, m, base, need_stable=relative)
    need = mp.required_samples
    c_n, c_err = m.canary.requests, m.canary.errors
    s_n, s_err = (m.stable.requests, m.stable.errors) if m.stable is not None else (0, 0)
    n = {"n_canary": c_n, "n_stable": s_n}
    if c_n < need:
        return _inconclusive(mp, base, f"{c_n} canary requests < {need} needed", **n)
    test = stats.fisher_more_errors(c_err, c_n, s_err, s_n, min_samples=need) if relative else None
    if test is not None and not test.sufficient:
        return _inconclusive(mp, base, test.reason, **n)
    value, stable_value = c_err / c_n, (s_err / s_n if s_n else math.nan)
    fig: dict[str, Any] = {"value": value, "stable_value": stable_value, **n}
    fig["details"] = {"canary_errors": c_err, "stable_errors": s_err}
    if test is not None:
        fig |= {"test": test.test, "p_value": test.p_value, "effect_size": test.effect_size}
        fig |= {"effect_name": test.effect_name}
    label = f"canary {mp.label()}"
    if mp.slo is not None and value > mp.slo:
        return MetricVerdict(
            **base, phase=Phase.FAIL, message=f"Halt advancement: {label} {value:.2%} > {mp.slo:.2%}", **fig
        )
    regressed = test is not None and value - stable_value > (mp.max_regression or 0.0)
    if test is not None and mp.max_regression is not None and regressed and test.p_value < mp.alpha:
        return MetricVerdict(
            **base,
            phase=Phase.FAIL,
            message=(
                f"Halt advancement: {label} {value:.2%} > stable {stable_value:.2%} + {mp.max_regression:.2%} "
                f"(Fisher p={test.p_value:.2g})"
            ),
            **fig,
        )
    within = f" <= {mp.slo:.2%}" if mp.slo is not None else ""
    return MetricVerdict(**base, phase=Phase.PASS, message=f"{label} {value:.2%}{within}", **fig)


def _accuracy(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any]) -> MetricVerdict:
    r = m.replay
    if r is None:
        return _inconclusive(mp, base, "no labelled replay measured")
    need = mp.required_samples
    if not len(r.truth) == len(r.canary) == len(r.stable):
        return MetricVerdict(
            **base,
            phase=Phase.ERROR,
            message=(
                f"Halt advancement: labelled replay is unpaired: truth {len(r.truth)}, "
                f"canary {len(r.canary)}, stable {len(r.stable)}"
            ),
        )
    n = {"n_canary": len(r.truth), "n_stable": len(r.truth)}
    if len(r.truth) < need:
        return _inconclusive(mp, base, f"{len(r.truth)} labelled rows < {need} needed", **n)
    canary_ok = [p is not None and p == t for p, t in zip(r.canary, r.truth, strict=True)]
    stable_ok = [p is not None and p == t for p, t in zip(r.stable, r.truth, strict=True)]
    test = stats.mcnemar_less_accurate(canary_ok, stable_ok, min_samples=need)
    value, stable_value = sum(canary_ok) / len(r.truth), sum(stable_ok) / len(r.truth)
    recall = stats.per_class_recall(r.truth, r.canary, r.stable, r.labels or None)
    fig: dict[str, Any] = {
        "value": value,
        "stable_value": stable_value,
        "test": test.test,
        "p_value": test.p_value,
        "effect_size": test.effect_size,
        "effect_name": test.effect_name,
        **n,
        "details": {
            **test.details,
            "agreement_rate": stats.agreement_rate(r.canary, r.stable),
            "canary_unanswered": sum(1 for p in r.canary if p is None),
            "per_class_recall": {k: v.to_dict() for k, v in recall.items()},
        },
    }
    label = f"canary {mp.label()}"
    if mp.slo is not None and value < mp.slo:
        return MetricVerdict(
            **base, phase=Phase.FAIL, message=f"Halt advancement: {label} {value:.3f} < {mp.slo:.3f}", **fig
        )
    if mp.max_regression is not None and stable_value - value > mp.max_regression and test.p_value < mp.alpha:
        return MetricVerdict(
            **base,
            phase=Phase.FAIL,
            message=(
                f"Halt advancement: {label} {value:.3f} < stable {stable_value:.3f} - {mp.max_regression:.3f} "
                f"(McNemar p={test.p_value:.2g})"
            ),
            **fig,
        )
    within = f" >= {mp.slo:.3f}" if mp.slo is not None else ""
    return MetricVerdict(
        **base, phase=Phase.PASS, message=f"{label} {value:.3f}{within}; stable {stable_value:.3f}", **fig
    )


def _prediction_shift(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any]) -> MetricVerdict:
    if m.canary is None or m.stable is None:
        return _no_samples(mp, m, base, need_stable=True)
    need = mp.required_samples
    labels = sorted(set(m.stable.predicted_labels))
    test = stats.population_stability_index(
        m.canary.predicted_labels, m.stable.predicted_labels, labels, min_samples=need
    )
    n = {"n_canary": test.n_canary, "n_stable": test.n_stable}
    if not test.sufficient:
        return _inconclusive(mp, base, test.reason, **n)
    fig: dict[str, Any] = {
        "value": test.statistic,
        "test": test.test,
        "effect_size": test.effect_size,
        "effect_name": "psi",
        **n,
    }
    fig["details"] = dict(test.details)
    assert mp.slo is not None
    label = f"canary {mp.label()}"
    if test.statistic > mp.slo:
        return MetricVerdict(
            **base, phase=Phase.FAIL, message=f"Halt advancement: {label} {test.statistic:.3f} > {mp.slo:g}", **fig
        )
    return MetricVerdict(**base, phase=Phase.PASS, message=f"{label} {test.statistic:.3f} <= {mp.slo:g}", **fig)


def _non_finite(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any]) -> MetricVerdict:
    if m.canary is None:
        return _no_samples(mp, m, base, need_stable=False)
    bad = m.canary.non_finite_responses
    scored = len(m.canary.predicted_labels) + bad
    limit = mp.limit or 0.0
    fig: dict[str, Any] = {"value": float(bad), "n_canary": scored, "details": {"scored_responses": scored}}
    if bad > limit:  # evidence of harm needs no minimum sample
        return MetricVerdict(
            **base,
            phase=Phase.FAIL,
            message=f"Halt advancement: canary returned non-finite scores in {bad} of {scored} responses",
            **fig,
        )
    if scored < mp.required_samples:
        return _inconclusive(mp, base, f"{scored} scored canary responses < {mp.required_samples} needed", **fig)
    return MetricVerdict(**base, phase=Phase.PASS, message=f"canary scores finite in all {scored} responses", **fig)


def _unattributed(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any]) -> MetricVerdict:
    total = len(m.unattributed_statuses)
    total += (m.canary.requests if m.canary else 0) + (m.stable.requests if m.stable else 0)
    errors = sum(1 for s in m.unattributed_statuses if not 200 <= s < 300)
    fig: dict[str, Any] = {
        "value": errors / total if total else math.nan,
        "n_canary": total,
        "details": {"errors": errors},
    }
    if total < mp.required_samples:
        return _inconclusive(mp, base, f"{total} requests < {mp.required_samples} needed", **fig)
    limit = mp.limit or 0.0
    rate = errors / total
    # a failure that names no version may be the canary's: rolling back is the safe reading (G24)
    if rate > limit:
        return MetricVerdict(
            **base,
            phase=Phase.FAIL,
            message=f"Halt advancement: {errors} failed request(s) named no version ({rate:.2%} > {limit:.2%})",
            **fig,
        )
    return MetricVerdict(**base, phase=Phase.PASS, message=f"{errors} unattributed failure(s) of {total}", **fig)


def _worker_restarts(mp: MetricPolicy, m: StepMeasurements, base: dict[str, Any]) -> MetricVerdict:
    health = m.canary_health
    if health is None:
        return _inconclusive(mp, base, "the canary's workers were not read")
    bad = health.restarts + health.not_ready
    limit = mp.limit or 0.0
    fig: dict[str, Any] = {"value": float(bad), "n_canary": health.workers, "details": health.to_dict()}
    if m.stable_health is not None:
        fig["stable_value"] = float(m.stable_health.restarts + m.stable_health.not_ready)
        fig["n_stable"] = m.stable_health.workers
    if bad > limit:  # a crash is evidence enough; it needs no sample size
        return MetricVerdict(
            **base,
            phase=Phase.FAIL,
            message=(
                f"Halt advancement: canary worker(s) restarted {health.restarts} time(s) and "
                f"{health.not_ready} not READY at the end of the step ({bad} > {limit:g})"
            ),
            **fig,
        )
    if health.workers < 1:
        return _inconclusive(mp, base, "the canary had no READY worker when the step began", **fig)
    return MetricVerdict(
        **base, phase=Phase.PASS, message=f"canary's {health.workers} worker(s) stayed up and READY", **fig
    )


_EVALUATORS: Mapping[str, Callable[[MetricPolicy, StepMeasurements, dict[str, Any]], MetricVerdict]] = {
    "latency": _latency,
    "error_rate": _error_rate,
    "accuracy": _accuracy,
    "prediction_shift": _prediction_shift,
    "non_finite": _non_finite,
    "unattributed_errors": _unattributed,
    "worker_restarts": _worker_restarts,
}


def default_policy() -> AnalysisPolicy:
    """The policy proposed for the release spec's ``analysis`` block, as frozen dataclasses."""
    return AnalysisPolicy.from_dict(
        {
            "metrics": [
                {"name": "latency_p99", "kind": "latency", "quantile": 0.99, "slo": 300.0, "max_regression": 50.0},
                {"name": "latency_p50", "kind": "latency", "quantile": 0.5, "max_regression": 25.0},
                {"name": "error_rate", "kind": "error_rate", "slo": 0.01, "max_regression": 0.005},
                {"name": "accuracy", "kind": "accuracy", "slo": 0.6, "max_regression": 0.02},
                {"name": "prediction_shift", "kind": "prediction_shift", "slo": 0.2},
                {"name": "non_finite", "kind": "non_finite"},
                {"name": "unattributed_errors", "kind": "unattributed_errors", "slo": 0.01},
                {"name": "worker_restarts", "kind": "worker_restarts", "slo": 0},
            ],
            "failure_limit": 0,
            "inconclusive_limit": 2,
            "consecutive_error_limit": 2,
            "deadline_s": 1800.0,
        }
    )
