"""Statistics for judging a canary against the stable model: pure functions over plain sequences.

Every test returns a :class:`TestResult` whose ``sufficient`` flag says whether it could be computed
on the evidence given. Empty, tiny or non-finite inputs give ``sufficient=False`` with a reason and
a NaN p-value, never a p-value that happens to look reassuring (RELIABILITY G21). Tests are one-sided
in the direction that would stop a rollout ("canary slower", "canary errs more", "canary less
accurate"): a small p-value is evidence against the canary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

PSI_EPSILON = 1e-4
"""Share given to a category one side never predicted, so that PSI stays finite.

With 1e-4 a label absent on one side and at 1 % on the other contributes about 0.046; a label
absent on one side and at 10 % contributes about 0.69, above any usual limit (0.1 to 0.25).
"""


@dataclasses.dataclass(frozen=True)
class TestResult:
    """One statistical comparison of canary and stable."""

    __test__ = False  # not a pytest class

    test: str
    sufficient: bool
    reason: str = ""  # why it is insufficient; empty when sufficient
    statistic: float = math.nan
    p_value: float = math.nan
    effect_size: float = math.nan
    effect_name: str = ""
    n_canary: int = 0
    n_stable: int = 0
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": self.test,
            "sufficient": self.sufficient,
            "reason": self.reason,
            "statistic": json_float(self.statistic),
            "p_value": json_float(self.p_value),
            "effect_size": json_float(self.effect_size),
            "effect_name": self.effect_name,
            "n_canary": self.n_canary,
            "n_stable": self.n_stable,
            "details": {k: json_float(v) if isinstance(v, float) else v for k, v in self.details.items()},
        }


def json_float(x: float | None) -> float | None:
    """JSON has no NaN: missing figures are ``null``."""
    return float(x) if x is not None and math.isfinite(x) else None


def _finite_array(values: Sequence[float], what: str) -> tuple[Any, str]:
    import numpy as np

    arr = np.asarray(values, dtype=float).ravel()
    bad = int(arr.size - np.isfinite(arr).sum())
    return arr, (f"{bad} non-finite {what} value(s)" if bad else "")


def _insufficient(test: str, reason: str, n_canary: int, n_stable: int) -> TestResult:
    return TestResult(test, False, reason, n_canary=n_canary, n_stable=n_stable)


def _size_problem(n_canary: int, n_stable: int, min_samples: int) -> str:
    need = max(1, min_samples)
    short = [f"{side} has {n} < {need}" for side, n in (("canary", n_canary), ("stable", n_stable)) if n < need]
    return "too few samples: " + ", ".join(short) if short else ""


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1, linear interpolation); NaN when empty or any value is non-finite."""
    import numpy as np

    arr, problem = _finite_array(values, "")
    if problem or arr.size == 0:
        return math.nan
    return float(np.quantile(arr, q))


# -- latency ----------------------------------------------------------------------------------


def hodges_lehmann_shift(
    canary: Sequence[float], stable: Sequence[float], *, max_pairs: int = 2_000_000, seed: int = 0
) -> float:
    """Median of all pairwise differences ``canary_i - stable_j``: a robust location shift.

    Above ``max_pairs`` pairs, both samples are subsampled (seeded, so the figure is reproducible);
    the estimate's error is then far below the latency resolution that matters here.
    """
    import numpy as np

    c = np.asarray(canary, dtype=float)
    s = np.asarray(stable, dtype=float)
    if c.size == 0 or s.size == 0 or not (np.isfinite(c).all() and np.isfinite(s).all()):
        return math.nan
    if c.size * s.size > max_pairs:
        rng = np.random.default_rng(seed)
        side = int(math.sqrt(max_pairs))
        c = rng.choice(c, size=min(c.size, side), replace=False)
        s = rng.choice(s, size=min(s.size, side), replace=False)
    return float(np.median(np.subtract.outer(c, s)))


def mann_whitney_slower(canary: Sequence[float], stable: Sequence[float], *, min_samples: int = 1) -> TestResult:
    """Mann-Whitney U, one-sided: are the canary's latencies stochastically larger than stable's?

    Effect size: the common-language effect size P(canary > stable) + ½ P(tie) = U / (n₁ n₂)
    (0.5 = no difference; Vargha-Delaney call 0.56 small, 0.64 medium, 0.71 large).
    ``details["hodges_lehmann_shift"]`` is the location shift in the input's unit.
    """
    from scipy.stats import mannwhitneyu

    test = "mann-whitney-u (canary slower)"
    c, pc = _finite_array(canary, "canary latency")
    s, ps = _finite_array(stable, "stable latency")
    if pc or ps:
        return _insufficient(test, "; ".join(p for p in (pc, ps) if p), int(c.size), int(s.size))
    problem = _size_problem(int(c.size), int(s.size), min_samples)
    if problem:
        return _insufficient(test, problem, int(c.size), int(s.size))
    res = mannwhitneyu(c, s, alternative="greater", method="auto")
    u = float(res.statistic)
    cles = u / (c.size * s.size)
    return TestResult(
        test,
        True,
        statistic=u,
        p_value=float(res.pvalue),
        effect_size=cles,
        effect_name="P(canary > stable)",
        n_canary=int(c.size),
        n_stable=int(s.size),
        details={"hodges_lehmann_shift": hodges_lehmann_shift(c, s)},
    )


