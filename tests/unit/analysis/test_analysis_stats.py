from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ml_release.analysis import stats

pytestmark = pytest.mark.unit


def test_mann_whitney_matches_scipy_and_reports_common_language_effect_size() -> None:
    rng = np.random.default_rng(1)
    canary, stable = rng.lognormal(3.1, 0.3, 400), rng.lognormal(3.0, 0.3, 500)
    result = stats.mann_whitney_slower(canary.tolist(), stable.tolist())
    expected = sps.mannwhitneyu(canary, stable, alternative="greater")
    assert result.sufficient
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.statistic == pytest.approx(expected.statistic)
    assert result.effect_size == pytest.approx(expected.statistic / (400 * 500))
    assert (result.n_canary, result.n_stable) == (400, 500)


def test_common_language_effect_size_and_hodges_lehmann_by_hand() -> None:
    # pairs (c - s): 3-1, 3-2, 5-1, 5-2 = 2, 1, 4, 3 -> all canary larger; median shift 2.5
    result = stats.mann_whitney_slower([3.0, 5.0], [1.0, 2.0])
    assert result.effect_size == 1.0
    assert result.details["hodges_lehmann_shift"] == 2.5
    # a tie counts one half: P(c > s) + 0.5 P(c = s) = (0 + 0.5) / 1
    assert stats.mann_whitney_slower([1.0], [1.0]).effect_size == 0.5


@pytest.mark.parametrize(
    ("canary", "stable", "min_samples", "why"),
    [
        ([], [1.0, 2.0], 1, "too few"),
        ([1.0, 2.0], [], 1, "too few"),
        ([1.0, 2.0], [1.0, 2.0], 3, "too few"),
        ([1.0, math.nan], [1.0, 2.0], 1, "non-finite"),
        ([1.0, 2.0], [math.inf, 2.0], 1, "non-finite"),
    ],
    ids=["empty-canary", "empty-stable", "tiny", "nan-canary", "inf-stable"],
)
def test_mann_whitney_is_insufficient_rather_than_reassuring(
    canary: list[float], stable: list[float], min_samples: int, why: str
) -> None:
    result = stats.mann_whitney_slower(canary, stable, min_samples=min_samples)
    assert not result.sufficient
    assert why in result.reason
    assert math.isnan(result.p_value)


def test_fisher_matches_scipy_one_sided() -> None:
    result = stats.fisher_more_errors(20, 100, 3, 900)
    expected = sps.fisher_exact([[20, 80], [3, 897]], alternative="greater")
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.effect_size == pytest.approx(0.2 - 3 / 900)


@pytest.mark.parametrize(
    ("counts", "why"),
    [((0, 0, 0, 10), "too few"), ((5, 3, 0, 10), "impossible"), ((-1, 10, 0, 10), "impossible")],
    ids=["no-canary-requests", "more-errors-than-requests", "negative-errors"],
)
def test_fisher_refuses_impossible_or_empty_counts(counts: tuple[int, int, int, int], why: str) -> None:
    result = stats.fisher_more_errors(*counts)
    assert not result.sufficient and why in result.reason


def test_mcnemar_exact_is_the_binomial_tail_on_discordant_pairs() -> None:
    # 8 rows only the canary gets wrong, 2 only stable gets wrong, 90 both right
    canary = [False] * 8 + [True] * 2 + [True] * 90
    stable = [True] * 8 + [False] * 2 + [True] * 90
    result = stats.mcnemar_less_accurate(canary, stable)
    assert result.p_value == pytest.approx((45 + 10 + 1) / 1024)  # P(X >= 8), X ~ Bin(10, 1/2)
    assert result.details["canary_only_wrong"] == 8 and result.details["stable_only_wrong"] == 2
    assert result.effect_size == pytest.approx(0.92 - 0.98)


def test_mcnemar_without_discordant_rows_is_not_worse() -> None:
    result = stats.mcnemar_less_accurate([True, False, True], [True, False, True])
    assert result.sufficient and result.p_value == 1.0