# -- error rates ------------------------------------------------------------------------------


def fisher_more_errors(
    canary_errors: int, canary_n: int, stable_errors: int, stable_n: int, *, min_samples: int = 1
) -> TestResult:
    """Fisher's exact test, one-sided: does the canary fail a larger share of requests?

    Effect size: the difference of error rates, canary minus stable.
    """
    from scipy.stats import fisher_exact

    test = "fisher-exact (canary errs more)"
    for name, errors, n in (("canary", canary_errors, canary_n), ("stable", stable_errors, stable_n)):
        if not 0 <= errors <= n:
            return _insufficient(test, f"{name}: {errors} errors out of {n} requests is impossible", canary_n, stable_n)
    problem = _size_problem(canary_n, stable_n, min_samples)
    if problem:
        return _insufficient(test, problem, canary_n, stable_n)
    table = [[canary_errors, canary_n - canary_errors], [stable_errors, stable_n - stable_errors]]
    odds, p = fisher_exact(table, alternative="greater")
    rate_c, rate_s = canary_errors / canary_n, stable_errors / stable_n
    return TestResult(
        test,
        True,
        statistic=float(odds),
        p_value=float(p),
        effect_size=rate_c - rate_s,
        effect_name="error-rate difference",
        n_canary=canary_n,
        n_stable=stable_n,
        details={"canary_error_rate": rate_c, "stable_error_rate": rate_s},
    )


# -- accuracy on a labelled replay ------------------------------------------------------------