@pytest.mark.parametrize(("canary", "stable"), [([], []), ([True], [True, False])], ids=["empty", "unpaired"])
def test_mcnemar_is_insufficient_on_empty_or_unpaired_rows(canary: list[bool], stable: list[bool]) -> None:
    assert not stats.mcnemar_less_accurate(canary, stable).sufficient


def test_agreement_rate_never_counts_two_missing_answers_as_agreement() -> None:
    assert stats.agreement_rate(["a", "b", None, "c"], ["a", "c", None, "c"]) == 0.5
    assert math.isnan(stats.agreement_rate([], []))


def test_per_class_recall_deltas_by_hand() -> None:
    truth = ["pos", "pos", "neg", "neg", "neu"]
    canary = ["pos", "neg", "neg", "neg", None]
    stable = ["pos", "pos", "neg", "pos", "neu"]
    recall = stats.per_class_recall(truth, canary, stable, ["neg", "neu", "pos", "other"])
    assert recall["pos"].delta == pytest.approx(0.5 - 1.0)
    assert recall["neg"].delta == pytest.approx(1.0 - 0.5)
    assert recall["neu"].canary == 0.0 and recall["neu"].support == 1
    assert math.isnan(recall["other"].canary)


def test_psi_by_hand_and_zero_for_identical_distributions() -> None:
    canary = ["a"] * 60 + ["b"] * 40
    stable = ["a"] * 50 + ["b"] * 50
    expected = (0.6 - 0.5) * math.log(0.6 / 0.5) + (0.4 - 0.5) * math.log(0.4 / 0.5)
    assert stats.population_stability_index(canary, stable).statistic == pytest.approx(expected)
    assert stats.population_stability_index(stable, stable).statistic == 0.0


def test_psi_uses_the_documented_epsilon_for_a_label_one_side_never_predicted() -> None:
    result = stats.population_stability_index(["a"] * 90 + ["c"] * 10, ["a"] * 100, ["a", "b"])
    eps = stats.PSI_EPSILON
    expected = (0.9 - 1.0) * math.log(0.9) + (0.1 - eps) * math.log(0.1 / eps)
    assert result.statistic == pytest.approx(expected)
    assert set(result.details["shares"]) == {"a", "b", "c"}  # "b" is empty on both sides: contributes 0


def test_psi_on_no_predictions_is_insufficient() -> None:
    assert not stats.population_stability_index([], ["a"]).sufficient


def test_clopper_pearson_matches_closed_forms_at_the_edges() -> None:
    lo, hi = stats.clopper_pearson(0, 10, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = stats.clopper_pearson(10, 10, 0.95)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    assert stats.clopper_pearson(0, 0) == (0.0, 1.0)


def test_binomial_tolerance_covers_at_least_the_confidence() -> None:
    lo, hi = stats.binomial_tolerance(1000, 0.25, 0.999)
    assert lo < 250 < hi
    coverage = sps.binom.cdf(hi, 1000, 0.25) - sps.binom.cdf(lo - 1, 1000, 0.25)
    assert coverage >= 0.999


@pytest.mark.parametrize(
    ("k", "n", "weight", "matches"),
    [(250, 1000, 0.25, True), (50, 1000, 0.05, True), (120, 1000, 0.05, False), (0, 1000, 0.0, True)],
    ids=["quarter", "five-percent", "leaking-canary", "zero-weight"],
)
def test_share_matches_weight(k: int, n: int, weight: float, matches: bool) -> None:
    result = stats.share_matches_weight(k, n, weight)
    assert result.sufficient
    assert (result.p_value >= 0.001) is matches
    assert (result.details["count_low"] <= k <= result.details["count_high"]) is matches


def test_share_matches_weight_with_no_requests_is_insufficient() -> None:
    assert not stats.share_matches_weight(0, 0, 0.05).sufficient