def mcnemar_less_accurate(
    canary_correct: Sequence[bool], stable_correct: Sequence[bool], *, min_samples: int = 1
) -> TestResult:
    """McNemar's exact test on paired rows, one-sided: is the canary wrong more often than stable?

    Only discordant rows carry evidence: ``b`` rows the canary gets wrong and stable right, ``c`` the
    reverse. Under "equally accurate", b ~ Binomial(b + c, ½); p = P(X ≥ b). With no discordant row
    the versions agree everywhere and p = 1. Effect size: accuracy difference, canary minus stable.
    """
    from scipy.stats import binomtest

    test = "mcnemar-exact (canary less accurate)"
    n_c, n_s = len(canary_correct), len(stable_correct)
    if n_c != n_s:
        return _insufficient(test, f"unpaired rows: canary {n_c}, stable {n_s}", n_c, n_s)
    problem = _size_problem(n_c, n_s, min_samples)
    if problem:
        return _insufficient(test, problem, n_c, n_s)
    b = sum(1 for cc, sc in zip(canary_correct, stable_correct, strict=True) if sc and not cc)
    c = sum(1 for cc, sc in zip(canary_correct, stable_correct, strict=True) if cc and not sc)
    p = float(binomtest(b, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
    acc_c = sum(map(bool, canary_correct)) / n_c
    acc_s = sum(map(bool, stable_correct)) / n_s
    return TestResult(
        test,
        True,
        statistic=float(b),
        p_value=p,
        effect_size=acc_c - acc_s,
        effect_name="accuracy difference",
        n_canary=n_c,
        n_stable=n_s,
        details={"canary_only_wrong": b, "stable_only_wrong": c, "canary_accuracy": acc_c, "stable_accuracy": acc_s},
    )


def agreement_rate(canary: Sequence[str | None], stable: Sequence[str | None]) -> float:
    """Share of paired rows where both versions gave the same answer; NaN when empty or unpaired.

    A missing answer (``None``) never agrees, not even with another missing answer.
    """
    if not canary or len(canary) != len(stable):
        return math.nan
    return sum(1 for a, b in zip(canary, stable, strict=True) if a is not None and a == b) / len(canary)


@dataclasses.dataclass(frozen=True)
class ClassRecall:
    label: str
    support: int
    canary: float
    stable: float

    @property
    def delta(self) -> float:
        return self.canary - self.stable

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "support": self.support,
            "canary": json_float(self.canary),
            "stable": json_float(self.stable),
            "delta": json_float(self.delta),
        }


def per_class_recall(
    truth: Sequence[str],
    canary: Sequence[str | None],
    stable: Sequence[str | None],
    labels: Sequence[str] | None = None,
) -> dict[str, ClassRecall]:
    """Recall of each true class for both versions (NaN for a class with no row)."""
    if not len(truth) == len(canary) == len(stable):
        raise ValueError(f"unpaired rows: truth {len(truth)}, canary {len(canary)}, stable {len(stable)}")
    out = {}
    for label in labels if labels is not None else sorted(set(truth)):
        rows = [i for i, t in enumerate(truth) if t == label]
        n = len(rows)
        out[label] = ClassRecall(
            label,
            n,
            sum(1 for i in rows if canary[i] == label) / n if n else math.nan,
            sum(1 for i in rows if stable[i] == label) / n if n else math.nan,
        )
    return out


# -- prediction shift -------------------------------------------------------------------------


def population_stability_index(
    canary: Sequence[str],
    stable: Sequence[str],
    categories: Sequence[str] | None = None,
    *,
    epsilon: float = PSI_EPSILON,
    min_samples: int = 1,
) -> TestResult:
    """PSI of the canary's predicted-label distribution against stable's: Σ (c - s) ln(c / s).

    Shares of 0 become ``epsilon`` (see :data:`PSI_EPSILON`). A label outside ``categories`` gets its
    own bin rather than being dropped. Conventional reading: < 0.1 stable, 0.1-0.25 moderate shift,
    > 0.25 large shift. Not a test: ``p_value`` stays NaN; ``statistic`` and ``effect_size`` are PSI.
    """
    test = "psi (predicted labels)"
    problem = _size_problem(len(canary), len(stable), min_samples)
    if problem:
        return _insufficient(test, problem, len(canary), len(stable))
    bins = list(dict.fromkeys([*(categories or ()), *sorted(set(canary) | set(stable))]))
    shares: dict[str, tuple[float, float]] = {}
    value = 0.0
    for label in bins:
        c = max(sum(1 for x in canary if x == label) / len(canary), epsilon)
        s = max(sum(1 for x in stable if x == label) / len(stable), epsilon)
        shares[label] = (c, s)
        value += (c - s) * math.log(c / s)
    return TestResult(
        test,
        True,
        statistic=value,
        effect_size=value,
        effect_name="psi",
        n_canary=len(canary),
        n_stable=len(stable),
        details={"epsilon": epsilon, "shares": {k: {"canary": c, "stable": s} for k, (c, s) in shares.items()}},
    )


# -- binomial helpers (the router's weight test) ----------------------------------------------


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial share ``k / n``; (0, 1) when n = 0."""
    from scipy.stats import beta

    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def binomial_tolerance(n: int, p: float, confidence: float = 0.999) -> tuple[int, int]:
    """The range of counts ``[lo, hi]`` that ``n`` trials at share ``p`` land in with ``confidence``.

    Equal tails; e.g. n=1000 at p=0.25 with 0.999 gives roughly (205, 297).
    """
    from scipy.stats import binom

    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    alpha = 1.0 - confidence
    return int(binom.ppf(alpha / 2, n, p)), int(binom.isf(alpha / 2, n, p))


def share_matches_weight(k: int, n: int, weight: float, *, alpha: float = 0.001, min_samples: int = 1) -> TestResult:
    """Two-sided exact binomial test that ``k`` of ``n`` requests at configured share ``weight`` is plausible.

    ``sufficient`` and ``p_value >= alpha`` together mean "the observed split matches the weight";
    ``details`` carry the Clopper-Pearson interval at ``1 - alpha`` and the tolerated count range.
    """
    from scipy.stats import binomtest

    test = "binomial (share matches weight)"
    if n < max(1, min_samples):
        return _insufficient(test, f"too few samples: {n} < {max(1, min_samples)}", k, n)
    if not 0 <= k <= n or not 0.0 <= weight <= 1.0:
        return _insufficient(test, f"impossible: k={k}, n={n}, weight={weight}", k, n)
    lo, hi = clopper_pearson(k, n, 1 - alpha)
    count_lo, count_hi = binomial_tolerance(n, weight, 1 - alpha)
    return TestResult(
        test,
        True,
        statistic=k / n,
        p_value=float(binomtest(k, n, weight).pvalue),
        effect_size=k / n - weight,
        effect_name="observed share - weight",
        n_canary=k,
        n_stable=n - k,
        details={"ci_low": lo, "ci_high": hi, "count_low": count_lo, "count_high": count_hi},
    )
